"""Feature detectors (Inception-v3, DINOv2, a pickled network, pixels), feature statistics, reference statistics
(EDM's .npz, EDM2's pickles), the Fréchet distance, precision and recall, and agreement with reference images."""

import io
import itertools
import math
import os
import pickle

import numpy as np
import scipy.linalg
import torch
import tqdm

import dnnlib
from torch_utils import distributed as dist
from training import dataset
from training import dinov2

INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/' \
    'inception-2015-12-05.pkl'
DINOV2_URL = 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth'
INCEPTION_NAME, DINOV2_NAME, PIXELS_NAME = 'inception', 'dinov2', 'pixels'
METRIC_KEYS = {INCEPTION_NAME: 'fid', DINOV2_NAME: 'fd_dinov2', PIXELS_NAME: 'fd_pixels'} # EDM2's metric names.
LABELS = {'fid': 'FID', 'fd_dinov2': 'FD-DINOv2', 'fd_pixels': 'FD-pixels'}
FEATURE_LABELS = {'fid': 'Inception', 'fd_dinov2': 'DINOv2', 'fd_pixels': 'pixels'}
PR_NAME = 'pr' # Precision and recall.

#----------------------------------------------------------------------------
# Detectors.

class PixelDetector(torch.nn.Module):
    """Pixels in [-1, 1], average-pooled by halving H and W until C*H*W <= max_dim, flattened."""
    max_dim = 1024

    def forward(self, images, return_features=True):
        x = images.to(torch.float64) / 127.5 - 1
        c, h, w = x.shape[1:]
        while c * h * w > self.max_dim and (h > 1 or w > 1):
            h, w = (h + 1) // 2, (w + 1) // 2
        return torch.nn.functional.adaptive_avg_pool2d(x, (h, w)).flatten(1)

class DINOv2Detector(torch.nn.Module):
    """DINOv2 as EDM2 uses it: antialiased bicubic resize to 224x224, ImageNet normalization, the class token."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def preprocess(self, images):
        x = torch.nn.functional.interpolate(images.to(torch.float32), size=(224, 224), mode='bicubic', antialias=True)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device).reshape(1, -1, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device).reshape(1, -1, 1, 1)
        return (x / 255 - mean) / std

    def forward(self, images, return_features=True):
        return self.vit(self.preprocess(images))

class Detector:
    """A named feature network: uint8 images [N, C, H, W] -> float64 features [N, D]."""

    def __init__(self, name, net, device): # Called as net(uint8 images on device, return_features=True).
        self.name, self.net, self.device = name, net, torch.device(device)
        self.is_pixels = name == PIXELS_NAME
        self.key = METRIC_KEYS.get(name, 'fid') # A pickled network stands in for Inception-v3.
        self.label, self.feature_label = LABELS[self.key], FEATURE_LABELS[self.key]

    def feature_dim(self, image_shape):
        """Number of features of images [C, H, W]."""
        try:
            return self(torch.zeros([1, *image_shape], dtype=torch.uint8)).shape[1]
        except RuntimeError as err:
            raise ValueError(f'Detector "{self.name}" fails on uint8 images of shape {list(image_shape)} ({err}); '
                'pass a detector made for such images.') from err

    def __call__(self, images):
        images = torch.as_tensor(images).to(self.device)
        assert images.dtype == torch.uint8 and images.ndim == 4
        if images.shape[1] == 1 and not self.is_pixels:
            images = images.repeat([1, 3, 1, 1])
        with torch.no_grad():
            features = self.net(images, return_features=True)
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != images.shape[0]:
            shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f'Detector "{self.name}" returned {shape} for {images.shape[0]} images, not features '
                '[N, D]; pass a network whose forward(images, return_features=True) gives a 2-D tensor.')
        return features.to(torch.float64)

def detector_name(detector):
    return {INCEPTION_URL: INCEPTION_NAME, DINOV2_URL: DINOV2_NAME}.get(detector, str(detector))

_detector_cache = dict() # (name, device, cache_dir) -> Detector

def load_detector(
    detector    = INCEPTION_NAME,   # 'inception', 'dinov2', 'pixels', or a pickle's path/URL.
    device      = 'cpu',
    cache_dir   = None,             # None = dnnlib's default.
    num_attempts= 10,               # Download attempts.
    verbose     = True,             # Report downloads on rank 0?
    option      = None,             # The script's option that named it, for messages.
):
    """Load a detector once per process; rank 0 downloads first."""
    name = detector_name(detector)
    key = (name, str(torch.device(device)), cache_dir)
    if key not in _detector_cache:
        load = dict(cache_dir=cache_dir, num_attempts=num_attempts, verbose=verbose and dist.get_rank() == 0)
        if name == PIXELS_NAME:
            net = PixelDetector()
        else:
            with dist.rank0_first():
                net = DINOv2Detector(_load_dinov2(option, **load)) if name == DINOV2_NAME else \
                    _load_network(name, option, **load)
        if isinstance(net, torch.nn.Module):
            net.eval().requires_grad_(False)
        _detector_cache[key] = Detector(name, net.to(device) if hasattr(net, 'to') else net, device)
    return _detector_cache[key]

def _use(option, value):
    return f'{option}={value}' if option else f'the detector "{value}"'

def _load_dinov2(option, **load):
    try:
        f = dnnlib.util.open_url(DINOV2_URL, **load)
    except OSError as err:
        cache = load['cache_dir'] or dnnlib.make_cache_dir_path('downloads')
        raise ValueError(f'The DINOv2 detector could not be downloaded from {DINOV2_URL}; copy the download cache '
            f'"{cache}" of a machine where it is reachable, or use {_use(option, INCEPTION_NAME)}.') from err
    try:
        with f:
            state = torch.load(io.BytesIO(f.read()), map_location='cpu', weights_only=True)
    except Exception as err: # pylint: disable=broad-except
        raise ValueError(f'The DINOv2 weights from {DINOV2_URL} could not be read ({type(err).__name__}: {err}); '
            'delete the cached copy.') from err
    return dinov2.from_state_dict(state, name=f'The file of {DINOV2_URL}')

def _load_network(name, option, **load):
    url = INCEPTION_URL if name == INCEPTION_NAME else name
    fix = f'pass a pickled network, "{INCEPTION_NAME}" or "{PIXELS_NAME}"'
    try:
        f = dnnlib.util.open_url(url, **load)
    except OSError as err:
        what = 'The Inception-v3 detector' if name == INCEPTION_NAME else f'Detector "{name}"'
        local = f'with {option}=PATH' if option else 'instead'
        raise ValueError(f'{what} could not be downloaded from {url}; pass a local copy {local}, '
            f'or use {_use(option, PIXELS_NAME)}.') from err
    except ValueError as err:
        if dnnlib.util.is_url(url, allow_file_urls=True):
            raise
        raise ValueError(f'Detector "{name}" is neither an existing file nor an http(s):// URL; {fix}.') from err
    try:
        with f:
            net = pickle.load(f)
    except Exception as err: # pylint: disable=broad-except
        raise ValueError(f'Detector "{name}" could not be unpickled ({type(err).__name__}: {err}); {fix}.') from err
    if not callable(net):
        raise ValueError(f'Detector "{name}" holds a {type(net).__name__}, not a network; {fix}.')
    return net

#----------------------------------------------------------------------------
# Feature statistics.

class FeatureStats:
    """Float64 count, sum and sum of outer products of features; keeps the features of the rows keep_rows."""

    def __init__(self, device='cpu', keep_rows=None):
        self.device = torch.device(device)
        self.num = 0
        self.sum = None         # [D]
        self.sum_outer = None   # Sum of x x^T, [D, D].
        self.keep_rows = None if keep_rows is None else np.asarray(keep_rows)
        self.features = []      # Kept features, float32 [n, D] ...
        self.rows = []          # ... and their dataset rows [n].

    @property
    def dim(self):
        return None if self.sum is None else self.sum.shape[0]

    def _allocate(self, dim):
        self.sum = torch.zeros([dim], dtype=torch.float64, device=self.device)
        self.sum_outer = torch.zeros([dim, dim], dtype=torch.float64, device=self.device)

    def append(self, features, rows=None):
        """Add features [N, D] of the dataset rows `rows` [N] (needed with keep_rows)."""
        x = torch.as_tensor(features).to(self.device, torch.float64)
        if self.sum is None:
            self._allocate(x.shape[1])
        assert x.ndim == 2 and x.shape[1] == self.dim
        self.num += x.shape[0]
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x
        if self.keep_rows is not None:
            kept = np.isin(np.asarray(rows), self.keep_rows)
            self.features.append(x[torch.as_tensor(kept, device=x.device)].to(torch.float32).cpu())
            self.rows.append(np.asarray(rows)[kept])

    def all_reduce(self):
        if not dist.is_distributed():
            return self
        dim = torch.tensor([self.dim or 0], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(dim, op=torch.distributed.ReduceOp.MAX)
        if self.sum is None and dim.item() > 0:
            self._allocate(dim.item())
        assert self.dim in (None, dim.item())
        num = torch.tensor([self.num], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(num)
        self.num = int(num.item())
        if self.sum is not None:
            torch.distributed.all_reduce(self.sum)
            torch.distributed.all_reduce(self.sum_outer)
        if self.keep_rows is not None:
            self.features = [x for rank in dist.gather_objects(self.features) for x in rank]
            self.rows = [r for rank in dist.gather_objects(self.rows) for r in rank]
        return self

    def feature_array(self):
        """The kept features, float32 [N, D], in the order of their rows."""
        if not self.features:
            return np.zeros([0, self.dim or 0], dtype=np.float32)
        return torch.cat(self.features).numpy()[np.argsort(np.concatenate(self.rows), kind='stable')]

    def mean_cov(self):
        """Mean [D] and unbiased covariance [D, D] as float64 numpy arrays."""
        assert self.num >= 2
        mu = self.sum / self.num
        sigma = (self.sum_outer - self.num * torch.outer(mu, mu)) / (self.num - 1)
        sigma = (sigma + sigma.T) / 2
        return mu.cpu().numpy(), sigma.cpu().numpy()

def compute_feature_stats(
    images,                 # uint8 [N, C, H, W], or batches of them or of (images, labels).
    detector,               # A Detector, or a list of them.
    batch_size  = 64,       # For a tensor or array.
    all_reduce  = True,     # Sum over ranks (all must call)?
    progress    = False,
    total       = None,     # Number of batches, for the progress bar.
    keep_rows   = None,     # Keep the features of these dataset rows ...
    batch_rows  = None,     # ... given the rows of every batch.
):
    """FeatureStats of the images; a list for a list of detectors."""
    detectors = list(detector) if isinstance(detector, (list, tuple)) else [detector]
    stats = [FeatureStats(device=det.device, keep_rows=keep_rows) for det in detectors]
    if isinstance(images, (torch.Tensor, np.ndarray)):
        images = torch.as_tensor(images)
        images = [images[start : start + batch_size] for start in range(0, images.shape[0], batch_size)]
    rows = batch_rows if batch_rows is not None else itertools.repeat(None)
    for batch, rows_of_batch in zip(tqdm.tqdm(images, total=total, unit='batch', disable=(not progress)), rows):
        batch = torch.as_tensor(batch[0] if isinstance(batch, (tuple, list)) else batch)
        if batch.shape[0] > 0:
            for det, det_stats in zip(detectors, stats):
                det_stats.append(det(batch), rows_of_batch)
    for det_stats in stats if all_reduce else []:
        det_stats.all_reduce()
    return stats if isinstance(detector, (list, tuple)) else stats[0]

def open_image_dataset(path, num=None, seed=0, kind='images'):
    """An ImageFolderDataset of exactly `num` images (all if None; else a random subset by `seed`), headers checked."""
    images = dataset.ImageFolderDataset(path=path, kind=kind, max_size=num, random_seed=seed)
    images.check_headers()
    if num is not None and len(images) < num:
        raise ValueError(f'"{path}" holds {len(images)} images, fewer than the {num} asked for; '
            f'ask for at most {len(images)} or add images.')
    if len(images) < 2:
        raise ValueError(f'"{path}" holds {len(images)} image; feature statistics need at least 2.')
    return images

def compute_dataset_stats(
    images,                 # An ImageFolderDataset.
    detector,               # A Detector, or a list of them.
    batch_size  = 64,       # Per rank.
    num_workers = 2,        # Per rank.
    progress    = False,
    keep_num    = None,     # Also keep the features of this many images ...
    keep_seed   = 0,        # ... chosen with this seed, for any number of ranks.
):
    """FeatureStats of a dataset (a list for a list of detectors)."""
    indices = np.arange(dist.get_rank(), len(images), dist.get_world_size())
    batches = [indices[i : i + batch_size].tolist() for i in range(0, len(indices), batch_size)]
    loader = torch.utils.data.DataLoader(images, batch_sampler=batches, num_workers=num_workers)
    keep_rows = None if keep_num is None else subsample(np.arange(len(images)), keep_num, seed=keep_seed)
    return compute_feature_stats(loader, detector, progress=progress, total=len(batches),
        keep_rows=keep_rows, batch_rows=batches)

#----------------------------------------------------------------------------
# Reference statistics: EDM's .npz (mu, sigma, here also detector) or EDM2's pickle {'num_images': N, 'fid':
# {'mu', 'sigma'}, 'fd_dinov2': {...}} (here also detector and maybe features).

REF_PICKLE_GLOBALS = {('numpy', 'ndarray'), ('numpy', 'dtype')} | {(f'numpy.{core}.{module}', name)
    for core in ('core', '_core') for module, name in [('multiarray', '_reconstruct'), ('multiarray', 'scalar'),
    ('numeric', '_frombuffer')]}

class _RefUnpickler(pickle.Unpickler):
    """Unpickles dicts, numbers, strings and numpy arrays only."""

    def find_class(self, module, name):
        if (module, name) not in REF_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f'it refers to {module}.{name}, which statistics do not hold')
        return super().find_class(module, name)

def load_ref_stats(path_or_url, detector=INCEPTION_NAME, cache_dir=None, need_features=False):
    """EasyDict(mu, sigma, detector, path, features) from an .npz or EDM2 pickle; None where the file has none."""
    name = detector_name(detector)
    metric = METRIC_KEYS.get(name, 'fid')
    def error(what, fix='pass statistics written by fid.py ref or published with EDM or EDM2'):
        return ValueError(f'Reference statistics "{path_or_url}" {what}; {fix}.')
    try:
        f = dnnlib.util.open_url(path_or_url, cache_dir=cache_dir, verbose=(dist.get_rank() == 0))
    except (OSError, ValueError) as err:
        what = 'are a folder, not a file' if os.path.isdir(str(path_or_url)) else 'do not exist'
        raise error('could not be downloaded' if dnnlib.util.is_url(path_or_url) else what) from err
    with f:
        raw = f.read()
    features = None
    if raw[:2] == b'PK' or str(path_or_url).lower().endswith('.npz'): # A zip archive: .npz.
        try:
            if raw[:2] != b'PK':
                raise ValueError('not a zip archive of NumPy arrays')
            data = dict(np.load(io.BytesIO(raw), allow_pickle=False))
        except Exception as err: # pylint: disable=broad-except
            raise error(f'are not a readable .npz file ({err})') from err
        ref_detector = str(data['detector']) if 'detector' in data else None
    else:
        try:
            data = _RefUnpickler(io.BytesIO(raw)).load()
        except Exception as err: # pylint: disable=broad-except
            raise error(f'are neither an .npz file nor a pickle of statistics ({err})') from err
        if not isinstance(data, dict):
            raise error(f'hold a {type(data).__name__}, not a dict of statistics per metric')
        key = METRIC_KEYS.get(name, name)
        if key not in data and name not in METRIC_KEYS:
            key = 'fid'
        if not isinstance(data.get(key), dict):
            have = ', '.join(sorted(k for k, v in data.items() if isinstance(v, dict))) or 'none'
            raise error(f'hold no statistics of detector "{name}" (they have: {have})',
                f'compute them with fid.py ref for the metric {metric} or use a detector they have')
        data = data[key]
        ref_detector = str(data.get('detector', {v: k for k, v in METRIC_KEYS.items()}.get(key, key)))
        features = data.get('features')
    if 'mu' not in data or 'sigma' not in data:
        raise error(f'hold {sorted(data)} but no mu and sigma', 'compute them with fid.py ref')
    mu = np.asarray(data['mu'], dtype=np.float64)
    sigma = np.asarray(data['sigma'], dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise error(f'have mu of shape {list(mu.shape)} and sigma of shape {list(sigma.shape)}, not [D] and [D, D]',
            'compute them again with fid.py ref')
    if features is not None:
        features = np.asarray(features, dtype=np.float32)
    elif need_features:
        raise error(f'hold no features of detector "{name}", which precision and recall need',
            f'compute them with fid.py ref for the metrics {metric},{PR_NAME}')
    return dnnlib.EasyDict(mu=mu, sigma=sigma, detector=ref_detector, path=str(path_or_url), features=features)

def save_ref_stats(path, mu, sigma, detector):
    """Write mu, sigma and the detector name to an .npz, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    dnnlib.util.write_atomic(path, lambda f: np.savez(f, mu=np.asarray(mu, dtype=np.float64),
        sigma=np.asarray(sigma, dtype=np.float64), detector=np.array(str(detector))))

def subsample(features, num, seed=0):
    """At most `num` rows of features [N, ...], a seeded random choice, in their order."""
    if features.shape[0] <= num:
        return features
    return features[np.sort(np.random.RandomState(seed).choice(features.shape[0], size=num, replace=False))]

def save_ref_pickle(path, num_images, entries):
    """Write an EDM2-style pickle, atomically; `entries`: {detector name: dict(mu, sigma, [features])}."""
    data = dict(num_images=int(num_images))
    for name, entry in entries.items():
        key = METRIC_KEYS.get(name, name)
        data[key] = dict(mu=np.asarray(entry['mu'], dtype=np.float64),
            sigma=np.asarray(entry['sigma'], dtype=np.float64), detector=str(name))
        if entry.get('features') is not None:
            data[key]['features'] = np.asarray(entry['features'], dtype=np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    dnnlib.util.write_atomic(path, lambda f: pickle.dump(data, f))

def check_ref_stats(ref, detector_name, dim=None):
    """Refuse reference statistics of another detector kind or feature count."""
    fix = f'compute the reference with the same detector: "{detector_name}"'
    if ref.detector is not None and METRIC_KEYS.get(ref.detector, 'fid') != METRIC_KEYS.get(detector_name, 'fid'):
        raise ValueError(f'Reference statistics "{ref.path}" come from detector "{ref.detector}" but the images go '
            f'through "{detector_name}"; {fix}.')
    if dim is not None and ref.mu.shape[0] != dim:
        raise ValueError(f'Reference statistics "{ref.path}" have {ref.mu.shape[0]} features but detector '
            f'"{detector_name}" gives {dim}; {fix}.')

#----------------------------------------------------------------------------
# Fréchet distance, precision and recall, agreement.

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), float64, without sqrtm."""
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    assert mu1.ndim == 1 and mu1.shape == mu2.shape and sigma1.shape == sigma2.shape == mu1.shape * 2
    # tr((sigma1 sigma2)^(1/2)) from the eigenvalues of F^T sigma2 F, with sigma1 = F F^T by pivoted Cholesky.
    factor, piv, rank, _info = scipy.linalg.lapack.dpstrf((sigma1 + sigma1.T) / 2, lower=1) # P^T sigma1 P = L L^T.
    factor = np.tril(factor)[:, :rank]
    order = piv - 1
    m = factor.T @ sigma2[np.ix_(order, order)] @ factor
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    level = eig.max(initial=0) * max(eig.size, 1) * np.finfo(np.float64).eps # Rounding errors, not eigenvalues.
    trace_sqrt = np.sqrt(eig[eig > level]).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)

def precision_recall(
    real,                   # Reference features [N, D].
    fake,                   # Generated features [M, D].
    k           = 3,        # Neighbours that define a manifold.
    batch       = 1024,     # Rows per distance block.
    device      = 'cpu',
):
    """Precision (share of fake features within the k-NN balls of the real ones) and recall (the converse)."""
    real = torch.as_tensor(real).to(device, torch.float64)
    fake = torch.as_tensor(fake).to(device, torch.float64)
    for what, x in [('reference', real), ('generated', fake)]:
        if x.ndim != 2 or x.shape[0] <= k:
            raise ValueError(f'Precision and recall with k={k} need more than {k} {what} feature vectors, '
                f'not {list(x.shape)}; use more images.')
    assert real.shape[1] == fake.shape[1]
    def share_within(x, anchors):
        blocks = lambda y, fn: torch.cat([fn(y[i : i + batch]) for i in range(0, len(y), batch)])
        radii = blocks(anchors, lambda a: torch.cdist(a, anchors).kthvalue(k + 1, dim=1).values)
        return blocks(x, lambda a: (torch.cdist(a, anchors) <= radii).any(1)).double().mean().item()
    return dict(precision=share_within(fake, real), recall=share_within(real, fake))

def agreement(mse):
    """RMSE and PSNR (peak-to-peak 2) of images in [-1, 1] from their mean squared difference to the references."""
    return dict(agree_rmse=math.sqrt(mse), agree_psnr=(10 * math.log10(4 / mse) if mse > 0 else float('inf')))

#----------------------------------------------------------------------------

"""Feature detectors, feature statistics and the Fréchet distance: the parts
of FID shared by fid.py and the validation of the training loop; and the
agreement of images with reference images (validation and the demo).

A detector maps uint8 images [N, C, H, W] to features [N, D]. The default is
the Inception-v3 network that EDM uses (FID); `dinov2` is DINOv2 ViT-L/14 as
EDM2 uses it (FD-DINOv2); any pickled network called as
`net(images, return_features=True)` can replace Inception; `pixels` is a
weight-free detector for offline runs whose figure is called FD-pixels, never
FID. Statistics are float64 sums (count, sum x, sum x x^T), so that shards of
images on several ranks add up to exactly the statistics of all of them.
Reference statistics are EDM's .npz files (one detector) or EDM2's pickles
(a dict with an entry of mu and sigma per metric: `fid`, `fd_dinov2`).
Precision and recall follow Kynkäänniemi et al. (2019).
"""

import io
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

INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
INCEPTION_NAME = 'inception'        # --detector value of the default Inception-v3 network.
PIXELS_NAME = 'pixels'              # --detector value of the weight-free pixel detector.
DINOV2_URL = 'https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth'
DINOV2_NAME = 'dinov2'              # --detector value of DINOv2 ViT-L/14.
DINOV2_RESOLUTION = 224             # Images are resized to this before DINOv2, as in EDM2.
IMAGENET_MEAN = [0.485, 0.456, 0.406] # DINOv2's input normalization, per channel of pixels in [0, 1].
IMAGENET_STD = [0.229, 0.224, 0.225]
METRIC_KEYS = {INCEPTION_NAME: 'fid', DINOV2_NAME: 'fd_dinov2', PIXELS_NAME: 'fd_pixels'} # Detector -> its metric, EDM2's names.
LABELS = {'fid': 'FID', 'fd_dinov2': 'FD-DINOv2', 'fd_pixels': 'FD-pixels'} # Metric -> the name its figure is printed under.
FEATURE_LABELS = {'fid': 'Inception', 'fd_dinov2': 'DINOv2', 'fd_pixels': 'pixels'} # Metric -> the name of its features.
PR_NAME = 'pr'                      # --metrics name of precision and recall.
PR_K = 3                            # Neighbours that define the manifold of a set of features (Kynkäänniemi et al.).
PIXELS_MAX_DIM = 1024               # Most features the pixel detector gives per image.

#----------------------------------------------------------------------------
# Detectors.

class PixelDetector(torch.nn.Module):
    """Weight-free detector: the pixels scaled to [-1, 1], average-pooled by
    repeated halving of height and width until C*H*W <= max_dim, flattened.
    Grayscale images keep their single channel."""

    def __init__(self,
        max_dim = PIXELS_MAX_DIM,   # Most features per image.
    ):
        super().__init__()
        self.max_dim = int(max_dim)

    def pooled_size(self, channels, height, width):
        """(H, W) after pooling, for images of the given shape."""
        while channels * height * width > self.max_dim and (height > 1 or width > 1):
            height, width = (height + 1) // 2, (width + 1) // 2
        return height, width

    def forward(self, images, return_features=True):
        x = images.to(torch.float64) / 127.5 - 1
        size = self.pooled_size(*x.shape[1:])
        if size != tuple(x.shape[2:]):
            x = torch.nn.functional.adaptive_avg_pool2d(x, size)
        return x.flatten(1)

class DINOv2Detector(torch.nn.Module):
    """DINOv2 as EDM2 uses it: uint8 images resized to 224x224 (bicubic, antialiased),
    scaled to [0, 1], normalized with ImageNet's mean and std; the features are
    the network's output, the normalized class token ([N, 1024] for ViT-L/14)."""

    def __init__(self,
        vit,                                # The network, called on normalized images [N, 3, 224, 224].
        resolution  = DINOV2_RESOLUTION,    # Side of the square its images are resized to.
    ):
        super().__init__()
        self.vit = vit
        self.resolution = int(resolution)

    def preprocess(self, images):
        """float32 network input of uint8 images [N, 3, H, W]."""
        x = torch.nn.functional.interpolate(images.to(torch.float32), size=(self.resolution, self.resolution), mode='bicubic', antialias=True)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).reshape(1, -1, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).reshape(1, -1, 1, 1)
        return (x / 255 - mean) / std

    def forward(self, images, return_features=True):
        return self.vit(self.preprocess(images))

class Detector:
    """A feature network with its name and the label of its Fréchet distance."""

    def __init__(self,
        name,       # 'inception', 'pixels', or the path/URL of a pickled network.
        net,        # Callable as net(uint8 images [N, C, H, W], return_features=True).
        device,     # Device that the images are moved to.
    ):
        self.name = name
        self.net = net
        self.device = torch.device(device)

    @property
    def is_pixels(self):
        return self.name == PIXELS_NAME

    @property
    def key(self):
        """Its metric, EDM2's name: 'fid' (Inception, also any pickled network), 'fd_dinov2' or 'fd_pixels'."""
        return METRIC_KEYS.get(self.name, 'fid')

    @property
    def label(self):
        """'FID', 'FD-DINOv2' or 'FD-pixels'."""
        return LABELS[self.key]

    @property
    def feature_label(self):
        """Name of its features, for precision and recall: 'Inception', 'DINOv2' or 'pixels'."""
        return FEATURE_LABELS[self.key]

    def feature_dim(self, image_shape):
        """Number of features for images of shape [C, H, W]; a ValueError if the network cannot take them."""
        try:
            return self(torch.zeros([1, *image_shape], dtype=torch.uint8)).shape[1]
        except RuntimeError as err:
            raise ValueError(f'Detector "{self.name}" fails on uint8 images of shape {list(image_shape)} ({err}); pass a detector made for such images.') from err

    def __call__(self, images):
        """Features [N, D] in float64, on the detector's device, of uint8 images [N, C, H, W]."""
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f'Detector "{self.name}" takes uint8 images [N, C, H, W], not {images.dtype} of shape {list(images.shape)}; convert them with (x * 127.5 + 128).clip(0, 255).to(torch.uint8).')
        images = images.to(self.device)
        if images.shape[1] == 1 and not self.is_pixels:
            images = images.repeat([1, 3, 1, 1])
        with torch.no_grad():
            features = self.net(images, return_features=True)
        if not isinstance(features, torch.Tensor) or features.ndim != 2 or features.shape[0] != images.shape[0]:
            shape = list(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f'Detector "{self.name}" returned {shape} for {images.shape[0]} images instead of features [N, D]; pass a network whose forward(images, return_features=True) returns a 2-D tensor.')
        return features.to(torch.float64)

def detector_name(detector):
    """'inception' or 'dinov2' for those detectors (also given by their URLs), else the name as given."""
    return {INCEPTION_URL: INCEPTION_NAME, DINOV2_URL: DINOV2_NAME}.get(detector, str(detector))

_detector_cache = dict() # (name, device, cache_dir) -> Detector

def load_detector(
    detector    = INCEPTION_NAME,   # 'inception', 'pixels', or the path/URL of a pickled network.
    device      = 'cpu',            # Device to run the detector on.
    cache_dir   = None,             # Download cache, None = dnnlib's default.
    num_attempts= 10,               # Download attempts before giving up.
    verbose     = True,             # Report downloads on rank 0?
    option      = '--detector',     # The option that named the detector, for the messages.
):
    """Load a detector once per process; rank 0 downloads first, the others then read the cache."""
    name = detector_name(detector)
    key = (name, str(torch.device(device)), cache_dir)
    if key in _detector_cache:
        return _detector_cache[key]
    if name == PIXELS_NAME:
        result = Detector(name, PixelDetector().to(device), device)
    elif name == DINOV2_NAME:
        with dist.rank0_first():
            vit = _load_dinov2(cache_dir=cache_dir, num_attempts=num_attempts, verbose=(verbose and dist.get_rank() == 0), option=option)
        result = Detector(name, DINOv2Detector(vit).to(device), device)
    else:
        with dist.rank0_first():
            net = _load_network(name, cache_dir=cache_dir, num_attempts=num_attempts, verbose=(verbose and dist.get_rank() == 0), option=option)
        if isinstance(net, torch.nn.Module):
            net.eval().requires_grad_(False)
        if hasattr(net, 'to'):
            net = net.to(device)
        result = Detector(name, net, device)
    _detector_cache[key] = result
    return result

def _load_dinov2(cache_dir, num_attempts, verbose, option):
    try:
        f = dnnlib.util.open_url(DINOV2_URL, cache_dir=cache_dir, num_attempts=num_attempts, verbose=verbose)
    except OSError as err:
        raise ValueError(f'The DINOv2 detector could not be downloaded from {DINOV2_URL}; run once where it is reachable and copy the download cache "{cache_dir or dnnlib.make_cache_dir_path("downloads")}", or use {option}={INCEPTION_NAME}.') from err
    try:
        with f:
            state = torch.load(io.BytesIO(f.read()), map_location='cpu', weights_only=True)
    except Exception as err: # pylint: disable=broad-except
        raise ValueError(f'The DINOv2 weights from {DINOV2_URL} could not be read ({type(err).__name__}: {err}); delete the cached copy and download them again.') from err
    return dinov2.from_state_dict(state, name=f'The file of {DINOV2_URL}')

def _load_network(name, cache_dir, num_attempts, verbose, option):
    url = INCEPTION_URL if name == INCEPTION_NAME else name
    offline = f'download it by other means and pass the local file with {option}=PATH, or use {option}={PIXELS_NAME} for the weight-free FD-pixels'
    try:
        f = dnnlib.util.open_url(url, cache_dir=cache_dir, num_attempts=num_attempts, verbose=verbose)
    except OSError as err:
        what = 'The Inception-v3 detector' if name == INCEPTION_NAME else f'Detector "{name}"'
        raise ValueError(f'{what} could not be downloaded from {url}; {offline}.') from err
    except ValueError as err:
        if dnnlib.util.is_url(url, allow_file_urls=True):
            raise # A refused plain-http URL or a cached download that fails its checksum: the sentence says what to do.
        raise ValueError(f'Detector "{name}" is neither an existing file nor an http(s):// URL; pass the path of a pickled network, "{INCEPTION_NAME}" or "{PIXELS_NAME}".') from err
    try:
        with f:
            net = pickle.load(f)
    except Exception as err: # pylint: disable=broad-except
        raise ValueError(f'Detector "{name}" could not be unpickled ({type(err).__name__}: {err}); pass a pickled network called as net(images, return_features=True), "{INCEPTION_NAME}" or "{PIXELS_NAME}".') from err
    if not callable(net):
        raise ValueError(f'Detector "{name}" holds a {type(net).__name__}, not a network; pass a pickled network called as net(images, return_features=True).')
    return net

#----------------------------------------------------------------------------
# Feature statistics.

class FeatureStats:
    """Count, sum and sum of outer products of features, in float64; with keep_rows,
    also the features of those rows (float32, for precision and recall)."""

    def __init__(self, device='cpu', keep_rows=None):
        self.device = torch.device(device)
        self.num = 0            # Number of feature vectors.
        self.sum = None         # Sum of x, [D].
        self.sum_outer = None   # Sum of x x^T, [D, D].
        self.keep_rows = None if keep_rows is None else np.asarray(keep_rows) # Dataset rows whose features are kept, None = none.
        self.features = []      # Kept features: float32 CPU tensors [n, D] ...
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
        if x.ndim != 2:
            raise ValueError(f'Features must be [N, D], not of shape {list(x.shape)}.')
        if self.sum is None:
            self._allocate(x.shape[1])
        if x.shape[1] != self.dim:
            raise ValueError(f'Features have {x.shape[1]} dimensions but earlier ones had {self.dim}; use one detector for all images.')
        self.num += x.shape[0]
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x
        if self.keep_rows is not None:
            kept = np.isin(np.asarray(rows), self.keep_rows)
            self.features.append(x[torch.as_tensor(kept, device=x.device)].to(torch.float32).cpu())
            self.rows.append(np.asarray(rows)[kept])

    def all_reduce(self):
        """Sum the statistics of all ranks, in place (no-op in a single process)."""
        if not dist.is_distributed():
            return self
        dim = torch.tensor([self.dim or 0], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(dim, op=torch.distributed.ReduceOp.MAX)
        if self.sum is None and dim.item() > 0:
            self._allocate(dim.item())
        if self.dim is not None and self.dim != dim.item():
            raise ValueError(f'Features have {self.dim} dimensions on rank {dist.get_rank()} but {dim.item()} on another rank; use one detector on all ranks.')
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
        """The kept features [N, D] as a float32 numpy array, in the order of their rows."""
        if not self.features:
            return np.zeros([0, self.dim or 0], dtype=np.float32)
        return torch.cat(self.features).numpy()[np.argsort(np.concatenate(self.rows), kind='stable')]

    def mean_cov(self):
        """Mean [D] and unbiased covariance [D, D] as float64 numpy arrays."""
        if self.num < 2:
            raise ValueError(f'Feature statistics need at least 2 images, not {self.num}; use more images.')
        mu = self.sum / self.num
        sigma = (self.sum_outer - self.num * torch.outer(mu, mu)) / (self.num - 1)
        sigma = (sigma + sigma.T) / 2
        return mu.cpu().numpy(), sigma.cpu().numpy()

def _as_uint8_batches(images, batch_size):
    if isinstance(images, (torch.Tensor, np.ndarray)):
        images = torch.as_tensor(images)
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    for batch in images:
        if isinstance(batch, (tuple, list)): # (images, labels) from a data loader.
            batch = batch[0]
        yield torch.as_tensor(batch)

def compute_feature_stats(
    images,                 # uint8 tensor/array [N, C, H, W], or an iterable of such batches (or of (images, labels)).
    detector,               # A Detector from load_detector(), or a list of them.
    batch_size  = 64,       # Images per detector call, for a tensor or array.
    all_reduce  = True,     # Sum over ranks? Every rank must then call this.
    progress    = False,    # Show a progress bar?
    total       = None,     # Number of batches, for the progress bar.
    keep_rows   = None,     # Keep the features of these dataset rows too (precision and recall), None = none ...
    batch_rows  = None,     # ... given the dataset rows of every batch.
):
    """FeatureStats of in-memory images; with all_reduce, of the images of all ranks together.
    For a list of detectors, a list of FeatureStats from one pass over the images."""
    detectors = list(detector) if isinstance(detector, (list, tuple)) else [detector]
    stats = [FeatureStats(device=det.device, keep_rows=keep_rows) for det in detectors]
    batches = _as_uint8_batches(images, batch_size)
    rows = iter(batch_rows) if batch_rows is not None else None
    for batch in tqdm.tqdm(batches, total=total, unit='batch', disable=(not progress)):
        rows_of_batch = next(rows) if rows is not None else None
        if batch.shape[0] > 0:
            for det, det_stats in zip(detectors, stats):
                det_stats.append(det(batch), rows_of_batch)
    if all_reduce:
        for det_stats in stats:
            det_stats.all_reduce()
    return stats if isinstance(detector, (list, tuple)) else stats[0]

def open_image_dataset(
    path,                   # Folder or zip of images.
    num         = None,     # Use this many images, None = all.
    seed        = 0,        # Seed of the random subset when there are more than num.
    kind        = 'images', # The files read (ImageFolderDataset): images only, as generate.py --save_latents writes latents beside them.
):
    """An ImageFolderDataset of exactly `num` images (all if None), EDM's rule for FID; every
    image's header is checked first, so that a broken file stops the run before any work."""
    images = dataset.ImageFolderDataset(path=path, kind=kind, max_size=num, random_seed=seed)
    images.check_headers()
    if num is not None and len(images) < num:
        raise ValueError(f'"{path}" holds {len(images)} images, fewer than the {num} asked for; ask for at most {len(images)} or add images.')
    if len(images) < 2:
        raise ValueError(f'"{path}" holds {len(images)} image; feature statistics need at least 2.')
    return images

def compute_dataset_stats(
    images,                 # An ImageFolderDataset, e.g. from open_image_dataset().
    detector,               # A Detector from load_detector(), or a list of them.
    batch_size  = 64,       # Images per detector call on each rank.
    num_workers = 2,        # Data loader processes per rank.
    progress    = False,    # Show a progress bar?
    keep_num    = None,     # Also keep the features of this many images (precision and recall), None = none ...
    keep_seed   = 0,        # ... a choice seeded with this, the same for any number of ranks.
):
    """FeatureStats of a dataset (a list of them for a list of detectors), each rank reading every world_size-th image."""
    indices = np.arange(dist.get_rank(), len(images), dist.get_world_size())
    batches = [indices[i : i + batch_size].tolist() for i in range(0, len(indices), batch_size)]
    loader = torch.utils.data.DataLoader(images, batch_sampler=batches, num_workers=num_workers)
    keep_rows = None if keep_num is None else subsample(np.arange(len(images)), keep_num, seed=keep_seed)
    return compute_feature_stats(loader, detector, all_reduce=True, progress=progress, total=len(batches), keep_rows=keep_rows, batch_rows=batches)

#----------------------------------------------------------------------------
# Reference statistics: EDM's .npz (mu, sigma and here the detector's name) or
# EDM2's pickle {'num_images': N, 'fid': {'mu', 'sigma'}, 'fd_dinov2': {...}},
# whose entries written here also name their detector and may hold features.

REF_PICKLE_GLOBALS = {(module, name) for module in ('numpy.core.multiarray', 'numpy._core.multiarray') for name in ('_reconstruct', 'scalar')} | \
    {(module, '_frombuffer') for module in ('numpy.core.numeric', 'numpy._core.numeric')} | {('numpy', 'ndarray'), ('numpy', 'dtype')}

class _RefUnpickler(pickle.Unpickler):
    """Unpickles dicts, numbers, strings and numpy arrays, nothing that runs code."""

    def find_class(self, module, name):
        if (module, name) not in REF_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f'it refers to {module}.{name}, which statistics do not hold')
        return super().find_class(module, name)

def metric_key(detector_name):
    """The entry of a detector in an EDM2-style pickle: 'fid', 'fd_dinov2', 'fd_pixels', or a pickled network's own name."""
    return METRIC_KEYS.get(detector_name, detector_name)

def _ref_entry(path, data, name):
    """The (detector, entry) of detector `name` in the dict of a reference pickle."""
    if not isinstance(data, dict):
        raise ValueError(f'Reference statistics "{path}" hold a {type(data).__name__}, not a dict of statistics per metric; pass a pickle written by "fid.py ref" or published with EDM2.')
    key = metric_key(name)
    if key not in data and name not in METRIC_KEYS:
        key = 'fid' # A pickled network stands in for Inception-v3.
    if not isinstance(data.get(key), dict):
        have = ', '.join(sorted(k for k, v in data.items() if isinstance(v, dict))) or 'none'
        raise ValueError(f'Reference statistics "{path}" hold no statistics of detector "{name}" (they have: {have}); '
            f'compute them with "python fid.py ref --data=DATASET --dest=REF.pkl --metrics={METRIC_KEYS.get(name, "fid")}" or use a detector they have.')
    entry = data[key]
    default = {v: k for k, v in METRIC_KEYS.items()}.get(key, key)
    return str(entry.get('detector', default)), entry

def load_ref_stats(path_or_url, detector=INCEPTION_NAME, cache_dir=None, need_features=False):
    """Reference statistics of `detector` as an EasyDict(mu, sigma, detector, path, features): from an .npz
    file (detector None in files without it, e.g. EDM's) or an EDM2-style pickle (features None unless stored)."""
    name = detector_name(detector)
    fix = 'pass an .npz or .pkl file written by "fid.py ref" or published with EDM or EDM2'
    try:
        f = dnnlib.util.open_url(path_or_url, cache_dir=cache_dir, verbose=(dist.get_rank() == 0))
    except (OSError, ValueError) as err:
        what = 'could not be downloaded' if dnnlib.util.is_url(path_or_url) else 'do not exist'
        raise ValueError(f'Reference statistics "{path_or_url}" {what}; {fix}.') from err
    with f:
        raw = f.read()
    features = None
    if raw[:2] == b'PK' or str(path_or_url).lower().endswith('.npz'): # A zip archive: .npz.
        try:
            npz = np.load(io.BytesIO(raw), allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError('a single array, not an .npz archive')
            data = dict(npz)
        except Exception as err: # pylint: disable=broad-except
            raise ValueError(f'Reference statistics "{path_or_url}" are not a readable .npz file ({err}); {fix}.') from err
        ref_detector = str(data['detector']) if 'detector' in data else None
    else:
        try:
            data = _RefUnpickler(io.BytesIO(raw)).load()
        except Exception as err: # pylint: disable=broad-except
            raise ValueError(f'Reference statistics "{path_or_url}" are neither an .npz file nor a pickle of statistics ({err}); {fix}.') from err
        ref_detector, data = _ref_entry(path_or_url, data, name)
        features = data.get('features')
    if 'mu' not in data or 'sigma' not in data:
        raise ValueError(f'Reference statistics "{path_or_url}" hold {sorted(data)} but no mu and sigma; compute them with "python fid.py ref --data=DATASET --dest=REF.npz".')
    mu = np.asarray(data['mu'], dtype=np.float64)
    sigma = np.asarray(data['sigma'], dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f'Reference statistics "{path_or_url}" have mu of shape {list(mu.shape)} and sigma of shape {list(sigma.shape)} instead of [D] and [D, D]; compute them again with "python fid.py ref".')
    if features is not None:
        features = np.asarray(features, dtype=np.float32)
    elif need_features:
        raise ValueError(f'Reference statistics "{path_or_url}" hold no features of detector "{name}", which precision and recall need; '
            f'compute them with "python fid.py ref --data=DATASET --dest=REF.pkl --metrics={METRIC_KEYS.get(name, "fid")},{PR_NAME}".')
    return dnnlib.EasyDict(mu=mu, sigma=sigma, detector=ref_detector, path=str(path_or_url), features=features)

def save_ref_stats(path, mu, sigma, detector):
    """Write mu, sigma and the detector name to an .npz file, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    dnnlib.util.write_atomic(path, lambda f: np.savez(f, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64),
        detector=np.array(str(detector))))

def ref_format(path, detectors, with_pr):
    """'pkl' for a path ending in .pkl, else 'npz', which holds the statistics of one detector and no features."""
    if str(path).lower().endswith('.pkl'):
        return 'pkl'
    if len(detectors) > 1 or with_pr:
        raise ValueError(f'--dest={path} would be an .npz file, which holds the mean and covariance of one detector only; pass a path ending in .pkl for several detectors or for precision and recall.')
    return 'npz'

def subsample(features, num, seed=0):
    """At most `num` rows of features [N, ...], a seeded random choice, in their order."""
    if features.shape[0] <= num:
        return features
    return features[np.sort(np.random.RandomState(seed).choice(features.shape[0], size=num, replace=False))]

def save_ref_pickle(path, num_images, entries):
    """Write an EDM2-style pickle, atomically: `entries` maps detector names to dict(mu, sigma) and optionally features."""
    data = dict(num_images=int(num_images))
    for name, entry in entries.items():
        data[metric_key(name)] = dict(mu=np.asarray(entry['mu'], dtype=np.float64), sigma=np.asarray(entry['sigma'], dtype=np.float64), detector=str(name),
            **({} if entry.get('features') is None else dict(features=np.asarray(entry['features'], dtype=np.float32))))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    dnnlib.util.write_atomic(path, lambda f: pickle.dump(data, f))

def check_ref_stats(ref, detector_name, dim=None):
    """Refuse reference statistics that come from another kind of detector or have another number of features than `dim`."""
    fix = f'compute the reference with the same detector: "python fid.py ref --data=DATASET --dest=REF.npz --detector={detector_name}"'
    if ref.detector is not None and METRIC_KEYS.get(ref.detector, 'fid') != METRIC_KEYS.get(detector_name, 'fid'):
        raise ValueError(f'Reference statistics "{ref.path}" come from detector "{ref.detector}" but the images go through "{detector_name}"; {fix}.')
    if dim is not None and ref.mu.shape[0] != dim:
        raise ValueError(f'Reference statistics "{ref.path}" have {ref.mu.shape[0]} features but detector "{detector_name}" gives {dim}; {fix}.')

#----------------------------------------------------------------------------
# Fréchet distance.

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Fréchet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2).

    |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), in
    float64. A pivoted Cholesky factorization sigma1 = F F^T (F of the rank of
    sigma1) makes sigma1 sigma2 similar, up to zeros, to the symmetric positive
    semi-definite F^T sigma2 F, so the trace of the square root is the sum of
    the square roots of the eigenvalues of that matrix: one symmetric
    eigendecomposition replaces the general matrix square root (scipy.linalg.sqrtm)
    and gives the same value several times faster. Eigenvalues at the level of
    rounding errors count as zeros, whose square roots would magnify them.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or mu1.ndim != 1 or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f'Statistics of shapes mu {list(mu1.shape)}, sigma {list(sigma1.shape)} and mu {list(mu2.shape)}, sigma {list(sigma2.shape)} do not match; compute both with the same detector.')
    factor, piv, rank, _info = scipy.linalg.lapack.dpstrf((sigma1 + sigma1.T) / 2, lower=1) # P^T sigma1 P = L L^T.
    factor = np.tril(factor)[:, :rank]
    order = piv - 1
    m = factor.T @ sigma2[np.ix_(order, order)] @ factor
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    level = eig.max(initial=0) * max(eig.size, 1) * np.finfo(np.float64).eps
    trace_sqrt = np.sqrt(eig[eig > level]).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)

#

#----------------------------------------------------------------------------
# Precision and recall (Kynkäänniemi et al. 2019).

def _kth_neighbour_distances(x, k, batch):
    """Distance of every row of x to its k-th nearest other row."""
    return torch.cat([torch.cdist(x[i : i + batch], x).kthvalue(k + 1, dim=1).values for i in range(0, x.shape[0], batch)])

def _in_manifold(points, anchors, radii, batch):
    """Which points lie within the radius of at least one anchor."""
    return torch.cat([(torch.cdist(points[i : i + batch], anchors) <= radii).any(dim=1) for i in range(0, points.shape[0], batch)])

def precision_recall(
    real,                   # Features of the reference images [N, D].
    fake,                   # Features of the generated images [M, D].
    k           = PR_K,     # Neighbours that define each set's manifold.
    batch       = 1024,     # Rows per distance block.
    device      = 'cpu',    # Device of the distance computations.
):
    """Precision (the share of fake features inside the k-NN manifold of the real
    ones: the union of balls around each real feature reaching its k-th nearest
    real neighbour) and recall (the share of real features inside the fake
    manifold), in float64."""
    real = torch.as_tensor(real).to(device, torch.float64)
    fake = torch.as_tensor(fake).to(device, torch.float64)
    for what, x in [('reference', real), ('generated', fake)]:
        if x.ndim != 2 or x.shape[0] <= k:
            raise ValueError(f'Precision and recall with k={k} need more than {k} {what} feature vectors, not {list(x.shape)}; use more images.')
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f'Reference features have {real.shape[1]} dimensions but generated ones {fake.shape[1]}; compute both with the same detector.')
    precision = _in_manifold(fake, real, _kth_neighbour_distances(real, k, batch), batch).double().mean().item()
    recall = _in_manifold(real, fake, _kth_neighbour_distances(fake, k, batch), batch).double().mean().item()
    return dict(precision=precision, recall=recall)

#----------------------------------------------------------------------------
# The metrics of fid.py calc --metrics.

def parse_metrics(
    names,                          # Comma-separated metric names, or None for the Fréchet distance of `detector` alone.
    detector    = INCEPTION_NAME,   # The detector of 'fid' when it is a pickled network, or of the figure without --metrics.
):
    """(detector names, with_pr): the detectors whose features one pass computes, and whether precision and recall are asked for."""
    detector = detector_name(detector)
    if names is None:
        return [detector], False
    known = [*LABELS, PR_NAME]
    wanted = [name.strip() for name in str(names).split(',') if name.strip()]
    for name in wanted:
        if name not in known:
            raise ValueError(f'--metrics={names} names the unknown metric "{name}"; choose from {", ".join(known)}.')
    if not wanted:
        raise ValueError(f'--metrics="{names}" names no metric; choose from {", ".join(known)}.')
    fid_detector = INCEPTION_NAME if detector in METRIC_KEYS else detector
    by_metric = {**{v: k for k, v in METRIC_KEYS.items()}, 'fid': fid_detector}
    detectors = list(dict.fromkeys(by_metric[name] for name in wanted if name != PR_NAME)) or [detector]
    return detectors, PR_NAME in wanted

#----------------------------------------------------------------------------
# Agreement with reference images.

def agreement(mse):
    """Agreement figures of images in [-1, 1] whose mean squared difference to
    their references is `mse`: `agree_rmse` = sqrt(mse) and `agree_psnr` =
    10 log10(2^2 / mse) dB, with the peak-to-peak range 2 of [-1, 1]."""
    return dict(agree_rmse=math.sqrt(mse), agree_psnr=(10 * math.log10(4 / mse) if mse > 0 else float('inf')))

#----------------------------------------------------------------------------

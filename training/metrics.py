"""Feature detectors, feature statistics and the Fréchet distance: the parts
of FID shared by fid.py and the validation of the training loop; and the
agreement of images with reference images (validation and the demo).

A detector maps uint8 images [N, C, H, W] to features [N, D]. The default is
the Inception-v3 network that EDM uses (FID); any pickled network called as
`net(images, return_features=True)` can replace it; `pixels` is a weight-free
detector for offline runs whose figure is called FD-pixels, never FID.
Statistics are float64 sums (count, sum x, sum x x^T), so that shards of
images on several ranks add up to exactly the statistics of all of them.
"""

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

INCEPTION_URL = 'https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl'
INCEPTION_NAME = 'inception'        # --detector value of the default Inception-v3 network.
PIXELS_NAME = 'pixels'              # --detector value of the weight-free pixel detector.
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
    def label(self):
        """'FD-pixels' for the pixel detector, 'FID' for networks."""
        return 'FD-pixels' if self.is_pixels else 'FID'

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
    """'inception' for the default detector (also given by its URL), else the name as given."""
    return INCEPTION_NAME if detector in (INCEPTION_NAME, INCEPTION_URL) else str(detector)

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
    """Count, sum and sum of outer products of features, in float64."""

    def __init__(self, device='cpu'):
        self.device = torch.device(device)
        self.num = 0            # Number of feature vectors.
        self.sum = None         # Sum of x, [D].
        self.sum_outer = None   # Sum of x x^T, [D, D].

    @property
    def dim(self):
        return None if self.sum is None else self.sum.shape[0]

    def _allocate(self, dim):
        self.sum = torch.zeros([dim], dtype=torch.float64, device=self.device)
        self.sum_outer = torch.zeros([dim, dim], dtype=torch.float64, device=self.device)

    def append(self, features):
        """Add features [N, D]."""
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
        return self

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
    detector,               # A Detector from load_detector().
    batch_size  = 64,       # Images per detector call, for a tensor or array.
    all_reduce  = True,     # Sum over ranks? Every rank must then call this.
    progress    = False,    # Show a progress bar?
    total       = None,     # Number of batches, for the progress bar.
):
    """FeatureStats of in-memory images; with all_reduce, of the images of all ranks together."""
    stats = FeatureStats(device=detector.device)
    batches = _as_uint8_batches(images, batch_size)
    for batch in tqdm.tqdm(batches, total=total, unit='batch', disable=(not progress)):
        if batch.shape[0] > 0:
            stats.append(detector(batch))
    if all_reduce:
        stats.all_reduce()
    return stats

def open_image_dataset(
    path,                   # Folder or zip of images.
    num         = None,     # Use this many images, None = all.
    seed        = 0,        # Seed of the random subset when there are more than num.
):
    """An ImageFolderDataset of exactly `num` images (all if None), EDM's rule for FID; every
    image's header is checked first, so that a broken file stops the run before any work."""
    images = dataset.ImageFolderDataset(path=path, max_size=num, random_seed=seed)
    images.check_headers()
    if num is not None and len(images) < num:
        raise ValueError(f'"{path}" holds {len(images)} images, fewer than the {num} asked for; ask for at most {len(images)} or add images.')
    if len(images) < 2:
        raise ValueError(f'"{path}" holds {len(images)} image; feature statistics need at least 2.')
    return images

def compute_dataset_stats(
    images,                 # An ImageFolderDataset, e.g. from open_image_dataset().
    detector,               # A Detector from load_detector().
    batch_size  = 64,       # Images per detector call on each rank.
    num_workers = 2,        # Data loader processes per rank.
    progress    = False,    # Show a progress bar?
):
    """FeatureStats of a dataset, each rank reading every world_size-th image."""
    indices = np.arange(dist.get_rank(), len(images), dist.get_world_size())
    batches = [indices[i : i + batch_size].tolist() for i in range(0, len(indices), batch_size)]
    loader = torch.utils.data.DataLoader(images, batch_sampler=batches, num_workers=num_workers)
    return compute_feature_stats(loader, detector, all_reduce=True, progress=progress, total=len(batches))

#----------------------------------------------------------------------------
# Reference statistics (.npz with mu and sigma, the format EDM publishes).

def load_ref_stats(path_or_url, cache_dir=None):
    """Reference statistics as an EasyDict(mu, sigma, detector); detector is None in files without it (e.g. EDM's)."""
    fix = 'pass an .npz file written by "fid.py ref" or published with EDM'
    try:
        f = dnnlib.util.open_url(path_or_url, cache_dir=cache_dir, verbose=(dist.get_rank() == 0))
    except (OSError, ValueError) as err:
        what = 'could not be downloaded' if dnnlib.util.is_url(path_or_url) else 'do not exist'
        raise ValueError(f'Reference statistics "{path_or_url}" {what}; {fix}.') from err
    try:
        with f:
            npz = np.load(f, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise ValueError('a single array, not an .npz archive')
            data = dict(npz)
    except Exception as err: # pylint: disable=broad-except
        raise ValueError(f'Reference statistics "{path_or_url}" are not a readable .npz file ({err}); {fix}.') from err
    if 'mu' not in data or 'sigma' not in data:
        raise ValueError(f'Reference statistics "{path_or_url}" hold {sorted(data)} but no mu and sigma; compute them with "python fid.py ref --data=DATASET --dest=REF.npz".')
    mu = np.asarray(data['mu'], dtype=np.float64)
    sigma = np.asarray(data['sigma'], dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f'Reference statistics "{path_or_url}" have mu of shape {list(mu.shape)} and sigma of shape {list(sigma.shape)} instead of [D] and [D, D]; compute them again with "python fid.py ref".')
    detector = str(data['detector']) if 'detector' in data else None
    return dnnlib.EasyDict(mu=mu, sigma=sigma, detector=detector, path=str(path_or_url))

def save_ref_stats(path, mu, sigma, detector):
    """Write mu, sigma and the detector name to an .npz file, atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    dnnlib.util.write_atomic(path, lambda f: np.savez(f, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64),
        detector=np.array(str(detector))))

def check_ref_stats(ref, detector_name, dim=None):
    """Refuse reference statistics that come from another kind of detector or have another number of features than `dim`."""
    fix = f'compute the reference with the same detector: "python fid.py ref --data=DATASET --dest=REF.npz --detector={detector_name}"'
    if ref.detector is not None and (ref.detector == PIXELS_NAME) != (detector_name == PIXELS_NAME):
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
# Agreement with reference images.

def agreement(mse):
    """Agreement figures of images in [-1, 1] whose mean squared difference to
    their references is `mse`: `agree_rmse` = sqrt(mse) and `agree_psnr` =
    10 log10(2^2 / mse) dB, with the peak-to-peak range 2 of [-1, 1]."""
    return dict(agree_rmse=math.sqrt(mse), agree_psnr=(10 * math.log10(4 / mse) if mse > 0 else float('inf')))

#----------------------------------------------------------------------------

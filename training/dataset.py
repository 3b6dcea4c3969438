"""Datasets of images with optional labels in the EDM format, or of EDM2's latents (a float32 .npy per image)."""

import io
import json
import os
import types
import zipfile

import numpy as np
import PIL.Image
import torch

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
LATENT_EXTENSION = '.npy'
GRAY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')                     # PIL modes read as one channel.
READ_ERRORS = (OSError, SyntaxError, ValueError, zipfile.BadZipFile) # What reading a broken file raises.
REBUILD = 'rebuild the dataset with dataset_tool.py'
REPLACE = 'replace it or ' + REBUILD
RESIZE = 'resize all images to one size with dataset_tool.py'

def list_files(path):
    """The '/'-separated paths of all files under a folder, relative to it."""
    files = [os.path.join(root, f) for root, _dirs, names in os.walk(path) for f in names]
    return [os.path.relpath(f, path).replace(os.sep, '/') for f in files]

#----------------------------------------------------------------------------
# Base class: index bookkeeping, x-flips, labels, caching; subclasses load raw images and labels.

class Dataset(torch.utils.data.Dataset):
    def __init__(self,
        name,                   # Name of the dataset.
        raw_shape,              # Shape of all raw images: [N, C, H, W].
        max_size    = None,     # Keep at most this many images, None = all.
        use_labels  = False,    # Return one-hot class labels?
        xflip       = False,    # Append x-flipped copies?
        random_seed = 0,        # Seed that picks the images under max_size.
        cache       = False,    # Keep decoded images in memory?
    ):
        self._name = name
        self._raw_shape = [int(x) for x in raw_shape]
        self._cache = dict() if cache else None
        num_raw = self._raw_shape[0]
        self._raw_idx = np.arange(num_raw, dtype=np.int64)
        assert max_size is None or int(max_size) >= 1
        if max_size is not None and int(max_size) < num_raw:
            rng = np.random.RandomState(random_seed)
            self._raw_idx = np.sort(rng.choice(num_raw, size=int(max_size), replace=False))
        self._xflip = np.zeros(self._raw_idx.size, dtype=np.uint8)
        if xflip:
            self._raw_idx = np.concatenate([self._raw_idx, self._raw_idx])
            self._xflip = np.concatenate([self._xflip, np.ones_like(self._xflip)])
        self._onehot = None
        if use_labels:
            raw = self._load_raw_labels()
            if raw is None:
                raise ValueError(f'Dataset {name!r} has no labels; pass use_labels=False or {REBUILD} with labels.')
            self._onehot = self._labels_to_onehot(raw)

    def _labels_to_onehot(self, raw):
        raw, num = np.asarray(raw), self._raw_shape[0]
        if raw.shape[:1] != (num,) or raw.ndim not in (1, 2):
            raise ValueError(f'Dataset {self._name!r} has labels of shape {raw.shape} for {num} images; {REBUILD}.')
        if raw.ndim == 2:
            return raw.astype(np.float32)
        if raw.dtype.kind not in 'iu' or raw.min() < 0:
            raise ValueError(f'Dataset {self._name!r} has class labels that are not non-negative integers; {REBUILD}.')
        onehot = np.zeros([raw.size, int(raw.max()) + 1], dtype=np.float32)
        onehot[np.arange(raw.size), raw] = 1
        return onehot

    def _load_raw_image(self, raw_idx): # Array [C, H, W].
        raise NotImplementedError

    def _load_raw_labels(self): # Class indices [N], labels [N, D] or None.
        raise NotImplementedError

    def close(self):
        pass

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __len__(self):
        return self._raw_idx.size

    def __getitem__(self, idx):
        raw_idx = int(self._raw_idx[idx])
        image = None if self._cache is None else self._cache.get(raw_idx)
        if image is None:
            image = self._load_raw_image(raw_idx)
            if self._cache is not None:
                self._cache[raw_idx] = image
        if self._xflip[idx]:
            image = image[:, :, ::-1]
        return np.ascontiguousarray(image), self.get_label(idx)

    def get_label(self, idx):
        if self._onehot is None:
            return np.zeros([0], dtype=np.float32)
        return self._onehot[self._raw_idx[idx]].copy()

    def get_details(self, idx):
        raw_idx = int(self._raw_idx[idx])
        raw_label = None if self._onehot is None else self._onehot[raw_idx].copy()
        return types.SimpleNamespace(raw_idx=raw_idx, xflip=bool(self._xflip[idx]), raw_label=raw_label)

    @property
    def name(self):
        return self._name

    @property
    def image_shape(self): # [C, H, W]
        return list(self._raw_shape[1:])

    @property
    def num_channels(self):
        return self.image_shape[0]

    @property
    def resolution(self):
        _, height, width = self.image_shape
        if height != width:
            raise ValueError(f'Dataset {self._name!r} has non-square {width}x{height} images; '
                'rebuild it square with dataset_tool.py.')
        return height

    @property
    def label_dim(self):
        return 0 if self._onehot is None else self._onehot.shape[1]

#----------------------------------------------------------------------------
# Images in a folder or a zip archive, labels in an optional dataset.json.

class ImageFolderDataset(Dataset):
    def __init__(self,
        path,                   # Folder or .zip of images or .npy latents.
        resolution  = None,     # Required resolution, None = any.
        kind        = None,     # Read only 'images' or 'latents'; None = either.
        **super_kwargs,         # Arguments of Dataset.
    ):
        assert kind in (None, 'images', 'latents')
        self._path = str(path)
        self._zipfile = self._zipfile_pid = None
        fix = 'pass a folder or .zip made by dataset_tool.py'
        if os.path.isdir(self._path):
            self._type, names = 'dir', list_files(self._path)
        else:
            if not os.path.isfile(self._path):
                raise ValueError(f'Dataset path {self._path!r} does not exist; {fix}.')
            if not zipfile.is_zipfile(self._path):
                raise ValueError(f'Dataset path {self._path!r} is neither a folder nor a readable zip archive; {fix}.')
            self._type, names = 'zip', self._get_zipfile().namelist()
        ext = lambda name: os.path.splitext(name)[1].lower()
        images = sorted(n for n in names if ext(n) in IMAGE_EXTENSIONS) if kind != 'latents' else []
        latents = sorted(n for n in names if ext(n) == LATENT_EXTENSION) if kind != 'images' else []
        if latents and images:
            both = f'images ({images[0]!r}) and latents ({latents[0]!r})'
            raise ValueError(f'Dataset path {self._path!r} holds both {both}; keep one kind per dataset.')
        self._image_fnames = images or latents
        self._has_json = 'dataset.json' in names
        if len(self._image_fnames) == 0:
            what = '.npy latents' if kind == 'latents' else 'PNG or JPEG images'
            raise ValueError(f'Dataset path {self._path!r} holds no {what}; {fix}.')
        first = self._load_raw_image(0)
        if resolution is not None and first.shape[1:] != (resolution, resolution):
            height, width = first.shape[1:]
            raise ValueError(f'Dataset {self._path!r} has {width}x{height} images, not resolution={resolution}; '
                f'pass resolution={height} or {REBUILD} at {resolution}x{resolution}.')
        name = os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]
        super().__init__(name=name, raw_shape=[len(self._image_fnames), *first.shape], **super_kwargs)

    @property
    def is_latent(self):
        return self._image_fnames[0].lower().endswith(LATENT_EXTENSION)

    @property
    def encoder_kwargs(self):
        """The `encoder` entry of dataset.json (class_name and vae_name), or None."""
        try:
            entry = json.loads(self._read_file('dataset.json')).get('encoder') if self._has_json else None
        except (ValueError, AttributeError):
            return None # _load_raw_labels() names a broken dataset.json.
        return dict(entry) if isinstance(entry, dict) else None

    def _open(self, fname):
        return self._get_zipfile().open(fname) if self._type == 'zip' else open(os.path.join(self._path, fname), 'rb')

    def _error(self, fname, text, fix=None):
        """ValueError '<Image|Latents> <fname> in <path> <text>; <fix>.'"""
        latent = fname.lower().endswith(LATENT_EXTENSION)
        fix = fix or f'{REBUILD}{" encode" if latent else ""}'
        return ValueError(f'{"Latents" if latent else "Image"} {fname!r} in {self._path!r} {text}; {fix}.')

    def check_headers(self):
        """Raise ValueError naming the first file whose header cannot be read or does not match the first's."""
        channels, height, width = self._raw_shape[1:]
        for fname in self._image_fnames:
            try:
                with self._open(fname) as f:
                    if self.is_latent:
                        fmt = np.lib.format
                        read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
                        shape, _fortran_order, dtype = read(f)
                    else:
                        with PIL.Image.open(f) as pil:
                            size, gray = pil.size, pil.mode in GRAY_MODES
            except READ_ERRORS as e:
                raise self._error(fname, f'cannot be read ({e})', None if self.is_latent else REPLACE) from e
            if self.is_latent:
                if dtype.kind != 'f' or np.prod(shape) != channels * height * width or shape[-2:] != (height, width):
                    raise self._error(fname, f'are {dtype} {list(shape)}, the first float {self.image_shape}')
            elif size != (width, height) or gray != (channels == 1):
                color = lambda gray: 'grayscale' if gray else 'color'
                first = f'{width}x{height} {color(channels == 1)}'
                raise self._error(fname, f'is {size[0]}x{size[1]} {color(gray)}, but the first is {first}', RESIZE)

    def _get_zipfile(self): # One handle per process: forked workers must not share its offset.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _read_file(self, fname):
        with self._open(fname) as f:
            return f.read()

    def close(self):
        if getattr(self, '_zipfile', None) is not None and self._zipfile_pid == os.getpid():
            self._zipfile.close()
        self._zipfile = None

    def __getstate__(self):
        return dict(self.__dict__, _zipfile=None)

    def _load_raw_image(self, raw_idx):
        fname = self._image_fnames[raw_idx]
        latent = fname.lower().endswith(LATENT_EXTENSION)
        try:
            if latent:
                image = np.lib.format.read_array(io.BytesIO(self._read_file(fname)), allow_pickle=False)
            else:
                with PIL.Image.open(io.BytesIO(self._read_file(fname))) as pil:
                    if pil.mode not in ('L', 'RGB'):
                        pil = pil.convert('L' if pil.mode in GRAY_MODES else 'RGB')
                    image = np.array(pil, dtype=np.uint8)
        except READ_ERRORS as e:
            raise self._error(fname, f'cannot be read ({e})', None if latent else REPLACE) from e
        if latent and (image.ndim < 2 or image.dtype.kind != 'f'):
            raise self._error(fname, f'are {image.dtype} of shape {list(image.shape)}, not a float array [C, H, W]')
        if latent:
            image = image.reshape(-1, *image.shape[-2:]).astype(np.float32)
        else:
            image = (image[:, :, np.newaxis] if image.ndim == 2 else image).transpose(2, 0, 1)
        expected = getattr(self, '_raw_shape', [None])[1:]
        if expected and list(image.shape) != expected:
            text = f'{"have" if latent else "has"} shape {list(image.shape)}, not {expected} like the first'
            raise self._error(fname, text, None if latent else RESIZE)
        return image

    def _load_raw_labels(self):
        if not self._has_json:
            return None
        try:
            labels = json.loads(self._read_file('dataset.json')).get('labels')
            if labels is None:
                return None
            labels = {str(fname).replace('\\', '/'): label for fname, label in labels}
        except (ValueError, TypeError, AttributeError) as e:
            raise ValueError(f'dataset.json in {self._path!r} is not valid ({e}); {REBUILD}.') from e
        missing = [f for f in self._image_fnames if f not in labels]
        if missing:
            raise ValueError(f'dataset.json in {self._path!r} has no label for {missing[0]!r}; add one or {REBUILD}.')
        return np.array([labels[f] for f in self._image_fnames])

#----------------------------------------------------------------------------

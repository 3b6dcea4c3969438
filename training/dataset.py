"""Image datasets with optional class labels, read from the folders and zip
archives that dataset_tool.py writes (the EDM dataset format), and EDM2's
latent datasets (`dataset_tool.py encode`): one float32 .npy array [C, H, W]
per image, the raw latents of an encoder (training/encoders.py)."""

import io
import json
import os
import types
import zipfile

import numpy as np
import PIL.Image
import torch

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')                # File types that count as images.
LATENT_EXTENSION = '.npy'                                   # File type of the raw latents of one image.
GRAY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')             # PIL modes read as one channel.

#----------------------------------------------------------------------------
# Base class: index bookkeeping, x-flips, labels, caching.
# Subclasses provide _load_raw_image() and _load_raw_labels().

class Dataset(torch.utils.data.Dataset):
    def __init__(self,
        name,                   # Dataset name, e.g. the file name without extension.
        raw_shape,              # Shape of all raw images together: [N, C, H, W].
        max_size    = None,     # Keep at most this many raw images, None = all.
        use_labels  = False,    # Return one-hot class labels? False = empty labels.
        xflip       = False,    # Append a horizontally mirrored copy of every image?
        random_seed = 0,        # Seed that picks the images kept under max_size.
        cache       = False,    # Keep decoded images in memory after the first read?
    ):
        self._name = name
        self._raw_shape = [int(x) for x in raw_shape]
        self._use_labels = bool(use_labels)
        self._cache = dict() if cache else None

        num_raw = self._raw_shape[0]
        indices = np.arange(num_raw, dtype=np.int64)
        if max_size is not None:
            if int(max_size) < 1:
                raise ValueError(f'max_size={max_size} keeps no images; pass a positive count or None for all.')
            if int(max_size) < num_raw:
                rng = np.random.RandomState(random_seed)
                indices = np.sort(rng.choice(num_raw, size=int(max_size), replace=False))
        flips = np.zeros(indices.size, dtype=np.uint8)
        if xflip:
            indices = np.concatenate([indices, indices])
            flips = np.concatenate([flips, np.ones_like(flips)])
        self._raw_idx = indices
        self._xflip = flips

        self._onehot = None
        if self._use_labels:
            raw = self._load_raw_labels()
            if raw is None:
                raise ValueError(f'Dataset {name!r} has no labels; pass use_labels=False or rebuild it with dataset_tool.py from labeled data.')
            self._onehot = self._labels_to_onehot(raw)

    def _labels_to_onehot(self, raw):
        raw = np.asarray(raw)
        if raw.shape[:1] != (self._raw_shape[0],) or raw.ndim not in (1, 2):
            raise ValueError(f'Dataset {self._name!r} has labels of shape {raw.shape} for {self._raw_shape[0]} images; rebuild it with dataset_tool.py.')
        if raw.ndim == 2:
            return raw.astype(np.float32)
        if raw.dtype.kind not in 'iu' or raw.min() < 0:
            raise ValueError(f'Dataset {self._name!r} has class labels that are not non-negative integers; rebuild it with dataset_tool.py.')
        onehot = np.zeros([raw.size, int(raw.max()) + 1], dtype=np.float32)
        onehot[np.arange(raw.size), raw] = 1
        return onehot

    def _load_raw_image(self, raw_idx): # uint8 array of shape [C, H, W].
        raise NotImplementedError

    def _load_raw_labels(self): # Array of shape [N] (class indices) or [N, D], or None.
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
            raise ValueError(f'Dataset {self._name!r} has non-square {width}x{height} images; rebuild it square with dataset_tool.py --resolution=NxN.')
        return height

    @property
    def label_shape(self):
        return [0] if self._onehot is None else list(self._onehot.shape[1:])

    @property
    def label_dim(self):
        return self.label_shape[0]

    @property
    def has_labels(self):
        return self.label_dim != 0

#----------------------------------------------------------------------------
# Images in a folder or a zip archive, labels in an optional dataset.json.

class ImageFolderDataset(Dataset):
    def __init__(self,
        path,                   # Folder or .zip of PNG/JPEG images or of .npy latents.
        resolution  = None,     # Required image height and width, None = accept any.
        kind        = None,     # Read 'images' or 'latents' only; None = the one kind the dataset holds.
        **super_kwargs,         # Arguments of the Dataset base class.
    ):
        if kind not in (None, 'images', 'latents'):
            raise ValueError(f'kind={kind!r} is unknown; use "images", "latents" or None.')
        self._path = str(path)
        self._zipfile = None
        self._zipfile_pid = None
        if os.path.isdir(self._path):
            self._type = 'dir'
            names = []
            for root, _dirs, files in os.walk(self._path):
                rel_root = os.path.relpath(root, self._path)
                names += [f if rel_root == '.' else os.path.join(rel_root, f).replace(os.sep, '/') for f in files]
        elif os.path.isfile(self._path):
            if not zipfile.is_zipfile(self._path):
                raise ValueError(f'Dataset path {self._path!r} is neither a folder nor a readable zip archive; pass a folder or .zip made by dataset_tool.py.')
            self._type = 'zip'
            names = self._get_zipfile().namelist()
        else:
            raise ValueError(f'Dataset path {self._path!r} does not exist; pass a folder or .zip made by dataset_tool.py.')

        images = sorted(n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS) if kind != 'latents' else []
        latents = sorted(n for n in names if os.path.splitext(n)[1].lower() == LATENT_EXTENSION) if kind != 'images' else []
        if latents and images:
            raise ValueError(f'Dataset path {self._path!r} holds both images ({images[0]!r}) and latents ({latents[0]!r}); keep one kind per dataset.')
        self._image_fnames = images or latents
        self._has_json = 'dataset.json' in names
        if len(self._image_fnames) == 0:
            what = '.npy latents' if kind == 'latents' else 'PNG or JPEG images'
            raise ValueError(f'Dataset path {self._path!r} holds no {what}; pass a folder or .zip made by dataset_tool.py.')

        first = self._load_raw_image(0)
        if resolution is not None and first.shape[1:] != (resolution, resolution):
            raise ValueError(f'Dataset {self._path!r} has {first.shape[2]}x{first.shape[1]} images but resolution={resolution} was asked for; pass resolution={first.shape[1]} or rebuild it with dataset_tool.py --resolution={resolution}x{resolution}.')
        name = os.path.splitext(os.path.basename(os.path.normpath(self._path)))[0]
        super().__init__(name=name, raw_shape=[len(self._image_fnames), *first.shape], **super_kwargs)

    @property
    def is_latent(self):
        """True for a dataset of raw latents (.npy), False for images."""
        return self._image_fnames[0].lower().endswith(LATENT_EXTENSION)

    @property
    def encoder_kwargs(self):
        """The `encoder` entry of dataset.json (dataset_tool.py encode: class_name and vae_name), or None."""
        try:
            entry = json.loads(self._read_file('dataset.json')).get('encoder') if self._has_json else None
        except (ValueError, AttributeError):
            return None # _load_raw_labels() names a broken dataset.json.
        return dict(entry) if isinstance(entry, dict) else None

    def _open(self, fname):
        return self._get_zipfile().open(fname) if self._type == 'zip' else open(os.path.join(self._path, fname), 'rb')

    def _check_latent_headers(self):
        for fname in self._image_fnames:
            try:
                with self._open(fname) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _fortran_order, dtype = read(f)
            except (OSError, ValueError, zipfile.BadZipFile) as e:
                raise ValueError(f'Latents {fname!r} in {self._path!r} cannot be read ({e}); rebuild the dataset with dataset_tool.py encode.') from e
            if dtype.kind != 'f' or int(np.prod(shape)) != int(np.prod(self._raw_shape[1:])) or tuple(shape[-2:]) != tuple(self._raw_shape[2:]):
                raise ValueError(f'Latents {fname!r} in {self._path!r} are {dtype} of shape {list(shape)} but the first are float of shape {self._raw_shape[1:]}; rebuild the dataset with dataset_tool.py encode.')

    def check_headers(self):
        """Raise ValueError naming the first image (or latents) whose header cannot be read or whose
        size or channels differ from the first one's; reads the headers only."""
        _channels, height, width = self._raw_shape[1:]
        if self.is_latent:
            self._check_latent_headers()
            return
        for fname in self._image_fnames:
            try:
                with self._open(fname) as f:
                    with PIL.Image.open(f) as pil:
                        size, gray = pil.size, pil.mode in GRAY_MODES
            except (OSError, SyntaxError, ValueError, zipfile.BadZipFile) as e:
                raise ValueError(f'Image {fname!r} in {self._path!r} cannot be read ({e}); replace it or rebuild the dataset with dataset_tool.py.') from e
            if size != (width, height) or gray != (self._raw_shape[1] == 1):
                raise ValueError(f'Image {fname!r} in {self._path!r} is {size[0]}x{size[1]} {"grayscale" if gray else "color"}, but the first image is '
                    f'{width}x{height} {"grayscale" if self._raw_shape[1] == 1 else "color"}; rebuild the dataset with dataset_tool.py --resolution=WxH.')

    def _get_zipfile(self): # One handle per process: forked workers must not share the file offset.
        if self._zipfile is None or self._zipfile_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self._path)
            self._zipfile_pid = os.getpid()
        return self._zipfile

    def _read_file(self, fname):
        if self._type == 'dir':
            with open(os.path.join(self._path, fname), 'rb') as f:
                return f.read()
        return self._get_zipfile().read(fname)

    def close(self):
        if getattr(self, '_zipfile', None) is not None and self._zipfile_pid == os.getpid():
            self._zipfile.close()
        self._zipfile = None

    def __getstate__(self):
        return dict(self.__dict__, _zipfile=None)

    def _load_raw_latents(self, fname):
        try:
            latents = np.load(io.BytesIO(self._read_file(fname)), allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f'Latents {fname!r} in {self._path!r} cannot be read ({e}); rebuild the dataset with dataset_tool.py encode.') from e
        if latents.ndim < 2 or latents.dtype.kind != 'f':
            raise ValueError(f'Latents {fname!r} in {self._path!r} are {latents.dtype} of shape {list(latents.shape)}, not a float array [C, H, W]; rebuild the dataset with dataset_tool.py encode.')
        return latents.reshape(-1, *latents.shape[-2:]).astype(np.float32)

    def _load_raw_image(self, raw_idx):
        fname = self._image_fnames[raw_idx]
        if fname.lower().endswith(LATENT_EXTENSION):
            image = self._load_raw_latents(fname)
            expected = getattr(self, '_raw_shape', None)
            if expected is not None and list(image.shape) != expected[1:]:
                raise ValueError(f'Latents {fname!r} in {self._path!r} have shape {list(image.shape)} but the first have {expected[1:]}; rebuild the dataset with dataset_tool.py encode.')
            return image
        try:
            with PIL.Image.open(io.BytesIO(self._read_file(fname))) as pil:
                if pil.mode not in ('L', 'RGB'):
                    pil = pil.convert('L' if pil.mode in GRAY_MODES else 'RGB')
                image = np.array(pil, dtype=np.uint8)
        except (OSError, SyntaxError, ValueError, zipfile.BadZipFile) as e:
            raise ValueError(f'Image {fname!r} in {self._path!r} cannot be read ({e}); replace it or rebuild the dataset with dataset_tool.py.') from e
        image = image[:, :, np.newaxis] if image.ndim == 2 else image
        image = image.transpose(2, 0, 1)
        expected = getattr(self, '_raw_shape', None)
        if expected is not None and list(image.shape) != expected[1:]:
            raise ValueError(f'Image {fname!r} in {self._path!r} has shape {list(image.shape)} but the first image has {expected[1:]}; rebuild the dataset with dataset_tool.py --resolution=WxH.')
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
            raise ValueError(f'dataset.json in {self._path!r} is not valid ({e}); rebuild the dataset with dataset_tool.py.') from e
        missing = [f for f in self._image_fnames if f not in labels]
        if missing:
            raise ValueError(f'dataset.json in {self._path!r} has no label for {missing[0]!r}; add one or rebuild the dataset with dataset_tool.py.')
        return np.array([labels[f] for f in self._image_fnames])

#----------------------------------------------------------------------------

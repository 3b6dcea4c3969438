"""Build datasets in the EDM format that train.py reads: PNG files named
00000/img00000000.png in a folder or zip, plus dataset.json with the labels."""

import contextlib
import gzip
import io
import json
import os
import pickle
import re
import shutil
import struct
import tarfile
import zipfile

import click
import numpy as np
import PIL.Image
import torch
from tqdm import tqdm

import dnnlib
from training import encoders
from training.dataset import IMAGE_EXTENSIONS

GRAY_MODES = ('1', 'L', 'LA', 'I', 'I;16', 'F')                         # PIL modes kept single-channel.
MNIST_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz')  # Expected in an MNIST folder.
SOURCE_KINDS = "an image folder, a .zip, a CIFAR-10 python tarball, an MNIST folder, an .npz file, or 'digits'"
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, PIL.Image.DecompressionBombError)

#----------------------------------------------------------------------------
# Sources: a sequence of uint8 images [H, W, C] with optional integer labels.

class ArraySource:
    """Images held in one array [N, H, W, C]."""

    def __init__(self, images, labels, max_images):
        self.images = images[:max_images]
        self.labels = None if labels is None else labels[:max_images]

    def __len__(self):
        return len(self.images)

    def sizes(self): # [(W, H), ...]
        return [self.images.shape[2:0:-1]] * len(self)

    def describe(self, idx):
        return f'image {idx}'

    def image(self, idx):
        return self.images[idx]

    def label(self, idx):
        return None if self.labels is None else int(self.labels[idx])

    def close(self):
        pass

class FileSource:
    """Image files in a folder or zip archive, decoded one at a time."""

    def __init__(self, where, names, opener, labels, closer=None):
        self.where = where
        self.names = names
        self.opener = opener            # Name -> binary file object.
        self.labels = labels            # List of ints, or None.
        self.closer = closer
        headers = [self._read(name, lambda pil: (pil.size, pil.mode)) for name in names]
        self._sizes = [size for size, _mode in headers]
        self.mode = 'L' if all(mode in GRAY_MODES for _size, mode in headers) else 'RGB'

    def _read(self, name, fn):
        try:
            with self.opener(name) as f, PIL.Image.open(f) as pil:
                return fn(pil)
        except READ_ERRORS as e:
            raise click.ClickException(f'Image {name!r} in {self.where!r} cannot be read ({e}); remove or replace it.') from e

    def __len__(self):
        return len(self.names)

    def sizes(self): # [(W, H), ...]
        return self._sizes

    def describe(self, idx):
        return repr(self.names[idx])

    def image(self, idx):
        image = self._read(self.names[idx], lambda pil: np.array(pil.convert(self.mode), dtype=np.uint8))
        return image[:, :, np.newaxis] if image.ndim == 2 else image

    def label(self, idx):
        return None if self.labels is None else self.labels[idx]

    def close(self):
        if self.closer is not None:
            self.closer()

#----------------------------------------------------------------------------
# Readers, one per kind of source.

def labels_for_files(where, names, json_bytes):
    """Class labels of image files: from dataset.json if present, otherwise
    from the first-level sub-folders when every image lies in one."""
    if json_bytes is not None:
        try:
            labels = json.loads(json_bytes).get('labels')
            if labels is None:
                return None
            labels = {str(fname).replace('\\', '/'): label for fname, label in labels}
        except (ValueError, TypeError, AttributeError) as e:
            raise click.ClickException(f'dataset.json in {where!r} is not valid ({e}); fix it to {{"labels": [["name.png", class], ...]}} or delete it.') from e
        for name in names:
            label = labels.get(name)
            if not isinstance(label, int) or isinstance(label, bool) or label < 0:
                raise click.ClickException(f'dataset.json in {where!r} gives {name!r} the label {label!r}; give every image a non-negative integer class.')
        return [labels[name] for name in names]
    if names and all('/' in name for name in names):
        classes = sorted({name.split('/', 1)[0] for name in names})
        return [classes.index(name.split('/', 1)[0]) for name in names]
    return None

def open_image_folder(source, max_images):
    names = []
    for root, _dirs, files in os.walk(source):
        rel_root = os.path.relpath(root, source)
        names += [f if rel_root == '.' else os.path.join(rel_root, f).replace(os.sep, '/') for f in files]
    images = sorted(n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    if not images:
        raise click.ClickException(f'Source folder {source!r} holds no PNG or JPEG images; pass {SOURCE_KINDS}.')
    json_bytes = None
    if 'dataset.json' in names:
        with open(os.path.join(source, 'dataset.json'), 'rb') as f:
            json_bytes = f.read()
    labels = labels_for_files(source, images, json_bytes)
    images = images[:max_images]
    labels = None if labels is None else labels[:max_images]
    return FileSource(source, images, lambda name: open(os.path.join(source, name), 'rb'), labels)

def open_image_zip(source, max_images):
    try:
        archive = zipfile.ZipFile(source)
        names = [n for n in archive.namelist() if not n.endswith('/')]
    except READ_ERRORS as e:
        raise click.ClickException(f'Source {source!r} is not a readable zip archive ({e}); pass {SOURCE_KINDS}.') from e
    images = sorted(n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    if not images:
        archive.close()
        raise click.ClickException(f'Source zip {source!r} holds no PNG or JPEG images; pass a zip of images or {SOURCE_KINDS}.')
    json_bytes = archive.read('dataset.json') if 'dataset.json' in names else None
    labels = labels_for_files(source, images, json_bytes)
    images = images[:max_images]
    labels = None if labels is None else labels[:max_images]
    return FileSource(source, images, archive.open, labels, closer=archive.close)

def open_cifar10(source, max_images):
    batches = dict()
    try:
        with tarfile.open(source) as tar:
            for member in tar.getmembers():
                match = re.fullmatch(r'(?:.*/)?data_batch_([1-5])', member.name)
                if match and member.isfile():
                    batches[int(match.group(1))] = pickle.load(tar.extractfile(member), encoding='bytes')
    except (tarfile.TarError, pickle.UnpicklingError, *READ_ERRORS) as e:
        raise click.ClickException(f'Source {source!r} is not a readable CIFAR-10 python tarball ({e}); pass cifar-10-python.tar.gz as downloaded.') from e
    if sorted(batches) != [1, 2, 3, 4, 5]:
        raise click.ClickException(f'Source {source!r} lacks the CIFAR-10 training batches data_batch_1 to data_batch_5; pass cifar-10-python.tar.gz as downloaded.')
    images, labels = [], []
    for key in sorted(batches):
        batch = batches[key] if isinstance(batches[key], dict) else dict()
        data = np.asarray(batch.get(b'data', batch.get('data', [])))
        batch_labels = np.asarray(batch.get(b'labels', batch.get('labels', [])))
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or batch_labels.shape != data.shape[:1]:
            raise click.ClickException(f'data_batch_{key} in {source!r} is not a CIFAR-10 batch of 3072-byte rows with labels; pass cifar-10-python.tar.gz as downloaded.')
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels.astype(np.int64))
    return ArraySource(np.concatenate(images), np.concatenate(labels), max_images)

def read_idx(path, magic, ndim):
    """Array of unsigned bytes from a gzipped MNIST idx file."""
    try:
        with gzip.open(path, 'rb') as f:
            data = f.read()
    except READ_ERRORS as e:
        raise click.ClickException(f'MNIST file {path!r} cannot be read ({e}); download it again.') from e
    header = 4 * (ndim + 1)
    if len(data) >= header:
        found, *shape = struct.unpack(f'>{ndim + 1}I', data[:header])
        if found == magic and len(data) == header + int(np.prod(shape)):
            return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    raise click.ClickException(f'MNIST file {path!r} is not an idx file of {ndim}-D unsigned bytes; download it again.')

def open_mnist(source, max_images):
    images_path, labels_path = [os.path.join(source, f) for f in MNIST_FILES]
    if not os.path.isfile(labels_path):
        raise click.ClickException(f'MNIST folder {source!r} lacks {MNIST_FILES[1]}; put it next to {MNIST_FILES[0]}.')
    images = read_idx(images_path, magic=0x803, ndim=3)
    labels = read_idx(labels_path, magic=0x801, ndim=1)
    if len(images) != len(labels):
        raise click.ClickException(f'MNIST folder {source!r} has {len(images)} images but {len(labels)} labels; download both files again.')
    return ArraySource(images[:, :, :, np.newaxis], labels.astype(np.int64), max_images)

def open_npz(source, max_images):
    fix = 'save it with numpy.savez(path, images=uint8 [N, H, W] or [N, H, W, C], labels=int [N])'
    try:
        with np.load(source, allow_pickle=False) as data:
            if 'images' not in data.files:
                raise click.ClickException(f'Source {source!r} has no array named images (it has {sorted(data.files)}); {fix}.')
            images = data['images']
            labels = data['labels'] if 'labels' in data.files else None
    except READ_ERRORS as e:
        raise click.ClickException(f'Source {source!r} is not a readable .npz file ({e}); {fix}.') from e
    if images.dtype != np.uint8:
        raise click.ClickException(f'Source {source!r} has images of dtype {images.dtype}; convert them to uint8 in 0..255 first.')
    if images.ndim == 3:
        images = images[:, :, :, np.newaxis]
    if images.ndim != 4 or images.shape[3] not in (1, 3) or 0 in images.shape:
        raise click.ClickException(f'Source {source!r} has images of shape {tuple(images.shape)}; {fix} and C = 1 or 3.')
    if labels is not None:
        if labels.shape != images.shape[:1]:
            raise click.ClickException(f'Source {source!r} has labels of shape {labels.shape} for {len(images)} images; {fix}.')
        if labels.dtype.kind not in 'iu' or labels.min() < 0:
            raise click.ClickException(f'Source {source!r} has labels of dtype {labels.dtype} that are not all non-negative integers; store class indices as int.')
        labels = labels.astype(np.int64)
    return ArraySource(images, labels, max_images)

def open_digits(max_images):
    import sklearn.datasets
    digits = sklearn.datasets.load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    return ArraySource(images[:, :, :, np.newaxis], digits.target.astype(np.int64), max_images)

def open_source(source, max_images):
    if source == 'digits':
        return open_digits(max_images)
    if not os.path.exists(source):
        raise click.ClickException(f'Source {source!r} does not exist; pass {SOURCE_KINDS}.')
    if not os.access(source, os.R_OK):
        raise click.ClickException(f'Source {source!r} cannot be read; check its permissions.')
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, MNIST_FILES[0])):
            return open_mnist(source, max_images)
        return open_image_folder(source, max_images)
    lower = source.lower()
    if lower.endswith('.zip'):
        return open_image_zip(source, max_images)
    if lower.endswith('.npz'):
        return open_npz(source, max_images)
    if lower.endswith(('.tar.gz', '.tgz', '.tar')):
        return open_cifar10(source, max_images)
    raise click.ClickException(f'Source {source!r} is of an unknown kind; pass {SOURCE_KINDS}.')

#----------------------------------------------------------------------------
# Resizing and cropping.

def make_transform(transform, resolution):
    """Function from an image [H, W, C] to the output image [H', W', C]."""
    if resolution is None:
        return lambda image: image
    width, height = resolution

    def to_pil(image):
        return PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)

    def to_array(pil):
        image = np.asarray(pil, dtype=np.uint8)
        return image[:, :, np.newaxis] if image.ndim == 2 else image

    def resize(image):
        pil = to_pil(image)
        if pil.size != (width, height):
            pil = pil.resize((width, height), PIL.Image.LANCZOS)
        return to_array(pil)

    def center_crop(image):
        h, w = image.shape[:2]
        crop_w, crop_h = (round(h * width / height), h) if w * height > h * width else (w, round(w * height / width))
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        return resize(image[top : top + crop_h, left : left + crop_w])

    def center_crop_wide(image):
        band = center_crop(image)
        canvas = np.zeros([width, width, band.shape[2]], dtype=np.uint8)
        top = (width - height) // 2
        canvas[top : top + height] = band
        return canvas

    return {None: resize, 'center-crop': center_crop, 'center-crop-wide': center_crop_wide}[transform]

#----------------------------------------------------------------------------
# Output: a folder or zip, written under a temporary name and then renamed.

def check_dest(dest):
    if os.path.isfile(dest) or (os.path.isdir(dest) and os.listdir(dest)):
        raise click.ClickException(f'Destination {dest!r} already holds data; choose another --dest or delete it first.')
    try:
        dnnlib.util.check_writable(dest, '--dest')
    except ValueError as err:
        raise click.ClickException(str(err)) from err

@contextlib.contextmanager
def open_dest(dest):
    """put(fname, bytes) into a folder or zip under a temporary name, renamed to
    `dest` when the block ends without an error; removed otherwise."""
    dest = os.path.normpath(dest)
    to_zip = dest.lower().endswith('.zip')
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    temp = os.path.join(parent, f'.{os.path.basename(dest)}.{os.getpid()}.tmp')
    if to_zip:
        archive = zipfile.ZipFile(temp, 'x', compression=zipfile.ZIP_STORED)
        put = archive.writestr
    else:
        os.mkdir(temp)
        def put(fname, data):
            os.makedirs(os.path.dirname(os.path.join(temp, fname)), exist_ok=True)
            with open(os.path.join(temp, fname), 'xb') as f:
                f.write(data)

    try:
        yield put
        if to_zip:
            archive.close()
        check_dest(dest)
        if os.path.isdir(dest):
            os.rmdir(dest)
        os.replace(temp, dest)
    except BaseException:
        if to_zip:
            archive.close()
            if os.path.exists(temp):
                os.remove(temp)
        else:
            shutil.rmtree(temp, ignore_errors=True)
        raise

def check_source(source_data, source, mixed_fix=None):
    """The (width, height) of the first image of a source; a source with no images stops with a
    ClickException, and so does one of several image sizes unless mixed_fix is None (else it
    says what to do)."""
    if len(source_data) == 0:
        raise click.ClickException(f'Source {source!r} holds no images; pass {SOURCE_KINDS}.')
    sizes = source_data.sizes()
    odd = [idx for idx, size in enumerate(sizes) if size != sizes[0]]
    if odd and mixed_fix is not None:
        first, other = [f'{source_data.describe(i)} is {sizes[i][0]}x{sizes[i][1]}' for i in (0, odd[0])]
        raise click.ClickException(f'Source {source!r} mixes resolutions ({first}, {other}); {mixed_fix}.')
    return sizes[0]

def write_dataset(source, transform, dest):
    labels = []
    with open_dest(dest) as put:
        for idx in tqdm(range(len(source)), desc='Writing', unit='img'):
            image = transform(source.image(idx))
            fname = f'{idx // 1000:05d}/img{idx:08d}.png'
            buffer = io.BytesIO()
            PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format='png')
            put(fname, buffer.getvalue())
            labels.append([fname, source.label(idx)])
        has_labels = source.labels is not None
        put('dataset.json', json.dumps({'labels': labels if has_labels else None}).encode('utf-8'))
    num_classes = len({label for _fname, label in labels}) if has_labels else None
    return len(labels), image.shape, num_classes

def write_latents(source, encoder, dest, batch, device):
    """EDM2's latent dataset: per image, the encoder's raw latents (for the VAE, the
    posterior's mean and std, float32 [8, H/8, W/8]) as 00000/img-mean-std-00000000.npy;
    dataset.json also records the encoder (encoders.describe), which train.py uses."""
    labels = []
    with open_dest(dest) as put:
        for start in tqdm(range(0, len(source), batch), desc='Encoding', unit='batch'):
            indices = range(start, min(start + batch, len(source)))
            images = torch.from_numpy(np.stack([source.image(idx) for idx in indices])).permute(0, 3, 1, 2).to(device)
            with torch.no_grad():
                latents = encoder.encode_pixels(images).to(torch.float32).cpu().numpy()
            for idx, latent in zip(indices, latents):
                fname = f'{idx // 1000:05d}/img-mean-std-{idx:08d}.npy'
                buffer = io.BytesIO()
                np.save(buffer, latent)
                put(fname, buffer.getvalue())
                labels.append([fname, source.label(idx)])
        has_labels = source.labels is not None
        put('dataset.json', json.dumps({'labels': labels if has_labels else None, 'encoder': encoders.describe(encoder)}).encode('utf-8'))
    return len(labels), latents.shape[1:]

#----------------------------------------------------------------------------
# Command line.

def parse_resolution(_ctx, _param, value):
    if value is None:
        return None
    match = re.fullmatch(r'(\d+)x(\d+)', value)
    if match is None or int(match.group(1)) < 1 or int(match.group(2)) < 1:
        raise click.BadParameter(f'{value!r} is not WxH with positive integers; pass e.g. --resolution=32x32.')
    return int(match.group(1)), int(match.group(2))

class ConvertByDefault(click.Group):
    """A group whose first argument, unless it names a command, goes to 'convert' (EDM's command line)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] != '--help':
            args = ['convert', *args]
        return super().parse_args(ctx, args)

@click.group(cls=ConvertByDefault)
def main():
    """Build the datasets that train.py reads.

    \b
    A dataset in the EDM format (the command name 'convert' may be left out):
      python dataset_tool.py --source=digits --dest=datasets/digits-16x16.zip --resolution=16x16

    \b
    EDM2's latent ImageNet-512 from such a dataset of 512x512 images:
      python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
    """

@main.command()
@click.option('--source',     help="Input folder, .zip, .tar.gz, .npz, or 'digits'", metavar='PATH', required=True)
@click.option('--dest',       help='Output folder, or a path ending in .zip', metavar='PATH', required=True)
@click.option('--max-images', help='Convert at most this many images', type=click.IntRange(min=1), metavar='INT')
@click.option('--resolution', help='Output size, e.g. 32x32 (default: keep)', callback=parse_resolution, metavar='WxH')
@click.option('--transform',  help='Crop before resizing (default: resize only)', type=click.Choice(['center-crop', 'center-crop-wide']))
def convert(source, dest, max_images, resolution, transform):
    """Convert a dataset to the EDM format that train.py reads.

    \b
    Sources:
      folder    PNG/JPEG images; labels from dataset.json or class sub-folders
      .zip      the same, inside a zip archive
      .tar.gz   CIFAR-10 python version (cifar-10-python.tar.gz)
      folder    MNIST: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz
      .npz      'images' uint8 [N, H, W] or [N, H, W, C], optional 'labels' int [N]
      digits    scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes);
                a folder that is named digits is passed as ./digits

    \b
    Transforms (need --resolution=WxH):
      center-crop       crop the largest centered W:H box, then resize to WxH
      center-crop-wide  the same, then center it vertically on a black WxW square

    \b
    Example:
      python dataset_tool.py --source=digits --dest=datasets/digits-16x16.zip --resolution=16x16
    """
    check_dest(dest)
    if transform is not None and resolution is None:
        raise click.ClickException(f'--transform={transform} needs an output size; add --resolution=WxH.')
    if transform == 'center-crop-wide' and resolution[1] > resolution[0]:
        raise click.ClickException(f'--transform=center-crop-wide needs W >= H, not {resolution[0]}x{resolution[1]}; use center-crop for tall outputs.')

    source_data = open_source(source, max_images)
    try:
        check_source(source_data, source, mixed_fix=None if resolution is not None else 'pass --resolution=WxH to resize all images')
        count, shape, num_classes = write_dataset(source_data, make_transform(transform, resolution), dest)
    finally:
        source_data.close()
    height, width, channels = shape
    classes = 'no labels' if num_classes is None else f'{num_classes} classes'
    click.echo(f'Wrote {count} images of {channels}x{height}x{width} ({classes}) to {dest}')

@main.command()
@click.option('--source',     help='Images: a dataset made by convert, or any source convert takes', metavar='PATH', required=True)
@click.option('--dest',       help='Output folder, or a path ending in .zip', metavar='PATH', required=True)
@click.option('--vae',        help='VAE: Hugging Face hub name or local folder', metavar='NAME|DIR', type=str, default=encoders.VAE_NAME, show_default=True)
@click.option('--batch',      help='Images per VAE call', metavar='INT', type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--max-images', help='Encode at most this many images', type=click.IntRange(min=1), metavar='INT')
@click.option('--device',     help='Device that runs the VAE (default: cuda if available)', metavar='STR', type=str)
def encode(source, dest, vae, batch, max_images, device):
    """Encode RGB images into EDM2's latent dataset (VAE posterior mean and std).

    \b
    Example (ImageNet-512, as EDM2):
      python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
    """
    check_dest(dest)
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    source_data = open_source(source, max_images)
    try:
        width, height = check_source(source_data, source, mixed_fix='make all images one size with "python dataset_tool.py convert --resolution=WxH" first')
        if width % 8 or height % 8:
            raise click.ClickException(f'Source {source!r} holds {width}x{height} images; the VAE needs sizes divisible by 8, e.g. "python dataset_tool.py convert --resolution=512x512" first.')
        if source_data.image(0).shape[2] != 3:
            raise click.ClickException(f'Source {source!r} holds grayscale images; the VAE encodes RGB images.')
        encoder = encoders.StabilityVAEEncoder(vae_name=vae, batch_size=batch)
        try:
            encoder.init(device)
        except ValueError as err:
            raise click.ClickException(str(err)) from err
        count, shape = write_latents(source_data, encoder, dest, batch=batch, device=device)
    finally:
        source_data.close()
    click.echo(f'Wrote the latents of {count} images, {shape[0]}x{shape[1]}x{shape[2]} each, to {dest}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

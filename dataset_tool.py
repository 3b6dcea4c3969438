"""Build the datasets that train.py reads: PNGs named 00000/img00000000.png in a folder or zip plus dataset.json
with the labels (the EDM format), or EDM2's VAE latents of such images."""

import contextlib
import gzip
import io
import json
import os
import pathlib
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
from training.dataset import GRAY_MODES, IMAGE_EXTENSIONS, list_files

MNIST_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz')
SOURCE_KINDS = "an image or MNIST folder, a .zip, a CIFAR-10 .tar.gz, an .npz, or 'digits'"
READ_ERRORS = (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, PIL.Image.DecompressionBombError)
FILE_SUFFIXES = ('.tar', '.gz', '.tgz', '.bz2', '.xz', '.zst', '.7z', '.rar', '.npz', '.npy', '.pkl', '.h5', '.json')

def error(source, text):
    return click.ClickException(f'Source {source!r} {text}.')

#----------------------------------------------------------------------------
# Sources: a sequence of uint8 images [H, W, C] with optional integer labels.

class Source:
    """names (as messages quote them), sizes [(W, H)], image(idx), labels (or None), close()."""

    def __init__(self, names, sizes, image, labels, close=lambda: None):
        self.names, self.sizes, self.image, self.labels, self.close = names, sizes, image, labels, close

    def __len__(self):
        return len(self.names)

def array_source(images, labels, max_images): # images [N, H, W, C]
    images, labels = images[:max_images], None if labels is None else labels[:max_images]
    return Source([f'image {i}' for i in range(len(images))], [images.shape[2:0:-1]] * len(images),
        images.__getitem__, labels)

def file_source(src, names, opener, labels, close):
    """Image files in a folder or zip (opener: name -> binary file)."""
    def read(name, fn):
        try:
            with opener(name) as f, PIL.Image.open(f) as pil:
                return fn(pil)
        except READ_ERRORS as e:
            raise click.ClickException(f'Image {name!r} in {src!r} cannot be read ({e}); remove or replace it.') from e
    headers = [read(name, lambda pil: (pil.size, pil.mode)) for name in names]
    mode = 'L' if all(mode in GRAY_MODES for _size, mode in headers) else 'RGB'
    def image(idx):
        image = read(names[idx], lambda pil: np.array(pil.convert(mode), dtype=np.uint8))
        return image[:, :, np.newaxis] if image.ndim == 2 else image
    return Source([repr(name) for name in names], [size for size, _mode in headers], image, labels, close)

#----------------------------------------------------------------------------
# Readers.

def open_files(source, names, opener, read_json, max_images, close=lambda: None):
    """The images among `names`, labelled by dataset.json or else by their sub-folders, if all have one."""
    images = sorted(n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS)
    if not images:
        close()
        raise error(source, f'holds no PNG or JPEG images; pass {SOURCE_KINDS}')
    labels = None
    if 'dataset.json' in names:
        try:
            labels = json.loads(read_json()).get('labels')
            labels = None if labels is None else {str(fname).replace('\\', '/'): label for fname, label in labels}
        except (ValueError, TypeError, AttributeError) as e:
            raise click.ClickException(f'dataset.json in {source!r} is not valid ({e}); '
                'fix it to {"labels": [["name.png", class], ...]} or delete it.') from e
        for name in images if labels is not None else []:
            label = labels.get(name)
            if not isinstance(label, int) or isinstance(label, bool) or label < 0:
                raise click.ClickException(f'dataset.json in {source!r} gives {name!r} the label {label!r}; '
                    'give every image a non-negative integer class.')
        labels = None if labels is None else [labels[name] for name in images]
    elif all('/' in name for name in images):
        classes = sorted({name.split('/', 1)[0] for name in images})
        labels = [classes.index(name.split('/', 1)[0]) for name in images]
    return file_source(source, images[:max_images], opener, None if labels is None else labels[:max_images], close)

def open_image_folder(source, max_images):
    opener = lambda name: open(os.path.join(source, name), 'rb')
    return open_files(source, list_files(source), opener, pathlib.Path(source, 'dataset.json').read_bytes, max_images)

def open_image_zip(source, max_images):
    try:
        archive = zipfile.ZipFile(source)
        names = [n for n in archive.namelist() if not n.endswith('/')]
    except READ_ERRORS as e:
        raise error(source, f'is not a readable zip ({e}); pass {SOURCE_KINDS}') from e
    return open_files(source, names, archive.open, lambda: archive.read('dataset.json'), max_images, archive.close)

def open_cifar10(source, max_images):
    fix = 'pass cifar-10-python.tar.gz as downloaded'
    batches = dict()
    try:
        with tarfile.open(source) as tar:
            for member in tar.getmembers():
                match = re.fullmatch(r'(?:.*/)?data_batch_([1-5])', member.name)
                if match and member.isfile():
                    batches[int(match.group(1))] = pickle.load(tar.extractfile(member), encoding='bytes')
    except (tarfile.TarError, pickle.UnpicklingError, *READ_ERRORS) as e:
        raise error(source, f'is not a readable CIFAR-10 python tarball ({e}); {fix}') from e
    if sorted(batches) != [1, 2, 3, 4, 5]:
        raise error(source, f'lacks the CIFAR-10 training batches data_batch_1 to 5; {fix}')
    images, labels = [], []
    for key in range(1, 6):
        batch = batches[key] if isinstance(batches[key], dict) else dict()
        data = np.asarray(batch.get(b'data', batch.get('data', [])))
        batch_labels = np.asarray(batch.get(b'labels', batch.get('labels', [])))
        if data.dtype != np.uint8 or data.shape[1:] != (3 * 32 * 32,) or batch_labels.shape != data.shape[:1]:
            raise click.ClickException(f'data_batch_{key} in {source!r} is not 3072-byte rows with labels; {fix}.')
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(batch_labels.astype(np.int64))
    return array_source(np.concatenate(images), np.concatenate(labels), max_images)

def read_idx(path, magic, ndim): # Gzipped MNIST.
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
        raise click.ClickException(f'MNIST folder {source!r} has {len(images)} images but {len(labels)} labels; '
            'download both files again.')
    return array_source(images[:, :, :, np.newaxis], labels.astype(np.int64), max_images)

def open_npz(source, max_images):
    fix = 'save it with numpy.savez(path, images=uint8 [N, H, W(, C)], labels=int [N])'
    if not zipfile.is_zipfile(source):
        raise error(source, f'is not a NumPy .npz archive; {fix}')
    try:
        with np.load(source, allow_pickle=False) as data:
            if 'images' not in data.files:
                raise error(source, f'has no array named images (it has {sorted(data.files)}); {fix}')
            images = data['images']
            labels = data['labels'] if 'labels' in data.files else None
    except READ_ERRORS as e:
        raise error(source, f'is not a readable .npz file ({e}); {fix}') from e
    if images.dtype != np.uint8:
        raise error(source, f'has images of dtype {images.dtype}; convert them to uint8 in 0..255 first')
    images = images[:, :, :, np.newaxis] if images.ndim == 3 else images
    if images.ndim != 4 or images.shape[3] not in (1, 3) or 0 in images.shape:
        raise error(source, f'has images of shape {tuple(images.shape)}; {fix} and C = 1 or 3')
    if labels is not None and labels.shape != images.shape[:1]:
        raise error(source, f'has labels of shape {labels.shape} for {len(images)} images; {fix}')
    if labels is not None and (labels.dtype.kind not in 'iu' or labels.min() < 0):
        raise error(source, f'has labels of dtype {labels.dtype} that are not all non-negative integers; '
            'store class indices as int')
    return array_source(images, None if labels is None else labels.astype(np.int64), max_images)

def open_source(source, max_images):
    if source == 'digits':
        import sklearn.datasets # pylint: disable=import-outside-toplevel
        digits = sklearn.datasets.load_digits()
        images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
        return array_source(images[:, :, :, np.newaxis], digits.target.astype(np.int64), max_images)
    if not os.path.exists(source):
        raise error(source, f'does not exist; pass {SOURCE_KINDS}')
    if not os.access(source, os.R_OK):
        raise error(source, 'cannot be read; check its permissions')
    if os.path.isdir(source):
        mnist = os.path.isfile(os.path.join(source, MNIST_FILES[0]))
        return (open_mnist if mnist else open_image_folder)(source, max_images)
    for suffixes, reader in [('.zip', open_image_zip), ('.npz', open_npz), (('.tar.gz', '.tgz', '.tar'), open_cifar10)]:
        if source.lower().endswith(suffixes):
            return reader(source, max_images)
    raise error(source, f'is of an unknown kind; pass {SOURCE_KINDS}')

def check_source(source_data, source, mixed_fix=None):
    """The (width, height) of the first image; with mixed_fix, all must have it."""
    if len(source_data) == 0:
        raise error(source, f'holds no images; pass {SOURCE_KINDS}')
    sizes = source_data.sizes
    odd = [idx for idx, size in enumerate(sizes) if size != sizes[0]]
    if odd and mixed_fix is not None:
        first, other = [f'{source_data.names[i]} is {sizes[i][0]}x{sizes[i][1]}' for i in (0, odd[0])]
        raise error(source, f'mixes resolutions ({first}, {other}); {mixed_fix}')
    return sizes[0]

#----------------------------------------------------------------------------
# Resizing and cropping.

def make_transform(transform, resolution):
    if resolution is None:
        return lambda image: image
    width, height = resolution

    def resize(image):
        pil = PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)
        if pil.size != (width, height):
            pil = pil.resize((width, height), PIL.Image.LANCZOS)
        image = np.asarray(pil, dtype=np.uint8)
        return image[:, :, np.newaxis] if image.ndim == 2 else image

    def center_crop(image):
        h, w = image.shape[:2]
        crop_w, crop_h = (round(h * width / height), h) if w * height > h * width else (w, round(w * height / width))
        top, left = (h - crop_h) // 2, (w - crop_w) // 2
        return resize(image[top : top + crop_h, left : left + crop_w])

    def center_crop_wide(image):
        canvas = np.zeros([width, width, image.shape[2]], dtype=np.uint8)
        top = (width - height) // 2
        canvas[top : top + height] = center_crop(image)
        return canvas

    return {None: resize, 'center-crop': center_crop, 'center-crop-wide': center_crop_wide}[transform]

#----------------------------------------------------------------------------
# Output: a folder or zip, written under a temporary name.

def check_dest(dest):
    if os.path.splitext(dest)[1].lower() in FILE_SUFFIXES:
        raise click.ClickException(f'--dest={dest} is not a format dataset_tool.py writes; use a .zip or a folder.')
    if os.path.isfile(dest) or (os.path.isdir(dest) and os.listdir(dest)):
        raise click.ClickException(f'Destination {dest!r} already holds data; choose another --dest or delete it.')
    with dnnlib.util.user_errors():
        dnnlib.util.check_writable(dest, '--dest', folder=not dest.lower().endswith('.zip'))

@contextlib.contextmanager
def open_dest(dest):
    """put(fname, bytes) into a temporary folder or zip, renamed to `dest` on success, else removed."""
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

def write_files(source, dest, files, extra=None):
    """Write (idx, fname, bytes, shape) `files` and dataset.json; returns the count and the last shape."""
    labels, shape = [], None
    with open_dest(dest) as put:
        for idx, fname, data, shape in files:
            put(fname, data)
            labels.append([fname, None if source.labels is None else int(source.labels[idx])])
        meta = {'labels': labels if source.labels is not None else None, **(extra or {})}
        put('dataset.json', json.dumps(meta).encode('utf-8'))
    return len(labels), shape

def write_dataset(source, transform, dest):
    def files():
        for idx in tqdm(range(len(source)), desc='Writing', unit='img'):
            image = transform(source.image(idx))
            buffer = io.BytesIO()
            PIL.Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format='png')
            yield idx, f'{idx // 1000:05d}/img{idx:08d}.png', buffer.getvalue(), image.shape
    return write_files(source, dest, files())

def write_latents(source, encoder, dest, batch, device):
    """EDM2's latent dataset: the VAE posterior's mean and std, float32 [8, H/8, W/8] .npy files."""
    def files():
        for start in tqdm(range(0, len(source), batch), desc='Encoding', unit='batch'):
            indices = range(start, min(start + batch, len(source)))
            images = torch.from_numpy(np.stack([source.image(idx) for idx in indices])).permute(0, 3, 1, 2).to(device)
            with torch.no_grad():
                latents = encoder.encode_pixels(images).to(torch.float32).cpu().numpy()
            for idx, latent in zip(indices, latents):
                buffer = io.BytesIO()
                np.save(buffer, latent)
                yield idx, f'{idx // 1000:05d}/img-mean-std-{idx:08d}.npy', buffer.getvalue(), latent.shape
    return write_files(source, dest, files(), extra=dict(encoder=encoders.describe(encoder)))

#----------------------------------------------------------------------------
# Command line.

def parse_resolution(_ctx, _param, value):
    match = re.fullmatch(r'(0*[1-9]\d*)x(0*[1-9]\d*)', value or '')
    if value is not None and match is None:
        raise click.BadParameter(f'{value!r} is not WxH with positive integers; pass e.g. --resolution=32x32.')
    return None if value is None else (int(match.group(1)), int(match.group(2)))

class ConvertByDefault(click.Group):
    """A group whose first argument, unless it names a command, goes to 'convert' (EDM's command line)."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] != '--help':
            args = ['convert', *args]
        return super().parse_args(ctx, args)

@click.group(cls=ConvertByDefault)
def main():
    """Build the datasets that train.py reads ('convert' may be left out, as in EDM).

    \b
    python dataset_tool.py --source=digits --dest=datasets/digits-16x16.zip --resolution=16x16
    python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip  # EDM2's latents.
    """

@main.command()
@click.option('--source',     help="Input folder, .zip, .tar.gz, .npz, or 'digits'", metavar='PATH', required=True)
@click.option('--dest',       help='Output folder, or a path ending in .zip', metavar='PATH', required=True)
@click.option('--max-images', help='Convert at most this many images', type=click.IntRange(min=1), metavar='INT')
@click.option('--resolution', help='Output size, e.g. 32x32 (default: keep)', callback=parse_resolution, metavar='WxH')
@click.option('--transform',  help='Crop before resizing (default: resize only)',
                              type=click.Choice(['center-crop', 'center-crop-wide']))
def convert(source, dest, max_images, resolution, transform):
    """Convert a dataset to the EDM format that train.py reads.

    \b
    Sources:
      folder/.zip  PNG/JPEG images; labels from dataset.json or class sub-folders
      .tar.gz      CIFAR-10 python version (cifar-10-python.tar.gz)
      folder       MNIST: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz
      .npz         'images' uint8 [N, H, W(, C)], optional 'labels' int [N]
      digits       scikit-learn's 8x8 digits (1,797 images, 10 classes); a folder named digits: ./digits

    \b
    Transforms (with --resolution=WxH): center-crop crops the largest centered W:H box, then resizes;
    center-crop-wide also centers the result vertically on a black WxW square.
    """
    check_dest(dest)
    if transform is not None and resolution is None:
        raise click.ClickException(f'--transform={transform} needs an output size; add --resolution=WxH.')
    if transform == 'center-crop-wide' and resolution[1] > resolution[0]:
        raise click.ClickException(f'--transform=center-crop-wide needs W >= H, not {resolution[0]}x{resolution[1]}; '
            'use center-crop for tall outputs.')
    source_data = open_source(source, max_images)
    try:
        check_source(source_data, source, None if resolution else 'pass --resolution=WxH to resize all images')
        count, (height, width, channels) = write_dataset(source_data, make_transform(transform, resolution), dest)
    finally:
        source_data.close()
    classes = 'no labels' if source_data.labels is None else f'{len(set(source_data.labels[:count]))} classes'
    click.echo(f'Wrote {count} images of {channels}x{height}x{width} ({classes}) to {dest}')

@main.command()
@click.option('--source',     help='Images: a dataset made by convert, or any source convert takes', metavar='PATH',
                              required=True)
@click.option('--dest',       help='Output folder, or a path ending in .zip', metavar='PATH', required=True)
@click.option('--vae',        help='VAE: Hugging Face hub name or local folder', metavar='NAME|DIR',
                              default=encoders.VAE_NAME, show_default=True)
@click.option('--batch',      help='Images per VAE call', metavar='INT', type=click.IntRange(min=1), default=8,
                              show_default=True)
@click.option('--max-images', help='Encode at most this many images', type=click.IntRange(min=1), metavar='INT')
@click.option('--device',     help='Device that runs the VAE (default: cuda if available)', metavar='STR')
def encode(source, dest, vae, batch, max_images, device):
    """Encode RGB images into EDM2's latent dataset (the VAE posterior's mean and std)."""
    check_dest(dest)
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    source_data = open_source(source, max_images)
    try:
        resize = 'with "python dataset_tool.py convert --resolution'
        width, height = check_source(source_data, source, mixed_fix=f'make all images one size {resize}=WxH" first')
        if width % 8 or height % 8:
            raise error(source, f'holds {width}x{height} images; the VAE needs sizes divisible by 8, so resize them '
                f'{resize}=512x512" first')
        if source_data.image(0).shape[2] != 3:
            raise error(source, 'holds grayscale images; the VAE encodes RGB images')
        encoder = encoders.StabilityVAEEncoder(vae_name=vae, batch_size=batch)
        with dnnlib.util.user_errors():
            encoder.init(device)
        count, shape = write_latents(source_data, encoder, dest, batch=batch, device=device)
    finally:
        source_data.close()
    click.echo(f'Wrote the latents of {count} images, {shape[0]}x{shape[1]}x{shape[2]} each, to {dest}')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""Tests of dataset_tool.py: every kind of source, the transforms, and the
errors for bad input."""

import gzip
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

import dataset_tool
from training.dataset import ImageFolderDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# Helpers.

def run_tool(*args):
    return CliRunner().invoke(dataset_tool.main, [str(a) for a in args])

def run_ok(*args):
    result = run_tool(*args)
    assert result.exit_code == 0, result.output
    return result

def expect_error(pattern, *args):
    """Run the tool, check that it stops with exit code 1 and one 'Error:' line matching pattern."""
    result = run_tool(*args)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith('Error: ')]
    assert len(errors) == 1, result.output
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]

def read_back(path, use_labels=True):
    dataset = ImageFolderDataset(path=str(path), use_labels=use_labels)
    images = np.stack([dataset[i][0] for i in range(len(dataset))])
    labels = [int(dataset.get_label(i).argmax()) for i in range(len(dataset))] if use_labels else None
    return dataset, images, labels

def read_json(path):
    if os.path.isdir(path):
        with open(os.path.join(path, 'dataset.json')) as f:
            return json.load(f)
    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read('dataset.json'))

def save_png(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    PIL.Image.fromarray(image).save(path)

def random_images(n, shape, seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=[n, *shape], dtype=np.uint8)

def make_cifar10(path, per_batch=2, batches=(1, 2, 3, 4, 5)):
    """Tiny tarball laid out like cifar-10-python.tar.gz: pickled dicts with
    b'data' (rows of 1024 red, 1024 green, 1024 blue bytes) and b'labels'."""
    rng = np.random.RandomState(1)
    data, labels = [], []
    with tarfile.open(path, 'w:gz') as tar:
        for name in [f'data_batch_{k}' for k in batches] + ['test_batch']:
            batch = {b'batch_label': name.encode(), b'data': rng.randint(0, 256, size=[per_batch, 3072], dtype=np.uint8),
                     b'labels': [int(x) for x in rng.randint(0, 10, size=per_batch)], b'filenames': [b'x.png'] * per_batch}
            if name != 'test_batch':
                data.append(batch[b'data'])
                labels += batch[b'labels']
            blob = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return np.concatenate(data).reshape(-1, 3, 32, 32), labels

def write_idx(path, array, magic):
    with gzip.open(path, 'wb') as f:
        f.write(struct.pack(f'>{1 + array.ndim}I', magic, *array.shape) + array.tobytes())

def make_mnist(folder, n=5, size=6):
    os.makedirs(folder, exist_ok=True)
    images = random_images(n, [size, size], seed=2)
    labels = np.arange(n, dtype=np.uint8) % 10
    write_idx(os.path.join(folder, 'train-images-idx3-ubyte.gz'), images, 0x803)
    write_idx(os.path.join(folder, 'train-labels-idx1-ubyte.gz'), labels, 0x801)
    return images, labels

#----------------------------------------------------------------------------
# Sources.

def test_digits_to_zip_at_16x16(tmp_path):
    from sklearn.datasets import load_digits
    dest = tmp_path / 'digits.zip'
    proc = subprocess.run([sys.executable, 'dataset_tool.py', '--source=digits', f'--dest={dest}', '--resolution=16x16'],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    dataset, images, labels = read_back(dest)
    digits = load_digits()
    assert len(dataset) == 1797
    assert images.shape == (1797, 1, 16, 16) and images.dtype == np.uint8
    assert dataset.label_dim == 10 and sorted(set(labels)) == list(range(10))
    assert labels == digits.target.tolist()
    pooled = images[:, 0].reshape(1797, 8, 2, 8, 2).astype(np.float64).mean(axis=(2, 4))
    assert np.abs(pooled - digits.images * 255 / 16).mean() < 20
    assert read_json(dest)['labels'][1796] == ['00001/img00001796.png', labels[1796]]

def test_digits_scaled_to_0_255(tmp_path):
    from sklearn.datasets import load_digits
    run_ok('--source=digits', f'--dest={tmp_path / "d"}', '--max-images=20')
    _dataset, images, labels = read_back(tmp_path / 'd')
    digits = load_digits()
    assert images.shape == (20, 1, 8, 8)
    np.testing.assert_array_equal(images[:, 0], np.rint(digits.images[:20] * 255 / 16).astype(np.uint8))
    assert labels == digits.target[:20].tolist()

def test_cifar10_tarball(tmp_path):
    source = tmp_path / 'cifar-10-python.tar.gz'
    expected, expected_labels = make_cifar10(source)
    run_ok(f'--source={source}', f'--dest={tmp_path / "cifar.zip"}')
    dataset, images, labels = read_back(tmp_path / 'cifar.zip')
    assert len(dataset) == 10 and dataset.image_shape == [3, 32, 32]
    np.testing.assert_array_equal(images, expected)
    assert labels == expected_labels
    assert [label for _name, label in read_json(tmp_path / 'cifar.zip')['labels']] == expected_labels

def test_mnist_folder(tmp_path):
    expected, expected_labels = make_mnist(tmp_path / 'mnist')
    run_ok(f'--source={tmp_path / "mnist"}', f'--dest={tmp_path / "out"}')
    assert os.path.isfile(tmp_path / 'out' / '00000' / 'img00000004.png')
    with PIL.Image.open(tmp_path / 'out' / '00000' / 'img00000000.png') as pil:
        assert pil.mode == 'L'
    _dataset, images, _labels = read_back(tmp_path / 'out', use_labels=False)
    np.testing.assert_array_equal(images[:, 0], expected)
    assert [label for _name, label in read_json(tmp_path / 'out')['labels']] == expected_labels.tolist()

@pytest.mark.parametrize('shape', [(4, 5), (4, 5, 1), (4, 5, 3)])
def test_npz_with_labels(tmp_path, shape):
    expected = random_images(6, shape)
    np.savez(tmp_path / 'a.npz', images=expected, labels=np.array([3, 1, 4, 1, 5, 9]))
    run_ok(f'--source={tmp_path / "a.npz"}', f'--dest={tmp_path / "a.zip"}')
    dataset, images, labels = read_back(tmp_path / 'a.zip')
    channels = shape[2] if len(shape) == 3 else 1
    assert dataset.image_shape == [channels, 4, 5]
    np.testing.assert_array_equal(images, expected.reshape(6, 4, 5, channels).transpose(0, 3, 1, 2))
    assert labels == [3, 1, 4, 1, 5, 9] and dataset.label_dim == 10

def test_npz_without_labels(tmp_path):
    np.savez(tmp_path / 'a.npz', images=random_images(3, (4, 4)))
    run_ok(f'--source={tmp_path / "a.npz"}', f'--dest={tmp_path / "a.zip"}')
    assert read_json(tmp_path / 'a.zip') == {'labels': None}
    with pytest.raises(ValueError, match='has no labels; pass use_labels=False'):
        ImageFolderDataset(path=str(tmp_path / 'a.zip'), use_labels=True)

def test_folder_with_dataset_json(tmp_path):
    expected = random_images(3, (8, 8, 3))
    names = ['b.png', 'a.png', 'sub/c.png']
    for name, image in zip(names, expected):
        save_png(tmp_path / 'src' / name, image)
    with open(tmp_path / 'src' / 'dataset.json', 'w') as f:
        json.dump({'labels': [[name, label] for name, label in zip(names, [7, 2, 5])]}, f)
    run_ok(f'--source={tmp_path / "src"}', f'--dest={tmp_path / "out.zip"}')
    _dataset, images, _labels = read_back(tmp_path / 'out.zip', use_labels=False)
    np.testing.assert_array_equal(images, expected[[1, 0, 2]].transpose(0, 3, 1, 2))
    assert read_json(tmp_path / 'out.zip')['labels'] == [['00000/img00000000.png', 2], ['00000/img00000001.png', 7], ['00000/img00000002.png', 5]]

def test_folder_with_class_subfolders(tmp_path):
    for cls, count in [('dog', 2), ('cat', 1), ('emu', 1)]:
        for i in range(count):
            save_png(tmp_path / 'src' / cls / f'{i}.jpg', np.full([8, 8, 3], 100, dtype=np.uint8))
    run_ok(f'--source={tmp_path / "src"}', f'--dest={tmp_path / "out"}')
    assert [label for _name, label in read_json(tmp_path / 'out')['labels']] == [0, 1, 1, 2]

def test_folder_without_labels_and_gray_promoted_when_mixed(tmp_path):
    save_png(tmp_path / 'src' / 'a.png', np.full([4, 4], 10, dtype=np.uint8))
    save_png(tmp_path / 'src' / 'b.png', np.full([4, 4, 3], 20, dtype=np.uint8))
    run_ok(f'--source={tmp_path / "src"}', f'--dest={tmp_path / "out.zip"}')
    assert read_json(tmp_path / 'out.zip') == {'labels': None}
    _dataset, images, _labels = read_back(tmp_path / 'out.zip', use_labels=False)
    assert images.shape == (2, 3, 4, 4) and (images[0] == 10).all() and (images[1] == 20).all()

def test_zip_source_round_trip(tmp_path):
    np.savez(tmp_path / 'a.npz', images=random_images(12, (4, 4, 3)), labels=np.arange(12) % 3)
    run_ok(f'--source={tmp_path / "a.npz"}', f'--dest={tmp_path / "first.zip"}')
    run_ok(f'--source={tmp_path / "first.zip"}', f'--dest={tmp_path / "second"}', '--max-images=7')
    _d, first, first_labels = read_back(tmp_path / 'first.zip')
    _d, second, second_labels = read_back(tmp_path / 'second')
    np.testing.assert_array_equal(second, first[:7])
    assert second_labels == first_labels[:7]

def test_zip_source_with_class_subfolders(tmp_path):
    with zipfile.ZipFile(tmp_path / 'src.zip', 'w') as archive:
        for name in ['b/1.png', 'a/1.png', 'b/2.png']:
            buffer = io.BytesIO()
            PIL.Image.fromarray(np.zeros([4, 4], dtype=np.uint8)).save(buffer, format='png')
            archive.writestr(name, buffer.getvalue())
    run_ok(f'--source={tmp_path / "src.zip"}', f'--dest={tmp_path / "out.zip"}')
    assert [label for _name, label in read_json(tmp_path / 'out.zip')['labels']] == [0, 1, 1]

def test_many_images_use_numbered_subfolders(tmp_path):
    np.savez(tmp_path / 'a.npz', images=np.zeros([1001, 2, 2], dtype=np.uint8))
    run_ok(f'--source={tmp_path / "a.npz"}', f'--dest={tmp_path / "out.zip"}')
    with zipfile.ZipFile(tmp_path / 'out.zip') as archive:
        names = archive.namelist()
    assert '00000/img00000999.png' in names and '00001/img00001000.png' in names and len(names) == 1002

#----------------------------------------------------------------------------
# Resolution and transforms.

def test_resize_and_mixed_resolutions_with_resolution(tmp_path):
    save_png(tmp_path / 'src' / 'a.png', np.full([8, 8, 3], 50, dtype=np.uint8))
    save_png(tmp_path / 'src' / 'b.png', np.full([6, 10, 3], 90, dtype=np.uint8))
    run_ok(f'--source={tmp_path / "src"}', f'--dest={tmp_path / "out.zip"}', '--resolution=12x6')
    dataset, images, _labels = read_back(tmp_path / 'out.zip', use_labels=False)
    assert dataset.image_shape == [3, 6, 12]
    assert (images[0] == 50).all() and (images[1] == 90).all()

def test_center_crop(tmp_path):
    image = np.zeros([8, 12, 3], dtype=np.uint8)
    image[:, 2:10] = 255
    np.savez(tmp_path / 'a.npz', images=image[np.newaxis])
    run_ok(f'--source={tmp_path / "a.npz"}', f'--dest={tmp_path / "crop"}', '--resolution=8x8', '--transform=center-crop')
    _dataset, images, _labels = read_back(tmp_path / 'crop', use_labels=False)
    assert images.shape == (1, 3, 8, 8) and (images == 255).all()

def test_center_crop_wide(tmp_path):
    image = np.zeros([8, 8], dtype=np.uint8)
    image[2:6] = 200
    np.savez(tmp_path / 'a.npz', images=image[np.newaxis])
    run_ok(f'--source={tmp_path / "a.npz"}', f'--dest={tmp_path / "wide"}', '--resolution=8x4', '--transform=center-crop-wide')
    _dataset, images, _labels = read_back(tmp_path / 'wide', use_labels=False)
    np.testing.assert_array_equal(images[0, 0], image)

def test_dest_may_be_an_empty_folder(tmp_path):
    os.mkdir(tmp_path / 'out')
    np.savez(tmp_path / 'a.npz', images=random_images(2, (4, 4)))
    run_ok(f'--source={tmp_path / "a.npz"}', f'--dest={tmp_path / "out"}')
    assert sorted(os.listdir(tmp_path / 'out')) == ['00000', 'dataset.json']
    assert sorted(os.listdir(tmp_path)) == ['a.npz', 'out']

#----------------------------------------------------------------------------
# Bad input: one sentence naming the value and the fix, nothing overwritten.

def test_missing_source_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, 'dataset_tool.py', f'--source={tmp_path / "nothing"}', f'--dest={tmp_path / "out.zip"}'],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert 'Traceback' not in proc.stderr
    assert re.fullmatch(r"Error: Source '.*nothing' does not exist; pass an image or MNIST folder, a \.zip, .*, or 'digits'\.\n", proc.stderr)
    assert not os.path.exists(tmp_path / 'out.zip')

def test_unreadable_zip_source(tmp_path):
    (tmp_path / 'broken.zip').write_bytes(b'not a zip')
    expect_error(r"Source '.*broken\.zip' is not a readable zip \(.*\); pass an image or MNIST folder", f'--source={tmp_path / "broken.zip"}', f'--dest={tmp_path / "out.zip"}')

def test_unreadable_image(tmp_path):
    save_png(tmp_path / 'src' / 'a.png', np.zeros([4, 4], dtype=np.uint8))
    (tmp_path / 'src' / 'b.png').write_bytes(b'not a png')
    expect_error(r"Image 'b\.png' in '.*src' cannot be read \(.*\); remove or replace it\.", f'--source={tmp_path / "src"}', f'--dest={tmp_path / "out.zip"}')

def test_zip_without_images(tmp_path):
    with zipfile.ZipFile(tmp_path / 'empty.zip', 'w') as archive:
        archive.writestr('readme.txt', 'no images here')
    expect_error(r"Source '.*empty\.zip' holds no PNG or JPEG images; pass an image or MNIST folder,", f'--source={tmp_path / "empty.zip"}', f'--dest={tmp_path / "out.zip"}')
    assert not os.path.exists(tmp_path / 'out.zip')

def test_mixed_resolutions_without_resolution(tmp_path):
    save_png(tmp_path / 'src' / 'a.png', np.zeros([8, 8, 3], dtype=np.uint8))
    save_png(tmp_path / 'src' / 'b.png', np.zeros([4, 6, 3], dtype=np.uint8))
    expect_error(r"Source '.*src' mixes resolutions \('a\.png' is 8x8, 'b\.png' is 6x4\); pass --resolution=WxH to resize all images\.",
        f'--source={tmp_path / "src"}', f'--dest={tmp_path / "out.zip"}')
    assert sorted(os.listdir(tmp_path)) == ['src']

@pytest.mark.parametrize('kind', ['zip', 'folder'])
def test_existing_dest_is_kept(tmp_path, kind):
    np.savez(tmp_path / 'a.npz', images=random_images(2, (4, 4)))
    dest = tmp_path / ('old.zip' if kind == 'zip' else 'old')
    run_ok(f'--source={tmp_path / "a.npz"}', f'--dest={dest}')
    before = read_json(dest)
    np.savez(tmp_path / 'b.npz', images=random_images(5, (4, 4)), labels=np.zeros(5, dtype=int))
    expect_error(r"Destination '.*old(\.zip)?' already holds data; choose another --dest or delete it\.", f'--source={tmp_path / "b.npz"}', f'--dest={dest}')
    assert read_json(dest) == before
    assert sorted(os.listdir(tmp_path)) == ['a.npz', 'b.npz', dest.name]

def test_failure_while_writing_leaves_nothing(tmp_path):
    for name in ['a.png', 'b.png', 'c.png']:
        save_png(tmp_path / 'src' / name, random_images(1, (16, 16, 3))[0])
    data = (tmp_path / 'src' / 'c.png').read_bytes()
    (tmp_path / 'src' / 'c.png').write_bytes(data[:len(data) // 2])
    assert len(dataset_tool.open_source(str(tmp_path / 'src'), None)) == 3  # Headers are fine: the failure comes while writing.
    for dest in ['out.zip', 'out']:
        expect_error(r"Image 'c\.png' in '.*src' cannot be read \(.*\); remove or replace it\.", f'--source={tmp_path / "src"}', f'--dest={tmp_path / dest}')
        assert sorted(os.listdir(tmp_path)) == ['src']

@pytest.mark.parametrize('arrays, pattern', [
    (dict(pixels=np.zeros([2, 4, 4], np.uint8)), r"has no array named images \(it has \['pixels'\]\); save it with numpy\.savez"),
    (dict(images=np.zeros([2, 4, 4], np.float32)), r"has images of dtype float32; convert them to uint8 in 0\.\.255 first\."),
    (dict(images=np.zeros([2, 4, 4, 2], np.uint8)), r"has images of shape \(2, 4, 4, 2\); save it with numpy\.savez.* and C = 1 or 3\."),
    (dict(images=np.zeros([4, 4], np.uint8)), r"has images of shape \(4, 4\); save it"),
    (dict(images=np.zeros([2, 4, 4], np.uint8), labels=np.zeros(3, int)), r"has labels of shape \(3,\) for 2 images; save it"),
    (dict(images=np.zeros([2, 4, 4], np.uint8), labels=np.array([0.5, 1.0])), r"has labels of dtype float64 that are not all non-negative integers; store class indices as int\."),
    (dict(images=np.zeros([2, 4, 4], np.uint8), labels=np.array([-1, 1])), r"has labels of dtype int64 that are not all non-negative integers"),
])
def test_malformed_npz(tmp_path, arrays, pattern):
    np.savez(tmp_path / 'bad.npz', **arrays)
    expect_error(r"Source '.*bad\.npz' " + pattern, f'--source={tmp_path / "bad.npz"}', f'--dest={tmp_path / "out.zip"}')
    assert not os.path.exists(tmp_path / 'out.zip')

def test_npz_that_is_not_npz(tmp_path):
    (tmp_path / 'bad.npz').write_bytes(b'garbage')
    expect_error(r"Source '.*bad\.npz' is not a NumPy \.npz archive; save it with numpy\.savez\(path, images=uint8 \[N, H, W\(, C\)\], labels=int \[N\]\)\.",
        f'--source={tmp_path / "bad.npz"}', f'--dest={tmp_path / "out.zip"}')
    np.save(tmp_path / 'one.npy', np.zeros([2, 4, 4], np.uint8)) # An .npy under the name .npz.
    os.replace(tmp_path / 'one.npy', tmp_path / 'one.npz')
    expect_error(r"Source '.*one\.npz' is not a NumPy \.npz archive; save it with numpy\.savez", f'--source={tmp_path / "one.npz"}', f'--dest={tmp_path / "out.zip"}')
    assert sorted(os.listdir(tmp_path)) == ['bad.npz', 'one.npz']

def test_cifar10_tarball_without_batches(tmp_path):
    make_cifar10(tmp_path / 'c.tar.gz', batches=(1, 2))
    expect_error(r"Source '.*c\.tar\.gz' lacks the CIFAR-10 training batches data_batch_1 to 5; pass cifar-10-python\.tar\.gz as downloaded\.",
        f'--source={tmp_path / "c.tar.gz"}', f'--dest={tmp_path / "out.zip"}')

def test_mnist_without_labels_or_with_bad_magic(tmp_path):
    make_mnist(tmp_path / 'm')
    os.remove(tmp_path / 'm' / 'train-labels-idx1-ubyte.gz')
    expect_error(r"MNIST folder '.*m' lacks train-labels-idx1-ubyte\.gz; put it next to train-images-idx3-ubyte\.gz\.", f'--source={tmp_path / "m"}', f'--dest={tmp_path / "out.zip"}')
    write_idx(tmp_path / 'm' / 'train-labels-idx1-ubyte.gz', np.zeros(5, np.uint8), 0x803)
    expect_error(r"MNIST file '.*train-labels-idx1-ubyte\.gz' is not an idx file of 1-D unsigned bytes; download it again\.", f'--source={tmp_path / "m"}', f'--dest={tmp_path / "out.zip"}')

def test_source_without_images(tmp_path):
    make_mnist(tmp_path / 'm', n=0)
    expect_error(r"Source '.*m' holds no images; pass an image or MNIST folder", f'--source={tmp_path / "m"}', f'--dest={tmp_path / "out.zip"}')
    expect_error(r"Source '.*m' holds no images; pass an image or MNIST folder", 'encode', f'--source={tmp_path / "m"}', f'--dest={tmp_path / "out.zip"}', '--device=cpu')
    assert sorted(os.listdir(tmp_path)) == ['m']

def test_dataset_json_missing_a_label(tmp_path):
    save_png(tmp_path / 'src' / 'a.png', np.zeros([4, 4], dtype=np.uint8))
    save_png(tmp_path / 'src' / 'b.png', np.zeros([4, 4], dtype=np.uint8))
    (tmp_path / 'src' / 'dataset.json').write_text(json.dumps({'labels': [['a.png', 1]]}))
    expect_error(r"dataset\.json in '.*src' gives 'b\.png' the label None; give every image a non-negative integer class\.", f'--source={tmp_path / "src"}', f'--dest={tmp_path / "out.zip"}')

def test_unknown_source_kind(tmp_path):
    (tmp_path / 'notes.txt').write_text('hello')
    expect_error(r"Source '.*notes\.txt' is of an unknown kind; pass an image or MNIST folder", f'--source={tmp_path / "notes.txt"}', f'--dest={tmp_path / "out.zip"}')

def test_transform_needs_resolution(tmp_path):
    expect_error(r"--transform=center-crop needs an output size; add --resolution=WxH\.", '--source=digits', f'--dest={tmp_path / "out.zip"}', '--transform=center-crop')
    expect_error(r"--transform=center-crop-wide needs W >= H, not 4x8; use center-crop for tall outputs\.", '--source=digits', f'--dest={tmp_path / "out.zip"}', '--transform=center-crop-wide', '--resolution=4x8')

def test_bad_resolution_string(tmp_path):
    result = run_tool('--source=digits', f'--dest={tmp_path / "out.zip"}', '--resolution=32')
    assert result.exit_code == 2
    assert "'32' is not WxH with positive integers; pass e.g. --resolution=32x32." in result.output

def test_dest_that_cannot_be_created(tmp_path):
    (tmp_path / 'file').write_text('kept')
    expect_error(r"--dest=.*file/out\.zip cannot be created: \".*file\" is a file, not a folder; choose another path\.", '--source=digits', f'--dest={tmp_path / "file" / "out.zip"}')
    assert (tmp_path / 'file').read_text() == 'kept'

def test_max_images_out_of_range(tmp_path):
    result = run_tool('--source=digits', f'--dest={tmp_path / "out.zip"}', '--max-images=0')
    assert result.exit_code == 2 and "Invalid value for '--max-images'" in result.output and 'Traceback' not in result.output
    assert not (tmp_path / 'out.zip').exists()

#----------------------------------------------------------------------------
# encode: EDM2's latent datasets, with a tiny AutoencoderKL saved by the test.

@pytest.fixture(scope='module')
def vae_folder(tmp_path_factory):
    from _tiny_vae import save_tiny_vae # pylint: disable=import-outside-toplevel
    return save_tiny_vae(tmp_path_factory.mktemp('vae') / 'tiny-vae')

def rgb_dataset(path, n=5, size=16):
    images = random_images(n, (size, size, 3), seed=3)
    np.savez(path.parent / 'rgb.npz', images=images, labels=np.arange(n) % 3)
    run_ok(f'--source={path.parent / "rgb.npz"}', f'--dest={path}')
    return images

def test_encode_writes_edm2_latents(tmp_path, vae_folder):
    from _tiny_vae import tiny_vae # pylint: disable=import-outside-toplevel
    import torch # pylint: disable=import-outside-toplevel
    images = rgb_dataset(tmp_path / 'rgb.zip')
    result = run_ok('encode', f'--source={tmp_path / "rgb.zip"}', f'--dest={tmp_path / "latents.zip"}', f'--vae={vae_folder}', '--batch=2', '--device=cpu')
    assert result.stdout.strip().splitlines()[-1] == f'Wrote the latents of 5 images, 8x2x2 each, to {tmp_path / "latents.zip"}'
    names = [f'00000/img-mean-std-{idx:08d}.npy' for idx in range(5)]
    with zipfile.ZipFile(tmp_path / 'latents.zip') as archive:
        assert sorted(archive.namelist()) == [*names, 'dataset.json']
        latents = np.stack([np.load(io.BytesIO(archive.read(name)), allow_pickle=False) for name in names])
        assert json.loads(archive.read('dataset.json'))['labels'] == [[name, idx % 3] for idx, name in enumerate(names)]
    with torch.no_grad():
        dist = tiny_vae().encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)['latent_dist']
    assert latents.dtype == np.float32 and latents.shape == (5, 8, 2, 2)
    np.testing.assert_allclose(latents, torch.cat([dist.mean, dist.std], dim=1).numpy(), rtol=1e-5, atol=1e-6)
    dataset = ImageFolderDataset(path=str(tmp_path / 'latents.zip'), use_labels=True) # As train.py reads it.
    dataset.check_headers()
    assert dataset.is_latent and dataset.image_shape == [8, 2, 2] and dataset.label_dim == 3
    np.testing.assert_array_equal(dataset[4][0], latents[4])
    assert sorted(os.listdir(tmp_path)) == ['latents.zip', 'rgb.npz', 'rgb.zip']

def test_encode_failure_leaves_nothing(tmp_path, vae_folder, monkeypatch):
    rgb_dataset(tmp_path / 'rgb.zip')
    calls = []
    def failing(self, x):
        calls.append(x.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt # As when the user stops it.
        return x.new_zeros([x.shape[0], 8, 2, 2], dtype=torch.float32)
    import torch # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(dataset_tool.encoders.StabilityVAEEncoder, 'encode_pixels', failing)
    result = run_tool('encode', f'--source={tmp_path / "rgb.zip"}', f'--dest={tmp_path / "latents.zip"}', f'--vae={vae_folder}', '--batch=2', '--device=cpu')
    assert result.exit_code != 0 and calls == [2, 2]
    assert sorted(os.listdir(tmp_path)) == ['rgb.npz', 'rgb.zip']

def test_encode_bad_input(tmp_path, vae_folder):
    rgb_dataset(tmp_path / 'rgb.zip')
    expect_error(r'VAE folder ".*missing" does not exist; download it by other means', 'encode', f'--source={tmp_path / "rgb.zip"}', f'--dest={tmp_path / "l.zip"}', f'--vae={tmp_path / "missing"}', '--device=cpu')
    np.savez(tmp_path / 'odd.npz', images=random_images(2, (12, 12, 3)))
    expect_error(r"holds 12x12 images; the VAE needs sizes divisible by 8", 'encode', f'--source={tmp_path / "odd.npz"}', f'--dest={tmp_path / "l.zip"}', f'--vae={vae_folder}')
    np.savez(tmp_path / 'gray.npz', images=random_images(2, (16, 16)))
    expect_error(r"holds grayscale images; the VAE encodes RGB images\.$", 'encode', f'--source={tmp_path / "gray.npz"}', f'--dest={tmp_path / "l.zip"}', f'--vae={vae_folder}')
    assert not (tmp_path / 'l.zip').exists()

#----------------------------------------------------------------------------

"""Tests of training/dataset.py: reading folders and zips in the EDM format."""

import importlib
import io
import json
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

from training.dataset import ImageFolderDataset

#----------------------------------------------------------------------------
# Helpers: datasets written directly with PIL, independent of dataset_tool.py.

def random_images(n, channels=3, height=8, width=8, seed=0):
    shape = [n, height, width] + ([channels] if channels == 3 else [])
    return np.random.RandomState(seed).randint(0, 256, size=shape, dtype=np.uint8)

def png_bytes(image, fmt='png'):
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format=fmt, **({'quality': 95} if fmt == 'jpeg' else {}))
    return buffer.getvalue()

def make_files(images, labels=None, no_json=False, fmt='png'):
    """Mapping of file name to bytes: images in 00000/ plus dataset.json."""
    ext = 'jpg' if fmt == 'jpeg' else 'png'
    names = [f'00000/img{i:08d}.{ext}' for i in range(len(images))]
    files = {name: png_bytes(image, fmt) for name, image in zip(names, images)}
    if not no_json:
        entries = None if labels is None else [[name, int(label)] for name, label in zip(names, labels)]
        files['dataset.json'] = json.dumps({'labels': entries}).encode()
    return files

def write_folder(path, files):
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        with open(os.path.join(path, name), 'wb') as f:
            f.write(data)
    return str(path)

def write_zip(path, files):
    with zipfile.ZipFile(path, 'w') as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return str(path)

#----------------------------------------------------------------------------
# Reading.

@pytest.mark.parametrize('container', ['folder', 'zip'])
def test_reads_images_and_onehot_labels(tmp_path, container):
    images = random_images(5)
    labels = [2, 0, 1, 2, 0]
    files = make_files(images, labels)
    path = write_folder(tmp_path / 'data', files) if container == 'folder' else write_zip(tmp_path / 'data.zip', files)
    dataset = ImageFolderDataset(path=path, use_labels=True)
    assert len(dataset) == 5
    assert dataset.name == 'data'
    assert dataset.image_shape == [3, 8, 8]
    assert dataset.num_channels == 3 and dataset.resolution == 8
    assert dataset.label_dim == 3
    for i in range(5):
        image, label = dataset[i]
        assert image.dtype == np.uint8 and image.shape == (3, 8, 8)
        np.testing.assert_array_equal(image, images[i].transpose(2, 0, 1))
        assert label.dtype == np.float32
        np.testing.assert_array_equal(label, np.eye(3, dtype=np.float32)[labels[i]])
        np.testing.assert_array_equal(dataset.get_label(i), label)

def test_without_labels_gives_empty_labels(tmp_path):
    path = write_folder(tmp_path / 'data', make_files(random_images(3), labels=[0, 1, 1]))
    dataset = ImageFolderDataset(path=path)
    assert dataset.label_dim == 0
    _image, label = dataset[0]
    assert label.shape == (0,) and label.dtype == np.float32

def test_grayscale_stays_single_channel(tmp_path):
    images = random_images(4, channels=1, height=6, width=6)
    dataset = ImageFolderDataset(path=write_zip(tmp_path / 'gray.zip', make_files(images)))
    assert dataset.image_shape == [1, 6, 6]
    np.testing.assert_array_equal(dataset[2][0], images[2][np.newaxis])

def test_jpeg_images(tmp_path):
    images = np.full([2, 8, 8, 3], 200, dtype=np.uint8)
    dataset = ImageFolderDataset(path=write_folder(tmp_path / 'jpg', make_files(images, fmt='jpeg')))
    assert dataset.image_shape == [3, 8, 8]
    assert np.abs(dataset[1][0].astype(int) - 200).max() <= 2

def test_xflip_doubles_and_mirrors(tmp_path):
    images = random_images(3)
    dataset = ImageFolderDataset(path=write_zip(tmp_path / 'd.zip', make_files(images, [0, 1, 2])), use_labels=True, xflip=True)
    assert len(dataset) == 6
    for i in range(3):
        plain, label = dataset[i]
        flipped, flipped_label = dataset[i + 3]
        np.testing.assert_array_equal(flipped, plain[:, :, ::-1])
        np.testing.assert_array_equal(flipped_label, label)
        assert flipped.flags['C_CONTIGUOUS']
        assert not dataset.get_details(i).xflip and dataset.get_details(i + 3).xflip
        assert dataset.get_details(i + 3).raw_idx == i
        np.testing.assert_array_equal(dataset.get_details(i + 3).raw_label, label)

def test_max_size_picks_a_seeded_subset(tmp_path):
    images = random_images(20)
    path = write_zip(tmp_path / 'd.zip', make_files(images))
    picks = lambda seed: [ImageFolderDataset(path=path, max_size=5, random_seed=seed).get_details(i).raw_idx for i in range(5)]
    first = picks(0)
    assert first == sorted(first) and len(set(first)) == 5
    assert picks(0) == first
    assert picks(1) != first
    dataset = ImageFolderDataset(path=path, max_size=5, random_seed=0)
    assert len(dataset) == 5
    np.testing.assert_array_equal(dataset[3][0], images[first[3]].transpose(2, 0, 1))
    assert len(ImageFolderDataset(path=path, max_size=100)) == 20

def test_cache_keeps_decoded_images(tmp_path):
    images = random_images(2)
    path = write_folder(tmp_path / 'data', make_files(images))
    dataset = ImageFolderDataset(path=path, cache=True)
    first = dataset[0][0]
    os.remove(os.path.join(path, '00000/img00000000.png'))
    np.testing.assert_array_equal(dataset[0][0], first)
    uncached = ImageFolderDataset(path=write_folder(tmp_path / 'other', make_files(images)))
    os.remove(os.path.join(tmp_path / 'other', '00000/img00000000.png'))
    with pytest.raises(ValueError, match='cannot be read'):
        uncached[0]

def test_constructible_by_class_name_and_picklable(tmp_path):
    images = random_images(6)
    path = write_zip(tmp_path / 'd.zip', make_files(images, [0, 1, 0, 1, 0, 1]))
    module_name, class_name = 'training.dataset.ImageFolderDataset'.rsplit('.', 1)
    kwargs = dict(path=path, use_labels=True, xflip=False, max_size=None, random_seed=0, cache=False, resolution=8)
    dataset = getattr(importlib.import_module(module_name), class_name)(**kwargs)
    dataset[0]
    clone = pickle.loads(pickle.dumps(dataset))
    for i in range(6):
        np.testing.assert_array_equal(clone[i][0], dataset[i][0])
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=1, multiprocessing_context='spawn')
    batches = list(loader)
    assert [tuple(b[0].shape) for b in batches] == [(3, 3, 8, 8)] * 2
    np.testing.assert_array_equal(torch.cat([b[0] for b in batches]).numpy(), images.transpose(0, 3, 1, 2))
    assert torch.cat([b[1] for b in batches]).argmax(1).tolist() == [0, 1, 0, 1, 0, 1]

def test_forked_workers_read_the_zip_correctly(tmp_path):
    images = random_images(64)
    dataset = ImageFolderDataset(path=write_zip(tmp_path / 'd.zip', make_files(images)))
    dataset[0]
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, multiprocessing_context='fork')
    np.testing.assert_array_equal(torch.cat([image for image, _label in loader]).numpy(), images.transpose(0, 3, 1, 2))

#----------------------------------------------------------------------------
# Bad input: one ValueError sentence that names the value and the fix.

def test_missing_path(tmp_path):
    path = str(tmp_path / 'nowhere.zip')
    with pytest.raises(ValueError, match=r"Dataset path '.*nowhere\.zip' does not exist; pass a folder or \.zip made by dataset_tool\.py\."):
        ImageFolderDataset(path=path)

def test_unreadable_zip(tmp_path):
    path = tmp_path / 'broken.zip'
    path.write_bytes(b'this is not a zip archive')
    with pytest.raises(ValueError, match=r"Dataset path '.*broken\.zip' is neither a folder nor a readable zip archive; pass a folder or \.zip"):
        ImageFolderDataset(path=str(path))

def test_zip_without_images(tmp_path):
    path = write_zip(tmp_path / 'empty.zip', {'notes.txt': b'hello', 'dataset.json': b'{"labels": null}'})
    with pytest.raises(ValueError, match=r"Dataset path '.*empty\.zip' holds no PNG or JPEG images; pass a folder or \.zip made by dataset_tool\.py\."):
        ImageFolderDataset(path=path)

@pytest.mark.parametrize('no_json', [True, False])
def test_use_labels_without_labels(tmp_path, no_json):
    path = write_zip(tmp_path / 'unlabeled.zip', make_files(random_images(2), labels=None, no_json=no_json))
    with pytest.raises(ValueError, match=r"Dataset 'unlabeled' has no labels; pass use_labels=False or rebuild the dataset with dataset_tool\.py with labels\."):
        ImageFolderDataset(path=path, use_labels=True)

def test_label_missing_for_an_image(tmp_path):
    files = make_files(random_images(2), labels=[0, 1])
    files['dataset.json'] = json.dumps({'labels': [['00000/img00000000.png', 0]]}).encode()
    with pytest.raises(ValueError, match=r"has no label for '00000/img00000001\.png'; add one or rebuild"):
        ImageFolderDataset(path=write_zip(tmp_path / 'd.zip', files), use_labels=True)

def test_wrong_resolution(tmp_path):
    path = write_zip(tmp_path / 'd.zip', make_files(random_images(2)))
    with pytest.raises(ValueError, match=r"has 8x8 images, not resolution=16; pass resolution=8 or rebuild the dataset with dataset_tool\.py at 16x16\."):
        ImageFolderDataset(path=path, resolution=16)

def test_mixed_resolutions(tmp_path):
    files = make_files(random_images(1, height=8, width=8))
    files.update({'00000/img00000001.png': png_bytes(random_images(1, height=4, width=4)[0])})
    dataset = ImageFolderDataset(path=write_folder(tmp_path / 'mixed', files))
    dataset[0]
    with pytest.raises(ValueError, match=r"Image '00000/img00000001\.png' in '.*mixed' has shape \[3, 4, 4\], not \[3, 8, 8\] like the first; resize all images to one size with dataset_tool\.py\."):
        dataset[1]

def test_non_square_resolution(tmp_path):
    dataset = ImageFolderDataset(path=write_zip(tmp_path / 'wide.zip', make_files(random_images(1, height=4, width=8))))
    assert dataset.image_shape == [3, 4, 8]
    with pytest.raises(ValueError, match=r"Dataset 'wide' has non-square 8x4 images; rebuild it square with dataset_tool.py\."):
        dataset.resolution

def test_bad_max_size(tmp_path):
    path = write_zip(tmp_path / 'd.zip', make_files(random_images(2)))
    with pytest.raises(AssertionError):
        ImageFolderDataset(path=path, max_size=0)

#----------------------------------------------------------------------------
# EDM2's latent datasets: one float32 .npy [C, H, W] per image.

def write_latent_zip(path, latents, labels=None, extra=()):
    with zipfile.ZipFile(path, 'w') as archive:
        names = []
        for idx, latent in enumerate(latents):
            buffer = io.BytesIO()
            np.save(buffer, latent)
            names.append(f'{idx // 1000:05d}/img-mean-std-{idx:08d}.npy')
            archive.writestr(names[-1], buffer.getvalue())
        archive.writestr('dataset.json', json.dumps({'labels': None if labels is None else [[n, l] for n, l in zip(names, labels)]}))
        for name, data in extra:
            archive.writestr(name, data)
    return str(path)

def test_latent_dataset(tmp_path):
    latents = np.random.default_rng(0).standard_normal([4, 8, 2, 3]).astype(np.float32)
    dataset = ImageFolderDataset(path=write_latent_zip(tmp_path / 'latents.zip', latents, labels=[2, 0, 1, 2]), use_labels=True)
    dataset.check_headers()
    assert dataset.is_latent and len(dataset) == 4 and dataset.image_shape == [8, 2, 3] and dataset.label_dim == 3
    for idx in range(4):
        image, label = dataset[idx]
        assert image.dtype == np.float32
        np.testing.assert_array_equal(image, latents[idx])
        assert label.argmax() == [2, 0, 1, 2][idx]

def test_latent_dataset_mistakes(tmp_path):
    latents = [np.zeros([8, 2, 2], np.float32), np.zeros([8, 4, 4], np.float32)]
    dataset = ImageFolderDataset(path=write_latent_zip(tmp_path / 'mixed.zip', latents))
    with pytest.raises(ValueError, match=r"Latents '00000/img-mean-std-00000001.npy' in .* are float32 \[8, 4, 4\], the first float \[8, 2, 2\]; rebuild"):
        dataset.check_headers()
    png = io.BytesIO()
    PIL.Image.fromarray(np.zeros([2, 2], np.uint8)).save(png, format='png')
    with pytest.raises(ValueError, match=r"holds both images \('x.png'\) and latents \('00000/img-mean-std-00000000.npy'\); keep one kind per dataset"):
        ImageFolderDataset(path=write_latent_zip(tmp_path / 'both.zip', latents[:1], extra=[('x.png', png.getvalue())]))
    both = write_latent_zip(tmp_path / 'both.zip', latents[:1], extra=[('x.png', png.getvalue())]) # As generate.py --save_latents writes.
    assert ImageFolderDataset(path=both, kind='images')._image_fnames == ['x.png']
    assert not ImageFolderDataset(path=both, kind='images').is_latent and ImageFolderDataset(path=both, kind='latents').is_latent
    with pytest.raises(ValueError, match=r"holds no \.npy latents"):
        ImageFolderDataset(path=write_latent_zip(tmp_path / 'png.zip', [], extra=[('x.png', png.getvalue())]), kind='latents')
    with pytest.raises(AssertionError):
        ImageFolderDataset(path=both, kind='pngs')

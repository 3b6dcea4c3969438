"""training/augment.py: EDM's augmentation pipeline and the layout of its augment_labels."""

import pickle

import pytest
import torch

from training.augment import AugmentPipe

# The augmentation settings of EDM's train.py (--augment=P); they give 9 labels.
TRAIN_PRESET = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

def blob_images(n, size=32, offset=(0.0, 0.0), std=2.5):
    """n copies of a Gaussian blob, displaced by `offset` (x, y) pixels from the image center."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing='ij')
    c = (size - 1) / 2
    img = torch.exp(-((xx - c - offset[0]) ** 2 + (yy - c - offset[1]) ** 2) / (2 * std ** 2))
    return img.expand(n, 1, size, size).contiguous()

def centroid_offsets(images):
    """Blob centroid relative to the image center, [N, 2] as (x, y) in pixels."""
    size = images.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing='ij')
    mass = images.sum(dim=(1, 2, 3))
    c = (size - 1) / 2
    return torch.stack([(images * xx).sum(dim=(1, 2, 3)) / mass - c, (images * yy).sum(dim=(1, 2, 3)) / mass - c], dim=1)

def test_probability_zero_is_identity_with_zero_labels():
    torch.manual_seed(0)
    images = torch.randn([8, 3, 16, 16])
    out, labels = AugmentPipe(p=0, **TRAIN_PRESET)(images)
    assert labels.shape == (8, 9) and labels.dtype == torch.float32
    assert torch.equal(labels, torch.zeros_like(labels))
    # The geometric branch still resamples (up, identity warp, down through sym6), which is exact up to rounding.
    assert torch.allclose(out, images, atol=1e-5)
    # Pixel blitting alone is exact.
    out, labels = AugmentPipe(p=0, xflip=1, yflip=1, rotate_int=1, translate_int=1)(images)
    assert torch.equal(out, images) and torch.equal(labels, torch.zeros([8, 6]))

def test_defaults_disable_everything():
    images = torch.randn([4, 3, 8, 8])
    out, labels = AugmentPipe()(images)
    assert torch.equal(out, images) and labels.shape == (4, 0)

@pytest.mark.parametrize('axis, kwargs', [(3, dict(xflip=1)), (2, dict(yflip=1))])
def test_flip_only_flips_exactly_the_labelled_images(axis, kwargs):
    torch.manual_seed(1)
    images = torch.randn([64, 3, 8, 8])
    out, labels = AugmentPipe(**kwargs)(images)
    assert labels.shape == (64, 1)
    flipped = labels[:, 0] == 1
    assert set(labels[:, 0].tolist()) == {0.0, 1.0}
    assert torch.equal(out[flipped], images[flipped].flip(axis))
    assert torch.equal(out[~flipped], images[~flipped])

def test_same_seed_same_result():
    images = torch.randn([8, 3, 16, 16])
    pipe = AugmentPipe(p=0.7, **TRAIN_PRESET)
    torch.manual_seed(123)
    a = pipe(images)
    torch.manual_seed(123)
    b = pipe(images)
    torch.manual_seed(124)
    c = pipe(images)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])

def test_train_preset_label_layout():
    torch.manual_seed(2)
    _, labels = AugmentPipe(p=1, **TRAIN_PRESET)(torch.randn([256, 3, 8, 8]))
    assert labels.shape == (256, 9)
    assert set(labels[:, 0].tolist()) == {0.0, 1.0}                     # x-flip
    assert set(labels[:, 1].tolist()) == {0.0, 1.0}                     # y-flip
    assert torch.allclose((labels[:, 3] + 1) ** 2 + labels[:, 4] ** 2, torch.ones(256), atol=1e-5) # cos - 1, sin
    # Anisotropy vector w (cos r, sin r): r = 0 for about half of the images.
    assert 0.3 < (labels[:, 6] == 0).float().mean().item() < 0.7

def test_translation_label_is_the_pixel_shift():
    torch.manual_seed(3)
    pipe = AugmentPipe(translate_frac=1, translate_frac_std=0.05)
    images = blob_images(16)
    out, labels = pipe(images)
    expected = labels * 32 * 0.05                                       # Shift of the content by (+tx, +ty).
    assert torch.allclose(centroid_offsets(out), expected, atol=0.05)

def test_rotation_label_is_the_angle():
    torch.manual_seed(4)
    d = 6.0
    out, labels = AugmentPipe(rotate_frac=1)(blob_images(16, size=48, offset=(d, 0)))
    cos, sin = labels[:, 0] + 1, labels[:, 1]
    expected = torch.stack([d * cos, -d * sin], dim=1)                  # Counter-clockwise on screen (y points down).
    # sym6 is not linear-phase: the centre of rotation sits about 0.05 px off the image centre.
    assert torch.allclose(centroid_offsets(out), expected, atol=0.15)

def test_scale_label_is_log2_scale():
    torch.manual_seed(5)
    d = 4.0
    out, labels = AugmentPipe(scale=1)(blob_images(16, offset=(d, 0)))
    s = torch.exp2(labels[:, 0] * 0.2)
    assert torch.allclose(centroid_offsets(out)[:, 0], d * s, atol=0.05)

def test_geometric_warps_preserve_a_constant_image():
    torch.manual_seed(6)
    images = torch.full([8, 3, 16, 16], 0.7)
    out, _ = AugmentPipe(p=1, **TRAIN_PRESET)(images)
    assert torch.allclose(out, images, atol=1e-4)

def test_color_labels_closed_form():
    torch.manual_seed(7)
    images = torch.rand([16, 3, 8, 8])
    out, labels = AugmentPipe(brightness=1)(images)
    assert torch.allclose(out, images + 0.2 * labels[:, 0].reshape(-1, 1, 1, 1), atol=1e-6)
    out, labels = AugmentPipe(contrast=1)(images)
    assert torch.allclose(out, images * torch.exp2(0.5 * labels[:, 0]).reshape(-1, 1, 1, 1), atol=1e-5)

def test_grayscale_and_channel_errors():
    torch.manual_seed(8)
    out, labels = AugmentPipe(p=1, brightness=1, **TRAIN_PRESET)(torch.randn([4, 1, 8, 8]))
    assert out.shape == (4, 1, 8, 8) and labels.shape == (4, 10)
    with pytest.raises(ValueError, match='2 channels'):
        AugmentPipe(brightness=1)(torch.randn([4, 2, 8, 8]))

def test_pickle_round_trip():
    pipe = AugmentPipe(p=0.12, **TRAIN_PRESET)
    copy = pickle.loads(pickle.dumps(pipe))
    assert type(copy).__name__ == 'AugmentPipe'
    assert copy.p == pytest.approx(0.12) and copy.xflip == 1e8
    images = torch.randn([4, 3, 8, 8])
    torch.manual_seed(9)
    a = pipe(images)
    torch.manual_seed(9)
    b = copy(images)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

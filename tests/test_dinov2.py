"""The DINOv2 detector: EDM2's preprocessing (resize to 224x224, ImageNet
normalization) on its own, and the vision transformer built from a state dict
in the published layout."""

import numpy as np
import PIL.Image
import pytest
import torch

from training import dinov2, metrics

from _vit_standin import standin_state_dict

MEAN = np.array([0.485, 0.456, 0.406]) # ImageNet's, as DINOv2 and EDM2 normalize.
STD = np.array([0.229, 0.224, 0.225])

class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x)
        return x.mean((2, 3))

#----------------------------------------------------------------------------
# Preprocessing.

def test_preprocessing_normalizes_with_imagenet_statistics():
    det = metrics.DINOv2Detector(Recorder())
    constant = torch.tensor([0, 128, 255], dtype=torch.uint8).reshape(1, 3, 1, 1).expand(2, 3, 32, 48)
    x = det.preprocess(constant)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 224, 224)
    expected = (np.array([0, 128, 255]) / 255 - MEAN) / STD
    np.testing.assert_allclose(x.mean((0, 2, 3)).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(x.std((0, 2, 3)).numpy(), 0, atol=1e-5)

    images = torch.randint(0, 256, [2, 3, 224, 224], dtype=torch.uint8, generator=torch.Generator().manual_seed(0)) # Already 224x224: not resampled.
    expected = (images.double().numpy() / 255 - MEAN[:, None, None]) / STD[:, None, None]
    np.testing.assert_allclose(det.preprocess(images).double().numpy(), expected, rtol=1e-5, atol=1e-5)

def test_resize_is_close_to_pils_bicubic():
    # EDM2 resizes with torch's antialiased bicubic, "almost the same" as the PIL resize of dgm-eval.
    yy, xx = np.mgrid[0:64, 0:64]
    smooth = np.stack([128 + 100 * np.sin(xx / 7), 128 + 100 * np.cos(yy / 5), 128 + 60 * np.sin((xx + yy) / 9)], axis=-1).astype(np.uint8)
    pil = np.asarray(PIL.Image.fromarray(smooth).resize((224, 224), PIL.Image.Resampling.BICUBIC), dtype=np.float64)
    det = metrics.DINOv2Detector(Recorder())
    ours = det.preprocess(torch.from_numpy(smooth).permute(2, 0, 1)[None]).double().numpy()[0]
    ours = (ours * STD[:, None, None] + MEAN[:, None, None]) * 255
    assert np.abs(ours.transpose(1, 2, 0) - pil).mean() < 1.0

def test_detector_feeds_the_network_and_repeats_grayscale():
    recorder = Recorder()
    det = metrics.Detector(metrics.DINOV2_NAME, metrics.DINOv2Detector(recorder), 'cpu')
    assert det.label == 'FD-DINOv2' and det.key == 'fd_dinov2' and det.feature_label == 'DINOv2'
    features = det(torch.full([3, 1, 16, 16], 255, dtype=torch.uint8))
    assert features.shape == (3, 3) and recorder.seen[0].shape == (3, 3, 224, 224)
    np.testing.assert_allclose(features.numpy(), np.tile((1 - MEAN) / STD, [3, 1]), rtol=1e-5)

#----------------------------------------------------------------------------
# The vision transformer.

def test_vit_from_a_state_dict_in_the_published_layout():
    state = standin_state_dict(dim=128, depth=3, hidden=200, grid=5)
    net = dinov2.from_state_dict(state)
    assert len(net.blocks) == 3 and net.blocks[0].attn.num_heads == 2 and net.patch_size == 14 # DINOv2's heads of 64 channels.
    assert not any(p.requires_grad for p in net.parameters()) and not net.training
    x = torch.randn([2, 3, 70, 70]) # A 5x5 patch grid: the stored embedding as it is.
    assert torch.equal(net.position_embedding(5, 5), state['pos_embed'])
    assert net.position_embedding(16, 16).shape == (1, 257, 128)
    features = net(x)
    assert features.shape == (2, 128)
    # The features are the class token after the final LayerNorm: with weight w and bias b they have mean mean(b).
    np.testing.assert_allclose(((features - state['norm.bias']) / state['norm.weight']).mean(1).numpy(), 0, atol=1e-4)

def test_state_dict_that_is_not_dinov2():
    state = standin_state_dict()
    del state['norm.weight']
    with pytest.raises(ValueError, match=r'^weights.pth is not the state dict of a DINOv2 vision transformer \(RuntimeError: .*\); pass the published dinov2_vitl14_pretrain.pth.$'):
        dinov2.from_state_dict(state, name='weights.pth')
    with pytest.raises(ValueError, match=r'\(KeyError: '):
        dinov2.from_state_dict(dict(a=torch.zeros(1)), name='x')

#----------------------------------------------------------------------------

"""training/encoders.py: EDM2's latent normalisation against the constants of
the EDM2 reference README, the VAE through a tiny diffusers AutoencoderKL
the tests build and save, the RGB encoder, pickling, and a VAE that cannot be
found."""

import pickle

import numpy as np
import pytest
import torch

import dnnlib
from training import encoders

from _tiny_vae import save_tiny_vae, tiny_vae

# EDM2's normalisation of the sd-vae-ft-mse latents of ImageNet-512 (shared/fixtures/edm2_reference/README.md):
# raw mean and std per channel, mapped to mean 0 and std 0.5.
README_RAW_MEAN = np.array([5.81, 3.25, 0.12, -2.15])
README_RAW_STD = np.array([4.17, 4.62, 3.71, 3.28])
README_FINAL_STD = 0.5

@pytest.fixture(scope='module')
def vae_folder(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp('vae') / 'tiny-vae')

class RecordingVAE:
    """Decodes to a constant image and records the raw latents it is given."""
    def __init__(self):
        self.seen = []

    def to(self, _device):
        return self

    def decode(self, z):
        self.seen.append(z.clone())
        return dict(sample=torch.full([z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8], 0.5))

#----------------------------------------------------------------------------
# Must show 2: the normalisation.

def test_latent_normalisation_is_edm2s():
    enc = encoders.StabilityVAEEncoder()
    rng = np.random.default_rng(0)
    mean = rng.normal(README_RAW_MEAN[:, None, None], README_RAW_STD[:, None, None], [3, 4, 5, 6])
    raw = torch.tensor(np.concatenate([mean, np.zeros_like(mean)], axis=1), dtype=torch.float32) # std 0: the draw is the mean.
    final = enc.encode_latents(raw).double().numpy()
    expected = (mean - README_RAW_MEAN[:, None, None]) / README_RAW_STD[:, None, None] * README_FINAL_STD
    np.testing.assert_allclose(final, expected, rtol=1e-5, atol=1e-5)

    enc._vae = RecordingVAE() # pylint: disable=protected-access
    images = enc.decode(torch.tensor(final, dtype=torch.float32))
    assert images.dtype == torch.uint8 and images.shape == (3, 3, 40, 48) and (images == 127).all() # 0.5 * 255, truncated.
    np.testing.assert_allclose(enc._vae.seen[0].double().numpy(), mean, rtol=1e-5, atol=1e-4) # pylint: disable=protected-access

def test_final_latents_are_draws_of_the_posterior():
    enc = encoders.StabilityVAEEncoder()
    torch.manual_seed(0)
    mean = torch.tensor(README_RAW_MEAN, dtype=torch.float32).reshape(1, 4, 1, 1).expand(1, 4, 200, 200)
    std = torch.tensor(README_RAW_STD, dtype=torch.float32).reshape(1, 4, 1, 1).expand(1, 4, 200, 200)
    final = enc.encode_latents(torch.cat([mean, std], dim=1)) # Data with the raw statistics: final mean 0, std 0.5.
    np.testing.assert_allclose(final.mean((0, 2, 3)).numpy(), 0, atol=0.01)
    np.testing.assert_allclose(final.std((0, 2, 3)).numpy(), README_FINAL_STD, rtol=0.01)

def test_rgb_encoder():
    enc = encoders.StandardRGBEncoder()
    pixels = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).repeat(1, 3, 1, 1)
    x = enc.encode(pixels)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.equal(enc.decode(x), pixels)

#----------------------------------------------------------------------------
# The VAE through diffusers.

def test_vae_from_a_local_folder(vae_folder):
    enc = encoders.StabilityVAEEncoder(vae_name=vae_folder, batch_size=3)
    pixels = torch.randint(0, 256, [5, 3, 16, 16], dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    raw = enc.encode_pixels(pixels)
    assert raw.shape == (5, 8, 2, 2)
    with torch.no_grad():
        dist = tiny_vae().encode(pixels.float() / 255)['latent_dist'] # EDM2 feeds the VAE pixels in [0, 1].
    torch.testing.assert_close(raw, torch.cat([dist.mean, dist.std], dim=1), rtol=1e-5, atol=1e-6)
    images = enc.decode(enc.encode_latents(raw))
    assert images.dtype == torch.uint8 and images.shape == (5, 3, 16, 16)

    again = pickle.loads(pickle.dumps(enc))
    assert again._vae is None and again.vae_name == vae_folder # pylint: disable=protected-access
    np.testing.assert_array_equal(again.scale, enc.scale)

def test_edm2_class_paths_build_edm2s_encoders():
    enc = dnnlib.util.construct_class_by_name(class_name='training.encoders.StabilityVAEEncoder')
    assert enc.vae_name == 'stabilityai/sd-vae-ft-mse' and enc._vae is None # pylint: disable=protected-access
    np.testing.assert_allclose(enc.scale, README_FINAL_STD / README_RAW_STD, rtol=1e-6)
    np.testing.assert_allclose(enc.bias, -README_RAW_MEAN * README_FINAL_STD / README_RAW_STD, rtol=1e-6)
    rgb = dnnlib.util.construct_class_by_name(class_name='training.encoders.StandardRGBEncoder')
    assert type(pickle.loads(pickle.dumps(rgb))).__name__ == 'StandardRGBEncoder'

#----------------------------------------------------------------------------
# Bad input.

def test_vae_that_cannot_be_found(tmp_path, monkeypatch):
    import huggingface_hub.constants # pylint: disable=import-outside-toplevel
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True) # As without a network, but at once.
    with pytest.raises(ValueError) as info:
        encoders.load_vae('no-such-user/no-such-vae', cache_dir=str(tmp_path / 'cache'))
    message = str(info.value)
    assert message.startswith(f'VAE "no-such-user/no-such-vae" is not in the cache "{tmp_path / "cache"}" and could not be fetched from the Hugging Face hub (')
    assert message.endswith('and pass the folder that holds its config.json.') and '\n' not in message
    with pytest.raises(ValueError, match=r'VAE folder ".*missing" does not exist; download it by other means'):
        encoders.load_vae(str(tmp_path / 'missing'))
    with pytest.raises(ValueError, match=r'VAE folder ".*" holds no config.json; pass a folder written by AutoencoderKL.save_pretrained\(\)'):
        encoders.load_vae(str(tmp_path))

#----------------------------------------------------------------------------

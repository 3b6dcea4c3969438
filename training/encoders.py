"""Pixels <-> the representation the network works in, with EDM2's interface.

Raw pixels (uint8 [N, 3, H, W]) are encoded into raw latents, which is what a
dataset stores, and raw latents into final latents, which the network sees;
decoding goes from final latents straight back to raw pixels.
`StandardRGBEncoder` scales pixels to [-1, 1] (EDM, EDM2-img64);
`StabilityVAEEncoder` runs Stability AI's VAE through diffusers'
`AutoencoderKL` and normalizes its latents per channel as EDM2 does. The
classes, their names and constructor keywords are those of EDM2's
`training/encoders.py`, so that `training.encoders.StabilityVAEEncoder` in
EDM2's options builds the same encoder; a VAE is loaded on first use and
never pickled.
"""

import os

import numpy as np
import torch

import dnnlib
from torch_utils import misc
from torch_utils import persistence

VAE_NAME = 'stabilityai/sd-vae-ft-mse'  # The VAE of EDM2's ImageNet-512 models.
RAW_MEAN = [5.81, 3.25, 0.12, -2.15]    # EDM2's per-channel mean of its raw latents.
RAW_STD = [4.17, 4.62, 3.71, 3.28]      # EDM2's per-channel standard deviation of its raw latents.
LATENT_CHANNELS = 4                     # Channels of the VAE's final latents (a network of these works on latents).

#----------------------------------------------------------------------------

@persistence.persistent_class
class Encoder:
    """Base class of EDM2's encoder interface (kept under EDM2's class path, which its
    snapshots name): encode = encode_latents(encode_pixels(x)); init(device) loads what
    is lazy. Every subclass implements the three conversions."""

    def __init__(self):
        pass

    def init(self, device): # Load lazily created parts now.
        pass

    def __getstate__(self):
        return self.__dict__

    def encode(self, x): # Raw pixels => final latents.
        return self.encode_latents(self.encode_pixels(x))

    def encode_pixels(self, x): # Raw pixels => raw latents.
        raise NotImplementedError

    def encode_latents(self, x): # Raw latents => final latents.
        raise NotImplementedError

    def decode(self, x): # Final latents => raw pixels.
        raise NotImplementedError

#----------------------------------------------------------------------------

@persistence.persistent_class
class StandardRGBEncoder(Encoder):
    """Pixels scaled to [-1, 1]; raw latents are the uint8 pixels themselves."""

    def __init__(self):
        super().__init__()

    def encode_pixels(self, x):
        return x

    def encode_latents(self, x):
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x):
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

#----------------------------------------------------------------------------

@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    """Stability AI's VAE. Raw latents are the posterior's mean and standard
    deviation (2 x 4 channels at 1/8 of the resolution); final latents are a
    draw from it, scaled by final_std / raw_std and shifted so that the
    assumed raw mean maps to final_mean."""

    def __init__(self,
        vae_name    = VAE_NAME, # Hugging Face hub name or local folder of a diffusers AutoencoderKL.
        raw_mean    = RAW_MEAN, # Assumed mean of the raw latents, per channel.
        raw_std     = RAW_STD,  # Assumed standard deviation of the raw latents, per channel.
        final_mean  = 0,        # Mean of the final latents.
        final_std   = 0.5,      # Standard deviation of the final latents.
        batch_size  = 8,        # Images per VAE call.
    ):
        super().__init__()
        self.vae_name = vae_name
        self.scale = np.float32(final_std) / np.float32(raw_std)
        self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale
        self.batch_size = int(batch_size)
        self._vae = None

    def init(self, device):
        super().init(device)
        if self._vae is None:
            self._vae = load_vae(self.vae_name, device=device)
        else:
            self._vae.to(device)

    def __getstate__(self):
        return dict(super().__getstate__(), _vae=None) # The VAE is loaded again, never pickled.

    def encode_pixels(self, x):
        self.init(x.device)
        x = x.to(torch.float32) / 255
        out = []
        for batch in x.split(self.batch_size):
            dist = self._vae.encode(batch)['latent_dist']
            out.append(torch.cat([dist.mean, dist.std], dim=1))
        return torch.cat(out)

    def encode_latents(self, x):
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        x = mean + torch.randn_like(mean) * std
        return x * misc.const_like(x, self.scale).reshape(1, -1, 1, 1) + misc.const_like(x, self.bias).reshape(1, -1, 1, 1)

    def decode(self, x):
        self.init(x.device)
        x = x.to(torch.float32)
        x = (x - misc.const_like(x, self.bias).reshape(1, -1, 1, 1)) / misc.const_like(x, self.scale).reshape(1, -1, 1, 1)
        x = torch.cat([self._vae.decode(batch)['sample'] for batch in x.split(self.batch_size)])
        return x.clamp(0, 1).mul(255).to(torch.uint8)

#----------------------------------------------------------------------------
# The encoder of a dataset or a snapshot.

def describe(encoder):
    """The `encoder` entry that dataset_tool.py encode writes into dataset.json:
    the class and the VAE (a local folder as an absolute path)."""
    vae_name = os.path.abspath(encoder.vae_name) if os.path.isdir(encoder.vae_name) else encoder.vae_name
    return dict(class_name='training.encoders.StabilityVAEEncoder', vae_name=vae_name)

def dataset_encoder(dataset_obj, vae_name=None):
    """The encoder of a dataset: pixels for images; for raw latents (.npy) the VAE
    `vae_name`, else the one its dataset.json records, else EDM2's."""
    if not getattr(dataset_obj, 'is_latent', False):
        if vae_name is not None:
            raise ValueError(f'--vae={vae_name} applies to latent datasets, but --data holds images; leave --vae out.')
        return StandardRGBEncoder()
    recorded = getattr(dataset_obj, 'encoder_kwargs', None) or {}
    if recorded.get('class_name', 'training.encoders.StabilityVAEEncoder') != 'training.encoders.StabilityVAEEncoder':
        raise ValueError(f'The dataset.json of --data records the encoder "{recorded["class_name"]}", which is not training.encoders.StabilityVAEEncoder; rebuild it with dataset_tool.py encode.')
    return StabilityVAEEncoder(vae_name=(vae_name or recorded.get('vae_name') or VAE_NAME))

def is_latent(encoder):
    """True for an encoder of latents (a snapshot entry of any class but StandardRGBEncoder):
    samples are decoded through it rather than clipped to [-1, 1]."""
    return encoder is not None and type(encoder).__name__ != 'StandardRGBEncoder'

#----------------------------------------------------------------------------

def load_vae(
    vae_name    = VAE_NAME,         # Hugging Face hub name or local folder of a diffusers AutoencoderKL.
    device      = 'cpu',            # Device to move it to.
    cache_dir   = None,             # Download cache, None = dnnlib's cache folder 'diffusers'.
):
    """A diffusers AutoencoderKL in evaluation mode: from a local folder, the
    download cache, or the hub (downloaded once into the cache)."""
    import diffusers # pylint: disable=import-outside-toplevel
    cache_dir = dnnlib.make_cache_dir_path('diffusers') if cache_dir is None else cache_dir
    fix = f'download it by other means (e.g. "hf download {vae_name}") and pass the folder that holds its config.json'
    if os.path.isdir(vae_name):
        if not os.path.isfile(os.path.join(vae_name, 'config.json')):
            raise ValueError(f'VAE folder "{vae_name}" holds no config.json; pass a folder written by AutoencoderKL.save_pretrained() or a hub name such as "{VAE_NAME}".')
        vae = diffusers.AutoencoderKL.from_pretrained(vae_name, low_cpu_mem_usage=False)
    else:
        if os.path.isabs(vae_name) or vae_name.startswith('.'):
            raise ValueError(f'VAE folder "{vae_name}" does not exist; {fix}, or a hub name such as "{VAE_NAME}".')
        try:
            vae = diffusers.AutoencoderKL.from_pretrained(vae_name, cache_dir=cache_dir, local_files_only=True, low_cpu_mem_usage=False)
        except OSError:
            try:
                vae = diffusers.AutoencoderKL.from_pretrained(vae_name, cache_dir=cache_dir, low_cpu_mem_usage=False)
            except OSError as err:
                raise ValueError(f'VAE "{vae_name}" is not in the cache "{cache_dir}" and could not be fetched from the Hugging Face hub ({str(err).splitlines()[0]}); {fix}.') from err
    return vae.eval().requires_grad_(False).to(device)

#----------------------------------------------------------------------------

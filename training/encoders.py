"""EDM2's encoders: pixels in [-1, 1], or the latents of Stability AI's VAE (loaded lazily, never pickled)."""

import os

import numpy as np
import torch

import dnnlib
from torch_utils import misc
from torch_utils import persistence

VAE_NAME = 'stabilityai/sd-vae-ft-mse'  # The VAE of EDM2's ImageNet-512 models.
RAW_MEAN = [5.81, 3.25, 0.12, -2.15]    # EDM2's per-channel mean of its raw latents.
RAW_STD = [4.17, 4.62, 3.71, 3.28]      # EDM2's per-channel std of its raw latents.
LATENT_CHANNELS = 4                     # Channels of the VAE's final latents.

#----------------------------------------------------------------------------

@persistence.persistent_class
class Encoder:
    """EDM2's encoder interface: raw pixels -> raw latents (what datasets store) -> final latents."""

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

    def encode_pixels(self, x):
        return x

    def encode_latents(self, x):
        return x.to(torch.float32) / 127.5 - 1

    def decode(self, x):
        return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

#----------------------------------------------------------------------------

@persistence.persistent_class
class StabilityVAEEncoder(Encoder):
    """Stability AI's VAE: raw latents are the posterior's mean and std, final latents a normalized draw from it."""

    def __init__(self,
        vae_name    = VAE_NAME, # Hub name or local folder of a diffusers AutoencoderKL.
        raw_mean    = RAW_MEAN,
        raw_std     = RAW_STD,
        final_mean  = 0,
        final_std   = 0.5,
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
        self._vae = load_vae(self.vae_name, device=device) if self._vae is None else self._vae.to(device)

    def __getstate__(self):
        return dict(super().__getstate__(), _vae=None) # The VAE is loaded again, never pickled.

    def encode_pixels(self, x):
        self.init(x.device)
        x = x.to(torch.float32) / 255
        dists = [self._vae.encode(batch)['latent_dist'] for batch in x.split(self.batch_size)]
        return torch.cat([torch.cat([dist.mean, dist.std], dim=1) for dist in dists])

    def encode_latents(self, x):
        mean, std = x.to(torch.float32).chunk(2, dim=1)
        x = mean + torch.randn_like(mean) * std
        scale, bias = [misc.const_like(x, v).reshape(1, -1, 1, 1) for v in (self.scale, self.bias)]
        return x * scale + bias

    def decode(self, x):
        self.init(x.device)
        x = x.to(torch.float32)
        scale, bias = [misc.const_like(x, v).reshape(1, -1, 1, 1) for v in (self.scale, self.bias)]
        x = (x - bias) / scale
        x = torch.cat([self._vae.decode(batch)['sample'] for batch in x.split(self.batch_size)])
        return x.clamp(0, 1).mul(255).to(torch.uint8)

#----------------------------------------------------------------------------
# The encoder of a dataset or a snapshot.

VAE_CLASS = 'training.encoders.StabilityVAEEncoder'

def describe(encoder):
    """The `encoder` entry of dataset.json: the class and the VAE (a local folder as an absolute path)."""
    vae_name = os.path.abspath(encoder.vae_name) if os.path.isdir(encoder.vae_name) else encoder.vae_name
    return dict(class_name=VAE_CLASS, vae_name=vae_name)

def dataset_encoder(dataset_obj, vae_name=None):
    """Pixels for images; for latents the VAE `vae_name`, else the one dataset.json records, else EDM2's."""
    if not getattr(dataset_obj, 'is_latent', False):
        if vae_name is not None:
            raise ValueError(f'The VAE "{vae_name}" applies to latents, but this dataset holds images; leave it out.')
        return StandardRGBEncoder()
    recorded = getattr(dataset_obj, 'encoder_kwargs', None) or {}
    if recorded.get('class_name', VAE_CLASS) != VAE_CLASS:
        raise ValueError(f'The dataset\'s dataset.json names the encoder "{recorded["class_name"]}", not {VAE_CLASS}; '
            'rebuild it with dataset_tool.py encode.')
    return StabilityVAEEncoder(vae_name=(vae_name or recorded.get('vae_name') or VAE_NAME))

def is_latent(encoder):
    return encoder is not None and type(encoder).__name__ != 'StandardRGBEncoder'

def load_vae(
    vae_name    = VAE_NAME, # As in StabilityVAEEncoder.
    device      = 'cpu',
    cache_dir   = None,     # Download cache, None = dnnlib's 'diffusers' folder.
):
    """A diffusers AutoencoderKL in eval mode: from a local folder, the download cache, or the hub."""
    import diffusers # pylint: disable=import-outside-toplevel
    cache_dir = dnnlib.make_cache_dir_path('diffusers') if cache_dir is None else cache_dir
    load = lambda **kwargs: diffusers.AutoencoderKL.from_pretrained(vae_name, low_cpu_mem_usage=False, **kwargs)
    fix = f'download it by other means (e.g. "hf download {vae_name}") and pass the folder that holds its config.json'
    hub = f'a hub name such as "{VAE_NAME}"'
    if os.path.isdir(vae_name):
        if not os.path.isfile(os.path.join(vae_name, 'config.json')):
            raise ValueError(f'VAE folder "{vae_name}" holds no config.json; '
                f'pass a folder written by AutoencoderKL.save_pretrained() or {hub}.')
        vae = load()
    else:
        if os.path.isabs(vae_name) or vae_name.startswith('.'):
            raise ValueError(f'VAE folder "{vae_name}" does not exist; {fix}, or {hub}.')
        try:
            vae = load(cache_dir=cache_dir, local_files_only=True)
        except OSError:
            try:
                vae = load(cache_dir=cache_dir)
            except OSError as err:
                raise ValueError(f'VAE "{vae_name}" is not in the cache "{cache_dir}" and could not be fetched '
                    f'from the Hugging Face hub ({str(err).splitlines()[0]}); {fix}.') from err
    return vae.eval().requires_grad_(False).to(device)

#----------------------------------------------------------------------------

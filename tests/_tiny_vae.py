"""A tiny diffusers AutoencoderKL with the layout of Stability AI's VAE (4 latent
channels at 1/8 of the resolution), 25k parameters, the same weights every call."""

import torch

def tiny_vae():
    import diffusers # pylint: disable=import-outside-toplevel
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
        block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16).eval()

def save_tiny_vae(folder):
    """Write it with save_pretrained(), as a local folder for vae_name / --vae."""
    tiny_vae().save_pretrained(str(folder))
    return str(folder)

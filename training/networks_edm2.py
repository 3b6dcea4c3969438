"""EDM2 network architecture and preconditioning.

The magnitude-preserving layers, the U-Net (`UNet`) and the wrapper
(`Precond`, with the learned uncertainty `u(sigma)`) reproduce the networks of
Karras et al. (2024), "Analyzing and Improving the Training Dynamics of
Diffusion Models": the same constructor arguments, the same `state_dict()`
names and shapes and the same outputs, so that official EDM2 snapshots can be
copied into these networks by name. Every weight is normalized inside its
layer; in training mode the stored weight is also replaced by its normalized
version (forced weight normalization). `Precond` has no `sigma_min`,
`sigma_max` or `round_sigma`.
"""

import numpy as np
import torch
from torch_utils import persistence
from torch_utils import misc

#----------------------------------------------------------------------------
# Magnitude-preserving operations.

def normalize(x, dim=None, eps=1e-4):
    """Scale `x` to unit root-mean-square magnitude over `dim` (default: all but the first)."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    rms_scale = np.sqrt(norm.numel() / x.numel())
    norm = torch.add(eps, norm, alpha=rms_scale)
    return x / norm.to(x.dtype)

def resample(x, f=[1,1], mode='keep'):
    """2x down- or upsampling by the separable FIR filter `f`, or `x` itself for mode 'keep'."""
    if mode == 'keep':
        return x
    if mode not in ('down', 'up'):
        raise ValueError(f'Unknown resample mode {mode!r}; use keep, down or up.')
    taps = np.float32(f)
    if taps.ndim != 1 or len(taps) % 2 != 0:
        raise ValueError(f'The resampling filter {f!r} must be a 1D list of even length, such as [1,1].')
    pad = (len(taps) - 1) // 2
    taps = taps / taps.sum()
    taps = misc.const_like(x, np.outer(taps, taps)[np.newaxis, np.newaxis])
    channels = x.shape[1]
    if mode == 'down':
        return torch.nn.functional.conv2d(x, taps.tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=(pad,))
    return torch.nn.functional.conv_transpose2d(x, (taps * 4).tile([channels, 1, 1, 1]), groups=channels, stride=2, padding=(pad,))

def attention(q, k, v):
    """Multi-head self-attention of q, k, v [N, heads, C, L] -> [N, heads, C, L]: the weights
    softmax_k(q . k / sqrt(C)) applied to v, through scaled_dot_product_attention (fused
    kernels on GPUs); EDM2's einsum form up to rounding."""
    y = torch.nn.functional.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3), scale=1 / np.sqrt(q.shape[2]))
    return y.transpose(2, 3).contiguous() # The layout of the einsum form: dropout masks follow the memory layout.

def mp_silu(x):
    """SiLU divided by its output magnitude for unit-variance Gaussian input."""
    return torch.nn.functional.silu(x) / 0.596

def mp_sum(a, b, t=0.5):
    """(1 - t) a + t b, rescaled so that unit-magnitude inputs give a unit-magnitude output."""
    return a.lerp(b, t) / np.sqrt((1 - t) ** 2 + t ** 2)

def mp_cat(a, b, dim=1, t=0.5):
    """Concatenate `a` and `b` along `dim` with weights (1 - t) and t, preserving the overall magnitude."""
    size_a = a.shape[dim]
    size_b = b.shape[dim]
    scale = np.sqrt((size_a + size_b) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (scale / np.sqrt(size_a) * (1 - t)), b * (scale / np.sqrt(size_b) * t)], dim=dim)

#----------------------------------------------------------------------------
# Magnitude-preserving layers.

@persistence.persistent_class
class MPFourier(torch.nn.Module):
    """Fixed random Fourier features sqrt(2) cos(2 pi (f x + p)) of a scalar per sample."""

    def __init__(self,
        num_channels,           # Number of output features.
        bandwidth       = 1,    # Standard deviation of the frequencies.
    ):
        super().__init__()
        self.register_buffer('freqs', 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32))
        y = (y + self.phases.to(torch.float32)).cos() * np.sqrt(2)
        return y.to(x.dtype)

@persistence.persistent_class
class MPConv(torch.nn.Module):
    """Convolution (kernel [k, k]) or fully connected layer (kernel []) with a
    normalized weight, scaled by `gain / sqrt(fan_in)`. In training mode the
    stored weight is replaced by its normalized version before each use."""

    def __init__(self,
        in_channels,            # Number of input channels.
        out_channels,           # Number of output channels.
        kernel,                 # Kernel size as a list: [] = fully connected, [k, k] = convolution.
    ):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        w = self.weight.to(torch.float32) # The weight itself when it is float32.
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w)) # Forced weight normalization; updates `w` too when it aliases the weight.
        w = normalize(w)
        w = (w * (gain / np.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))

#----------------------------------------------------------------------------
# U-Net block: optional resampling, a residual branch modulated by the
# embedding, and optional multi-head self-attention.

@persistence.persistent_class
class Block(torch.nn.Module):
    """Encoder ('enc') or decoder ('dec') block of the EDM2 U-Net."""

    def __init__(self,
        in_channels,                    # Number of input channels.
        out_channels,                   # Number of output channels.
        emb_channels,                   # Number of embedding channels.
        flavor              = 'enc',    # 'enc' (skip conv before the branch) or 'dec' (skip conv after it).
        resample_mode       = 'keep',   # Resampling at the input: 'keep', 'up' or 'down'.
        resample_filter     = [1,1],    # 1D taps of the resampling filter.
        attention           = False,    # Add self-attention after the residual branch?
        channels_per_head   = 64,       # Channels per attention head.
        dropout             = 0,        # Dropout probability in the residual branch.
        res_balance         = 0.3,      # Weight of the residual branch against the main branch.
        attn_balance        = 0.3,      # Weight of the attention against the main branch.
        clip_act            = 256,      # Clip the output activations to this magnitude; None = no clipping.
    ):
        if flavor not in ('enc', 'dec'):
            raise ValueError(f'Unknown block flavor {flavor!r}; use enc or dec.')
        if resample_mode not in ('keep', 'up', 'down'):
            raise ValueError(f'Unknown resample_mode {resample_mode!r}; use keep, up or down.')
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = resample_filter
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == 'enc' else in_channels, out_channels, kernel=[3,3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3,3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1,1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=[1,1]) if self.num_heads != 0 else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1,1]) if self.num_heads != 0 else None

    def forward(self, x, emb):
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)

        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout != 0:
            y = torch.nn.functional.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)

        if self.num_heads != 0:
            qkv = self.attn_qkv(x)
            qkv = qkv.reshape(qkv.shape[0], self.num_heads, -1, 3, qkv.shape[2] * qkv.shape[3])
            q, k, v = normalize(qkv, dim=2).unbind(3)
            y = self.attn_proj(attention(q, k, v).reshape(*x.shape))
            x = mp_sum(x, y, t=self.attn_balance)

        if self.clip_act is not None:
            x = x.clip_(-self.clip_act, self.clip_act)
        return x

#----------------------------------------------------------------------------
# The EDM2 U-Net.

@persistence.persistent_class
class UNet(torch.nn.Module):
    """EDM2 U-Net: F(x, c_noise, class_labels), magnitude-preserving throughout."""

    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Number of image channels.
        label_dim,                          # Number of class labels; 0 = unconditional.
        model_channels      = 192,          # Base multiplier for the number of channels.
        channel_mult        = [1,2,3,4],    # Channel multiplier per resolution.
        channel_mult_noise  = None,         # Multiplier of the noise embedding width; None = channel_mult[0].
        channel_mult_emb    = None,         # Multiplier of the final embedding width; None = max(channel_mult).
        num_blocks          = 3,            # Number of blocks per resolution.
        attn_resolutions    = [16,8],       # Resolutions with self-attention.
        label_balance       = 0.5,          # Weight of the class embedding against the noise embedding.
        concat_balance      = 0.5,          # Weight of the main path against the skip connection.
        **block_kwargs,                     # Keyword arguments of Block.
    ):
        super().__init__()
        cblock = [model_channels * mult for mult in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None

        # Encoder; the input carries an extra constant channel.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}x{res}_conv'] = MPConv(cout, channels, kernel=[3,3])
                cout = channels
            else:
                self.enc[f'{res}x{res}_down'] = Block(cout, cout, cemb, flavor='enc', resample_mode='down', **block_kwargs)
            for idx in range(num_blocks):
                self.enc[f'{res}x{res}_block{idx}'] = Block(cout, channels, cemb, flavor='enc', attention=(res in attn_resolutions), **block_kwargs)
                cout = channels

        # Decoder; every block takes one skip connection.
        self.dec = torch.nn.ModuleDict()
        skips = [layer.out_channels for layer in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f'{res}x{res}_in0'] = Block(cout, cout, cemb, flavor='dec', attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = Block(cout, cout, cemb, flavor='dec', **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = Block(cout, cout, cemb, flavor='dec', resample_mode='up', **block_kwargs)
            for idx in range(num_blocks + 1):
                self.dec[f'{res}x{res}_block{idx}'] = Block(cout + skips.pop(), channels, cemb, flavor='dec', attention=(res in attn_resolutions), **block_kwargs)
                cout = channels
        self.out_conv = MPConv(cout, img_channels, kernel=[3,3])

    def forward(self, x, noise_labels, class_labels):
        emb = self.emb_noise(self.emb_fourier(noise_labels))
        if self.emb_label is not None:
            emb = mp_sum(emb, self.emb_label(class_labels * np.sqrt(class_labels.shape[1])), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith('_conv') else layer(x, emb)
            skips.append(x)

        for name, block in self.dec.items():
            if '_block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)

#----------------------------------------------------------------------------
# Preconditioning (EDM's c_skip, c_out, c_in, c_noise) and the learned
# uncertainty u(sigma) of the EDM2 loss.

@persistence.persistent_class
class Precond(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), optionally with u(sigma)."""

    def __init__(self,
        img_resolution,         # Image resolution.
        img_channels,           # Number of image channels.
        label_dim,              # Number of class labels; 0 = unconditional.
        use_fp16        = True, # Run the U-Net in float16 on CUDA?
        sigma_data      = 0.5,  # Expected standard deviation of the training data.
        logvar_channels = 128,  # Number of Fourier features of the uncertainty estimate.
        **unet_kwargs,          # Keyword arguments of UNet.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, **unet_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.flatten().log() / 4

        F_x = self.unet((c_in * x).to(dtype), c_noise, class_labels, **unet_kwargs)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if return_logvar:
            logvar = self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)
            return D_x, logvar
        return D_x

#----------------------------------------------------------------------------

"""EDM2's magnitude-preserving network and preconditioning (Karras et al. 2024): EDM2's constructor arguments,
parameter names and outputs, so official snapshots copy by name (docs/architecture.md)."""

import numpy as np
import torch
from torch_utils import persistence
from torch_utils import misc

#----------------------------------------------------------------------------
# Magnitude-preserving operations.

def normalize(x, dim=None, eps=1e-4):
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=np.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)

def resample(x, f=[1,1], mode='keep'):
    if mode == 'keep':
        return x
    taps = np.float32(f)
    assert mode in ('down', 'up') and taps.ndim == 1 and len(taps) % 2 == 0
    pad = (len(taps) - 1) // 2
    taps = taps / taps.sum()
    taps = misc.const_like(x, np.outer(taps, taps)[np.newaxis, np.newaxis])
    c = x.shape[1]
    if mode == 'down':
        return torch.nn.functional.conv2d(x, taps.tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    return torch.nn.functional.conv_transpose2d(x, (taps * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))

def attention(q, k, v):
    """Self-attention of q, k, v [N, heads, C, L]: EDM2's einsum up to rounding."""
    y = torch.nn.functional.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3),
        scale=1 / np.sqrt(q.shape[2]))
    return y.transpose(2, 3).contiguous() # EDM2's memory layout, which dropout masks follow.

def mp_silu(x):
    return torch.nn.functional.silu(x) / 0.596

def mp_sum(a, b, t=0.5):
    return a.lerp(b, t) / np.sqrt((1 - t) ** 2 + t ** 2)

def mp_cat(a, b, dim=1, t=0.5):
    Na, Nb = a.shape[dim], b.shape[dim]
    C = np.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (C / np.sqrt(Na) * (1 - t)), b * (C / np.sqrt(Nb) * t)], dim=dim)

#----------------------------------------------------------------------------
# Magnitude-preserving layers.

@persistence.persistent_class
class MPFourier(torch.nn.Module):
    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer('freqs', 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        y = x.to(torch.float32).ger(self.freqs.to(torch.float32))
        y = (y + self.phases.to(torch.float32)).cos() * np.sqrt(2)
        return y.to(x.dtype)

@persistence.persistent_class
class MPConv(torch.nn.Module):
    """Convolution (kernel [k, k]) or linear layer (kernel []) with forced weight normalization."""

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        w = self.weight.to(torch.float32) # The weight itself when it is float32.
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w)) # Updates `w` too when it aliases the weight.
        w = normalize(w)
        w = (w * (gain / np.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return torch.nn.functional.conv2d(x, w, padding=(w.shape[-1] // 2,))

#----------------------------------------------------------------------------

@persistence.persistent_class
class Block(torch.nn.Module):
    def __init__(self,
        in_channels, out_channels, emb_channels,
        flavor            = 'enc',  # 'enc' (skip conv before the branch) or 'dec' (after it).
        resample_mode     = 'keep', # 'keep', 'up' or 'down'.
        resample_filter   = [1,1],
        attention         = False,
        channels_per_head = 64,
        dropout           = 0,
        res_balance       = 0.3,    # Weight of the residual branch.
        attn_balance      = 0.3,    # Weight of the attention.
        clip_act          = 256,    # Clip the output to this magnitude; None = no clipping.
    ):
        assert flavor in ('enc', 'dec') and resample_mode in ('keep', 'up', 'down')
        super().__init__()
        self.out_channels, self.flavor, self.dropout = out_channels, flavor, dropout
        self.resample_filter, self.resample_mode = resample_filter, resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.res_balance, self.attn_balance, self.clip_act = res_balance, attn_balance, clip_act
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

@persistence.persistent_class
class UNet(torch.nn.Module):
    def __init__(self,
        img_resolution, img_channels,
        label_dim,                      # Number of class labels; 0 = unconditional.
        model_channels     = 192,       # Base channel count.
        channel_mult       = [1,2,3,4], # Per resolution.
        channel_mult_noise = None,      # Noise embedding width / model_channels; None = channel_mult[0].
        channel_mult_emb   = None,      # Embedding width / model_channels; None = max(channel_mult).
        num_blocks         = 3,         # Per resolution.
        attn_resolutions   = [16,8],
        label_balance      = 0.5,       # Weight of the class embedding.
        concat_balance     = 0.5,       # Weight of the skip connection.
        **block_kwargs,                 # Of Block.
    ):
        super().__init__()
        cblock = [model_channels * mult for mult in channel_mult]
        cnoise = model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_balance, self.concat_balance = label_balance, concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))

        # Embedding.
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=[])
        self.emb_label = MPConv(label_dim, cemb, kernel=[]) if label_dim != 0 else None

        # Encoder; the input gets a constant channel.
        self.enc = torch.nn.ModuleDict()
        cout = img_channels + 1
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}x{res}_conv'] = MPConv(cout, channels, kernel=[3,3])
                cout = channels
            else:
                self.enc[f'{res}x{res}_down'] = Block(cout, cout, cemb, flavor='enc', resample_mode='down',
                    **block_kwargs)
            for idx in range(num_blocks):
                self.enc[f'{res}x{res}_block{idx}'] = Block(cout, channels, cemb, flavor='enc',
                    attention=(res in attn_resolutions), **block_kwargs)
                cout = channels

        # Decoder.
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
                self.dec[f'{res}x{res}_block{idx}'] = Block(cout + skips.pop(), channels, cemb, flavor='dec',
                    attention=(res in attn_resolutions), **block_kwargs)
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

@persistence.persistent_class
class Precond(torch.nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), and the uncertainty u(sigma) of the loss."""

    def __init__(self,
        img_resolution, img_channels,
        label_dim,              # As in UNet.
        use_fp16        = True, # U-Net in float16 (CUDA only)?
        sigma_data      = 0.5,  # Standard deviation of the training data.
        logvar_channels = 128,  # Fourier features of the uncertainty estimate.
        **unet_kwargs,          # Of UNet.
    ):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16, self.sigma_data = use_fp16, sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
            **unet_kwargs)
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

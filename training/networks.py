"""EDM's networks and preconditioning wrappers (Karras et al. 2022): EDM's constructor arguments, parameter names
and outputs, so official snapshots copy by name (docs/architecture.md)."""

import numpy as np
import torch
from torch.nn.functional import silu
from torch_utils import persistence

#----------------------------------------------------------------------------

def weight_init(shape, mode, fan_in, fan_out):
    if mode == 'xavier_uniform': return np.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':  return np.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform': return np.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':  return np.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'Invalid init_mode "{mode}"')

#----------------------------------------------------------------------------
# Layers. Parameters stay in float32 and are cast to the input's dtype.

@persistence.persistent_class
class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        y = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            y = y.add_(self.bias.to(x.dtype))
        return y

@persistence.persistent_class
class Conv2d(torch.nn.Module):
    """Square convolution (none for kernel=0) with optional 2x up- or downsampling by `resample_filter`."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=[1,1],
        fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        assert not (up and down)
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        w = weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight if kernel else None
        self.weight = torch.nn.Parameter(w) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        taps = torch.as_tensor(resample_filter, dtype=torch.float32)
        taps_2d = taps.ger(taps).unsqueeze(0).unsqueeze(1) / taps.sum().square()
        self.register_buffer('resample_filter', taps_2d if (up or down) else None)

    def forward(self, x):
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        fused = self.fused_resample and w is not None
        conv2d, conv_transpose2d = torch.nn.functional.conv2d, torch.nn.functional.conv_transpose2d
        c_in, c_out = self.in_channels, self.out_channels

        if fused and self.up:
            x = conv_transpose2d(x, f.mul(4).tile([c_in, 1, 1, 1]), groups=c_in, stride=2,
                padding=max(f_pad - w_pad, 0))
            x = conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif fused and self.down:
            x = conv2d(x, w, padding=w_pad + f_pad)
            x = conv2d(x, f.tile([c_out, 1, 1, 1]), groups=c_out, stride=2)
        else:
            if self.up:
                x = conv_transpose2d(x, f.mul(4).tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=f_pad)
            if self.down:
                x = conv2d(x, f.tile([c_in, 1, 1, 1]), groups=c_in, stride=2, padding=f_pad)
            if w is not None:
                x = conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x

@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype),
            bias=self.bias.to(x.dtype), eps=self.eps)

def attention(q, k, v):
    """Self-attention of q, k, v [heads, C, L]: EDM's AttentionOp up to rounding."""
    y = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        scale=1 / np.sqrt(q.shape[1]))
    return y.transpose(1, 2).contiguous() # EDM's memory layout, which dropout masks follow.

@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    def __init__(self,
        in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
        num_heads         = None,
        channels_per_head = 64,
        dropout           = 0,
        skip_scale        = 1,      # Multiplier after each residual sum.
        eps               = 1e-5,
        resample_filter   = [1,1],
        resample_proj     = False,  # 1x1 conv on a resampling skip path even if channels match?
        adaptive_scale    = True,   # Embedding gives scale and shift (ADM), not a bias?
        init              = dict(),
        init_zero         = dict(init_weight=0), # Last layer of each residual branch.
        init_attn         = None,   # qkv layer; None = init.
    ):
        assert not (up and down)
        super().__init__()
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = (out_channels // channels_per_head if num_heads is None else num_heads) if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        resample = dict(up=up, down=down, resample_filter=resample_filter)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, **resample, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if in_channels != out_channels or up or down:
            kernel = 1 if (resample_proj or in_channels != out_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, **resample, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            qkv_init = init if init_attn is None else init_attn
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **qkv_init)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        residual = x
        x = self.conv0(silu(self.norm0(x)))

        cond = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = cond.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(cond)))

        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(residual if self.skip is None else self.skip(residual))
        x = x * self.skip_scale

        if self.num_heads:
            heads = x.shape[0] * self.num_heads
            q, k, v = self.qkv(self.norm2(x)).reshape(heads, x.shape[1] // self.num_heads, 3, -1).unbind(2)
            x = self.proj(attention(q, k, v).reshape(*x.shape)).add_(x)
            x = x * self.skip_scale
        return x

#----------------------------------------------------------------------------

@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (freqs / (half - (1 if self.endpoint else 0)))
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.ger((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

#----------------------------------------------------------------------------

def _drop_labels(net, class_labels, x):
    if net.training and net.label_dropout:
        keep = torch.rand([x.shape[0], 1], device=x.device) >= net.label_dropout
        class_labels = class_labels * keep.to(class_labels.dtype)
    return class_labels

@persistence.persistent_class
class SongUNet(torch.nn.Module):
    """DDPM++ and NCSN++ (Song et al. 2021) as arranged in EDM."""

    def __init__(self,
        img_resolution, in_channels, out_channels,
        label_dim          = 0,            # Number of classes; 0 = unconditional.
        augment_dim        = 0,            # Dimensionality of augment_labels; 0 = none.
        model_channels     = 128,          # Base channel count.
        channel_mult       = [1,2,2,2],    # Per resolution level.
        channel_mult_emb   = 4,            # Embedding width / model_channels.
        num_blocks         = 4,            # Per resolution level.
        attn_resolutions   = [16],
        dropout            = 0.10,
        label_dropout      = 0,            # Probability of dropping the class label in training.
        embedding_type     = 'positional', # 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise = 1,            # Noise embedding width / model_channels: 1 (DDPM++), 2 (NCSN++).
        encoder_type       = 'standard',   # 'standard' (DDPM++), 'skip' or 'residual' (NCSN++).
        decoder_type       = 'standard',   # 'standard' or 'skip'.
        resample_filter    = [1,1],        # [1,1] (DDPM++) or [1,3,3,1] (NCSN++).
    ):
        assert embedding_type in ('positional', 'fourier') and decoder_type in ('standard', 'skip')
        assert encoder_type in ('standard', 'skip', 'residual')
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=init, init_zero=init_zero,
            init_attn=init_attn)

        # Mapping.
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. Entries named *aux* act on the auxiliary image pyramid.
        self.enc = torch.nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(caux, caux, kernel=0, down=True,
                        resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(caux, cout, kernel=3, down=True,
                        resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                    **block_kwargs)
        skip_channels = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                attn = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                        resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        # Mapping. The embedding is used as [sin, cos].
        cos, sin = self.map_noise(noise_labels).chunk(2, dim=1)
        emb = torch.cat([sin, cos], dim=1)
        if self.map_label is not None:
            labels = _drop_labels(self, class_labels, x)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        # Encoder.
        skips, aux = [], x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        # Decoder. The output accumulates the aux_conv heads.
        out = head = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                out = block(out)
            elif 'aux_norm' in name:
                head = block(x)
            elif 'aux_conv' in name:
                head = block(silu(head))
                out = head if out is None else head + out
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out

@persistence.persistent_class
class DhariwalUNet(torch.nn.Module):
    """ADM (Dhariwal & Nichol 2021) as arranged in EDM."""

    def __init__(self,
        img_resolution, in_channels, out_channels,
        label_dim        = 0,         # As in SongUNet.
        augment_dim      = 0,
        model_channels   = 192,
        channel_mult     = [1,2,3,4],
        channel_mult_emb = 4,
        num_blocks       = 3,
        attn_resolutions = [32,16,8],
        dropout          = 0.10,
        label_dropout    = 0,
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1/3), init_bias=np.sqrt(1/3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init,
            init_zero=init_zero)

        # Mapping.
        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = Linear(label_dim, emb_channels, bias=False,
            init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                    **block_kwargs)
        skip_channels = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                    **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        # Mapping. Unlike SongUNet, the class enters after the second layer.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = _drop_labels(self, class_labels, x)
            emb = emb + self.map_label(labels)
        emb = silu(emb)

        # Encoder.
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        # Decoder.
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))

#----------------------------------------------------------------------------
# Preconditioning: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise), c_* = coefficients(sigma).

class _Precond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = use_fp16
        assert model_type in ('SongUNet', 'DhariwalUNet')
        self.model = globals()[model_type](img_resolution=img_resolution, in_channels=img_channels,
            out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert dtype == F_x.dtype or torch.is_autocast_enabled(x.device.type)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

@persistence.persistent_class
class VPPrecond(_Precond):
    """Variance preserving preconditioning (Song et al. 2021, VP SDE)."""

    def __init__(self,
        img_resolution, img_channels,
        label_dim  = 0,          # Number of classes; 0 = unconditional.
        use_fp16   = False,      # U-Net in float16 (CUDA only)?
        beta_d     = 19.9,       # Extent of the noise schedule.
        beta_min   = 0.1,        # Initial slope of the noise schedule.
        M          = 1000,       # DDPM timesteps.
        epsilon_t  = 1e-5,       # Smallest t in training.
        model_type = 'SongUNet', # 'SongUNet' or 'DhariwalUNet'.
        **model_kwargs,          # Of the U-Net.
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min, self.sigma_max = float(self.sigma(epsilon_t)), float(self.sigma(1.0))

    def coefficients(self, sigma):
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

@persistence.persistent_class
class VEPrecond(_Precond):
    """Variance exploding preconditioning (Song et al. 2021, VE SDE)."""

    def __init__(self,
        img_resolution, img_channels,
        label_dim  = 0,          # As in VPPrecond.
        use_fp16   = False,
        sigma_min  = 0.02,
        sigma_max  = 100,
        model_type = 'SongUNet',
        **model_kwargs,
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()

@persistence.persistent_class
class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1)."""

    def __init__(self,
        img_resolution, img_channels,
        label_dim  = 0,              # As in VPPrecond.
        use_fp16   = False,
        sigma_min  = 0,
        sigma_max  = float('inf'),
        sigma_data = 0.5,            # Standard deviation of the training data.
        model_type = 'DhariwalUNet',
        **model_kwargs,
    ):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

#----------------------------------------------------------------------------

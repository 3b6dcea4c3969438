"""EDM network architectures and preconditioning wrappers.

The layers, the two U-Nets (`SongUNet` for DDPM++/NCSN++, `DhariwalUNet` for
ADM) and the wrappers (`VPPrecond`, `VEPrecond`, `EDMPrecond`) reproduce the
networks of Karras et al. (2022), "Elucidating the Design Space of
Diffusion-Based Generative Models": the same constructor arguments, the same
`state_dict()` names and shapes, the same initialisation and the same outputs.
That is what lets parameters of official EDM snapshots be copied by name.
"""

import numpy as np
import torch
from torch.nn.functional import silu
from torch_utils import persistence

#----------------------------------------------------------------------------
# Initialisation.

def weight_init(shape, mode, fan_in, fan_out):
    """A random tensor of `shape` drawn by one of the four EDM init modes."""
    if mode in ('xavier_uniform', 'kaiming_uniform'):
        bound = np.sqrt(6 / (fan_in + fan_out)) if mode == 'xavier_uniform' else np.sqrt(3 / fan_in)
        return bound * (torch.rand(*shape) * 2 - 1)
    if mode in ('xavier_normal', 'kaiming_normal'):
        std = np.sqrt(2 / (fan_in + fan_out)) if mode == 'xavier_normal' else np.sqrt(1 / fan_in)
        return std * torch.randn(*shape)
    raise ValueError(f'Unknown init_mode {mode!r}; use xavier_uniform, xavier_normal, kaiming_uniform or kaiming_normal.')

#----------------------------------------------------------------------------
# Layers. Parameters stay in float32 and are cast to the input's dtype, so the
# same module runs in float16 when given float16 activations.

@persistence.persistent_class
class Linear(torch.nn.Module):
    """Fully connected layer `x @ W^T + b`."""

    def __init__(self,
        in_features,                        # Input dimensionality.
        out_features,                       # Output dimensionality.
        bias            = True,             # Add a learned bias?
        init_mode       = 'kaiming_normal', # Distribution of the initial values, see weight_init().
        init_weight     = 1,                # Multiplier of the initial weight.
        init_bias       = 0,                # Multiplier of the initial bias.
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
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
    """Square 2D convolution with optional 2x up- or downsampling by a separable FIR filter.

    `kernel=0` gives a pure resampling layer without parameters. With
    `fused_resample` the filter and the convolution are applied as one
    strided operation (EDM's NCSN++ residual encoder uses this).
    """

    def __init__(self,
        in_channels,                        # Number of input channels.
        out_channels,                       # Number of output channels.
        kernel,                             # Kernel size; 0 = no convolution, resampling only.
        bias            = True,             # Add a learned bias (only when kernel > 0)?
        up              = False,            # Upsample by 2 before the convolution?
        down            = False,            # Downsample by 2 before the convolution?
        resample_filter = [1,1],            # 1D taps of the resampling filter, used as an outer product.
        fused_resample  = False,            # Fuse resampling and convolution into one operation?
        init_mode       = 'kaiming_normal', # Distribution of the initial values, see weight_init().
        init_weight     = 1,                # Multiplier of the initial weight.
        init_bias       = 0,                # Multiplier of the initial bias.
    ):
        if up and down:
            raise ValueError('Conv2d got up=True and down=True; choose at most one of them.')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
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

        if fused and self.up:
            x = torch.nn.functional.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = torch.nn.functional.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif fused and self.down:
            x = torch.nn.functional.conv2d(x, w, padding=w_pad + f_pad)
            x = torch.nn.functional.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = torch.nn.functional.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = torch.nn.functional.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = torch.nn.functional.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x

@persistence.persistent_class
class GroupNorm(torch.nn.Module):
    """Group normalisation with at most `num_groups` groups of at least `min_channels_per_group` channels."""

    def __init__(self,
        num_channels,                       # Number of channels.
        num_groups              = 32,       # Upper bound on the number of groups.
        min_channels_per_group  = 4,        # Lower bound on the channels in one group.
        eps                     = 1e-5,     # Added to the variance.
    ):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps)

def attention(q, k, v):
    """Multi-head self-attention of q, k, v [heads, C, L] -> [heads, C, L]: the weights
    softmax_k(q . k / sqrt(C)) applied to v, through scaled_dot_product_attention
    (fused kernels on GPUs). In float32 it is EDM's einsum form up to rounding; in
    float16 the fused kernels, like EDM's AttentionOp, take the logits and the
    softmax in float32 and multiply float16 weights with v."""
    y = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=1 / np.sqrt(q.shape[1]))
    return y.transpose(1, 2).contiguous() # The layout of the einsum form: dropout masks follow the memory layout.

@persistence.persistent_class
class UNetBlock(torch.nn.Module):
    """Residual U-Net block with noise-embedding conditioning, optional 2x resampling and self-attention.

    Covers the blocks of DDPM++, NCSN++ (additive conditioning, projected
    resampling skip, scaled residuals) and ADM (adaptive scale and shift).
    """

    def __init__(self,
        in_channels,                        # Number of input channels.
        out_channels,                       # Number of output channels.
        emb_channels,                       # Dimensionality of the conditioning embedding.
        up                  = False,        # Upsample by 2?
        down                = False,        # Downsample by 2?
        attention           = False,        # Append a self-attention layer?
        num_heads           = None,         # Attention heads; None = out_channels // channels_per_head.
        channels_per_head   = 64,           # Channels per head when num_heads is None.
        dropout             = 0,            # Dropout probability before the second convolution.
        skip_scale          = 1,            # Multiplier applied after each residual sum.
        eps                 = 1e-5,         # Epsilon of the group norms.
        resample_filter     = [1,1],        # Taps of the resampling filter.
        resample_proj       = False,        # Use a 1x1 convolution on a resampling skip path even if channels match?
        adaptive_scale      = True,         # Embedding gives scale and shift (ADM) rather than an additive bias?
        init                = dict(),       # Init arguments of most layers.
        init_zero           = dict(init_weight=0), # Init arguments of the last layer of each residual branch.
        init_attn           = None,         # Init arguments of the qkv layer; None = same as init.
    ):
        if up and down:
            raise ValueError('UNetBlock got up=True and down=True; choose at most one of them.')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if in_channels != out_channels or up or down:
            skip_kernel = 1 if (resample_proj or in_channels != out_channels) else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=skip_kernel, up=up, down=down, resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels * 3, kernel=1, **(init if init_attn is None else init_attn))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

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
# Noise-level embeddings.

@persistence.persistent_class
class PositionalEmbedding(torch.nn.Module):
    """Transformer-style sinusoidal embedding [cos(x f_i), sin(x f_i)], f_i = max_positions^(-i/n)."""

    def __init__(self,
        num_channels,                       # Output dimensionality (even).
        max_positions   = 10000,            # Base of the geometric frequency ladder.
        endpoint        = False,            # Let the lowest frequency reach exactly 1 / max_positions?
    ):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = x.ger(freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

@persistence.persistent_class
class FourierEmbedding(torch.nn.Module):
    """Random Fourier features [cos(2 pi x f_i), sin(2 pi x f_i)] with fixed f_i ~ N(0, scale^2)."""

    def __init__(self,
        num_channels,                       # Output dimensionality (even).
        scale           = 16,               # Standard deviation of the frequencies.
    ):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = x.ger((2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

#----------------------------------------------------------------------------
# U-Nets.

def _drop_labels(class_labels, label_dropout, training, batch_size, device):
    """Zero the label rows of a random subset of the batch (classifier-free guidance training)."""
    if training and label_dropout:
        keep = torch.rand([batch_size, 1], device=device) >= label_dropout
        class_labels = class_labels * keep.to(class_labels.dtype)
    return class_labels

@persistence.persistent_class
class SongUNet(torch.nn.Module):
    """DDPM++ and NCSN++ (Song et al. 2021) as arranged in EDM."""

    def __init__(self,
        img_resolution,                     # Image resolution at input and output.
        in_channels,                        # Number of input channels.
        out_channels,                       # Number of output channels.
        label_dim           = 0,            # Number of classes; 0 = unconditional.
        augment_dim         = 0,            # Dimensionality of augment_labels; 0 = no augmentation conditioning.

        model_channels      = 128,          # Base channel count.
        channel_mult        = [1,2,2,2],    # Channel multiplier per resolution level.
        channel_mult_emb    = 4,            # Embedding width as a multiple of model_channels.
        num_blocks          = 4,            # Residual blocks per resolution level.
        attn_resolutions    = [16],         # Resolutions that get self-attention.
        dropout             = 0.10,         # Dropout probability inside the blocks.
        label_dropout       = 0,            # Probability of dropping the class label during training.

        embedding_type      = 'positional', # Noise embedding: 'positional' (DDPM++) or 'fourier' (NCSN++).
        channel_mult_noise  = 1,            # Noise embedding width as a multiple of model_channels: 1 (DDPM++), 2 (NCSN++).
        encoder_type        = 'standard',   # Encoder: 'standard' (DDPM++), 'skip' or 'residual' (NCSN++).
        decoder_type        = 'standard',   # Decoder: 'standard' (both) or 'skip'.
        resample_filter     = [1,1],        # Resampling taps: [1,1] (DDPM++) or [1,3,3,1] (NCSN++).
    ):
        if embedding_type not in ('positional', 'fourier'):
            raise ValueError(f'Unknown embedding_type {embedding_type!r}; use "positional" or "fourier".')
        if encoder_type not in ('standard', 'skip', 'residual'):
            raise ValueError(f'Unknown encoder_type {encoder_type!r}; use "standard", "skip" or "residual".')
        if decoder_type not in ('standard', 'skip'):
            raise ValueError(f'Unknown decoder_type {decoder_type!r}; use "standard" or "skip".')
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False, init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: noise level (+ class, + augmentation) -> embedding.
        if embedding_type == 'positional':
            self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

        # Encoder. Entries named *aux* act on the auxiliary image pyramid.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(in_channels=caux, out_channels=caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(in_channels=caux, out_channels=cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(in_channels=caux, out_channels=cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        skip_channels = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                attention = (idx == num_blocks and res in attn_resolutions)
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=attention, **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        # Mapping. The embedding is used as [sin, cos].
        cos, sin = self.map_noise(noise_labels).chunk(2, dim=1)
        emb = torch.cat([sin, cos], dim=1)
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training, x.shape[0], x.device)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        # Encoder.
        skips = []
        aux = x
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
        out = None
        head = None
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
        img_resolution,                     # Image resolution at input and output.
        in_channels,                        # Number of input channels.
        out_channels,                       # Number of output channels.
        label_dim           = 0,            # Number of classes; 0 = unconditional.
        augment_dim         = 0,            # Dimensionality of augment_labels; 0 = no augmentation conditioning.

        model_channels      = 192,          # Base channel count.
        channel_mult        = [1,2,3,4],    # Channel multiplier per resolution level.
        channel_mult_emb    = 4,            # Embedding width as a multiple of model_channels.
        num_blocks          = 3,            # Residual blocks per resolution level.
        attn_resolutions    = [32,16,8],    # Resolutions that get self-attention.
        dropout             = 0.10,         # Dropout probability inside the blocks.
        label_dropout       = 0,            # Probability of dropping the class label during training.
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1/3), init_bias=np.sqrt(1/3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping network.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False, init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        skip_channels = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        # Mapping. Unlike SongUNet, the class enters after the second layer.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = _drop_labels(class_labels, self.label_dropout, self.training, x.shape[0], x.device)
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
# Preconditioning: D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).

def _build_model(model_type, **kwargs):
    """Construct the U-Net named by `model_type`."""
    models = dict(SongUNet=SongUNet, DhariwalUNet=DhariwalUNet)
    if model_type not in models:
        raise ValueError(f'Unknown model_type {model_type!r}; use "SongUNet" or "DhariwalUNet".')
    return models[model_type](**kwargs)

def _precondition(net, x, sigma, class_labels, force_fp32, model_kwargs):
    """Shared forward pass of the wrappers; `net.coefficients(sigma)` gives c_skip, c_out, c_in, c_noise."""
    x = x.to(torch.float32)
    sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    if net.label_dim == 0:
        class_labels = None
    elif class_labels is None:
        class_labels = torch.zeros([1, net.label_dim], device=x.device)
    else:
        class_labels = class_labels.to(torch.float32).reshape(-1, net.label_dim)
    dtype = torch.float16 if (net.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

    c_skip, c_out, c_in, c_noise = net.coefficients(sigma)
    F_x = net.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
    if F_x.dtype != dtype and not torch.is_autocast_enabled(x.device.type): # Under autocast (bf16) the U-Net's layers pick their dtypes.
        raise RuntimeError(f'The U-Net returned {F_x.dtype} where {dtype} was expected.')
    return c_skip * x + c_out * F_x.to(torch.float32)

@persistence.persistent_class
class VPPrecond(torch.nn.Module):
    """Variance preserving preconditioning (Song et al. 2021, VP SDE)."""

    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Number of color channels.
        label_dim       = 0,                # Number of classes; 0 = unconditional.
        use_fp16        = False,            # Run the U-Net in float16 (CUDA only)?
        beta_d          = 19.9,             # Extent of the noise schedule.
        beta_min        = 0.1,              # Initial slope of the noise schedule.
        M               = 1000,             # Number of timesteps of the original DDPM formulation.
        epsilon_t       = 1e-5,             # Smallest t used in training.
        model_type      = 'SongUNet',       # U-Net class: 'SongUNet' or 'DhariwalUNet'.
        **model_kwargs,                     # Further arguments of the U-Net.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t, device='cpu')))
        self.sigma_max = float(self.sigma(torch.tensor(1.0, device='cpu')))
        self.model = _build_model(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma):
        """c_skip, c_out, c_in, c_noise for noise levels `sigma`."""
        return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        return _precondition(self, x, sigma, class_labels, force_fp32, model_kwargs)

    def sigma(self, t):
        """Noise level at time t of the VP schedule."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """Time t at which the VP schedule reaches `sigma`."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def round_sigma(self, sigma):
        """Noise levels representable by the network (all of them)."""
        return torch.as_tensor(sigma)

@persistence.persistent_class
class VEPrecond(torch.nn.Module):
    """Variance exploding preconditioning (Song et al. 2021, VE SDE)."""

    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Number of color channels.
        label_dim       = 0,                # Number of classes; 0 = unconditional.
        use_fp16        = False,            # Run the U-Net in float16 (CUDA only)?
        sigma_min       = 0.02,             # Smallest supported noise level.
        sigma_max       = 100,              # Largest supported noise level.
        model_type      = 'SongUNet',       # U-Net class: 'SongUNet' or 'DhariwalUNet'.
        **model_kwargs,                     # Further arguments of the U-Net.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.model = _build_model(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma):
        """c_skip, c_out, c_in, c_noise for noise levels `sigma`."""
        return 1, sigma, 1, (0.5 * sigma).log()

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        return _precondition(self, x, sigma, class_labels, force_fp32, model_kwargs)

    def round_sigma(self, sigma):
        """Noise levels representable by the network (all of them)."""
        return torch.as_tensor(sigma)

@persistence.persistent_class
class EDMPrecond(torch.nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1)."""

    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Number of color channels.
        label_dim       = 0,                # Number of classes; 0 = unconditional.
        use_fp16        = False,            # Run the U-Net in float16 (CUDA only)?
        sigma_min       = 0,                # Smallest supported noise level.
        sigma_max       = float('inf'),     # Largest supported noise level.
        sigma_data      = 0.5,              # Standard deviation of the training data.
        model_type      = 'DhariwalUNet',   # U-Net class: 'SongUNet' or 'DhariwalUNet'.
        **model_kwargs,                     # Further arguments of the U-Net.
    ):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = _build_model(model_type, img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma):
        """c_skip, c_out, c_in, c_noise for noise levels `sigma`."""
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        return _precondition(self, x, sigma, class_labels, force_fp32, model_kwargs)

    def round_sigma(self, sigma):
        """Noise levels representable by the network (all of them)."""
        return torch.as_tensor(sigma)

#----------------------------------------------------------------------------

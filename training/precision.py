"""The precision the networks run in: `fp32`, `fp16` (EDM's `use_fp16`: the
U-Net casts its activations to float16) or `bf16` (the network runs under
torch.autocast to bfloat16). Reduced precision takes effect on CUDA only; on
the CPU the networks run in float32, as EDM's do with `use_fp16`. Whatever
the networks run in, the distillation arithmetic (hops, DDIM, inverse DDIM,
distance, loss) stays in float32 (training/consistency_ops.py). bfloat16 has
float32's range, so it needs no loss scaling; float16 may (`--ls`).

The student's precision applies to the student and to the `live` and `ema`
targets (`autocast()` around the loss in steps.accumulate_gradients); the
teacher may run in one of its own (`Teacher`), e.g. bf16 with an fp32 student."""

import contextlib

import torch

from torch_utils import misc

#----------------------------------------------------------------------------

PRECISIONS = ('fp32', 'fp16', 'bf16')
DTYPES = dict(fp16=torch.float16, bf16=torch.bfloat16)

def resolve(precision=None, use_fp16=False):
    """The precision of `precision`, or of EDM's `use_fp16` switch when it is None."""
    if precision is None:
        return 'fp16' if use_fp16 else 'fp32'
    if precision not in PRECISIONS:
        raise ValueError(f'precision="{precision}" is unknown; use one of {", ".join(PRECISIONS)}.')
    if use_fp16 and precision != 'fp16':
        raise ValueError(f'--fp16=True and --precision={precision} ask for two precisions; pass only --precision={precision}.')
    return precision

def check_network(net, precision, what='The network'):
    """Raise ValueError when `net` cannot run at `precision`: the code embedded in an
    official EDM pickle asserts that its U-Net returns float16 or float32, so it cannot
    run under bf16 autocast."""
    source = getattr(type(net), '_orig_module_src', '') or ''
    if precision == 'bf16' and 'assert F_x.dtype == dtype' in source:
        raise ValueError(f'{what} runs the code embedded in its pickle (an official EDM file), which allows only float16 or float32, so it cannot run in bf16; '
            f'use fp16 or fp32 for it, or pass its code-free .safetensors form (convert_snapshot.py), which runs this repository\'s code.')

def configure(net, precision):
    """Set EDM's `use_fp16` switch of a network (when it has one) for `precision`. Returns net."""
    if hasattr(net, 'use_fp16'):
        net.use_fp16 = (precision == 'fp16')
    return net

def autocast_dtype(net, precision, device):
    """The dtype that autocast runs `net` in at `precision` on `device`, None = autocast off:
    bfloat16 for bf16 on CUDA, float16 for fp16 on CUDA where the network has no `use_fp16`
    of its own (looked for inside DistributedDataParallel and compiled wrappers)."""
    if torch.device(device).type != 'cuda' or precision == 'fp32' or (precision == 'fp16' and hasattr(misc.unwrap_module(net), 'use_fp16')):
        return None
    return DTYPES[precision]

def autocast(net, precision, device):
    """The context in which `net` runs at `precision` on `device`: autocast to autocast_dtype()
    on CUDA, or autocast turned off there, so that a float32 network inside a reduced-precision
    context stays float32; nothing on other devices."""
    if torch.device(device).type != 'cuda':
        return contextlib.nullcontext()
    dtype = autocast_dtype(net, precision, device)
    return torch.autocast('cuda', dtype=(dtype or torch.float16), enabled=(dtype is not None))

#----------------------------------------------------------------------------

class Teacher(torch.nn.Module):
    """A frozen network evaluated in a precision of its own; its attributes (img_resolution,
    round_sigma, ...) are the network's."""

    def __init__(self, net, precision):
        super().__init__()
        check_network(net, precision, 'The teacher')
        self.net = configure(net, precision)
        self.precision = precision

    def forward(self, x, *args, **kwargs):
        with autocast(self.net, self.precision, x.device):
            return self.net(x, *args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules['net'], name)

#----------------------------------------------------------------------------

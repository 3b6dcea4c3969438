"""The precision networks run in on CUDA: `fp32`, `fp16` (EDM's `use_fp16`) or `bf16` (autocast); also the teacher's."""

import contextlib

import torch

from torch_utils import misc
from training import compiling

#----------------------------------------------------------------------------

PRECISIONS = ('fp32', 'fp16', 'bf16')
DTYPES = dict(fp16=torch.float16, bf16=torch.bfloat16)

def resolve(precision=None, use_fp16=False):
    """The precision of `precision`, or of EDM's `use_fp16` switch when it is None."""
    if precision is None:
        return 'fp16' if use_fp16 else 'fp32'
    assert precision in PRECISIONS and (not use_fp16 or precision == 'fp16')
    return precision

def check_network(net, precision, what='The network'):
    """Raise ValueError when `net` runs the code of an official EDM pickle, whose U-Net allows no bf16."""
    source = getattr(type(net), '_orig_module_src', '') or ''
    if precision == 'bf16' and 'assert F_x.dtype == dtype' in source:
        raise ValueError(f'{what} runs the code embedded in its official EDM pickle, which cannot run in bf16; '
            'use fp16 or fp32, or its .safetensors form (convert_snapshot.py).')

def configure(net, precision):
    """Set EDM's `use_fp16` switch of a network (when it has one) for `precision`. Returns net."""
    if hasattr(net, 'use_fp16'):
        net.use_fp16 = (precision == 'fp16')
    return net

def autocast_dtype(net, precision, device):
    """The autocast dtype of `net` at `precision` on `device`: None on the CPU, at fp32 or with EDM's `use_fp16`."""
    off = torch.device(device).type != 'cuda' or precision == 'fp32'
    return None if off or (precision == 'fp16' and hasattr(misc.unwrap_module(net), 'use_fp16')) else DTYPES[precision]

def autocast(net, precision, device):
    """Autocast to autocast_dtype() on CUDA, or off there (a float32 network stays float32); nothing elsewhere."""
    if torch.device(device).type != 'cuda':
        return contextlib.nullcontext()
    dtype = autocast_dtype(net, precision, device)
    return torch.autocast('cuda', dtype=(dtype or torch.float16), enabled=(dtype is not None))

class Teacher(compiling.Wrapper):
    """A frozen network evaluated in a precision of its own; its other attributes are the network's."""
    _inner = 'net'

    def __init__(self, net, precision):
        check_network(net, precision, 'The teacher')
        super().__init__(configure(net, precision))
        self.precision = precision

    def forward(self, x, *args, **kwargs):
        with autocast(self.net, self.precision, x.device):
            return self.net(x, *args, **kwargs)

#----------------------------------------------------------------------------

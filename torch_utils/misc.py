"""Tensor constants, shape checks, parameter copying, the infinite sampler and DDP helpers (EDM and EDM2 pickles
call several of these)."""

import contextlib
import re
import warnings

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------

_constant_cache = dict()

def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    value = np.asarray(value)
    shape = tuple(shape) if shape is not None else None
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    device = device if device is not None else torch.device('cpu')
    memory_format = memory_format if memory_format is not None else torch.contiguous_format
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device, memory_format)
    tensor = _constant_cache.get(key, None)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous(memory_format=memory_format)
        _constant_cache[key] = tensor
    return tensor

def const_like(ref, value, shape=None, dtype=None, device=None, memory_format=None):
    return constant(value, shape=shape, dtype=(ref.dtype if dtype is None else dtype),
        device=(ref.device if device is None else device), memory_format=memory_format)

def nan_to_num(input, nan=0.0, posinf=None, neginf=None, *, out=None): # pylint: disable=redefined-builtin
    return torch.nan_to_num(input, nan=nan, posinf=posinf, neginf=neginf, out=out)

@contextlib.contextmanager
def suppress_tracer_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', category=torch.jit.TracerWarning)
        yield

def assert_shape(tensor, ref_shape):
    """Assert the shape of a tensor; None entries match any size."""
    if tensor.ndim != len(ref_shape):
        raise AssertionError(f'Wrong number of dimensions: got {tensor.ndim}, expected {len(ref_shape)}')
    for idx, (size, ref_size) in enumerate(zip(tensor.shape, ref_shape)):
        if ref_size is None:
            continue
        if isinstance(ref_size, torch.Tensor):
            with suppress_tracer_warnings():
                torch._assert(torch.equal(torch.as_tensor(size), ref_size), f'Wrong size for dimension {idx}')
        elif isinstance(size, torch.Tensor):
            with suppress_tracer_warnings():
                torch._assert(torch.equal(size, torch.as_tensor(ref_size)),
                    f'Wrong size for dimension {idx}: expected {ref_size}')
        elif size != ref_size:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref_size}')

def profiled_function(fn):
    def decorator(*args, **kwargs):
        with torch.autograd.profiler.record_function(fn.__name__):
            return fn(*args, **kwargs)
    decorator.__name__ = fn.__name__
    return decorator

#----------------------------------------------------------------------------

class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of dataset indices, shuffled per epoch, dealt to the ranks in blocks of `block`."""

    def __init__(self, dataset, rank=0, num_replicas=1, shuffle=True, seed=0,
        start_idx = 0, # Global stream position to resume from.
        block     = 1, # Consecutive positions dealt to a rank at a time.
    ):
        assert len(dataset) > 0 and 0 <= rank < num_replicas and block >= 1 and start_idx >= 0
        super().__init__()
        self.dataset = dataset
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.start_idx = start_idx
        self.block = block

    def epoch_order(self, epoch):
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.dataset))

    def __iter__(self):
        size = len(self.dataset)
        idx = self.start_idx
        epoch = None
        while True:
            skip = (self.rank - idx // self.block) % self.num_replicas
            if skip != 0:
                idx = (idx // self.block + skip) * self.block
            if idx // size != epoch:
                epoch = idx // size
                order = self.epoch_order(epoch)
            yield int(order[idx % size])
            idx += 1

#----------------------------------------------------------------------------

def params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.parameters()) + list(module.buffers())

def named_params_and_buffers(module):
    assert isinstance(module, torch.nn.Module)
    return list(module.named_parameters()) + list(module.named_buffers())

@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy parameters and buffers by name (every one with `require_all`)."""
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name not in src_tensors:
            if require_all:
                raise ValueError(f'The source network has no tensor "{name}"; its architecture differs.')
            continue
        src = src_tensors[name]
        if src.shape != tensor.shape:
            raise ValueError(f'"{name}" has shape {tuple(src.shape)} in the source but {tuple(tensor.shape)} here.')
        tensor.copy_(src.detach()).requires_grad_(tensor.requires_grad)

#----------------------------------------------------------------------------

def unwrap_module(module):
    while True:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, '_orig_mod', None), torch.nn.Module):
            module = module._orig_mod
        else:
            return module

@contextlib.contextmanager
def ddp_sync(module, sync):
    assert isinstance(module, torch.nn.Module)
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield

def check_ddp_consistency(module, ignore_regex=None):
    """Raise if any parameter or buffer differs between rank 0 and this rank."""
    assert isinstance(module, torch.nn.Module)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    differing = []
    for name, tensor in named_params_and_buffers(module):
        fullname = type(module).__name__ + '.' + name
        if ignore_regex is not None and re.fullmatch(ignore_regex, fullname):
            continue
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = torch.nan_to_num(tensor)
        other = tensor.clone()
        torch.distributed.broadcast(tensor=other, src=0)
        if not (tensor == other).all():
            differing.append(fullname)
    if differing:
        raise RuntimeError(f'{", ".join(differing)} differ(s) between rank 0 and rank {torch.distributed.get_rank()}.')

def probe_outputs(net, sigmas=(0.02, 0.8, 20.0), seed=0):
    """The outputs of a network on a fixed probe batch at `sigmas` (float32, CPU)."""
    gen, n = torch.Generator().manual_seed(seed), len(sigmas)
    x = torch.randn([n, net.img_channels, net.img_resolution, net.img_resolution], generator=gen)
    sigma = torch.tensor(sigmas, dtype=torch.float32)
    labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, [n], generator=gen)] if net.label_dim else None
    device = next(net.parameters()).device
    with torch.no_grad():
        out = net(x.mul(1 + sigma.reshape(-1, 1, 1, 1)).to(device), sigma.to(device),
            None if labels is None else labels.to(device))
    return out.to(torch.float32).cpu()

#----------------------------------------------------------------------------

def print_module_summary(module, inputs, max_nesting=3, skip_redundant=True):
    """Print the parameter counts and output shapes of the submodules in `module(*inputs)`; return its outputs."""
    assert isinstance(module, torch.nn.Module) and not isinstance(module, torch.jit.ScriptModule)
    assert isinstance(inputs, (tuple, list))

    entries = []
    nesting = [0]
    def pre_hook(_mod, _inputs):
        nesting[0] += 1
    def post_hook(mod, _inputs, outputs):
        nesting[0] -= 1
        if nesting[0] <= max_nesting:
            outputs = list(outputs) if isinstance(outputs, (tuple, list)) else [outputs]
            outputs = [t for t in outputs if isinstance(t, torch.Tensor)]
            entries.append(dnnlib.EasyDict(mod=mod, outputs=outputs))
    hooks = [mod.register_forward_pre_hook(pre_hook) for mod in module.modules()]
    hooks += [mod.register_forward_hook(post_hook) for mod in module.modules()]
    try:
        outputs = module(*inputs)
    finally:
        for hook in hooks:
            hook.remove()

    # Attribute every tensor to the outermost module that owns it.
    tensors_seen = set()
    for e in entries:
        e.unique_params = [t for t in e.mod.parameters() if id(t) not in tensors_seen]
        e.unique_buffers = [t for t in e.mod.buffers() if id(t) not in tensors_seen]
        e.unique_outputs = [t for t in e.outputs if id(t) not in tensors_seen]
        tensors_seen |= {id(t) for t in e.unique_params + e.unique_buffers + e.unique_outputs}
    if skip_redundant:
        entries = [e for e in entries if len(e.unique_params) or len(e.unique_buffers) or len(e.unique_outputs)]

    names = {mod: name for name, mod in module.named_modules()}
    rows = [[type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype'], ['---'] * 5]
    param_total = 0
    buffer_total = 0
    for e in entries:
        name = '<top-level>' if e.mod is module else names[e.mod]
        param_size = sum(t.numel() for t in e.unique_params)
        buffer_size = sum(t.numel() for t in e.unique_buffers)
        output_shapes = [str(list(t.shape)) for t in e.outputs] or ['-']
        output_dtypes = [str(t.dtype).split('.')[-1] for t in e.outputs] or ['-']
        rows.append([name + (':0' if len(e.outputs) >= 2 else ''),
            str(param_size) if param_size else '-', str(buffer_size) if buffer_size else '-',
            output_shapes[0], output_dtypes[0]])
        for idx in range(1, len(e.outputs)):
            rows.append([name + f':{idx}', '-', '-', output_shapes[idx], output_dtypes[idx]])
        param_total += param_size
        buffer_total += buffer_size
    rows += [['---'] * 5, ['Total', str(param_total), str(buffer_total), '-', '-']]

    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    print()
    for row in rows:
        print('  '.join(cell + ' ' * (width - len(cell)) for cell, width in zip(row, widths)))
    print()
    return outputs

#----------------------------------------------------------------------------

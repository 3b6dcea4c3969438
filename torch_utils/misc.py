"""Tensor constants, shape checks, parameter copying, the infinite sampler,
DDP helpers and a module summary."""

import contextlib
import re
import warnings

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------
# Cached constants (the module sources of published EDM and EDM2 pickles call these).

_constant_cache = dict()

def constant(value, shape=None, dtype=None, device=None, memory_format=None):
    """A tensor for `value`, created once per (value, shape, dtype, device)."""
    value = np.asarray(value)
    if shape is not None:
        shape = tuple(shape)
    if dtype is None:
        dtype = torch.get_default_dtype()
    if device is None:
        device = torch.device('cpu')
    if memory_format is None:
        memory_format = torch.contiguous_format
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
    """constant() with the dtype and device of the tensor `ref` unless given (EDM2's module sources call this)."""
    return constant(value, shape=shape, dtype=(ref.dtype if dtype is None else dtype),
        device=(ref.device if device is None else device), memory_format=memory_format)

def nan_to_num(input, nan=0.0, posinf=None, neginf=None, *, out=None): # pylint: disable=redefined-builtin
    """torch.nan_to_num (kept under this name for older module sources)."""
    return torch.nan_to_num(input, nan=nan, posinf=posinf, neginf=neginf, out=out)

@contextlib.contextmanager
def suppress_tracer_warnings():
    """Silence the JIT tracer's warnings inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', category=torch.jit.TracerWarning)
        yield

def assert_shape(tensor, ref_shape):
    """Check a tensor's shape against a reference; None entries match any size."""
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
                torch._assert(torch.equal(size, torch.as_tensor(ref_size)), f'Wrong size for dimension {idx}: expected {ref_size}')
        elif size != ref_size:
            raise AssertionError(f'Wrong size for dimension {idx}: got {size}, expected {ref_size}')

def profiled_function(fn):
    """Decorator that labels a function in the autograd profiler."""
    def decorator(*args, **kwargs):
        with torch.autograd.profiler.record_function(fn.__name__):
            return fn(*args, **kwargs)
    decorator.__name__ = fn.__name__
    return decorator

#----------------------------------------------------------------------------

class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of dataset indices, shuffled per epoch and sharded by rank.

    The global stream visits epoch e in the order of a permutation seeded by
    (seed, e). It is dealt to the ranks in blocks of `block` consecutive
    positions, round-robin: rank r yields the positions p with
    (p // block) % num_replicas == r (block=1: r, r + num_replicas, ...).
    Position p of the stream depends only on (seed, p), so `start_idx` (a
    global position, e.g. the number of images seen) resumes exactly, in
    O(len(dataset)) time whatever its value.
    """

    def __init__(self,
        dataset,                # Sized object; indices are range(len(dataset)).
        rank            = 0,    # Rank of this process.
        num_replicas    = 1,    # Number of processes.
        shuffle         = True, # Shuffle the indices anew in every epoch?
        seed            = 0,    # Seed of the shuffle.
        start_idx       = 0,    # Global stream position to start from.
        block           = 1,    # Consecutive positions dealt to a rank at a time.
    ):
        if len(dataset) < 1:
            raise ValueError('InfiniteSampler needs a non-empty dataset.')
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'InfiniteSampler got rank={rank} with num_replicas={num_replicas}; need 0 <= rank < num_replicas.')
        if block < 1:
            raise ValueError(f'block={block} is invalid; it must be positive.')
        if start_idx < 0:
            raise ValueError(f'start_idx={start_idx} is invalid; it must be non-negative.')
        super().__init__()
        self.dataset = dataset
        self.rank = rank
        self.num_replicas = num_replicas
        self.shuffle = shuffle
        self.seed = seed
        self.start_idx = start_idx
        self.block = block

    def epoch_order(self, epoch):
        """The order of the dataset indices in the given epoch."""
        if not self.shuffle:
            return np.arange(len(self.dataset))
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.dataset))

    def __iter__(self):
        size = len(self.dataset)
        idx = self.start_idx
        epoch = None
        while True:
            skip = (self.rank - idx // self.block) % self.num_replicas
            if skip != 0: # The start of this rank's next block.
                idx = (idx // self.block + skip) * self.block
            if idx // size != epoch:
                epoch = idx // size
                order = self.epoch_order(epoch)
            yield int(order[idx % size])
            idx += 1

#----------------------------------------------------------------------------
# Parameters and buffers.

def params_and_buffers(module):
    """All parameters and buffers of a module, as a list."""
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f'Expected a torch.nn.Module, got {type(module).__name__}.')
    return list(module.parameters()) + list(module.buffers())

def named_params_and_buffers(module):
    """All (name, tensor) pairs of parameters and buffers of a module."""
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f'Expected a torch.nn.Module, got {type(module).__name__}.')
    return list(module.named_parameters()) + list(module.named_buffers())

@torch.no_grad()
def copy_params_and_buffers(src_module, dst_module, require_all=False):
    """Copy parameters and buffers from `src_module` into `dst_module` by name.

    Tensors are matched by their names in `named_parameters()` /
    `named_buffers()`; shapes must agree. With `require_all=True` every
    tensor of `dst_module` must have a source.
    """
    src_tensors = dict(named_params_and_buffers(src_module))
    for name, tensor in named_params_and_buffers(dst_module):
        if name not in src_tensors:
            if require_all:
                raise ValueError(f'The source network has no tensor "{name}"; the two networks have different architectures.')
            continue
        src = src_tensors[name]
        if src.shape != tensor.shape:
            raise ValueError(f'Tensor "{name}" has shape {tuple(src.shape)} in the source and {tuple(tensor.shape)} in the destination; the two networks have different architectures.')
        tensor.copy_(src.detach()).requires_grad_(tensor.requires_grad)

#----------------------------------------------------------------------------
# DDP helpers.

def unwrap_module(module):
    """The network inside DistributedDataParallel and compiled wrappers (`_orig_mod`), or the module itself."""
    while True:
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        elif isinstance(getattr(module, '_orig_mod', None), torch.nn.Module):
            module = module._orig_mod
        else:
            return module

@contextlib.contextmanager
def ddp_sync(module, sync):
    """Inside the block, a DDP module synchronises gradients only when `sync`."""
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f'Expected a torch.nn.Module, got {type(module).__name__}.')
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        yield
    else:
        with module.no_sync():
            yield

def check_ddp_consistency(module, ignore_regex=None):
    """Raise if any parameter or buffer differs between rank 0 and this rank.
    Every tensor is compared before raising, so all ranks stay in step."""
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f'Expected a torch.nn.Module, got {type(module).__name__}.')
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

#----------------------------------------------------------------------------

def print_module_summary(module, inputs, max_nesting=3, skip_redundant=True):
    """Print a table of submodules with parameter/buffer counts and output shapes,
    running `module(*inputs)` once to record the shapes. Returns the outputs."""
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f'Expected a torch.nn.Module, got {type(module).__name__}.')
    if isinstance(module, torch.jit.ScriptModule):
        raise ValueError('print_module_summary() cannot trace a TorchScript module.')
    if not isinstance(inputs, (tuple, list)):
        raise ValueError('print_module_summary() needs the inputs as a tuple or list.')

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

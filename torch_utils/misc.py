"""Tensor constants, parameter copying, the infinite sampler and DDP helpers (EDM and EDM2 pickles
call several of these)."""

import contextlib

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------

_constant_cache = dict()

def constant(value, shape=None, dtype=None, device=None):
    value = np.asarray(value)
    shape = tuple(shape) if shape is not None else None
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    device = device if device is not None else torch.device('cpu')
    key = (value.shape, value.dtype, value.tobytes(), shape, dtype, device)
    tensor = _constant_cache.get(key, None)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor, _ = torch.broadcast_tensors(tensor, torch.empty(shape))
        tensor = tensor.contiguous()
        _constant_cache[key] = tensor
    return tensor

def const_like(ref, value, shape=None, dtype=None, device=None):
    return constant(value, shape=shape, dtype=(ref.dtype if dtype is None else dtype),
        device=(ref.device if device is None else device))

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
                rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
                order = rng.permutation(size) if self.shuffle else np.arange(size)
            yield int(order[idx % size])
            idx += 1

#----------------------------------------------------------------------------

def params_and_buffers(module):
    return list(module.parameters()) + list(module.buffers())

def named_params_and_buffers(module):
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

def check_ddp_consistency(module):
    """Raise if any parameter or buffer differs between rank 0 and this rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    differing = []
    for name, tensor in named_params_and_buffers(module):
        tensor = tensor.detach()
        if tensor.is_floating_point():
            tensor = torch.nan_to_num(tensor)
        other = tensor.clone()
        torch.distributed.broadcast(tensor=other, src=0)
        if not (tensor == other).all():
            differing.append(type(module).__name__ + '.' + name)
    if differing:
        raise RuntimeError(f'{", ".join(differing)} differ(s) between rank 0 and rank {torch.distributed.get_rank()}.')

def probe_outputs(net, sigmas=(0.02, 0.8, 20.0)):
    """The outputs of a network on a fixed probe batch at `sigmas` (float32, CPU)."""
    gen, n = torch.Generator().manual_seed(0), len(sigmas)
    x = torch.randn([n, net.img_channels, net.img_resolution, net.img_resolution], generator=gen)
    sigma = torch.tensor(sigmas, dtype=torch.float32)
    labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, [n], generator=gen)] if net.label_dim else None
    device = next(net.parameters()).device
    with torch.no_grad():
        out = net(x.mul(1 + sigma.reshape(-1, 1, 1, 1)).to(device), sigma.to(device),
            None if labels is None else labels.to(device))
    return out.to(torch.float32).cpu()

#----------------------------------------------------------------------------

def print_module_summary(module, inputs, max_nesting=3):
    """Print the parameter counts and output shapes of the submodules in `module(*inputs)`; return its outputs."""
    assert isinstance(module, torch.nn.Module) and not isinstance(module, torch.jit.ScriptModule)
    assert isinstance(inputs, (tuple, list))

    entries, nesting = [], [0]
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
    entries = [e for e in entries if e.unique_params or e.unique_buffers or e.unique_outputs]

    names = {mod: name for name, mod in module.named_modules()}
    rows = [[type(module).__name__, 'Parameters', 'Buffers', 'Output shape', 'Datatype'], ['---'] * 5]
    param_total = buffer_total = 0
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
        print('  '.join(cell.ljust(width) for cell, width in zip(row, widths)))
    print()
    return outputs

#----------------------------------------------------------------------------

"""The files a run starts from and writes: network snapshots (EDM's pickle
format, read from a path or URL) and training states (`torch.save` of a
dict, for exact resume).

A snapshot is a dict with the network under `ema` (and `loss_fn`,
`augment_pipe`, `dataset_kwargs`, and whatever a loss adds, such as
`consistency`). A training state holds `format`, `net`, `ema` and
`optimizer_state` (state dicts), `loss_state`, `cur_nimg`, `cur_tick`,
`seed`, `batch_size`, `batch_gpu`, `world_size`, `rng_states`,
`network_kwargs` and `loss_kwargs`; see training_loop.py. Every file is
written through dnnlib.util.write_atomic.

Training states are read with `torch.load(weights_only=True)`: tensors and
plain Python values only.
"""

import copy
import os
import pickle
import re
import zipfile

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc

STATE_FORMAT        = 2                                         # Version of the training-state layout (1: NumPy generator states as arrays).
STATE_FORMATS_READ  = (1, 2)                                    # Versions that load_training_state() reads.
STATE_V1_GLOBALS    = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType] # The only globals a state may name: format 1's NumPy arrays.
STATE_RE            = re.compile(r'training-state-(\d+)\.pt')   # File names of training states.

#----------------------------------------------------------------------------
# Network snapshots.

def load_snapshot(path_or_url):
    """Load a network snapshot from a path or URL, rank 0 first (a download
    is cached once). Raises ValueError when it is not a snapshot."""
    with dist.rank0_first():
        try:
            with dnnlib.util.open_url(path_or_url, verbose=(dist.get_rank() == 0)) as f: # A bad path is a ValueError that says so.
                try:
                    data = pickle.load(f)
                except (OSError, ValueError, EOFError, pickle.UnpicklingError, AttributeError, ImportError) as err:
                    raise ValueError(f'"{path_or_url}" cannot be loaded as a network snapshot ({err}); pass a network-snapshot-*.pkl or its URL.') from err
        except OSError as err: # A download that failed after its retries.
            raise ValueError(str(err)) from err
    if not isinstance(data, dict) or not isinstance(data.get('ema', None), torch.nn.Module):
        raise ValueError(f'"{path_or_url}" is not a network snapshot (no network under "ema"); pass a network-snapshot-*.pkl or its URL.')
    return data

def snapshot_data(ema, loss_fn=None, augment_pipe=None, dataset_kwargs=None, extras=None):
    """The dict a snapshot pickles: every module as a CPU copy in eval mode,
    checked equal across ranks. Call on all ranks."""
    data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs or {}))
    data.update(copy.deepcopy(dict(extras or {})))
    for key, value in data.items():
        if isinstance(value, torch.nn.Module):
            module = copy.deepcopy(value).eval().requires_grad_(False)
            misc.check_ddp_consistency(module)
            data[key] = module.cpu()
    return data

def save_snapshot(path, data):
    """Pickle a snapshot dict to `path`, atomically."""
    dnnlib.util.write_atomic(path, lambda f: pickle.dump(data, f))

#----------------------------------------------------------------------------
# Training states.

def find_latest_state(run_dir):
    """The training state with the most images in `run_dir` (newest file on a tie), or None."""
    found = []
    for name in os.listdir(run_dir):
        match = STATE_RE.fullmatch(name)
        path = os.path.join(run_dir, name)
        if match and os.path.isfile(path):
            found.append((int(match.group(1)), os.path.getmtime(path), path))
    return max(found)[2] if found else None

def find_state(path):
    """The training state that `path` names: the file itself, or the newest one in a run directory."""
    if os.path.isdir(path):
        state = find_latest_state(path)
        if state is None:
            raise ValueError(f'"{path}" is a folder without training-state-*.pt files; pass a training state or a run directory that holds one.')
        return state
    if not os.path.isfile(path):
        raise ValueError(f'"{path}" does not exist; pass a training-state-*.pt file or the run directory that holds it.')
    return path

def load_training_state(path):
    """Load a training state written by the training loop (tensors on the CPU),
    reading the file once with torch.load(weights_only=True), which runs no
    code of the file. Generator states come back as get_rng_states() gives them."""
    fix = 'pass a training-state-*.pt written by train.py'
    with open(path, 'rb') as f:
        if not zipfile.is_zipfile(f):
            raise ValueError(f'"{path}" is not a training state (torch.save writes zip archives); {fix}.')
        f.seek(0)
        try:
            with torch.serialization.safe_globals(STATE_V1_GLOBALS):
                state = torch.load(f, map_location=torch.device('cpu'), weights_only=True)
        except Exception as err: # A truncated file, a pickle of other objects, anything torch.load cannot read.
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f'"{path}" cannot be read as a training state ({reason}); {fix}.') from err
    if not isinstance(state, dict) or state.get('format') not in STATE_FORMATS_READ:
        raise ValueError(f'"{path}" is not a training state written by this version of train.py; pass a training-state-*.pt from such a run.')
    if state['format'] >= 2:
        state['rng_states'] = [dict(states, numpy=_numpy_state_from_plain(states['numpy'])) for states in state['rng_states']]
    return state

def save_training_state(path, state):
    """torch.save a training state dict to `path`, atomically, in plain types
    that torch.load(weights_only=True) reads: the generator states of NumPy
    as lists, dictionaries (EasyDicts) as dicts."""
    state = dict(state, format=STATE_FORMAT, network_kwargs=_plain_dicts(state['network_kwargs']), loss_kwargs=_plain_dicts(state['loss_kwargs']),
        loss_state=_plain_dicts(state['loss_state']), rng_states=[dict(states, numpy=_numpy_state_to_plain(states['numpy'])) for states in state['rng_states']])
    dnnlib.util.write_atomic(path, lambda f: torch.save(state, f))

def _numpy_state_to_plain(state):
    """np.random.get_state()'s tuple as a dict of Python values."""
    name, keys, pos, has_gauss, cached_gaussian = state
    return dict(name=str(name), keys=[int(k) for k in keys], pos=int(pos), has_gauss=int(has_gauss), cached_gaussian=float(cached_gaussian))

def _numpy_state_from_plain(state):
    """The tuple for np.random.set_state() of what _numpy_state_to_plain() gave."""
    return (state['name'], np.asarray(state['keys'], dtype=np.uint32), state['pos'], state['has_gauss'], state['cached_gaussian'])

def _plain_dicts(value):
    """`value` with every dict (EasyDicts included) a plain dict, through lists and tuples."""
    if isinstance(value, dict):
        return {k: _plain_dicts(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_dicts(v) for v in value)
    return value

#----------------------------------------------------------------------------
# Tensor names and shapes.

def tensor_shapes(module):
    """{name: shape} of the parameters and buffers of a module."""
    return {name: list(t.shape) for name, t in misc.named_params_and_buffers(module)}

def network_shapes(network_kwargs, interface_kwargs):
    """{name: shape} of the network that the keyword arguments describe, built on
    the meta device (no memory) when its constructor allows, else on the CPU."""
    try:
        with torch.device('meta'):
            return tensor_shapes(dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs))
    except (RuntimeError, NotImplementedError): # A constructor that computes with its tensors (e.g. VPPrecond).
        return tensor_shapes(dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs))

def check_tensors(src_shapes, dst_shapes, what, fix, require_all=False):
    """Raise ValueError unless the tensors `src_shapes` (name -> shape) fit
    `dst_shapes` (those of the network here) by name. With `require_all`,
    both sides must have the same names. `what` names the source, `fix` is
    the advice."""
    for name, shape in src_shapes.items():
        if name in dst_shapes and list(shape) != list(dst_shapes[name]):
            raise ValueError(f'{what} holds "{name}" with shape {list(shape)}, but the network here has shape {list(dst_shapes[name])}; {fix}.')
    if require_all:
        for name in dst_shapes:
            if name not in src_shapes:
                raise ValueError(f'{what} lacks "{name}", which the network here has; {fix}.')
        for name in src_shapes:
            if name not in dst_shapes:
                raise ValueError(f'{what} holds "{name}", which the network here lacks; {fix}.')

#----------------------------------------------------------------------------

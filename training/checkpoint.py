"""The files a run starts from and writes: network snapshots (EDM's pickle
format, and a code-free safetensors form of it, read from a path or URL) and
training states (`torch.save` of a dict, for exact resume).

A snapshot is a dict with the network under `ema` (and `loss_fn`,
`augment_pipe`, `dataset_kwargs`, and whatever a loss adds, such as
`consistency`). A training state holds `format`, `net`, `ema` and
`optimizer_state` (state dicts), `loss_state`, `cur_nimg`, `cur_tick`,
`seed`, `batch_size`, `batch_gpu`, `world_size`, `rng_states`,
`network_kwargs` and `loss_kwargs`; see training_loop.py. Every file is
written through dnnlib.util.write_atomic.

Only pickles run code when read. The safetensors form of a snapshot holds
tensors and a JSON header (metadata key `snapshot`):

    {"format": 1, "entries": {
        "ema":            {"module": {"class_name": "training.networks.EDMPrecond", "init_args": [], "init_kwargs": {...}}},
        "loss_fn":        {"object": {"class_name": "training.loss.EDMLoss", "init_args": [], "init_kwargs": {...}}},
        "augment_pipe":   {"data": null},
        "dataset_kwargs": {"data": {...}},
        "consistency":    {"data": {"S": 4, "student_sigmas": [...]}}}}

A `module` entry is rebuilt from the repository's own class and its
`state_dict()` (tensors `<entry>.<name>`, in their stored dtypes); an
`object` entry (a loss, an augmentation pipeline, an encoder) from its class
and constructor arguments alone, so a loss comes back as constructed, without
the progress a training state carries. An entry that is neither plain data
nor an object of a class of training/ (a loss defined elsewhere) is written
as `{"dropped": <its class>}` and read back as None. Training states are read
with `torch.load(weights_only=True)`: tensors and plain Python values only.
"""

import copy
import hashlib
import importlib
import json
import os
import pickle
import re
import urllib.parse
import warnings
import zipfile

import numpy as np
import safetensors
import safetensors.torch
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence

STATE_FORMAT        = 2                                         # Version of the training-state layout (1: NumPy generator states as arrays).
STATE_FORMATS_READ  = (1, 2)                                    # Versions that load_training_state() reads.
STATE_V1_GLOBALS    = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType] # The only globals a state may name: format 1's NumPy arrays.
STATE_RE            = re.compile(r'training-state-(\d+)\.pt')   # File names of training states.
SAFETENSORS_FORMAT  = 1                                         # Version of the safetensors snapshot header.
SNAPSHOT_MODULES    = ('training.networks', 'training.networks_edm2', 'training.loss', 'training.loss_cd', 'training.augment') # Where the classes of snapshot entries live.

#----------------------------------------------------------------------------
# Network snapshots.

def is_safetensors(path_or_url):
    """True for a path or URL whose file name ends in .safetensors."""
    path = str(path_or_url)
    if dnnlib.util.is_url(path, allow_file_urls=True):
        path = urllib.parse.urlparse(path).path
    return path.lower().endswith('.safetensors')

def safetensors_path(pkl_path):
    """The name of the safetensors form of a snapshot pickle: `.pkl` replaced by `.safetensors`."""
    return os.path.splitext(pkl_path)[0] + '.safetensors'

def load_snapshot(path_or_url):
    """Load a network snapshot from a path or URL, rank 0 first (a download
    is cached once). A name ending in .safetensors is read without
    unpickling anything; any other is unpickled, which runs the code the
    pickle carries. Raises ValueError when it is not a snapshot."""
    if is_safetensors(path_or_url):
        data = load_safetensors(path_or_url)
    else:
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
    """Write a snapshot dict as a pickle to `path` and in safetensors form
    next to it (safetensors_path), each atomically. Raises ValueError, before
    writing anything, for a network that the safetensors form cannot rebuild."""
    form = safetensors_form(data)
    dnnlib.util.write_atomic(path, lambda f: pickle.dump(data, f))
    _write_safetensors(safetensors_path(path), form)

#----------------------------------------------------------------------------
# Networks of snapshots on the project's classes.

INTERFACE_KWARGS    = ('img_resolution', 'img_channels', 'label_dim')   # Constructor arguments that the data gives.
PROBE_TOLERANCE     = 1e-5                                              # Largest relative difference of a rebuilt network on the probe batch.

def network_description(net, what='The teacher'):
    """dict(class_name, **constructor keywords) of the class of training/ that a
    persistent network is an instance of, without the arguments the data gives.
    Raises ValueError for a class without an implementation here."""
    desc = _describe(net)
    if desc is None or desc['init_args']:
        raise ValueError(f'{what} is a {type(net).__qualname__}, a class this project has no implementation of (or whose constructor arguments it did not record); '
            f'distil it into an architecture given by the options (--arch, --precond, --cbase, --cres) with --student_init=random.')
    return dict(class_name=desc['class_name'], **{key: value for key, value in desc['init_kwargs'].items() if key not in INTERFACE_KWARGS})

def probe_outputs(net, seed=0):
    """The outputs of a network on a fixed probe batch of three noise levels (float32, CPU, no gradients)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn([3, net.img_channels, net.img_resolution, net.img_resolution], generator=gen)
    sigma = torch.tensor([0.02, 0.8, 20.0])
    labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, [3], generator=gen)] if net.label_dim else None
    with torch.no_grad():
        return net(x * (1 + sigma.reshape(-1, 1, 1, 1)), sigma, labels).to(torch.float32)

def on_project_class(net, what='The teacher'):
    """A network of a pickle's embedded code rebuilt on the project's class of
    the same name with the same weights (and dtypes), after checking on a
    probe batch that both give the same outputs (PROBE_TOLERANCE); with a
    difference, a warning and the network itself. A network of the project's
    own class, or of a class without an implementation here, comes back as it is."""
    name = project_class_name(net)
    if name is None or type(net) is _persistent_project_class(name):
        return net
    try:
        ours = dnnlib.util.construct_class_by_name(*net.init_args, class_name=name, **net.init_kwargs)
        ours.load_state_dict(net.state_dict(), strict=True, assign=True)
        ours.eval().requires_grad_(False)
        expected, got = probe_outputs(net.cpu().eval()), probe_outputs(ours)
        error = float((got - expected).abs().max() / expected.abs().max().clamp(min=1))
    except Exception as err: # pylint: disable=broad-except
        error, reason = None, _reason(err)
    if error is not None and error <= PROBE_TOLERANCE:
        return ours
    reason = f'its outputs differ by {error:.3g} on a probe batch' if error is not None else f'it cannot be built ({reason})'
    warnings.warn(f'{what} ({type(net).__qualname__}) keeps the code embedded in its pickle: on the project\'s {name} {reason}.', stacklevel=2)
    return net

#----------------------------------------------------------------------------
# The safetensors form of snapshots (see the module doc).

def project_class_name(obj):
    """The full name of the class of training/ that a persistent object is
    an instance of, or None. A class from a pickle's embedded source (an
    official EDM or EDM2 file) maps to the class of the same name here."""
    cls = type(obj)
    if not persistence.is_persistent(cls):
        return None
    name = f'{cls.__module__}.{cls.__qualname__}'
    if name.startswith('training.') and _persistent_project_class(name) is cls:
        return name
    for module_name in SNAPSHOT_MODULES:
        candidate = getattr(importlib.import_module(module_name), cls.__name__, None)
        if persistence.is_persistent(candidate) and candidate.__module__ == module_name:
            return f'{module_name}.{cls.__name__}'
    return None

def _persistent_project_class(name):
    """The persistent class of training/ with this full name, else None; imports nothing outside training/."""
    if not isinstance(name, str) or not name.startswith('training.'):
        return None
    try:
        cls = dnnlib.util.get_obj_by_name(name)
    except (ValueError, ImportError, AttributeError):
        return None
    if not (isinstance(cls, type) and persistence.is_persistent(cls) and f'{cls.__module__}.{cls.__qualname__}' == name):
        return None
    return cls

def _is_plain(value):
    """True for JSON data: None, bool, int, float, str, lists (tuples read back as lists) and dicts with str keys."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False

def _describe(obj):
    """dict(class_name, init_args, init_kwargs) of a persistent object of a class of training/, or None."""
    class_name = project_class_name(obj)
    if class_name is None:
        return None
    try:
        init_args, init_kwargs = list(obj.init_args), dict(obj.init_kwargs)
    except ValueError: # Built with _record_init_args = False.
        return None
    if not (_is_plain(init_args) and _is_plain(init_kwargs)):
        return None
    return dict(class_name=class_name, init_args=init_args, init_kwargs=init_kwargs)

def safetensors_form(data):
    """(metadata, tensors) of the safetensors form of a snapshot dict.
    Raises ValueError for a module entry that cannot be rebuilt from a
    class of training/ and JSON constructor arguments."""
    entries, tensors, storages = dict(), dict(), set()
    for key, value in data.items():
        if isinstance(value, torch.nn.Module):
            desc = _describe(value)
            if desc is None:
                raise ValueError(f'The snapshot entry "{key}" is a {type(value).__module__}.{type(value).__qualname__}, which a safetensors snapshot cannot rebuild; '
                    'use a network class of training/ constructed with JSON keyword arguments.')
            entries[key] = dict(module=desc)
            for name, tensor in value.state_dict().items():
                tensor = tensor.detach().cpu().contiguous()
                if tensor.untyped_storage().data_ptr() in storages: # safetensors stores no shared memory.
                    tensor = tensor.clone()
                storages.add(tensor.untyped_storage().data_ptr())
                tensors[f'{key}.{name}'] = tensor
        elif _is_plain(value):
            entries[key] = dict(data=value)
        else:
            desc = _describe(value)
            entries[key] = dict(object=desc) if desc is not None else dict(dropped=f'{type(value).__module__}.{type(value).__qualname__}')
    return dict(snapshot=json.dumps(dict(format=SAFETENSORS_FORMAT, entries=entries))), tensors

def _write_safetensors(path, form):
    metadata, tensors = form
    dnnlib.util.write_atomic(path, lambda f: f.write(safetensors.torch.save(tensors, metadata=metadata)))

def save_safetensors(path, data):
    """Write a snapshot dict in safetensors form to `path`, atomically."""
    _write_safetensors(path, safetensors_form(data))

def load_safetensors(path_or_url):
    """Rebuild a snapshot dict from its safetensors form (path or URL) with
    the classes of training/, unpickling nothing. Raises ValueError for a
    file that is not such a snapshot or names a class from elsewhere."""
    fix = 'pass a .safetensors snapshot written by train.py or convert_snapshot.py'
    with dist.rank0_first():
        try:
            path = dnnlib.util.open_url(path_or_url, verbose=(dist.get_rank() == 0), return_filename=True)
        except OSError as err: # A download that failed.
            raise ValueError(str(err)) from err
    try:
        with safetensors.safe_open(path, framework='pt') as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()} # Copies: the file's memory map must not outlive the file.
    except (OSError, ValueError, safetensors.SafetensorError) as err:
        raise ValueError(f'"{path_or_url}" cannot be read as a safetensors snapshot ({_reason(err)}); {fix}.') from err
    try:
        header = json.loads(metadata['snapshot'], object_hook=dnnlib.EasyDict)
        entries = header['entries']
        if header.get('format') != SAFETENSORS_FORMAT or not isinstance(entries, dict) or not all(isinstance(e, dict) and len(e) == 1 for e in entries.values()):
            raise ValueError(f'format {header.get("format")} or entries malformed')
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f'"{path_or_url}" has no valid snapshot header ({_reason(err)}); {fix}.') from err

    data = dict()
    for key, entry in entries.items():
        kind, desc = next(iter(entry.items()))
        if kind == 'data':
            data[key] = desc
        elif kind == 'dropped':
            data[key] = None
        elif kind in ('module', 'object'):
            data[key] = _rebuild(path_or_url, key, kind, desc, tensors, fix)
        else:
            raise ValueError(f'"{path_or_url}" holds the entry "{key}" of unknown kind "{kind}"; {fix}.')
    if tensors:
        raise ValueError(f'"{path_or_url}" holds tensors that no entry claims (e.g. "{next(iter(tensors))}"); {fix}.')
    return data

def _rebuild(path_or_url, key, kind, desc, tensors, fix):
    """The object of one `module` or `object` entry; takes the module's tensors out of `tensors`."""
    class_name = desc.get('class_name') if isinstance(desc, dict) else None
    cls = _persistent_project_class(class_name)
    if cls is None or (kind == 'module') != issubclass(cls, torch.nn.Module):
        raise ValueError(f'"{path_or_url}" names the class "{class_name}" for "{key}", which is not a {"network" if kind == "module" else "persistent"} class of this '
            f'repository\'s training/ package; only those are built from a safetensors snapshot, so write it with convert_snapshot.py or load the pickle instead.')
    try:
        obj = dnnlib.util.construct_class_by_name(*desc.get('init_args', []), class_name=class_name, **desc.get('init_kwargs', {}))
    except Exception as err: # pylint: disable=broad-except
        raise ValueError(f'"{path_or_url}" describes "{key}" as {class_name} with arguments it refuses ({_reason(err)}); {fix}.') from err
    if kind == 'object':
        return obj
    prefix = f'{key}.'
    state = {name: tensors.pop(prefix + name) for name in obj.state_dict() if prefix + name in tensors}
    try:
        obj.load_state_dict(state, strict=True, assign=True) # assign: the stored dtypes (float16 in EDM2 snapshots) stay.
    except RuntimeError as err:
        raise ValueError(f'"{path_or_url}" holds tensors of "{key}" that do not fit {class_name} ({_reason(err)}); {fix}.') from err
    return obj.eval().requires_grad_(False)

def _reason(err):
    """An exception's message on one line, at most 300 characters."""
    text = ' '.join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + '...'

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

def tensor_digest(module):
    """SHA-256 of the names, dtypes, shapes and values of a module's parameters and buffers (its content)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f'{name} {tensor.dtype} {list(tensor.shape)}\n'.encode('utf-8'))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() > 0 else b'')
    return digest.hexdigest()

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

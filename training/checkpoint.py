"""The files a run writes, in one place: network snapshots (EDM's pickle and its code-free safetensors form) and
training states (docs/snapshots.md)."""

import copy
import hashlib
import importlib
import json
import os
import pickle
import re
import urllib.parse
import zipfile

import numpy as np
import safetensors.torch
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import persistence
from training import guidance
from training import samplers

STATE_FORMAT        = 2                                         # 1: NumPy states as arrays.
STATE_FORMATS_READ  = (1, 2)
STATE_V1_GLOBALS    = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, np.dtypes.UInt32DType]
STATE_RE            = re.compile(r'training-state-(\d+)\.pt')
SAFETENSORS_FORMAT  = 1
SNAPSHOT_MODULES    = tuple(f'training.{m}' for m in ('networks', 'networks_edm2', 'loss', 'loss_cd', 'augment', 'encoders'))

#----------------------------------------------------------------------------
# Network snapshots.

def is_safetensors(path_or_url):
    path = str(path_or_url)
    path = urllib.parse.urlparse(path).path if dnnlib.util.is_url(path, allow_file_urls=True) else path
    return path.lower().endswith('.safetensors')

def safetensors_path(pkl_path):
    return os.path.splitext(pkl_path)[0] + '.safetensors'

def load_snapshot(path_or_url):
    """Load a network snapshot (rank 0 first); .safetensors unpickles nothing."""
    fix = 'pass a network-snapshot-*.pkl or its URL'
    if is_safetensors(path_or_url):
        data = load_safetensors(path_or_url)
    else:
        with dist.rank0_first():
            try:
                f = dnnlib.util.open_url(path_or_url, verbose=(dist.get_rank() == 0))
            except OSError as err:
                raise ValueError(str(err)) from err
            with f:
                try:
                    data = pickle.load(f)
                except (OSError, ValueError, EOFError, pickle.UnpicklingError, AttributeError, ImportError) as err:
                    raise ValueError(f'"{path_or_url}" cannot be loaded as a network snapshot ({err}); {fix}.') from err
    if not isinstance(data, dict) or not isinstance(data.get('ema', None), torch.nn.Module):
        raise ValueError(f'"{path_or_url}" is not a network snapshot (no network under "ema"); {fix}.')
    check_no_addim_bridge(data.get('loss_fn'), f'"{path_or_url}"')
    return data

def check_no_addim_bridge(loss, what):
    """ValueError for a loss (object, description or keywords) that used the aDDIM bridge of earlier versions."""
    kwargs = loss.get('init_kwargs', loss) if isinstance(loss, dict) else getattr(loss, 'init_kwargs', None) or {}
    if kwargs.get('addim_scale', 0):
        raise ValueError(f'{what} comes from a distillation with the aDDIM bridge (addim_scale={kwargs["addim_scale"]:g}), '
            'which this version replaced by the teacher\'s aDDIM hop; distil again, with --teacher_hop=addim.')

def consistency_entry(loss_fn):
    """A student snapshot's `consistency` entry: S, its S+1 levels, the teacher's guidance, cur_nimg and T reached."""
    return dict(S=int(loss_fn.S), student_sigmas=[float(v) for v in loss_fn.student_sigmas().tolist()],
        guidance=guidance.describe(loss_fn.teacher), cur_nimg=int(loss_fn.cur_nimg), T=int(loss_fn.T))

def student_levels(data, path='The snapshot'):
    """The S+1 noise levels of a student snapshot (float64, ending in 0), or None for a diffusion network."""
    entry = data.get('consistency')
    if entry is None:
        return None
    try:
        sigmas = samplers.check_student_sigmas(entry['student_sigmas'])
        if len(sigmas) != int(entry['S']) + 1:
            raise ValueError(f'S={entry["S"]} does not match its {len(sigmas)} student sigmas')
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f'The consistency entry of "{path}" is malformed ({err}); it needs S and S+1 sigmas.') from err
    return sigmas

def snapshot_data(ema, loss_fn=None, augment_pipe=None, dataset_kwargs=None, encoder=None, extras=None):
    """The dict a snapshot pickles, modules as CPU copies in eval mode. Call on all ranks."""
    data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs or {}))
    if encoder is not None:
        data['encoder'] = encoder
    if hasattr(loss_fn, 'student_sigmas'): # Plain data: the code of a student's loss exists only here.
        data.update(loss_fn=describe(loss_fn), consistency=consistency_entry(loss_fn))
    data.update(copy.deepcopy(dict(extras or {})))
    for key, value in data.items():
        if isinstance(value, torch.nn.Module):
            module = copy.deepcopy(value).eval().requires_grad_(False)
            misc.check_ddp_consistency(module)
            data[key] = module.cpu()
    return data

def save_snapshot(path, data):
    """Write a snapshot as a pickle and safetensors beside it, atomically; ValueError before writing if it cannot."""
    form = safetensors_form(data)
    dnnlib.util.write_atomic(path, lambda f: pickle.dump(data, f))
    _write_safetensors(safetensors_path(path), form)

#----------------------------------------------------------------------------
# The safetensors form of snapshots.

def project_class_name(obj):
    """The name of the persistent class of training/ that `obj` is or mirrors, or None."""
    cls = type(obj)
    if not persistence.is_persistent(cls):
        return None
    name = f'{cls.__module__}.{cls.__qualname__}'
    if name.startswith('training.') and persistent_project_class(name) is cls:
        return name
    for module_name in SNAPSHOT_MODULES:
        candidate = getattr(importlib.import_module(module_name), cls.__name__, None)
        if persistence.is_persistent(candidate) and candidate.__module__ == module_name:
            return f'{module_name}.{cls.__name__}'
    return None

def persistent_project_class(name):
    """The persistent class of training/ with this full name, else None."""
    if not isinstance(name, str) or not name.startswith('training.'):
        return None
    try:
        cls = dnnlib.util.get_obj_by_name(name)
    except (ValueError, ImportError, AttributeError):
        return None
    ok = isinstance(cls, type) and persistence.is_persistent(cls) and f'{cls.__module__}.{cls.__qualname__}' == name
    return cls if ok else None

def _is_plain(value):
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return value is None or isinstance(value, (bool, int, float, str))

def describe(obj):
    """dict(class_name, init_args, init_kwargs) of a persistent object of a class of training/, or None."""
    class_name = project_class_name(obj)
    if class_name is None:
        return None
    try:
        init_args, init_kwargs = list(obj.init_args), dict(obj.init_kwargs)
    except ValueError:
        return None
    ok = _is_plain(init_args) and _is_plain(init_kwargs)
    return dict(class_name=class_name, init_args=init_args, init_kwargs=init_kwargs) if ok else None

def safetensors_form(data):
    """(metadata, tensors) of a snapshot dict."""
    entries, tensors, storages = dict(), dict(), set()
    for key, value in data.items():
        if isinstance(value, torch.nn.Module):
            desc = describe(value)
            if desc is None:
                raise ValueError(f'The snapshot entry "{key}" is a {_class_path(value)}, which a safetensors snapshot '
                    'cannot rebuild; use a class of training/ built with JSON arguments.')
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
            desc = describe(value)
            entries[key] = dict(object=desc) if desc is not None else dict(dropped=_class_path(value))
    return dict(snapshot=json.dumps(dict(format=SAFETENSORS_FORMAT, entries=entries))), tensors

def _class_path(obj):
    return f'{type(obj).__module__}.{type(obj).__qualname__}'

def _write_safetensors(path, form):
    metadata, tensors = form
    dnnlib.util.write_atomic(path, lambda f: f.write(safetensors.torch.save(tensors, metadata=metadata)))

def save_safetensors(path, data):
    _write_safetensors(path, safetensors_form(data))

def load_safetensors(path_or_url):
    """Rebuild a snapshot dict from its safetensors form with the classes of training/, unpickling nothing."""
    fix = 'pass a .safetensors snapshot written by train.py or convert_snapshot.py'
    with dist.rank0_first():
        try:
            path = dnnlib.util.open_url(path_or_url, verbose=(dist.get_rank() == 0), return_filename=True)
        except OSError as err:
            raise ValueError(str(err)) from err
    try:
        with safetensors.safe_open(path, framework='pt') as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name).clone() for name in f.keys()} # The memory map must not outlive f.
    except (OSError, ValueError, safetensors.SafetensorError) as err:
        raise ValueError(f'"{path_or_url}" cannot be read as a safetensors snapshot ({reason(err)}); {fix}.') from err
    try:
        header = json.loads(metadata['snapshot'], object_hook=dnnlib.EasyDict)
        entries = header['entries']
        if header.get('format') != SAFETENSORS_FORMAT or not isinstance(entries, dict) or \
                not all(isinstance(e, dict) and len(e) == 1 for e in entries.values()):
            raise ValueError(f'format {header.get("format")} or entries malformed')
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f'"{path_or_url}" has no valid snapshot header ({reason(err)}); {fix}.') from err
    data = dict()
    for key, entry in entries.items():
        kind, desc = next(iter(entry.items()))
        if kind in ('data', 'dropped'):
            data[key] = desc if kind == 'data' else None
        elif kind in ('module', 'object'):
            data[key] = _rebuild(path_or_url, key, kind, desc, tensors, fix)
        else:
            raise ValueError(f'"{path_or_url}" holds the entry "{key}" of unknown kind "{kind}"; {fix}.')
    if tensors:
        raise ValueError(f'"{path_or_url}" holds tensors that no entry claims (e.g. "{next(iter(tensors))}"); {fix}.')
    return data

def _rebuild(path, key, kind, desc, tensors, fix):
    """The object of one `module` or `object` entry; pops its tensors."""
    class_name = desc.get('class_name') if isinstance(desc, dict) else None
    cls = persistent_project_class(class_name)
    if cls is None or (kind == 'module') != issubclass(cls, torch.nn.Module):
        raise ValueError(f'"{path}" names the class "{class_name}" for "{key}", which is not a '
            f'{"network" if kind == "module" else "persistent"} class of training/; load the pickle instead.')
    try:
        obj = cls(*desc.get('init_args', []), **desc.get('init_kwargs', {}))
    except Exception as err: # pylint: disable=broad-except
        raise ValueError(f'"{path}" describes "{key}" as {class_name} with arguments it refuses ({reason(err)}); '
            f'{fix}.') from err
    if kind == 'object':
        return obj
    state = {name: tensors.pop(f'{key}.{name}') for name in obj.state_dict() if f'{key}.{name}' in tensors}
    try:
        obj.load_state_dict(state, strict=True, assign=True) # assign: the stored dtypes (EDM2's float16) stay.
    except RuntimeError as err:
        raise ValueError(f'"{path}" holds tensors of "{key}" that do not fit {class_name} ({reason(err)}); '
            f'{fix}.') from err
    return obj.eval().requires_grad_(False)

def reason(err):
    text = ' '.join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + '...'

#----------------------------------------------------------------------------
# Training states.

def find_latest_state(run_dir):
    """The training state with the most images in `run_dir` (newest on a tie), or None."""
    paths = [(STATE_RE.fullmatch(name), os.path.join(run_dir, name)) for name in os.listdir(run_dir)]
    found = [(int(m.group(1)), os.path.getmtime(path), path) for m, path in paths if m and os.path.isfile(path)]
    return max(found)[2] if found else None

def find_state(path):
    """The file itself, or the newest training state in a run directory."""
    if os.path.isdir(path):
        state = find_latest_state(path)
        if state is None:
            raise ValueError(f'"{path}" is a folder without training-state-*.pt files; '
                'pass a training state or a run directory that holds one.')
        return state
    if not os.path.isfile(path):
        raise ValueError(f'"{path}" does not exist; pass a training-state-*.pt or the run directory that holds it.')
    return path

def load_training_state(path):
    """Load a training state onto the CPU with torch.load(weights_only=True)."""
    fix = 'pass a training-state-*.pt written by train.py'
    with open(path, 'rb') as f:
        if not zipfile.is_zipfile(f):
            raise ValueError(f'"{path}" is not a training state (torch.save writes zip archives); {fix}.')
        f.seek(0)
        try:
            with torch.serialization.safe_globals(STATE_V1_GLOBALS):
                state = torch.load(f, map_location=torch.device('cpu'), weights_only=True)
        except Exception as err: # pylint: disable=broad-except
            why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f'"{path}" cannot be read as a training state ({why}); {fix}.') from err
    if not isinstance(state, dict) or state.get('format') not in STATE_FORMATS_READ:
        raise ValueError(f'"{path}" is not a training state of this version of train.py; {fix}.')
    for states in state['rng_states'] if state['format'] >= 2 else []: # Back to np.random.set_state()'s tuple.
        n = states['numpy']
        states['numpy'] = (n['name'], np.asarray(n['keys'], np.uint32), n['pos'], n['has_gauss'], n['cached_gaussian'])
    return state

def training_state(net, ema, pf_ema, optimizer, loss_fn, network_kwargs, loss_kwargs, **progress):
    """The dict of a training state: the run's objects and its `progress` (cur_nimg, rng_states...)."""
    state_dict = lambda obj: obj.state_dict() if obj is not None else None
    return dict(progress, net=net.state_dict(), ema=state_dict(ema), phema=state_dict(pf_ema),
        phema_stds=(pf_ema.stds if pf_ema is not None else None), optimizer_state=optimizer.state_dict(),
        loss_state=(loss_fn.state_dict() if hasattr(loss_fn, 'state_dict') else None),
        network_kwargs=dict(network_kwargs), loss_kwargs=dict(loss_kwargs))

def restore_training_state(state, net, ema, pf_ema, optimizer, loss_fn):
    net.load_state_dict(state['net'])
    for module, key in [(ema, 'ema'), (pf_ema, 'phema')]:
        if module is not None:
            module.load_state_dict(state[key])
    optimizer.load_state_dict(state['optimizer_state'])
    for group in optimizer.param_groups: # Fused or not is this run's choice.
        group['fused'] = optimizer.defaults.get('fused')
    if state.get('loss_state') is not None and hasattr(loss_fn, 'load_state_dict'):
        loss_fn.load_state_dict(state['loss_state'])

def save_training_state(path, state):
    """torch.save a training state atomically, in plain types (weights_only)."""
    state = dict(state, format=STATE_FORMAT, network_kwargs=_plain_dicts(state['network_kwargs']),
        loss_kwargs=_plain_dicts(state['loss_kwargs']), loss_state=_plain_dicts(state['loss_state']),
        rng_states=[dict(s, numpy=_numpy_state_to_plain(s['numpy'])) for s in state['rng_states']])
    dnnlib.util.write_atomic(path, lambda f: torch.save(state, f))

def _numpy_state_to_plain(state):
    name, keys, pos, has_gauss, cached_gaussian = state
    return dict(name=str(name), keys=[int(k) for k in keys], pos=int(pos), has_gauss=int(has_gauss),
        cached_gaussian=float(cached_gaussian))

def _plain_dicts(value):
    if isinstance(value, dict):
        return {k: _plain_dicts(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_dicts(v) for v in value)
    return value

#----------------------------------------------------------------------------
# Tensor names and shapes.

def tensor_digest(module):
    """SHA-256 of a module's state_dict: names, dtypes, shapes, values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f'{name} {tensor.dtype} {list(tensor.shape)}\n'.encode('utf-8'))
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() > 0 else b'')
    return digest.hexdigest()

def tensor_shapes(module):
    return {name: list(t.shape) for name, t in misc.named_params_and_buffers(module)}

def network_shapes(network_kwargs, interface_kwargs):
    """{name: shape} of the network the keywords describe, built on the meta device where possible."""
    try:
        with torch.device('meta'):
            return tensor_shapes(dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs))
    except (RuntimeError, NotImplementedError): # A constructor that reads tensor values (VPPrecond's sigma range).
        return tensor_shapes(dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs))

def check_tensors(src_shapes, dst_shapes, what, fix, require_all=False):
    """ValueError unless `src_shapes` fit `dst_shapes` by name (and all names, with require_all)."""
    for name, shape in src_shapes.items():
        if name in dst_shapes and list(shape) != list(dst_shapes[name]):
            raise ValueError(f'{what} holds "{name}" with shape {list(shape)}, '
                f'but the network here has shape {list(dst_shapes[name])}; {fix}.')
    for name in dst_shapes if require_all else []:
        if name not in src_shapes:
            raise ValueError(f'{what} lacks "{name}", which the network here has; {fix}.')
    for name in src_shapes if require_all else []:
        if name not in dst_shapes:
            raise ValueError(f'{what} holds "{name}", which the network here lacks; {fix}.')

#----------------------------------------------------------------------------

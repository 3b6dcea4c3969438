"""The training loop: EDM diffusion training on one process or over the ranks
of `torchrun`, and the loop that other losses (consistency distillation) plug
into.

Hooks for other losses and for in-training evaluation, all optional:

* `loss_fn.set_progress(cur_nimg)` is called before every optimizer step and
  `loss_fn.update_target(net)` after it, when the loss has these methods.
* `loss_fn.state_dict()` / `loss_fn.load_state_dict(state)`, when present,
  carry the loss's own state through training states (exact resume).
* `loss_fn` is pickled into every snapshot; a loss that must not carry a
  member (a teacher network) drops it in its own `__getstate__`.
* `snapshot_extras` adds entries to every snapshot.
* `teacher_pkl` loads a snapshot's `ema` as a frozen teacher (eval mode, no
  gradients, on the device) and hands it to `loss_fn.set_teacher()`; the
  teacher runs in the precision of the trained network (its `use_fp16` is set
  to network_kwargs' `use_fp16`, which takes effect on CUDA). A resumed run
  loads it again from the same path.
* `validation_fn` is called every `val_every` ticks on all ranks and returns
  figures for `stats.jsonl` and W&B.

Exact resume: a training state (`torch.save` of a dict) holds `net`, `ema`
and `optimizer_state` (state dicts), `loss_state`, `cur_nimg`, `cur_tick`
(the last finished tick), `seed`, `batch_size`, `batch_gpu`, `world_size`,
`rng_states` (torch, CUDA, NumPy and Python generators, one entry per rank),
`network_kwargs` and `loss_kwargs`. The data order is a function of the seed
and the images seen (`misc.InfiniteSampler`), so the sampler position is
`cur_nimg`. A resumed run is bit-identical to an uninterrupted one when it
uses the same options, seed, number of ranks and `batch_gpu` (and, on GPUs,
deterministic kernels); otherwise it continues from the same point with
fresh generator states.
"""

import contextlib
import copy
import json
import os
import pickle
import random
import re
import time
import zipfile

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats

STATE_FORMAT = 1                                        # Version of the training-state layout.
STATE_RE = re.compile(r'training-state-(\d+)\.pt')      # File names of training states.

#----------------------------------------------------------------------------
# Files.

def write_atomic(path, write_fn):
    """Write a binary file through a temporary name in the same folder and
    rename it into place, so that `path` is either absent, old or complete."""
    temp_path = f'{path}.tmp-{os.getpid()}'
    try:
        with open(temp_path, 'wb') as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise

def find_latest_state(run_dir):
    """The training state with the most images in `run_dir` (newest file on a tie), or None."""
    found = []
    for name in os.listdir(run_dir):
        match = STATE_RE.fullmatch(name)
        path = os.path.join(run_dir, name)
        if match and os.path.isfile(path):
            found.append((int(match.group(1)), os.path.getmtime(path), path))
    return max(found)[2] if found else None

def load_training_state(path, mmap=False):
    """Load a training state written by the training loop (tensors on the CPU).
    With `mmap=True` the tensors are mapped rather than read, for quick checks."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f'"{path}" is not a training state (torch.save writes zip archives); pass a training-state-*.pt written by train.py.')
    try:
        state = torch.load(path, map_location=torch.device('cpu'), weights_only=False, mmap=mmap)
    except Exception as err: # A truncated file, a pickle, anything torch.load cannot read.
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f'"{path}" cannot be read as a training state ({reason}); pass a training-state-*.pt written by train.py.') from err
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        raise ValueError(f'"{path}" is not a training state written by this version of train.py; pass a training-state-*.pt from such a run.')
    return state

def load_snapshot(path_or_url):
    """Load a network snapshot (a dict with the network under `ema`) from a path or URL.
    Rank 0 reads first, so that a download is cached once."""
    if dist.get_rank() != 0:
        dist.barrier()
    try:
        with dnnlib.util.open_url(path_or_url, verbose=(dist.get_rank() == 0)) as f: # A bad path is a ValueError that says so.
            try:
                data = pickle.load(f)
            except (OSError, ValueError, EOFError, pickle.UnpicklingError, AttributeError, ImportError) as err:
                raise ValueError(f'"{path_or_url}" cannot be loaded as a network snapshot ({err}); pass a network-snapshot-*.pkl or its URL.') from err
    except OSError as err: # A download that failed after its retries.
        raise ValueError(str(err)) from err
    finally:
        if dist.get_rank() == 0:
            dist.barrier()
    if not isinstance(data, dict) or not isinstance(data.get('ema', None), torch.nn.Module):
        raise ValueError(f'"{path_or_url}" is not a network snapshot (no network under "ema"); pass a network-snapshot-*.pkl or its URL.')
    return data

def check_tensors(src_shapes, module, what, fix, require_all=False):
    """Raise ValueError unless the tensors `src_shapes` (name -> shape) fit the
    parameters and buffers of `module` by name. With `require_all`, both sides
    must have the same names. `what` names the source, `fix` is the advice."""
    dst_shapes = {name: list(t.shape) for name, t in misc.named_params_and_buffers(module)}
    for name, shape in src_shapes.items():
        if name in dst_shapes and list(shape) != dst_shapes[name]:
            raise ValueError(f'{what} holds "{name}" with shape {list(shape)}, but the network here has shape {dst_shapes[name]}; {fix}.')
    if require_all:
        for name in dst_shapes:
            if name not in src_shapes:
                raise ValueError(f'{what} lacks "{name}", which the network here has; {fix}.')
        for name in src_shapes:
            if name not in dst_shapes:
                raise ValueError(f'{what} holds "{name}", which the network here lacks; {fix}.')

#----------------------------------------------------------------------------
# Random number generators.

def get_rng_states(device):
    """The states of the generators this process draws from: torch (CPU and
    the CUDA device, if used), NumPy's global and Python's `random`."""
    states = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if device.type == 'cuda':
        states['cuda'] = torch.cuda.get_rng_state(device)
    return states

def set_rng_states(states, device):
    """Restore the states returned by get_rng_states()."""
    torch.set_rng_state(states['torch'])
    np.random.set_state(states['numpy'])
    random.setstate(states['python'])
    if device.type == 'cuda':
        torch.cuda.set_rng_state(states['cuda'], device)

@contextlib.contextmanager
def preserved_rng_states(device):
    """Inside the block the generators may be used freely; afterwards they are
    back where they were, so that the training stream does not notice."""
    states = get_rng_states(device)
    try:
        yield
    finally:
        set_rng_states(states, device)

def gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if dist.get_world_size() == 1:
        return [obj]
    objs = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(objs, obj)
    return objs

#----------------------------------------------------------------------------
# The pieces of one training step.

def learning_rate(base_lr, cur_nimg, lr_rampup_kimg):
    """The learning rate after `cur_nimg` images: a linear ramp-up over `lr_rampup_kimg`."""
    return base_lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)

def accumulate_gradients(ddp, loss_fn, next_batch, num_rounds, batch_gpu_total, loss_scaling=1, augment_pipe=None):
    """Forward and backward passes over `num_rounds` batches from `next_batch()`
    (images in [-1, 1] and labels, on the device). A DDP module averages the
    gradients across ranks on the last round only. The result is the gradient
    of the loss summed over the global batch and divided by its size (times
    `loss_scaling`), whatever the numbers of ranks and rounds."""
    for round_idx in range(num_rounds):
        with misc.ddp_sync(ddp, sync=(round_idx == num_rounds - 1)):
            images, labels = next_batch()
            loss = loss_fn(net=ddp, images=images, labels=labels, augment_pipe=augment_pipe)
            training_stats.report('Loss/loss', loss)
            (loss.sum() * (loss_scaling / batch_gpu_total)).backward()

def optimizer_step(net, optimizer, lr, loss_scaling=1):
    """Set the learning rate, replace non-finite gradients (NaN by 0, +-inf by
    +-1e5, as EDM does), step, and return the norm of the unscaled gradient."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    grads = [param.grad for param in net.parameters() if param.grad is not None]
    for grad in grads:
        torch.nan_to_num(grad, nan=0, posinf=1e5, neginf=-1e5, out=grad)
    grad_norm = torch.zeros([])
    if len(grads) > 0:
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) / loss_scaling
    optimizer.step()
    return grad_norm

@torch.no_grad()
def update_ema(ema, net, cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio=None):
    """Move the EMA parameters towards the network's after a step taken at
    `cur_nimg` images. The half-life is `ema_halflife_kimg`, capped at
    `cur_nimg * ema_rampup_ratio` early on. Returns the decay used."""
    ema_halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
    ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p_net.detach(), 1 - ema_beta)
    return ema_beta

def _is_scalar(value):
    """True for a number, or a tensor or array that holds exactly one."""
    if isinstance(value, (bool, int, float, np.number)):
        return True
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, np.ndarray) and value.size == 1

#----------------------------------------------------------------------------

def training_loop(
    run_dir             = '.',      # Where the files go; None on ranks other than 0.
    dataset_kwargs      = {},       # class_name and arguments of the dataset.
    data_loader_kwargs  = {},       # Arguments of torch.utils.data.DataLoader.
    network_kwargs      = {},       # class_name and arguments of the network (preconditioning wrapper).
    loss_kwargs         = {},       # class_name and arguments of the loss.
    optimizer_kwargs    = {},       # class_name and arguments of the optimizer; `lr` is the peak.
    augment_kwargs      = None,     # class_name and arguments of the augmentation pipeline, None = none.
    seed                = 0,        # Seed of the data order and of every rank's generators.
    batch_size          = 512,      # Images per optimizer step, over all ranks.
    batch_gpu           = None,     # Most images per rank and pass, None = all of the rank's share.
    total_kimg          = 200000,   # Stop after this many thousand images.
    ema_halflife_kimg   = 500,      # Half-life of the weight average, in thousands of images.
    ema_rampup_ratio    = 0.05,     # Early cap on the half-life as a fraction of the images seen, None = no cap.
    lr_rampup_kimg      = 10000,    # Length of the linear learning-rate warm-up.
    loss_scaling        = 1,        # Factor on the loss before backpropagation (FP16 range).
    kimg_per_tick       = 50,       # Progress line and statistics every this many thousand images.
    snapshot_ticks      = 50,       # Network snapshot every this many ticks, None = never.
    state_dump_ticks    = 500,      # Training state every this many ticks, None = never.
    resume_pkl          = None,     # Initialise the network and EMA from this snapshot's `ema`, by name.
    teacher_pkl         = None,     # Frozen teacher for loss_fn.set_teacher(): this snapshot's `ema`, None = none.
    resume_state_dump   = None,     # Continue exactly from this training state.
    cudnn_benchmark     = True,     # Let cuDNN pick the fastest kernels?
    snapshot_extras     = None,     # Extra snapshot entries: a dict, or a callable (net, ema, loss_fn, cur_nimg) -> dict.
    validation_fn       = None,     # Periodic evaluation: a callable, or a dict with `func_name` and its own arguments.
    val_every           = None,     # Call validation_fn every this many ticks (and at the end), None = never.
    val_at_start        = False,    # Also call validation_fn once before the first step?
    wandb_run           = None,     # A W&B run to log the statistics to (rank 0 only), None = no W&B.
    device              = None,     # torch.device of this rank, None = CUDA when available, else the CPU.
):
    """Train `network_kwargs` with `loss_kwargs` on `dataset_kwargs`; write
    `stats.jsonl`, `network-snapshot-<kimg>.pkl` and `training-state-<kimg>.pt`
    into `run_dir`.

    `validation_fn` is called on all ranks, under preserved random number
    generator states, with the keyword arguments net (the EMA, in eval mode),
    loss_fn, cur_tick, cur_nimg, run_dir, device and save_snapshot (a function
    of a file name that writes the current snapshot into run_dir; call it on
    all ranks). It returns a dict: numbers go to the statistics as
    `Validation/<name>` and to W&B, other values (images) to W&B only.
    """
    # Devices, seeds and numerics.
    start_time = time.time()
    if device is None:
        device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    device = torch.device(device)
    rank = dist.get_rank()
    world_size = dist.get_world_size()
    numpy_seed, torch_seed, python_seed = (int(x) for x in np.random.SeedSequence([seed, rank]).generate_state(3))
    np.random.seed(numpy_seed)
    torch.manual_seed(torch_seed)
    random.seed(python_seed)
    torch.backends.cudnn.benchmark = cudnn_benchmark
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False

    # The global batch split over ranks and accumulation rounds.
    if batch_size % world_size != 0:
        raise ValueError(f'batch_size={batch_size} does not divide over {world_size} ranks; use a multiple of {world_size}.')
    batch_gpu_total = batch_size // world_size
    if batch_gpu is None or batch_gpu > batch_gpu_total:
        batch_gpu = batch_gpu_total
    if batch_gpu_total % batch_gpu != 0:
        raise ValueError(f'batch_size={batch_size} over {world_size} ranks gives {batch_gpu_total} per rank, which batch_gpu={batch_gpu} does not divide; use a batch size that is a multiple of {world_size * batch_gpu}.')
    num_accumulation_rounds = batch_gpu_total // batch_gpu

    # Where to continue from.
    state = None
    cur_nimg = 0
    cur_tick = 0
    if resume_state_dump is not None:
        state = load_training_state(resume_state_dump)
        cur_nimg = int(state['cur_nimg'])
        cur_tick = int(state['cur_tick']) + 1
        if cur_nimg >= total_kimg * 1000:
            raise ValueError(f'The training state "{resume_state_dump}" has seen {cur_nimg} images, which reaches total_kimg={total_kimg}; train for longer.')

    # Data, in the order of the global image stream.
    dist.print0('Reading the dataset...')
    dataset_obj = dnnlib.util.construct_class_by_name(**dataset_kwargs)
    dataset_sampler = misc.InfiniteSampler(dataset=dataset_obj, rank=rank, num_replicas=world_size, seed=seed, start_idx=cur_nimg)
    dataset_iterator = iter(torch.utils.data.DataLoader(dataset=dataset_obj, sampler=dataset_sampler, batch_size=batch_gpu, **data_loader_kwargs))

    # The network, with a summary on rank 0.
    dist.print0('Building the network...')
    interface_kwargs = dict(img_resolution=dataset_obj.resolution, img_channels=dataset_obj.num_channels, label_dim=dataset_obj.label_dim)
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **interface_kwargs)
    net.train().requires_grad_(True).to(device)
    if rank == 0:
        with torch.no_grad():
            example = [torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution]), torch.ones([batch_gpu]), torch.zeros([batch_gpu, net.label_dim])]
            misc.print_module_summary(net, [t.to(device) for t in example], max_nesting=2)

    # Loss, optimizer, augmentation, DDP wrapper and EMA.
    dist.print0('Setting up the loss, optimizer and EMA...')
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    optimizer = dnnlib.util.construct_class_by_name(params=net.parameters(), **optimizer_kwargs)
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
    ddp = net
    if dist.is_distributed():
        device_ids = [device] if device.type == 'cuda' else None
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids, forward_sync_buffers=False)
    ema = copy.deepcopy(net).eval().requires_grad_(False)

    # The frozen teacher of a distillation loss.
    teacher_data = None
    if teacher_pkl is not None:
        if not hasattr(loss_fn, 'set_teacher'):
            raise ValueError(f'teacher_pkl="{teacher_pkl}" was given, but the loss {type(loss_fn).__name__} takes no teacher; use a loss with set_teacher() or leave teacher_pkl out.')
        dist.print0(f'Loading the teacher "{teacher_pkl}"...')
        teacher_data = load_snapshot(teacher_pkl)
        teacher = teacher_data['ema'].eval().requires_grad_(False).to(device)
        if hasattr(teacher, 'use_fp16'):
            teacher.use_fp16 = bool(network_kwargs.get('use_fp16', False))
        loss_fn.set_teacher(teacher)

    # Weights from a snapshot (the teacher's, when it is the same file).
    if resume_pkl is not None:
        dist.print0(f'Copying the weights of "{resume_pkl}"...')
        data = teacher_data if (teacher_data is not None and resume_pkl == teacher_pkl) else load_snapshot(resume_pkl)
        misc.copy_params_and_buffers(src_module=data['ema'], dst_module=net, require_all=False)
        misc.copy_params_and_buffers(src_module=data['ema'], dst_module=ema, require_all=False)
        del data
    del teacher_data

    # Continue from a training state; the generators come last, after everything that draws from them.
    if state is not None:
        dist.print0(f'Continuing from the training state "{resume_state_dump}"...')
        fix = 'resume with the options of the run that wrote it'
        check_tensors({k: v.shape for k, v in state['net'].items()}, net, f'The training state "{resume_state_dump}"', fix, require_all=True)
        net.load_state_dict(state['net'])
        ema.load_state_dict(state['ema'])
        optimizer.load_state_dict(state['optimizer_state'])
        if state.get('loss_state') is not None and hasattr(loss_fn, 'load_state_dict'):
            loss_fn.load_state_dict(state['loss_state'])
        same_layout = (state['world_size'] == world_size and state['batch_gpu'] == batch_gpu and state['seed'] == seed)
        if same_layout:
            set_rng_states(state['rng_states'][rank], device)
        else:
            dist.print0('The seed, the number of ranks or the batch per rank differs from the saved run: it continues, but not bit-identically.')
        del state

    # Snapshots: modules as CPU copies in eval mode, checked equal across ranks.
    def snapshot_data():
        extras = snapshot_extras(net=net, ema=ema, loss_fn=loss_fn, cur_nimg=cur_nimg) if callable(snapshot_extras) else snapshot_extras
        data = dict(ema=ema, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dict(dataset_kwargs))
        data.update(copy.deepcopy(dict(extras or {})))
        modules = {key: value for key, value in data.items() if isinstance(value, torch.nn.Module)}
        for key, module in modules.items():
            module = copy.deepcopy(module).eval().requires_grad_(False)
            misc.check_ddp_consistency(module)
            data[key] = module.cpu()
        return data

    def save_snapshot(file_name):
        data = snapshot_data()
        if rank == 0:
            write_atomic(os.path.join(run_dir, file_name), lambda f: pickle.dump(data, f))

    def save_state(file_name):
        rng_states = gather_objects(get_rng_states(device))
        if rank == 0:
            data = dict(format=STATE_FORMAT, net=net.state_dict(), ema=ema.state_dict(), optimizer_state=optimizer.state_dict(),
                loss_state=(loss_fn.state_dict() if hasattr(loss_fn, 'state_dict') else None),
                cur_nimg=cur_nimg, cur_tick=cur_tick, seed=seed, batch_size=batch_size, batch_gpu=batch_gpu,
                world_size=world_size, rng_states=rng_states, network_kwargs=dict(network_kwargs), loss_kwargs=dict(loss_kwargs))
            write_atomic(os.path.join(run_dir, file_name), lambda f: torch.save(data, f))

    # Validation.
    def validate():
        kwargs = dict(net=ema, loss_fn=loss_fn, cur_tick=cur_tick, cur_nimg=cur_nimg, run_dir=run_dir, device=device, save_snapshot=save_snapshot)
        with preserved_rng_states(device):
            if callable(validation_fn):
                figures = validation_fn(**kwargs)
            else:
                figures = dnnlib.util.call_func_by_name(**validation_fn, **kwargs)
        media = dict()
        for name, value in dict(figures or {}).items():
            if _is_scalar(value):
                training_stats.report0(f'Validation/{name}', float(value))
            else:
                media[f'Validation/{name}'] = value
        return media

    # Statistics and W&B.
    stats_collector = training_stats.Collector(regex='.*', keep_previous=False)
    stats_jsonl = None
    wandb_media = dict()
    if validation_fn is not None and val_at_start:
        dist.print0('Validating before the first step...')
        wandb_media = validate()

    # The loop: one optimizer step per iteration, maintenance at the end of each tick.
    dist.print0(f'Training until {total_kimg} kimg...')
    dist.print0()
    base_lr = optimizer_kwargs['lr']
    tick_start_nimg = cur_nimg
    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    def next_batch():
        images, labels = next(dataset_iterator)
        return images.to(device).to(torch.float32) / 127.5 - 1, labels.to(device)
    while True:

        # One optimizer step over the global batch.
        if hasattr(loss_fn, 'set_progress'):
            loss_fn.set_progress(cur_nimg)
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(ddp, loss_fn, next_batch, num_accumulation_rounds, batch_gpu_total, loss_scaling=loss_scaling, augment_pipe=augment_pipe)
        lr = learning_rate(base_lr, cur_nimg, lr_rampup_kimg)
        grad_norm = optimizer_step(net, optimizer, lr, loss_scaling=loss_scaling)
        training_stats.report0('Loss/grad_norm', grad_norm)
        training_stats.report0('Progress/lr', lr)
        if hasattr(loss_fn, 'update_target'):
            loss_fn.update_target(net)
        update_ema(ema, net, cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio)

        # Count the images; go on unless the tick (or the run) is over.
        cur_nimg += batch_size
        done = (cur_nimg >= total_kimg * 1000)
        if (not done) and (cur_tick != 0) and (cur_nimg < tick_start_nimg + kimg_per_tick * 1000):
            continue

        # Progress line; the same figures go to the statistics.
        tick_end_time = time.time()
        tick_sec = tick_end_time - tick_start_time
        cuda = (device.type == 'cuda')
        progress = [ # (label, statistic, value, format)
            ('tick',        'Progress/tick',                        cur_tick,                                                           '<5d'),
            ('kimg',        'Progress/kimg',                        cur_nimg / 1e3,                                                     '<9.1f'),
            ('time',        'Timing/total_sec',                     tick_end_time - start_time,                                         'time'),
            ('sec/tick',    'Timing/sec_per_tick',                  tick_sec,                                                           '<7.1f'),
            ('sec/kimg',    'Timing/sec_per_kimg',                  tick_sec / (cur_nimg - tick_start_nimg) * 1e3,                      '<7.2f'),
            ('maintenance', 'Timing/maintenance_sec',               maintenance_time,                                                   '<6.1f'),
            ('cpumem',      'Resources/cpu_mem_gb',                 psutil.Process(os.getpid()).memory_info().rss / 2**30,             '<6.2f'),
            ('gpumem',      'Resources/peak_gpu_mem_gb',            torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0,     '<6.2f'),
            ('reserved',    'Resources/peak_gpu_mem_reserved_gb',   torch.cuda.max_memory_reserved(device) / 2**30 if cuda else 0,      '<6.2f'),
        ]
        for _label, name, value, _fmt in progress:
            training_stats.report0(name, value)
        dist.print0(' '.join(f'{label} {dnnlib.util.format_time(value):<12s}' if fmt == 'time' else f'{label} {value:{fmt}}' for label, _name, value, fmt in progress))
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

        # Snapshot, training state, validation.
        kimg_str = f'{cur_nimg // 1000:06d}'
        if (snapshot_ticks is not None) and (done or cur_tick % snapshot_ticks == 0):
            save_snapshot(f'network-snapshot-{kimg_str}.pkl')
        if (state_dump_ticks is not None) and (done or cur_tick % state_dump_ticks == 0) and cur_tick != 0:
            save_state(f'training-state-{kimg_str}.pt')
        if (validation_fn is not None) and (val_every is not None) and (done or (cur_tick != 0 and cur_tick % val_every == 0)):
            wandb_media.update(validate())

        # Statistics to stats.jsonl and W&B.
        stats_collector.update()
        stats = stats_collector.as_dict()
        if rank == 0:
            if stats_jsonl is None:
                stats_jsonl = open(os.path.join(run_dir, 'stats.jsonl'), 'at')
            stats_jsonl.write(json.dumps(dict(stats, timestamp=time.time())) + '\n')
            stats_jsonl.flush()
            if wandb_run is not None:
                log = {name: value.mean for name, value in stats.items()}
                if wandb_media:
                    import wandb # pylint: disable=import-outside-toplevel
                    log.update({name: wandb.Image(value) if isinstance(value, np.ndarray) else value for name, value in wandb_media.items()})
                wandb_run.log(log, step=cur_nimg)
        wandb_media = dict()

        # Next tick.
        cur_tick += 1
        tick_start_nimg = cur_nimg
        tick_start_time = time.time()
        maintenance_time = tick_start_time - tick_end_time
        if done:
            break

    if stats_jsonl is not None:
        stats_jsonl.close()
    dist.print0()
    dist.print0('Done.')

#----------------------------------------------------------------------------

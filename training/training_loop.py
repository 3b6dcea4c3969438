"""The training loop: EDM diffusion training on one process or over the ranks
of `torchrun`, and the loop that other losses (consistency distillation) plug
into.

A run has two phases. `setup()` reads and checks everything the run starts
from, before any work and before the run directory exists: the dataset, the
batch layout, the teacher, the snapshot to start from, the training state
and the validation options. Each file is read once. Its errors are
ValueErrors of one sentence in the words of train.py's options.
`training_loop()` then trains on what setup() returned (or calls it first).

Hooks for other losses and for in-training evaluation, all optional:

* `loss_fn.set_progress(cur_nimg)` is called before every optimizer step and
  `loss_fn.update_target(net)` after it, when the loss has these methods.
* `loss_fn.state_dict()` / `loss_fn.load_state_dict(state)`, when present,
  carry the loss's own state through training states (exact resume).
* `loss_fn.frozen_parameters(net, augment_pipe)`, when present, names
  parameters that the loss never uses; they are not trained (no gradient,
  which DDP requires).
* `loss_fn` is pickled into every snapshot; a loss that must not carry a
  member (a teacher network) drops it in its own `__getstate__`.
* `snapshot_extras` adds entries to every snapshot.
* `teacher_pkl` loads a snapshot's `ema` as a frozen teacher (eval mode, no
  gradients, on the device; `load_teacher()`: on the project's class of a
  pickle's network, guided by `gnet_pkl` with weight `guidance` when given)
  and hands it to `loss_fn.set_teacher()`; the teacher runs in
  `teacher_precision`, by default the precision of the trained network
  (training/precision.py; reduced precision takes effect on CUDA). A resumed run
  loads it again from the same path. A `resume_pkl` equal to `teacher_pkl`
  starts the network from the teacher itself (same class, names and shapes).
* The dataset's encoder (training/encoders.py) turns its batches into what
  the network sees: pixels into [-1, 1]; EDM2's raw latents (.npy, the VAE
  posterior's mean and std) into a posterior draw, normalized, with the VAE
  that `vae_name` or the dataset's dataset.json names. The network is sized
  by the encoder's output; a latent run records the encoder in its snapshots
  (`encoder`, as EDM2's) and hands it to validation, which decodes.
* `phema_stds` adds EDM2's power-function EMA profiles (training/phema.py):
  every snapshot tick writes `network-snapshot-<kimg:07d>-<sigma_rel:.3f>.pkl`
  for each, besides EDM's `network-snapshot-<kimg:06d>.pkl` of the classic EMA
  (none with `ema_halflife_kimg=None`, EDM2's setting). Validation and the
  snapshots it keeps use the classic EMA, else the first profile.
* A step whose gradient is not finite is skipped (weights, EMA, target and
  optimizer untouched; `Loss/skipped_steps` counts it); when a tick held more
  than `max_bad_steps` in a row, or with non-finite weights at a snapshot or
  training state, the loop raises `TrainingStopped` (one sentence) before it
  saves anything, so that the last good snapshot and state stay the newest
  ones. The skip and the count happen on the device (training/steps.py) and
  are read once per tick, like the statistics: a step reads nothing back to
  the host.
* `compile_networks` runs the student, the teacher and the target through
  torch.compile (training/compiling.py); the optimizer is fused Adam on CUDA.
* `lr_decay_batches` switches the learning rate to EDM2's schedule: the same
  linear ramp-up, then ref_lr / sqrt(steps / lr_decay_batches).
* `validation_fn` is called every `val_every` ticks on all ranks and returns
  figures for `stats.jsonl` and W&B. Given as a dict, the `check_options`
  function of its module (if any) checks its options in setup().

Rank-count independence: the global batch of optimizer step s is positions
[s * batch_size, (s + 1) * batch_size) of the image stream
(`misc.InfiniteSampler`); rank r takes the contiguous block r of it and cuts
it into its rounds of `batch_gpu`, so micro-batch m = r * rounds + k of the
global batch holds the same images whatever the numbers of ranks and rounds.
Before each micro-batch the torch generators are seeded from (seed, s, m)
(`steps.accumulate_gradients`), so its noise, noise levels, edges,
augmentation and dropout are the same too. Each micro-batch's loss is divided
by the global batch and DDP sums the gradients (`steps.distributed`). Runs of
the same global batch on any number of ranks and rounds thus compute the same
per-micro-batch gradients and differ at most in the rounding of their sum:
on the CPU, 2 ranks of one round give bitwise the weights of 1 rank of two
rounds (with the same number of threads per process).

Exact resume: a training state (training/checkpoint.py) holds the network,
EMA, optimizer and loss states, the images seen, the last finished tick, the
seed, the batch layout and the generator states of every rank. The data
order and the random numbers of a step are functions of the seed and the
images seen, so a resumed run is bit-identical to an uninterrupted one when
it uses the same options, seed, number of ranks and `batch_gpu` (and, on
GPUs, deterministic kernels); with another layout it sees the same data and
random numbers, up to the rounding of the gradient sums. A training state also
holds the settings of its run (`run_settings`) and a content hash of the
teacher: setup() lists the changes in RESUME_KEEPS and refuses all others.
"""

import contextlib
import copy
import importlib
import inspect
import json
import os
import random
import time

import numpy as np
import psutil
import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from torch_utils import training_stats
from training import checkpoint
from training import compiling
from training import encoders
from training import guidance as guidance_lib
from training import phema
from training import precision as precisions
from training import samplers
from training import steps

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

#----------------------------------------------------------------------------
# Divergence.

class TrainingStopped(Exception):
    """The run stopped for a reason the user can act on (divergence, an unreadable image), said in one sentence."""

def _check_finite(modules, cur_tick, cur_nimg, fix):
    """Raise TrainingStopped when a parameter of the modules is not finite, before it is saved."""
    for module in modules:
        if not all(bool(torch.isfinite(p).all()) for p in module.parameters()):
            raise TrainingStopped(f'Training diverged at tick {cur_tick} ({cur_nimg / 1e3:g} kimg): the weights are no longer finite, '
                f'so nothing more is saved; {fix}.')

#----------------------------------------------------------------------------
# Figures.

def _is_scalar(value):
    """True for a number, or a tensor or array that holds exactly one."""
    if isinstance(value, (bool, int, float, np.number)):
        return True
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, np.ndarray) and value.size == 1

#----------------------------------------------------------------------------
# Everything a run starts from, read and checked before any work.

def _open_dataset(dataset_kwargs):
    """The dataset object; its errors name --data, or --cond for missing labels."""
    try:
        return dnnlib.util.construct_class_by_name(**dataset_kwargs)
    except ValueError as err:
        if dataset_kwargs.get('use_labels'):
            _open_dataset(dict(dataset_kwargs, use_labels=False))
            raise ValueError(f'--cond=True needs class labels, but {dataset_kwargs["path"]} has none that can be used; pass --cond=False or rebuild it with labels using dataset_tool.py.') from err
        raise ValueError(f'--data: {err}') from err

def _load_network(path, option):
    """The `ema` network of a snapshot; its errors name the option that gave the path."""
    try:
        return checkpoint.load_snapshot(path)['ema']
    except ValueError as err:
        raise ValueError(f'{option}: {err}') from err

def load_teacher(teacher_pkl, gnet_pkl=None, guidance=None):
    """The frozen teacher of a distillation: the `ema` of `teacher_pkl` on the
    project's implementation of its class (checkpoint.on_project_class), guided
    by the `ema` of `gnet_pkl` with weight `guidance` (training/guidance.py).
    Says once when it lacks sigma_min, sigma_max or round_sigma."""
    guidance_lib.check_guidance(gnet_pkl, guidance)
    dist.print0(f'Loading the teacher "{teacher_pkl}"...')
    net = checkpoint.on_project_class(_load_network(teacher_pkl, '--teacher'))
    note = samplers.noise_range_note(net, 'The teacher', 'the noise levels of the distillation\'s grids (--sigma_min, --sigma_max)')
    if note is not None:
        dist.print0(note)
    if gnet_pkl is None:
        return net.eval().requires_grad_(False)
    dist.print0(f'Loading the guide "{gnet_pkl}" (guidance {guidance:g})...')
    gnet = checkpoint.on_project_class(_load_network(gnet_pkl, '--gnet'), what='The guide')
    guidance_lib.check_guide(net, gnet, where=f'The guide "{gnet_pkl}"')
    return guidance_lib.guided(net, gnet, guidance, gnet_name=gnet_pkl).eval().requires_grad_(False)

def _check_fits_data(net, dataset_obj, data, where, interface):
    """A network's resolution, channels and classes against the dataset of the run
    (`interface`: those of the network it implies, after the encoder)."""
    values = {}
    for attr in ('img_resolution', 'img_channels', 'label_dim'):
        values[attr] = getattr(net, attr, None)
        if not isinstance(values[attr], int):
            raise ValueError(f'{where} holds a {type(net).__name__} without an integer {attr}; pass a network snapshot of an EDM-style network.')
    res, ch, labels = values['img_resolution'], values['img_channels'], values['label_dim']
    data_res, data_ch = interface['img_resolution'], interface['img_channels']
    latent = getattr(dataset_obj, 'is_latent', False)
    if latent and (ch, res) != (data_ch, data_res):
        raise ValueError(f'{where} works on {ch}-channel {res}x{res} images, but {data} holds VAE latents ({data_ch}x{data_res}x{data_res} once encoded); '
            f'pass a teacher trained on such latents (e.g. an edm2-img512 snapshot), or --data with pixel images for this teacher.')
    if not latent and ch == encoders.LATENT_CHANNELS and ch != data_ch:
        raise ValueError(f'{where} works on {ch}-channel VAE latents, but {data} holds {data_ch}-channel pixel images; '
            f'pass --data with their latents (dataset_tool.py encode), or a pixel teacher.')
    if res != data_res:
        raise ValueError(f'{where} works on {res}x{res} images, but {data} holds {data_res}x{data_res} images; pass --data at the teacher\'s resolution.')
    if ch != data_ch:
        raise ValueError(f'{where} works on {ch}-channel images, but {data} holds {data_ch}-channel images; pass --data with the teacher\'s channels.')
    if labels != dataset_obj.label_dim:
        if dataset_obj.label_dim == 0:
            raise ValueError(f'{where} is conditioned on {labels} classes, but this run is unconditional; pass --cond=True with a dataset of {labels} classes.')
        if labels == 0:
            raise ValueError(f'{where} is unconditional, but this run has --cond=True; pass --cond=False.')
        raise ValueError(f'{where} is conditioned on {labels} classes, but {data} has {dataset_obj.label_dim}; pass a dataset with the teacher\'s {labels} classes.')

RESUME_KEEPS = ( # Settings a resumed run may change and stay one run; a change of any other is refused.
    'total_kimg', 'kimg_per_tick', 'snapshot_ticks', 'state_dump_ticks', 'validation_fn', 'val_every', 'val_at_start', 'data_loader_kwargs',
    'dataset_kwargs.path', 'dataset_kwargs.cache', 'batch_gpu', 'cudnn_benchmark', 'max_bad_steps', 'teacher_pkl', 'gnet_pkl', 'vae_name',
    'teacher_precision', 'compile_networks')
NOT_SETTINGS = ( # Keywords of training_loop() (and their entries) that say where a run starts or what it found, not what it is.
    'run_dir', 'snapshot_extras', 'wandb_run', 'device', 'inputs', 'resume_pkl', 'resume_state_dump', 'dataset_kwargs.resolution', 'dataset_kwargs.max_size')

def run_settings(loop_kwargs):
    """The settings of a run, from keyword arguments of training_loop() (the others at their defaults),
    as flat JSON values with `name.key` for dict entries."""
    flat = dict()
    def add(prefix, value):
        if prefix in NOT_SETTINGS:
            return
        if isinstance(value, dict):
            for key, item in value.items():
                add(f'{prefix}.{key}', item)
        else:
            flat[prefix] = json.loads(json.dumps(value, default=repr))
    defaults = {param.name: param.default for param in inspect.signature(training_loop).parameters.values()}
    for name, value in dict(defaults, **loop_kwargs).items():
        add(name, value)
    return flat

def _check_resume(state, path, shapes, settings, loss_fn, teacher_digest):
    """A training state against the settings of the run that continues it: changes that keep the run one run are
    logged, others (and a teacher of other content) refused. Training states without settings are compared on their
    network and loss."""
    what, fix = f'The --resume state "{path}"', 'resume with the options of the run that wrote it'
    checkpoint.check_tensors({k: v.shape for k, v in state['net'].items()}, shapes, what, fix, require_all=True)
    old = state.get('settings') or run_settings(dict(network_kwargs=state['network_kwargs'], loss_kwargs=state['loss_kwargs']))
    kept = lambda name: any(name == key or name.startswith(key + '.') for key in RESUME_KEEPS)
    defaults = run_settings(dict())
    changed = [(name, old.get(name), settings.get(name)) for name in sorted(set(old) | set(settings))
        if old.get(name) != settings.get(name) and (name in old or 'settings' in state) and not (name == 'seed' and settings[name] is None)
        and not (name not in old and settings.get(name) == defaults.get(name))] # A setting newer than the state, at its default, is no change.
    refused = [f'{name} {a!r} -> {b!r}' for name, a, b in changed if not kept(name)]
    if state.get('teacher_digest') is not None and state['teacher_digest'] != teacher_digest:
        refused.append('the teacher (its weights differ)')
    if refused:
        raise ValueError(f'{what} belongs to a run with other settings ({", ".join(refused)}); {fix}, or start a new run from one of its snapshots with --transfer.')
    if state['cur_nimg'] >= settings['total_kimg'] * 1000:
        raise ValueError(f'{what} has already seen {state["cur_nimg"] / 1e6:g} Mimg, which reaches --duration={settings["total_kimg"] / 1000:g}; pass a longer --duration.')
    for name, a, b in changed:
        dist.print0(f'Resuming with {name} changed from {a!r} to {b!r} (the run stays one run).')

def _check_validation(validation_fn, image_shape, device):
    """The options of a validation function given as a dict, by its module's check_options()."""
    if not isinstance(validation_fn, dict):
        return
    module_name = validation_fn['func_name'].rsplit('.', 1)[0]
    check = getattr(importlib.import_module(module_name), 'check_options', None)
    if check is not None:
        try:
            check(image_shape, device=device, **validation_fn)
        except ValueError as err:
            raise ValueError(f'--val: {err}') from err

def setup(
    dataset_kwargs      = {},       # class_name and arguments of the dataset.
    network_kwargs      = {},       # class_name and arguments of the network.
    loss_kwargs         = {},       # class_name and arguments of the loss.
    seed                = None,     # Seed of the run; None = the resumed run's, else random.
    batch_size          = 512,      # Images per optimizer step, over all ranks.
    batch_gpu           = None,     # Most images per rank and pass, None = all of the rank's share.
    total_kimg          = 200000,   # Length of the run, in thousands of images.
    resume_pkl          = None,     # Snapshot whose `ema` the network starts from.
    teacher_pkl         = None,     # Snapshot whose `ema` is the frozen teacher.
    gnet_pkl            = None,     # Snapshot whose `ema` guides the teacher, None = no guidance.
    vae_name            = None,     # VAE of a latent dataset (hub name or folder), None = the one its dataset.json records.
    guidance            = None,     # Guidance weight of the teacher (with gnet_pkl).
    teacher             = None,     # load_teacher() of the above when the caller has it already (train.py).
    resume_state_dump   = None,     # Training state to continue from, or a run directory (its newest state).
    validation_fn       = None,     # Periodic evaluation (its options are checked).
    phema_stds          = None,     # sigma_rel of the power-function EMA profiles (checked).
    device              = None,     # torch.device of this rank, None = CUDA when available.
    **loop_kwargs,                  # The other keyword arguments of training_loop(), compared with a resumed run's.
):
    """Read and check everything the run starts from (see the module doc);
    call on all ranks. Returns an EasyDict for training_loop(inputs=...)."""
    settings = run_settings(dict(loop_kwargs, dataset_kwargs=dataset_kwargs, network_kwargs=network_kwargs, loss_kwargs=loss_kwargs, seed=seed,
        batch_size=batch_size, batch_gpu=batch_gpu, total_kimg=total_kimg, teacher_pkl=teacher_pkl, gnet_pkl=gnet_pkl, guidance=guidance,
        validation_fn=validation_fn, phema_stds=phema_stds))
    device = torch.device(device if device is not None else ('cuda' if torch.cuda.is_available() else 'cpu'))
    world_size = dist.get_world_size()

    # The global batch split over ranks and accumulation rounds.
    if batch_size % world_size != 0:
        raise ValueError(f'--batch={batch_size} does not divide over {world_size} ranks; pass a multiple of {world_size}.')
    batch_gpu_total = batch_size // world_size
    batch_gpu = min(batch_gpu or batch_gpu_total, batch_gpu_total)
    if batch_gpu_total % batch_gpu != 0:
        raise ValueError(f'--batch={batch_size} gives {batch_gpu_total} images per rank, which --batch-gpu={batch_gpu} does not divide; pass a --batch that is a multiple of {world_size * batch_gpu}.')

    # The dataset, and the names and shapes of the network it implies.
    dataset_obj = _open_dataset(dataset_kwargs)
    if hasattr(dataset_obj, 'check_headers'):
        try:
            dataset_obj.check_headers()
        except ValueError as err:
            raise ValueError(f'--data: {err}') from err
    encoder = encoders.dataset_encoder(dataset_obj, vae_name)
    try:
        latent_shape = encoder.encode_latents(torch.zeros([1, *dataset_obj.image_shape])).shape # The network's images: final latents.
        interface_kwargs = dict(img_resolution=latent_shape[-1], img_channels=latent_shape[1], label_dim=dataset_obj.label_dim)
    except ValueError as err:
        raise ValueError(f'--data: {err}') from err
    image_shape = [dataset_obj.num_channels, dataset_obj.resolution, dataset_obj.resolution]
    if encoders.is_latent(encoder):
        if loop_kwargs.get('augment_kwargs') is not None:
            raise ValueError(f'--augment={loop_kwargs["augment_kwargs"].get("p")} augments pixel images, but --data holds VAE latents; pass --augment=0.')
        try:
            with dist.rank0_first():
                encoder.init(device)
        except ValueError as err:
            raise ValueError(f'--data: {dataset_kwargs["path"]} holds latents of the VAE "{encoder.vae_name}", which cannot be loaded ({str(err).split("; ")[0]}); '
                f'pass --vae with its folder (AutoencoderKL.save_pretrained) or hub name.') from err
        if validation_fn is not None: # The decoded images that validation's detector sees.
            image_shape = list(encoder.decode(torch.zeros([1, *latent_shape[1:]], device=device)).shape[1:])
    shapes = checkpoint.network_shapes(network_kwargs, interface_kwargs)

    # The loss and its teacher; the grids the teacher gives must leave no segment empty.
    loss_fn = dnnlib.util.construct_class_by_name(**loss_kwargs)
    teacher_digest = None
    if teacher_pkl is not None:
        if not hasattr(loss_fn, 'set_teacher'):
            raise ValueError(f'teacher_pkl="{teacher_pkl}" was given, but the loss {type(loss_fn).__name__} takes no teacher; use a loss with set_teacher() or leave teacher_pkl out.')
        teacher = load_teacher(teacher_pkl, gnet_pkl, guidance) if teacher is None else teacher
        teacher_digest = checkpoint.tensor_digest(teacher)
        _check_fits_data(teacher, dataset_obj, dataset_kwargs['path'], f'The teacher "{teacher_pkl}"', interface_kwargs)
        net_precision = precisions.resolve(loop_kwargs.get('precision'), network_kwargs.get('use_fp16', False))
        precisions.check_network(guidance_lib.unwrap(teacher), loop_kwargs.get('teacher_precision') or net_precision, f'The teacher "{teacher_pkl}"')
        loss_fn.set_teacher(teacher)

    # The weights the network starts from: the teacher's (same class, names and shapes) or a --transfer snapshot's.
    init_net = None
    if resume_pkl is not None and resume_pkl == teacher_pkl:
        fix = 'pass the teacher\'s architecture options (--arch, --precond, --cbase, --cres, --cond, --augment) or --student_init=random'
        student_class = network_kwargs['class_name'].split('.')[-1]
        init_net = guidance_lib.unwrap(teacher)
        if type(init_net).__name__ != student_class:
            raise ValueError(f'The teacher "{teacher_pkl}" is of class {type(init_net).__name__}, but the student would be of class {student_class}; {fix}.')
        checkpoint.check_tensors(checkpoint.tensor_shapes(init_net), shapes, f'The teacher "{teacher_pkl}"', fix, require_all=True)
    elif resume_pkl is not None:
        init_net = _load_network(resume_pkl, '--transfer')
        fix = 'choose the --arch, --cbase, --cres, --cond and --augment of the network in it'
        checkpoint.check_tensors(checkpoint.tensor_shapes(init_net), shapes, f'The --transfer snapshot "{resume_pkl}"', fix)

    # The training state to continue from.
    state = None
    if resume_state_dump is not None:
        try:
            resume_state_dump = checkpoint.find_state(resume_state_dump)
            state = checkpoint.load_training_state(resume_state_dump)
        except ValueError as err:
            raise ValueError(f'--resume: {err}') from err
        _check_resume(state, resume_state_dump, shapes, settings, loss_fn, teacher_digest)

    _check_validation(validation_fn, image_shape, device)
    if phema_stds is not None:
        phema.check_stds(phema_stds)
    if seed is None:
        seed = int(state['seed']) if state is not None else dist.broadcast_object(int.from_bytes(os.urandom(4), 'little') % (1 << 31))
    return dnnlib.EasyDict(dataset_obj=dataset_obj, encoder=encoder, interface_kwargs=interface_kwargs, loss_fn=loss_fn, teacher=teacher, teacher_digest=teacher_digest,
        init_net=init_net, state=state, resume_state_dump=resume_state_dump, seed=seed, batch_gpu=batch_gpu, num_accumulation_rounds=batch_gpu_total // batch_gpu, device=device)

#----------------------------------------------------------------------------

def training_loop(
    run_dir             = '.',      # Where the files go; None on ranks other than 0.
    dataset_kwargs      = {},       # class_name and arguments of the dataset.
    data_loader_kwargs  = {},       # Arguments of torch.utils.data.DataLoader.
    network_kwargs      = {},       # class_name and arguments of the network (preconditioning wrapper).
    loss_kwargs         = {},       # class_name and arguments of the loss.
    optimizer_kwargs    = {},       # class_name and arguments of the optimizer; `lr` is the peak.
    augment_kwargs      = None,     # class_name and arguments of the augmentation pipeline, None = none.
    seed                = None,     # Seed of the data order and of every rank's generators; None = see setup().
    batch_size          = 512,      # Images per optimizer step, over all ranks.
    batch_gpu           = None,     # Most images per rank and pass, None = all of the rank's share.
    total_kimg          = 200000,   # Stop after this many thousand images.
    ema_halflife_kimg   = 500,      # Half-life of the weight average, in thousands of images; None = no such EMA.
    ema_rampup_ratio    = 0.05,     # Early cap on the half-life as a fraction of the images seen, None = no cap.
    phema_stds          = None,     # sigma_rel of power-function EMA profiles (EDM2's), None = none.
    lr_rampup_kimg      = 10000,    # Length of the linear learning-rate warm-up.
    lr_decay_batches    = None,     # EDM2's inverse-square-root decay after this many steps, None = none.
    max_bad_steps       = 100,      # Stop after this many consecutive steps with a non-finite loss or gradient.
    loss_scaling        = 1,        # Factor on the loss before backpropagation (FP16 range).
    precision           = None,     # Networks in 'fp32', 'fp16' or 'bf16' (CUDA only); None = 'fp16' with network_kwargs' use_fp16, else 'fp32'.
    teacher_precision   = None,     # The teacher's precision, None = the network's.
    compile_networks    = False,    # Run student, teacher and target through torch.compile (eager where it is unavailable)?
    kimg_per_tick       = 50,       # Progress line and statistics every this many thousand images.
    snapshot_ticks      = 50,       # Network snapshot every this many ticks, None = never.
    state_dump_ticks    = 500,      # Training state every this many ticks, None = never.
    resume_pkl          = None,     # Initialise the network and EMA from this snapshot's `ema`, by name.
    teacher_pkl         = None,     # Frozen teacher for loss_fn.set_teacher(): this snapshot's `ema`, None = none.
    gnet_pkl            = None,     # Guide of the teacher: this snapshot's `ema`, None = no guidance (training/guidance.py).
    vae_name            = None,     # VAE of a latent dataset, None = the one its dataset.json records (training/encoders.py).
    guidance            = None,     # Guidance weight of the teacher, with gnet_pkl.
    resume_state_dump   = None,     # Continue exactly from this training state.
    cudnn_benchmark     = True,     # Let cuDNN pick the fastest kernels?
    snapshot_extras     = None,     # Extra snapshot entries: a dict, or a callable (net, ema, loss_fn, cur_nimg) -> dict.
    validation_fn       = None,     # Periodic evaluation: a callable, or a dict with `func_name` and its own arguments.
    val_every           = None,     # Call validation_fn every this many ticks (and at the end), None = never.
    val_at_start        = False,    # Also call validation_fn once before the first step?
    wandb_run           = None,     # A W&B run to log the statistics to (rank 0 only), None = no W&B.
    device              = None,     # torch.device of this rank, None = CUDA when available, else the CPU.
    inputs              = None,     # What setup() returned for these arguments, None = call it here.
):
    """Train `network_kwargs` with `loss_kwargs` on `dataset_kwargs`; write
    `stats.jsonl`, `network-snapshot-<kimg>.pkl` (with its code-free
    `.safetensors` twin) and `training-state-<kimg>.pt` into `run_dir`.

    `validation_fn` is called on all ranks, under preserved random number
    generator states, with the keyword arguments net (the EMA, in eval mode),
    loss_fn, cur_tick, cur_nimg, run_dir, device and save_snapshot (a function
    of a file name that writes the current snapshot into run_dir; call it on
    all ranks), and in a latent run `encoder` (to decode the samples). It returns a dict: numbers go to the statistics as
    `Validation/<name>` and to W&B, other values (images) to W&B only.
    """
    loop_kwargs = dict(locals())
    start_time = time.time()
    if inputs is None:
        inputs = setup(**loop_kwargs)
    device, seed, dataset_obj, loss_fn, state = inputs.device, inputs.seed, inputs.dataset_obj, inputs.loss_fn, inputs.state
    encoder, latent = inputs.encoder, encoders.is_latent(inputs.encoder) # Latent runs record the encoder in their snapshots and pass it to validation.
    settings = run_settings(dict(loop_kwargs, seed=seed))
    teacher_digest = inputs.teacher_digest
    batch_gpu, num_accumulation_rounds = inputs.batch_gpu, inputs.num_accumulation_rounds
    batch_gpu_total = batch_gpu * num_accumulation_rounds

    # Seeds and numerics.
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
    cur_nimg = int(state['cur_nimg']) if state is not None else 0
    cur_tick = int(state['cur_tick']) + 1 if state is not None else 0

    # Data, in the order of the global image stream: each rank takes its contiguous share of every global batch.
    dataset_sampler = misc.InfiniteSampler(dataset=dataset_obj, rank=rank, num_replicas=world_size, seed=seed, start_idx=cur_nimg, block=batch_gpu_total)
    dataset_iterator = iter(torch.utils.data.DataLoader(dataset=dataset_obj, sampler=dataset_sampler, batch_size=batch_gpu, **data_loader_kwargs))

    # The network, with a summary on rank 0.
    dist.print0('Building the network...' + (f' ({torch.get_num_threads()} CPU threads per rank)' if device.type == 'cpu' else ''))
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **inputs.interface_kwargs)
    net.train().requires_grad_(True).to(device)
    if rank == 0:
        with torch.no_grad():
            example = [torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution]), torch.ones([batch_gpu]), torch.zeros([batch_gpu, net.label_dim])]
            misc.print_module_summary(net, [t.to(device) for t in example], max_nesting=2)

    # Optimizer, augmentation, DDP wrapper and EMA.
    dist.print0('Setting up the optimizer and EMA...')
    optimizer = steps.make_optimizer(net.parameters(), optimizer_kwargs, device)
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
    frozen = set(loss_fn.frozen_parameters(net, augment_pipe) if hasattr(loss_fn, 'frozen_parameters') else [])
    for name, param in net.named_parameters():
        param.requires_grad_(name not in frozen) # DDP expects a gradient of every parameter that requires one.
    student = compiling.compile_network(net) if compile_networks else net
    ddp = steps.distributed(student, device) if dist.is_distributed() else student
    ema = copy.deepcopy(net).eval().requires_grad_(False) if ema_halflife_kimg is not None else None

    # The frozen teacher in its precision (that of the network unless teacher_precision says otherwise); the weights to start from.
    net_precision = precisions.resolve(precision, network_kwargs.get('use_fp16', False))
    if inputs.teacher is not None:
        loss_fn.set_teacher(precisions.Teacher(inputs.teacher.to(device), teacher_precision or net_precision))
    if compile_networks and hasattr(loss_fn, 'set_compile'):
        loss_fn.set_compile(compiling.compile_network)
    if inputs.init_net is not None:
        dist.print0(f'Copying the weights of "{resume_pkl}"...')
        misc.copy_params_and_buffers(src_module=inputs.init_net, dst_module=net, require_all=False)
        if ema is not None:
            misc.copy_params_and_buffers(src_module=inputs.init_net, dst_module=ema, require_all=False)
    pf_ema = phema.PowerFunctionEMA(net, stds=phema_stds) if phema_stds is not None else None
    for module in ([] if pf_ema is None else pf_ema.emas):
        module.eval().requires_grad_(False)

    # Continue from a training state; the generators come last, after everything that draws from them.
    if state is not None:
        dist.print0(f'Continuing from the training state "{inputs.resume_state_dump}"...')
        net.load_state_dict(state['net'])
        if ema is not None:
            ema.load_state_dict(state['ema'])
        if pf_ema is not None:
            pf_ema.load_state_dict(state['phema'])
        optimizer.load_state_dict(state['optimizer_state'])
        for group in optimizer.param_groups: # Fused or not is this run's choice (the device's), not part of the state.
            group['fused'] = optimizer.defaults.get('fused')
        if state.get('loss_state') is not None and hasattr(loss_fn, 'load_state_dict'):
            loss_fn.load_state_dict(state['loss_state'])
        same_layout = (state['world_size'] == world_size and state['batch_gpu'] == batch_gpu and state['seed'] == seed)
        if same_layout:
            set_rng_states(state['rng_states'][rank], device)
        else:
            dist.print0('The number of ranks or the batch per rank differs from the saved run: it continues with the same data and random numbers, '
                'but its gradient sums may round differently.')
    del inputs, state

    divergence_fix = f'lower the learning rate (--lr={optimizer_kwargs["lr"]:g}) or lengthen its warm-up (--lr_rampup), and resume from the last training state'

    # Snapshots and training states, never of non-finite weights; the network of validation and of `snapshot_extras` is the EMA, else the first profile.
    eval_net = ema if ema is not None else pf_ema.emas[0] if pf_ema is not None else net
    def save_snapshot(file_name, snapshot_net=None):
        snapshot_net = eval_net if snapshot_net is None else snapshot_net
        _check_finite([snapshot_net], cur_tick, cur_nimg, divergence_fix)
        extras = snapshot_extras(net=net, ema=snapshot_net, loss_fn=loss_fn, cur_nimg=cur_nimg) if callable(snapshot_extras) else snapshot_extras
        extras = dict(extras or {}, **(dict(encoder=encoder) if latent else {}))
        data = checkpoint.snapshot_data(ema=snapshot_net, loss_fn=loss_fn, augment_pipe=augment_pipe, dataset_kwargs=dataset_kwargs, extras=extras)
        if rank == 0:
            checkpoint.save_snapshot(os.path.join(run_dir, file_name), data)

    def save_state(file_name):
        _check_finite([net] + ([] if ema is None else [ema]) + ([] if pf_ema is None else pf_ema.emas), cur_tick, cur_nimg, divergence_fix)
        rng_states = dist.gather_objects(get_rng_states(device))
        if rank == 0:
            checkpoint.save_training_state(os.path.join(run_dir, file_name), dict(net=net.state_dict(),
                ema=(ema.state_dict() if ema is not None else None), phema=(pf_ema.state_dict() if pf_ema is not None else None),
                phema_stds=phema_stds, optimizer_state=optimizer.state_dict(), loss_state=(loss_fn.state_dict() if hasattr(loss_fn, 'state_dict') else None),
                cur_nimg=cur_nimg, cur_tick=cur_tick, seed=seed, batch_size=batch_size, batch_gpu=batch_gpu, world_size=world_size,
                rng_states=rng_states, network_kwargs=dict(network_kwargs), loss_kwargs=dict(loss_kwargs), settings=settings,
                teacher_digest=teacher_digest))

    # Validation.
    def validate():
        kwargs = dict(net=eval_net, loss_fn=loss_fn, cur_tick=cur_tick, cur_nimg=cur_nimg, run_dir=run_dir, device=device, save_snapshot=save_snapshot,
            **(dict(encoder=encoder) if latent else {}))
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
    bad_steps = worst_bad_steps = torch.zeros([], dtype=torch.int64, device=device) # Consecutive steps skipped for a non-finite gradient; the most of this tick.
    tick_start_nimg = cur_nimg
    tick_start_time = time.time()
    maintenance_time = tick_start_time - start_time
    def next_batch():
        try:
            images, labels = next(dataset_iterator)
        except ValueError as err: # The dataset's sentence, also from a data-loader worker (the last line of its traceback).
            reason = str(err).strip().splitlines()[-1].removeprefix('ValueError: ')
            raise TrainingStopped(f'Training stopped at tick {cur_tick} ({cur_nimg / 1e3:g} kimg): {reason}') from err
        return encoder.encode_latents(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
    while True:

        # One optimizer step over the global batch.
        if hasattr(loss_fn, 'set_progress'):
            loss_fn.set_progress(cur_nimg)
        optimizer.zero_grad(set_to_none=True)
        steps.accumulate_gradients(ddp, loss_fn, next_batch, num_accumulation_rounds, batch_size, loss_scaling=loss_scaling, augment_pipe=augment_pipe,
            seed=seed, step=cur_nimg // batch_size, first_index=rank * num_accumulation_rounds, precision=net_precision)
        lr = steps.learning_rate(base_lr, cur_nimg, lr_rampup_kimg, batch_size=batch_size, decay_batches=lr_decay_batches)
        grad_norm = steps.optimizer_step(net, optimizer, lr, loss_scaling=loss_scaling)
        finite = torch.isfinite(grad_norm) # On the device: counted here, read once per tick.
        bad_steps = torch.where(finite, 0, bad_steps + 1)
        worst_bad_steps = torch.maximum(worst_bad_steps, bad_steps)
        training_stats.report0('Loss/skipped_steps', (~finite).to(torch.float32))
        training_stats.report0('Loss/grad_norm', grad_norm, mask=finite)
        training_stats.report0('Progress/lr', lr)
        steps.update_target(loss_fn, net, finite) # A skipped step leaves the weights, the EMA, the target and the optimizer as they were.
        if ema is not None:
            steps.update_ema(ema, net, cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio, finite=finite)
        if pf_ema is not None: # A profile of training time: after a skipped step it averages the unchanged weights.
            pf_ema.update(cur_nimg + batch_size, batch_size)

        # Count the images; go on unless the tick (or the run) is over.
        cur_nimg += batch_size
        done = (cur_nimg >= total_kimg * 1000)
        if (not done) and (cur_tick != 0) and (cur_nimg < tick_start_nimg + kimg_per_tick * 1000):
            continue

        # Divergence: more than max_bad_steps consecutive skipped steps in this tick.
        if int(worst_bad_steps) > max_bad_steps:
            raise TrainingStopped(f'Training diverged at tick {cur_tick} ({cur_nimg / 1e3:g} kimg): {int(worst_bad_steps)} consecutive steps had a non-finite '
                f'loss or gradient and were skipped; {divergence_fix}.')
        worst_bad_steps = bad_steps

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
            if ema is not None:
                save_snapshot(f'network-snapshot-{kimg_str}.pkl')
            for profile, suffix in ([] if pf_ema is None else pf_ema.get()):
                save_snapshot(f'network-snapshot-{cur_nimg // 1000:07d}{suffix}.pkl', profile) # EDM2's names.
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

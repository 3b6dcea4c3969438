"""The training loop of EDM, EDM2 and the losses that plug into it, on one process or torchrun's ranks; it trains
on what training/preflight.py read and checked (docs/architecture.md)."""

import copy
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
from training import phema
from training import precision as precisions
from training import steps

#----------------------------------------------------------------------------

def get_rng_states(device):
    """The states of the torch (CPU, CUDA), NumPy and Python generators."""
    states = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if device.type == 'cuda':
        states['cuda'] = torch.cuda.get_rng_state(device)
    return states

def set_rng_states(states, device):
    torch.set_rng_state(states['torch'])
    np.random.set_state(states['numpy'])
    random.setstate(states['python'])
    if device.type == 'cuda':
        torch.cuda.set_rng_state(states['cuda'], device)

class TrainingStopped(Exception):
    """The run stopped for a reason the user can act on."""

PROBE_SIGMAS = (0.002, 0.01, 0.1, 1, 10, 80) # The finite-output check's noise levels.

def _check_finite(modules, cur_tick, cur_nimg, fix):
    """TrainingStopped unless every module has finite weights and outputs on a fixed probe batch (eval mode)."""
    for module in modules:
        mode = module.training
        finite = all(bool(torch.isfinite(p).all()) for p in module.parameters()) and \
            bool(torch.isfinite(misc.probe_outputs(module.eval(), PROBE_SIGMAS)).all())
        module.train(mode)
        if not finite:
            raise TrainingStopped(f'Training diverged at tick {cur_tick} ({cur_nimg / 1e3:g} kimg): the network no '
                f'longer gives finite outputs, so nothing more is saved; {fix}.')

NOT_SETTINGS = ('run_dir', 'snapshot_extras', 'wandb_run', 'device', 'inputs', 'resume_pkl', 'resume_state_dump',
    'dataset_kwargs.resolution', 'dataset_kwargs.max_size') # Where a run starts or what it found.

def run_settings(loop_kwargs):
    """The keywords of training_loop(), defaults filled in, as flat JSON (`name.key` for dicts)."""
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

#----------------------------------------------------------------------------

def training_loop(
    run_dir             = '.',      # None on ranks other than 0.
    dataset_kwargs      = {},
    data_loader_kwargs  = {},       # Of torch.utils.data.DataLoader.
    network_kwargs      = {},       # Of the preconditioning wrapper.
    loss_kwargs         = {},
    optimizer_kwargs    = {},       # `lr` is the peak.
    augment_kwargs      = None,     # None = no augmentation.
    seed                = None,     # None = see preflight.setup().
    batch_size          = 512,      # Over all ranks.
    batch_gpu           = None,     # Most images per rank and pass, None = the rank's share.
    total_kimg          = 200000,
    ema_halflife_kimg   = 500,      # None = no such EMA.
    ema_rampup_ratio    = 0.05,     # Cap on the half-life as a share of the images seen, None = no cap.
    phema_stds          = None,     # sigma_rel of EDM2's power-function EMAs, None = none.
    lr_rampup_kimg      = 10000,
    lr_decay_batches    = None,     # EDM2's inverse-sqrt decay after this many steps, None = none.
    max_bad_steps       = 100,      # Consecutive non-finite steps before stopping.
    loss_scaling        = 1,
    precision           = None,     # 'fp32', 'fp16', 'bf16'; None = 'fp16' with use_fp16, else 'fp32'.
    teacher_precision   = None,     # None = the network's.
    compile_networks    = False,    # torch.compile student, teacher and target?
    kimg_per_tick       = 50,
    snapshot_ticks      = 50,       # None = never.
    state_dump_ticks    = 500,      # None = never.
    resume_pkl          = None,     # Initialise the network and EMA from this snapshot.
    teacher_pkl         = None,     # For loss_fn.set_teacher(), None = none.
    gnet_pkl            = None,     # Guide of the teacher, None = no guidance.
    vae_name            = None,     # None = the one the dataset.json records.
    guidance            = None,     # Guidance weight, with gnet_pkl.
    resume_state_dump   = None,     # Continue exactly from this training state.
    cudnn_benchmark     = True,
    snapshot_extras     = None,     # A dict or a callable (net, ema, loss_fn, cur_nimg).
    validation_fn       = None,     # A callable, or a dict with `func_name`.
    val_every           = None,     # Ticks (and at the end), None = never.
    val_at_start        = False,
    wandb_run           = None,     # Rank 0 only.
    device              = None,     # None = CUDA when available.
    inputs              = None,
):
    """Train on what preflight.setup() returned for the same keywords."""
    loop_kwargs = dict(locals())
    start_time = time.time()
    device, seed, loss_fn, state = inputs.device, inputs.seed, inputs.loss_fn, inputs.state
    encoder, latent, teacher_digest = inputs.encoder, encoders.is_latent(inputs.encoder), inputs.teacher_digest
    settings = run_settings(dict(loop_kwargs, seed=seed))
    batch_gpu, num_accumulation_rounds = inputs.batch_gpu, inputs.num_accumulation_rounds

    # Seeds and numerics.
    rank, world_size = dist.get_rank(), dist.get_world_size()
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

    # Data: each rank takes its contiguous share of every global batch.
    dataset_sampler = misc.InfiniteSampler(dataset=inputs.dataset_obj, rank=rank, num_replicas=world_size, seed=seed,
        start_idx=cur_nimg, block=batch_gpu * num_accumulation_rounds)
    dataset_iterator = iter(torch.utils.data.DataLoader(dataset=inputs.dataset_obj, sampler=dataset_sampler,
        batch_size=batch_gpu, **data_loader_kwargs))

    # Network.
    threads = f' ({torch.get_num_threads()} CPU threads per rank)' if device.type == 'cpu' else ''
    dist.print0(f'Building the network...{threads}')
    net = dnnlib.util.construct_class_by_name(**network_kwargs, **inputs.interface_kwargs)
    net.train().requires_grad_(True).to(device)
    if rank == 0:
        with torch.no_grad():
            images = torch.zeros([batch_gpu, net.img_channels, net.img_resolution, net.img_resolution])
            example = [images, torch.ones([batch_gpu]), torch.zeros([batch_gpu, net.label_dim])]
            misc.print_module_summary(net, [t.to(device) for t in example], max_nesting=2)

    # Optimizer, augmentation, DDP wrapper and EMA.
    dist.print0('Setting up the optimizer and EMA...')
    optimizer = steps.make_optimizer(net.parameters(), optimizer_kwargs, device)
    augment_pipe = dnnlib.util.construct_class_by_name(**augment_kwargs) if augment_kwargs is not None else None
    frozen = set(loss_fn.frozen_parameters(net, augment_pipe) if hasattr(loss_fn, 'frozen_parameters') else [])
    for name, param in net.named_parameters():
        param.requires_grad_(name not in frozen) # DDP expects a gradient of every such parameter.
    student = compiling.compile_network(net) if compile_networks else net
    ddp = steps.distributed(student, device) if dist.is_distributed() else student
    ema = copy.deepcopy(net).eval().requires_grad_(False) if ema_halflife_kimg is not None else None

    # Teacher; initial weights.
    net_precision = precisions.resolve(precision, network_kwargs.get('use_fp16', False))
    if inputs.teacher is not None:
        loss_fn.set_teacher(precisions.Teacher(inputs.teacher.to(device), teacher_precision or net_precision))
    if compile_networks and hasattr(loss_fn, 'set_compile'):
        loss_fn.set_compile(compiling.compile_network)
    if inputs.init_net is not None:
        dist.print0(f'Copying the weights of "{resume_pkl}"...')
        for module in [net] + ([] if ema is None else [ema]):
            misc.copy_params_and_buffers(src_module=inputs.init_net, dst_module=module, require_all=False)
    pf_ema = phema.PowerFunctionEMA(net, stds=phema_stds) if phema_stds is not None else None
    for module in ([] if pf_ema is None else pf_ema.emas):
        module.eval().requires_grad_(False)

    # Training state; the generators last, after all that draws from them.
    if state is not None:
        dist.print0(f'Continuing from the training state "{inputs.resume_state_dump}"...')
        checkpoint.restore_training_state(state, net=net, ema=ema, pf_ema=pf_ema, optimizer=optimizer, loss_fn=loss_fn)
        if (state['world_size'], state['batch_gpu'], state['seed']) == (world_size, batch_gpu, seed):
            set_rng_states(state['rng_states'][rank], device)
        else:
            dist.print0('The number of ranks or the batch per rank differs from the saved run: it continues with the '
                'same data and random numbers, but its gradient sums may round differently.')
    last_state = inputs.resume_state_dump # The newest training state that passed _check_finite().
    wandb_id = wandb_run.id if wandb_run is not None else (state or {}).get('wandb_id') # A resume continues it.
    del inputs, state
    fix = lambda: 'lower the learning rate or lengthen its warm-up, and ' + \
        (f'resume from "{last_state}"' if last_state is not None else 'start again')

    # Snapshots and training states; validation sees the EMA, else the first profile.
    eval_net = ema if ema is not None else pf_ema.emas[0] if pf_ema is not None else net
    def save_snapshot(file_name, snapshot_net=eval_net):
        _check_finite([snapshot_net], cur_tick, cur_nimg, fix())
        extras = snapshot_extras(net=net, ema=snapshot_net, loss_fn=loss_fn, cur_nimg=cur_nimg) \
            if callable(snapshot_extras) else snapshot_extras
        data = checkpoint.snapshot_data(ema=snapshot_net, loss_fn=loss_fn, augment_pipe=augment_pipe,
            dataset_kwargs=dataset_kwargs, encoder=(encoder if latent else None), extras=extras)
        if rank == 0:
            checkpoint.save_snapshot(os.path.join(run_dir, file_name), data)

    def save_state(file_name):
        nonlocal last_state
        emas = ([] if ema is None else [ema]) + ([] if pf_ema is None else pf_ema.emas)
        _check_finite([net] + emas, cur_tick, cur_nimg, fix())
        rng_states = dist.gather_objects(get_rng_states(device))
        last_state = os.path.join(run_dir or '', file_name)
        if rank == 0:
            checkpoint.save_training_state(last_state, checkpoint.training_state(net=net,
                ema=ema, pf_ema=pf_ema, optimizer=optimizer, loss_fn=loss_fn, network_kwargs=network_kwargs,
                loss_kwargs=loss_kwargs, cur_nimg=cur_nimg, cur_tick=cur_tick, seed=seed, batch_size=batch_size,
                batch_gpu=batch_gpu, world_size=world_size, rng_states=rng_states, settings=settings,
                teacher_digest=teacher_digest, wandb_id=wandb_id))

    # Validation: scalars to the statistics, the rest to W&B.
    def validate():
        kwargs = dict(net=eval_net, loss_fn=loss_fn, cur_tick=cur_tick, cur_nimg=cur_nimg, run_dir=run_dir,
            device=device, save_snapshot=save_snapshot, **(dict(encoder=encoder) if latent else {}))
        rng_states = get_rng_states(device) # The training stream does not notice validation.
        try:
            figures = validation_fn(**kwargs) if callable(validation_fn) else \
                dnnlib.util.call_func_by_name(**validation_fn, **kwargs)
        finally:
            set_rng_states(rng_states, device)
        media = dict()
        for name, value in (figures or {}).items():
            scalar = value.numel() == 1 if isinstance(value, torch.Tensor) else \
                isinstance(value, (bool, int, float, np.number)) or (isinstance(value, np.ndarray) and value.size == 1)
            if scalar:
                training_stats.report0(f'Validation/{name}', float(value))
            else:
                media[f'Validation/{name}'] = value
        return media

    stats_collector = training_stats.Collector(keep_previous=False)
    stats_jsonl, wandb_media = None, dict()
    if validation_fn is not None and val_at_start:
        dist.print0('Validating before the first step...')
        wandb_media = validate()

    # Main loop.
    dist.print0(f'Training until {total_kimg} kimg...\n')
    bad_steps = worst_bad_steps = torch.zeros([], dtype=torch.int64, device=device)
    tick_start_nimg, tick_start_time = cur_nimg, time.time()
    maintenance_time = tick_start_time - start_time
    def next_batch():
        try:
            images, labels = next(dataset_iterator)
        except ValueError as err: # Also from a data-loader worker: its traceback's last line.
            reason = str(err).strip().splitlines()[-1].removeprefix('ValueError: ')
            raise TrainingStopped(f'Training stopped at tick {cur_tick} ({cur_nimg / 1e3:g} kimg): {reason}') from err
        return encoder.encode_latents(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
    while True:

        # Optimizer step.
        if hasattr(loss_fn, 'set_progress'):
            loss_fn.set_progress(cur_nimg)
        optimizer.zero_grad(set_to_none=True)
        steps.accumulate_gradients(ddp, loss_fn, next_batch, num_accumulation_rounds, batch_size,
            loss_scaling=loss_scaling, augment_pipe=augment_pipe, seed=seed, step=cur_nimg // batch_size,
            first_index=rank * num_accumulation_rounds, precision=net_precision)
        lr = steps.learning_rate(optimizer_kwargs['lr'], cur_nimg, lr_rampup_kimg, batch_size, lr_decay_batches)
        grad_norm = steps.optimizer_step(net, optimizer, lr, loss_scaling=loss_scaling)
        finite = torch.isfinite(grad_norm) # On the device: counted here, read once per tick.
        bad_steps = torch.where(finite, 0, bad_steps + 1)
        worst_bad_steps = torch.maximum(worst_bad_steps, bad_steps)
        training_stats.report0('Loss/skipped_steps', (~finite).to(torch.float32))
        training_stats.report0('Loss/grad_norm', grad_norm, mask=finite)
        training_stats.report0('Progress/lr', lr)
        steps.update_target(loss_fn, net, finite) # A skipped step changes no weights, EMAs or target.
        if ema is not None:
            steps.update_ema(ema, net, cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio, finite=finite)
        if pf_ema is not None: # After a skipped step it averages the unchanged weights.
            pf_ema.update(cur_nimg + batch_size, batch_size)

        # Tick over?
        cur_nimg += batch_size
        done = (cur_nimg >= total_kimg * 1000)
        if (not done) and (cur_tick != 0) and (cur_nimg < tick_start_nimg + kimg_per_tick * 1000):
            continue

        if int(worst_bad_steps) > max_bad_steps:
            raise TrainingStopped(f'Training diverged at tick {cur_tick} ({cur_nimg / 1e3:g} kimg): '
                f'{int(worst_bad_steps)} consecutive steps had a non-finite loss or gradient; {fix()}.')
        worst_bad_steps = bad_steps

        # Progress line.
        tick_end_time = time.time()
        tick_sec = tick_end_time - tick_start_time
        gib = lambda fn: fn(device) / 2**30 if device.type == 'cuda' else 0
        report0 = training_stats.report0
        dist.print0(' '.join([
            f"tick {report0('Progress/tick', cur_tick):<5d}",
            f"kimg {report0('Progress/kimg', cur_nimg / 1e3):<9.1f}",
            f"time {dnnlib.util.format_time(report0('Timing/total_sec', tick_end_time - start_time)):<12s}",
            f"sec/tick {report0('Timing/sec_per_tick', tick_sec):<7.1f}",
            f"sec/kimg {report0('Timing/sec_per_kimg', tick_sec / (cur_nimg - tick_start_nimg) * 1e3):<7.2f}",
            f"maintenance {report0('Timing/maintenance_sec', maintenance_time):<6.1f}",
            f"cpumem {report0('Resources/cpu_mem_gb', psutil.Process().memory_info().rss / 2**30):<6.2f}",
            f"gpumem {report0('Resources/peak_gpu_mem_gb', gib(torch.cuda.max_memory_allocated)):<6.2f}",
            f"reserved {report0('Resources/peak_gpu_mem_reserved_gb', gib(torch.cuda.max_memory_reserved)):<6.2f}"]))
        if device.type == 'cuda':
            torch.cuda.reset_peak_memory_stats(device)

        # Snapshot, training state, validation.
        due = lambda every: every is not None and (done or cur_tick % every == 0)
        if due(snapshot_ticks):
            if ema is not None:
                save_snapshot(f'network-snapshot-{cur_nimg // 1000:06d}.pkl')
            for profile, suffix in ([] if pf_ema is None else pf_ema.get()):
                save_snapshot(f'network-snapshot-{cur_nimg // 1000:07d}{suffix}.pkl', profile) # EDM2's names.
        if due(state_dump_ticks) and cur_tick != 0:
            save_state(f'training-state-{cur_nimg // 1000:06d}.pt')
        if validation_fn is not None and due(val_every) and (done or cur_tick != 0):
            wandb_media.update(validate())

        # Statistics.
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
                    log.update({name: wandb.Image(value) if isinstance(value, np.ndarray) else value
                        for name, value in wandb_media.items()})
                wandb_run.log(log) # Against Progress/kimg (train.init_wandb).
        wandb_media = dict()

        # Next tick.
        cur_tick += 1
        tick_start_nimg, tick_start_time = cur_nimg, time.time()
        maintenance_time = tick_start_time - tick_end_time
        if done:
            break

    if stats_jsonl is not None:
        stats_jsonl.close()
    dist.print0('\nDone.')

#----------------------------------------------------------------------------

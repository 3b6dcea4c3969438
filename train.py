"""Train diffusion models in the EDM framework, or distil one into a
multistep consistency student (--consistency=True), on one process or over
the ranks of `torchrun`.

Distillation (cd-spec; decisions where it is silent):
* The teacher is the `ema` of --teacher (path or URL), loaded like
  --transfer, frozen, and checked against the data (resolution, channels,
  classes) before any work starts. It runs in the student's precision (with
  --fp16 on CUDA, in fp16). A resumed run (the same command line plus
  --resume) loads it again from --teacher.
* The student is built from the usual options. With --student_init=teacher
  (the default) it starts from the teacher's weights, which requires the
  same preconditioning class and the same tensor names and shapes.
  --transfer=PKL instead starts it from that snapshot's `ema` (by name, as in
  plain training, e.g. a student with a larger S), and excludes
  --student_init. The evaluation EMA follows --ema and --ema_rampup as in EDM
  training; the target network's own EMA is --cd_target_ema.
* Snapshots carry `consistency` = dict(S, student_sigmas), so generate.py
  samples the student without flags. The run directory's name ends in
  `-cd<S>`. A resumed run must keep the student grid (--S,
  --student_sigmas, --sigma_min, --sigma_max, --rho).
* The options of distillation are refused without --consistency=True.
"""

import importlib
import json
import os
import re

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from training import consistency_ops
from training import loss_cd
from training import training_loop
from training import validation

#----------------------------------------------------------------------------
# Presets of --arch (EDM's) and the classes of --precond.

ARCH_PRESETS = dict(
    ddpmpp  = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1,1], model_channels=128, channel_mult=[2,2,2]),
    ncsnpp  = dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1,3,3,1], model_channels=128, channel_mult=[2,2,2]),
    adm     = dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1,2,3,4]),
)

AUGMENT_PRESET = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1) # Probability multipliers of --augment.

PRECOND_CLASSES = dict( # --precond -> (network class, loss class)
    vp      = ('training.networks.VPPrecond', 'training.loss.VPLoss'),
    ve      = ('training.networks.VEPrecond', 'training.loss.VELoss'),
    edm     = ('training.networks.EDMPrecond', 'training.loss.EDMLoss'),
)

CD_OPTIONS = ['teacher', 'student_init', 'S', 'student_sigmas', 'T_start', 'T_end', 'T_anneal_kimg', 'T_anneal', 'rho', 'sigma_min', 'sigma_max',
    'sampling_mode', 'terminal_anchor', 'terminal_prob', 'terminal_teacher_hop', 'cd_target_mode', 'cd_target_ema', 'sync_dropout',
    'cd_loss', 'cd_huber_c', 'cd_weight_mode'] # Options that only --consistency=True uses.
STUDENT_GRID_KEYS = ['S', 'student_sigmas', 'sigma_min', 'sigma_max', 'rho'] # Loss keywords that a resumed run must keep.

#----------------------------------------------------------------------------
# Option parsing helpers.

def parse_int_list(s):
    """'1,2,3' or '1-3' (or a mix) -> [1, 2, 3]; a list passes through."""
    if s is None or isinstance(s, list):
        return s
    values = []
    for part in s.split(','):
        match = re.fullmatch(r'\s*(\d+)\s*-\s*(\d+)\s*', part)
        try:
            values += list(range(int(match.group(1)), int(match.group(2)) + 1)) if match else [int(part)]
        except ValueError:
            raise click.BadParameter(f'"{s}" is not a list of integers; pass e.g. 1,2,2 or 1-3.')
    return values

def parse_str_list(s):
    """'a,b' -> ['a', 'b']; empty items are dropped."""
    if s is None or isinstance(s, list):
        return s
    return [item.strip() for item in s.split(',') if item.strip()]

def rank0_check(fn):
    """Run `fn` on rank 0 only and raise its ClickException on every rank, so
    that all ranks stop together. Returns fn's result on rank 0, None elsewhere."""
    result, message = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except click.ClickException as err:
            message = err.message
    if dist.get_world_size() > 1:
        box = [message]
        torch.distributed.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise click.ClickException(message)
    return result

def broadcast_from_rank0(value):
    """Rank 0's value of a picklable object, on every rank."""
    if dist.get_world_size() == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]

#----------------------------------------------------------------------------
# Checks of files that a run starts from.

def network_for_checks(c, dataset_obj):
    """The network the options describe, for shape checks: on the meta device
    (no memory) when its constructor allows, else on the CPU."""
    interface_kwargs = dict(img_resolution=dataset_obj.resolution, img_channels=dataset_obj.num_channels, label_dim=dataset_obj.label_dim)
    try:
        with torch.device('meta'):
            return dnnlib.util.construct_class_by_name(**c.network_kwargs, **interface_kwargs)
    except Exception: # pylint: disable=broad-except
        return dnnlib.util.construct_class_by_name(**c.network_kwargs, **interface_kwargs)

def setup_transfer(opts, c, dataset_obj):
    """--transfer: check that the snapshot's network fits the one to train."""
    try:
        data = training_loop.load_snapshot(opts.transfer)
    except ValueError as err:
        raise click.ClickException(f'--transfer: {err}')
    shapes = {name: t.shape for name, t in list(data['ema'].named_parameters()) + list(data['ema'].named_buffers())}
    del data
    fix = 'choose the --arch, --cbase, --cres, --cond and --augment of the network in it'
    try:
        training_loop.check_tensors(shapes, network_for_checks(c, dataset_obj), f'The --transfer snapshot "{opts.transfer}"', fix)
    except ValueError as err:
        raise click.ClickException(str(err))
    c.resume_pkl = opts.transfer

def setup_resume(opts, c, dataset_obj):
    """--resume: find the training state and check that it belongs to this configuration."""
    path = opts.resume
    if os.path.isdir(path):
        path = training_loop.find_latest_state(path)
        if path is None:
            raise click.ClickException(f'--resume={opts.resume} is a folder without training-state-*.pt files; pass a training state or a run directory that holds one.')
    elif not os.path.isfile(path):
        raise click.ClickException(f'--resume={opts.resume} does not exist; pass a training-state-*.pt file or the run directory that holds it.')
    try:
        state = training_loop.load_training_state(path, mmap=True)
    except ValueError as err:
        raise click.ClickException(f'--resume: {err}')
    fix = 'resume with the options of the run that wrote it'
    try:
        training_loop.check_tensors({k: v.shape for k, v in state['net'].items()}, network_for_checks(c, dataset_obj), f'The --resume state "{path}"', fix, require_all=True)
    except ValueError as err:
        raise click.ClickException(str(err))
    for key in ('class_name', 'model_type'):
        if state['network_kwargs'].get(key) != c.network_kwargs.get(key):
            raise click.ClickException(f'The --resume state "{path}" was written for {key}={state["network_kwargs"].get(key)}, but this run has {c.network_kwargs.get(key)}; {fix}.')
    if state['loss_kwargs'].get('class_name') != c.loss_kwargs.get('class_name'):
        raise click.ClickException(f'The --resume state "{path}" was written with the loss {state["loss_kwargs"].get("class_name")}, but this run uses {c.loss_kwargs.get("class_name")}; {fix}.')
    if opts.consistency:
        for key in STUDENT_GRID_KEYS:
            if state['loss_kwargs'].get(key) != c.loss_kwargs.get(key):
                raise click.ClickException(f'The --resume state "{path}" was written for the student grid {key}={state["loss_kwargs"].get(key)}, but this run has {key}={c.loss_kwargs.get(key)}; {fix}.')
    if state['cur_nimg'] >= c.total_kimg * 1000:
        raise click.ClickException(f'The --resume state "{path}" has already seen {state["cur_nimg"] / 1e6:g} Mimg, which reaches --duration={opts.duration:g}; pass a longer --duration.')
    if opts.seed is None:
        c.seed = int(state['seed'])
    c.resume_state_dump = path

#----------------------------------------------------------------------------
# Consistency distillation.

def parse_student_sigmas(text):
    """--student_sigmas: a layout name, or the interior sigmas as a list of floats."""
    if text in ('karras', 'karras_open'):
        return text
    try:
        return [float(v) for v in text.split(',') if v.strip()]
    except ValueError:
        raise click.ClickException(f'--student_sigmas={text} is neither karras, karras_open nor a comma-separated list of numbers; pass a layout name or the S-1 interior sigmas, e.g. 2.5,0.5,0.1.') from None

def check_teacher_fits_data(opts, teacher, dataset_obj):
    """The teacher's resolution, channels and classes against the dataset of the run."""
    where = f'The teacher "{opts.teacher}"'
    values = {}
    for attr in ('img_resolution', 'img_channels', 'label_dim'):
        values[attr] = getattr(teacher, attr, None)
        if not isinstance(values[attr], int):
            raise click.ClickException(f'{where} holds a {type(teacher).__name__} without an integer {attr}; pass a network snapshot of an EDM-style network.')
    res, ch, labels = values['img_resolution'], values['img_channels'], values['label_dim']
    if res != dataset_obj.resolution:
        raise click.ClickException(f'{where} works on {res}x{res} images, but {opts.data} holds {dataset_obj.resolution}x{dataset_obj.resolution} images; pass --data at the teacher\'s resolution.')
    if ch != dataset_obj.num_channels:
        raise click.ClickException(f'{where} works on {ch}-channel images, but {opts.data} holds {dataset_obj.num_channels}-channel images; pass --data with the teacher\'s channels.')
    if labels != dataset_obj.label_dim:
        if dataset_obj.label_dim == 0:
            raise click.ClickException(f'{where} is conditioned on {labels} classes, but this run is unconditional; pass --cond=True with a dataset of {labels} classes.')
        if labels == 0:
            raise click.ClickException(f'{where} is unconditional, but this run has --cond=True; pass --cond=False.')
        raise click.ClickException(f'{where} is conditioned on {labels} classes, but {opts.data} has {dataset_obj.label_dim}; pass a dataset with the teacher\'s {labels} classes.')

def setup_consistency(opts, c, dataset_obj):
    """--consistency=True: the distillation loss, its teacher, and the weights the student starts from."""
    if opts.teacher is None:
        raise click.ClickException('--consistency=True needs a teacher to distil; pass --teacher with a network snapshot (path or URL).')
    if opts.terminal_prob is not None and not 0 < opts.terminal_prob < 1:
        raise click.ClickException(f'--terminal_prob={opts.terminal_prob:g} is outside (0, 1); pass a probability strictly between 0 and 1, or leave it out for 1/T\'.')
    terminal_anchor = opts.terminal_anchor if opts.terminal_anchor is not None else (opts.sampling_mode != 'uniform')
    if opts.terminal_prob is not None and not terminal_anchor:
        raise click.ClickException(f'--terminal_prob={opts.terminal_prob:g} needs the terminal anchor, which is off here (--no_terminal_anchor, or the default of --sampling_mode=uniform); pass --terminal_anchor or leave --terminal_prob out.')
    if opts.transfer is not None and opts.student_init is not None:
        raise click.ClickException(f'--transfer and --student_init={opts.student_init} both choose the weights the student starts from; pass only one of them.')
    c.loss_kwargs = dnnlib.EasyDict(
        class_name              = 'training.loss_cd.ConsistencyDistillLoss',
        S                       = opts.S,
        T_start                 = opts.T_start,
        T_end                   = opts.T_end,
        T_anneal_kimg           = opts.T_anneal_kimg,
        T_anneal                = opts.T_anneal,
        rho                     = opts.rho,
        sigma_min               = opts.sigma_min,
        sigma_max               = opts.sigma_max,
        student_sigmas          = parse_student_sigmas(opts.student_sigmas),
        sampling_mode           = opts.sampling_mode,
        terminal_anchor         = terminal_anchor,
        terminal_prob           = opts.terminal_prob,
        terminal_teacher_hop    = opts.terminal_teacher_hop,
        target_mode             = opts.cd_target_mode,
        target_ema              = opts.cd_target_ema,
        sync_dropout            = opts.sync_dropout,
        loss                    = opts.cd_loss,
        huber_c                 = opts.cd_huber_c,
        weight_mode             = opts.cd_weight_mode,
    )

    # The teacher: a snapshot that fits the data; the grids it gives must leave no segment empty.
    try:
        teacher = training_loop.load_snapshot(opts.teacher)['ema']
    except ValueError as err:
        raise click.ClickException(f'--teacher: {err}')
    check_teacher_fits_data(opts, teacher, dataset_obj)
    try:
        dnnlib.util.construct_class_by_name(**c.loss_kwargs).set_teacher(teacher)
    except ValueError as err:
        raise click.ClickException(str(err))
    c.teacher_pkl = opts.teacher

    # The student's weights: the teacher's (same names and shapes), a --transfer snapshot's, or random.
    if opts.resume is None and opts.transfer is None and opts.student_init != 'random':
        fix = 'pass the teacher\'s architecture options (--arch, --precond, --cbase, --cres, --cond, --augment) or --student_init=random'
        student_class = c.network_kwargs.class_name.split('.')[-1]
        if type(teacher).__name__ != student_class:
            raise click.ClickException(f'The teacher "{opts.teacher}" is of class {type(teacher).__name__}, but the student would be of class {student_class}; {fix}.')
        shapes = {name: t.shape for name, t in list(teacher.named_parameters()) + list(teacher.named_buffers())}
        try:
            training_loop.check_tensors(shapes, network_for_checks(c, dataset_obj), f'The teacher "{opts.teacher}"', fix, require_all=True)
        except ValueError as err:
            raise click.ClickException(str(err))
        c.resume_pkl = opts.teacher

def setup_validation(opts, c, dataset_obj):
    """--val=1: the training loop's validation_fn (training/validation.py), checked on
    all ranks before any work: detector, reference statistics or dataset."""
    ref_data = opts.val_ref_data if (opts.val_ref_data is not None or opts.val_ref is not None) else opts.data
    c.validation_fn = dnnlib.EasyDict(
        func_name   = 'training.validation.validate',
        num         = opts.val_num,
        seed        = opts.val_seed,
        batch       = opts.val_batch,
        ref         = opts.val_ref,
        ref_data    = ref_data,
        detector    = opts.val_detector,
        teacher     = opts.val_teacher,
        agree_num   = opts.val_agree_num if opts.consistency else 0,
        workers     = opts.workers,
        resume_dir  = os.path.dirname(os.path.abspath(c.resume_state_dump)) if c.get('resume_state_dump') else None,
    )
    c.val_every = opts.val_every
    c.val_at_start = opts.val_at_start
    image_shape = [dataset_obj.num_channels, dataset_obj.resolution, dataset_obj.resolution]
    try:
        validation.check_options(image_shape, device=opts.device, **c.validation_fn)
    except ValueError as err:
        raise click.ClickException(f'--val: {err}')

def student_snapshot_entry(loss_fn, **_kwargs):
    """The `consistency` entry of a student's snapshots (S and the student grid), from which
    `generate.py --sampler=auto` samples the student."""
    return dict(consistency=dict(S=int(loss_fn.S), student_sigmas=[float(v) for v in loss_fn.student_sigmas().tolist()]))

#----------------------------------------------------------------------------
# Options -> keyword arguments of the training loop.

def setup_training_config(opts):
    """Translate the command-line options into the keyword arguments of
    training_loop.training_loop(). Every check of the user's input happens
    here, before any work starts, and stops with a ClickException.
    Returns (config, description of the run for its directory name)."""
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data, use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=(opts.device_type == 'cuda'), num_workers=opts.workers)
    if opts.workers > 0:
        c.data_loader_kwargs.update(prefetch_factor=2, multiprocessing_context='spawn')
    c.network_kwargs = dnnlib.EasyDict()
    c.loss_kwargs = dnnlib.EasyDict()
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=[0.9, 0.999], eps=1e-8)

    # Dataset.
    try:
        dataset_obj = dnnlib.util.construct_class_by_name(**dict(c.dataset_kwargs, use_labels=False))
    except ValueError as err:
        raise click.ClickException(f'--data: {err}')
    if opts.cond:
        try:
            dataset_obj = dnnlib.util.construct_class_by_name(**c.dataset_kwargs)
        except ValueError as err:
            raise click.ClickException(f'--cond=True needs class labels, but {opts.data} has none that can be used; pass --cond=False or rebuild it with labels using dataset_tool.py.') from err
    try:
        c.dataset_kwargs.resolution = dataset_obj.resolution
    except ValueError as err:
        raise click.ClickException(f'--data: {err}')
    c.dataset_kwargs.max_size = len(dataset_obj)

    # Network preset, preconditioning and loss.
    c.network_kwargs.update(ARCH_PRESETS[opts.arch])
    c.network_kwargs.class_name, c.loss_kwargs.class_name = PRECOND_CLASSES[opts.precond]

    # Channels, augmentation, dropout, precision.
    c.network_kwargs.update({key: value for key, value in [('model_channels', opts.cbase), ('channel_mult', opts.cres)] if value is not None})
    if opts.augment > 0:
        c.augment_kwargs = dnnlib.EasyDict(AUGMENT_PRESET, class_name='training.augment.AugmentPipe', p=opts.augment)
        c.network_kwargs.augment_dim = 9 # The pipeline's conditioning labels.
    c.network_kwargs.update(dropout=opts.dropout, use_fp16=opts.fp16)

    # Schedule and output intervals.
    if opts.ema_rampup is None:
        ema_rampup_ratio = None if opts.transfer is not None else 0.05
    else:
        ema_rampup_ratio = opts.ema_rampup if opts.ema_rampup > 0 else None
    c.update(
        total_kimg          = max(int(opts.duration * 1000), 1),
        ema_halflife_kimg   = opts.ema * 1000,
        ema_rampup_ratio    = ema_rampup_ratio,
        lr_rampup_kimg      = opts.lr_rampup,
        batch_size          = opts.batch,
        batch_gpu           = opts.batch_gpu,
        loss_scaling        = opts.ls,
        cudnn_benchmark     = opts.bench,
        kimg_per_tick       = opts.tick,
        snapshot_ticks      = opts.snap,
        state_dump_ticks    = opts.dump,
    )

    # Batch layout over the ranks.
    world_size = dist.get_world_size()
    if opts.batch % world_size != 0:
        raise click.ClickException(f'--batch={opts.batch} does not divide over {world_size} ranks; pass a multiple of {world_size}.')
    batch_per_rank = opts.batch // world_size
    batch_gpu = min(opts.batch_gpu or batch_per_rank, batch_per_rank)
    if batch_per_rank % batch_gpu != 0:
        raise click.ClickException(f'--batch={opts.batch} gives {batch_per_rank} images per rank, which --batch-gpu={batch_gpu} does not divide; pass a --batch that is a multiple of {world_size * batch_gpu}.')

    # Random seed.
    c.seed = opts.seed if opts.seed is not None else broadcast_from_rank0(int.from_bytes(os.urandom(4), 'little') % (1 << 31))

    # Consistency distillation: its options only with --consistency=True.
    cd_given = opts.get('cd_given', {}) # Flags of the distillation options on the command line.
    if not opts.consistency and len(cd_given) > 0:
        raise click.ClickException(f'{next(iter(cd_given.values()))} applies only to consistency distillation; pass --consistency=True or leave it out.')
    if opts.consistency:
        setup_consistency(opts, c, dataset_obj)

    # Transfer learning or resume.
    if opts.transfer is not None and opts.resume is not None:
        raise click.ClickException('--transfer and --resume cannot be used together; --resume already restores the network.')
    if opts.transfer is not None:
        setup_transfer(opts, c, dataset_obj)
    if opts.resume is not None:
        setup_resume(opts, c, dataset_obj)

    # Validation during training.
    if opts.val:
        setup_validation(opts, c, dataset_obj)

    # W&B.
    if opts.wandb:
        def import_wandb():
            try:
                importlib.import_module('wandb')
            except Exception as err: # pylint: disable=broad-except
                raise click.ClickException(f'--wandb=True needs the wandb package, which cannot be imported ({err}); install it with "pip install wandb" or pass --wandb=False.')
        rank0_check(import_wandb)

    # Description of the run.
    cond_str = 'cond' if c.dataset_kwargs.use_labels else 'uncond'
    dtype_str = 'fp16' if c.network_kwargs.use_fp16 else 'fp32'
    desc = f'{dataset_obj.name}-{cond_str}-{opts.arch}-{opts.precond}-gpus{world_size}-batch{c.batch_size}-{dtype_str}'
    if opts.consistency:
        desc += f'-cd{opts.S}'
    if opts.desc is not None:
        desc += f'-{opts.desc}'
    del dataset_obj
    return c, desc

def pick_run_dir(opts, desc):
    """The run directory: `outdir` itself with --nosubdir, else `outdir/<next id>-<desc>`."""
    if opts.nosubdir:
        return opts.outdir
    prev_ids = []
    if os.path.isdir(opts.outdir):
        prev_ids = [re.match(r'^\d+', name) for name in os.listdir(opts.outdir) if os.path.isdir(os.path.join(opts.outdir, name))]
    cur_id = max((int(m.group()) for m in prev_ids if m is not None), default=-1) + 1
    return os.path.join(opts.outdir, f'{cur_id:05d}-{desc}')

def create_run_dir(opts, c):
    """Create the run directory and write training_options.json into it."""
    try:
        os.makedirs(c.run_dir, exist_ok=opts.nosubdir)
    except FileExistsError:
        raise click.ClickException(f'The run directory {c.run_dir} appeared while this run started (another run took the same id); start again.')
    options_text = json.dumps(c, indent=2).encode('utf-8')
    training_loop.write_atomic(os.path.join(c.run_dir, 'training_options.json'), lambda f: f.write(options_text))

def init_wandb(opts, c):
    """Start the W&B run of rank 0 inside the run directory."""
    import wandb # pylint: disable=import-outside-toplevel
    try:
        return wandb.init(project=opts.wandb_project, entity=opts.wandb_entity, name=(opts.wandb_run or os.path.basename(os.path.normpath(c.run_dir))),
            tags=opts.wandb_tags, mode=opts.wandb_mode, dir=c.run_dir, config=json.loads(json.dumps(c)))
    except Exception as err: # pylint: disable=broad-except
        raise click.ClickException(f'--wandb=True: W&B could not start a run ({err}); check the login and --wandb_project/--wandb_entity, use --wandb_mode=offline, or pass --wandb=False.')

#----------------------------------------------------------------------------

@click.command()

# What to train.
@click.option('--outdir',           help='Parent folder of the run directories', metavar='DIR',                type=str, required=True)
@click.option('--data',             help='Dataset zip or folder made by dataset_tool.py', metavar='ZIP|DIR',   type=str, required=True)
@click.option('--cond',             help='Condition on the class labels', metavar='BOOL',                     type=bool, default=False, show_default=True)
@click.option('--arch',             help='Network preset',                                                     type=click.Choice(['ddpmpp', 'ncsnpp', 'adm']), default='ddpmpp', show_default=True)
@click.option('--precond',          help='Preconditioning and loss',                                           type=click.Choice(['vp', 've', 'edm']), default='edm', show_default=True)

# Hyperparameters.
@click.option('--duration',         help='Images to train on, in millions', metavar='MIMG',                    type=click.FloatRange(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch',            help='Images per optimizer step, over all ranks', metavar='INT',           type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--batch-gpu',        help='Most images per rank and pass; more are accumulated', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase',            help='Base channel count  [default: preset]', metavar='INT',               type=click.IntRange(min=1))
@click.option('--cres',             help='Channel multiplier per resolution  [default: preset]', metavar='LIST', type=parse_int_list)
@click.option('--lr',               help='Peak learning rate', metavar='FLOAT',                                type=click.FloatRange(min=0, min_open=True), default=10e-4, show_default=True)
@click.option('--lr_rampup',        help='Length of the learning-rate warm-up', metavar='KIMG',                type=click.FloatRange(min=0), default=10000, show_default=True)
@click.option('--ema',              help='Half-life of the weight average', metavar='MIMG',                    type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--ema_rampup',       help='Cap on the EMA half-life as a fraction of the images seen, 0 = none  [default: 0.05, 0 with --transfer]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--dropout',          help='Dropout rate', metavar='FLOAT',                                      type=click.FloatRange(min=0, max=1), default=0.13, show_default=True)
@click.option('--augment',          help='Probability of augmenting an image, 0 = off', metavar='FLOAT',       type=click.FloatRange(min=0, max=1), default=0.12, show_default=True)
@click.option('--xflip',            help='Add mirrored copies of the images', metavar='BOOL',                  type=bool, default=False, show_default=True)

# Speed and devices.
@click.option('--fp16',             help='Run the network in float16 (CUDA only)', metavar='BOOL',            type=bool, default=False, show_default=True)
@click.option('--ls',               help='Factor on the loss before backpropagation', metavar='FLOAT',         type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option('--bench',            help='Let cuDNN pick the fastest kernels', metavar='BOOL',                 type=bool, default=True, show_default=True)
@click.option('--cache',            help='Keep decoded images in memory', metavar='BOOL',                      type=bool, default=True, show_default=True)
@click.option('--workers',          help='Data-loading processes per rank, 0 = none', metavar='INT',           type=click.IntRange(min=0), default=1, show_default=True)
@click.option('--device', 'device_type', help='Where each rank computes',                                      type=click.Choice(['auto', 'cuda', 'cpu']), default='auto', show_default=True)

# Output, schedule and starting point.
@click.option('--desc',             help='Suffix of the run directory name', metavar='STR',                    type=str)
@click.option('--nosubdir',         help='Write into --outdir itself, not a numbered run directory',           is_flag=True)
@click.option('--tick',             help='Progress line every this many kimg', metavar='KIMG',                 type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--snap',             help='Network snapshot every this many ticks', metavar='TICKS',            type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--dump',             help='Training state every this many ticks', metavar='TICKS',              type=click.IntRange(min=1), default=500, show_default=True)
@click.option('--seed',             help='Random seed  [default: random, or the resumed run\'s]', metavar='INT', type=int)
@click.option('--transfer',         help='Initialise the network from a snapshot\'s EMA', metavar='PKL|URL',   type=str)
@click.option('--resume',           help='Continue from a training state, or the newest in a run directory', metavar='PT|DIR', type=str)
@click.option('-n', '--dry-run',    help='Show the options and stop',                                          is_flag=True)

# Consistency distillation.
@click.option('--consistency',      help='Distil --teacher into a multistep consistency student', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--teacher',          help='Teacher network snapshot (its EMA)', metavar='PKL|URL',             type=str)
@click.option('--student_init',     help='Starting weights of the student  [default: teacher; none with --transfer]', type=click.Choice(['teacher', 'random']))
@click.option('--S', 'S',           help='Student steps (segments)', metavar='INT',                           type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--student_sigmas',   help='Student grid: karras, karras_open or the S-1 interior sigmas', metavar='NAME|LIST', type=str, default='karras', show_default=True)
@click.option('--T_start', 'T_start', help='Teacher edges at the start', metavar='INT',                       type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--T_end', 'T_end',   help='Teacher edges after the annealing', metavar='INT',                 type=click.IntRange(min=1), default=1280, show_default=True)
@click.option('--T_anneal_kimg', 'T_anneal_kimg', help='Length of the annealing of T, 0 = T_end at once', metavar='KIMG', type=click.FloatRange(min=0), default=10000, show_default=True)
@click.option('--T_anneal', 'T_anneal', help='Interpolation of T',                                           type=click.Choice(['geometric', 'linear']), default='geometric', show_default=True)
@click.option('--rho',              help='Exponent of the Karras grids', metavar='FLOAT',                      type=click.FloatRange(min=0, min_open=True), default=7, show_default=True)
@click.option('--sigma_min',        help='Lowest positive noise level of the grids', metavar='FLOAT',          type=click.FloatRange(min=0, min_open=True), default=0.002, show_default=True)
@click.option('--sigma_max',        help='Highest noise level of the grids', metavar='FLOAT',                  type=click.FloatRange(min=0, min_open=True), default=80, show_default=True)
@click.option('--sampling_mode',    help='Distribution of the teacher edges',                                  type=click.Choice(list(consistency_ops.SAMPLING_MODES)), default='vp', show_default=True)
@click.option('--terminal_anchor/--no_terminal_anchor', help='Fixed probability of the terminal edge  [default: on; off with uniform]', default=None)
@click.option('--terminal_prob',    help='That probability, in (0, 1)  [default: 1/T\']', metavar='FLOAT',     type=float)
@click.option('--terminal_teacher_hop', help='Terminal reference D_teacher(x_t) instead of the clean image',   is_flag=True)
@click.option('--cd_target_mode',   help='Target network',                                                     type=click.Choice(list(loss_cd.TARGET_MODES)), default='ema', show_default=True)
@click.option('--cd_target_ema',    help='Per-step decay of the ema target', metavar='FLOAT',                  type=click.FloatRange(min=0, max=1, max_open=True), default=0.95, show_default=True)
@click.option('--sync_dropout/--no_sync_dropout', help='Replay the student\'s dropout masks in the target pass  [default: on]', default=True)
@click.option('--cd_loss',          help='Distance of student and target',                                     type=click.Choice(list(loss_cd.LOSSES)), default='pseudo_huber', show_default=True)
@click.option('--cd_huber_c',       help='c of pseudo_huber, delta of huber  [default: 0.00054 sqrt(d), 0.00054]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--cd_weight_mode',   help='Weight lambda(sigma) of the loss',                                   type=click.Choice(list(loss_cd.WEIGHT_MODES)), default='sqrt_karras', show_default=True)

# Validation during training.
@click.option('--val',              help='Validate during training, 0 = off', metavar='0|1',                   type=click.IntRange(min=0, max=1), default=0, show_default=True)
@click.option('--val_every',        help='Validate every this many ticks, and at the end', metavar='TICKS',   type=click.IntRange(min=1), default=50, show_default=True)
@click.option('--val_at_start',     help='Also validate before the first step', metavar='BOOL',               type=bool, default=False, show_default=True)
@click.option('--val_num',          help='Images for the Frechet distance, 0 = agreement only', metavar='INT', type=click.IntRange(min=0), default=10000, show_default=True)
@click.option('--val_seed',         help='Seed of the first validation image', metavar='INT',                 type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--val_batch',        help='Images per sampler and detector call on each rank', metavar='INT',  type=click.IntRange(min=1), default=64, show_default=True)
@click.option('--val_ref',          help='Reference statistics of the dataset', metavar='NPZ|URL',            type=str)
@click.option('--val_ref_data',     help='Dataset to compute the reference statistics from  [default: --data]', metavar='ZIP|DIR', type=str)
@click.option('--val_detector',     help="Feature detector: 'inception', 'pixels', or a pickled network", metavar='NAME|PKL|URL', type=str, default='inception', show_default=True)
@click.option('--val_teacher',      help="Also the teacher's Frechet distance, once per run", metavar='BOOL',  type=bool, default=True, show_default=True)
@click.option('--val_agree_num',    help='Seeds of the teacher agreement (distillation), 0 = none', metavar='INT', type=click.IntRange(min=0), default=1000, show_default=True)

# Weights & Biases.
@click.option('--wandb',            help='Log the statistics to Weights & Biases (rank 0)', metavar='BOOL',    type=bool, default=False, show_default=True)
@click.option('--wandb_project',    help='W&B project', metavar='STR',                                         type=str, default='edm-cd', show_default=True)
@click.option('--wandb_entity',     help='W&B user or team  [default: your default entity]', metavar='STR',    type=str)
@click.option('--wandb_run',        help='W&B run name  [default: the run directory\'s name]', metavar='STR', type=str)
@click.option('--wandb_tags',       help='Comma-separated W&B tags', metavar='LIST',                           type=parse_str_list)
@click.option('--wandb_mode',       help='W&B mode',                                                           type=click.Choice(['online', 'offline', 'disabled']), default='online', show_default=True)

def main(**kwargs):
    """Train an EDM diffusion model (Karras et al. 2022) on a dataset made by
    dataset_tool.py, or distil a trained one into a multistep consistency
    student, in one process or in every process that torchrun starts.

    Examples:

    \b
    # Class-conditional CIFAR-10, DDPM++ preset, one node with 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp

    \b
    # A small network on the digits dataset, on the CPU
    python train.py --outdir=training-runs --data=datasets/digits-16x16.zip \\
        --cbase=32 --cres=1,2 --batch=64 --duration=0.05 --lr_rampup=5 --tick=1 --device=cpu

    \b
    # Distil it into a 4-step consistency student (same architecture options)
    python train.py --outdir=training-runs --data=datasets/digits-16x16.zip \\
        --cbase=32 --cres=1,2 --batch=64 --duration=0.05 --lr_rampup=5 --tick=1 --device=cpu \\
        --consistency=True --teacher=training-runs/00000-.../network-snapshot-000050.pkl \\
        --S=4 --T_start=16 --T_end=64 --T_anneal_kimg=40
    """
    opts = dnnlib.EasyDict(kwargs)
    ctx = click.get_current_context()
    params = {param.name: param for param in ctx.command.params}
    opts.cd_given = {name: '/'.join(params[name].opts + params[name].secondary_opts) for name in CD_OPTIONS
        if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)}
    try:
        device = dist.init(None if opts.device_type == 'auto' else opts.device_type)
    except ValueError as err:
        raise click.ClickException(f'--device={opts.device_type}: {err}')
    opts.device_type = device.type
    opts.device = device
    logger = None
    wandb_run = None
    try:
        c, desc = setup_training_config(opts)
        c.run_dir = pick_run_dir(opts, desc) if dist.get_rank() == 0 else None

        # Show the options.
        dist.print0()
        dist.print0('Training options:')
        dist.print0(json.dumps(c, indent=2))
        dist.print0()
        dist.print0(f'Run directory:    {c.run_dir}')
        dist.print0(f'Dataset:          {c.dataset_kwargs.path} ({"with" if c.dataset_kwargs.use_labels else "without"} labels)')
        dist.print0(f'Network:          {opts.arch}, {opts.precond} preconditioning, {"float16" if c.network_kwargs.use_fp16 else "float32"}' + (' (float16 needs CUDA)' if c.network_kwargs.use_fp16 and device.type != 'cuda' else ''))
        if opts.consistency:
            student_init = 'the teacher' if c.get('resume_pkl') == opts.teacher else (f'"{opts.transfer}"' if opts.transfer is not None else 'random')
            dist.print0(f'Distillation:     S={opts.S} student of "{opts.teacher}", starting from {student_init if opts.resume is None else "the --resume state"}')
        dist.print0(f'Ranks:            {dist.get_world_size()} on {device.type}')
        dist.print0(f'Batch:            {c.batch_size}')
        dist.print0()
        if opts.dry_run:
            dist.print0('Dry run: nothing written.')
            return

        # The run directory, then W&B.
        dist.print0('Creating the run directory...')
        rank0_check(lambda: create_run_dir(opts, c))
        if dist.get_rank() == 0:
            logger = dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True)
        if opts.wandb:
            wandb_run = rank0_check(lambda: init_wandb(opts, c))

        # Train.
        snapshot_extras = student_snapshot_entry if opts.consistency else None
        training_loop.training_loop(**c, snapshot_extras=snapshot_extras, wandb_run=wandb_run, device=device)
    except BaseException:
        if wandb_run is not None:
            wandb_run.finish(exit_code=1)
            wandb_run = None
        raise
    finally:
        if wandb_run is not None:
            wandb_run.finish()
        if logger is not None:
            logger.close()
        dist.shutdown()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------

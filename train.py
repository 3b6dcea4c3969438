"""Train diffusion models in the EDM framework, on one process or over the
ranks of `torchrun`."""

import importlib
import json
import os
import re

import click
import torch

import dnnlib
from torch_utils import distributed as dist
from training import training_loop

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
    if state['cur_nimg'] >= c.total_kimg * 1000:
        raise click.ClickException(f'The --resume state "{path}" has already seen {state["cur_nimg"] / 1e6:g} Mimg, which reaches --duration={opts.duration:g}; pass a longer --duration.')
    if opts.seed is None:
        c.seed = int(state['seed'])
    c.resume_state_dump = path

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

    # Transfer learning or resume.
    if opts.transfer is not None and opts.resume is not None:
        raise click.ClickException('--transfer and --resume cannot be used together; --resume already restores the network.')
    if opts.transfer is not None:
        setup_transfer(opts, c, dataset_obj)
    if opts.resume is not None:
        setup_resume(opts, c, dataset_obj)

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

# Weights & Biases.
@click.option('--wandb',            help='Log the statistics to Weights & Biases (rank 0)', metavar='BOOL',    type=bool, default=False, show_default=True)
@click.option('--wandb_project',    help='W&B project', metavar='STR',                                         type=str, default='edm-cd', show_default=True)
@click.option('--wandb_entity',     help='W&B user or team  [default: your default entity]', metavar='STR',    type=str)
@click.option('--wandb_run',        help='W&B run name  [default: the run directory\'s name]', metavar='STR', type=str)
@click.option('--wandb_tags',       help='Comma-separated W&B tags', metavar='LIST',                           type=parse_str_list)
@click.option('--wandb_mode',       help='W&B mode',                                                           type=click.Choice(['online', 'offline', 'disabled']), default='online', show_default=True)

def main(**kwargs):
    """Train an EDM diffusion model (Karras et al. 2022) on a dataset made by
    dataset_tool.py, in one process or in every process that torchrun starts.

    Examples:

    \b
    # Class-conditional CIFAR-10, DDPM++ preset, one node with 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp

    \b
    # A small network on the digits dataset, on the CPU
    python train.py --outdir=training-runs --data=datasets/digits-16x16.zip \\
        --cbase=32 --cres=1,2 --batch=64 --duration=0.05 --lr_rampup=5 --tick=1 --device=cpu
    """
    opts = dnnlib.EasyDict(kwargs)
    try:
        device = dist.init(None if opts.device_type == 'auto' else opts.device_type)
    except ValueError as err:
        raise click.ClickException(f'--device={opts.device_type}: {err}')
    opts.device_type = device.type
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
        training_loop.training_loop(**c, wandb_run=wandb_run, device=device)
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

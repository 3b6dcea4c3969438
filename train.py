"""Train diffusion models in the EDM framework (EDM's and EDM2's networks), or
distil one into a multistep consistency student (--consistency=True), on one
process or over the ranks of `torchrun`.

The options become the keyword arguments of training/training_loop.py (the
configurations they name are in training/presets.py); `training_loop.setup()`
reads and checks every file the run starts from before any work, and its
ValueErrors stop the script with their sentence. The decisions of
distillation are in README.md ("Consistency distillation").
"""

import contextlib
import importlib
import json
import os
import re

import click

import dnnlib
from torch_utils import distributed as dist
from training import checkpoint
from training import consistency_ops
from training import guidance
from training import loss_cd
from training import precision as precisions
from training import presets
from training import training_loop

#----------------------------------------------------------------------------
# The options of distillation.

CD_LOSS_OPTIONS = dict( # Keyword of ConsistencyDistillLoss -> the option that sets it.
    S='S', T_start='T_start', T_end='T_end', T_anneal_kimg='T_anneal_kimg', T_anneal='T_anneal', rho='rho', sigma_min='sigma_min',
    sigma_max='sigma_max', student_sigmas='student_sigmas', sampling_mode='sampling_mode', terminal_anchor='terminal_anchor',
    terminal_prob='terminal_prob', terminal_teacher_hop='terminal_teacher_hop', target_mode='cd_target_mode', target_ema='cd_target_ema',
    sync_dropout='sync_dropout', loss='cd_loss', huber_c='cd_huber_c', weight_mode='cd_weight_mode',
)
CD_OPTIONS = ['teacher', 'gnet', 'guidance', 'student_init', 'teacher_precision', *CD_LOSS_OPTIONS.values(), 'no_terminal_anchor', 'no_sync_dropout'] # Options that only --consistency=True uses.

#----------------------------------------------------------------------------
# Option parsing and errors.

def parse_int_list(s):
    """'1,2,3' or '1-3' (or a mix) -> [1, 2, 3]; a list passes through."""
    if s is None or isinstance(s, list):
        return s
    values = []
    for part in s.split(','):
        match = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
        if match is None:
            raise click.BadParameter(f'"{s}" is not a list of integers; pass e.g. 1,2,2 or 1-3.')
        values += list(range(int(match.group(1)), int(match.group(match.lastindex)) + 1))
    return values

def parse_str_list(s):
    """'a,b' -> ['a', 'b']; empty items are dropped."""
    if s is None or isinstance(s, list):
        return s
    return [item.strip() for item in s.split(',') if item.strip()]

def parse_float_list(s):
    """'0.05,0.1' -> [0.05, 0.1]; None when s is not such a list."""
    parts = [part for part in s.split(',') if part.strip()]
    ok = parts and all(re.fullmatch(r'\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*', part) for part in parts)
    return [float(part) for part in parts] if ok else None

def parse_phema(s):
    """--phema: a list of sigma_rel, or 'none'; a list passes through."""
    if s is None or isinstance(s, list) or s == 'none':
        return None if s == 'none' else s
    if parse_float_list(s) is None:
        raise click.BadParameter(f'"{s}" is not a comma-separated list of numbers; pass e.g. 0.050,0.100, or none.')
    return parse_float_list(s)

def apply_defaults(opts, given, student=None):
    """Fill the options that were not given: those of a student built from its teacher (`student`: the teacher's
    description), or an EDM2 --preset; then the defaults of the architecture."""
    defaults = presets.student_defaults(student) if student is not None else {}
    if opts.preset is not None:
        if 'arch' in given and opts.arch != 'edm2':
            raise click.ClickException(f'--preset={opts.preset} is an EDM2 preset, but --arch={opts.arch}; pass --arch=edm2 or leave --arch out.')
        defaults = dict(presets.EDM2_PRESETS[opts.preset], arch='edm2', batch=2048)
    opts.update({key: value for key, value in defaults.items() if key not in given})
    given = set(given) | set(defaults)
    if opts.arch == 'edm2' and 'precond' in given and opts.precond != 'edm2':
        raise click.ClickException(f'--precond={opts.precond} applies to the EDM architectures; --arch=edm2 has its own preconditioning, so leave --precond out.')
    for name in ('P_mean', 'P_std'):
        if opts.arch != 'edm2' and name in given:
            raise click.ClickException(f'--{name} applies only to --arch=edm2 (EDM2\'s loss); leave it out.')
    if opts.arch == 'edm2' and 'augment' in given and opts.augment > 0:
        raise click.ClickException(f'--augment={opts.augment:g} is not supported by --arch=edm2 (its network takes no augmentation labels); pass --augment=0.')
    opts.update({key: value for key, value in presets.FAMILY_DEFAULTS['edm2' if opts.arch == 'edm2' else 'edm'].items() if key not in given})

@contextlib.contextmanager
def user_errors():
    """Stop with the one-sentence message of a ValueError of the library (the one
    place that does this); a message that starts with a keyword of the
    distillation loss (`name=value`) names the option that sets it."""
    try:
        yield
    except ValueError as err:
        message = str(err)
        match = re.match(r'(\w+)=', message)
        if match and match.group(1) in CD_LOSS_OPTIONS:
            message = f'--{CD_LOSS_OPTIONS[match.group(1)]}' + message[len(match.group(1)):]
        raise click.ClickException(message) from err

#----------------------------------------------------------------------------
# Options -> keyword arguments of the training loop.

def training_config(opts, cd_given, device):
    """The keyword arguments of training_loop.setup() and training_loop() that
    the options give; `cd_given` maps the distillation options given on the
    command line to their flags."""
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data, use_labels=opts.cond, xflip=opts.xflip, cache=opts.cache)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=(device.type == 'cuda'), num_workers=opts.workers)
    if opts.workers > 0:
        c.data_loader_kwargs.update(prefetch_factor=2, multiprocessing_context='spawn')
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr, betas=([0.9, 0.99] if opts.arch == 'edm2' else [0.9, 0.999]), eps=1e-8)

    # Network preset, preconditioning and loss; channels, augmentation, dropout, precision.
    c.network_kwargs = dnnlib.EasyDict(presets.ARCH_PRESETS[opts.arch] if opts.get('student') is None else opts.student)
    network_class, loss_class = presets.PRECOND_CLASSES[opts.precond]
    c.network_kwargs.setdefault('class_name', network_class)
    c.loss_kwargs = dnnlib.EasyDict(class_name=loss_class)
    if opts.arch == 'edm2':
        c.loss_kwargs.update(P_mean=opts.P_mean, P_std=opts.P_std)
    c.network_kwargs.update({key: value for key, value in [('model_channels', opts.cbase), ('channel_mult', opts.cres)] if value is not None})
    if opts.augment > 0:
        c.augment_kwargs = dnnlib.EasyDict(presets.AUGMENT_PRESET, class_name='training.augment.AugmentPipe', p=opts.augment)
        c.network_kwargs.augment_dim = 9 # The pipeline's conditioning labels.
    precision = precisions.resolve(opts.precision, opts.fp16) # fp16 and fp32 are EDM's use_fp16; bf16 is the loop's `precision`.
    c.network_kwargs.update(use_fp16=(precision == 'fp16'), **({} if opts.dropout is None else dict(dropout=opts.dropout)))

    # Schedule and output intervals.
    if opts.ema_rampup is None:
        ema_rampup_ratio = None if opts.transfer is not None else 0.05
    else:
        ema_rampup_ratio = opts.ema_rampup if opts.ema_rampup > 0 else None
    c.update(total_kimg=max(int(opts.duration * 1000), 1), ema_halflife_kimg=(opts.ema * 1000 if opts.ema is not None else None),
        ema_rampup_ratio=ema_rampup_ratio, phema_stds=opts.phema, lr_rampup_kimg=opts.lr_rampup, lr_decay_batches=(opts.decay or None), batch_size=opts.batch, batch_gpu=opts.batch_gpu, loss_scaling=opts.ls, cudnn_benchmark=opts.bench,
        kimg_per_tick=opts.tick, snapshot_ticks=opts.snap, state_dump_ticks=opts.dump, seed=opts.seed, max_bad_steps=opts.max_bad_steps, vae_name=opts.vae,
        precision=(precision if precision == 'bf16' else None), teacher_precision=opts.teacher_precision, compile_networks=opts.compile)

    # Consistency distillation: its options only with --consistency=True.
    if not opts.consistency and len(cd_given) > 0:
        raise click.ClickException(f'{next(iter(cd_given.values()))} applies only to consistency distillation; pass --consistency=True or leave it out.')
    if opts.consistency:
        if opts.teacher is None:
            raise click.ClickException('--consistency=True needs a teacher to distil; pass --teacher with a network snapshot (path or URL).')
        if opts.transfer is not None and opts.student_init is not None:
            raise click.ClickException(f'--transfer and --student_init={opts.student_init} both choose the weights the student starts from; pass only one of them.')
        c.loss_kwargs = dnnlib.EasyDict(class_name='training.loss_cd.ConsistencyDistillLoss', **{key: opts[option] for key, option in CD_LOSS_OPTIONS.items()})
        c.loss_kwargs.student_sigmas = consistency_ops.parse_student_sigmas(opts.student_sigmas)
        anchor = False if opts.no_terminal_anchor else opts.terminal_anchor
        c.loss_kwargs.terminal_anchor = loss_cd.default_terminal_anchor(opts.sampling_mode) if anchor is None else anchor
        c.loss_kwargs.sync_dropout = opts.sync_dropout and not opts.no_sync_dropout
        c.update(teacher_pkl=opts.teacher, gnet_pkl=opts.gnet, guidance=opts.guidance)
        if opts.resume is None and opts.transfer is None and opts.student_init != 'random':
            c.resume_pkl = opts.teacher

    # Transfer learning or resume.
    if opts.transfer is not None and opts.resume is not None:
        raise click.ClickException('--transfer and --resume cannot be used together; --resume already restores the network.')
    if opts.transfer is not None:
        c.resume_pkl = opts.transfer
    if opts.resume is not None:
        c.resume_state_dump = opts.resume

    # The output: writable, and with --nosubdir not another run's folder.
    dnnlib.util.check_writable(opts.outdir, '--outdir')
    resume_dir = None if opts.resume is None else os.path.abspath(opts.resume if os.path.isdir(opts.resume) else os.path.dirname(opts.resume))
    if opts.nosubdir and os.path.isfile(os.path.join(opts.outdir, 'training_options.json')) and resume_dir != os.path.abspath(opts.outdir):
        raise click.ClickException(f'--outdir={opts.outdir} already holds a run (training_options.json) and --nosubdir would overwrite it; '
            f'pass --resume={opts.outdir} to continue it, or another --outdir.')

    # Validation during training.
    if opts.val:
        c.validation_fn = dnnlib.EasyDict(func_name='training.validation.validate', num=opts.val_num, seed=opts.val_seed, batch=opts.val_batch,
            ref=opts.val_ref, ref_data=(opts.val_ref_data if (opts.val_ref_data is not None or opts.val_ref is not None) else opts.data),
            detector=opts.val_detector, teacher=opts.val_teacher, agree_num=(opts.val_agree_num if opts.consistency else 0), workers=opts.workers,
            resume_dir=resume_dir)
        c.update(val_every=opts.val_every, val_at_start=opts.val_at_start)
    return c

def run_description(opts, c, dataset_obj):
    """The part of the run directory's name after its id."""
    arch = f'teacher-{opts.precond}' if opts.get('student') is not None else opts.arch if opts.arch == 'edm2' else f'{opts.arch}-{opts.precond}'
    desc = f'{dataset_obj.name}-{"cond" if c.dataset_kwargs.use_labels else "uncond"}-{arch}-gpus{dist.get_world_size()}'
    desc += f'-batch{c.batch_size}-{precisions.resolve(c.precision, c.network_kwargs.use_fp16)}'
    desc += f'-cd{opts.S}' if opts.consistency else ''
    return desc + (f'-{opts.desc}' if opts.desc is not None else '')

def student_snapshot_entry(loss_fn, **_kwargs):
    """The `consistency` entry of a student's snapshots (S, the student grid, the teacher's guidance), from which
    `generate.py --sampler=auto` samples the student."""
    return dict(consistency=dict(S=int(loss_fn.S), student_sigmas=[float(v) for v in loss_fn.student_sigmas().tolist()],
        guidance=guidance.describe(loss_fn.teacher)))

#----------------------------------------------------------------------------
# The run directory and W&B (rank 0).

def import_wandb():
    """Check that wandb can be imported, before any work."""
    try:
        importlib.import_module('wandb')
    except Exception as err: # pylint: disable=broad-except
        raise ValueError(f'--wandb=True needs the wandb package, which cannot be imported ({err}); install it with "pip install wandb" or pass --wandb=False.') from err

def create_run_dir(opts, c, desc):
    """Claim the run directory and write training_options.json into it; returns its path."""
    if opts.nosubdir:
        os.makedirs(opts.outdir, exist_ok=True)
        run_dir = opts.outdir
    else:
        run_dir = dnnlib.util.claim_run_dir(opts.outdir, desc)
    for folder in {run_dir} | ({os.path.dirname(os.path.abspath(c.resume_state_dump))} if c.get('resume_state_dump') else set()):
        for name in dnnlib.util.remove_stale_temp_files(folder):
            print(f'Removed "{name}", the unfinished file of a run that stopped while writing it.')
    options_text = json.dumps(dict(c, run_dir=run_dir), indent=2).encode('utf-8')
    dnnlib.util.write_atomic(os.path.join(run_dir, 'training_options.json'), lambda f: f.write(options_text))
    return run_dir

def init_wandb(opts, c):
    """Start the W&B run of rank 0 inside the run directory."""
    import wandb # pylint: disable=import-outside-toplevel
    try:
        return wandb.init(project=opts.wandb_project, entity=opts.wandb_entity, name=(opts.wandb_run or os.path.basename(os.path.normpath(c.run_dir))),
            tags=opts.wandb_tags, mode=opts.wandb_mode, dir=c.run_dir, config=json.loads(json.dumps(c)))
    except Exception as err: # pylint: disable=broad-except
        raise ValueError(f'--wandb=True: W&B could not start a run ({err}); check the login and --wandb_project/--wandb_entity, use --wandb_mode=offline, or pass --wandb=False.') from err

#----------------------------------------------------------------------------

@click.command()

# What to train.
@click.option('--outdir',           help='Parent folder of the run directories', metavar='DIR',                type=str, required=True)
@click.option('--data',             help='Dataset zip or folder made by dataset_tool.py', metavar='ZIP|DIR',   type=str, required=True)
@click.option('--vae',              help='VAE of a latent --data: hub name or local folder  [default: the one its dataset.json records]', metavar='NAME|DIR', type=str)
@click.option('--cond',             help='Condition on the class labels', metavar='BOOL',                     type=bool, default=False, show_default=True)
@click.option('--arch',             help='Network preset',                                                     type=click.Choice(['ddpmpp', 'ncsnpp', 'adm', 'edm2']), default='ddpmpp', show_default=True)
@click.option('--precond',          help='Preconditioning and loss of the EDM architectures  [default: edm]',  type=click.Choice(['vp', 've', 'edm']))
@click.option('--preset',           help='EDM2\'s published configuration (sets --arch=edm2 and its hyperparameters)', type=click.Choice(list(presets.EDM2_PRESETS)))

# Hyperparameters.
@click.option('--duration',         help='Images to train on, in millions', metavar='MIMG',                    type=click.FloatRange(min=0, min_open=True), default=200, show_default=True)
@click.option('--batch',            help='Images per optimizer step, over all ranks', metavar='INT',           type=click.IntRange(min=1), default=512, show_default=True)
@click.option('--batch-gpu',        help='Most images per rank and pass; more are accumulated', metavar='INT', type=click.IntRange(min=1))
@click.option('--cbase',            help='Base channel count  [default: preset]', metavar='INT',               type=click.IntRange(min=1))
@click.option('--cres',             help='Channel multiplier per resolution  [default: preset]', metavar='LIST', type=parse_int_list)
@click.option('--lr',               help='Peak learning rate', metavar='FLOAT',                                type=click.FloatRange(min=0, min_open=True), default=10e-4, show_default=True)
@click.option('--lr_rampup',        help='Length of the learning-rate warm-up', metavar='KIMG',                type=click.FloatRange(min=0), default=10000, show_default=True)
@click.option('--decay',            help='Inverse-square-root decay of the learning rate after this many steps, 0 = none  [default: 0; 70000 with edm2]', metavar='BATCHES', type=click.FloatRange(min=0))
@click.option('--ema',              help='Half-life of the weight average  [default: 0.5; none with edm2]', metavar='MIMG', type=click.FloatRange(min=0))
@click.option('--phema',            help='sigma_rel of power-function EMA profiles, or none  [default: none; 0.050,0.100 with edm2]', metavar='LIST', type=parse_phema)
@click.option('--ema_rampup',       help='Cap on the EMA half-life as a fraction of the images seen, 0 = none  [default: 0.05, 0 with --transfer]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--dropout',          help='Dropout rate  [default: 0.13; 0 with edm2]', metavar='FLOAT',        type=click.FloatRange(min=0, max=1))
@click.option('--augment',          help='Probability of augmenting an image, 0 = off  [default: 0.12; 0 with edm2]', metavar='FLOAT', type=click.FloatRange(min=0, max=1))
@click.option('--P_mean', 'P_mean', help='Mean of ln(sigma) in EDM2\'s loss  [default: -0.4]', metavar='FLOAT', type=float)
@click.option('--P_std', 'P_std',   help='Standard deviation of ln(sigma) in EDM2\'s loss  [default: 1.0]', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--xflip',            help='Add mirrored copies of the images', metavar='BOOL',                  type=bool, default=False, show_default=True)

# Speed and devices.
@click.option('--fp16',             help='Run the network in float16 (CUDA only)', metavar='BOOL',            type=bool, default=False, show_default=True)
@click.option('--precision',        help='Precision of the networks, reduced on CUDA only  [default: fp16 with --fp16, else fp32]', type=click.Choice(list(precisions.PRECISIONS)))
@click.option('--compile',          help='Run the networks through torch.compile', metavar='BOOL',             type=bool, is_flag=False, flag_value=True, default=False, show_default=True)
@click.option('--ls',               help='Factor on the loss before backpropagation', metavar='FLOAT',         type=click.FloatRange(min=0, min_open=True), default=1, show_default=True)
@click.option('--max_bad_steps',    help='Stop after this many consecutive non-finite steps', metavar='INT',   type=click.IntRange(min=0), default=100, show_default=True)
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
@click.option('--seed',             help='Random seed  [default: random, or the resumed run\'s]', metavar='INT', type=click.IntRange(min=0))
@click.option('--transfer',         help='Initialise the network from a snapshot\'s EMA (.pkl or .safetensors)', metavar='PKL|URL', type=str)
@click.option('--resume',           help='Continue from a training state, or the newest in a run directory', metavar='PT|DIR', type=str)
@click.option('-n', '--dry-run',    help='Show the options and stop',                                          is_flag=True)

# Consistency distillation.
@click.option('--consistency',      help='Distil --teacher into a multistep consistency student', metavar='BOOL', type=bool, default=False, show_default=True)
@click.option('--teacher',          help='Teacher network snapshot, its EMA (.pkl or .safetensors)', metavar='PKL|URL', type=str)
@click.option('--gnet',             help='Guide of the teacher: an unconditional or weaker network', metavar='PKL|URL', type=str)
@click.option('--guidance',         help='Guidance weight of the teacher with --gnet, 1 = none', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--teacher_precision', help='Precision of the teacher  [default: --precision]',                type=click.Choice(list(precisions.PRECISIONS)))
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
@click.option('--terminal_anchor',  help='Fixed probability of the terminal edge  [default: on; off with uniform]', metavar='BOOL', type=bool, is_flag=False, flag_value=True)
@click.option('--no_terminal_anchor', help='Old spelling of --terminal_anchor=False',                          is_flag=True, hidden=True)
@click.option('--terminal_prob',    help='That probability, in (0, 1)  [default: 1/T\']', metavar='FLOAT',     type=float)
@click.option('--terminal_teacher_hop', help='Terminal reference D_teacher(x_t) instead of the clean image', metavar='BOOL', type=bool, is_flag=False, flag_value=True, default=False, show_default=True)
@click.option('--cd_target_mode',   help='Target network',                                                     type=click.Choice(list(loss_cd.TARGET_MODES)), default='ema', show_default=True)
@click.option('--cd_target_ema',    help='Per-step decay of the ema target', metavar='FLOAT',                  type=click.FloatRange(min=0, max=1, max_open=True), default=0.95, show_default=True)
@click.option('--sync_dropout',     help='Replay the student\'s dropout masks in the target pass', metavar='BOOL', type=bool, is_flag=False, flag_value=True, default=True, show_default=True)
@click.option('--no_sync_dropout',  help='Old spelling of --sync_dropout=False',                               is_flag=True, hidden=True)
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
@click.option('--val_ref',          help='Reference statistics of the dataset', metavar='NPZ|PKL|URL',        type=str)
@click.option('--val_ref_data',     help='Dataset to compute the reference statistics from  [default: --data]', metavar='ZIP|DIR', type=str)
@click.option('--val_detector',     help="Feature detector: 'inception', 'dinov2', 'pixels', or a pickled network", metavar='NAME|PKL|URL', type=str, default='inception', show_default=True)
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
    given = {name for name in params if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)}
    cd_given = {name: '/'.join(params[name].opts + params[name].secondary_opts) for name in CD_OPTIONS if name in given}
    logger = None
    wandb_run = None
    try:
        with user_errors():
            device = dist.init(None if opts.device_type == 'auto' else opts.device_type)
            if device.type == 'cpu':
                dist.set_cpu_threads(workers=opts.workers)
            teacher = training_loop.load_teacher(opts.teacher, opts.gnet, opts.guidance) if opts.consistency and opts.teacher is not None else None
            from_teacher = teacher is not None and opts.transfer is None and opts.student_init != 'random' and not given & set(presets.ARCH_OPTIONS) # The student's architecture: the teacher's.
            opts.student = checkpoint.network_description(guidance.unwrap(teacher), f'The teacher "{opts.teacher}"') if from_teacher else None
            apply_defaults(opts, given, opts.student)
            c = training_config(opts, cd_given, device)
            if opts.wandb:
                dist.on_rank0(import_wandb)
            inputs = training_loop.setup(**c, teacher=teacher, device=device)
            c.seed = inputs.seed
            c.dataset_kwargs.update(resolution=inputs.dataset_obj.resolution, max_size=len(inputs.dataset_obj))
            if inputs.resume_state_dump is not None:
                c.resume_state_dump = inputs.resume_state_dump
            desc = run_description(opts, c, inputs.dataset_obj)
            if opts.dry_run:
                c.run_dir = opts.outdir if opts.nosubdir else dnnlib.util.next_run_dir(opts.outdir, desc)
            else:
                c.run_dir = dist.on_rank0(lambda: create_run_dir(opts, c, desc))

            # Show the options.
            dist.print0('\nTraining options:')
            dist.print0(json.dumps(c, indent=2))
            dist.print0()
            dist.print0(f'Run directory:    {c.run_dir}')
            dist.print0(f'Dataset:          {opts.data} ({"with" if opts.cond else "without"} labels)')
            network = f'the teacher\'s architecture ({c.network_kwargs.class_name})' if opts.student is not None else f'{opts.arch}, {opts.precond} preconditioning'
            dist.print0(f'Network:          {network}, {precisions.resolve(c.precision, c.network_kwargs.use_fp16)}' + (' (reduced precision needs CUDA)' if (c.precision or c.network_kwargs.use_fp16) and device.type != 'cuda' else ''))
            if opts.consistency:
                student_init = 'the teacher' if c.get('resume_pkl') == opts.teacher else (f'"{opts.transfer}"' if opts.transfer is not None else 'random')
                dist.print0(f'Distillation:     S={opts.S} student of "{opts.teacher}"{guidance.describe_text(opts.gnet, opts.guidance)}, starting from {student_init if opts.resume is None else "the --resume state"}')
            dist.print0(f'Ranks:            {dist.get_world_size()} on {device.type}')
            dist.print0(f'Batch:            {c.batch_size}')
            dist.print0()
            if opts.dry_run:
                dist.print0('Dry run: nothing written.')
                return
            logger = dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True) if dist.get_rank() == 0 else None
            wandb_run = dist.on_rank0(lambda: init_wandb(opts, c)) if opts.wandb else None

        # Train.
        snapshot_extras = student_snapshot_entry if opts.consistency else None
        try:
            training_loop.training_loop(**c, inputs=inputs, snapshot_extras=snapshot_extras, wandb_run=wandb_run, device=device)
        except training_loop.TrainingStopped as err:
            raise click.ClickException(str(err)) from err
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

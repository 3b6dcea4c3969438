"""Train diffusion models in the EDM framework (EDM's and EDM2's networks), or distil one into a multistep
consistency student (--consistency=True), on one process or over the ranks of `torchrun`. The options are
described in docs/training.md and docs/distillation.md; training/preflight.py checks how they fit together."""

import json
import os

import click

import dnnlib
from torch_utils import distributed as dist
from training import consistency_ops
from training import guidance
from training import loss_cd
from training import preflight
from training import precision as precisions
from training import training_loop

#----------------------------------------------------------------------------
# Presets of --arch, --precond and --preset; defaults of each family.

ARCH_PRESETS = dict( # --arch -> network keywords.
    ddpmpp  = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
                   channel_mult_noise=1, resample_filter=[1,1], model_channels=128, channel_mult=[2,2,2]),
    ncsnpp  = dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
                   channel_mult_noise=2, resample_filter=[1,3,3,1], model_channels=128, channel_mult=[2,2,2]),
    adm     = dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1,2,3,4]),
    edm2    = dict(model_channels=192, channel_mult=[1,2,3,4]),
)

AUGMENT_PRESET = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1) # Multipliers of --augment.

PRECOND_CLASSES = dict( # --precond -> (network class, loss class).
    vp      = ('training.networks.VPPrecond', 'training.loss.VPLoss'),
    ve      = ('training.networks.VEPrecond', 'training.loss.VELoss'),
    edm     = ('training.networks.EDMPrecond', 'training.loss.EDMLoss'),
    edm2    = ('training.networks_edm2.Precond', 'training.loss.EDM2Loss'),
)

EDM2_PRESETS = { # --preset -> EDM2's published configurations, all with --batch=2048.
    f'edm2-img{res}-{size}': dict(cbase=cbase, lr=lr, decay=decay, dropout=dropout, P_mean=P_mean, P_std=P_std)
    for res, decay, P_mean, P_std, sizes in [
        (64,  35000, -0.8, 1.6, dict(xs=(128, 0.0120, 0), s=(192, 0.0100, 0), m=(256, 0.0090, 0.1),
            l=(320, 0.0080, 0.1), xl=(384, 0.0070, 0.1))),
        (512, 70000, -0.4, 1.0, dict(xxs=(64, 0.0170, 0), xs=(128, 0.0120, 0), s=(192, 0.0100, 0), m=(256, 0.0090, 0.1),
            l=(320, 0.0080, 0.1), xl=(384, 0.0070, 0.1), xxl=(448, 0.0065, 0.1))),
    ] for size, (cbase, lr, dropout) in sizes.items()
}

FAMILY_DEFAULTS = dict( # Where not given, by the family of --arch.
    edm     = dict(precond='edm', ema=0.5, dropout=0.13, augment=0.12, decay=0, phema=None),
    edm2    = dict(precond='edm2', ema=None, dropout=0, augment=0, decay=70000, phema=[0.050, 0.100], P_mean=-0.4,
                   P_std=1.0),
)

STUDENT_DEFAULTS = dict( # Where not given, for a student built from its teacher; dropout is the teacher's.
    edm     = dict(augment=0),
    edm2    = dict(augment=0, decay=0),
)

ARCH_OPTIONS = ('arch', 'precond', 'preset', 'cbase', 'cres') # None given: the teacher's architecture.

def student_defaults(student):
    """Option values for a student built from its teacher's description."""
    precond = next((name for name, (cls, _loss) in PRECOND_CLASSES.items() if cls == student['class_name']), 'edm')
    family = 'edm2' if precond == 'edm2' else 'edm'
    return dict(FAMILY_DEFAULTS[family], **STUDENT_DEFAULTS[family], precond=precond, dropout=student.get('dropout'),
        **({'arch': 'edm2'} if family == 'edm2' else {}))

#----------------------------------------------------------------------------
# The options of the distillation loss, defined once for the command line, the loss and the docs.

POSITIVE = click.FloatRange(min=0, min_open=True)
CD_LOSS_OPTIONS = [ # (option, keyword of the loss, type, default, help)
    ('S',               'S',                click.IntRange(min=1),  8,          'Student steps (segments)'),
    ('student_sigmas',  'student_sigmas',   str,                    'karras',   'Student grid: karras, karras_open or the S-1 interior sigmas'),
    ('T_start',         'T_start',          click.IntRange(min=1),  64,         'Teacher edges at the start'),
    ('T_end',           'T_end',            click.IntRange(min=1),  1280,       'Teacher edges after the annealing'),
    ('T_anneal_kimg',   'T_anneal_kimg',    click.FloatRange(min=0), 10000,     'Length of the annealing of T, 0 = T_end at once'),
    ('T_anneal',        'T_anneal',         click.Choice(consistency_ops.ANNEAL_MODES), 'geometric', 'Interpolation of T'),
    ('rho',             'rho',              POSITIVE,               7,          'Exponent of the Karras grids'),
    ('sigma_min',       'sigma_min',        POSITIVE,               0.002,      'Lowest positive noise level of the grids'),
    ('sigma_max',       'sigma_max',        POSITIVE,               80,         'Highest noise level of the grids'),
    ('sampling_mode',   'sampling_mode',    click.Choice(consistency_ops.SAMPLING_MODES), 'vp', 'Distribution of the teacher edges'),
    ('terminal_anchor', 'terminal_anchor',  bool,                   None,       'Fixed probability of the terminal edge  [default: on; off with uniform]'),
    ('terminal_prob',   'terminal_prob',    float,                  None,       'That probability, in (0, 1)  [default: 1/T\']'),
    ('terminal_teacher_hop', 'terminal_teacher_hop', bool,          False,      'Terminal reference D_teacher(x_t) instead of the clean image'),
    ('cd_target_mode',  'target_mode',      click.Choice(loss_cd.TARGET_MODES), 'ema', 'Target network'),
    ('cd_target_ema',   'target_ema',       click.FloatRange(0, 1, max_open=True), 0.95, 'Per-step decay of the ema target'),
    ('sync_dropout',    'sync_dropout',     bool,                   True,       'Replay the student\'s dropout masks in the target pass'),
    ('cd_loss',         'loss',             click.Choice(loss_cd.LOSSES), 'pseudo_huber', 'Distance of student and target'),
    ('cd_huber_c',      'huber_c',          POSITIVE,               None,       'c of pseudo_huber, delta of huber  [default: 0.00054 sqrt(d), 0.00054]'),
    ('cd_weight_mode',  'weight_mode',      click.Choice(loss_cd.WEIGHT_MODES), 'sqrt_karras', 'Weight lambda(sigma) of the loss'),
    ('teacher_hop',     'teacher_hop',      click.Choice(loss_cd.TEACHER_HOPS), 'heun', 'Integrator of the teacher\'s hop: Heun or the paper\'s aDDIM'),
    ('ct',              'ct',               bool,                   False,      'Consistency training: the data\'s hop, no teacher; tuning with --transfer'),
]
CD_OPTIONS = ['teacher', 'gnet', 'guidance', 'student_init', 'teacher_precision', 'no_terminal_anchor', 'no_sync_dropout',
    *[row[0] for row in CD_LOSS_OPTIONS]] # Only for --consistency=True.

def cd_loss_options(fn):
    for name, _keyword, kind, default, help_text in reversed(CD_LOSS_OPTIONS):
        metavar = {bool: 'BOOL', str: 'NAME|LIST', float: 'FLOAT'}.get(kind, None if isinstance(kind, click.Choice) else
            'INT' if isinstance(kind, click.IntRange) else 'FLOAT')
        flag = dict(is_flag=False, flag_value=True) if kind is bool else {}
        fn = click.option(f'--{name}', name, help=help_text, metavar=metavar, type=kind, default=default,
            **flag)(fn)
    return fn

#----------------------------------------------------------------------------
# Option parsing.

def int_list(_ctx, _param, value):
    """'1,2,3' or '1-3' (or a mix) -> [1, 2, 3]."""
    try:
        return dnnlib.util.parse_int_list(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from err

def str_list(_ctx, _param, value):
    return None if value is None else [item.strip() for item in value.split(',') if item.strip()]

def parse_phema(_ctx, _param, value):
    if value is None or value == 'none':
        return None
    try:
        return [float(part) for part in value.split(',')]
    except ValueError:
        raise click.BadParameter(f'"{value}" is not a comma-separated list of numbers; pass e.g. 0.050,0.100, or none.') from None

def apply_defaults(opts, given, student=None):
    """Fill the options not given: from the teacher's description `student` or a --preset, then the family's."""
    defaults = student_defaults(student) if student is not None else {}
    if opts.preset is not None:
        defaults = dict(EDM2_PRESETS[opts.preset], arch='edm2', batch=2048)
    defaults = {key: value for key, value in defaults.items() if key not in given}
    opts.update(defaults)
    family = FAMILY_DEFAULTS['edm2' if opts.arch == 'edm2' else 'edm']
    opts.update({key: value for key, value in family.items() if key not in given and key not in defaults})
    if opts.ct and 'T_start' not in given: # One edge per Karras segment: the denoising loss at the start.
        opts.T_start = opts.S

#----------------------------------------------------------------------------
# Options -> training loop keywords.

def training_config(opts, device):
    """The keywords of preflight.setup() and training_loop.training_loop()."""
    c = dnnlib.EasyDict()
    c.dataset_kwargs = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path=opts.data, use_labels=opts.cond,
        xflip=opts.xflip, cache=opts.cache)
    c.data_loader_kwargs = dnnlib.EasyDict(pin_memory=(device.type == 'cuda'), num_workers=opts.workers)
    if opts.workers > 0:
        c.data_loader_kwargs.update(prefetch_factor=2, multiprocessing_context='spawn')
    c.optimizer_kwargs = dnnlib.EasyDict(class_name='torch.optim.Adam', lr=opts.lr,
        betas=([0.9, 0.99] if opts.arch == 'edm2' else [0.9, 0.999]), eps=1e-8)

    # Network and loss.
    c.network_kwargs = dnnlib.EasyDict(ARCH_PRESETS[opts.arch] if opts.get('student') is None else opts.student)
    network_class, loss_class = PRECOND_CLASSES[opts.precond]
    c.network_kwargs.setdefault('class_name', network_class)
    c.loss_kwargs = dnnlib.EasyDict(class_name=loss_class)
    if opts.arch == 'edm2':
        c.loss_kwargs.update(P_mean=opts.P_mean, P_std=opts.P_std)
    c.network_kwargs.update({key: value for key, value in [('model_channels', opts.cbase), ('channel_mult', opts.cres)] if value is not None})
    if opts.augment > 0:
        c.augment_kwargs = dnnlib.EasyDict(AUGMENT_PRESET, class_name='training.augment.AugmentPipe', p=opts.augment)
        c.network_kwargs.augment_dim = 9 # The pipeline's conditioning labels.
    precision = precisions.resolve(opts.precision, opts.fp16) # fp16: EDM's use_fp16; bf16: the loop's `precision`.
    c.network_kwargs.update(use_fp16=(precision == 'fp16'), **({} if opts.dropout is None else dict(dropout=opts.dropout)))

    # Schedule.
    if opts.ema_rampup is None:
        ema_rampup_ratio = None if opts.transfer is not None else 0.05
    else:
        ema_rampup_ratio = opts.ema_rampup if opts.ema_rampup > 0 else None
    c.update(total_kimg=max(int(opts.duration * 1000), 1), ema_halflife_kimg=(opts.ema * 1000 if opts.ema is not None else None),
        ema_rampup_ratio=ema_rampup_ratio, phema_stds=opts.phema, lr_rampup_kimg=opts.lr_rampup, lr_decay_batches=(opts.decay or None),
        batch_size=opts.batch, batch_gpu=opts.batch_gpu, loss_scaling=opts.ls, cudnn_benchmark=opts.bench, kimg_per_tick=opts.tick,
        snapshot_ticks=opts.snap, state_dump_ticks=opts.dump, seed=opts.seed, max_bad_steps=opts.max_bad_steps, vae_name=opts.vae,
        precision=(precision if precision == 'bf16' else None), teacher_precision=opts.teacher_precision, compile_networks=opts.compile)

    # Distillation, transfer, resume.
    if opts.consistency:
        c.loss_kwargs = dnnlib.EasyDict(class_name='training.loss_cd.ConsistencyDistillLoss',
            **{keyword: opts[name] for name, keyword, *_rest in CD_LOSS_OPTIONS})
        c.loss_kwargs.student_sigmas = preflight.parse_student_sigmas(opts.student_sigmas)
        anchor = False if opts.no_terminal_anchor else opts.terminal_anchor
        c.loss_kwargs.terminal_anchor = loss_cd.default_terminal_anchor(opts.sampling_mode) if anchor is None else anchor
        c.loss_kwargs.sync_dropout = opts.sync_dropout and not opts.no_sync_dropout
        c.update(teacher_pkl=opts.teacher, gnet_pkl=opts.gnet, guidance=opts.guidance)
        if opts.resume is None and opts.transfer is None and opts.student_init != 'random':
            c.resume_pkl = opts.teacher
    if opts.transfer is not None:
        c.resume_pkl = opts.transfer
    if opts.resume is not None:
        c.resume_state_dump = opts.resume

    # Validation.
    if opts.val:
        resume_dir = None if opts.resume is None else os.path.abspath(opts.resume if os.path.isdir(opts.resume) else os.path.dirname(opts.resume))
        c.validation_fn = dnnlib.EasyDict(func_name='training.validation.validate', num=opts.val_num, seed=opts.val_seed,
            batch=opts.val_batch, ref=opts.val_ref, detector=opts.val_detector, teacher=opts.val_teacher,
            ref_data=(opts.val_ref_data if (opts.val_ref_data is not None or opts.val_ref is not None) else opts.data),
            agree_num=(opts.val_agree_num if opts.consistency else 0), workers=opts.workers, resume_dir=resume_dir)
        c.update(val_every=opts.val_every, val_at_start=opts.val_at_start)
    return c

def run_description(opts, c, dataset_obj):
    """The part of the run directory's name after its id."""
    arch = f'teacher-{opts.precond}' if opts.get('student') is not None else opts.arch if opts.arch == 'edm2' else f'{opts.arch}-{opts.precond}'
    desc = f'{dataset_obj.name}-{"cond" if c.dataset_kwargs.use_labels else "uncond"}-{arch}-gpus{dist.get_world_size()}'
    desc += f'-batch{c.batch_size}-{precisions.resolve(c.precision, c.network_kwargs.use_fp16)}'
    desc += f'-{"ct" if opts.ct else "cd"}{opts.S}' if opts.consistency else ''
    return desc + (f'-{opts.desc}' if opts.desc is not None else '')

#----------------------------------------------------------------------------
# The run directory and W&B (rank 0).

def create_run_dir(opts, c, desc):
    """Claim the run directory and write training_options.json; returns its path."""
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

def init_wandb(opts, c, run_id=None):
    """A W&B run, the resumed run's when `run_id` is given; W&B's WANDB_* variables apply where no option is given."""
    import wandb # pylint: disable=import-outside-toplevel
    project = opts.wandb_project or (None if os.environ.get('WANDB_PROJECT') else 'edm-cd')
    name = opts.wandb_run or (None if os.environ.get('WANDB_NAME') else os.path.basename(os.path.normpath(c.run_dir)))
    given = dict(project=project, entity=opts.wandb_entity, tags=opts.wandb_tags, mode=opts.wandb_mode, name=name)
    try:
        run = wandb.init(**{k: v for k, v in given.items() if v is not None}, dir=c.run_dir, config=json.loads(json.dumps(c)),
            **(dict(id=run_id, resume='allow') if run_id is not None else {}))
        run.define_metric('*', step_metric='Progress/kimg')
        return run
    except Exception as err: # pylint: disable=broad-except
        raise click.ClickException(f'--wandb=True: W&B could not start a run ({err}); check the login and --wandb_project/--wandb_entity, '
            'use --wandb_mode=offline, or pass --wandb=False.') from err

def print_options(opts, c, device):
    dist.print0('\nTraining options:')
    dist.print0(json.dumps(c, indent=2))
    dist.print0()
    dist.print0(f'Run directory:    {c.run_dir}')
    dist.print0(f'Dataset:          {opts.data} ({"with" if opts.cond else "without"} labels)')
    source = 'the --transfer network' if opts.ct and opts.transfer else 'the teacher'
    network = f'{source}\'s architecture ({c.network_kwargs.class_name})' if opts.student is not None else \
        f'{opts.arch}, {opts.precond} preconditioning'
    reduced = (c.precision or c.network_kwargs.use_fp16) and device.type != 'cuda'
    dist.print0(f'Network:          {network}, {precisions.resolve(c.precision, c.network_kwargs.use_fp16)}' +
        (' (reduced precision needs CUDA)' if reduced else ''))
    if opts.consistency:
        start = 'the teacher' if opts.teacher and c.get('resume_pkl') == opts.teacher else \
            f'"{opts.transfer}"' if opts.transfer is not None else 'random'
        what = f'Consistency training: S={opts.S} student' if opts.ct else \
            f'Distillation:     S={opts.S} student of "{opts.teacher}"{guidance.describe_text(opts.gnet, opts.guidance)}'
        dist.print0(f'{what}, starting from {start if opts.resume is None else "the --resume state"}')
    dist.print0(f'Ranks:            {dist.get_world_size()} on {device.type}')
    dist.print0(f'Batch:            {c.batch_size}')
    dist.print0()

#----------------------------------------------------------------------------

@click.command(context_settings=dict(show_default=True))

# What to train.
@click.option('--outdir', help='Parent folder of the run directories', metavar='DIR', type=str, required=True)
@click.option('--data', help='Dataset zip or folder made by dataset_tool.py', metavar='ZIP|DIR', type=str,
    required=True)
@click.option('--vae',
    help='VAE of a latent --data: hub name or local folder  [default: the one its dataset.json records]', metavar='NAME|DIR', type=str)
@click.option('--cond', help='Condition on the class labels', metavar='BOOL', type=bool, default=False)
@click.option('--arch', help='Network preset', type=click.Choice(['ddpmpp', 'ncsnpp', 'adm', 'edm2']),
    default='ddpmpp')
@click.option('--precond', help='Preconditioning and loss of the EDM architectures  [default: edm]',
    type=click.Choice(['vp', 've', 'edm']))
@click.option('--preset', help='EDM2\'s published configuration (sets --arch=edm2 and its hyperparameters)',
    type=click.Choice(list(EDM2_PRESETS)))

# Hyperparameters.
@click.option('--duration', help='Images to train on, in millions', metavar='MIMG',
    type=click.FloatRange(min=0, min_open=True), default=200)
@click.option('--batch', help='Images per optimizer step, over all ranks', metavar='INT', type=click.IntRange(min=1),
    default=512)
@click.option('--batch-gpu', help='Most images per rank and pass; more are accumulated', metavar='INT',
    type=click.IntRange(min=1))
@click.option('--cbase', help='Base channel count  [default: preset]', metavar='INT', type=click.IntRange(min=1))
@click.option('--cres', help='Channel multiplier per resolution  [default: preset]', metavar='LIST', type=str,
    callback=int_list)
@click.option('--lr', help='Peak learning rate', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True),
    default=10e-4)
@click.option('--lr_rampup', help='Length of the learning-rate warm-up', metavar='KIMG', type=click.FloatRange(min=0),
    default=10000)
@click.option('--decay',
    help='Inverse-square-root decay of the learning rate after this many steps, 0 = none  [default: 0; 70000 with edm2]', metavar='BATCHES', type=click.FloatRange(min=0))
@click.option('--ema', help='Half-life of the weight average  [default: 0.5; none with edm2]', metavar='MIMG',
    type=click.FloatRange(min=0))
@click.option('--phema',
    help='sigma_rel of power-function EMA profiles, or none  [default: none; 0.050,0.100 with edm2]', metavar='LIST', type=str, callback=parse_phema)
@click.option('--ema_rampup',
    help='Cap on the EMA half-life as a fraction of the images seen, 0 = none  [default: 0.05, 0 with --transfer]', metavar='FLOAT', type=click.FloatRange(min=0))
@click.option('--dropout', help='Dropout rate  [default: 0.13; 0 with edm2]', metavar='FLOAT',
    type=click.FloatRange(min=0, max=1))
@click.option('--augment', help='Probability of augmenting an image, 0 = off  [default: 0.12; 0 with edm2]',
    metavar='FLOAT', type=click.FloatRange(min=0, max=1))
@click.option('--P_mean', 'P_mean', help='Mean of ln(sigma) in EDM2\'s loss  [default: -0.4]', metavar='FLOAT',
    type=float)
@click.option('--P_std', 'P_std', help='Standard deviation of ln(sigma) in EDM2\'s loss  [default: 1.0]',
    metavar='FLOAT', type=click.FloatRange(min=0, min_open=True))
@click.option('--xflip', help='Add mirrored copies of the images', metavar='BOOL', type=bool, default=False)

# Speed and devices.
@click.option('--fp16', help='Run the network in float16 (CUDA only)', metavar='BOOL', type=bool, default=False)
@click.option('--precision',
    help='Precision of the networks, reduced on CUDA only  [default: fp16 with --fp16, else fp32]', type=click.Choice(list(precisions.PRECISIONS)))
@click.option('--compile', help='Run the networks through torch.compile', metavar='BOOL', type=bool, is_flag=False,
    flag_value=True, default=False)
@click.option('--ls', help='Factor on the loss before backpropagation', metavar='FLOAT',
    type=click.FloatRange(min=0, min_open=True), default=1)
@click.option('--max_bad_steps', help='Stop after this many consecutive non-finite steps', metavar='INT',
    type=click.IntRange(min=0), default=100)
@click.option('--bench', help='Let cuDNN pick the fastest kernels', metavar='BOOL', type=bool, default=True)
@click.option('--cache', help='Keep decoded images in memory', metavar='BOOL', type=bool, default=True)
@click.option('--workers', help='Data-loading processes per rank, 0 = none', metavar='INT',
    type=click.IntRange(min=0), default=1)
@click.option('--device', 'device_type', help='Where each rank computes', type=click.Choice(['auto', 'cuda', 'cpu']),
    default='auto')

# Output, schedule and starting point.
@click.option('--desc', help='Suffix of the run directory name', metavar='STR', type=str)
@click.option('--nosubdir', help='Write into --outdir itself, not a numbered run directory', is_flag=True)
@click.option('--tick', help='Progress line every this many kimg', metavar='KIMG', type=click.IntRange(min=1),
    default=50)
@click.option('--snap', help='Network snapshot every this many ticks', metavar='TICKS', type=click.IntRange(min=1),
    default=50)
@click.option('--dump', help='Training state every this many ticks', metavar='TICKS', type=click.IntRange(min=1),
    default=500)
@click.option('--seed', help='Random seed  [default: random, or the resumed run\'s]', metavar='INT',
    type=click.IntRange(min=0))
@click.option('--transfer', help='Initialise the network from a snapshot\'s EMA (.pkl or .safetensors)',
    metavar='PKL|URL', type=str)
@click.option('--resume', help='Continue from a training state, or the newest in a run directory', metavar='PT|DIR',
    type=str)
@click.option('-n', '--dry-run', help='Show the options and stop', is_flag=True)

# Consistency distillation (and the options of its loss, from CD_LOSS_OPTIONS).
@click.option('--consistency', help='Distil --teacher into a multistep consistency student', metavar='BOOL',
    type=bool, default=False)
@click.option('--teacher', help='Teacher network snapshot, its EMA (.pkl or .safetensors)', metavar='PKL|URL', type=str)
@click.option('--gnet', help='Guide of the teacher: an unconditional or weaker network', metavar='PKL|URL', type=str)
@click.option('--guidance', help='Guidance weight of the teacher with --gnet, 1 = none', metavar='FLOAT',
    type=click.FloatRange(min=0))
@click.option('--teacher_precision', help='Precision of the teacher  [default: --precision]',
    type=click.Choice(list(precisions.PRECISIONS)))
@click.option('--student_init', help='Starting weights of the student  [default: teacher; none with --transfer]',
    type=click.Choice(['teacher', 'random']))
@cd_loss_options
@click.option('--no_terminal_anchor', help='Old spelling of --terminal_anchor=False', is_flag=True, hidden=True)
@click.option('--no_sync_dropout', help='Old spelling of --sync_dropout=False', is_flag=True, hidden=True)

# Validation during training.
@click.option('--val', help='Validate during training, 0 = off', metavar='0|1', type=click.IntRange(min=0, max=1),
    default=0)
@click.option('--val_every', help='Validate every this many ticks, and at the end', metavar='TICKS',
    type=click.IntRange(min=1), default=50)
@click.option('--val_at_start', help='Also validate before the first step', metavar='BOOL', type=bool, default=False)
@click.option('--val_num', help='Images for the Frechet distance, 0 = agreement only', metavar='INT',
    type=click.IntRange(min=0), default=10000)
@click.option('--val_seed', help='Seed of the first validation image', metavar='INT', type=click.IntRange(min=0),
    default=0)
@click.option('--val_batch', help='Images per sampler and detector call on each rank', metavar='INT',
    type=click.IntRange(min=1), default=64)
@click.option('--val_ref', help='Reference statistics of the dataset', metavar='NPZ|PKL|URL', type=str)
@click.option('--val_ref_data', help='Dataset to compute the reference statistics from  [default: --data]',
    metavar='ZIP|DIR', type=str)
@click.option('--val_detector', help="Feature detector: 'inception', 'dinov2', 'pixels', or a pickled network",
    metavar='NAME|PKL|URL', type=str, default='inception')
@click.option('--val_teacher', help="Also the teacher's Frechet distance, once per run", metavar='BOOL', type=bool,
    default=True)
@click.option('--val_agree_num', help='Seeds of the teacher agreement (distillation), 0 = none', metavar='INT',
    type=click.IntRange(min=0), default=1000)

# Weights & Biases.
@click.option('--wandb', help='Log the statistics to Weights & Biases (rank 0)', metavar='BOOL', type=bool,
    default=False)
@click.option('--wandb_project', help='W&B project  [default: $WANDB_PROJECT, else edm-cd]', metavar='STR', type=str)
@click.option('--wandb_entity', help='W&B user or team  [default: your default entity]', metavar='STR', type=str)
@click.option('--wandb_run', help='W&B run name  [default: $WANDB_NAME, else the run directory\'s name]', metavar='STR', type=str)
@click.option('--wandb_tags', help='Comma-separated W&B tags', metavar='LIST', type=str, callback=str_list)
@click.option('--wandb_mode', help='W&B mode  [default: $WANDB_MODE, else online]', type=click.Choice(['online', 'offline', 'disabled']))

def main(**kwargs):
    """Train an EDM diffusion model on a dataset made by dataset_tool.py, or distil one into a multistep
    consistency student, in one process or in every process that torchrun starts.

    Examples:

    \b
    # Class-conditional CIFAR-10, DDPM++ preset, one node with 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/cifar10-32x32.zip --cond=1 --arch=ddpmpp

    \b
    # An 8-step student of NVIDIA's ImageNet-64 teacher, one node with 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --outdir=training-runs \\
        --data=datasets/imagenet-64x64.zip --cond=1 --consistency=True --S=8 \\
        --teacher=https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl
    """
    opts = dnnlib.EasyDict(kwargs)
    ctx = click.get_current_context()
    given = {name for name in ctx.params if ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT)}
    logger = wandb_run = None
    try:
        with dnnlib.util.user_errors():
            device = dist.init(None if opts.device_type == 'auto' else opts.device_type)
            if device.type == 'cpu':
                dist.set_cpu_threads(workers=opts.workers)
            teacher = preflight.load_teacher(opts.teacher, opts.gnet, opts.guidance) if opts.consistency and opts.teacher else None
            tuning = opts.consistency and opts.ct and opts.transfer is not None # The student is built like its --transfer network.
            source = preflight.load_network(opts.transfer, '--transfer') if tuning else \
                guidance.unwrap(teacher) if teacher is not None else None
            from_source = source is not None and (tuning or opts.transfer is None) and opts.student_init != 'random'
            what = f'The --transfer snapshot "{opts.transfer}"' if tuning else f'The teacher "{opts.teacher}"'
            opts.student = preflight.network_description(source, what) if from_source and not given & set(ARCH_OPTIONS) else None
            apply_defaults(opts, given, opts.student)
            preflight.check_options(opts, given, CD_OPTIONS)
            c = training_config(opts, device)
            if opts.wandb:
                dist.on_rank0(preflight.check_wandb)
            inputs = preflight.setup(**c, teacher=teacher, transfer=(source if tuning else None), device=device)
            c.seed = inputs.seed
            c.dataset_kwargs.update(resolution=inputs.dataset_obj.resolution, max_size=len(inputs.dataset_obj))
            if inputs.resume_state_dump is not None:
                c.resume_state_dump = inputs.resume_state_dump
            desc = run_description(opts, c, inputs.dataset_obj)
            if opts.dry_run:
                c.run_dir = opts.outdir if opts.nosubdir else dnnlib.util.next_run_dir(opts.outdir, desc)
            else:
                c.run_dir = dist.on_rank0(lambda: create_run_dir(opts, c, desc))
            print_options(opts, c, device)
            if opts.dry_run:
                dist.print0('Dry run: nothing written.')
                return
            logger = dnnlib.util.Logger(file_name=os.path.join(c.run_dir, 'log.txt'), file_mode='a', should_flush=True) if dist.get_rank() == 0 else None
            run_id = (inputs.state or {}).get('wandb_id')
            wandb_run = dist.on_rank0(lambda: init_wandb(opts, c, run_id)) if opts.wandb else None
        try:
            training_loop.training_loop(**c, inputs=inputs, wandb_run=wandb_run, device=device)
        except training_loop.TrainingStopped as err:
            raise click.ClickException(str(err)) from err
    except BaseException as err:
        if logger is not None and isinstance(err, click.ClickException): # The reason a run stopped, in log.txt too.
            logger.file.write(f'Error: {err.format_message()}\n')
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

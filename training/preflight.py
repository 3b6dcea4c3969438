"""Everything a run starts from, read and checked before any work: train.py's option rules, dataset, teacher,
starting snapshot, training state, validation. The one library module whose messages name the scripts' options."""

import importlib
import os
import warnings

import torch

import dnnlib
from torch_utils import distributed as dist
from torch_utils import misc
from training import checkpoint
from training import consistency_ops
from training import encoders
from training import guidance as guidance_lib
from training import phema
from training import precision as precisions
from training import samplers
from training import training_loop

#----------------------------------------------------------------------------
# Rules across train.py's options (click checked each value).

def check_options(opts, given, cd_options):
    """ValueError for options that do not fit together (`given`: the names on the command line)."""
    if opts.preset is not None and 'arch' in given and opts.arch != 'edm2':
        raise ValueError(f'--preset={opts.preset} is an EDM2 preset, but --arch={opts.arch}; '
            'pass --arch=edm2 or leave --arch out.')
    edm2 = opts.arch == 'edm2'
    if edm2 and 'precond' in given and opts.precond != 'edm2':
        raise ValueError(f'--precond={opts.precond} applies to the EDM architectures; --arch=edm2 has its own preconditioning, '
            'so leave --precond out.')
    for name in ('P_mean', 'P_std'):
        if not edm2 and name in given:
            raise ValueError(f'--{name} applies only to --arch=edm2 (EDM2\'s loss); leave it out.')
    if edm2 and 'augment' in given and opts.augment > 0:
        raise ValueError(f'--augment={opts.augment:g} is not supported by --arch=edm2 (its network takes no augmentation labels); '
            'pass --augment=0.')
    if opts.fp16 and opts.precision not in (None, 'fp16'):
        raise ValueError(f'--fp16=True and --precision={opts.precision} ask for two precisions; '
            f'pass only --precision={opts.precision}.')
    cd_given = [name for name in cd_options if name in given]
    if not opts.consistency and cd_given:
        raise ValueError(f'--{cd_given[0]} applies only to consistency distillation; '
            'pass --consistency=True or leave it out.')
    if opts.consistency:
        if opts.teacher is None and not opts.ct:
            raise ValueError('--consistency=True needs a teacher to distil; '
                'pass --teacher with a network snapshot (path or URL), or --ct=True to train without one.')
        if opts.ct and opts.cd_target_mode == 'teacher':
            raise ValueError('--cd_target_mode=teacher needs a teacher in the loss, which --ct=True runs without; '
                'pass --cd_target_mode=ema or live.')
        teacher_given = [name for name in ('gnet', 'teacher_hop') if name in given]
        if opts.ct and teacher_given:
            raise ValueError(f'--{teacher_given[0]} sets the teacher\'s hop, which --ct=True replaces by the data\'s; '
                'leave it out.')
        if opts.transfer is not None and opts.student_init is not None:
            raise ValueError(f'--transfer and --student_init={opts.student_init} both choose the weights the student starts from; '
                'pass only one of them.')
        if opts.terminal_prob is not None and not 0 < opts.terminal_prob < 1:
            raise ValueError(f'--terminal_prob={opts.terminal_prob:g} is outside (0, 1); '
                'pass a probability strictly between 0 and 1, or leave it out for 1/T\'.')
        anchor = opts.terminal_anchor if opts.terminal_anchor is not None else opts.sampling_mode != 'uniform'
        if opts.terminal_prob is not None and (opts.no_terminal_anchor or not anchor):
            raise ValueError(f'--terminal_prob={opts.terminal_prob:g} needs the terminal anchor, which is off here; '
                'pass --terminal_anchor=True or leave --terminal_prob out.')
    check_guidance(opts.gnet, opts.guidance)
    if opts.transfer is not None and opts.resume is not None:
        raise ValueError('--transfer and --resume cannot be used together; --resume already restores the network.')
    dnnlib.util.check_writable(opts.outdir, '--outdir', folder=True)
    resume_dir = opts.resume if opts.resume is None or os.path.isdir(opts.resume) else os.path.dirname(opts.resume)
    resumed = resume_dir is not None and os.path.abspath(resume_dir) == os.path.abspath(opts.outdir)
    if opts.nosubdir and os.path.isfile(os.path.join(opts.outdir, 'training_options.json')) and not resumed:
        raise ValueError(f'--outdir={opts.outdir} already holds a run (training_options.json) and --nosubdir would overwrite it; '
            f'pass --resume={opts.outdir} to continue it, or another --outdir.')

def parse_student_sigmas(text):
    """--student_sigmas as the loss takes it."""
    try:
        return consistency_ops.parse_student_sigmas(text)
    except ValueError as err:
        raise ValueError(f'--{err}') from err

def check_guidance(gnet, guidance):
    """ValueError for a guidance weight that does not fit the presence of a guide."""
    if gnet is None and guidance is not None:
        raise ValueError(f'--guidance={guidance:g} needs a guiding network; '
            'pass --gnet=PKL|URL, or leave --guidance out.')
    if gnet is not None and guidance is None:
        raise ValueError('--gnet was given without a guidance weight; pass --guidance=W (1 = no guidance, '
            'EDM2 publishes values from 1.2 to 2.9).')
    if guidance is not None and not guidance >= 0:
        raise ValueError(f'--guidance={guidance:g} is negative; '
            'pass a weight of 0 or more (0 = the guide alone, 1 = no guidance).')

def check_wandb():
    try:
        importlib.import_module('wandb')
    except Exception as err: # pylint: disable=broad-except
        raise ValueError(f'--wandb=True needs the wandb package, which cannot be imported ({err}); install it with '
            '"pip install wandb" or pass --wandb=False.') from err

#----------------------------------------------------------------------------
# Networks of snapshots on the project's classes.

INTERFACE_KWARGS    = ('img_resolution', 'img_channels', 'label_dim')   # What the data gives.
PROBE_TOLERANCE     = 1e-5                                              # Largest relative error of a rebuilt network.

def network_description(net, what='The teacher'):
    """dict(class_name, **constructor keywords) of a network of training/, less what the data gives."""
    desc = checkpoint.describe(net)
    if desc is None or desc['init_args']:
        raise ValueError(f'{what} is a {type(net).__qualname__}, a class this project has no implementation of (or whose '
            'constructor arguments it did not record); distil it into an architecture given by the options '
            '(--arch, --precond, --cbase, --cres) with --student_init=random.')
    kwargs = {key: value for key, value in desc['init_kwargs'].items() if key not in INTERFACE_KWARGS}
    return dict(class_name=desc['class_name'], **kwargs)

def on_project_class(net, what='The teacher'):
    """A pickled network rebuilt on the project's class of its name if the outputs agree; else, warning, itself."""
    name = checkpoint.project_class_name(net)
    if name is None or type(net) is checkpoint.persistent_project_class(name):
        return net
    try:
        ours = dnnlib.util.construct_class_by_name(*net.init_args, class_name=name, **net.init_kwargs)
        ours.load_state_dict(net.state_dict(), strict=True, assign=True)
        ours.eval().requires_grad_(False)
        expected, got = misc.probe_outputs(net.cpu().eval()), misc.probe_outputs(ours)
        error = float((got - expected).abs().max() / expected.abs().max().clamp(min=1))
    except Exception as err: # pylint: disable=broad-except
        error, reason = None, checkpoint.reason(err)
    if error is not None and error <= PROBE_TOLERANCE:
        return ours
    reason = f'its outputs differ by {error:.3g} on a probe batch' if error is not None else f'it cannot be built ({reason})'
    warnings.warn(f'{what} ({type(net).__qualname__}) keeps the code embedded in its pickle: on the project\'s {name} '
        f'{reason}.', stacklevel=2)
    return net

#----------------------------------------------------------------------------
# The files and objects a run starts from.

def _open_dataset(dataset_kwargs):
    try:
        return dnnlib.util.construct_class_by_name(**dataset_kwargs)
    except ValueError as err:
        if dataset_kwargs.get('use_labels'):
            _open_dataset(dict(dataset_kwargs, use_labels=False))
            raise ValueError(f'--cond=True needs class labels, but {dataset_kwargs["path"]} has none that can be used; '
                'pass --cond=False or rebuild it with labels using dataset_tool.py.') from err
        raise ValueError(f'--data: {err}') from err

def load_network(path, option):
    try:
        return checkpoint.load_snapshot(path)['ema']
    except ValueError as err:
        raise ValueError(f'{option}: {err}') from err

def load_teacher(teacher_pkl, gnet_pkl=None, guidance=None):
    """The frozen teacher: the `ema` of `teacher_pkl`, guided by that of `gnet_pkl` with weight `guidance`."""
    check_guidance(gnet_pkl, guidance)
    dist.print0(f'Loading the teacher "{teacher_pkl}"...')
    net = on_project_class(load_network(teacher_pkl, '--teacher'))
    note = samplers.noise_range_note(net, 'The teacher', 'the noise levels of the distillation\'s grids (--sigma_min, --sigma_max)')
    if note is not None:
        dist.print0(note)
    if gnet_pkl is None:
        return net.eval().requires_grad_(False)
    dist.print0(f'Loading the guide "{gnet_pkl}" (guidance {guidance:g})...')
    gnet = on_project_class(load_network(gnet_pkl, '--gnet'), what='The guide')
    guidance_lib.check_guide(net, gnet, where=f'The guide "{gnet_pkl}"')
    return guidance_lib.guided(net, gnet, guidance, gnet_name=gnet_pkl).eval().requires_grad_(False)

def _check_fits_data(net, dataset_obj, data, where, interface):
    """A network's resolution, channels and classes against the run's `interface` (after the encoder)."""
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

RESUME_KEEPS = ( # Settings a resumed run may change.
    'total_kimg', 'kimg_per_tick', 'snapshot_ticks', 'state_dump_ticks', 'validation_fn', 'val_every', 'val_at_start', 'data_loader_kwargs',
    'dataset_kwargs.path', 'dataset_kwargs.cache', 'batch_gpu', 'cudnn_benchmark', 'max_bad_steps', 'teacher_pkl', 'gnet_pkl', 'vae_name',
    'teacher_precision', 'compile_networks')
def _check_resume(state, path, shapes, settings, loss_fn, teacher_digest):
    """A training state against the run's settings: RESUME_KEEPS changes are logged, others refused."""
    what, fix = f'The --resume state "{path}"', 'resume with the options of the run that wrote it'
    checkpoint.check_tensors({k: v.shape for k, v in state['net'].items()}, shapes, what, fix, require_all=True)
    old = state.get('settings') or training_loop.run_settings(dict(network_kwargs=state['network_kwargs'], loss_kwargs=state['loss_kwargs']))
    kept = lambda name: any(name == key or name.startswith(key + '.') for key in RESUME_KEEPS)
    defaults = training_loop.run_settings(dict())
    changed = [(name, old.get(name), settings.get(name)) for name in sorted(set(old) | set(settings))
        if old.get(name) != settings.get(name) and (name in old or 'settings' in state) and not (name == 'seed' and settings[name] is None)
        and not (name not in old and settings.get(name) == defaults.get(name))] # A new setting at its default.
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
    """A validation dict's options, by its module's check_options()."""
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
    dataset_kwargs      = {},
    network_kwargs      = {},
    loss_kwargs         = {},
    seed                = None,     # None = the resumed run's, else random.
    batch_size          = 512,      # Over all ranks.
    batch_gpu           = None,     # None = all of the rank's share.
    total_kimg          = 200000,
    resume_pkl          = None,     # Snapshot whose `ema` the network starts from.
    teacher_pkl         = None,
    gnet_pkl            = None,     # None = no guidance.
    vae_name            = None,     # None = the one the dataset.json records.
    guidance            = None,
    teacher             = None,     # load_teacher() of the above, if the caller has it.
    transfer            = None,     # load_network() of resume_pkl, if the caller has it.
    resume_state_dump   = None,     # Training state, or a run directory (its newest).
    validation_fn       = None,
    phema_stds          = None,
    device              = None,     # None = CUDA when available.
    **loop_kwargs,                  # The rest of training_loop()'s keywords.
):
    """Read and check everything the run starts from, on all ranks; returns training_loop()'s `inputs`."""
    settings = training_loop.run_settings(dict(loop_kwargs, dataset_kwargs=dataset_kwargs, network_kwargs=network_kwargs,
        loss_kwargs=loss_kwargs, seed=seed, batch_size=batch_size, batch_gpu=batch_gpu, total_kimg=total_kimg,
        teacher_pkl=teacher_pkl, gnet_pkl=gnet_pkl, guidance=guidance, validation_fn=validation_fn, phema_stds=phema_stds))
    device = torch.device(device if device is not None else ('cuda' if torch.cuda.is_available() else 'cpu'))
    world_size = dist.get_world_size()

    # Batch split.
    if batch_size % world_size != 0:
        raise ValueError(f'--batch={batch_size} does not divide over {world_size} ranks; pass a multiple of {world_size}.')
    batch_gpu_total = batch_size // world_size
    batch_gpu = min(batch_gpu or batch_gpu_total, batch_gpu_total)
    if batch_gpu_total % batch_gpu != 0:
        raise ValueError(f'--batch={batch_size} gives {batch_gpu_total} images per rank, which --batch-gpu={batch_gpu} does not divide; pass a --batch that is a multiple of {world_size * batch_gpu}.')

    # Dataset, and the network shapes it implies.
    dataset_obj = _open_dataset(dataset_kwargs)
    if hasattr(dataset_obj, 'check_headers'):
        try:
            dataset_obj.check_headers()
        except ValueError as err:
            raise ValueError(f'--data: {err}') from err
    try:
        encoder = encoders.dataset_encoder(dataset_obj, vae_name)
    except ValueError as err:
        raise ValueError(f'{"--data" if getattr(dataset_obj, "is_latent", False) else "--vae"}: {err}') from err
    try:
        latent_shape = encoder.encode_latents(torch.zeros([1, *dataset_obj.image_shape])).shape
        interface_kwargs = dict(img_resolution=latent_shape[-1], img_channels=latent_shape[1],
            label_dim=dataset_obj.label_dim)
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
        if validation_fn is not None: # Validation's detector sees decoded images.
            image_shape = list(encoder.decode(torch.zeros([1, *latent_shape[1:]], device=device)).shape[1:])
    shapes = checkpoint.network_shapes(network_kwargs, interface_kwargs)

    # Loss and teacher.
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

    # Initial weights: the teacher's (same class, names and shapes) or a --transfer snapshot's.
    init_net = None
    if resume_pkl is not None and resume_pkl == teacher_pkl:
        fix = 'pass the teacher\'s architecture options (--arch, --precond, --cbase, --cres, --cond, --augment) or --student_init=random'
        student_class = network_kwargs['class_name'].split('.')[-1]
        init_net = guidance_lib.unwrap(teacher)
        if type(init_net).__name__ != student_class:
            raise ValueError(f'The teacher "{teacher_pkl}" is of class {type(init_net).__name__}, but the student would be of class {student_class}; {fix}.')
        checkpoint.check_tensors(checkpoint.tensor_shapes(init_net), shapes, f'The teacher "{teacher_pkl}"', fix, require_all=True)
    elif resume_pkl is not None:
        init_net = load_network(resume_pkl, '--transfer') if transfer is None else transfer
        fix = 'choose the --arch, --cbase, --cres, --cond and --augment of the network in it'
        checkpoint.check_tensors(checkpoint.tensor_shapes(init_net), shapes, f'The --transfer snapshot "{resume_pkl}"', fix)

    # Training state.
    state = None
    if resume_state_dump is not None:
        try:
            resume_state_dump = checkpoint.find_state(resume_state_dump)
            state = checkpoint.load_training_state(resume_state_dump)
            checkpoint.check_no_addim_bridge(state['loss_kwargs'], f'The training state "{resume_state_dump}"')
        except ValueError as err:
            raise ValueError(f'--resume: {err}') from err
        _check_resume(state, resume_state_dump, shapes, settings, loss_fn, teacher_digest)

    _check_validation(validation_fn, image_shape, device)
    if phema_stds is not None:
        phema.check_stds(phema_stds)
    if seed is None:
        seed = int(state['seed']) if state is not None else dist.broadcast_object(int.from_bytes(os.urandom(4), 'little') % (1 << 31))
    return dnnlib.EasyDict(dataset_obj=dataset_obj, encoder=encoder, interface_kwargs=interface_kwargs, loss_fn=loss_fn,
        teacher=teacher, teacher_digest=teacher_digest, init_net=init_net, state=state, resume_state_dump=resume_state_dump,
        seed=seed, batch_gpu=batch_gpu, num_accumulation_rounds=batch_gpu_total // batch_gpu, device=device)

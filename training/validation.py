"""In-training validation, the training loop's `validation_fn`: the Fréchet distance of the network's samples, once
per run that of the teacher, and a consistency student's agreement with its teacher (docs/evaluation.md)."""

import glob
import hashlib
import inspect
import json
import math
import os
import re
import time
import weakref

import numpy as np
import torch

import dnnlib
from torch_utils import distributed as dist
from training import checkpoint
from training import guidance
from training import metrics
from training import precision
from training import samplers

HISTORY_FILE = 'metrics-val.jsonl'          # One JSON line per validation, in the run directory.
BEST_SNAPSHOT = 'network-snapshot-best.pkl' # The snapshot with the lowest Fréchet distance so far.

#----------------------------------------------------------------------------
# Options.

def _parse_options(**kwargs):
    """`validate`'s options in `kwargs`, defaults filled in, as an EasyDict; a ValueError names the first bad one."""
    params = [p for p in inspect.signature(validate).parameters.values() if p.kind == p.KEYWORD_ONLY]
    opts = dnnlib.EasyDict({p.name: kwargs.get(p.name, p.default) for p in params})
    for name, low in dict(num=0, seed=0, batch=1, agree_num=0, heun_steps=1, grid_num=0, workers=0).items():
        value = opts[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f'Validation option {name}={value!r} is invalid; pass a whole number of at least {low}.')
        opts[name] = int(value)
    if opts.num == 1:
        raise ValueError('Validation option num=1 is too small for feature statistics; '
            'pass num >= 2, or num=0 to skip the Fréchet distance.')
    if opts.num == 0 and opts.agree_num == 0:
        raise ValueError('Validation with num=0 and agree_num=0 computes nothing; pass a positive num (Fréchet '
            'distance) or agree_num (teacher agreement), or turn validation off.')
    if opts.ref is not None and opts.ref_data is not None:
        raise ValueError(f'Validation got both ref="{opts.ref}" and ref_data="{opts.ref_data}"; '
            'pass only one source of reference statistics.')
    if opts.num > 0 and opts.ref is None and opts.ref_data is None:
        raise ValueError(f'Validation with num={opts.num} needs reference statistics; pass a statistics file or URL '
            '(ref) or the dataset to compute them from (ref_data), or num=0 for the teacher agreement alone.')
    opts.detector = metrics.detector_name(metrics.INCEPTION_NAME if opts.detector is None else opts.detector)
    opts.teacher, opts.save_best = bool(opts.teacher), bool(opts.save_best)
    return opts

def check_options(image_shape, device='cpu', **kwargs):
    """Check `validate`'s options for images [C, H, W] on all ranks before training (ValueError)."""
    opts = _parse_options(**kwargs)
    if opts.num > 0:
        det = metrics.load_detector(opts.detector, device=device)
        dim = det.feature_dim(image_shape)
        dist.on_rank0(lambda: _open_ref_data(opts.ref_data, image_shape) if opts.ref is None else
            _load_ref(opts.ref, det, dim))

#----------------------------------------------------------------------------
# Files of the run directory.

def _run_dirs(run_dir, resume_dir):
    """The resumed run's directory (if any and different), then this run's."""
    dirs = [d for d in (resume_dir, run_dir) if d is not None]
    if len(dirs) == 2 and os.path.realpath(dirs[0]) == os.path.realpath(dirs[1]):
        dirs = dirs[1:]
    return dirs

def read_history(run_dir, resume_dir=None):
    """The entries of HISTORY_FILE of `resume_dir`, then of `run_dir`; a line cut short by a crash is skipped."""
    lines = []
    for folder in _run_dirs(run_dir, resume_dir):
        path = os.path.join(folder, HISTORY_FILE)
        if not os.path.isfile(path):
            continue
        with open(path, encoding='utf-8') as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get('figures'), dict):
                    lines.append(entry)
    return lines

def _summarize_history(history):
    """{'best': {figure: lowest value}, 'names': figure names ever recorded}."""
    best, names = dict(), set()
    for entry in history:
        for name, value in entry['figures'].items():
            names.add(name)
            if isinstance(value, (int, float)) and math.isfinite(value) and value < best.get(name, math.inf):
                best[name] = float(value)
    return dict(best=best, names=sorted(names))

def _append_history(run_dir, entry):
    """Append one line to HISTORY_FILE in one flushed write, first ending a line cut short by a crash."""
    text = json.dumps(entry) + '\n'
    with open(os.path.join(run_dir, HISTORY_FILE), 'a+b') as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            text = text if f.read(1) == b'\n' else '\n' + text
        f.write(text.encode('utf-8'))
        f.flush()
        os.fsync(f.fileno())

def ref_file_name(detector, ref_data):
    """File name of the reference statistics computed from `ref_data` with `detector`."""
    tag = re.sub(r'[^A-Za-z0-9]+', '_', os.path.splitext(os.path.basename(str(detector).rstrip('/')))[0])
    digest = hashlib.sha1(f'{detector}\n{os.path.abspath(ref_data)}'.encode('utf-8')).hexdigest()[:8]
    return f'val-ref-{tag.strip("_") or "detector"}-{digest}.npz'

def heun_file_name(net, device, seed=0, heun_steps=18, clip=True):
    """File name of `net`'s Heun images of the seeds from `seed` (save_heun_images), keyed by all they depend on."""
    inner = net.net if isinstance(net, precision.Teacher) else net
    mode = precision.autocast_dtype(inner, net.precision, device) if inner is not net else None
    key = (f'{type(inner).__name__} {checkpoint.tensor_digest(inner)} {guidance.describe(inner)} '
        f'{getattr(inner, "use_fp16", None)} {mode} {torch.device(device).type} {seed} {heun_steps} {clip}')
    return f'val-heun-{hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]}.npz'

def save_heun_images(run_dir, net, images, batch, device, seed=0, heun_steps=18, clip=True):
    """Save `net`'s Heun images (float64, image i of seed seed + i, sampled in blocks of `batch`) for validation."""
    blocks = {f'{i * batch}_{len(block)}': block.cpu().numpy() for i, block in enumerate(images.split(batch))}
    path = os.path.join(run_dir, heun_file_name(net, device, seed=seed, heun_steps=heun_steps, clip=clip))
    dnnlib.util.write_atomic(path, lambda f: np.savez(f, **blocks))

def _kept_heun_images(net, opts, run_dir):
    """The images that save_heun_images kept of `net` in the run directories, {'<first>_<count>': array}."""
    def find():
        for folder in reversed(_run_dirs(run_dir, opts.resume_dir)):
            if glob.glob(os.path.join(folder, 'val-heun-*.npz')): # Only then the weights' digest.
                path = os.path.join(folder, heun_file_name(net, opts.device, opts.seed, opts.heun_steps, opts.clip))
                if os.path.isfile(path):
                    return path
        return None
    path = dist.on_rank0(find, share=True)
    if path is None or not os.path.isfile(path):
        return dict()
    with np.load(path) as data:
        return {name: data[name] for name in data.files}

#----------------------------------------------------------------------------
# Reference statistics.

def _load_ref(path, det, dim):
    ref = metrics.load_ref_stats(path, det.name)
    metrics.check_ref_stats(ref, det.name, dim)
    return ref

def _open_ref_data(ref_data, image_shape):
    images = metrics.open_image_dataset(ref_data, kind=None) # Either kind: latents get the message below.
    if getattr(images, 'is_latent', False):
        raise ValueError(f'Validation dataset ref_data="{ref_data}" holds latents, not images; pass reference '
            'statistics as ref (e.g. EDM2\'s img512.pkl) or a dataset of the images they encode.')
    if list(images.image_shape) != list(image_shape):
        raise ValueError(f'Validation dataset ref_data="{ref_data}" holds images of shape {list(images.image_shape)} '
            f'but the network makes {list(image_shape)}; pass the dataset the network is trained on.')
    return images

def _reference(opts, det, dim, image_shape, run_dir):
    """Reference statistics (mu, sigma) on rank 0, None elsewhere; from `ref_data`, computed once and cached."""
    if opts.ref is not None:
        ref = dist.on_rank0(lambda: _load_ref(opts.ref, det, dim))
        return None if ref is None else (ref.mu, ref.sigma)

    file_name = ref_file_name(det.name, opts.ref_data)
    def find_cached():
        for folder in reversed(_run_dirs(run_dir, opts.resume_dir)):
            if os.path.isfile(path := os.path.join(folder, file_name)):
                ref = _load_ref(path, det, dim)
                if folder != run_dir and run_dir is not None:
                    metrics.save_ref_stats(os.path.join(run_dir, file_name), ref.mu, ref.sigma, detector=det.name)
                return ref.mu, ref.sigma
        return None
    ref = dist.on_rank0(find_cached)
    if dist.on_rank0(lambda: ref is not None, share=True):
        return ref

    images = dist.on_rank0(lambda: _open_ref_data(opts.ref_data, image_shape))
    if images is None:
        images = _open_ref_data(opts.ref_data, image_shape)
    dist.print0(f'Validation: reference statistics of {len(images)} images from "{opts.ref_data}" '
        f'with detector "{det.name}"...')
    mu, sigma = metrics.compute_dataset_stats(images, det, batch_size=opts.batch, num_workers=opts.workers).mean_cov()
    if run_dir is not None and dist.get_rank() == 0:
        metrics.save_ref_stats(os.path.join(run_dir, file_name), mu, sigma, detector=det.name)
    return (mu, sigma) if dist.get_rank() == 0 else None

#----------------------------------------------------------------------------
# Sampling.

def _batches(indices, batch):
    return [indices[i : i + batch] for i in range(0, len(indices), batch)]

def _rank_batches(total, batch):
    """This rank's share of the blocks of `batch` indices of 0 .. total - 1, dealt to the ranks in turn."""
    return _batches(list(range(total)), batch)[dist.get_rank() :: dist.get_world_size()]

def _generate(net, indices, opts, sample_fn, **sample_kwargs):
    """Images of the indices (seeds seed + i, class i % label_dim), float64 [N, C, H, W], clipped unless latent."""
    return samplers.generate_images(net, [opts.seed + i for i in indices], opts.device, sample_fn, classes=indices,
        clip=opts.clip, **sample_kwargs)

def _teacher_heun(teacher, chunk, opts):
    """The teacher's Heun images of `chunk`: those save_heun_images kept of this very block, else sampled."""
    image = opts.kept.get(f'{chunk[0]}_{len(chunk)}') if chunk == list(range(chunk[0], chunk[0] + len(chunk))) else None
    return torch.as_tensor(image, device=opts.device) if image is not None else _generate(teacher, chunk, opts,
        samplers.edm_sampler, num_steps=opts.heun_steps)

_teacher_cache = weakref.WeakKeyDictionary() # teacher -> {key: float32 CPU image}

def _teacher_images(teacher, indices, opts, new_images=None):
    """The teacher's Heun images of `indices` (float64), generated once per process; `new_images` are stored."""
    cache = _teacher_cache.setdefault(teacher, dict())
    key = lambda i: (opts.seed + i, i % teacher.label_dim if teacher.label_dim else None, opts.heun_steps)
    if new_images is not None:
        cache.update({key(i): image.to('cpu', torch.float32) for i, image in zip(indices, new_images)})
    for chunk in _batches([i for i in indices if key(i) not in cache], opts.batch):
        images = _teacher_heun(teacher, chunk, opts)
        cache.update({key(i): image.to('cpu', torch.float32) for i, image in zip(chunk, images)})
    return torch.stack([cache[key(i)] for i in indices]).to(opts.device, torch.float64)

#----------------------------------------------------------------------------

def validate(
    net, loss_fn, cur_tick, cur_nimg, run_dir, device, save_snapshot, encoder=None, *,
    num         = 10000,    # Generated images for the Fréchet distance; 0 = none (agreement only).
    seed        = 0,        # Seed of image 0; image i has seed + i.
    batch       = 64,       # Images per sampler and detector call on each rank.
    ref         = None,     # Reference statistics (.npz path or URL) ...
    ref_data    = None,     # ... or the dataset (folder or zip) to compute them from once.
    detector    = metrics.INCEPTION_NAME, # 'inception' (also None), 'pixels', or a pickled network's path/URL.
    teacher     = True,     # Also the teacher's Fréchet distance, once per run?
    agree_num   = 1000,     # Seeds of the teacher agreement (the first of the validation seeds); 0 = none.
    heun_steps  = 18,       # Steps of the Heun sampler (teacher, and the network in EDM training).
    grid_num    = 64,       # Images in the returned grid; 0 = no grid.
    save_best   = True,     # Keep the best snapshot as BEST_SNAPSHOT?
    workers     = 2,        # Data loader processes per rank for the reference statistics.
    resume_dir  = None,     # Run directory of the resumed training state: its history counts too.
):
    """Validate `net` on all ranks: the figures and the grid `samples` (uint8 HWC), also appended to HISTORY_FILE;
    with an `encoder` (latent run) the detector and the grid see decoded samples."""
    time_start = time.time()
    opts = _parse_options(**locals())
    opts.device = device = torch.device(device)
    world = dist.get_world_size()
    image_shape = [net.img_channels, net.img_resolution, net.img_resolution]
    opts.clip, to_uint8 = encoder is None, (samplers.to_uint8 if encoder is None else encoder.decode)
    if encoder is not None:
        image_shape = list(to_uint8(torch.zeros([1, *image_shape], device=device)).shape[1:])
    history = dist.on_rank0(lambda: _summarize_history(read_history(run_dir, opts.resume_dir)), share=True)

    # Sampler of the network; the teacher of a consistency loss.
    teacher_net = None
    if callable(getattr(loss_fn, 'student_sigmas', None)):
        sigmas = loss_fn.student_sigmas()
        sample_fn, sample_kwargs = samplers.student_sampler, dict(sigmas=sigmas)
        sampler_desc = f'student, S={len(sigmas) - 1}'
        teacher_net = getattr(loss_fn, 'teacher', None)
        if teacher_net is None and (opts.agree_num > 0 or opts.teacher):
            dist.print0('Validation: the loss has no teacher attached; the teacher figures are skipped.')
    else:
        sample_fn, sample_kwargs = samplers.edm_sampler, dict(num_steps=opts.heun_steps)
        sampler_desc = f'heun, {opts.heun_steps} steps'
    if isinstance(teacher_net, torch.nn.Module):
        teacher_net.to(device)
    agree_num = opts.agree_num if teacher_net is not None else 0

    # Detector and reference statistics.
    det, fd_name, ref_stats = None, None, None
    if opts.num > 0:
        det = metrics.load_detector(opts.detector, device=device)
        fd_name, ref_stats = det.key, _reference(opts, det, det.feature_dim(image_shape), image_shape, run_dir)

    def fd_of(stats):
        stats.all_reduce()
        mu, sigma = stats.mean_cov()
        return dist.on_rank0(lambda: metrics.frechet_distance(mu, sigma, *ref_stats), share=True)

    figures = dict()
    total = max(opts.num, agree_num)
    teacher_name = f'teacher_{fd_name}'
    fd_teacher = teacher_net is not None and opts.teacher and opts.num > 0 and teacher_name not in history['names']
    opts.kept = _kept_heun_images(teacher_net, opts, run_dir) if fd_teacher or agree_num > 0 else dict()

    # The teacher's Fréchet distance, once per run; its agreement images come with it.
    if fd_teacher:
        dist.print0(f'Validation: {opts.num} teacher images (heun, {opts.heun_steps} steps) for the teacher\'s '
            f'{det.label}...')
        stats = metrics.FeatureStats(det.device)
        for chunk in _rank_batches(opts.num, opts.batch):
            images = _teacher_heun(teacher_net, chunk, opts)
            stats.append(det(to_uint8(images)))
            agree = [j for j, i in enumerate(chunk) if i < agree_num]
            if agree:
                _teacher_images(teacher_net, [chunk[j] for j in agree], opts, new_images=images[agree])
        figures[teacher_name] = fd_of(stats)

    # The network's images: features, agreement with the teacher, the grid.
    dist.print0(f'Validation: {total} images ({sampler_desc}) on {world} rank(s)...')
    stats = metrics.FeatureStats(det.device) if det is not None else None
    sums = torch.zeros([3], dtype=torch.float64, device=device) # Squared differences, their number, non-finite images.
    grid_items = []
    for chunk in _rank_batches(total, opts.batch):
        images = _generate(net, chunk, opts, sample_fn, **sample_kwargs)
        sums[2] += (~torch.isfinite(images)).flatten(1).any(dim=1).sum()
        images_u8 = to_uint8(images)
        rows = [j for j, i in enumerate(chunk) if i < opts.num]
        if rows:
            stats.append(det(images_u8[rows]))
        rows = [j for j, i in enumerate(chunk) if i < agree_num]
        if rows:
            diff = images[rows] - _teacher_images(teacher_net, [chunk[j] for j in rows], opts)
            sums[0] += diff.square().sum()
            sums[1] += diff.numel()
        grid_items += [(i, im.permute(1, 2, 0).cpu().numpy()) for i, im in zip(chunk, images_u8) if i < opts.grid_num]
    if dist.is_distributed():
        torch.distributed.all_reduce(sums)
    sq_err, num_values, nonfinite = sums.tolist()
    if nonfinite > 0:
        figures['nonfinite_frac'] = nonfinite / total
        dist.print0(f'Validation: {int(nonfinite)} of {total} images are not finite (the network diverged); '
            'their figures are NaN.')
    if stats is not None:
        figures[fd_name] = fd_of(stats) if nonfinite == 0 else math.nan # Features of non-finite images mean nothing.
    if agree_num > 0:
        figures.update(metrics.agreement(sq_err / num_values))

    # The best snapshot; the grid of the first images.
    value = figures.get(fd_name, math.nan)
    best = opts.num > 0 and opts.save_best and math.isfinite(value) and value < history['best'].get(fd_name, math.inf)
    if best:
        save_snapshot(BEST_SNAPSHOT)
    grid_items = sorted([item for part in dist.gather_objects(grid_items) for item in part], key=lambda item: item[0])
    grid = samplers.image_grid([image for _i, image in grid_items]) if grid_items else None

    # Record and report.
    time_end = time.time()
    figures['sec'] = time_end - time_start
    if dist.get_rank() == 0:
        entry = dict(tick=int(cur_tick), kimg=cur_nimg / 1e3, figures=figures, best=best, sampler=sampler_desc,
            detector=(det.name if det is not None else None), num=opts.num, agree_num=agree_num, seed=opts.seed,
            world_size=world, time_start=time_start, time_end=time_end)
        if run_dir is not None:
            _append_history(run_dir, entry)
        parts = ', '.join(f'{name} {value:.6g}' for name, value in figures.items() if name != 'sec')
        dist.print0(f'Validation at tick {cur_tick} ({cur_nimg / 1e3:g} kimg): {parts}{" (best)" if best else ""}, '
            f'{figures["sec"]:.1f} s')
    if grid is not None:
        figures['samples'] = grid
    return figures

#----------------------------------------------------------------------------

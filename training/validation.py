"""In-training validation: the Fréchet distance of the network's own samples,
once per run that of the teacher, and the teacher agreement of a consistency
student.

`validate` is the training loop's `validation_fn`, given as
`dict(func_name='training.validation.validate', **options)`. It runs on all
ranks; `check_options` does the cheap checks (detector, reference
statistics) before training starts.

Decisions where the issue is silent:
* Sampler. A loss with `student_sigmas()` (consistency distillation) is
  validated with the student's deterministic S-step sampler on that grid;
  any other loss (EDM training) with the deterministic Heun sampler of
  `heun_steps` steps. The teacher (`loss_fn.teacher`) always uses Heun.
* Seeds and labels. Image i (0 <= i < num) has seed `seed + i`, its own
  generator (latents exactly as generate.py draws them), and class
  i % label_dim for a conditional network, so the images do not depend on
  the number of ranks or the batch size. The images are generated in
  consecutive blocks of `batch`, dealt to the ranks in turn: with the same
  `batch`, every network call is the same whatever the number of ranks, and
  the figures agree to float64 rounding. Another `batch` can change
  float32 network outputs by about 1e-6 (other kernels), which may move a
  rare pixel to the next uint8 level.
* Features are taken of the images quantized as generate.py writes them;
  for an unconditional network (generate.py draws random classes) `fid`
  equals `fid.py calc` on generate.py's images of the same seeds. With the
  pixel detector the figure is `fd_pixels`, never `fid`; with DINOv2 it is
  `fd_dinov2`.
* Agreement. Student and teacher images of the first `agree_num` seeds
  (same latents and labels), clipped to [-1, 1], unquantized, float64:
  `agree_rmse` = sqrt(MSE) over all their pixels, `agree_psnr` =
  10 log10(2^2 / MSE) dB with the peak-to-peak range 2 of [-1, 1], which is
  the same number as the PSNR of the unquantized images on the 0..255 scale.
  The MSE is pooled over all pairs (not a mean of per-image PSNRs), so the
  ranks' shares add up exactly. The teacher's images are kept in memory
  (float32, CPU) after the first validation of a process. Skipped for EDM
  training and for a loss without a teacher.
* Reference statistics come from `ref` (an .npz, an EDM2-style .pkl, or a URL) or are computed
  once from the dataset `ref_data` and kept in the run directory as
  `val-ref-<detector>-<hash of detector and dataset path>.npz`. train.py
  passes its training dataset as `ref_data` when neither is given; the
  library itself asks for one. `num=0` turns the Fréchet distance off
  (agreement only) and needs no detector or reference.
* History. Every validation appends one JSON line to `metrics-val.jsonl` in
  the run directory (rank 0). The teacher's figure is computed when no line
  holds it yet; the snapshot is kept as `network-snapshot-best.pkl` when its
  Fréchet distance is below every earlier one. With `resume_dir` (the run
  directory of the resumed training state) its lines count as earlier ones
  and its cached reference statistics are reused; the best snapshot of that
  run stays in that directory until this run beats it.
"""

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
from training import metrics
from training import samplers

HISTORY_FILE    = 'metrics-val.jsonl'           # One JSON line per validation, in the run directory.
BEST_SNAPSHOT   = 'network-snapshot-best.pkl'   # The snapshot with the lowest Fréchet distance so far.

#----------------------------------------------------------------------------
# Options.

def _parse_options(num, seed, batch, ref, ref_data, detector, teacher, agree_num, heun_steps, grid_num, save_best, workers, resume_dir):
    """The options as an EasyDict; a ValueError names the first bad one."""
    for name, value, low in [('num', num, 0), ('seed', seed, 0), ('batch', batch, 1), ('agree_num', agree_num, 0),
            ('heun_steps', heun_steps, 1), ('grid_num', grid_num, 0), ('workers', workers, 0)]:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f'Validation option {name}={value!r} is invalid; pass a whole number of at least {low}.')
    if num == 1:
        raise ValueError('Validation option num=1 is too small for feature statistics; pass num >= 2, or num=0 to skip the Fréchet distance.')
    if num == 0 and agree_num == 0:
        raise ValueError('Validation with num=0 and agree_num=0 computes nothing; pass a positive num (Fréchet distance) or agree_num (teacher agreement), or turn validation off.')
    if ref is not None and ref_data is not None:
        raise ValueError(f'Validation got both ref="{ref}" and ref_data="{ref_data}"; pass only one source of reference statistics.')
    if num > 0 and ref is None and ref_data is None:
        raise ValueError(f'Validation with num={num} needs reference statistics; pass ref=NPZ|URL (--val_ref) or ref_data=DATASET (--val_ref_data), or num=0 for the teacher agreement alone.')
    detector = metrics.detector_name(metrics.INCEPTION_NAME if detector is None else detector)
    return dnnlib.EasyDict(num=int(num), seed=int(seed), batch=int(batch), ref=ref, ref_data=ref_data, detector=detector,
        teacher=bool(teacher), agree_num=int(agree_num), heun_steps=int(heun_steps), grid_num=int(grid_num),
        save_best=bool(save_best), workers=int(workers), resume_dir=resume_dir)

def check_options(image_shape, device='cpu', func_name=None, **kwargs):
    """Check the options of `validate` (the keyword arguments given to it;
    `func_name` is ignored, so the training loop's `validation_fn` dict can
    be passed as it is) for images of shape [C, H, W] before training: load
    the detector and the reference statistics (`ref`) or open the dataset
    (`ref_data`). Call on all ranks; raises ValueError."""
    del func_name
    params = inspect.signature(validate).parameters.values()
    defaults = {p.name: p.default for p in params if p.kind == inspect.Parameter.KEYWORD_ONLY}
    opts = _parse_options(**{**defaults, **kwargs})
    if opts.num == 0:
        return
    det = metrics.load_detector(opts.detector, device=device, option='--val_detector')
    dim = det.feature_dim(image_shape)
    if opts.ref is not None:
        dist.on_rank0(lambda: _load_ref(opts.ref, det, dim))
    else:
        dist.on_rank0(lambda: _open_ref_data(opts.ref_data, image_shape))

#----------------------------------------------------------------------------
# Files of the run directory.

def _run_dirs(run_dir, resume_dir):
    """The resumed run's directory (if any and different), then this run's."""
    dirs = [d for d in (resume_dir, run_dir) if d is not None]
    if len(dirs) == 2 and os.path.realpath(dirs[0]) == os.path.realpath(dirs[1]):
        dirs = dirs[1:]
    return dirs

def read_history(run_dir, resume_dir=None):
    """The validations recorded in metrics-val.jsonl of `resume_dir`, then of
    `run_dir`, as a list of dicts; a line cut short by a crash is skipped."""
    lines = []
    for folder in _run_dirs(run_dir, resume_dir):
        path = os.path.join(folder, HISTORY_FILE)
        if not os.path.isfile(path):
            continue
        with open(path, 'rt', encoding='utf-8') as f:
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
            if isinstance(value, (int, float)) and math.isfinite(value) and (name not in best or value < best[name]):
                best[name] = float(value)
    return dict(best=best, names=sorted(names))

def _append_history(run_dir, entry):
    """Append one line to metrics-val.jsonl with a single write, flushed to disk;
    a line cut short by a crash is ended first, so that it spoils no other."""
    path = os.path.join(run_dir, HISTORY_FILE)
    text = json.dumps(entry) + '\n'
    if os.path.isfile(path) and os.path.getsize(path) > 0:
        with open(path, 'rb') as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b'\n':
                text = '\n' + text
    with open(path, 'at', encoding='utf-8') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())

def ref_file_name(detector, ref_data):
    """File name of the reference statistics computed from `ref_data` with `detector`."""
    tag = re.sub(r'[^A-Za-z0-9]+', '_', os.path.splitext(os.path.basename(str(detector).rstrip('/')))[0]).strip('_') or 'detector'
    digest = hashlib.sha1(f'{detector}\n{os.path.abspath(ref_data)}'.encode('utf-8')).hexdigest()[:8]
    return f'val-ref-{tag}-{digest}.npz'

#----------------------------------------------------------------------------
# Reference statistics.

def _load_ref(path, det, dim):
    ref = metrics.load_ref_stats(path, det.name)
    metrics.check_ref_stats(ref, det.name, dim)
    return ref

def _open_ref_data(ref_data, image_shape):
    images = metrics.open_image_dataset(ref_data, kind=None) # Either kind: latents get the message below.
    if getattr(images, 'is_latent', False):
        raise ValueError(f'Validation dataset ref_data="{ref_data}" holds latents, not images; pass ref (--val_ref, e.g. EDM2\'s img512.pkl) or ref_data with the images they encode.')
    if list(images.image_shape) != list(image_shape):
        raise ValueError(f'Validation dataset ref_data="{ref_data}" holds images of shape {list(images.image_shape)} but the network makes {list(image_shape)}; pass the dataset the network is trained on.')
    return images

def _reference(opts, det, dim, image_shape, run_dir):
    """Reference statistics (mu, sigma) on rank 0, None elsewhere. From
    `ref_data` they are computed by all ranks once and cached in run_dir."""
    if opts.ref is not None:
        ref = dist.on_rank0(lambda: _load_ref(opts.ref, det, dim))
        return None if ref is None else (ref.mu, ref.sigma)

    file_name = ref_file_name(det.name, opts.ref_data)
    def find_cached():
        for folder in reversed(_run_dirs(run_dir, opts.resume_dir)):
            path = os.path.join(folder, file_name)
            if os.path.isfile(path):
                ref = _load_ref(path, det, dim)
                if folder != run_dir and run_dir is not None:
                    metrics.save_ref_stats(os.path.join(run_dir, file_name), ref.mu, ref.sigma, detector=det.name)
                return ref
        return None
    ref = dist.on_rank0(find_cached)
    if dist.on_rank0(lambda: ref is not None, share=True):
        return (ref.mu, ref.sigma) if ref is not None else None

    images = dist.on_rank0(lambda: _open_ref_data(opts.ref_data, image_shape))
    if images is None:
        images = _open_ref_data(opts.ref_data, image_shape)
    dist.print0(f'Validation: reference statistics of {len(images)} images from "{opts.ref_data}" with detector "{det.name}"...')
    mu, sigma = metrics.compute_dataset_stats(images, det, batch_size=opts.batch, num_workers=opts.workers).mean_cov()
    if dist.get_rank() != 0:
        return None
    if run_dir is not None:
        metrics.save_ref_stats(os.path.join(run_dir, file_name), mu, sigma, detector=det.name)
    return mu, sigma

#----------------------------------------------------------------------------
# Sampling.

def _batches(indices, batch):
    return [indices[i : i + batch] for i in range(0, len(indices), batch)]

def _rank_batches(total, batch):
    """This rank's batches of the image indices 0 .. total - 1: consecutive
    blocks of `batch`, dealt to the ranks in turn, so that the network sees
    the same batches whatever the number of ranks."""
    return _batches(list(range(total)), batch)[dist.get_rank() :: dist.get_world_size()]

def generate_images(net, indices, seed, device, sample_fn, clip=True, **sample_kwargs):
    """Images of the global indices `indices` (seeds seed + i, class i % label_dim),
    as float64 [N, C, H, W] clipped to [-1, 1] (final latents unclipped with clip=False)."""
    return samplers.generate_images(net, [seed + i for i in indices], device, sample_fn, classes=indices, clip=clip, **sample_kwargs)

_teacher_cache = weakref.WeakKeyDictionary() # teacher -> {(seed, class, heun_steps): float32 CPU image}

def _teacher_images(teacher, indices, opts, device, new_images=None):
    """The teacher's Heun images of `indices` (float64 on device), generated
    once per process; `new_images` (float64, one per index) are stored instead."""
    try:
        cache = _teacher_cache.setdefault(teacher, dict())
    except TypeError: # Not weakly referenceable: no cache.
        cache = dict()
    key = lambda i: (opts.seed + i, i % teacher.label_dim if teacher.label_dim else None, opts.heun_steps)
    if new_images is not None:
        for i, image in zip(indices, new_images):
            cache[key(i)] = image.to('cpu', torch.float32)
    missing = [i for i in indices if key(i) not in cache]
    for chunk in _batches(missing, opts.batch):
        images = generate_images(teacher, chunk, opts.seed, device, samplers.edm_sampler, clip=opts.clip, num_steps=opts.heun_steps)
        for i, image in zip(chunk, images):
            cache[key(i)] = image.to('cpu', torch.float32)
    return torch.stack([cache[key(i)] for i in indices]).to(device, torch.float64)

#----------------------------------------------------------------------------

def validate(
    net, loss_fn, cur_tick, cur_nimg, run_dir, device, save_snapshot, encoder=None, *,
    num         = 10000,    # Generated images for the Fréchet distance; 0 = none (agreement only).
    seed        = 0,        # Seed of image 0; image i has seed + i.
    batch       = 64,       # Images per sampler and detector call on each rank.
    ref         = None,     # Reference statistics (.npz path or URL) ...
    ref_data    = None,     # ... or the dataset (folder or zip) to compute them from once.
    detector    = metrics.INCEPTION_NAME, # 'inception' (also None), 'pixels', or a pickled network's path or URL.
    teacher     = True,     # Also the teacher's Fréchet distance, once per run?
    agree_num   = 1000,     # Seeds of the teacher agreement (the first of the validation seeds); 0 = none.
    heun_steps  = 18,       # Steps of the Heun sampler (teacher, and the network in EDM training).
    grid_num    = 64,       # Images in the returned grid; 0 = no grid.
    save_best   = True,     # Keep the snapshot with the lowest Fréchet distance as network-snapshot-best.pkl?
    workers     = 2,        # Data loader processes per rank for the reference statistics.
    resume_dir  = None,     # Run directory of the resumed training state: its history counts too.
):
    """Validate `net` at `cur_tick`/`cur_nimg` on all ranks; see the module
    doc. Returns the figures (numbers) and the image grid `samples` (uint8
    HWC) and appends them (rank 0) to metrics-val.jsonl in `run_dir`. With an
    `encoder` (a latent run) the samples are final latents: the detector and the
    grid see them decoded, the agreement compares the latents themselves."""
    time_start = time.time()
    opts = _parse_options(num=num, seed=seed, batch=batch, ref=ref, ref_data=ref_data, detector=detector, teacher=teacher,
        agree_num=agree_num, heun_steps=heun_steps, grid_num=grid_num, save_best=save_best, workers=workers, resume_dir=resume_dir)
    device = torch.device(device)
    rank, world = dist.get_rank(), dist.get_world_size()
    image_shape = [net.img_channels, net.img_resolution, net.img_resolution]
    opts.clip, to_uint8 = encoder is None, (samplers.to_uint8 if encoder is None else encoder.decode)
    if encoder is not None:
        image_shape = list(to_uint8(torch.zeros([1, *image_shape], device=device)).shape[1:])
    history = dist.on_rank0(lambda: _summarize_history(read_history(run_dir, opts.resume_dir)), share=True)

    # Sampler of the network; the teacher of a consistency loss.
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
        teacher_net = None
    if isinstance(teacher_net, torch.nn.Module):
        teacher_net.to(device)
    agree_num = opts.agree_num if teacher_net is not None else 0

    # Detector and reference statistics.
    det, fd_name, ref_stats = None, None, None
    if opts.num > 0:
        det = metrics.load_detector(opts.detector, device=device, option='--val_detector')
        dim = det.feature_dim(image_shape)
        fd_name = det.key
        ref_stats = _reference(opts, det, dim, image_shape, run_dir)

    def fd_of(stats):
        stats.all_reduce()
        mu, sigma = stats.mean_cov()
        return dist.on_rank0(lambda: metrics.frechet_distance(mu, sigma, *ref_stats), share=True)

    figures = dict()
    total = max(opts.num, agree_num)

    # The teacher's Fréchet distance, once per run; its agreement images come with it.
    teacher_name = f'teacher_{fd_name}'
    if teacher_net is not None and opts.teacher and opts.num > 0 and teacher_name not in history['names']:
        dist.print0(f'Validation: {opts.num} teacher images (heun, {opts.heun_steps} steps) for the teacher\'s {det.label}...')
        stats = metrics.FeatureStats(det.device)
        for chunk in _rank_batches(opts.num, opts.batch):
            images = generate_images(teacher_net, chunk, opts.seed, device, samplers.edm_sampler, clip=opts.clip, num_steps=opts.heun_steps)
            stats.append(det(to_uint8(images)))
            agree = [j for j, i in enumerate(chunk) if i < agree_num]
            if agree:
                _teacher_images(teacher_net, [chunk[j] for j in agree], opts, device, new_images=images[agree])
        figures[teacher_name] = fd_of(stats)

    # The network's images: features, agreement with the teacher, the grid.
    dist.print0(f'Validation: {total} images ({sampler_desc}) on {world} rank(s)...')
    stats = metrics.FeatureStats(det.device) if det is not None else None
    sq_err = torch.zeros([2], dtype=torch.float64, device=device) # Sum of squared differences, number of values.
    nonfinite = torch.zeros([], dtype=torch.float64, device=device) # Images with a non-finite pixel.
    grid_items = []
    for chunk in _rank_batches(total, opts.batch):
        images = generate_images(net, chunk, opts.seed, device, sample_fn, clip=opts.clip, **sample_kwargs)
        nonfinite += (~torch.isfinite(images)).flatten(1).any(dim=1).sum()
        images_u8 = to_uint8(images)
        rows = [j for j, i in enumerate(chunk) if i < opts.num]
        if rows:
            stats.append(det(images_u8[rows]))
        rows = [j for j, i in enumerate(chunk) if i < agree_num]
        if rows:
            diff = images[rows] - _teacher_images(teacher_net, [chunk[j] for j in rows], opts, device)
            sq_err += torch.stack([diff.square().sum(), torch.tensor(diff.numel(), dtype=torch.float64, device=device)])
        grid_items += [(i, image.permute(1, 2, 0).cpu().numpy()) for i, image in zip(chunk, images_u8) if i < opts.grid_num]
    if dist.is_distributed():
        torch.distributed.all_reduce(sq_err)
        torch.distributed.all_reduce(nonfinite)
    if nonfinite > 0:
        figures['nonfinite_frac'] = float(nonfinite) / total
    if stats is not None:
        figures[fd_name] = fd_of(stats) if nonfinite == 0 else float('nan') # Features of non-finite images mean nothing.
    if agree_num > 0:
        figures.update(metrics.agreement(float(sq_err[0] / sq_err[1])))
    if nonfinite > 0:
        dist.print0(f'Validation: {int(nonfinite)} of {total} images are not finite (the network diverged); their figures are NaN.')

    # The best snapshot.
    best = False
    if opts.num > 0 and opts.save_best:
        value = figures[fd_name]
        best = math.isfinite(value) and (fd_name not in history['best'] or value < history['best'][fd_name])
        if best:
            save_snapshot(BEST_SNAPSHOT)

    # The grid of the first images.
    grid_items = [item for part in dist.gather_objects(grid_items) for item in part]
    grid = samplers.image_grid([image for _i, image in sorted(grid_items, key=lambda item: item[0])]) if grid_items else None

    # Record and report.
    time_end = time.time()
    figures['sec'] = time_end - time_start
    if rank == 0:
        entry = dict(tick=int(cur_tick), kimg=cur_nimg / 1e3, figures=figures, best=best, sampler=sampler_desc,
            detector=(det.name if det is not None else None), num=opts.num, agree_num=agree_num, seed=opts.seed,
            world_size=world, time_start=time_start, time_end=time_end)
        if run_dir is not None:
            _append_history(run_dir, entry)
        parts = [f'{name} {value:.6g}' for name, value in figures.items() if name != 'sec']
        dist.print0(f'Validation at tick {cur_tick} ({cur_nimg / 1e3:g} kimg): {", ".join(parts)}{" (best)" if best else ""}, {figures["sec"]:.1f} s')
    if grid is not None:
        figures['samples'] = grid
    return figures

#----------------------------------------------------------------------------

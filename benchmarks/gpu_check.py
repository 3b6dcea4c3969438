"""Check and time the CUDA path in one command (docs/distillation.md lists the checks and rows). Needs
only torch and numpy: the checks that need pytest, click, Pillow or scikit-learn skip without them.

    python benchmarks/gpu_check.py [--device=cpu --tiny]
"""

import argparse
import copy
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# pylint: disable=wrong-import-position,protected-access,broad-except
from training import compiling, networks, networks_edm2, steps, precision as precisions
from training.loss import EDMLoss, EDM2Loss
from training.loss_cd import ConsistencyDistillLoss

#----------------------------------------------------------------------------
# Checks: each returns a detail dict, or raises Skip or an exception (failed).

class Skip(Exception):
    pass

def relative_error(ours, ref):
    ref = ref.detach().to(ours.device, torch.float32)
    return float((ours.detach().float() - ref).abs().max() / max(1.0, float(ref.abs().max())))

def _fixture_errors(ctx, family, precision, suffix=''):
    """Relative errors of D_x against the fixtures of `family`, in `precision`."""
    folder, errors = os.path.join(ROOT, 'tests', 'fixtures', f'{family}_reference'), {}
    with open(os.path.join(folder, 'manifest.json')) as f:
        manifest = {name: entry for name, entry in json.load(f).items() if not name.startswith('full:')}
    for name, entry in manifest.items():
        with np.load(os.path.join(folder, f'{name}.npz')) as data:
            arrays = {key: torch.from_numpy(data[key]) for key in data.files}
        net = (networks_edm2.Precond if family == 'edm2' else getattr(networks, entry['precond']))(**entry['kwargs'])
        net.load_state_dict({k.removeprefix('state/'): v for k, v in arrays.items() if k.startswith('state/')})
        net = precisions.configure(net, precision).eval().to(ctx.device)
        inputs = {k.removeprefix('input/'): v.to(ctx.device) for k, v in arrays.items() if k.startswith('input/')}
        with torch.no_grad(), precisions.autocast(net, precision, ctx.device):
            D_x = net(inputs.pop('x'), inputs.pop('sigma'), inputs.pop('class_labels', None), **inputs)
        errors[name + suffix] = relative_error(D_x, arrays['output/D_x'])
    return errors

def check_fixtures_fp32(ctx):
    """The EDM (1e-4) and EDM2 (1e-5) fixtures in float32 on the device, TF32 off."""
    tol = dict(edm=1e-4, edm2=1e-5)
    errors = {family: _fixture_errors(ctx, family, 'fp32') for family in tol}
    bad = {name: e for family in tol for name, e in errors[family].items() if e > tol[family]}
    if bad:
        raise AssertionError(f'fixtures beyond tolerance: {bad}')
    return errors

def check_fixtures_fp16_bf16(ctx):
    """The EDM fixtures in fp16 (EDM's use_fp16) and bf16 (autocast), loosely: 5e-2 and 1e-1."""
    if not ctx.cuda:
        raise Skip('reduced precision runs on CUDA only')
    errors = {k: e for p in ('fp16', 'bf16') for k, e in _fixture_errors(ctx, 'edm', p, '/' + p).items()}
    bad = {key: e for key, e in errors.items() if e > (5e-2 if key.endswith('fp16') else 1e-1)}
    if bad:
        raise AssertionError(f'reduced-precision fixtures beyond tolerance: {bad}')
    return errors

def check_attention_and_gradients(ctx):
    """scaled_dot_product_attention and its gradients against the einsum form, per dtype."""
    details = {}
    for dtype in [torch.float32] + [torch.float16, torch.bfloat16] * ctx.cuda:
        gen = torch.Generator().manual_seed(0)
        q, k, v, upstream = (torch.randn(16, 64, 256, generator=gen).to(ctx.device) for _ in range(4))
        ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
        w = torch.einsum('ncq,nck->nqk', ref_in[0], ref_in[1] / np.sqrt(64)).softmax(dim=2)
        y_ref = torch.einsum('nqk,nck->ncq', w, ref_in[2])
        grads_ref = torch.autograd.grad(y_ref, ref_in, upstream)
        ours_in = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        y = networks.attention(*ours_in)
        grads = torch.autograd.grad(y, ours_in, upstream.to(dtype))
        err = max(relative_error(a, b) for a, b in zip([y, *grads], [y_ref, *grads_ref]))
        details[str(dtype).removeprefix('torch.')] = err
        if err > (1e-4 if dtype == torch.float32 else 3e-2):
            raise AssertionError(f'attention in {dtype} differs from the einsum form by {err:.3g}')
    return details

def _small_edm(ctx):
    torch.manual_seed(1)
    net = networks.EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=32,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.3)
    with torch.no_grad(): # Off EDM's near-zero output init, so that dropout shows.
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.train().to(ctx.device)

def check_dropout_replay_live(ctx, compiled=False):
    """The `live` target draws the student's dropout masks, on the device's generator (eager)."""
    if compiled:
        if ctx.tiny:
            raise Skip('--tiny: no compilation')
        torch._dynamo.reset()
    student = _small_edm(ctx)
    loss_fn = ConsistencyDistillLoss(S=4, T_start=32, T_end=32, target_mode='live')
    loss_fn.set_teacher(copy.deepcopy(student).eval())
    if compiled:
        loss_fn.set_compile(compiling.compile_network)
        student = compiling.compile_network(student)
    d = loss_fn.draw(student, torch.rand(32, 1, 8, 8, device=ctx.device) * 2 - 1)
    if ctx.cuda:
        torch.cuda.set_rng_state(d.rng_state, ctx.device)
    else:
        torch.set_rng_state(d.rng_state)
    own, g = student(d.x_in, d.s_in), d.general
    err, control = relative_error(d.target_out[g], own[g]), relative_error(student(d.x_in, d.s_in)[g], own[g])
    if err > (1e-3 if compiled else 1e-6) or control < (1e-2 if compiled else 1e-3):
        raise AssertionError(f'{"compiled: " * compiled}replayed masks differ by {err:.3g} (others: {control:.3g})')
    return dict(replayed=err, other_masks=control, **({} if compiled else dict(generator=ctx.device.type)))

def check_dropout_replay_live_compiled(ctx):
    """The same with torch.compile (eager random numbers in compiled graphs)."""
    return check_dropout_replay_live(ctx, compiled=True)

def _adam(ctx, net):
    return steps.make_optimizer(net.parameters(), dict(class_name='torch.optim.Adam', lr=1e-4), ctx.device)

def _train_step(ddp, net, loss_fn, optimizer, images, labels, precision):
    """One step of the training loop in `precision`."""
    optimizer.zero_grad(set_to_none=True)
    steps.accumulate_gradients(ddp, loss_fn, lambda: (images, labels), 1, images.shape[0], precision=precision)
    grad_norm = steps.optimizer_step(net, optimizer, 1e-4)
    steps.update_target(loss_fn, net, torch.isfinite(grad_norm))

def check_step_without_host_sync(ctx):
    """A distillation step (ema target, dropout replay, fused Adam, statistics) under set_sync_debug_mode('error')."""
    if not ctx.cuda:
        raise Skip('host synchronisation is a CUDA notion')
    net = _small_edm(ctx)
    loss_fn = ConsistencyDistillLoss(S=4, T_start=16, T_end=64, T_anneal_kimg=0.1, target_mode='ema')
    loss_fn.set_teacher(precisions.Teacher(copy.deepcopy(net).eval(), 'bf16'))
    optimizer = _adam(ctx, net)
    images = torch.rand(32, 1, 8, 8, device=ctx.device) * 2 - 1
    step = lambda: _train_step(net, net, loss_fn, optimizer, images, None, 'bf16')
    step() # Creates the target and the optimizer state.
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for cur_nimg in (32, 64): # T grows: each step builds a new teacher grid.
            loss_fn.set_progress(cur_nimg)
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return dict(fused=bool(optimizer.defaults.get('fused')), T=[int(v) for v in (loss_fn.T_start, loss_fn.T)])

def _run(args, env=None):
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False)
    if proc.returncode != 0:
        raise AssertionError(f'{" ".join(args[1:4])} failed: {(proc.stderr or proc.stdout)[-2000:]}')
    return proc

def check_pytest_cuda_only_tests(ctx):
    """The suite's CUDA-only tests."""
    if not ctx.cuda:
        raise Skip('on the CPU these tests skip themselves')
    if importlib.util.find_spec('pytest') is None:
        raise Skip('pytest is not installed')
    proc = _run([sys.executable, '-m', 'pytest', '-qp', 'no:cacheprovider', 'tests/test_networks.py', '-k', 'cuda'])
    return dict(summary=(proc.stdout.strip().splitlines() or [''])[-1])

def check_torchrun_distillation(ctx):
    """Digits, a small teacher, then one-process torchrun distillation with validation (NCCL and bf16 on CUDA)."""
    if ctx.tiny:
        raise Skip('--tiny: see tests/test_train_ddp.py and tests/test_train_val.py')
    missing = [name for name in ('click', 'PIL', 'sklearn') if importlib.util.find_spec(name) is None]
    if missing:
        raise Skip(f'train.py and dataset_tool.py need {", ".join(missing)}')
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    env.pop('WANDB_MODE', None)
    py, device = sys.executable, ctx.device.type
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, 'digits8.zip')
        small = [f'--data={data}', f'--device={device}', *('--nosubdir --arch=ddpmpp --cbase=32 --cres=1,2 --augment=0 '
            '--batch=64 --tick=1 --snap=1 --dump=1 --seed=1 --workers=0 --lr_rampup=0 --duration=0.004').split()]
        _run([py, 'dataset_tool.py', '--source=digits', f'--dest={data}', '--resolution=8x8'], env)
        _run([py, 'train.py', f'--outdir={tmp}/teacher', *small], env)
        proc = _run([py, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', 'train.py', *small,
            f'--outdir={tmp}/student', f'--teacher={tmp}/teacher/network-snapshot-000004.pkl', *('--consistency=True '
            '--S=2 --T_start=8 --T_end=16 --T_anneal_kimg=4 --val=1 --val_every=2 --val_num=512 --val_detector=pixels '
            '--val_agree_num=64 --val_batch=128').split(), *['--precision=bf16'] * (device == 'cuda')], env)
        with open(os.path.join(tmp, 'student', 'stats.jsonl')) as f:
            stats = [json.loads(line) for line in f]
    validation = {key: value['mean'] for s in stats for key, value in s.items() if key.startswith('Validation/')}
    if not validation or 'Ranks:            1 on ' + device not in proc.stdout:
        raise AssertionError(f'no validation figures or not one rank on {device}: {proc.stdout[-1500:]}')
    return dict(validation=validation, ticks=len(stats))

CHECKS = [(name.removeprefix('check_'), fn) for name, fn in globals().items() if name.startswith('check_')] # In order.

#----------------------------------------------------------------------------
# Throughput: images/s and peak memory of EDM and distillation steps.

def _networks(tiny):
    """(name, class, keywords, EDM loss, per-GPU batch) rows."""
    if tiny:
        kw = dict(img_resolution=8, img_channels=3, label_dim=10, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[4])
        return [('adm-tiny', networks.EDMPrecond, dict(kw, model_type='DhariwalUNet', model_channels=32, dropout=0.1),
            EDMLoss, 8), ('edm2-tiny', networks_edm2.Precond, dict(kw, model_channels=16, channels_per_head=16,
            use_fp16=False), EDM2Loss, 8)]
    kw = dict(img_resolution=64, img_channels=3, label_dim=1000) # EDM's 4096 and EDM2's 2048 on 32 GPUs.
    return [('imagenet64-adm', networks.EDMPrecond, dict(kw, model_type='DhariwalUNet', model_channels=192,
        channel_mult=[1, 2, 3, 4], dropout=0.1), EDMLoss, 128),
        ('edm2-img64-s', networks_edm2.Precond, dict(kw, model_channels=192, use_fp16=False), EDM2Loss, 64)]

def _time(ctx, step):
    """Median seconds of ctx.steps calls after two warm-ups, and the peak memory in GiB."""
    times = []
    for i in range(2 + ctx.steps):
        if ctx.cuda and i == 2:
            torch.cuda.reset_peak_memory_stats(ctx.device)
        start = time.perf_counter()
        step()
        if ctx.cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times[2:])), (torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None)

def measure(ctx, row, net_class, net_kwargs, edm_loss):
    batch, precision, compiled = row['batch'], row['precision'], row['compile']
    torch.manual_seed(0)
    net = precisions.configure(net_class(**net_kwargs), precision).train().requires_grad_(True).to(ctx.device)
    teacher = precisions.Teacher(copy.deepcopy(net).eval().requires_grad_(False), precision)
    images = torch.rand(batch, net.img_channels, net.img_resolution, net.img_resolution, device=ctx.device) * 2 - 1
    labels = torch.randint(0, net.label_dim, [batch], device=ctx.device)
    labels = torch.nn.functional.one_hot(labels, net.label_dim).float()
    if compiled:
        torch._dynamo.reset() # The recompilation limit.
    student = compiling.compile_network(net) if compiled else net
    timed = lambda loss_fn, opt: _time(ctx, lambda: _train_step(student, net, loss_fn, opt, images, labels, precision))
    row = dict(row, params=sum(p.numel() for p in net.parameters()))
    row['edm_sec'], row['edm_mem_gb'] = timed(edm_loss(), _adam(ctx, net))
    cd_loss = ConsistencyDistillLoss(S=8, T_start=1280, T_end=1280, target_mode='ema').set_teacher(teacher)
    if compiled:
        cd_loss.set_compile(compiling.compile_network)
    row['cd_sec'], row['cd_mem_gb'] = timed(cd_loss, _adam(ctx, net))
    row.update(edm_img_per_s=batch / row['edm_sec'], cd_img_per_s=batch / row['cd_sec'],
        cd_over_edm=row['cd_sec'] / row['edm_sec'], status='measured')
    if compiled and student._compiled[0] is None:
        row.update(status='failed', reason=f'torch.compile fell back to eager: {compiling._warned}')
    return row

def throughput(ctx):
    """Eager, then compiled bf16, then compiled fp16 rows; none starts after ctx.budget seconds."""
    rows, start, nets = [], time.time(), _networks(ctx.tiny)
    order = [(n, p, False) for n in nets for p in ('fp16', 'bf16')]
    order += [(n, p, True) for p in ('bf16', 'fp16') for n in nets]
    for (name, net_class, net_kwargs, edm_loss, batch), precision, compiled in order:
        row = dict(network=name, batch=batch, precision=precision, compile=compiled)
        if compiled and ctx.tiny:
            rows.append(dict(row, status='skipped', reason='--tiny: no compilation'))
        elif time.time() - start > ctx.budget:
            rows.append(dict(row, status='skipped', reason=f'time budget of {ctx.budget:g} s spent (--budget)'))
        else:
            try:
                rows.append(measure(ctx, row, net_class, net_kwargs, edm_loss))
            except Exception as err:
                rows.append(dict(row, status='failed', reason=f'{type(err).__name__}: {str(err)[:500]}'))
            if ctx.cuda:
                torch.cuda.empty_cache()
    return rows

#----------------------------------------------------------------------------

def table(result):
    lines = [f'GPU check of {result["date"]} on {result["device_name"]} (torch {result["torch"]}):', '']
    for c in result['checks']:
        lines.append(f'  {c["name"]:30s} {c["status"]:8s} {c["seconds"]:7.1f} s  {c.get("reason", "")}'.rstrip())
    lines += ['', '  network          batch  prec  compile  EDM img/s   CD img/s  CD/EDM  EDM GiB   CD GiB']
    mem = lambda v: f'{v:8.1f}' if v is not None else f'{"-":>8s}'
    for r in result['throughput']:
        head = f'  {r["network"]:16s} {r["batch"]:5d} {r["precision"]:>5s} {str(r["compile"]):>8s}'
        if r['status'] != 'measured':
            lines.append(f'{head}  {r["status"]}: {r["reason"]}')
        else:
            lines.append(f'{head} {r["edm_img_per_s"]:10.1f} {r["cd_img_per_s"]:10.1f} {r["cd_over_edm"]:6.2f}x '
                f'{mem(r["edm_mem_gb"])} {mem(r["cd_mem_gb"])}')
    return '\n'.join(lines)

def main(argv=None):
    parser = argparse.ArgumentParser(description='Check and time the CUDA path.')
    add = parser.add_argument
    add('--device', choices=['cuda', 'cpu'], default='cuda' if torch.cuda.is_available() else 'cpu',
        help='[default: cuda when available]')
    add('--tiny', action='store_true', help='small networks, no compilation (for the CPU)')
    add('--out', default=os.environ.get('OUT') or 'gpu-check', help='output folder [default: $OUT or gpu-check]')
    add('--budget', type=float, default=150, help='seconds after which no row starts [default: 150]')
    add('--steps', type=int, default=5, help='timed steps of each kind per row [default: 5]')
    add('--checks', default='all', help='comma-separated check names, all, or none')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        parser.error('--device=cuda: this machine has no CUDA GPU; pass --device=cpu --tiny.')
    names = dict(all=dict(CHECKS), none=[]).get(args.checks, args.checks.split(','))
    unknown = sorted(set(names) - set(dict(CHECKS)))
    if unknown:
        parser.error(f'--checks names unknown checks {unknown}; choose from {", ".join(dict(CHECKS))}.')

    ctx = argparse.Namespace(device=torch.device(args.device), cuda=args.device == 'cuda', tiny=args.tiny,
        budget=args.budget, steps=2 if args.tiny else args.steps)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False # Fixtures in float32 mean float32.
    torch.backends.cudnn.benchmark = True
    if args.tiny:
        torch.set_num_threads(1)
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        torch=torch.__version__, device=args.device, device_name=torch.cuda.get_device_name(ctx.device)
        if args.device == 'cuda' else 'CPU', tiny=args.tiny, checks=[], throughput=[])
    for name, check in CHECKS:
        entry, start = dict(name=name, doc=check.__doc__), time.time()
        try:
            if name not in names:
                raise Skip('not in --checks')
            entry.update(status='passed', detail=check(ctx))
        except Skip as skip:
            entry.update(status='skipped', reason=str(skip))
        except Exception as err:
            entry.update(status='failed', reason=f'{type(err).__name__}: {str(err)[:3000]}')
        entry['seconds'] = time.time() - start
        result['checks'].append(entry)
        print(f'{name}: {entry["status"]} {entry.get("reason", "")}', flush=True)
    result['throughput'] = throughput(ctx)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, 'gpu_check.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(result, f, indent=2, default=str)
    os.replace(path + '.tmp', path)
    print(f'Wrote {path}.\n\n{table(result)}')
    return int(any(x['status'] == 'failed' for x in result['checks'] + result['throughput']))

if __name__ == '__main__':
    sys.exit(main())

#----------------------------------------------------------------------------

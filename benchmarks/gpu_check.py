"""Check and time the CUDA path in one command (issue 17).

On one GPU, in at most about 8 minutes: the checks that need CUDA (the
fixtures in float32 and in reduced precision, attention and its gradients,
the dropout replay of the `live` target, a distillation step under
torch.cuda.set_sync_debug_mode('error'), the suite's CUDA-only tests when
pytest is there, a one-process torchrun (NCCL) distillation on the digits
with validation), then images/s and peak memory of an EDM step and a
distillation step for the ImageNet-64 ADM network and EDM2-img64-S at a
realistic per-GPU batch, in fp16 and bf16, eager and compiled. It writes
gpu_check.json into --out (default: $OUT when set, else gpu-check/) and prints
a table last; the exit code is 1 when a check failed.

It needs only the packages of a plain CUDA PyTorch image (torch, numpy; no
click, wandb, diffusers or pytest: a missing pytest skips the suite's CUDA-only
tests, and a missing click, Pillow or scikit-learn the torchrun distillation,
each with that reason). `--device=cpu --tiny` runs the same checks on small
networks on the CPU (tests/test_gpu_check.py); what needs CUDA or compilation
is then skipped, each with its reason.

    python benchmarks/gpu_check.py                          # on a GPU
    python benchmarks/gpu_check.py --device=cpu --tiny      # on the CPU, in seconds
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

from training import compiling                          # pylint: disable=wrong-import-position
from training import networks                           # pylint: disable=wrong-import-position
from training import networks_edm2                      # pylint: disable=wrong-import-position
from training import precision as precisions            # pylint: disable=wrong-import-position
from training import steps                              # pylint: disable=wrong-import-position
from training.loss import EDMLoss, EDM2Loss             # pylint: disable=wrong-import-position
from training.loss_cd import ConsistencyDistillLoss     # pylint: disable=wrong-import-position

FIXTURES = os.path.join(ROOT, 'tests', 'fixtures')

#----------------------------------------------------------------------------
# Checks: each returns a detail dict, or raises Skip (with the reason) or an exception (failed).

class Skip(Exception):
    """The check does not apply here; the message says why."""

def relative_error(ours, ref):
    ref = ref.detach().to(ours.device, torch.float32)
    return float((ours.detach().float() - ref).abs().max() / max(1.0, float(ref.abs().max())))

def _fixtures(family):
    """(name, network, arrays) of the reference fixtures of 'edm_reference' or 'edm2_reference'."""
    with open(os.path.join(FIXTURES, family, 'manifest.json')) as f:
        manifest = json.load(f)
    for name, entry in manifest.items():
        if not name.startswith('full:'):
            with np.load(os.path.join(FIXTURES, family, f'{name}.npz')) as data:
                arrays = {key: torch.from_numpy(data[key]) for key in data.files}
            net_class = networks_edm2.Precond if family == 'edm2_reference' else getattr(networks, entry['precond'])
            yield name, net_class(**entry['kwargs']), arrays

def _fixture_errors(net, arrays, device, precision):
    """Relative errors of D_x against a fixture, with the network in `precision`."""
    state = {key[len('state/'):]: value for key, value in arrays.items() if key.startswith('state/')}
    net.load_state_dict(state, strict=True)
    net = precisions.configure(net, precision).eval().to(device)
    inputs = {key: value.to(device) for key, value in arrays.items() if key.startswith('input/')}
    kwargs = {'augment_labels': inputs['input/augment_labels']} if 'input/augment_labels' in inputs else {}
    with torch.no_grad(), precisions.autocast(net, precision, device):
        D_x = net(inputs['input/x'], inputs['input/sigma'], inputs.get('input/class_labels'), **kwargs)
    return relative_error(D_x, arrays['output/D_x'])

def check_fixtures_fp32(ctx):
    """The EDM (1e-4) and EDM2 (1e-5) fixtures in float32 on the device, TF32 off."""
    errors = {name: _fixture_errors(net, arrays, ctx.device, 'fp32') for name, net, arrays in _fixtures('edm_reference')}
    errors2 = {name: _fixture_errors(net, arrays, ctx.device, 'fp32') for name, net, arrays in _fixtures('edm2_reference')}
    bad = {name: e for name, e in errors.items() if e > 1e-4} | {name: e for name, e in errors2.items() if e > 1e-5}
    if bad:
        raise AssertionError(f'fixtures beyond tolerance: {bad}')
    return dict(edm=errors, edm2=errors2)

def check_fixtures_reduced(ctx):
    """The EDM fixtures in fp16 (EDM's use_fp16) and bf16 (autocast), loosely: 5e-2 and 1e-1."""
    if ctx.device.type != 'cuda':
        raise Skip('reduced precision runs on CUDA only')
    errors = {f'{name}/{p}': _fixture_errors(net, arrays, ctx.device, p) for p in ('fp16', 'bf16') for name, net, arrays in _fixtures('edm_reference')}
    bad = {key: e for key, e in errors.items() if e > (5e-2 if key.endswith('fp16') else 1e-1)}
    if bad:
        raise AssertionError(f'reduced-precision fixtures beyond tolerance: {bad}')
    return errors

def check_attention(ctx):
    """scaled_dot_product_attention and its gradients against the einsum form, per dtype."""
    details = {}
    for dtype in ([torch.float32] + ([torch.float16, torch.bfloat16] if ctx.device.type == 'cuda' else [])):
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(16, 64, 256, generator=gen).to(ctx.device) for _ in range(3))
        upstream = torch.randn(16, 64, 256, generator=gen).to(ctx.device)
        ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
        w = torch.einsum('ncq,nck->nqk', ref_in[0], ref_in[1] / np.sqrt(64)).softmax(dim=2)
        y_ref = torch.einsum('nqk,nck->ncq', w, ref_in[2])
        grads_ref = torch.autograd.grad(y_ref, ref_in, upstream)
        ours_in = [t.to(dtype).requires_grad_(True) for t in (q, k, v)]
        y = networks.attention(*ours_in)
        grads = torch.autograd.grad(y, ours_in, upstream.to(dtype))
        errs = [relative_error(y, y_ref)] + [relative_error(g, g_ref) for g, g_ref in zip(grads, grads_ref)]
        details[str(dtype).removeprefix('torch.')] = max(errs)
        if max(errs) > (1e-4 if dtype == torch.float32 else 3e-2):
            raise AssertionError(f'attention in {dtype} differs from the einsum form by {max(errs):.3g}')
    return details

def _small_edm(ctx, dropout=0.3):
    torch.manual_seed(1)
    net = networks.EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=32, channel_mult=[1, 2],
        num_blocks=1, attn_resolutions=[4], dropout=dropout)
    with torch.no_grad(): # Leave EDM's near-zero output initialisation, so that dropout shows.
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.train().to(ctx.device)

def _replay(ctx, student, loss_fn):
    """Largest difference between the target's output and the student's own pass on the general rows."""
    images = torch.rand(32, 1, 8, 8, device=ctx.device) * 2 - 1
    d = loss_fn.draw(student, images)
    if ctx.device.type == 'cuda':
        torch.cuda.set_rng_state(d.rng_state, ctx.device)
    else:
        torch.set_rng_state(d.rng_state)
    own = student(d.x_in, d.s_in)
    fresh = student(d.x_in, d.s_in)
    general = d.general
    return relative_error(d.target_out[general], own[general]), relative_error(fresh[general], own[general])

def check_dropout_replay(ctx):
    """The `live` target draws the student's dropout masks, on the device's generator (eager)."""
    student = _small_edm(ctx)
    teacher = copy.deepcopy(student).eval()
    loss_fn = ConsistencyDistillLoss(S=4, T_start=32, T_end=32, target_mode='live').set_teacher(teacher)
    err, control = _replay(ctx, student, loss_fn)
    if err > 1e-6 or control < 1e-3:
        raise AssertionError(f'replayed masks differ by {err:.3g} (other masks: {control:.3g})')
    return dict(replayed=err, other_masks=control, generator=ctx.device.type)

def check_dropout_replay_compiled(ctx):
    """The same with torch.compile (eager random numbers in compiled graphs)."""
    if ctx.tiny:
        raise Skip('--tiny: no compilation')
    torch._dynamo.reset() # pylint: disable=protected-access
    student = _small_edm(ctx)
    teacher = copy.deepcopy(student).eval()
    loss_fn = ConsistencyDistillLoss(S=4, T_start=32, T_end=32, target_mode='live').set_teacher(teacher).set_compile(compiling.compile_network)
    err, control = _replay(ctx, compiling.compile_network(student), loss_fn)
    if err > 1e-3 or control < 1e-2:
        raise AssertionError(f'compiled: replayed masks differ by {err:.3g} (other masks: {control:.3g})')
    return dict(replayed=err, other_masks=control)

def _cd_setup(ctx, net, teacher, loss_kwargs):
    loss_fn = ConsistencyDistillLoss(**loss_kwargs).set_teacher(teacher)
    optimizer = steps.make_optimizer(net.parameters(), dict(class_name='torch.optim.Adam', lr=1e-4), ctx.device)
    return loss_fn, optimizer

def _train_step(ddp, net, loss_fn, optimizer, images, labels, precision):
    """One optimizer step of the training loop: gradients in `precision`, the step, target and statistics."""
    optimizer.zero_grad(set_to_none=True)
    steps.accumulate_gradients(ddp, loss_fn, lambda: (images, labels), 1, images.shape[0], precision=precision)
    grad_norm = steps.optimizer_step(net, optimizer, 1e-4)
    steps.update_target(loss_fn, net, torch.isfinite(grad_norm))

def check_sync_free_step(ctx):
    """A distillation step (ema target, dropout replay, fused Adam, statistics) under set_sync_debug_mode('error')."""
    if ctx.device.type != 'cuda':
        raise Skip('host synchronisation is a CUDA notion (tests/test_cd_fixed_shapes.py spies on host reads on the CPU)')
    net = _small_edm(ctx)
    teacher = precisions.Teacher(copy.deepcopy(net).eval(), 'bf16')
    loss_fn, optimizer = _cd_setup(ctx, net, teacher, dict(S=4, T_start=16, T_end=64, T_anneal_kimg=0.1, target_mode='ema'))
    images = torch.rand(32, 1, 8, 8, device=ctx.device) * 2 - 1
    _train_step(net, net, loss_fn, optimizer, images, None, 'bf16') # The target and the optimizer state exist after it.
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for cur_nimg in (32, 64): # T grows: each step builds a new teacher grid.
            loss_fn.set_progress(cur_nimg)
            _train_step(net, net, loss_fn, optimizer, images, None, 'bf16')
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return dict(fused=bool(optimizer.defaults.get('fused')), T=[int(v) for v in (loss_fn.T_start, loss_fn.T)])

def check_pytest_cuda_tests(ctx):
    """The suite's CUDA-only tests (those that skip themselves on the CPU)."""
    if ctx.device.type != 'cuda':
        raise Skip('on the CPU these tests skip themselves')
    if importlib.util.find_spec('pytest') is None:
        raise Skip('pytest is not installed here; its CUDA-only tests are tests/test_networks.py::test_use_fp16_on_cuda')
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', 'tests/test_networks.py', '-k', 'cuda'],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    last = (proc.stdout.strip().splitlines() or [''])[-1]
    if proc.returncode != 0:
        raise AssertionError(f'pytest: {last}\n{proc.stdout[-2000:]}')
    return dict(summary=last)

def _run(args, env, timeout):
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if proc.returncode != 0:
        raise AssertionError(f'{" ".join(args[1:4])} failed: {(proc.stderr or proc.stdout)[-2000:]}')
    return proc

def check_torchrun_distillation(ctx):
    """dataset_tool.py digits, a small teacher, then one-process torchrun distillation with validation (NCCL and bf16 on CUDA)."""
    if ctx.tiny:
        raise Skip('--tiny: the distributed runs are tests/test_train_ddp.py and tests/test_train_val.py')
    missing = [name for name in ('click', 'PIL', 'sklearn') if importlib.util.find_spec(name) is None]
    if missing:
        raise Skip(f'train.py and dataset_tool.py need {", ".join(missing)}, which this Python lacks')
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS='1')
    env.pop('WANDB_MODE', None)
    device = ctx.device.type
    small = ['--arch=ddpmpp', '--cbase=32', '--cres=1,2', '--augment=0', '--batch=64', '--tick=1', '--snap=1', '--dump=1', '--seed=1',
        '--workers=0', '--lr_rampup=0', f'--device={device}']
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, 'digits8.zip')
        _run([sys.executable, 'dataset_tool.py', '--source=digits', f'--dest={data}', '--resolution=8x8'], env, 300)
        _run([sys.executable, 'train.py', f'--outdir={tmp}/teacher', '--nosubdir', f'--data={data}', *small, '--duration=0.004'], env, 300)
        proc = _run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1', 'train.py', f'--outdir={tmp}/student',
            '--nosubdir', f'--data={data}', *small, '--duration=0.004', '--consistency=True', f'--teacher={tmp}/teacher/network-snapshot-000004.pkl',
            '--S=2', '--T_start=8', '--T_end=16', '--T_anneal_kimg=4', '--val=1', '--val_every=2', '--val_num=512', '--val_detector=pixels',
            '--val_agree_num=64', '--val_batch=128'] + (['--precision=bf16'] if device == 'cuda' else []), env, 300)
        with open(os.path.join(tmp, 'student', 'stats.jsonl')) as f:
            stats = [json.loads(line) for line in f]
        validation = {key: value['mean'] for s in stats for key, value in s.items() if key.startswith('Validation/')}
        if not validation or 'Ranks:            1 on ' + device not in proc.stdout:
            raise AssertionError(f'no validation figures or not one rank on {device}: {proc.stdout[-1500:]}')
        return dict(validation=validation, ticks=len(stats))

CHECKS = [
    ('fixtures_fp32',               check_fixtures_fp32),
    ('fixtures_fp16_bf16',          check_fixtures_reduced),
    ('attention_and_gradients',     check_attention),
    ('dropout_replay_live',         check_dropout_replay),
    ('dropout_replay_live_compiled', check_dropout_replay_compiled),
    ('step_without_host_sync',      check_sync_free_step),
    ('pytest_cuda_only_tests',      check_pytest_cuda_tests),
    ('torchrun_distillation',       check_torchrun_distillation),
]

#----------------------------------------------------------------------------
# Throughput: images/s and peak memory of an EDM step and a distillation step.

def _networks(ctx):
    """(name, constructor, EDM loss, per-GPU batch) of the timed networks."""
    if ctx.tiny:
        return [
            ('adm-tiny', lambda: networks.EDMPrecond(img_resolution=8, img_channels=3, label_dim=10, model_type='DhariwalUNet', model_channels=32,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.1), EDMLoss, 8),
            ('edm2-tiny', lambda: networks_edm2.Precond(img_resolution=8, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1, 2],
                num_blocks=1, attn_resolutions=[4], channels_per_head=16, use_fp16=False), EDM2Loss, 8),
        ]
    return [ # EDM's ImageNet-64 ADM (batch 4096 on 32 GPUs) and EDM2-img64-S (batch 2048 on 32 GPUs).
        ('imagenet64-adm', lambda: networks.EDMPrecond(img_resolution=64, img_channels=3, label_dim=1000, model_type='DhariwalUNet',
            model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.1), EDMLoss, 128),
        ('edm2-img64-s', lambda: networks_edm2.Precond(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192, use_fp16=False),
            EDM2Loss, 64),
    ]

def _time(ctx, step, num):
    """Median seconds of `num` calls of step() after two warm-up calls, and the peak memory in GiB."""
    cuda = ctx.device.type == 'cuda'
    for _ in range(2):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    times = []
    for _ in range(num):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), (torch.cuda.max_memory_allocated(ctx.device) / 2**30 if cuda else None)

def measure(ctx, name, make_net, edm_loss, batch, precision, compile_networks):
    """One throughput row."""
    torch.manual_seed(0)
    net = precisions.configure(make_net(), precision).train().requires_grad_(True).to(ctx.device)
    teacher = precisions.Teacher(copy.deepcopy(net).eval().requires_grad_(False), precision)
    images = torch.rand(batch, net.img_channels, net.img_resolution, net.img_resolution, device=ctx.device) * 2 - 1
    labels = torch.nn.functional.one_hot(torch.randint(0, net.label_dim, [batch], device=ctx.device), net.label_dim).float()
    if compile_networks:
        torch._dynamo.reset() # pylint: disable=protected-access # Each row compiles afresh, clear of the recompilation limit.
    student = compiling.compile_network(net) if compile_networks else net
    row = dict(network=name, batch=batch, precision=precision, compile=compile_networks, params=sum(p.numel() for p in net.parameters()))
    edm_opt = steps.make_optimizer(net.parameters(), dict(class_name='torch.optim.Adam', lr=1e-4), ctx.device)
    loss = edm_loss()
    row['edm_sec'], row['edm_mem_gb'] = _time(ctx, lambda: _train_step(student, net, loss, edm_opt, images, labels, precision), ctx.steps)
    del edm_opt
    cd_loss, cd_opt = _cd_setup(ctx, net, teacher, dict(S=8, T_start=1280, T_end=1280, target_mode='ema'))
    if compile_networks:
        cd_loss.set_compile(compiling.compile_network)
    row['cd_sec'], row['cd_mem_gb'] = _time(ctx, lambda: _train_step(student, net, cd_loss, cd_opt, images, labels, precision), ctx.steps)
    row.update(edm_img_per_s=batch / row['edm_sec'], cd_img_per_s=batch / row['cd_sec'], cd_over_edm=row['cd_sec'] / row['edm_sec'], status='measured')
    if compile_networks and student._compiled[0] is None: # pylint: disable=protected-access
        row.update(status='failed', reason=f'torch.compile fell back to eager: {compiling._warned}') # pylint: disable=protected-access
    return row

def throughput(ctx):
    """The rows: eager first, then compiled bf16, then compiled fp16; once `ctx.budget` seconds are
    spent, the rows not yet started are skipped with that reason."""
    rows = []
    start = time.time()
    nets = _networks(ctx)
    order = [(net, p, False) for net in nets for p in ('fp16', 'bf16')] + [(net, p, True) for p in ('bf16', 'fp16') for net in nets]
    for (name, make_net, edm_loss, batch), precision, compile_networks in order:
        row = dict(network=name, batch=batch, precision=precision, compile=compile_networks)
        if compile_networks and ctx.tiny:
            rows.append(dict(row, status='skipped', reason='--tiny: no compilation'))
        elif time.time() - start > ctx.budget:
            rows.append(dict(row, status='skipped', reason=f'time budget of {ctx.budget:g} s spent (--budget)'))
        else:
            try:
                rows.append(measure(ctx, name, make_net, edm_loss, batch, precision, compile_networks))
            except Exception as err: # pylint: disable=broad-except
                rows.append(dict(row, status='failed', reason=f'{type(err).__name__}: {str(err)[:500]}'))
            if ctx.device.type == 'cuda':
                torch.cuda.empty_cache()
    return rows

#----------------------------------------------------------------------------

def table(result):
    """The report as text: the checks, then the throughput rows."""
    lines = [f'GPU check of {result["date"]} on {result["device_name"]} (torch {result["torch"]}):', '']
    for check in result['checks']:
        lines.append(f'  {check["name"]:30s} {check["status"]:8s} {check["seconds"]:7.1f} s  {check.get("reason", "")}'.rstrip())
    lines += ['', f'  {"network":16s} {"batch":>5s} {"prec":>5s} {"compile":>8s} {"EDM img/s":>10s} {"CD img/s":>10s} {"CD/EDM":>7s} {"EDM GiB":>8s} {"CD GiB":>8s}']
    for row in result['throughput']:
        if row['status'] != 'measured':
            lines.append(f'  {row["network"]:16s} {row["batch"]:5d} {row["precision"]:>5s} {str(row["compile"]):>8s}  {row["status"]}: {row["reason"]}')
            continue
        mem = lambda v: f'{v:8.1f}' if v is not None else f'{"-":>8s}'
        lines.append(f'  {row["network"]:16s} {row["batch"]:5d} {row["precision"]:>5s} {str(row["compile"]):>8s} {row["edm_img_per_s"]:10.1f} '
            f'{row["cd_img_per_s"]:10.1f} {row["cd_over_edm"]:6.2f}x {mem(row["edm_mem_gb"])} {mem(row["cd_mem_gb"])}')
    return '\n'.join(lines)

def main(argv=None):
    parser = argparse.ArgumentParser(description='Check and time the CUDA path of the repository.')
    parser.add_argument('--device', default=('cuda' if torch.cuda.is_available() else 'cpu'), help='cuda or cpu  [default: cuda when available]')
    parser.add_argument('--tiny', action='store_true', help='small networks and batches, no compilation (for the CPU)')
    parser.add_argument('--out', default=os.environ.get('OUT') or 'gpu-check', help='folder of gpu_check.json  [default: $OUT, else gpu-check]')
    parser.add_argument('--budget', type=float, default=150, help='seconds after which throughput rows not yet started are skipped  [default: 150]')
    parser.add_argument('--steps', type=int, default=5, help='timed steps of each kind per row  [default: 5]')
    parser.add_argument('--checks', default='all', help='comma-separated check names to run, or all, or none')
    args = parser.parse_args(argv)
    if args.device not in ('cuda', 'cpu') or (args.device == 'cuda' and not torch.cuda.is_available()):
        parser.error(f'--device={args.device} is not available here; pass --device=cpu (with --tiny) or run on a machine with a CUDA GPU.')
    names = [name for name, _ in CHECKS] if args.checks == 'all' else [] if args.checks == 'none' else args.checks.split(',')
    unknown = sorted(set(names) - {name for name, _ in CHECKS})
    if unknown:
        parser.error(f'--checks names unknown checks {unknown}; choose from {", ".join(name for name, _ in CHECKS)}.')

    ctx = argparse.Namespace(device=torch.device(args.device), tiny=args.tiny, budget=args.budget, steps=(2 if args.tiny else args.steps))
    torch.backends.cuda.matmul.allow_tf32 = False # Fixtures in float32 mean float32.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    if args.tiny:
        torch.set_num_threads(1)
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'), torch=torch.__version__, device=args.device,
        device_name=(torch.cuda.get_device_name(ctx.device) if ctx.device.type == 'cuda' else 'CPU'), tiny=args.tiny, checks=[], throughput=[])
    for name, check in CHECKS:
        entry = dict(name=name, doc=check.__doc__)
        start = time.time()
        if name not in names:
            entry.update(status='skipped', reason='not in --checks')
        else:
            try:
                entry.update(status='passed', detail=check(ctx))
            except Skip as skip:
                entry.update(status='skipped', reason=str(skip))
            except Exception as err: # pylint: disable=broad-except
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
    print(f'Wrote {path}.')
    print()
    print(table(result))
    return 1 if any(c['status'] == 'failed' for c in result['checks']) or any(r['status'] == 'failed' for r in result['throughput']) else 0

if __name__ == '__main__':
    sys.exit(main())

#----------------------------------------------------------------------------

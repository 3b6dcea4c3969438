"""The whole method on a laptop CPU in one command: build the digits dataset,
train a small EDM teacher, distil it into a 4-step consistency student, and
compare the student with the teacher's own samplers from the same seeds."""

import glob
import json
import os
import subprocess
import sys
import time

import click
import numpy as np
import PIL.Image
import torch

import dnnlib
from training import checkpoint
from training import metrics
from training import samplers

ROOT = os.path.dirname(os.path.abspath(__file__))

#----------------------------------------------------------------------------
# Steps of the pipeline.

def run_script(step, title, args):
    """Run one of the repository's scripts with this Python, its output streaming to the terminal."""
    print(f'\n=== [{step}] {title}', flush=True)
    print('$ python ' + ' '.join(args), flush=True)
    start = time.time()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT)
    if proc.returncode != 0:
        raise click.ClickException(f'Step "{title}" failed (exit code {proc.returncode}); its output is above.')
    print(f'=== [{step}] done in {dnnlib.util.format_time(time.time() - start)}', flush=True)

def last_snapshot(run_dir):
    """The network snapshot with the most images in a run directory."""
    found = sorted(glob.glob(os.path.join(run_dir, 'network-snapshot-[0-9]*.pkl')))
    if not found:
        raise click.ClickException(f'{run_dir} holds no network snapshot; see the training output above.')
    return found[-1]

def read_jsonl(path):
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]

def load_network(path, device):
    data = checkpoint.load_snapshot(path)
    return data['ema'].to(device).eval(), data

#----------------------------------------------------------------------------
# Evaluation of the three samplers from the same seeds.

def evaluate(teacher, student, student_grid, dataset_path, num, batch, euler_steps, heun_steps, device):
    """FD-pixels against the dataset and agreement with the teacher's Heun samples, per sampler."""
    detector = metrics.load_detector(metrics.PIXELS_NAME, device=device)
    ref = metrics.compute_dataset_stats(metrics.open_image_dataset(dataset_path), detector, batch_size=256, num_workers=0)
    ref_mu, ref_sigma = ref.mean_cov()
    runs = [
        ('teacher, Heun',           teacher, samplers.edm_sampler,      dict(num_steps=heun_steps),  2 * heun_steps - 1),
        ('teacher, Euler',         teacher, samplers.euler_sampler,    dict(num_steps=euler_steps), euler_steps),
        (f'student, {len(student_grid) - 1} steps', student, samplers.student_sampler, dict(sigmas=student_grid), len(student_grid) - 1),
    ]
    indices = list(range(num))
    images = dict()
    rows = []
    for name, net, sample_fn, kwargs, nfe in runs:
        start = time.time()
        out = torch.cat([samplers.generate_images(net, chunk, device, sample_fn, classes=chunk, **kwargs) for chunk in
            [indices[i : i + batch] for i in range(0, num, batch)]])
        images[name] = out
        stats = metrics.compute_feature_stats(samplers.to_uint8(out), detector, batch_size=256, all_reduce=False)
        mu, sigma = stats.mean_cov()
        rows.append(dict(sampler=name, nfe=nfe, fd_pixels=float(metrics.frechet_distance(mu, sigma, ref_mu, ref_sigma)),
            sec=time.time() - start))
        print(f'  {name}: {num} images, {nfe} NFE, {rows[-1]["sec"]:.1f}s, FD-pixels {rows[-1]["fd_pixels"]:.3f}', flush=True)
    reference = images[runs[0][0]]
    for row in rows:
        row.update(metrics.agreement(float((images[row['sampler']] - reference).square().mean())))
    return rows, images

def format_table(rows):
    lines = ['| sampler | NFE | FD-pixels (lower is better) | agreement RMSE | agreement PSNR (dB) |', '|---|---|---|---|---|']
    for row in rows:
        psnr = '(reference)' if not np.isfinite(row['agree_psnr']) else f'{row["agree_psnr"]:.2f}'
        rmse = '(reference)' if not np.isfinite(row['agree_psnr']) else f'{row["agree_rmse"]:.4f}'
        lines.append(f'| {row["sampler"]} | {row["nfe"]} | {row["fd_pixels"]:.3f} | {rmse} | {psnr} |')
    return '\n'.join(lines)

#----------------------------------------------------------------------------
# Pictures.

def labelled_grids(grids, path, scale=3):
    """Grids side by side, upscaled, each with its title above; written as one PNG."""
    from PIL import ImageDraw # pylint: disable=import-outside-toplevel
    tiles = [PIL.Image.open(p).convert('RGB') for _title, p in grids]
    tiles = [t.resize((t.width * scale, t.height * scale), PIL.Image.NEAREST) for t in tiles]
    pad, head = 12, 22
    width = sum(t.width for t in tiles) + pad * (len(tiles) + 1)
    height = max(t.height for t in tiles) + head + 2 * pad
    canvas = PIL.Image.new('RGB', (width, height), 'white')
    draw = ImageDraw.Draw(canvas)
    x = pad
    for (title, _p), tile in zip(grids, tiles):
        draw.text((x, pad), title, fill='black')
        canvas.paste(tile, (x, pad + head))
        x += tile.width + pad
    dnnlib.util.write_atomic(path, lambda f: canvas.save(f, format='PNG'))

def plot_curves(teacher_dir, student_dir, path):
    """Training loss and validation figures over kimg for both runs, as one PNG."""
    import matplotlib # pylint: disable=import-outside-toplevel
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt # pylint: disable=import-outside-toplevel
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, run_dir in [('teacher (EDM)', teacher_dir), ('student (distillation)', student_dir)]:
        stats = [s for s in read_jsonl(os.path.join(run_dir, 'stats.jsonl')) if 'Loss/loss' in s]
        axes[0].plot([s['Progress/kimg']['mean'] for s in stats], [s['Loss/loss']['mean'] for s in stats], marker='.', label=label)
        val = read_jsonl(os.path.join(run_dir, 'metrics-val.jsonl'))
        axes[1].plot([v['kimg'] for v in val], [v['figures'].get('fd_pixels', np.nan) for v in val], marker='o', label=label)
        if any('agree_rmse' in v['figures'] for v in val):
            axes[2].plot([v['kimg'] for v in val], [v['figures'].get('agree_rmse', np.nan) for v in val], marker='o', label=label)
        teacher_fd = [v['figures']['teacher_fd_pixels'] for v in val if 'teacher_fd_pixels' in v['figures']]
        if teacher_fd:
            axes[1].axhline(teacher_fd[0], color='gray', linestyle='--', label='teacher, Heun')
    axes[0].set(title='Training loss (per element)', xlabel='kimg', yscale='log')
    axes[1].set(title='Validation FD-pixels (lower is better)', xlabel='kimg', yscale='log')
    axes[2].set(title='Student-teacher agreement RMSE', xlabel='kimg')
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    dnnlib.util.write_atomic(path, lambda f: fig.savefig(f, format='png', dpi=100))
    plt.close(fig)

#----------------------------------------------------------------------------

@click.command()
@click.option('--outdir',           help='Parent folder of the demo\'s output folder', metavar='DIR',        type=str, default='demo-runs', show_default=True)
@click.option('--teacher_kimg',     help='Training images of the teacher, in thousands', metavar='KIMG',     type=click.IntRange(min=1), default=30, show_default=True)
@click.option('--student_kimg',     help='Training images of the student, in thousands', metavar='KIMG',     type=click.IntRange(min=1), default=10, show_default=True)
@click.option('--cbase',            help='Base channel count of both networks', metavar='INT',               type=click.IntRange(min=8), default=16, show_default=True)
@click.option('--S', 'S',           help='Student steps', metavar='INT',                                    type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--eval_num',         help='Images per sampler in the final comparison', metavar='INT',       type=click.IntRange(min=300), default=1000, show_default=True)
@click.option('--seed',             help='Seed of both training runs', metavar='INT',                        type=int, default=0, show_default=True)
def main(outdir, teacher_kimg, student_kimg, cbase, S, eval_num, seed):
    """Run the embedded default end to end on the CPU: the digits dataset (16x16),
    an EDM teacher, a 4-step consistency student, grids, a table and a plot.

    \b
    Everything lands in one new folder under --outdir. The demo exits with a
    non-zero status when the student does not beat the teacher's own Euler
    sampler at the same number of network evaluations on both FD-pixels and
    agreement with the teacher's Heun samples (the quality gate).
    """
    start_time = time.time()
    torch.manual_seed(seed)
    out = dnnlib.util.claim_run_dir(outdir, 'demo')
    print(f'Demo output folder: {out}', flush=True)
    data = os.path.join(out, 'digits-16x16.zip')
    teacher_dir = os.path.join(out, 'teacher')
    student_dir = os.path.join(out, 'student')
    arch = ['--arch=ddpmpp', f'--cbase={cbase}', '--cres=1,2', '--augment=0', '--dropout=0', '--batch=64', '--workers=0',
        '--device=cpu', f'--seed={seed}', '--tick=2', '--snap=1000', '--dump=1000']
    val = ['--val=1', '--val_detector=pixels', '--val_batch=250']

    run_script(1, 'Building the digits dataset', ['dataset_tool.py', '--source=digits', f'--dest={data}', '--resolution=16x16'])
    run_script(2, f'Training the EDM teacher ({teacher_kimg} kimg)', ['train.py', f'--outdir={teacher_dir}', '--nosubdir', f'--data={data}',
        *arch, f'--duration={teacher_kimg / 1000}', '--lr=2e-3', '--lr_rampup=2', '--ema=0.002', *val, '--val_num=300', f'--val_every={max(teacher_kimg // 6, 1)}'])
    teacher_pkl = last_snapshot(teacher_dir)
    run_script(3, f'Distilling a {S}-step student ({student_kimg} kimg)', ['train.py', f'--outdir={student_dir}', '--nosubdir', f'--data={data}',
        *arch, f'--duration={student_kimg / 1000}', '--lr=2e-4', '--lr_rampup=0', '--ema=0.001', '--consistency=True', f'--teacher={teacher_pkl}',
        f'--S={S}', '--student_sigmas=karras_open', '--T_start=16', '--T_end=64', f'--T_anneal_kimg={student_kimg // 2}',
        *val, '--val_num=500', '--val_agree_num=250', '--val_at_start=True', '--val_every=1'])
    student_pkl = last_snapshot(student_dir)

    # Grids from the same seeds.
    grids = [('teacher, Heun, 35 NFE', 'grid-teacher-heun.png', ['--sampler=heun', '--steps=18']),
        (f'teacher, Euler, {S} NFE', f'grid-teacher-euler{S}.png', ['--sampler=euler', f'--steps={S}']),
        (f'student, {S} NFE', f'grid-student{S}.png', [])]
    for idx, (title, name, args) in enumerate(grids):
        network = student_pkl if title.startswith('student') else teacher_pkl
        run_script(f'4{"abc"[idx]}', f'Grid: {title}', ['generate.py', f'--network={network}', '--seeds=0-63', f'--grid={os.path.join(out, name)}',
            '--device=cpu', *args])
    labelled_grids([(title, os.path.join(out, name)) for title, name, _args in grids], os.path.join(out, 'grids.png'))

    # The comparison.
    print(f'\n=== [5] Comparing the three samplers on {eval_num} seeds', flush=True)
    device = torch.device('cpu')
    teacher, _ = load_network(teacher_pkl, device)
    student, student_data = load_network(student_pkl, device)
    student_grid = torch.tensor(student_data['consistency']['student_sigmas'], dtype=torch.float64)
    rows, _images = evaluate(teacher, student, student_grid, data, num=eval_num, batch=250, euler_steps=S, heun_steps=18, device=device)
    table = format_table(rows)
    plot_curves(teacher_dir, student_dir, os.path.join(out, 'curves.png'))

    # Summary and quality gate.
    heun, euler, student_row = rows
    passed = student_row['fd_pixels'] < euler['fd_pixels'] and student_row['agree_rmse'] < euler['agree_rmse']
    total = time.time() - start_time
    summary = dict(rows=rows, passed=passed, seconds=total, teacher=teacher_pkl, student=student_pkl, eval_num=eval_num)
    dnnlib.util.write_atomic(os.path.join(out, 'summary.json'), lambda f: f.write(json.dumps(summary, indent=2).encode('utf-8')))
    dnnlib.util.write_atomic(os.path.join(out, 'summary.md'), lambda f: f.write((table + '\n').encode('utf-8')))
    print()
    print(f'Results ({eval_num} images per sampler, FD-pixels against the {os.path.basename(data)} dataset, agreement against the teacher\'s Heun samples from the same noise):')
    print()
    print(table)
    print()
    print(f'Output folder:  {out}')
    print('  grids.png     the three samplers from seeds 0-63 (and grid-*.png at full size)')
    print('  curves.png    training loss and validation figures over kimg')
    print('  summary.md    the table above; summary.json with the figures')
    print('  teacher/, student/   the two training runs (snapshots, stats.jsonl, metrics-val.jsonl, log.txt)')
    print(f'Total time:     {dnnlib.util.format_time(total)}')
    print()
    verdict = 'PASSED' if passed else 'FAILED'
    print(f'Quality gate {verdict}: the {S}-step student has FD-pixels {student_row["fd_pixels"]:.3f} vs {euler["fd_pixels"]:.3f} and agreement RMSE '
        f'{student_row["agree_rmse"]:.4f} vs {euler["agree_rmse"]:.4f} for the teacher\'s {S}-step Euler sampler.')
    if not passed:
        sys.exit(1)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------

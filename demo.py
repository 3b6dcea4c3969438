"""The whole method on a laptop CPU in one command: build the digits dataset, train a small EDM teacher, distil
it into a 4-step consistency student, and compare the student with the teacher's own samplers from the same seeds."""

import glob
import json
import os
import shutil
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
from training import validation

ROOT = os.path.dirname(os.path.abspath(__file__))
CPU = torch.device('cpu')
RANGE = click.IntRange
BATCH = 250     # Images per sampler call, of the comparison and of validation (--val_batch).
VAL_NUM = 500   # Images of the student's validation; its first one also takes the teacher's of these seeds.

#----------------------------------------------------------------------------
# Steps of the pipeline.

def say(text):
    print(text, flush=True)

def start_script(step, title, args, log=say):
    """Start one of the repository's scripts with this Python; its output streams to the terminal, or goes to
    `log` when it ends (a script run alongside another). end_script waits for it."""
    log(f'\n=== [{step}] {title}\n$ python ' + ' '.join(args))
    pipe = dict() if log is say else dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, **pipe)
    return dnnlib.EasyDict(step=step, title=title, log=log, proc=proc, start=time.time())

def end_script(job):
    output = job.proc.communicate()[0]
    if output:
        job.log(output.rstrip('\n'))
    if job.proc.returncode != 0:
        raise click.ClickException(f'Step "{job.title}" failed (exit code {job.proc.returncode}); its output is above.')
    job.log(f'=== [{job.step}] done in {dnnlib.util.format_time(time.time() - job.start)}')

def run_script(step, title, args, log=say):
    end_script(start_script(step, title, args, log))

def alongside(job, work, log=()):
    """work() on half the threads while the script `job` runs, then wait for it; the lines `log` then."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(max(threads // 2, 1))
        result = work()
        torch.set_num_threads(threads)
        end_script(job)
        return result
    finally:
        if job.proc.poll() is None:
            job.proc.terminate()
            job.proc.wait()
        if log:
            say('\n'.join(log))

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

def load_network(path):
    data = checkpoint.load_snapshot(path)
    return data['ema'].to(CPU).eval(), data

#----------------------------------------------------------------------------
# The comparison of the three samplers from the same seeds.

def sample(net, first, last, sample_fn, **kwargs):
    """Images of seeds first .. last - 1 (class = seed), float64 in [-1, 1], in validation's blocks of BATCH
    seeds (`first` a multiple of BATCH); and the seconds it took."""
    start = time.time()
    blocks = [list(range(i, min(i + BATCH, last))) for i in range(first, last, BATCH)]
    images = [samplers.generate_images(net, seeds, CPU, sample_fn, classes=seeds, **kwargs) for seeds in blocks]
    return torch.cat(images or [torch.zeros([0], dtype=torch.float64)]), time.time() - start

def compare(runs, ref, detector):
    """FD-pixels against `ref` (mu, sigma) and agreement with the first run's images, per run (name, NFE,
    images, seconds)."""
    rows = []
    for name, nfe, images, sec in runs:
        stats = metrics.compute_feature_stats(samplers.to_uint8(images), detector, batch_size=256, all_reduce=False)
        rows.append(dict(sampler=name, nfe=nfe, fd_pixels=float(metrics.frechet_distance(*stats.mean_cov(), *ref)),
            sec=sec, **metrics.agreement(float((images - runs[0][2]).square().mean()))))
        say(f'  {name}: {len(images)} images, {nfe} NFE, {sec:.1f}s, FD-pixels {rows[-1]["fd_pixels"]:.3f}')
    return rows

def format_table(rows):
    lines = ['| sampler | NFE | FD-pixels (lower is better) | agreement RMSE | agreement PSNR (dB) |', '|---' * 5 + '|']
    for row in rows:
        ref = not np.isfinite(row['agree_psnr'])
        rmse, psnr = ['(reference)'] * 2 if ref else [f'{row["agree_rmse"]:.4f}', f'{row["agree_psnr"]:.2f}']
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
    canvas = PIL.Image.new('RGB', (width, max(t.height for t in tiles) + head + 2 * pad), 'white')
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
        axes[0].plot([s['Progress/kimg']['mean'] for s in stats], [s['Loss/loss']['mean'] for s in stats],
            marker='.', label=label)
        val = [(v['kimg'], v['figures']) for v in read_jsonl(os.path.join(run_dir, 'metrics-val.jsonl'))]
        axes[1].plot(*zip(*[(k, f.get('fd_pixels', np.nan)) for k, f in val]), marker='o', label=label)
        if any('agree_rmse' in f for _k, f in val):
            axes[2].plot(*zip(*[(k, f.get('agree_rmse', np.nan)) for k, f in val]), marker='o', label=label)
        teacher_fd = [f['teacher_fd_pixels'] for _k, f in val if 'teacher_fd_pixels' in f]
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

@click.command(context_settings=dict(show_default=True))
@click.option('--outdir',       help='Parent folder of the demo\'s output folder', metavar='DIR', default='demo-runs')
@click.option('--teacher_kimg', help='Training images of the teacher, in thousands', metavar='KIMG',
    type=RANGE(1), default=30)
@click.option('--student_kimg', help='Training images of the student, in thousands', metavar='KIMG',
    type=RANGE(1), default=10)
@click.option('--cbase',        help='Base channel count of both networks', metavar='INT', type=RANGE(8), default=16)
@click.option('--S', 'S',       help='Student steps', metavar='INT', type=RANGE(1), default=4)
@click.option('--eval_num',     help='Images per sampler in the final comparison', metavar='INT', type=RANGE(300),
    default=1000)
@click.option('--seed',         help='Seed of both training runs', metavar='INT', type=int, default=0)
@click.option('--ct',           help='Tune the student by consistency training: no teacher hop', metavar='BOOL',
    type=bool, default=False)
def main(outdir, teacher_kimg, student_kimg, cbase, S, eval_num, seed, ct):
    """Run the embedded default end to end on the CPU: the digits dataset (16x16), an EDM teacher, a 4-step
    consistency student, grids, a table and a plot, all in one new folder under --outdir.

    Exits non-zero when the student does not beat the teacher's Euler sampler of as many network evaluations on
    both FD-pixels and agreement with the teacher's Heun samples (the quality gate).
    """
    start_time = time.time()
    torch.manual_seed(seed)
    with dnnlib.util.user_errors():
        dnnlib.util.check_writable(outdir, '--outdir', folder=True)
    out = dnnlib.util.claim_run_dir(outdir, 'demo')
    say(f'Demo output folder: {out}')
    data, teacher_dir, student_dir = [os.path.join(out, name) for name in ['digits-16x16.zip', 'teacher', 'student']]
    arch = ['--arch=ddpmpp', f'--cbase={cbase}', '--cres=1,2', '--augment=0', '--dropout=0', '--batch=64',
        '--workers=0', '--device=cpu', f'--seed={seed}', '--tick=2', '--snap=1000', '--dump=1000']
    val = ['--val=1', '--val_detector=pixels', f'--val_batch={BATCH}']
    run_script(1, 'Building the digits dataset', ['dataset_tool.py', '--source=digits', f'--dest={data}',
        '--resolution=16x16'])
    teach = start_script(2, f'Training the EDM teacher ({teacher_kimg} kimg)', ['train.py', f'--outdir={teacher_dir}',
        '--nosubdir', f'--data={data}', *arch, f'--duration={teacher_kimg / 1000}', '--lr=2e-3', '--lr_rampup=2',
        '--ema=0.002', *val, '--val_num=300', f'--val_every={teacher_kimg}'])

    # Each seed's Heun image of the teacher once: those of the student's validation first (the first block alongside
    # the teacher's last validation, which follows its last snapshot), kept with the dataset's statistics in the
    # student's run directory for its first validation; the others alongside the distillation.
    teacher_pkl = os.path.join(teacher_dir, f'network-snapshot-{teacher_kimg:06d}.pkl')
    while teach.proc.poll() is None and not os.path.isfile(teacher_pkl):
        time.sleep(1)
    if not os.path.isfile(teacher_pkl):
        end_script(teach)
        raise click.ClickException(f'{teacher_pkl} is missing; see the training output above.')
    teacher, _ = load_network(teacher_pkl)
    num_a = min(eval_num, -(-VAL_NUM // BATCH) * BATCH)
    heun, heun_sec = alongside(teach, lambda: sample(teacher, 0, min(BATCH, num_a), samplers.edm_sampler, num_steps=18))
    say(f'\n=== [3] The teacher\'s Heun images of seeds 0-{num_a - 1}, which the student\'s validation reads')
    more, more_sec = sample(teacher, BATCH, num_a, samplers.edm_sampler, num_steps=18)
    heun, heun_sec = torch.cat([heun, more]), heun_sec + more_sec
    os.makedirs(student_dir)
    validation.save_heun_images(student_dir, teacher, heun, BATCH, CPU)
    for path in glob.glob(os.path.join(teacher_dir, 'val-ref-*.npz')):
        shutil.copy(path, student_dir)
    say(f'=== [3] done in {dnnlib.util.format_time(heun_sec)}')
    how = ['Tuning', '--ct=True'] if ct else ['Distilling', '--T_start=16'] # Tuning: T from S edges (the default).
    distil = start_script(4, f'{how[0]} a {S}-step student ({student_kimg} kimg)', ['train.py',
        f'--outdir={student_dir}', '--nosubdir', f'--data={data}', *arch, f'--duration={student_kimg / 1000}',
        '--lr=2e-4', '--lr_rampup=0', '--ema=0.001', '--consistency=True', f'--teacher={teacher_pkl}', f'--S={S}',
        '--student_sigmas=karras_open', how[1], '--T_end=64', f'--T_anneal_kimg={student_kimg // 2}',
        *val, f'--val_num={VAL_NUM}', '--val_agree_num=250', '--val_at_start=True', '--val_every=2'])
    grids = [('teacher, Heun, 35 NFE', 'grid-teacher-heun.png', ['--sampler=heun', '--steps=18']),
        (f'teacher, Euler, {S} NFE', f'grid-teacher-euler{S}.png', ['--sampler=euler', f'--steps={S}']),
        (f'student, {S} NFE', f'grid-student{S}.png', [])]
    grid = lambda step, net, title, name, args, log=say: start_script(step, f'Grid: {title}', ['generate.py',
        f'--network={net}', '--seeds=0-63', f'--grid={os.path.join(out, name)}', '--device=cpu', *args], log)
    log = []
    def teacher_work():
        start = time.time()
        more, more_sec = sample(teacher, num_a, eval_num, samplers.edm_sampler, num_steps=18)
        euler = sample(teacher, 0, eval_num, samplers.euler_sampler, num_steps=S)
        detector = metrics.load_detector(metrics.PIXELS_NAME, device=CPU)
        ref = metrics.compute_dataset_stats(metrics.open_image_dataset(data), detector, batch_size=256, num_workers=0)
        log.append(f'\n=== [5] Alongside: the teacher\'s Heun images of seeds {num_a}-{eval_num - 1}, its Euler '
            f'images and the dataset\'s statistics, done in {dnnlib.util.format_time(time.time() - start)}')
        for step, args in zip(['5a', '5b'], grids):
            end_script(grid(step, teacher_pkl, *args, log=log.append))
        return (torch.cat([heun, more]), heun_sec + more_sec), euler, detector, ref.mean_cov()
    (heun, heun_sec), (euler, euler_sec), detector, ref = alongside(distil, teacher_work, log)
    student_pkl = last_snapshot(student_dir)
    student, student_data = load_network(student_pkl)
    sigmas = checkpoint.student_levels(student_data, student_pkl)
    student_images, student_sec = alongside(grid('5c', student_pkl, *grids[2]),
        lambda: sample(student, 0, eval_num, samplers.student_sampler, sigmas=sigmas))
    labelled_grids([(title, os.path.join(out, name)) for title, name, _args in grids], os.path.join(out, 'grids.png'))

    # The comparison, summary and quality gate.
    say(f'\n=== [6] Comparing the three samplers on {eval_num} seeds')
    rows = compare([('teacher, Heun', 35, heun, heun_sec), ('teacher, Euler', S, euler, euler_sec),
        (f'student, {S} steps', S, student_images, student_sec)], ref, detector)
    table = format_table(rows)
    plot_curves(teacher_dir, student_dir, os.path.join(out, 'curves.png'))
    euler, student_row = rows[1:]
    passed = student_row['fd_pixels'] < euler['fd_pixels'] and student_row['agree_rmse'] < euler['agree_rmse']
    total = time.time() - start_time
    summary = dict(rows=rows, passed=passed, seconds=total, teacher=teacher_pkl, student=student_pkl, eval_num=eval_num)
    for name, text in [('summary.json', json.dumps(summary, indent=2)), ('summary.md', table + '\n')]:
        dnnlib.util.write_atomic(os.path.join(out, name), lambda f, text=text: f.write(text.encode()))
    say(f'\nResults ({eval_num} images per sampler, FD-pixels against the {os.path.basename(data)} dataset, '
        f'agreement against the teacher\'s Heun samples from the same noise):\n\n{table}\n\nOutput folder:  {out}\n'
        '  grids.png (seeds 0-63; grid-*.png at full size), curves.png (training and validation over kimg), '
        'summary.md (the table), summary.json; teacher/, student/ (the two training runs)\n'
        f'Total time:     {dnnlib.util.format_time(total)}\n')
    say(f'Quality gate {"PASSED" if passed else "FAILED"}: the {S}-step student has FD-pixels '
        f'{student_row["fd_pixels"]:.3f} vs {euler["fd_pixels"]:.3f} and agreement RMSE '
        f'{student_row["agree_rmse"]:.4f} vs {euler["agree_rmse"]:.4f} for the teacher\'s {S}-step Euler sampler.')
    if not passed:
        sys.exit(1)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main() # pylint: disable=no-value-for-parameter

#----------------------------------------------------------------------------

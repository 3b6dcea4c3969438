"""generate.py end to end on the CPU: per-seed determinism across batch sizes and
torchrun ranks, sampler selection, the exact student, grids, and user errors."""

import os
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
from training import samplers
from _gaussian import GaussianNet, flow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_MEANS = [-0.6 + 0.13 * c for c in range(10)]

#----------------------------------------------------------------------------
# Helpers.

def write_snapshot(path, net, **extra):
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}, **extra), f)
    return str(path)

def gaussian_snapshot(path, **kwargs):
    net_kwargs = dict(img_resolution=8, img_channels=3, label_dim=10, class_means=CLASS_MEANS, s=0.3)
    net_kwargs.update(kwargs)
    return write_snapshot(path, GaussianNet(**net_kwargs))

def student_snapshot(path, sigmas, label_dim=10):
    net = GaussianNet(img_resolution=4, img_channels=1, label_dim=label_dim, class_means=CLASS_MEANS if label_dim else None,
        s=0.3, mode='student', student_sigmas=list(sigmas))
    return write_snapshot(path, net, consistency=dict(S=len(sigmas) - 1, student_sigmas=list(sigmas)))

def run(*args):
    """generate.py in this process; returns click's result."""
    return CliRunner().invoke(generate.main, [str(a) for a in args])

def ok(*args):
    result = run(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result

def pngs(folder):
    """{file name: bytes} of every PNG under `folder`."""
    out = dict()
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            if name.endswith('.png'):
                with open(os.path.join(dirpath, name), 'rb') as f:
                    out[os.path.relpath(os.path.join(dirpath, name), folder)] = f.read()
    return out

def load(path):
    return np.asarray(PIL.Image.open(path))

def quantize(images):
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).numpy()

#----------------------------------------------------------------------------
# Must-show 2: each image depends only on its seed.

def test_seeds_give_identical_pngs_across_batch_sizes_and_ranks(tmp_path):
    # Stochastic Heun (churn noise at every step) and random class labels: all three draws are per seed.
    pkl = gaussian_snapshot(tmp_path / 'net.pkl')
    opts = ['--network', pkl, '--seeds', '0-11', '--steps', 6, '--S_churn', 5]
    ok(*opts, '--outdir', tmp_path / 'b12', '--batch', 12, '--grid', tmp_path / 'b12.png')
    ok(*opts, '--outdir', tmp_path / 'b5', '--batch', 5)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'generate.py',
        *map(str, opts), '--outdir', str(tmp_path / 'r2'), '--batch', '12', '--device', 'cpu', '--grid', str(tmp_path / 'r2.png')]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert 'on 2 process(es)' in proc.stdout

    b12, b5, r2 = pngs(tmp_path / 'b12'), pngs(tmp_path / 'b5'), pngs(tmp_path / 'r2')
    assert sorted(b12) == [f'{seed:06d}.png' for seed in range(12)]
    assert b5 == b12 and r2 == b12
    assert (tmp_path / 'r2.png').read_bytes() == (tmp_path / 'b12.png').read_bytes()
    assert len(set(b12.values())) == 12 # Different seeds, different images.

    # The images are the closed-form samples' neighbourhood: each image's mean is near its class mean.
    means = sorted(load(tmp_path / 'b12' / name).mean() / 127.5 - 1 for name in b12)
    assert means[0] < -0.2 and means[-1] > 0.2

#----------------------------------------------------------------------------
# Sampler selection, the exact student, naming, grids.

def expected_student_image(seed, sigma_max=80.0, class_idx=None):
    """The exact ODE endpoint of `seed` as EDM draws it: latents, then the class label."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn([1, 4, 4], generator=gen)
    label = torch.randint(10, size=[], generator=gen).item()
    mu = CLASS_MEANS[label if class_idx is None else class_idx]
    x0 = flow(z.to(torch.float64) * sigma_max, mu, 0.3, sigma_max, 0)
    return quantize(x0)[0]

def test_auto_picks_the_student_grid_and_lands_on_the_exact_endpoint(tmp_path):
    sigmas = samplers.student_sigmas(3, layout='karras_open').tolist()
    pkl = student_snapshot(tmp_path / 'student.pkl', sigmas)
    result = ok('--network', pkl, '--seeds', '5,998-1001', '--outdir', tmp_path / 'auto', '--subdirs', '--batch', 3)
    assert 'student sampler, S=3' in result.output
    files = pngs(tmp_path / 'auto')
    assert sorted(files) == ['000000/000005.png', '000000/000998.png', '000000/000999.png', '001000/001000.png', '001000/001001.png']
    for name in files:
        image = load(tmp_path / 'auto' / name)
        assert image.dtype == np.uint8 and image.shape == (4, 4) # Grayscale PNG.
        np.testing.assert_array_equal(image, expected_student_image(int(name[-10:-4])))
    ok('--network', pkl, '--seeds', '5,998-1001', '--outdir', tmp_path / 'student', '--subdirs', '--sampler', 'student')
    assert pngs(tmp_path / 'student') == files

    ok('--network', pkl, '--seeds', '0-3', '--outdir', tmp_path / 'class', '--class', 7)
    for seed in range(4):
        np.testing.assert_array_equal(load(tmp_path / 'class' / f'{seed:06d}.png'), expected_student_image(seed, class_idx=7))

    # The stochastic variant re-noises with per-seed noise: different images, still per seed.
    opts = ['--network', pkl, '--seeds', '0-5', '--stochastic']
    ok(*opts, '--outdir', tmp_path / 'sto6', '--batch', 6)
    ok(*opts, '--outdir', tmp_path / 'sto4', '--batch', 4)
    assert pngs(tmp_path / 'sto6') == pngs(tmp_path / 'sto4')
    ok('--network', pkl, '--seeds', '0-5', '--outdir', tmp_path / 'det')
    assert pngs(tmp_path / 'sto6') != pngs(tmp_path / 'det')

def test_auto_picks_heun_for_a_diffusion_network(tmp_path):
    pkl = gaussian_snapshot(tmp_path / 'net.pkl', img_channels=1, img_resolution=4)
    result = ok('--network', pkl, '--seeds', '0-7', '--outdir', tmp_path / 'auto', '--steps', 64)
    assert 'heun sampler, 64 steps, 127 network evaluations' in result.output
    ok('--network', pkl, '--seeds', '0-7', '--outdir', tmp_path / 'heun', '--steps', 64, '--sampler', 'heun')
    ok('--network', pkl, '--seeds', '0-7', '--outdir', tmp_path / 'euler', '--steps', 64, '--sampler', 'euler')
    result = ok('--network', pkl, '--seeds', '0-7', '--outdir', tmp_path / 'addim', '--steps', 4, '--sampler', 'addim')
    assert 'addim sampler, 4 steps, 4 network evaluations' in result.output
    assert pngs(tmp_path / 'auto') == pngs(tmp_path / 'heun') != pngs(tmp_path / 'euler') != pngs(tmp_path / 'addim')
    # 64 Heun steps are within a level of the exact endpoint (apart from rounding ties).
    for seed in range(8):
        diff = load(tmp_path / 'heun' / f'{seed:06d}.png').astype(int) - expected_student_image(seed)
        assert np.abs(diff).max() <= 1

def test_snapshot_written_by_train_py(tmp_path):
    # A two-step training run of a tiny conditional DDPM++ on 64 digits at 8x8, then generation from its snapshot.
    def script(*args):
        proc = subprocess.run([sys.executable, *map(str, args)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return proc
    script(os.path.join(ROOT, 'dataset_tool.py'), '--source=digits', '--dest=digits.zip', '--resolution=8x8', '--max-images=64')
    script(os.path.join(ROOT, 'train.py'), '--outdir=run', '--nosubdir', '--data=digits.zip', '--cond=1', '--arch=ddpmpp',
        '--cbase=16', '--cres=1', '--duration=0.001', '--batch=500', '--tick=1', '--snap=1', '--augment=0', '--seed=0',
        '--workers=0', '--device=cpu')
    pkl = tmp_path / 'run' / 'network-snapshot-000001.pkl'
    proc = script(os.path.join(ROOT, 'generate.py'), f'--network={pkl}', '--outdir=out', '--seeds=0-9', '--batch=10',
        '--steps=4', '--grid=grids/grid.png', '--device=cpu')
    assert 'heun sampler, 4 steps, 7 network evaluations' in proc.stdout
    ok('--network', pkl, '--seeds', '0-9', '--steps', 4, '--outdir', tmp_path / 'b3', '--batch', 3)
    ok('--network', pkl, '--seeds', '0-1', '--steps', 2, '--outdir', tmp_path / 'euler', '--sampler', 'euler', '--class', 4)

    grid = load(tmp_path / 'grids' / 'grid.png')
    assert grid.shape == (3 * 8, 4 * 8) # 10 images: 4 columns, 3 rows, the last two cells black.
    assert (grid[16:, 16:] == 0).all()
    assert sorted(os.listdir(tmp_path / 'out')) == [f'{seed:06d}.png' for seed in range(10)] # No temporary files left.
    for seed in range(10):
        image = load(tmp_path / 'out' / f'{seed:06d}.png')
        assert image.shape == (8, 8) and image.dtype == np.uint8
        r, c = divmod(seed, 4)
        np.testing.assert_array_equal(grid[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8], image)
        # The latents are per seed; the U-Net's float32 kernels may round differently per batch size.
        assert np.abs(image.astype(int) - load(tmp_path / 'b3' / f'{seed:06d}.png')).max() <= 1
    assert sorted(os.listdir(tmp_path / 'euler')) == ['000000.png', '000001.png']

#----------------------------------------------------------------------------
# Must-show 4: user errors stop with one clear sentence.

def fails(expected, *args, exit_code=1):
    result = run(*args)
    assert result.exit_code == exit_code, result.output + repr(result.exception)
    assert isinstance(result.exception, SystemExit) and 'Traceback' not in result.output
    error = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(error) == 1 and expected in error[0], result.output
    return error[0]

def test_unreadable_network(tmp_path):
    fails('is neither an existing file', '--network', tmp_path / 'missing.pkl', '--outdir', tmp_path / 'out')
    (tmp_path / 'junk.pkl').write_bytes(b'this is not a pickle')
    fails('cannot be loaded as a network snapshot', '--network', tmp_path / 'junk.pkl', '--outdir', tmp_path / 'out')
    with open(tmp_path / 'dict.pkl', 'wb') as f:
        pickle.dump(dict(net=1), f)
    fails('is not a network snapshot', '--network', tmp_path / 'dict.pkl', '--outdir', tmp_path / 'out')
    assert not (tmp_path / 'out').exists()

def test_bad_class(tmp_path):
    uncond = gaussian_snapshot(tmp_path / 'uncond.pkl', label_dim=0)
    cond = gaussian_snapshot(tmp_path / 'cond.pkl')
    fails('--class=3 was given, but the network is unconditional', '--network', uncond, '--outdir', tmp_path / 'out', '--class', 3)
    fails('--class=10 is out of range for a network with 10 classes; use 0 to 9', '--network', cond, '--outdir', tmp_path / 'out', '--class', 10)
    fails("Invalid value for '--class'", '--network', cond, '--outdir', tmp_path / 'out', '--class', -1, exit_code=2)
    assert not (tmp_path / 'out').exists()

@pytest.mark.parametrize('seeds, expected', [
    ('a-5', '"a-5" is neither a non-negative integer nor a range'),
    ('1,,2', '"" in "1,,2" is neither a non-negative integer nor a range'),
    ('-1', '"-1" is neither a non-negative integer nor a range'),
    ('0-3,1-2-3', '"1-2-3" in "0-3,1-2-3" is neither a non-negative integer nor a range'),
    ('9-3', '"9-3" is an empty range; write it as 3-9'),
    ('0-4,3', 'lists seed 3 more than once'),
])
def test_malformed_seeds(tmp_path, seeds, expected):
    pkl = gaussian_snapshot(tmp_path / 'net.pkl')
    fails(expected, '--network', pkl, '--outdir', tmp_path / 'out', '--seeds', seeds, exit_code=2)

def test_sampler_option_errors(tmp_path):
    teacher = gaussian_snapshot(tmp_path / 'teacher.pkl')
    student = student_snapshot(tmp_path / 'student.pkl', [80.0, 1.0, 0.0])
    out = ['--outdir', tmp_path / 'out']
    fails('--sampler=student needs a consistency student, but', '--network', teacher, *out, '--sampler', 'student')
    fails('--steps, --S_churn apply only to --sampler=heun, euler or addim; the student takes its 2 steps', '--network', student, *out, '--steps', 4, '--S_churn', 1)
    fails('--stochastic applies only to --sampler=student', '--network', teacher, *out, '--stochastic')
    fails('choose --sigma_min below --sigma_max', '--network', teacher, *out, '--sigma_min', 5, '--sigma_max', 2)
    fails('Nothing would be saved', '--network', teacher)
    with open(tmp_path / 'bad.pkl', 'wb') as f:
        pickle.dump(dict(ema=GaussianNet(), consistency=dict(S=3, student_sigmas=[80.0, 1.0, 0.0])), f)
    fails('The consistency entry of', '--network', tmp_path / 'bad.pkl', *out)
    if not torch.cuda.is_available():
        fails('CUDA was requested but no CUDA device is available', '--network', teacher, *out, '--device', 'cuda')
    assert not (tmp_path / 'out').exists()

def test_unwritable_outputs_are_refused_before_sampling(tmp_path):
    pkl = gaussian_snapshot(tmp_path / 'net.pkl')
    (tmp_path / 'file').write_text('kept')
    fails(f'--outdir={tmp_path / "file" / "out"} cannot be created: "{tmp_path / "file"}" is a file, not a folder', '--network', pkl, '--outdir', tmp_path / 'file' / 'out')
    fails(f'--grid={tmp_path / "file" / "g.png"} cannot be created', '--network', pkl, '--grid', tmp_path / 'file' / 'g.png')
    assert (tmp_path / 'file').read_text() == 'kept' and sorted(os.listdir(tmp_path)) == ['file', 'net.pkl']

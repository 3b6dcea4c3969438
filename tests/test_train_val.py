"""train.py --val=1: built-in validation of a distillation run and of EDM
training on the CPU with the pixel detector, one and two gloo ranks, and the
options' checks before any work."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from _train_helpers import ROOT, SMALL_RUN, TINY_ARCH, finish, read_stats, run_dirs, start_train, subprocess_env

ARCH = TINY_ARCH # The shared teacher's (conftest.py).
SMALL = [*SMALL_RUN, '--lr_rampup=1', '--batch=32']
CD = ['--consistency=True', '--S=4', '--T_start=8', '--T_end=16', '--T_anneal_kimg=2']
VAL = ['--val=1', '--val_detector=pixels', '--val_num=64', '--val_agree_num=16', '--val_batch=32', '--val_every=1', '--val_at_start=True']

#----------------------------------------------------------------------------

def read_history(run_dir):
    with open(os.path.join(run_dir, 'metrics-val.jsonl')) as f:
        return [json.loads(line) for line in f]

#----------------------------------------------------------------------------

def test_distillation_validates_at_the_stated_ticks(tmp_path, digits8, teacher):
    outdir = str(tmp_path / 'runs')
    res = finish(start_train(f'--outdir={outdir}', f'--data={digits8}', f'--teacher={teacher}', *ARCH, *SMALL, *CD, *VAL, '--duration=0.002'))
    assert res[0] == 0, res[2][-3000:]
    run_dir, = run_dirs(outdir)
    history = read_history(run_dir)
    assert [entry['tick'] for entry in history] == [0, 1, 2]
    for entry in history:
        assert entry['sampler'] == 'student, S=4' and entry['detector'] == 'pixels'
        figures = entry['figures']
        assert {'fd_pixels', 'agree_rmse', 'agree_psnr'} <= set(figures) and 'fid' not in figures
        assert figures['fd_pixels'] > 0 and 0 < figures['agree_rmse'] < 2
        assert figures['agree_psnr'] == pytest.approx(10 * np.log10(4 / figures['agree_rmse'] ** 2), rel=1e-9)
    assert 'teacher_fd_pixels' in history[0]['figures'] and all('teacher_fd_pixels' not in e['figures'] for e in history[1:])
    assert history[0]['best'] and os.path.isfile(os.path.join(run_dir, 'network-snapshot-best.pkl'))
    best = min(e['figures']['fd_pixels'] for e in history)
    assert [e['best'] for e in history] == [e['figures']['fd_pixels'] == min(x['figures']['fd_pixels'] for x in history[:i + 1]) for i, e in enumerate(history)]
    assert any(e['best'] and e['figures']['fd_pixels'] == best for e in history)
    stats = read_stats(run_dir)
    assert stats[-1]['Validation/fd_pixels']['mean'] == pytest.approx(history[-1]['figures']['fd_pixels'], rel=1e-6)
    assert stats[-1]['Validation/agree_rmse']['mean'] == pytest.approx(history[-1]['figures']['agree_rmse'], rel=1e-6)
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        options = json.load(f)
    assert options['validation_fn']['func_name'] == 'training.validation.validate' and options['val_every'] == 1
    assert options['validation_fn']['ref_data'] == digits8 # The training data by default.

    # Two gloo ranks: the validation before the first step sees the same network (the teacher's
    # weights), so its figures equal the single-process ones.
    outdir2 = str(tmp_path / 'runs2')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py',
        f'--outdir={outdir2}', f'--data={digits8}', f'--teacher={teacher}', *ARCH, *SMALL, *CD, *VAL, '--duration=0.001']
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir2, = run_dirs(outdir2)
    first2 = read_history(run_dir2)[0]
    assert first2['world_size'] == 2 and history[0]['world_size'] == 1
    for name, value in history[0]['figures'].items():
        if name != 'sec':
            assert first2['figures'][name] == pytest.approx(value, rel=1e-6), name

def test_edm_training_validates_with_heun(tmp_path, digits8):
    outdir = str(tmp_path / 'runs')
    res = finish(start_train(f'--outdir={outdir}', f'--data={digits8}', *ARCH, *SMALL, '--val=1', '--val_detector=pixels',
        '--val_num=32', '--val_batch=32', '--val_every=2', '--duration=0.003'))
    assert res[0] == 0, res[2][-3000:]
    run_dir, = run_dirs(outdir)
    history = read_history(run_dir)
    assert [entry['tick'] for entry in history] == [2, 3] # Every 2 ticks, and at the end.
    for entry in history:
        assert entry['sampler'].startswith('heun') and set(entry['figures']) == {'fd_pixels', 'sec'}

#----------------------------------------------------------------------------

def run_main(*args):
    """train.main in-process, as a user would call it; returns (exit code, output)."""
    from click.testing import CliRunner # pylint: disable=import-outside-toplevel
    import train # pylint: disable=import-outside-toplevel
    result = CliRunner().invoke(train.main, list(args))
    return result.exit_code, result.output

def test_bad_validation_options_stop_before_any_work(tmp_path, digits8):
    outdir = tmp_path / 'runs'
    common = [f'--outdir={outdir}', f'--data={digits8}', *ARCH, *SMALL, '--duration=0.001', '--val=1']
    bad_ref = tmp_path / 'bad.npz'
    np.savez(bad_ref, mean=np.zeros(3))
    code, out = run_main(*common, f'--val_ref={bad_ref}', '--val_detector=pixels')
    assert code == 1 and 'Error: --val: ' in out and 'mu' in out and 'Traceback' not in out
    wrong_dim = tmp_path / 'wrong.npz'
    np.savez(wrong_dim, mu=np.zeros(5), sigma=np.eye(5))
    code, out = run_main(*common, f'--val_ref={wrong_dim}', '--val_detector=pixels')
    assert code == 1 and 'Error: --val: ' in out and '5' in out
    code, out = run_main(*common, f'--val_detector={tmp_path / "missing.pkl"}')
    assert code == 1 and 'Error: --val: ' in out and 'missing.pkl' in out
    assert not outdir.exists()

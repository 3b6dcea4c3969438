"""benchmarks/gmm_distill.py at a tiny budget: the command runs, its JSON has
every figure, and the configuration overrides reach the loss and the sampler."""

import json
import os
import sys

import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import gmm_distill # pylint: disable=wrong-import-position

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = ['--S', '2,4', '--seeds', '0,1', '--steps', '3', '--batch', '8', '--num', '32', '--ref_steps', '8', '--cbase', '8']

def test_benchmark_runs_and_writes_every_figure(tmp_path):
    out = tmp_path / 'figures.json'
    result = CliRunner().invoke(gmm_distill.main, TINY + ['--mixture', 'both', '--config', 'T_budget',
        '--set', 'target_ema=0.9', '--set', 'sampler_stochastic=true', '--out', str(out)])
    assert result.exit_code == 0, result.output
    assert 'step doubling RMS' in result.output and 'Total wall time' in result.output
    data = json.loads(out.read_text())
    assert data['config'] == 'T_budget' and data['seeds'] == [0, 1] and data['S'] == [2, 4]
    assert data['budget']['kimg'] == pytest.approx(0.024) and data['seconds'] > 0
    assert [m['mixture'] for m in data['mixtures']] == ['gmm8', 'gmm16']
    for m in data['mixtures']:
        assert m['loss_kwargs'] == dict(T_start=16, T_end=64, T_anneal_kimg=pytest.approx(0.024), target_ema=0.9)
        assert m['sampler_kwargs'] == dict(stochastic=True)
        ref = m['reference']
        assert ref['num_steps'] == 16 and 0 < ref['doubling_rms'] <= ref['doubling_max'] and 0 <= ref['exact_tv'] <= 1
        assert sorted(m['S']) == ['2', '4']
        for S, entry in m['S'].items():
            student = entry['student']
            for name in ('rmse', 'tv', 'seconds'):
                assert len(student[name]['values']) == 2 and student[name]['std'] >= 0
                assert student[name]['mean'] == pytest.approx(sum(student[name]['values']) / 2)
            assert student['rmse']['mean'] > 0 and 0 <= student['tv']['mean'] <= 1
            assert entry['euler']['nfe'] == int(S) and entry['heun']['nfe'] == int(S) - 1
            assert entry['euler']['rmse'] > 0 and 0 <= entry['heun']['tv'] <= 1

def test_students_start_from_the_denoiser_checkpoint(tmp_path):
    out = tmp_path / 'figures.json'
    result = CliRunner().invoke(gmm_distill.main, TINY + ['--mixture', 'gmm8', '--init_steps', '2', '--out', str(out)])
    assert result.exit_code == 0, result.output
    m = json.loads(out.read_text())['mixtures'][0]
    assert m['init']['steps'] == 2 and all(entry['init_euler']['nfe'] == int(S) and entry['init_euler']['rmse'] > 0 for S, entry in m['S'].items())
    mixture = gmm_distill.make_mixture('gmm8')
    init = gmm_distill.pretrain_denoiser(mixture, steps=2, batch=8, lr=2e-3, lr_rampup_kimg=0, ema_halflife_kimg=0.5, ema_rampup_ratio=0.25, cbase=8)
    before = {name: p.clone() for name, p in init.named_parameters()}
    student, _ = gmm_distill.train_student(mixture, 2, 0, dict(), 0, 8, 2e-3, 0, 0.5, 0.25, 8, init=init)
    assert all(torch.equal(p, before[name]) for name, p in init.named_parameters())
    assert all(torch.equal(p, before[name]) for name, p in student.named_parameters())

def test_config_resolution_and_bad_input():
    loss, sampler = gmm_distill.resolve_config('huber_c10', ['loss=l2_root', 'sampler_addim_scale=0.1', 'student_sigmas=0.5,0.1,0.01'], 6.4, 64)
    assert loss == dict(huber_c=pytest.approx(10 * 0.00054 * 8), loss='l2_root', student_sigmas='0.5,0.1,0.01')
    assert sampler == dict(addim_scale=0.1)
    assert gmm_distill.resolve_config('current', [], 6.4, 64) == (dict(), dict())
    result = CliRunner().invoke(gmm_distill.main, TINY + ['--set', 'target_ema'])
    assert result.exit_code != 0 and 'KEY=VALUE' in result.output

#----------------------------------------------------------------------------

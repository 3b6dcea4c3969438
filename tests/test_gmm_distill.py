"""benchmarks/gmm_distill.py at a tiny budget: the command runs, its JSON has
every figure, the configuration overrides reach the loss and the sampler, the
denoiser checkpoint is reused from its cache, and the oracle control's
reference and the per-segment profile's exact states are the exact ODE
solution (closed form of cd-spec section 9)."""

import json
import os
import sys

import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import gmm_distill # pylint: disable=wrong-import-position
from _gaussian import GaussianNet, flow # pylint: disable=wrong-import-position
from training import consistency_ops as ops # pylint: disable=wrong-import-position

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = ['--S', '2,4', '--seeds', '0,1', '--steps', '3', '--batch', '8', '--num', '32', '--ref_steps', '8', '--cbase', '8']

def test_benchmark_runs_and_writes_every_figure(tmp_path):
    out = tmp_path / 'figures.json'
    result = CliRunner().invoke(gmm_distill.main, TINY + ['--mixture', 'both', '--set', 'T_start=16', '--set', 'T_end=64',
        '--set', 'T_anneal_kimg=none', '--set', 'target_ema=0.9', '--set', 'sampler_stochastic=true', '--out', str(out)])
    assert result.exit_code == 0, result.output
    assert 'step doubling RMS' in result.output and 'Total wall time' in result.output
    data = json.loads(out.read_text())
    assert data['config'] == 'current' and data['seeds'] == [0, 1] and data['S'] == [2, 4]
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
    opt = dict(batch=8, lr=2e-3, lr_rampup_kimg=0, ema_halflife_kimg=0.5, ema_rampup_ratio=0.25, cbase=8)
    init = gmm_distill.optimize(mixture, gmm_distill.EDMLoss(), 10000, 2, **opt)
    before = {name: p.clone() for name, p in init.named_parameters()}
    student, _ = gmm_distill.train_student(mixture, 2, 0, dict(), steps=0, init=init, **opt)
    assert all(torch.equal(p, before[name]) for name, p in init.named_parameters())
    assert all(torch.equal(p, before[name]) for name, p in student.named_parameters())

def test_config_resolution_and_bad_input():
    loss, sampler = gmm_distill.resolve_config('current', ['huber_c=10x', 'loss=l2_root', 'sampler_stochastic=true', 'student_sigmas=0.5,0.1,0.01', 'rho=3', 'target_ema=0.9', 'T_anneal_kimg=None'], 6.4, 64)
    assert loss == dict(huber_c=pytest.approx(10 * 0.00054 * 8), loss='l2_root', student_sigmas='0.5,0.1,0.01', rho=3, target_ema=0.9, T_anneal_kimg=6.4)
    assert type(loss['rho']) is int and sampler == dict(stochastic=True)
    assert gmm_distill.resolve_config('current', [], 6.4, 64) == (dict(), dict())
    result = CliRunner().invoke(gmm_distill.main, TINY + ['--set', 'target_ema'])
    assert result.exit_code != 0 and 'KEY=VALUE' in result.output

def test_checkpoint_cache_and_per_S_presets(tmp_path):
    args = TINY + ['--mixture', 'gmm8', '--S', '4,8', '--init_steps', '2', '--init_cache', str(tmp_path / 'cache'), '--config', 'layout_mid_teacher']
    first = CliRunner().invoke(gmm_distill.main, args + ['--out', str(tmp_path / 'a.json')])
    again = CliRunner().invoke(gmm_distill.main, args + ['--out', str(tmp_path / 'b.json')])
    assert first.exit_code == 0 and again.exit_code == 0, first.output + again.output
    assert '(from ' in again.output and len(list((tmp_path / 'cache').iterdir())) == 1
    a, b = [json.loads((tmp_path / name).read_text())['mixtures'][0] for name in ('a.json', 'b.json')]
    assert [a['S'][S]['student']['rmse'] for S in ('4', '8')] == [b['S'][S]['student']['rmse'] for S in ('4', '8')]
    assert a['S']['4']['init_euler'] == b['S']['4']['init_euler']
    mixture = gmm_distill.make_mixture('gmm8')
    loss_kwargs, _ = gmm_distill.resolve_config('layout_mid_teacher', [], 0.024, mixture.dim)
    _, loss_fn = gmm_distill.train_student(mixture, 4, 0, loss_kwargs, steps=0, cbase=8, batch=8, lr=2e-3, lr_rampup_kimg=0, ema_halflife_kimg=0.5, ema_rampup_ratio=0.25)
    assert loss_fn.target_mode == 'teacher' and loss_fn.student_sigmas().tolist() == [80, 8, 2, 0.5, 0]
    result = CliRunner().invoke(gmm_distill.main, TINY + ['--S', '3', '--config', 'layout_mid'])
    assert result.exit_code != 0 and 'not S=3' in result.output and 'Traceback' not in result.output

def test_segment_profile_against_the_closed_form(tmp_path):
    mu, s = 0.1, 0.5
    sigmas = [80.0, 8.0, 2.0, 0.5, 0.0]
    latents = torch.randn([64, 1, 4, 4], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    states = gmm_distill.exact_states(GaussianNet(img_resolution=4, mu=mu, s=s), latents, sigmas, substeps=64)
    for state, sigma in zip(states, sigmas):
        assert float((state - flow(latents * 80, mu, s, 80.0, sigma)).abs().max()) < 5e-4
    ideal = gmm_distill.segment_profile(GaussianNet(img_resolution=4, mu=mu, s=s, mode='student', student_sigmas=sigmas), states, sigmas)
    assert max(ideal["one_step"] + ideal["from_exact"]) < 5e-4
    euler = gmm_distill.segment_profile(GaussianNet(img_resolution=4, mu=mu, s=s), states, sigmas) # The teacher's DDIM steps.
    assert min(euler['one_step']) > 1e-2 and euler['from_exact'][-1] == euler['one_step'][-1]
    assert euler['from_exact'][0] == pytest.approx(gmm_distill.rmse(gmm_distill.samplers.student_sampler(
        GaussianNet(img_resolution=4, mu=mu, s=s), latents, sigmas=torch.tensor(sigmas, dtype=torch.float64)), states[-1]), rel=1e-9)
    result = CliRunner().invoke(gmm_distill.main, TINY + ['--mixture', 'gmm8', '--profile', '--out', str(tmp_path / 'profile.json')])
    assert result.exit_code == 0 and 'per segment' in result.output, result.output
    segments = json.loads((tmp_path / 'profile.json').read_text())['mixtures'][0]['S']['4']['segments']
    assert len(segments['sigmas']) == 5 and len(segments['one_step']) == len(segments['from_exact']) == 4

def test_oracle_reference_is_the_exact_ode_solution():
    mu, s = 0.1, 0.5
    teacher = GaussianNet(img_resolution=4, mu=mu, s=s)
    images = mu + s * torch.randn([256, 1, 4, 4], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kwargs = dict(S=4, student_sigmas='8,2,0.5', T_start=24, T_end=24, precision='float64')
    draws = dict()
    for name, loss_fn in [(8, gmm_distill.OracleTargetLoss(oracle_substeps=8, **kwargs)), (16, gmm_distill.OracleTargetLoss(oracle_substeps=16, **kwargs)),
            ('bridge', gmm_distill.ConsistencyDistillLoss(target_mode='teacher', **kwargs))]:
        torch.manual_seed(1)
        draws[name] = loss_fn.set_teacher(teacher).draw(teacher, images)
    d = draws[8]
    assert all(torch.equal(d.x_t, e.x_t) and torch.equal(d.case, e.case) for e in draws.values())
    terminal, general = d.case == ops.TERMINAL, (d.case == ops.GENERAL) & (d.sigma_ref > 0)
    assert terminal.any() and general.any() and ((~terminal) & (d.sigma_ref == 0)).any()
    exact = flow(d.x_t, mu, s, d.sigma_t, d.sigma_ref)
    err = {name: (e.x_ref - exact).flatten(1).abs().amax(dim=1) for name, e in draws.items()}
    assert torch.equal(d.x_ref[terminal], images[terminal])
    assert float(err[8][~terminal].max()) < 1e-2 and float(err[16][~terminal].max()) < float(err[8][~terminal].max()) / 3 # Heun: second order.
    assert bool((err[8][general] < 0.05 * err['bridge'][general]).all()) # Far closer than the teacher's Euler bridge.
    target, _ = ops.inverse_ddim(d.x_ref, d.x_t, d.sigma_t, d.sigma_ref, dtype=torch.float64)
    assert torch.equal(d.target, target)

#----------------------------------------------------------------------------

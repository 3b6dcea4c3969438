"""Consistency training and tuning (cd-spec section 10): the hop of a draw is the data's own point, whose
expectation given x_t is the exact denoiser's Euler hop; no teacher network runs; train.py --ct=True resumes
bit-exactly, and its student samples with generate.py in S steps and validates with --val=1."""

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate
from _gaussian import GaussianNet
from _train_helpers import SMALL_RUN, TINY_ARCH, finish, interrupted_runs, start_train, tensors_equal
from training import consistency_ops as ops
from training.loss_cd import ConsistencyDistillLoss

#----------------------------------------------------------------------------
# The hop, on the single Gaussian of cd-spec section 9.

MU, S = 0.1, 0.5

def test_the_ct_hop_is_an_unbiased_estimate_of_the_exact_euler_hop(one_thread):
    torch.manual_seed(0)
    loss = ConsistencyDistillLoss(S=2, T_start=4, T_end=4, sampling_mode='uniform', target_mode='live', ct=True)
    images = MU + S * torch.randn([16384, 1, 4, 4])
    d = loss.draw(GaussianNet(mu=MU, s=S), images)
    sigma_t, sigma_s = ops.expand_sigma(d.sigma_t, d.y), ops.expand_sigma(d.sigma_s, d.y)
    torch.testing.assert_close(d.x_s, d.y + sigma_s * (d.x_t - d.y) / sigma_t) # The draw's own point at sigma_s.
    for k in d.k.unique().tolist():
        rows = d.k == k
        x_t, x_s = d.x_t[rows].flatten().double(), d.x_s[rows].flatten().double()
        st, ss = float(d.sigma_t[rows][0]), float(d.sigma_s[rows][0])
        # E[x_s | x_t] is linear in x_t for Gaussian data; the Euler hop of the exact denoiser D is too.
        slope, intercept = np.polyfit(x_t.numpy(), x_s.numpy(), 1)
        c, r = S ** 2 / (S ** 2 + st ** 2), ss / st # D(x) = mu + c (x - mu); Euler: r x + (1 - r) D(x).
        cond_std = (1 - r) * S * st / np.sqrt(S ** 2 + st ** 2) # Of x_s given x_t.
        n, mean, std = len(x_t), float(x_t.mean()), float(x_t.std()) # Six standard errors of the least squares:
        assert abs(slope - (r + (1 - r) * c)) <= 6 * cond_std / (np.sqrt(n) * std) + 1e-6, (k, slope)
        tol = 6 * cond_std * np.sqrt(1 / n + mean ** 2 / (n * std ** 2)) + 1e-6
        assert abs(intercept - (1 - r) * (1 - c) * MU) <= tol, (k, intercept)

@pytest.mark.parametrize('ct', [True, False])
def test_a_ct_step_runs_no_teacher_network(ct, one_thread):
    teacher, student = GaussianNet(mu=MU, s=S), GaussianNet(mu=MU, s=S)
    loss = ConsistencyDistillLoss(S=2, T_start=4, T_end=4, target_mode='ema', ct=ct).set_teacher(teacher)
    loss(net=student, images=MU + S * torch.randn([8, 1, 4, 4]))
    assert teacher.num_calls == (0 if ct else 2) # Distillation: one Heun hop, two evaluations.
    assert student.num_calls == 1 and loss.target.num_calls == 1 # The student, and its 'ema' target copy.

#----------------------------------------------------------------------------
# train.py --ct=True: no teacher, resume, generate.py and validation.

CT_RUN = [*TINY_ARCH, *SMALL_RUN, '--batch=32', '--lr_rampup=1', '--consistency=True', '--ct=True', '--S=2',
    '--T_end=8', '--T_anneal_kimg=2', '--dropout=0.1']
VAL = ['--val=1', '--val_detector=pixels', '--val_num=64', '--val_batch=32', '--val_every=2']

@pytest.fixture(scope='module')
def runs(tmp_path_factory, digits8):
    """A: 2 kimg of consistency training, validated. B: the same stopped at 1 kimg. C: B resumed to 2 kimg."""
    outdirs = (str(tmp_path_factory.mktemp(name)) for name in ('ct_a', 'ct_bc'))
    return interrupted_runs(*outdirs, [f'--data={digits8}', *CT_RUN], a_args=VAL)

def test_ct_runs_without_a_teacher_and_resumes_bit_exactly(runs):
    assert os.path.basename(runs['a']).endswith('-ct2') and 'Consistency training: S=2 student, starting from random' in runs['out_a']
    with open(os.path.join(runs['a'], 'training_options.json')) as f:
        options = json.load(f)
    assert options['loss_kwargs']['ct'] is True and options['loss_kwargs']['T_start'] == 2 # One edge per segment.
    assert options.get('teacher_pkl') is None
    a, c = (torch.load(os.path.join(runs[key], 'training-state-000002.pt'), weights_only=False) for key in 'ac')
    assert a['cur_nimg'] == c['cur_nimg'] == 2016
    assert tensors_equal(a['net'], c['net']) and tensors_equal(a['ema'], c['ema'])
    assert tensors_equal(a['loss_state']['target'], c['loss_state']['target'])
    assert all(tensors_equal(a['optimizer_state']['state'][i], c['optimizer_state']['state'][i]) for i in a['optimizer_state']['state'])

def test_ct_student_validates_and_samples_in_s_steps(runs, tmp_path):
    with open(os.path.join(runs['a'], 'metrics-val.jsonl')) as f:
        history = [json.loads(line) for line in f]
    assert [entry['tick'] for entry in history] == [2]
    assert history[0]['sampler'] == 'student, S=2' and history[0]['figures']['fd_pixels'] > 0
    assert not any(name.startswith(('agree', 'teacher')) for name in history[0]['figures']) # No reference network.
    pkl = os.path.join(runs['a'], 'network-snapshot-000002.pkl')
    result = CliRunner().invoke(generate.main, [f'--network={pkl}', f'--outdir={tmp_path / "out"}', '--seeds=0-3', '--device=cpu'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert 'student sampler, S=2' in result.output and len(os.listdir(tmp_path / 'out')) == 4

#----------------------------------------------------------------------------
# Tuning: the student is built like the --transfer network and starts from its weights.

def test_tuning_builds_the_student_from_the_transfer_network(tmp_path, digits8, teacher):
    res = finish(start_train(f'--outdir={tmp_path}', '--nosubdir', f'--data={digits8}', *SMALL_RUN, '--consistency=True',
        '--ct=True', f'--transfer={teacher}', '--S=2', '--T_end=8', '--duration=0.001'))
    assert res[0] == 0, res[2][-3000:]
    with open(os.path.join(str(tmp_path), 'training_options.json')) as f:
        options = json.load(f)
    with open(os.path.join(os.path.dirname(teacher), 'training_options.json')) as f:
        teacher_options = json.load(f)
    kwargs = {k: v for k, v in options['network_kwargs'].items() if k not in ('augment_dim', 'use_fp16', 'dropout')}
    assert {k: teacher_options['network_kwargs'][k] for k in kwargs} == kwargs
    assert options['resume_pkl'] == teacher and 'Copying the weights of' in res[1]

@pytest.mark.parametrize('args, message', [
    (['--cd_target_mode=teacher'], 'Error: --cd_target_mode=teacher needs a teacher in the loss, which --ct=True runs without'),
    (['--gnet=x.pkl', '--guidance=2'], 'Error: --gnet sets the teacher\'s hop, which --ct=True replaces by the data\'s'),
    (['--teacher_hop=addim'], 'Error: --teacher_hop sets the teacher\'s hop, which --ct=True replaces by the data\'s'),
])
def test_ct_refuses_options_of_a_teacher(tmp_path, digits8, args, message):
    res = finish(start_train(f'--outdir={tmp_path}', f'--data={digits8}', *CT_RUN, *args))
    assert res[0] == 1 and message in res[2] and 'Traceback' not in res[2], res[2][-2000:]

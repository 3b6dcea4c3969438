"""train.py --arch=edm2 on the CPU: EDM2's network, loss, learning-rate schedule
and power-function EMA on the 8x8 digits; exact resume; reconstruct_phema.py
on the run, and generate.py on its output; the presets and bad input."""

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import generate
import reconstruct_phema
import train
from _train_helpers import SMALL_RUN, finish, invoke, run_dirs, start_train
from training import phema
from training import steps

EDM2_RUN = [*SMALL_RUN, '--arch=edm2', '--cbase=16', '--cres=1,2', '--batch=40'] # 25 steps per kimg: snapshot times are whole kimg.
RUN_NAME = 'digits8-uncond-edm2-gpus1-batch40-fp32'

#----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def runs(tmp_path_factory, digits8):
    """A: 2 kimg, uninterrupted. B: the same, stopped at 1 kimg. C: B resumed to 2 kimg."""
    outdir_a, outdir_bc = str(tmp_path_factory.mktemp('edm2_a')), str(tmp_path_factory.mktemp('edm2_bc'))
    proc_a = start_train(f'--outdir={outdir_a}', f'--data={digits8}', *EDM2_RUN, '--duration=0.002')
    res_b = finish(start_train(f'--outdir={outdir_bc}', f'--data={digits8}', *EDM2_RUN, '--duration=0.001', '--desc=b'))
    assert res_b[0] == 0, res_b[2][-3000:]
    dir_b, = run_dirs(outdir_bc)
    res_c = finish(start_train(f'--outdir={outdir_bc}', f'--data={digits8}', *EDM2_RUN, '--duration=0.002', f'--resume={dir_b}', '--desc=c'))
    assert res_c[0] == 0, res_c[2][-3000:]
    res_a = finish(proc_a)
    assert res_a[0] == 0, res_a[2][-3000:]
    dir_a, = run_dirs(outdir_a)
    return dict(a=dir_a, b=dir_b, c=run_dirs(outdir_bc)[1])

def load(path):
    with open(path, 'rb') as f:
        return pickle.load(f)

def state_dicts_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

#----------------------------------------------------------------------------

def test_edm2_run_writes_power_function_ema_snapshots(runs):
    run_dir = runs['a']
    assert os.path.basename(run_dir) == f'00000-{RUN_NAME}'
    assert sorted(name for name in os.listdir(run_dir) if name.endswith('.pkl')) == [f'network-snapshot-{kimg:07d}-{std}.pkl'
        for kimg in (0, 1, 2) for std in ('0.050', '0.100')] # EDM2's names; no classic EMA.
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        options = json.load(f)
    assert options['network_kwargs']['class_name'] == 'training.networks_edm2.Precond'
    assert options['loss_kwargs'] == dict(class_name='training.loss.EDM2Loss', P_mean=-0.4, P_std=1.0)
    assert options['optimizer_kwargs']['betas'] == [0.9, 0.99] and options['lr_decay_batches'] == 70000
    assert options['ema_halflife_kimg'] is None and options['phema_stds'] == [0.05, 0.1]
    data = load(os.path.join(run_dir, 'network-snapshot-0000002-0.050.pkl'))
    assert type(data['ema']).__name__ == 'Precond' and not data['ema'].training
    last = load(os.path.join(run_dir, 'network-snapshot-0000002-0.100.pkl'))['ema']
    assert not state_dicts_equal(data['ema'].state_dict(), last.state_dict()) # Two different profiles.

def test_edm2_resume_is_bit_identical(runs):
    a = torch.load(os.path.join(runs['a'], 'training-state-000002.pt'), weights_only=False)
    c = torch.load(os.path.join(runs['c'], 'training-state-000002.pt'), weights_only=False)
    assert a['cur_nimg'] == c['cur_nimg'] == 2000
    assert state_dicts_equal(a['net'], c['net'])
    assert all(state_dicts_equal(x, y) for x, y in zip(a['phema']['emas'], c['phema']['emas']))
    assert a['optimizer_state']['state'].keys() == c['optimizer_state']['state'].keys()
    for key, value in a['optimizer_state']['state'].items():
        assert all(torch.equal(value[name], c['optimizer_state']['state'][key][name]) for name in value)
    for std in ('0.050', '0.100'):
        name = f'network-snapshot-0000002-{std}.pkl'
        assert state_dicts_equal(load(os.path.join(runs['a'], name))['ema'].state_dict(), load(os.path.join(runs['c'], name))['ema'].state_dict())

#----------------------------------------------------------------------------
# Post-hoc EMA.

def reconstruct(*args):
    return CliRunner().invoke(reconstruct_phema.main, list(args))

def test_reconstruction_is_the_weighted_sum_and_matches_the_tracked_profile(runs, tmp_path):
    result = reconstruct(f'--indir={runs["a"]}', f'--outdir={tmp_path}', '--outstd=0.05,0.07')
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert sorted(os.listdir(tmp_path)) == [f'phema-0000002-{std}.{ext}' for std in ('0.050', '0.070') for ext in ('pkl', 'safetensors')]

    # The weights are the least-squares combination of the stored ones (kimg 1 and 2, both widths).
    inputs = [(kimg, std, load(os.path.join(runs['a'], f'network-snapshot-{kimg:07d}-{std:.3f}.pkl'))['ema'].state_dict())
        for kimg in (1, 2) for std in (0.05, 0.1)]
    coefs = phema.solve_posthoc_coefficients([k for k, _s, _w in inputs], [s for _k, s, _w in inputs], 2, [0.05, 0.07])
    for j, std in enumerate((0.05, 0.07)):
        out = load(tmp_path / f'phema-0000002-{std:.3f}.pkl')
        for name, value in out['ema'].state_dict().items():
            expected = sum(float(coefs[i, j]) * w[name].to(torch.float64) for i, (_k, _s, w) in enumerate(inputs))
            torch.testing.assert_close(value.to(torch.float64), expected, rtol=1e-5, atol=1e-6)

    # At the width and length of a tracked profile, the reconstruction is that profile.
    tracked = load(os.path.join(runs['a'], 'network-snapshot-0000002-0.050.pkl'))['ema'].state_dict()
    rebuilt = load(tmp_path / 'phema-0000002-0.050.pkl')['ema'].state_dict()
    err = max(float((rebuilt[k] - tracked[k]).abs().max() / tracked[k].abs().max().clamp(min=1e-12)) for k in tracked)
    assert err < 1e-5, err

def test_generate_samples_the_reconstructed_snapshot(runs, tmp_path):
    result = reconstruct(f'--indir={runs["a"]}', f'--outdir={tmp_path}', '--outstd=0.08', '--outkimg=1')
    assert result.exit_code == 0, result.output
    pkl = str(tmp_path / 'phema-0000001-0.080.pkl')
    result = CliRunner().invoke(generate.main, [f'--network={pkl}', f'--outdir={tmp_path / "out"}', '--seeds=0-3', '--steps=4', '--device=cpu'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert 'heun sampler, 4 steps' in result.output and sorted(os.listdir(tmp_path / 'out')) == [f'{seed:06d}.png' for seed in range(4)]

def test_reconstruction_bad_input(runs, tmp_path, digits8):
    def error(*args):
        result = reconstruct(*args, f'--outdir={tmp_path / "out"}')
        assert result.exit_code != 0 and 'Traceback' not in result.output
        return result.output.strip().splitlines()[-1]
    assert 'cannot be reconstructed from the stored widths [0.05, 0.1] (relative error' in error(f'--indir={runs["a"]}', '--outstd=0.01')
    assert error(f'--indir={runs["a"]}', '--outstd=0.4').startswith('Error: --outstd=0.4: The EMA width sigma_rel = 0.4 lies outside')
    assert 'lies beyond the newest snapshot' in error(f'--indir={runs["a"]}', '--outstd=0.05', '--outkimg=3')
    assert 'holds no power-function EMA snapshots' in error(f'--indir={tmp_path}', '--outstd=0.05')
    assert 'is neither a number nor a range' in error(f'--indir={runs["a"]}', '--outstd=0.05,abc')
    mixed = tmp_path / 'mixed'
    shutil.copytree(runs['a'], mixed)
    other = dict(load(mixed / 'network-snapshot-0000001-0.050.pkl'))
    other['ema'] = train_free_edm2(cbase=32)
    with open(mixed / 'network-snapshot-0000001-0.050.pkl', 'wb') as f:
        pickle.dump(other, f)
    assert 'mixes the snapshots of different networks' in error(f'--indir={mixed}', '--outstd=0.05')
    assert not os.path.exists(tmp_path / 'out')

def train_free_edm2(cbase):
    from training.networks_edm2 import Precond # pylint: disable=import-outside-toplevel
    return Precond(img_resolution=8, img_channels=1, label_dim=0, model_channels=cbase, channel_mult=[1, 2]).eval()

def test_parse_stds():
    assert reconstruct_phema.parse_stds('0.1,0.05') == [0.05, 0.1]
    assert reconstruct_phema.parse_stds('0.03-0.06:0.01, 0.1') == [0.03, 0.04, 0.05, 0.06, 0.1]

#----------------------------------------------------------------------------
# Presets and options.

def dry_run(*args):
    result = CliRunner().invoke(train.main, [*args, '--dry-run'])
    assert result.exit_code == 0, result.output
    text = result.output
    return json.loads(text[text.index('Training options:') + len('Training options:'):text.index('Run directory:')])

def test_presets_set_the_published_hyperparameters(tmp_path, digits8):
    options = dry_run(f'--outdir={tmp_path}', f'--data={digits8}', '--preset=edm2-img64-s')
    assert options['network_kwargs']['class_name'] == 'training.networks_edm2.Precond' and options['network_kwargs']['model_channels'] == 192
    assert options['optimizer_kwargs']['lr'] == 0.0100 and options['lr_decay_batches'] == 35000 and options['batch_size'] == 2048
    assert options['loss_kwargs'] == dict(class_name='training.loss.EDM2Loss', P_mean=-0.8, P_std=1.6) and options['network_kwargs']['dropout'] == 0
    options = dry_run(f'--outdir={tmp_path}', f'--data={digits8}', '--preset=edm2-img512-xxl', '--batch=256', '--phema=0.1')
    assert options['network_kwargs']['model_channels'] == 448 and options['optimizer_kwargs']['lr'] == 0.0065 and options['network_kwargs']['dropout'] == 0.1
    assert options['batch_size'] == 256 and options['phema_stds'] == [0.1] and options['loss_kwargs']['P_mean'] == -0.4 # Given options win.
    options = dry_run(f'--outdir={tmp_path}', f'--data={digits8}', '--phema=0.05,0.1')
    assert options['phema_stds'] == [0.05, 0.1] and options['ema_halflife_kimg'] == 500 # Also for the EDM architectures, beside the classic EMA.
    assert options['lr_decay_batches'] is None and options['optimizer_kwargs']['betas'] == [0.9, 0.999]
    assert not os.listdir(tmp_path)

def test_edm2_bad_options(tmp_path, digits8):
    base = [f'--outdir={tmp_path / "out"}', f'--data={digits8}']
    assert invoke(*base, '--preset=edm2-img64-s', '--arch=adm') == 'Error: --preset=edm2-img64-s is an EDM2 preset, but --arch=adm; pass --arch=edm2 or leave --arch out.'
    assert invoke(*base, '--arch=edm2', '--precond=vp').startswith('Error: --precond=vp applies to the EDM architectures; --arch=edm2 has its own preconditioning')
    assert invoke(*base, '--arch=edm2', '--augment=0.1').startswith('Error: --augment=0.1 is not supported by --arch=edm2')
    assert invoke(*base, '--P_mean=-1').startswith('Error: --P_mean applies only to --arch=edm2')
    assert invoke(*base, '--arch=edm2', '--phema=0.1,0.05') == \
        'Error: The power-function EMA widths [0.1, 0.05] are not an increasing list; give each sigma_rel once, in increasing order, e.g. 0.050,0.100.'
    assert invoke(*base, '--arch=edm2', '--phema=0.05,0.5').startswith('Error: The EMA width sigma_rel = 0.5 lies outside (0, 0.3003]')
    assert "Invalid value for '--phema'" in CliRunner().invoke(train.main, [*base, '--phema=a,b']).output
    assert not os.path.exists(tmp_path / 'out')

def test_edm2_learning_rate_schedule():
    lr = lambda nimg: steps.learning_rate(0.01, nimg, lr_rampup_kimg=10, batch_size=10, decay_batches=2000)
    assert lr(5000) == pytest.approx(0.005) and lr(20000) == pytest.approx(0.01) # Linear ramp-up over 10 kimg, constant to 2000 steps ...
    assert lr(90000) == pytest.approx(0.01 / np.sqrt(4.5)) # ... then ref_lr / sqrt(steps / 2000).

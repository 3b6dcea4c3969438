"""A diverging run stops with one sentence and a non-zero exit code, also in
log.txt; no snapshot or training state it wrote holds a network with non-finite
weights or outputs, and the state its message names resumes to a finite network;
a single non-finite step is skipped, counted and the run goes on."""

import glob
import os
import pickle
import re

import pytest
import torch

import dnnlib

from _train_helpers import SMALL_RUN, TINY_ARCH, finish, read_stats, run_dirs, start_train
from _train_helpers import run_loop
from training import checkpoint
from training import training_loop
from training.loss import EDMLoss

#----------------------------------------------------------------------------

def finite_outputs(net):
    """Whether `net` gives finite outputs at sigma = 80, 1 and 0.01 on random images."""
    x = torch.randn([3, net.img_channels, net.img_resolution, net.img_resolution], generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([80.0, 1.0, 0.01])
    with torch.no_grad():
        return bool(torch.isfinite(net(x * sigma.reshape(-1, 1, 1, 1), sigma)).all())

def check_resumes_finite(state_path):
    """The network and EMAs that a resume from `state_path` starts with give finite outputs."""
    state = checkpoint.load_training_state(state_path)
    for key in ('net', 'ema'):
        net = dnnlib.util.construct_class_by_name(**state['network_kwargs'], img_resolution=8, img_channels=1, label_dim=0)
        net.load_state_dict(state[key])
        assert finite_outputs(net.eval()), (state_path, key)

def check_diverged(res, outdir):
    code, _out, err = res
    errors = [line for line in err.splitlines() if line.startswith('Error: ')]
    assert code == 1 and len(errors) == 1 and 'Traceback' not in err, err[-3000:]
    assert errors[0].startswith('Error: Training diverged at tick ') and 'lower the learning rate or lengthen its warm-up' in errors[0], errors[0]
    assert not re.search(r'\d', errors[0].split(';')[1].split('"')[0]), errors[0] # The advice quotes no value.
    run_dir, = run_dirs(outdir)
    with open(os.path.join(run_dir, 'log.txt')) as f:
        assert f.read().splitlines()[-1] == errors[0]
    for path in glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')):
        with open(path, 'rb') as f:
            assert finite_outputs(pickle.load(f)['ema']), path
    states = sorted(glob.glob(os.path.join(run_dir, 'training-state-*.pt')))
    for path in states:
        check_resumes_finite(path)
    named = re.search(r'resume from "([^"]+)"', errors[0])
    if states: # The newest state is the one named.
        assert named is not None and named.group(1) == states[-1], errors[0]
    else:
        assert named is None and errors[0].endswith(', and start again.'), errors[0]

def test_edm_training_with_a_huge_learning_rate_stops(tmp_path, digits8):
    outdir = str(tmp_path / 'runs')
    res = finish(start_train(f'--outdir={outdir}', f'--data={digits8}', *TINY_ARCH, *SMALL_RUN, '--lr=1e3', '--duration=0.02'))
    check_diverged(res, outdir)

def test_distillation_with_a_huge_learning_rate_stops(tmp_path, digits8, teacher):
    outdir = str(tmp_path / 'runs')
    res = finish(start_train(f'--outdir={outdir}', f'--data={digits8}', *TINY_ARCH, *SMALL_RUN, '--lr=1e3', '--duration=0.02',
        '--consistency=True', f'--teacher={teacher}', '--S=2', '--T_start=4', '--T_end=4'))
    check_diverged(res, outdir)

#----------------------------------------------------------------------------

class NaNOnceLoss(EDMLoss):
    """EDMLoss whose third call returns NaN; records the first weight of the network at every call."""
    weights = []

    def __call__(self, net, images, labels=None, augment_pipe=None):
        NaNOnceLoss.weights.append(next(net.parameters()).detach().clone())
        loss = super().__call__(net, images, labels, augment_pipe)
        return loss * float('nan') if len(NaNOnceLoss.weights) == 3 else loss

def test_a_single_non_finite_step_is_skipped_and_counted(tmp_path, digits8, one_thread):
    NaNOnceLoss.weights.clear()
    run_loop(run_dir=str(tmp_path), dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=digits8),
        data_loader_kwargs=dict(num_workers=0), network_kwargs=dict(class_name='training.networks.EDMPrecond', model_type='SongUNet',
        model_channels=16, channel_mult=[1], num_blocks=1), loss_kwargs=dict(class_name='test_divergence.NaNOnceLoss'),
        optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3), batch_size=16, total_kimg=0.08, lr_rampup_kimg=0, kimg_per_tick=1,
        state_dump_ticks=None, seed=0, device=torch.device('cpu'))
    w = NaNOnceLoss.weights
    assert len(w) == 5 # Every step ran, the run went on.
    assert not torch.equal(w[1], w[2]) and not torch.equal(w[3], w[4]) # Steps change the weights (the first has learning rate 0).
    assert torch.equal(w[2], w[3]) # The third step was skipped: its weights are those of the fourth call.
    stats = read_stats(str(tmp_path))
    skipped = sum(s['Loss/skipped_steps']['mean'] * s['Loss/skipped_steps']['num'] for s in stats)
    assert skipped == 1 and sum(s['Loss/skipped_steps']['num'] for s in stats) == 5
    assert all(s['Loss/grad_norm']['num'] for s in stats) and sum(s['Loss/grad_norm']['num'] for s in stats) == 4

#----------------------------------------------------------------------------

class ExplodingLoss(EDMLoss):
    """EDMLoss that, at its 20th call, scales the weights by 1e37: finite, but the outputs are not."""
    calls = 0

    def __call__(self, net, images, labels=None, augment_pipe=None):
        ExplodingLoss.calls += 1
        if ExplodingLoss.calls == 20:
            with torch.no_grad():
                for param in net.parameters():
                    param.mul_(1e37)
        return super().__call__(net, images, labels, augment_pipe)

def test_the_stop_names_the_newest_state_with_finite_outputs(tmp_path, digits8, one_thread):
    ExplodingLoss.calls = 0
    with pytest.raises(training_loop.TrainingStopped) as info:
        run_loop(run_dir=str(tmp_path), dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=digits8),
            data_loader_kwargs=dict(num_workers=0), network_kwargs=dict(class_name='training.networks.EDMPrecond', model_type='SongUNet',
            model_channels=16, channel_mult=[1], num_blocks=1), loss_kwargs=dict(class_name='test_divergence.ExplodingLoss'),
            optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3), batch_size=64, total_kimg=3, lr_rampup_kimg=0, kimg_per_tick=1,
            state_dump_ticks=1, snapshot_ticks=1, seed=0, device=torch.device('cpu'))
    message = str(info.value)
    assert message.startswith('Training diverged at tick 2 (2.112 kimg): the network no longer gives finite outputs'), message
    named = glob.glob(os.path.join(str(tmp_path), 'training-state-*.pt'))
    assert len(named) == 1 and message.endswith(f'resume from "{named[0]}".'), message
    check_resumes_finite(named[0])

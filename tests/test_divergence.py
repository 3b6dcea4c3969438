"""A diverging run stops with one sentence and a non-zero exit code, and no
snapshot or training state it wrote holds a non-finite weight; a single
non-finite step is skipped, counted and the run goes on."""

import glob
import os
import pickle

import torch

from _train_helpers import SMALL_RUN, TINY_ARCH, finish, read_stats, run_dirs, start_train
from _train_helpers import run_loop
from training import training_loop
from training.loss import EDMLoss

#----------------------------------------------------------------------------

def check_diverged(res, outdir):
    code, _out, err = res
    errors = [line for line in err.splitlines() if line.startswith('Error: ')]
    assert code == 1 and len(errors) == 1 and 'Traceback' not in err, err[-3000:]
    assert errors[0].startswith('Error: Training diverged at tick ') and 'lower the learning rate or lengthen its warm-up' in errors[0], errors[0]
    run_dir, = run_dirs(outdir)
    for path in glob.glob(os.path.join(run_dir, 'network-snapshot-*.pkl')):
        with open(path, 'rb') as f:
            assert all(torch.isfinite(p).all() for p in pickle.load(f)['ema'].parameters()), path
    for path in glob.glob(os.path.join(run_dir, 'training-state-*.pt')):
        state = torch.load(path, weights_only=False)
        assert all(torch.isfinite(v).all() for v in state['net'].values() if v.is_floating_point()), path
    stats = read_stats(run_dir)
    assert sum(s['Loss/skipped_steps']['mean'] * s['Loss/skipped_steps']['num'] for s in stats if 'Loss/skipped_steps' in s) >= 0
    return run_dir

def test_edm_training_with_a_huge_learning_rate_stops(tmp_path, digits8):
    outdir = str(tmp_path / 'runs')
    res = finish(start_train(f'--outdir={outdir}', f'--data={digits8}', *TINY_ARCH, *SMALL_RUN, '--lr=1e3', '--max_bad_steps=3', '--duration=0.02'))
    check_diverged(res, outdir)

def test_distillation_with_a_huge_learning_rate_stops(tmp_path, digits8, teacher):
    outdir = str(tmp_path / 'runs')
    res = finish(start_train(f'--outdir={outdir}', f'--data={digits8}', *TINY_ARCH, *SMALL_RUN, '--lr=1e3', '--max_bad_steps=3', '--duration=0.02',
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

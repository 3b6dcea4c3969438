"""Rank-count independence: train.py on 2 gloo ranks with --batch-gpu=8 and on
one process accumulating 2 rounds of 8 give bitwise the same weights."""

import os
import subprocess
import sys

import pytest
import torch

from _train_helpers import ROOT, TINY_ARCH, finish, start_train, subprocess_env

# 1 kimg (the shortest --duration): 63 optimizer steps of 16 images, in two micro-batches of 8; dropout and augmentation draw random numbers too.
RUN = ['--nosubdir', '--batch=16', '--batch-gpu=8', '--duration=0.001', '--tick=1', '--snap=1', '--dump=1', '--seed=5',
    '--workers=0', '--lr_rampup=0', '--device=cpu', '--cbase=16', '--cres=1', '--arch=ddpmpp']
EDM_RUN = [*RUN, '--augment=0.5', '--dropout=0.3']
CD_RUN = [*RUN, *TINY_ARCH, '--consistency=True', '--S=2', '--T_start=4', '--T_end=8', '--T_anneal_kimg=0.5', '--dropout=0.3']

def start_torchrun(*args):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', 'train.py', *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def final_state(outdir):
    return torch.load(os.path.join(outdir, 'training-state-000001.pt'), weights_only=False)

def assert_same_weights(one, two):
    assert one['cur_nimg'] == two['cur_nimg'] == 1008 and (one['world_size'], two['world_size']) == (1, 2)
    for key in ('net', 'ema'):
        assert one[key].keys() == two[key].keys()
        for name, tensor in one[key].items():
            assert torch.equal(tensor, two[key][name]), f'{key}.{name}'
    for idx, state in one['optimizer_state']['state'].items():
        assert all(torch.equal(value, two['optimizer_state']['state'][idx][name]) for name, value in state.items()), idx

@pytest.mark.parametrize('kind', ['edm', 'cd', 'ct'])
def test_two_ranks_give_the_weights_of_one_rank_accumulating_two_rounds(tmp_path, digits8, teacher, kind):
    args = dict(edm=EDM_RUN, cd=[*CD_RUN, f'--teacher={teacher}'], ct=[*CD_RUN, '--ct=True'])[kind]
    one, two = tmp_path / 'one', tmp_path / 'two'
    procs = [start_train(f'--outdir={one}', f'--data={digits8}', *args), start_torchrun(f'--outdir={two}', f'--data={digits8}', *args)]
    for proc in procs:
        code, out, err = finish(proc, timeout=300)
        assert code == 0, (out + err)[-3000:]
    a, b = final_state(one), final_state(two)
    assert_same_weights(a, b)
    if kind != 'edm':
        target_a, target_b = a['loss_state']['target'], b['loss_state']['target'] # The 'ema' target of the distillation.
        assert target_a.keys() == target_b.keys() and all(torch.equal(value, target_b[name]) for name, value in target_a.items())

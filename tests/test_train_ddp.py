"""train.py and the training loop over 2 gloo ranks under torchrun, on the CPU."""

import json
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

from _train_helpers import ROOT, SMALL_RUN, read_stats, run_dirs, subprocess_env

def torchrun(*args, timeout=600):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=subprocess_env())

def test_torchrun_trains_on_two_cpu_ranks(tmp_path, digits8):
    data = digits8
    outdir = tmp_path / 'runs'
    proc = torchrun('train.py', f'--outdir={outdir}', f'--data={data}', '--cbase=16', '--cres=1', '--batch-gpu=16', '--duration=0.001', *SMALL_RUN, '--workers=1')
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir, = run_dirs(str(outdir))
    assert os.path.basename(run_dir) == '00000-digits8-uncond-ddpmpp-edm-gpus2-batch64-fp32'
    assert sorted(os.listdir(run_dir)) == ['log.txt', 'network-snapshot-000000.pkl', 'network-snapshot-000000.safetensors', 'network-snapshot-000001.pkl',
        'network-snapshot-000001.safetensors', 'stats.jsonl', 'training-state-000001.pt', 'training_options.json']

    # Statistics are summed over both ranks: each rank sees 32 of the 64 images of a step.
    stats = read_stats(run_dir)
    assert [s['Loss/loss']['num'] for s in stats] == [1 * 64 * 64, 15 * 64 * 64]
    assert [s['Progress/kimg']['mean'] for s in stats] == pytest.approx([0.064, 1.024])
    assert 'Ranks:            2 on cpu' in proc.stdout
    assert len(re.findall(r'^tick \d+ ', proc.stdout, flags=re.M)) == 2 # Rank 0 alone prints.
    with open(os.path.join(run_dir, 'log.txt')) as f:
        assert len(re.findall(r'^tick \d+ ', f.read(), flags=re.M)) == 2

    # The state holds each rank's generators, and they differ; the snapshot's EMA was checked consistent across ranks when written.
    state = torch.load(os.path.join(run_dir, 'training-state-000001.pt'), weights_only=False)
    assert state['world_size'] == 2 and state['batch_gpu'] == 16 and state['cur_nimg'] == 1024 and len(state['rng_states']) == 2
    assert not torch.equal(state['rng_states'][0]['torch'], state['rng_states'][1]['torch'])
    with open(os.path.join(run_dir, 'network-snapshot-000001.pkl'), 'rb') as f:
        ema = pickle.load(f)['ema']
    assert all(torch.equal(p, state['ema'][name]) for name, p in ema.state_dict().items())

def test_ddp_gradient_equals_single_process_gradient(tmp_path):
    proc = torchrun(os.path.join(ROOT, 'tests', '_train_ddp_worker.py'), str(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res['rank'] == r and res['world'] == 2
        assert res['grad_rel_err'] < 1e-5 # DDP over 2 ranks x 2 rounds == one process over the global batch (up to float summation order).
        assert res['local_rel_err'] > 1e-2 # Control: without the all-reduce a rank's gradient is visibly different.
        assert res['grads_equal_ranks'] and res['params_equal_ranks'] and res['consistent'] is True
        assert res['params_moved'] > 1e-4 and res['param_err'] < 1e-5
        assert res['norm_ddp'] == pytest.approx(res['norm_single'], rel=1e-5)

"""torch_utils.distributed under torchrun (2 gloo processes), and without it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from torch_utils import distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))

def test_single_process_without_torchrun(monkeypatch, capsys):
    for var in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(var, raising=False)
    assert str(dist.init(device_type='cpu')) == 'cpu'
    assert dist.get_rank() == 0 and dist.get_world_size() == 1
    dist.print0('hello')
    assert capsys.readouterr().out == 'hello\n'
    with pytest.raises(AssertionError):
        dist.init(device_type='tpu')

def test_two_gloo_ranks_reduce_statistics(tmp_path):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
        os.path.join(HERE, '_dist_foundation_worker.py'), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res['rank'] == r and res['world'] == 2 and res['device'] == 'cpu'
        assert res['num'] == 3 and res['mean'] == pytest.approx(2 / 3) # [0] + [1, 1], summed over ranks.
        assert res['only0'] == [1, 7.0]
    assert results[1]['consistent'] == 'Linear.weight differ(s) between rank 0 and rank 1.'
    assert results[0]['consistent'] is True

def test_cpu_threads_leave_room_for_workers_ranks_and_load(monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(os, 'sched_getaffinity', lambda _pid: set(range(8)))
    try:
        for ranks, workers, load, expected in [(1, 0, 0.0, 8), (1, 1, 0.0, 4), (2, 1, 0.0, 2), (1, 0, 6.5, 1), (1, 0, 3.2, 4), (4, 3, 0.0, 1)]:
            monkeypatch.setenv('LOCAL_WORLD_SIZE', str(ranks))
            monkeypatch.setattr(os, 'getloadavg', lambda load=load: (load, load, load))
            assert dist.set_cpu_threads(workers=workers) == expected == torch.get_num_threads(), (ranks, workers, load)
        monkeypatch.setenv('OMP_NUM_THREADS', '3') # The user's choice stands.
        torch.set_num_threads(3)
        assert dist.set_cpu_threads(workers=0) == 3
    finally:
        torch.set_num_threads(threads)

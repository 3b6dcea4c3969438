"""torch_utils.misc and training_stats in a single process."""

import numpy as np
import pytest
import torch

from torch_utils import misc, training_stats

#----------------------------------------------------------------------------

def test_constant_is_cached_and_broadcast():
    a = misc.constant([1.0, 2.0], shape=[3, 2])
    assert a.shape == (3, 2) and torch.equal(a[2], torch.tensor([1.0, 2.0]))
    assert misc.constant([1.0, 2.0], shape=[3, 2]) is a
    assert misc.constant([1.0, 2.0], shape=[3, 2], dtype=torch.float64) is not a

def test_const_like_takes_dtype_and_device_of_the_reference():
    ref = torch.zeros([2], dtype=torch.float16)
    a = misc.const_like(ref, [[1.0, 2.0]])
    assert a.dtype == torch.float16 and a.device == ref.device and a.tolist() == [[1.0, 2.0]]
    assert misc.const_like(ref, [[1.0, 2.0]]) is a
    assert misc.const_like(ref, [[1.0, 2.0]]) is misc.constant([[1.0, 2.0]], dtype=torch.float16)
    b = misc.const_like(ref, 3, shape=[2, 2], dtype=torch.float64)
    assert b.dtype == torch.float64 and b.tolist() == [[3.0, 3.0], [3.0, 3.0]]

#----------------------------------------------------------------------------

def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]

def test_infinite_sampler_epochs_are_permutations():
    data = range(7)
    stream = _take(misc.InfiniteSampler(data, seed=3), 21)
    for e in range(3):
        assert sorted(stream[7 * e: 7 * e + 7]) == list(range(7))
    assert stream[:7] != stream[7:14] # Reshuffled every epoch.
    assert _take(misc.InfiniteSampler(data, shuffle=False), 9) == [0, 1, 2, 3, 4, 5, 6, 0, 1]

def test_infinite_sampler_shards_and_resumes():
    data = range(10)
    full = _take(misc.InfiniteSampler(data, seed=1), 60)
    ranks = [_take(misc.InfiniteSampler(data, rank=r, num_replicas=3, seed=1), 20) for r in range(3)]
    assert [ranks[i % 3][i // 3] for i in range(60)] == full
    # Resuming at any global position continues the same stream on every rank.
    for start in (0, 7, 13, 35):
        resumed = [_take(misc.InfiniteSampler(data, rank=r, num_replicas=3, seed=1, start_idx=start), 5) for r in range(3)]
        expected = [[full[i] for i in range(start, 60) if i % 3 == r][:5] for r in range(3)]
        assert resumed == expected

def test_infinite_sampler_deals_blocks():
    data = range(10)
    full = _take(misc.InfiniteSampler(data, seed=1), 60)
    # Rank r of 3 takes the blocks of 4 positions r, r + 3, ...: the global batch of 12 in contiguous thirds.
    ranks = [_take(misc.InfiniteSampler(data, rank=r, num_replicas=3, seed=1, block=4), 20) for r in range(3)]
    assert [ranks[(i // 4) % 3][(i // 12) * 4 + i % 4] for i in range(60)] == full
    # Resuming inside or at the start of a block continues the same stream on every rank.
    for start in (0, 5, 12, 35):
        resumed = [_take(misc.InfiniteSampler(data, rank=r, num_replicas=3, seed=1, block=4, start_idx=start), 5) for r in range(3)]
        expected = [[full[i] for i in range(start, 60) if (i // 4) % 3 == r][:5] for r in range(3)]
        assert resumed == expected

def test_infinite_sampler_bad_input():
    with pytest.raises(AssertionError):
        misc.InfiniteSampler([])
    with pytest.raises(AssertionError):
        misc.InfiniteSampler(range(3), rank=2, num_replicas=2)
    with pytest.raises(AssertionError):
        misc.InfiniteSampler(range(3), block=0)

#----------------------------------------------------------------------------

def test_copy_params_and_buffers_by_name():
    src = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    dst = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    with torch.no_grad():
        src[1].running_mean.fill_(0.25)
    misc.copy_params_and_buffers(src, dst, require_all=False)
    assert torch.equal(dst[0].weight, src[0].weight) and torch.equal(dst[1].running_mean, src[1].running_mean)
    assert dst[0].weight.requires_grad
    with pytest.raises(ValueError, match='"2.weight"'):
        misc.copy_params_and_buffers(src, dst, require_all=True)
    bad = torch.nn.Sequential(torch.nn.Linear(3, 5))
    with pytest.raises(ValueError, match=r'"0.weight" has shape \(4, 3\)'):
        misc.copy_params_and_buffers(src, bad)

def test_print_module_summary(capsys):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    out = misc.print_module_summary(net, [torch.zeros(5, 3)])
    assert out.shape == (5, 2)
    text = capsys.readouterr().out
    assert 'Total' in text and str(3 * 4 + 4 + 4 * 2 + 2) in text and '[5, 2]' in text

#----------------------------------------------------------------------------

def test_training_stats_moments():
    collector = training_stats.Collector(regex='unit/.*')
    values = np.array([1.0, 2.0, 4.0, 8.0])
    training_stats.report('unit/a', torch.tensor(values[:2]))
    training_stats.report('unit/a', values[2:])
    training_stats.report('unit/b', 5.0)
    training_stats.report('other/c', 1.0)
    collector.update()
    assert collector.names() == ['unit/a', 'unit/b']
    assert collector.num('unit/a') == 4
    assert collector.mean('unit/a') == pytest.approx(values.mean())
    assert collector.std('unit/a') == pytest.approx(values.std())
    assert collector['unit/b'] == 5.0 and collector.std('unit/b') == 0.0
    training_stats.report('unit/a', 10.0)
    collector.update()
    assert collector.num('unit/a') == 1 and collector.mean('unit/a') == 10.0
    assert collector.mean('unit/b') == 5.0 # keep_previous
    d = collector.as_dict()
    assert d['unit/a'].num == 1 and d['unit/b'].mean == 5.0
    training_stats.report('unit/a', torch.tensor([float('nan'), 3.0, float('inf')])) # Non-finite values are left out ...
    collector.update()
    assert collector.num('unit/a') == 1 and collector.mean('unit/a') == 3.0
    training_stats.report('unit/a', 6.0)
    collector.update()
    assert collector.mean('unit/a') == 6.0 # ... and spoil no later figure.

#----------------------------------------------------------------------------

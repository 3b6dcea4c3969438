"""Training statistics reported from anywhere and collected across ranks.

`report(name, value)` accumulates the count, sum and sum of squares of the
given scalars under `name`; a `Collector` periodically gathers these moments,
sums them over all ranks (one all-reduce) and exposes num, mean and std.
Every rank must report the same names (`report0` takes care of that for
values that only rank 0 computes). The moments of a tensor stay on its
device: nothing is read back to the host before `Collector.update()` (once
per tick in the training loop), so reporting from a training step costs no
host synchronisation; a `mask` selects values without a data-dependent shape.
"""

import re

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------

_num_moments    = 3                 # [num_scalars, sum_of_scalars, sum_of_squares]
_counter_dtype  = torch.float64     # Precision of the accumulated moments.
_rank           = 0                 # Rank of this process.
_sync_device    = None              # Device for the all-reduce; None means no reduction.
_counters       = dict()            # name -> device -> moments accumulated since the last update.
_cumulative     = dict()            # name -> moments accumulated over all updates.

#----------------------------------------------------------------------------

def init_multiprocessing(rank, sync_device):
    """Set this process's rank and the device for cross-rank reductions
    (None for a single process)."""
    global _rank, _sync_device
    _rank = rank
    _sync_device = sync_device

def report(name, value, mask=None):
    """Record the finite scalars in `value` (a number, array or tensor; may be empty) under
    `name`, those where `mask` (of value's shape) is true when given; non-finite ones are
    left out, so that one of them does not turn every later figure into NaN. Returns
    `value` unchanged."""
    if name not in _counters:
        _counters[name] = dict()
    elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value
    elems = elems.detach().flatten().to(_counter_dtype)
    finite = torch.isfinite(elems)
    if mask is not None:
        finite = finite & torch.as_tensor(mask, device=elems.device).flatten().to(torch.bool)
    finite = finite.to(_counter_dtype)
    elems = torch.where(finite > 0, elems, 0)
    moments = torch.stack([
        finite.sum(),
        elems.sum(),
        elems.square().sum(),
    ])
    device = moments.device
    if device not in _counters[name]:
        _counters[name][device] = torch.zeros_like(moments)
    _counters[name][device].add_(moments)
    return value

def masked_quantiles(values, mask, qs):
    """Quantiles `qs` of the values [N] where `mask` [N] is true (None = all), interpolated
    linearly like torch.quantile, in fixed shapes on the device. Returns (the quantiles as
    tensors of shape [1], a [1] mask that is false when no value is selected)."""
    values = values.flatten()
    mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.flatten().to(torch.bool)
    count = mask.sum()
    ordered = torch.where(mask, values, torch.inf).sort().values
    last = (count - 1).clamp(min=0)
    results = []
    for q in qs:
        pos = last.to(values.dtype) * q
        lo = pos.floor().to(torch.int64)
        hi = torch.minimum(lo + 1, last)
        below, above = ordered.gather(0, lo.reshape(1))[0], ordered.gather(0, hi.reshape(1))[0] # Not ordered[lo]: a 0-dim index is read to the host.
        value = torch.where(count > 0, below + (above - below) * (pos - lo.to(values.dtype)), 0)
        results.append(value.reshape(1))
    return results, (count > 0).reshape(1)

def report0(name, value, mask=None):
    """Like report(), but only rank 0's values count; other ranks register the name."""
    report(name, value if _rank == 0 else [], mask=(mask if _rank == 0 else None))
    return value

#----------------------------------------------------------------------------

class Collector:
    """Gathers the statistics reported since its last update, across ranks.

    After `update()`, `num(name)`, `mean(name)` and `std(name)` describe the
    scalars reported under `name` between the two most recent updates (or,
    with `keep_previous=True`, the last non-empty interval).
    """

    def __init__(self,
        regex           = '.*',     # Names to collect.
        keep_previous   = True,     # Keep figures of names that got no new values?
    ):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative = dict()
        self._moments = dict()
        self.update()
        self._moments.clear()

    def names(self):
        """Reported names that match the regex."""
        return sorted(name for name in _counters if self._regex.fullmatch(name))

    def update(self):
        """Collect the moments reported since the previous update, summed over ranks."""
        if not self._keep_previous:
            self._moments.clear()
        for name, cumulative in _sync(self.names()):
            if name not in self._cumulative:
                self._cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
            delta = cumulative - self._cumulative[name]
            self._cumulative[name].copy_(cumulative)
            if float(delta[0]) != 0:
                self._moments[name] = delta

    def _get_delta(self, name):
        if not self._regex.fullmatch(name):
            raise ValueError(f'"{name}" does not match this collector\'s regex "{self._regex.pattern}".')
        if name not in self._moments:
            self._moments[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        return self._moments[name]

    def num(self, name):
        """Number of scalars reported under `name` in the last interval."""
        return int(self._get_delta(name)[0])

    def mean(self, name):
        """Mean of those scalars (nan when there were none)."""
        delta = self._get_delta(name)
        if int(delta[0]) == 0:
            return float('nan')
        return float(delta[1] / delta[0])

    def std(self, name):
        """Standard deviation (population) of those scalars (nan when there were none)."""
        delta = self._get_delta(name)
        if int(delta[0]) == 0 or not np.isfinite(float(delta[1])):
            return float('nan')
        if int(delta[0]) == 1:
            return 0.0
        mean = float(delta[1] / delta[0])
        raw_var = float(delta[2] / delta[0])
        return float(np.sqrt(max(raw_var - np.square(mean), 0)))

    def as_dict(self):
        """EasyDict name -> EasyDict(num, mean, std), for names with data."""
        stats = dnnlib.EasyDict()
        for name in self.names():
            if self.num(name) > 0:
                stats[name] = dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
        return stats

    def __getitem__(self, name):
        return self.mean(name)

#----------------------------------------------------------------------------

def _sync(names):
    """Fold the per-device counters into the cumulative moments, summed over ranks.
    Returns [(name, cumulative_moments)]; every rank must pass the same names."""
    if len(names) == 0:
        return []
    deltas = []
    device = _sync_device if _sync_device is not None else torch.device('cpu')
    for name in names:
        delta = torch.zeros([_num_moments], dtype=_counter_dtype, device=device)
        for counter in _counters[name].values():
            delta.add_(counter.to(device))
            counter.zero_()
        deltas.append(delta)
    deltas = torch.stack(deltas)
    if _sync_device is not None:
        torch.distributed.all_reduce(deltas)
    deltas = deltas.cpu()
    for idx, name in enumerate(names):
        if name not in _cumulative:
            _cumulative[name] = torch.zeros([_num_moments], dtype=_counter_dtype)
        _cumulative[name].add_(deltas[idx])
    return [(name, _cumulative[name]) for name in names]

#----------------------------------------------------------------------------

"""Training statistics reported anywhere (on the value's device, no host sync) and collected across ranks by a
`Collector` in one all-reduce; every rank must report the same names."""

import re

import numpy as np
import torch

import dnnlib

#----------------------------------------------------------------------------

_num_moments    = 3                 # [num_scalars, sum_of_scalars, sum_of_squares]
_counter_dtype  = torch.float64
_rank           = 0
_sync_device    = None              # Device for the all-reduce; None = no reduction.
_counters       = dict()            # name -> device -> moments since the last update.
_cumulative     = dict()            # name -> moments over all updates.

#----------------------------------------------------------------------------

def init_multiprocessing(rank, sync_device):
    global _rank, _sync_device
    _rank, _sync_device = rank, sync_device

def report(name, value, mask=None):
    """Record the finite scalars of `value` under `name` (where `mask` is true); return `value`."""
    counters = _counters.setdefault(name, dict())
    elems = torch.as_tensor(value)
    if elems.numel() == 0:
        return value
    elems = elems.detach().flatten().to(_counter_dtype)
    finite = torch.isfinite(elems)
    if mask is not None:
        finite = finite & torch.as_tensor(mask, device=elems.device).flatten().to(torch.bool)
    elems = torch.where(finite, elems, 0)
    moments = torch.stack([finite.to(_counter_dtype).sum(), elems.sum(), elems.square().sum()])
    counters[moments.device] = counters[moments.device].add_(moments) if moments.device in counters else moments
    return value

def masked_quantiles(values, mask, qs):
    """([1]-shaped torch.quantile of values [N] where `mask` is true for each q in `qs`, [1] mask: any selected)."""
    values = values.flatten()
    mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask.flatten().to(torch.bool)
    count = mask.sum()
    ordered = torch.where(mask, values, torch.inf).sort().values
    last = (count - 1).clamp(min=0)
    def quantile(q):
        pos = last.to(values.dtype) * q
        lo = pos.floor().to(torch.int64)
        below, above = ordered.gather(0, torch.stack([lo, torch.minimum(lo + 1, last)])) # ordered[lo] would sync.
        return torch.where(count > 0, below + (above - below) * (pos - lo.to(values.dtype)), 0).reshape(1)
    return [quantile(q) for q in qs], (count > 0).reshape(1)

def report0(name, value, mask=None):
    """report() of rank 0's values; other ranks register the name."""
    report(name, value if _rank == 0 else [], mask=(mask if _rank == 0 else None))
    return value

#----------------------------------------------------------------------------

class Collector:
    """Statistics over all ranks of the names matching `regex` between the two latest `update()` calls."""

    def __init__(self, regex='.*', keep_previous=True):
        self._regex = re.compile(regex)
        self._keep_previous = keep_previous
        self._cumulative, self._moments = dict(), dict()
        self.update()
        self._moments.clear()

    def names(self):
        return sorted(name for name in _counters if self._regex.fullmatch(name))

    def update(self):
        if not self._keep_previous:
            self._moments.clear()
        for name, cumulative in _sync(self.names()):
            delta = cumulative - self._cumulative.get(name, 0)
            self._cumulative[name] = cumulative
            if float(delta[0]) != 0:
                self._moments[name] = delta

    def _get_delta(self, name):
        assert self._regex.fullmatch(name)
        return self._moments.get(name, torch.zeros([_num_moments], dtype=_counter_dtype))

    def num(self, name):
        return int(self._get_delta(name)[0])

    def mean(self, name):
        num, total, _ = self._get_delta(name).tolist()
        return total / num if num != 0 else float('nan')

    def std(self, name):
        num, total, squares = self._get_delta(name).tolist()
        if num == 0 or not np.isfinite(total):
            return float('nan')
        return 0.0 if num == 1 else float(np.sqrt(max(squares / num - np.square(total / num), 0)))

    def as_dict(self):
        """name -> EasyDict(num, mean, std), for names with data."""
        return dnnlib.EasyDict({name: dnnlib.EasyDict(num=self.num(name), mean=self.mean(name), std=self.std(name))
            for name in self.names() if self.num(name) > 0})

    def __getitem__(self, name):
        return self.mean(name)

#----------------------------------------------------------------------------

def _sync(names):
    """[(name, cumulative moments summed over ranks)] after folding in the counters (new tensors each call)."""
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
    for name, delta in zip(names, deltas.cpu()):
        _cumulative[name] = _cumulative.get(name, 0) + delta
    return [(name, _cumulative[name]) for name in names]

#----------------------------------------------------------------------------

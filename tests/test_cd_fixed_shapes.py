"""The fixed-shape distillation step against the numbers of the
implementation before it: tests/fixtures/cd_step_reference/reference.pt was
written by make_reference.py beside it at commit d46cdba, before the rewrite.
Same seeds, same edges, cases and segments, and the same losses, targets,
gains and statistics to float32 rounding; and the step reads nothing back to
the host (the CUDA check of that is benchmarks/gpu_check.py)."""

import os
import sys

import pytest
import torch

from torch_utils import training_stats

from _numerics import relative_error

REFERENCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'cd_step_reference')
sys.path.insert(0, REFERENCE_DIR)
import make_reference # pylint: disable=wrong-import-position

REFERENCE = torch.load(os.path.join(REFERENCE_DIR, 'reference.pt'), weights_only=False)
RTOL = 2e-5 # Float32 rounding, amplified by the inverse DDIM's gain (at most about 10 here).

@pytest.fixture
def fresh_stats(monkeypatch):
    """Process-wide statistics of this test only: what earlier tests reported (huge values among them)
    would otherwise sit in the cumulative moments that the collector takes differences of."""
    monkeypatch.setattr(training_stats, '_counters', dict())
    monkeypatch.setattr(training_stats, '_cumulative', dict())

@pytest.mark.parametrize('name', sorted(name for name, ref in REFERENCE.items() if 'addim_scale' not in ref['loss_kwargs']))
def test_step_reproduces_the_implementation_before_the_rewrite(name, one_thread, fresh_stats):
    # The reference's aDDIM-bridge case is left out: that bridge is gone (the teacher's hop has aDDIM instead).
    ref = REFERENCE[name]
    ours = make_reference.run_case(ref['label_dim'], ref['loss_kwargs'], train=ref['train'])
    for key in ('k', 'case', 'seg'):
        assert torch.equal(ours[key], ref[key]), key
    for key in ('loss', 'gain', 'target', 'x_ref'):
        assert relative_error(ours[key], ref[key]) < RTOL, (key, relative_error(ours[key], ref[key]))
    reported = lambda stats: sorted(stat for stat, values in stats.items() if values[0] > 0) # Names are process-wide; these got values.
    assert reported(ours['stats']) == reported(ref['stats']) and 'CD/gain_p99_general' in reported(ref['stats'])
    for stat in reported(ref['stats']):
        values = ref['stats'][stat]
        num, mean, std = ours['stats'][stat]
        assert num == values[0], stat
        for a, b in [(mean, values[1]), (std, values[2])]:
            assert (a != a) == (b != b) and (a != a or abs(a - b) <= RTOL * max(1, abs(b))), (stat, a, b)

def test_the_references_cover_every_case():
    seen = set()
    for ref in REFERENCE.values():
        seen |= set(ref['case'].unique().tolist())
    assert seen == {0, 1, 2} and any((ref['case'] == 1).sum() == 0 for ref in REFERENCE.values()) # An empty case too.

def test_masked_quantiles_match_torch_quantile():
    gen = torch.Generator().manual_seed(0)
    values = torch.rand(37, generator=gen, dtype=torch.float64) * 10
    for count in [0, 1, 2, 5, 37]:
        mask = torch.zeros(37, dtype=torch.bool)
        mask[torch.randperm(37, generator=gen)[:count]] = True
        quantiles, nonempty = training_stats.masked_quantiles(values, mask, [1, 0.95, 0.99, 0.5, 0])
        assert bool(nonempty) == (count > 0)
        if count > 0:
            expected = torch.quantile(values[mask], torch.tensor([1, 0.95, 0.99, 0.5, 0], dtype=torch.float64))
            torch.testing.assert_close(torch.cat(quantiles), expected, rtol=0, atol=1e-12)

def test_masked_report_counts_only_the_selected_finite_values():
    collector = training_stats.Collector(regex='Test/masked', keep_previous=False)
    training_stats.report('Test/masked', torch.tensor([1.0, 2.0, float('nan'), 4.0]), mask=torch.tensor([True, False, True, True]))
    collector.update()
    assert collector.num('Test/masked') == 2 and collector.mean('Test/masked') == 2.5

HOST_READS = ('__bool__', 'item', 'tolist', 'nonzero', '__int__', '__float__', 'numpy', 'cpu') # Each one is a host synchronisation on a GPU.

def test_a_distillation_step_reads_nothing_back_to_the_host(monkeypatch, one_thread):
    ref = REFERENCE['ema_vp_pseudo_huber']
    student, teacher = make_reference.build(0, 1).train(), make_reference.build(0, 2)
    loss_fn = make_reference.ConsistencyDistillLoss(**ref['loss_kwargs']).set_teacher(teacher)
    loss_fn.draw(student, ref['images']) # The grid and the target exist before the step.
    reads = []
    for method in HOST_READS:
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *args, _m=method, _o=original, **kwargs: (reads.append(_m), _o(self, *args, **kwargs))[1])
    assert bool(torch.ones([])) and reads == ['__bool__'] # The spies see a read.
    reads.clear()
    loss = loss_fn(student, ref['images'])
    (loss.sum() / len(loss)).backward()
    monkeypatch.undo()
    assert reads == []

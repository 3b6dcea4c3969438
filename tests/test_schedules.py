"""training/steps.py's learning_rate_edm2 against the reference learning rates of EDM2."""

import json
import os

import pytest

from training import steps

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'edm2_reference')

def test_learning_rate_edm2_reference_points():
    with open(os.path.join(FIXTURES, 'lr.json')) as f:
        points = json.load(f)
    assert len(points) >= 5
    for p in points:
        lr = steps.learning_rate_edm2(p['ref_lr'], p['cur_nimg'], p['batch_size'], p['ref_batches'], p['rampup_Mimg'])
        assert isinstance(lr, float)
        assert lr == pytest.approx(p['lr'], rel=1e-12, abs=1e-15), p

def test_learning_rate_edm2_switches():
    # No decay and no ramp-up: constant; decay alone: ref_lr / sqrt(steps / ref_batches) past ref_batches.
    assert steps.learning_rate_edm2(0.01, 123456, 64, ref_batches=0, rampup_Mimg=0) == 0.01
    assert steps.learning_rate_edm2(0.01, 4 * 1000 * 64, 64, ref_batches=1000, rampup_Mimg=0) == pytest.approx(0.005)
    assert steps.learning_rate_edm2(0.01, 500 * 64, 64, ref_batches=1000, rampup_Mimg=0) == 0.01
    assert steps.learning_rate_edm2(0.01, 2.5e6, 64, ref_batches=0) == pytest.approx(0.0025)

@pytest.mark.parametrize('kwargs', [dict(batch_size=0), dict(cur_nimg=-1), dict(ref_lr=-0.1), dict(rampup_Mimg=-1)])
def test_learning_rate_edm2_bad_values(kwargs):
    args = {**dict(ref_lr=0.01, cur_nimg=0, batch_size=2048), **kwargs}
    with pytest.raises(AssertionError):
        steps.learning_rate_edm2(**args)

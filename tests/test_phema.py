"""training/phema.py against the reference figures of the published EDM2 power-function EMA."""

import copy
import json
import os

import numpy as np
import pytest
import torch

from training import phema

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'edm2_reference')
with open(os.path.join(FIXTURES, 'phema.json')) as _f:
    REF = json.load(_f)

#----------------------------------------------------------------------------
# Reference figures.

def test_std_to_exp_and_back():
    for std, exp in REF['std_to_exp'].items():
        assert phema.std_to_exp(float(std)) == pytest.approx(exp, rel=1e-12)
        assert phema.exp_to_std(exp) == pytest.approx(float(std), rel=1e-12)
    for exp, std in REF['exp_to_std'].items():
        assert phema.exp_to_std(float(exp)) == pytest.approx(std, rel=1e-12)
        assert phema.std_to_exp(std) == pytest.approx(float(exp), rel=1e-10)
    stds = np.float64([[0.01, 0.05], [0.1, 0.2]])
    assert phema.std_to_exp(stds).shape == (2, 2)
    np.testing.assert_allclose(phema.exp_to_std(phema.std_to_exp(stds)), stds, rtol=1e-12)

def test_beta():
    for entry in REF['beta']:
        beta = phema.power_function_beta(std=entry['std'], t_next=entry['t_next'], t_delta=entry['t_delta'])
        assert beta == pytest.approx(entry['beta'], rel=1e-12, abs=1e-300)

def test_posthoc_coefficients():
    ref = REF['posthoc']
    expected = np.float64(ref['coefficients'])
    coefs = phema.solve_posthoc_coefficients(ref['in_ofs'], ref['in_std'], ref['out_ofs'], ref['out_std'])
    assert coefs.shape == (len(ref['in_ofs']), len(ref['out_ofs']))
    np.testing.assert_allclose(coefs, expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(coefs.sum(axis=0), np.ones(len(ref['out_ofs'])), rtol=1e-12)
    # Times in images (2048 per step) instead of steps: the same coefficients.
    scaled = phema.solve_posthoc_coefficients(np.float64(ref['in_ofs']) * 2048, ref['in_std'], np.float64(ref['out_ofs']) * 2048, ref['out_std'])
    np.testing.assert_allclose(scaled, expected, rtol=1e-6, atol=1e-12)

def test_tracked_trace():
    ref = REF['tracked']
    net = torch.nn.Linear(1, 1, bias=False)
    ema = phema.PowerFunctionEMA(net, stds=ref['stds'])
    trace = {entry['step']: entry for entry in ref['trace']}
    for step in range(1, max(trace) + 1):
        with torch.no_grad():
            net.weight.fill_(step)
        ema.update(cur_nimg=step * ref['batch_size'], batch_size=ref['batch_size'])
        if step in trace:
            assert trace[step]['cur_nimg'] == step * ref['batch_size']
            values = [ema_net.weight.item() for ema_net, _suffix in ema.get()]
            np.testing.assert_allclose(values, trace[step]['emas'], rtol=1e-6)

#----------------------------------------------------------------------------
# The maths behind the figures.

def test_profile_width_and_correlation_by_quadrature():
    # Profile p(t) = (g + 1) t^g / T^(g + 1) on [0, T]: its relative standard deviation, and the inner products.
    t = np.linspace(0, 1, 200001)
    def integrate(y):
        return np.sum((y[1:] + y[:-1]) / 2) * (t[1] - t[0])
    for std in [0.05, 0.1, 0.2]:
        g = phema.std_to_exp(std)
        p = (g + 1) * t ** g
        mean = integrate(t * p)
        assert integrate(p) == pytest.approx(1, rel=1e-6)
        assert np.sqrt(integrate((t - mean) ** 2 * p)) == pytest.approx(std, rel=1e-4)
    a_ofs, a_std, b_ofs, b_std = 0.6, 0.1, 1.0, 0.2
    ga, gb = phema.std_to_exp(a_std), phema.std_to_exp(b_std)
    pa = np.where(t <= a_ofs, (ga + 1) * (t / a_ofs) ** ga / a_ofs, 0)
    pb = (gb + 1) * (t / b_ofs) ** gb / b_ofs
    expected = integrate(pa * pb)
    assert phema.power_function_correlation(a_ofs, a_std, b_ofs, b_std) == pytest.approx(expected, rel=1e-3)
    assert phema.power_function_correlation(b_ofs, b_std, a_ofs, a_std) == pytest.approx(expected, rel=1e-3)

def test_posthoc_reproduces_a_stored_profile():
    in_ofs = [1000, 2000, 3000, 4000] * 2
    in_std = [0.05] * 4 + [0.1] * 4
    coefs = phema.solve_posthoc_coefficients(in_ofs, in_std, out_ofs=[4000, 3000], out_std=[0.1, 0.05])
    np.testing.assert_allclose(coefs[:, 0], np.eye(8)[7], atol=1e-9)
    np.testing.assert_allclose(coefs[:, 1], np.eye(8)[2], atol=1e-9)

def test_beta_matches_the_exact_average():
    # With weights w_k, the tracked EMA equals sum_k w_k p(t_k) dt for the power-function density on [0, t].
    std, steps = 0.1, 300
    g = phema.std_to_exp(std)
    ema = 0.0
    weights = np.sin(np.arange(1, steps + 1) * 0.1)
    for k in range(1, steps + 1):
        beta = phema.power_function_beta(std, t_next=k, t_delta=1)
        ema = beta * ema + (1 - beta) * weights[k - 1]
    k = np.arange(1, steps + 1)
    exact = np.sum(weights * (k ** (g + 1) - (k - 1) ** (g + 1))) / steps ** (g + 1)
    assert ema == pytest.approx(exact, rel=1e-10)

#----------------------------------------------------------------------------
# The tracker.

class NetWithBuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros([3]))
        self.register_buffer('count', torch.zeros([]))

def test_tracker_get_and_state_dict():
    net = NetWithBuffer()
    ema = phema.PowerFunctionEMA(net, stds=[0.05, 0.1])
    for step in range(1, 6):
        with torch.no_grad():
            net.weight.fill_(step)
            net.count.fill_(step)
        ema.update(cur_nimg=step * 8, batch_size=8)
    result = ema.get()
    assert [suffix for _net, suffix in result] == ['-0.050', '-0.100']
    assert all(ema_net.count.item() == 5 for ema_net, _suffix in result)
    assert result[0][0].weight[0].item() > result[1][0].weight[0].item() # The narrower profile weighs recent steps more.
    assert all(ema_net is not net for ema_net, _suffix in result)

    state = copy.deepcopy(ema.state_dict())
    assert state['stds'] == [0.05, 0.1] and len(state['emas']) == 2
    other = phema.PowerFunctionEMA(NetWithBuffer(), stds=[0.05, 0.1])
    other.load_state_dict(state)
    for a, b in zip(other.emas, ema.emas):
        assert torch.equal(a.weight, b.weight) and a.weight.abs().sum() > 0
    with pytest.raises(ValueError, match=r'stds=\[0.05, 0.1\]'):
        phema.PowerFunctionEMA(NetWithBuffer(), stds=[0.05]).load_state_dict(state)

def test_bad_values():
    with pytest.raises(ValueError, match='sigma_rel = 0.5'):
        phema.PowerFunctionEMA(NetWithBuffer(), stds=[0.05, 0.5])
    with pytest.raises(ValueError, match='sigma_rel'):
        phema.std_to_exp(0.0)
    with pytest.raises(AssertionError):
        phema.exp_to_std(-1.5)
    with pytest.raises(AssertionError):
        phema.power_function_beta(0.1, t_next=2048, t_delta=4096)
    with pytest.raises(AssertionError):
        phema.solve_posthoc_coefficients([0, 1000], 0.1, 1000, 0.05)
    with pytest.raises(ValueError, match='linearly dependent'):
        phema.solve_posthoc_coefficients([1000, 1000], 0.1, 1000, 0.05)
    # The widest profile of the family is accepted.
    assert phema.std_to_exp(phema.exp_to_std((np.sqrt(5) - 3) / 2)) == pytest.approx((np.sqrt(5) - 3) / 2, abs=1e-4)

#----------------------------------------------------------------------------

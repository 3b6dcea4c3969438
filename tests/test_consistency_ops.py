"""training/consistency_ops.py against closed forms: the Heun hop on the
Gaussian probability-flow ODE (cd-spec section 9), DDIM and its inverse,
the teacher grid and its segments, edge sampling and T annealing."""

import math

import numpy as np
import pytest
import torch

from _gaussian import denoise, flow
from training import consistency_ops as ops
from training.samplers import karras_sigmas, student_sigmas

#----------------------------------------------------------------------------
# The closed-form Gaussian of _gaussian.py with y ~ N(MU, STD^2 I).

MU = 0.3
STD = 0.5

def gauss_D(x, sigma):
    return denoise(x, MU, STD, sigma)

def gauss_flow(x, sigma_a, sigma_b):
    return flow(x, MU, STD, sigma_a, sigma_b)

def gauss_denoiser(calls=None):
    def denoise(x, sigma):
        if calls is not None:
            calls.append(torch.as_tensor(sigma).clone())
        return gauss_D(x, sigma)
    return denoise

#----------------------------------------------------------------------------
# One-step maps.

def test_heun_hop_is_second_order():
    torch.manual_seed(0)
    x = MU + 3.0 * torch.randn(64, 2, 2, 2, dtype=torch.float64)

    # Local error of one hop ~ h^3: halving h divides it by ~8.
    local = []
    for h in [0.1, 0.05, 0.025, 0.0125]:
        x_b = ops.heun_hop(gauss_denoiser(), x, torch.full([64], 1.0), torch.full([64], 1.0 - h), dtype=torch.float64)
        local.append(float((x_b - gauss_flow(x, 1.0, 1.0 - h)).abs().max()))
    ratios = np.array(local[:-1]) / np.array(local[1:])
    assert np.all((ratios > 7.0) & (ratios < 9.0)), ratios

    # Global error over a fixed interval ~ h^2: doubling the hops divides it by ~4.
    glob = []
    for n in [8, 16, 32, 64]:
        grid = np.linspace(3.0, 0.3, n + 1)
        x_b = x
        for a, b in zip(grid[:-1], grid[1:]):
            x_b = ops.heun_hop(gauss_denoiser(), x_b, a, b, dtype=torch.float64)
        glob.append(float((x_b - gauss_flow(x, 3.0, 0.3)).abs().max()))
    ratios = np.array(glob[:-1]) / np.array(glob[1:])
    assert np.all((ratios > 3.5) & (ratios < 4.5)), ratios

def test_heun_hop_matches_formula_and_handles_sigma_zero():
    torch.manual_seed(1)
    x = torch.randn(6, 1, 3, 3, dtype=torch.float64) * 4
    sigma_a = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.3, 0.1], dtype=torch.float64)
    sigma_b = torch.tensor([3.0, 0.0, 0.7, 0.0, 0.2, 0.05], dtype=torch.float64)
    calls = []
    x_b = ops.heun_hop(gauss_denoiser(calls), x, sigma_a, sigma_b, dtype=torch.float64)

    # Scalar-factor form of the Heun step for the linear Gaussian denoiser.
    sa, sb = sigma_a.reshape(-1, 1, 1, 1), sigma_b.reshape(-1, 1, 1, 1)
    k1_gain = sa / (STD ** 2 + sa ** 2)
    e = 1 + (sb - sa) * k1_gain
    heun = 1 + (sb - sa) / 2 * (k1_gain + e * sb / (STD ** 2 + sb ** 2))
    expected = torch.where(sb > 0, MU + (x - MU) * heun, gauss_D(x, sigma_a))
    torch.testing.assert_close(x_b, expected, rtol=0, atol=1e-12)

    # Two evaluations of the whole batch (fixed shapes): at sigma_a, then at sigma_b where it is
    # positive and at sigma_a (result discarded) where it is 0; never at sigma = 0.
    assert len(calls) == 2
    torch.testing.assert_close(calls[0], sigma_a)
    torch.testing.assert_close(calls[1], torch.where(sigma_b > 0, sigma_b, sigma_a))
    assert all(bool((c > 0).all()) for c in calls)

def test_ddim_and_inverse_ddim():
    torch.manual_seed(2)
    x_t = torch.randn(5, 3, 2, 2, dtype=torch.float64) * 5
    sigma_t = torch.tensor([5.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    sigma_ref = torch.tensor([4.0, 0.5, 0.0, 0.499, 0.05], dtype=torch.float64)

    # DDIM of the exact denoiser over an infinitesimal hop is the flow; DDIM of the
    # x-prediction (Phi - r x) / (1 - r) lands exactly on Phi.
    x_ref = gauss_flow(x_t, sigma_t, sigma_ref)
    x_hat, gain = ops.inverse_ddim(x_ref, x_t, sigma_t, sigma_ref, dtype=torch.float64)
    r = (sigma_ref / sigma_t).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(x_hat, (x_ref - r * x_t) / (1 - r), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gain, 1 / (1 - sigma_ref / sigma_t))
    torch.testing.assert_close(ops.ddim_step(x_hat, x_t, sigma_t, sigma_ref, dtype=torch.float64), x_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x_hat[2], x_ref[2]) # sigma_ref = 0: the target is the reference itself.
    assert float(gain[2]) == 1.0

    # The ideal x-prediction of the Gaussian at sigma_ref = 0 is the ODE endpoint.
    torch.testing.assert_close(x_hat[2], gauss_flow(x_t[2:3], 1.0, 0.0)[0])

class _Bf16Net:
    """A network whose output is bfloat16 under autocast, and the same bfloat16-rounded values (as float32) without."""
    def __call__(self, x, sigma):
        with torch.autocast('cpu', enabled=False):
            out = gauss_D(x.to(torch.float32), sigma.to(torch.float32)).to(torch.bfloat16)
        return out if torch.is_autocast_enabled('cpu') else out.to(torch.float32)

def test_heun_and_inverse_ddim_stay_float32_under_autocast():
    torch.manual_seed(3)
    x = (torch.randn(8, 2, 4, 4) * 2).to(torch.bfloat16)
    sigma_a = torch.linspace(2.0, 0.5, 8)
    sigma_b = sigma_a * 0.8
    sigma_b[0] = 0
    plain = ops.heun_hop(_Bf16Net(), x, sigma_a, sigma_b)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = ops.heun_hop(_Bf16Net(), x, sigma_a, sigma_b)
        target, gain = ops.inverse_ddim(mixed.to(torch.bfloat16), x, sigma_a, sigma_b)
        step = ops.ddim_step(target, x, sigma_a, sigma_b)
    assert plain.dtype == mixed.dtype == target.dtype == gain.dtype == step.dtype == torch.float32
    torch.testing.assert_close(mixed, plain, rtol=0, atol=0)
    # float32 arithmetic: the round trip through inverse DDIM and DDIM is exact to float32 rounding
    # (bfloat16 arithmetic would be off by ~1e-2 of the magnitude).
    ref = mixed.to(torch.bfloat16).to(torch.float32)
    torch.testing.assert_close(step, ref, rtol=1e-5, atol=1e-5)

#----------------------------------------------------------------------------
# Grids and segments.

def _layouts():
    return [
        ('karras', student_sigmas(8, 'karras')),
        ('karras_open', student_sigmas(8, 'karras_open')),
        ('explicit', student_sigmas(4, 'explicit', interior=[10.0, 1.0, 0.1])),
    ]

@pytest.mark.parametrize('name,student', _layouts())
@pytest.mark.parametrize('T', [16, 64, 127, 1280])
def test_teacher_grid_and_segments(name, student, T):
    teacher = ops.teacher_sigmas(T, student)
    values = teacher.numpy()
    stud = student.numpy()
    S = len(stud) - 1

    # At least T edges, strictly descending from sigma_max to sigma_min, then 0.
    assert len(values) - 1 >= T
    assert values[-1] == 0 and np.all(np.diff(values) < 0)
    assert values[0] == pytest.approx(80, rel=1e-12) and values[-2] == pytest.approx(0.002, rel=1e-12)

    # Every node is a node of some Karras grid with the same ends.
    N = round((80 ** (1 / 7) - 0.002 ** (1 / 7)) / (80 ** (1 / 7) - values[1] ** (1 / 7))) + 1
    karras = karras_sigmas(N).numpy()
    assert all(np.min(np.abs(karras - v) / v) < 1e-9 for v in values[:-1])

    # No node but the first and the last positive one lies on an interior student sigma.
    interior = stud[1:-1]
    for v in values[1:-2]:
        assert np.all(np.abs(v - interior) > 1e-5 * interior), (v, interior)

    # Each edge lies in exactly one segment (its upper sigma in (s_{j+1}, s_j], up to the
    # tolerance for the kept end nodes), and no segment is empty.
    seg = ops.segment_edges(teacher, student).numpy()
    for k, upper in enumerate(values[:-1]):
        owners = [j for j in range(S) if stud[j + 1] * (1 + 1e-5) < upper <= stud[j] * (1 + 1e-5)]
        assert owners == [seg[k]], (k, upper, owners)
    assert set(seg.tolist()) == set(range(S))

    # Draw tables: hop end, reference sigma and case follow the spec from scratch.
    grid = ops.TeacherGrid(T, student)
    for k in range(len(values) - 1):
        sigma_b = stud[seg[k] + 1]
        lower = values[k + 1]
        if lower == 0:
            case, sigma_s, sigma_ref = ops.TERMINAL, 0.0, 0.0
        elif lower <= sigma_b * (1 + 1e-5):
            case, sigma_s, sigma_ref = ops.BOUNDARY, sigma_b, sigma_b
        else:
            case, sigma_s, sigma_ref = ops.GENERAL, lower, sigma_b
        assert int(grid.case[k]) == case
        assert float(grid.sigma_t[k]) == values[k]
        assert float(grid.sigma_s[k]) == pytest.approx(sigma_s, rel=1e-12, abs=0)
        assert float(grid.sigma_ref[k]) == pytest.approx(sigma_ref, rel=1e-12, abs=0)
        assert float(grid.gain[k]) == pytest.approx(1 / (1 - sigma_ref / values[k]), rel=1e-12)
    assert float(grid.sigma_ref.max() / grid.sigma_t[grid.sigma_ref.argmax()]) < 1

def test_teacher_grid_removes_student_sigmas():
    # With S = 8 Karras student nodes and a 64-node Karras teacher grid, every 9th
    # teacher node coincides with a student sigma; those are dropped and the grid grows.
    student = student_sigmas(8, 'karras')
    plain = karras_sigmas(64).numpy()
    interior = student.numpy()[1:-1]
    hits = [v for v in plain[1:-1] if np.any(np.abs(v - interior) <= 1e-5 * interior)]
    assert len(hits) == 6
    teacher = ops.teacher_sigmas(64, student).numpy()
    assert len(teacher) - 1 >= 64
    assert not any(np.any(np.abs(v - interior) <= 1e-5 * interior) for v in teacher[1:-2])

def test_teacher_grid_uses_the_smallest_sufficient_node_count():
    # A Karras grid of N nodes meets the 8 Karras student nodes exactly when 7 divides N - 1;
    # otherwise nothing is removed. So the smallest N with >= T edges is T or T + 1.
    student = student_sigmas(8, 'karras')
    for T in range(8, 200):
        edges = len(ops.teacher_sigmas(T, student)) - 1
        assert edges == (T + 1 if (T - 1) % 7 == 0 else T), T

def test_teacher_grid_drops_rounding_duplicates():
    student = student_sigmas(2, 'karras_open')
    round_sigma = lambda s: torch.round(torch.as_tensor(s) * 10) / 10 + 0.002 * (torch.as_tensor(s) < 0.05)
    teacher = ops.teacher_sigmas(40, student, round_sigma=round_sigma, sigma_min=0.002)
    values = teacher.numpy()
    assert len(values) - 1 >= 40
    assert np.all(np.diff(values) < 0)
    assert np.allclose(values[:-1], np.round(values[:-1] * 10) / 10 + 0.002 * (values[:-1] < 0.05))

def test_impossible_segmentation_is_refused():
    student = student_sigmas(8, 'karras')
    with pytest.raises(ValueError, match=r'S=8, T=4 .*segment'):
        ops.TeacherGrid(4, student)
    # Two interior student sigmas between the same pair of teacher nodes leave a segment empty.
    close = student_sigmas(3, 'explicit', interior=[10.0, 9.99])
    with pytest.raises(ValueError, match=r'S=3, T=16 .*segment\(s\) \[1\]'):
        ops.TeacherGrid(16, close)
    with pytest.raises(AssertionError):
        ops.teacher_sigmas(0, student)

def test_grid_cache_per_T():
    student = student_sigmas(4, 'karras')
    cache = ops.TeacherGridCache(capacity=2, student=student)
    a = cache.get(32)
    assert cache.get(32) is a
    b = cache.get(33)
    assert b is not a and b.num_edges >= 33
    cache.get(34)
    assert cache.get(34) is not a and cache.get(32) is not a # 32 was evicted, rebuilt.
    torch.testing.assert_close(cache.get(32).sigmas, a.sigmas, rtol=0, atol=0)

#----------------------------------------------------------------------------
# Edge sampling.

def _expected_probs(upper, seg, S, mode, anchor, terminal_prob):
    """Sampling probabilities of cd-spec section 5, computed from scratch in numpy."""
    rho, P_mean, P_std = 7, -1.2, 1.2
    if mode == 'uniform':
        counts = np.bincount(seg, minlength=S)
        w = np.array([1 / (S * counts[j]) for j in seg])
    elif mode == 'vp':
        w = upper ** (1 - 1 / rho) / (1 + upper ** 2)
    else:
        w = upper ** (-1 / rho) * np.exp(-(np.log(upper) - P_mean) ** 2 / (2 * P_std ** 2))
    if anchor:
        p_term = 1 / len(upper) if terminal_prob is None else terminal_prob
        return np.append(w[:-1] / w[:-1].sum() * (1 - p_term), p_term)
    return w / w.sum()

@pytest.mark.parametrize('mode,anchor,terminal_prob', [
    ('uniform', False, None), ('vp', True, None), ('vp', False, None), ('edm', True, 0.05), ('edm', False, None), ('uniform', True, 0.2)])
def test_edge_sampling_frequencies(mode, anchor, terminal_prob):
    # Statistical test: with M draws every edge frequency must lie within 5 binomial standard
    # errors of its probability (false alarm rate below 1e-4 over all edges); fixed seed.
    student = student_sigmas(4, 'karras_open')
    grid = ops.TeacherGrid(48, student, sampling_mode=mode, terminal_anchor=anchor, terminal_prob=terminal_prob)
    upper = grid.sigma_t.numpy()
    expected = _expected_probs(upper, grid.seg.numpy(), 4, mode, anchor, terminal_prob)
    np.testing.assert_allclose(grid.probs.numpy(), expected, rtol=1e-12, atol=0)
    M = 400_000
    gen = torch.Generator().manual_seed(123)
    counts = np.bincount(grid.sample(M, generator=gen).numpy(), minlength=len(upper))
    freq = counts / M
    stderr = np.sqrt(expected * (1 - expected) / M)
    assert np.all(np.abs(freq - expected) <= 5 * stderr + 1 / M), np.max(np.abs(freq - expected) / stderr)
    if anchor:
        p_term = 1 / len(upper) if terminal_prob is None else terminal_prob
        assert abs(freq[-1] - p_term) <= 5 * math.sqrt(p_term * (1 - p_term) / M)
    # The test has power: the frequencies are far from the other modes' densities.
    for other in {'uniform', 'vp', 'edm'} - {mode}:
        alt = _expected_probs(upper, grid.seg.numpy(), 4, other, anchor, terminal_prob)
        assert np.max(np.abs(freq - alt) / np.sqrt(alt * (1 - alt) / M)) > 20

def test_edge_probs_rejects_bad_input():
    for p in [0, 1, 1.5, -0.1]:
        with pytest.raises(AssertionError):
            ops.edge_probs(torch.tensor([2.0, 1.0]), torch.tensor([0, 0]), 1, terminal_prob=p)
    with pytest.raises(AssertionError):
        ops.edge_probs(torch.tensor([2.0, 1.0]), torch.tensor([0, 0]), 1, mode='lognormal')

#----------------------------------------------------------------------------
# Annealing and student grids.

@pytest.mark.parametrize('mode', ['geometric', 'linear'])
def test_anneal_T(mode):
    kimg = 500
    nimgs = np.linspace(0, 2 * kimg * 1000, 4001)
    Ts = [ops.anneal_T(n, 64, 1280, kimg, mode) for n in nimgs]
    assert Ts[0] == 64 and ops.anneal_T(kimg * 1000, 64, 1280, kimg, mode) == 1280 and Ts[-1] == 1280
    assert all(b >= a for a, b in zip(Ts[:-1], Ts[1:]))
    assert len(set(Ts)) > 500
    mid = ops.anneal_T(kimg * 500, 64, 1280, kimg, mode)
    assert mid == (round(math.sqrt(64 * 1280)) if mode == 'geometric' else 672)
    assert ops.anneal_T(123, 64, 1280, 0, mode) == 1280
    with pytest.raises(AssertionError):
        ops.anneal_T(0, 64, 1280, kimg, 'cosine')

def test_build_student_sigmas():
    torch.testing.assert_close(ops.build_student_sigmas(8, 'karras'), student_sigmas(8, 'karras'))
    torch.testing.assert_close(ops.build_student_sigmas(8, 'karras_open'), student_sigmas(8, 'karras_open'))
    grid = ops.build_student_sigmas(3, '5, 0.5')
    assert grid.tolist() == [80.0, 5.0, 0.5, 0.0]
    assert ops.build_student_sigmas(3, [5, 0.5]).tolist() == [80.0, 5.0, 0.5, 0.0]
    with pytest.raises(ValueError, match='student_sigmas=fast is neither'):
        ops.build_student_sigmas(3, 'fast')
    with pytest.raises(ValueError, match='S - 1'):
        ops.build_student_sigmas(3, [5.0])

#----------------------------------------------------------------------------

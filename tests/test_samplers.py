"""training/samplers.py against the closed-form Gaussian of cd-spec section 9:
grids, convergence orders, NFE counts, the exact student, churn, per-seed noise."""

import numpy as np
import pytest
import torch

from training import samplers
from _gaussian import GaussianNet, flow

MU, S = 0.1, 0.5

def latents(n=8, seed=0, shape=(1, 4, 4)):
    return torch.randn([n, *shape], dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

def exact_endpoint(z, sigma_max=80):
    return flow(z * sigma_max, MU, S, sigma_max, 0)

#----------------------------------------------------------------------------
# Grids.

def test_karras_sigmas_follow_the_formula():
    N, smin, smax, rho = 6, 0.01, 20.0, 5.0
    i = np.arange(N)
    expected = (smax ** (1 / rho) + i / (N - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    sigmas = samplers.karras_sigmas(N, sigma_min=smin, sigma_max=smax, rho=rho)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (N,)
    np.testing.assert_allclose(sigmas.numpy(), expected, rtol=1e-14)
    assert sigmas[0].item() == pytest.approx(smax, rel=1e-14) and sigmas[-1].item() == pytest.approx(smin, rel=1e-14)
    assert samplers.karras_sigmas(1).tolist() == [80.0]
    default = samplers.karras_sigmas(18)
    assert default[0].item() == pytest.approx(80) and default[-1].item() == pytest.approx(0.002)

def test_karras_sigmas_pass_through_round_sigma():
    seen = []
    def round_sigma(sigma):
        seen.append(sigma.dtype)
        return (sigma * 10).round() / 10
    sigmas = samplers.karras_sigmas(4, sigma_min=0.5, sigma_max=10, round_sigma=round_sigma)
    assert seen == [torch.float64] and sigmas.dtype == torch.float64
    assert torch.equal(sigmas, (samplers.karras_sigmas(4, sigma_min=0.5, sigma_max=10) * 10).round() / 10)

@pytest.mark.parametrize('kwargs, match', [
    (dict(num_nodes=0), None),
    (dict(num_nodes=4, sigma_min=1, sigma_max=1), 'sigma_min=1, sigma_max=1'),
    (dict(num_nodes=4, sigma_min=0), 'sigma_min=0'),
    (dict(num_nodes=4, rho=0), None),
])
def test_karras_sigmas_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError if match else AssertionError, match=match):
        samplers.karras_sigmas(**kwargs)

def test_student_sigma_layouts():
    k = samplers.karras_sigmas
    karras = samplers.student_sigmas(4)
    assert karras.dtype == torch.float64
    assert torch.equal(karras, torch.cat([k(4), torch.zeros(1, dtype=torch.float64)]))
    assert karras[-2].item() == pytest.approx(0.002) # Last segment (sigma_min, 0]: the terminal edge only.
    karras_open = samplers.student_sigmas(4, layout='karras_open', sigma_min=0.01, sigma_max=40, rho=3)
    assert torch.equal(karras_open, torch.cat([k(5, sigma_min=0.01, sigma_max=40, rho=3)[:4], torch.zeros(1, dtype=torch.float64)]))
    assert karras_open[-2].item() > 0.01 # The last segment has real width.
    assert samplers.student_sigmas(1).tolist() == [80.0, 0.0]
    assert samplers.student_sigmas(1, layout='karras_open').tolist() == [80.0, 0.0]
    explicit = samplers.student_sigmas(3, layout='explicit', interior=[5.0, 0.5])
    assert explicit.tolist() == [80.0, 5.0, 0.5, 0.0]
    rounded = samplers.student_sigmas(3, layout='explicit', interior=[5.04, 0.46], round_sigma=lambda s: (s * 10).round() / 10)
    assert rounded.tolist() == [80.0, 5.0, 0.5, 0.0]

@pytest.mark.parametrize('kwargs, match', [
    (dict(S=0), None),
    (dict(S=3, layout='uniform'), None),
    (dict(S=3, layout='explicit'), None),
    (dict(S=3, interior=[5.0, 0.5]), None),
    (dict(S=3, layout='explicit', interior=[5.0]), '1 interior sigmas were given for S=3'),
    (dict(S=3, layout='explicit', interior=[0.5, 5.0]), 'descend strictly'),
    (dict(S=3, layout='explicit', interior=[90.0, 5.0]), 'descend strictly'),
    (dict(S=2, layout='explicit', interior=[0.0]), 'descend strictly'),
    (dict(S=3, round_sigma=lambda s: torch.ones_like(s)), 'descend strictly'),
])
def test_student_sigmas_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError if match else AssertionError, match=match):
        samplers.student_sigmas(**kwargs)

@pytest.mark.parametrize('sigmas, match', [
    ([80.0], 'S \\+ 1 >= 2'),
    ([80.0, 1.0], 'descend strictly to 0'),
    ([80.0, -1.0, 0.0], 'descend strictly to 0'),
    ([float('inf'), 1.0, 0.0], 'descend strictly to 0'),
    ([1.0, 2.0, 0.0], 'descend strictly'),
])
def test_student_sampler_rejects_bad_grids(sigmas, match):
    with pytest.raises(ValueError, match=match):
        samplers.student_sampler(GaussianNet(), latents(), sigmas=sigmas)
    with pytest.raises(AssertionError):
        samplers.student_sampler(GaussianNet(), latents())

#----------------------------------------------------------------------------
# Convergence against the exact PF-ODE endpoint.

@pytest.mark.parametrize('sampler, order', [(samplers.edm_sampler, 2), (samplers.euler_sampler, 1)])
def test_teacher_sampler_convergence_order(sampler, order):
    z = latents(16)
    errors = [(sampler(GaussianNet(), z, num_steps=n) - exact_endpoint(z)).abs().max().item() for n in (32, 64, 128)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    target = 2 ** order # Heun: error / 4 per doubling; Euler: error / 2.
    assert all(0.85 * target < r < 1.2 * target for r in ratios), (errors, ratios)

@pytest.mark.parametrize('num_steps', [1, 2, 5, 18])
def test_nfe_counts(num_steps):
    z = latents(2)
    for sampler, nfe in ((samplers.edm_sampler, 2 * num_steps - 1), (samplers.euler_sampler, num_steps)):
        for churn in (0, 10):
            net = GaussianNet()
            sampler(net, z, num_steps=num_steps, S_churn=churn)
            assert net.num_calls == nfe, (sampler.__name__, churn)
    for S in (1, 2, 4):
        sigmas = samplers.student_sigmas(S)
        net = GaussianNet(mode='student', student_sigmas=sigmas.tolist())
        samplers.student_sampler(net, z, sigmas=sigmas)
        assert net.num_calls == S
        assert net.sigmas_seen == sigmas[:-1].tolist() # Never evaluated at sigma = 0.

def test_teacher_samplers_use_the_karras_grid_and_skip_the_last_correction():
    net = GaussianNet()
    samplers.edm_sampler(net, latents(1), num_steps=4)
    t = samplers.karras_sigmas(4).tolist()
    assert net.sigmas_seen == pytest.approx([t[0], t[1], t[1], t[2], t[2], t[3], t[3]], rel=1e-15)
    net = GaussianNet()
    samplers.euler_sampler(net, latents(1), num_steps=4)
    assert net.sigmas_seen == pytest.approx(t, rel=1e-15)

def test_noise_levels_are_clamped_to_the_network_range():
    z = latents(4)
    net = GaussianNet(sigma_min=0.05, sigma_max=10)
    out = samplers.edm_sampler(net, z, num_steps=256)
    assert net.sigmas_seen[0] == pytest.approx(10, rel=1e-14) and min(net.sigmas_seen) == pytest.approx(0.05)
    # Latents scaled by the clamped sigma_max; the exact flow to sigma_min, then the final denoising step.
    reference = GaussianNet()(flow(z * 10, MU, S, 10, 0.05), torch.tensor(0.05, dtype=torch.float64))
    torch.testing.assert_close(out, reference, rtol=0, atol=2e-4)

@pytest.mark.parametrize('layout, S', [('karras', 1), ('karras', 2), ('karras', 4), ('karras_open', 3), ('explicit', 3)])
def test_ideal_student_lands_on_the_exact_endpoint(layout, S):
    z = latents(8)
    sigmas = samplers.student_sigmas(S, layout=layout, interior=[3.0, 0.2] if layout == 'explicit' else None)
    net = GaussianNet(mode='student', student_sigmas=sigmas.tolist())
    out = samplers.student_sampler(net, z, sigmas=sigmas)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, exact_endpoint(z), rtol=0, atol=1e-12)

def test_student_with_the_map_to_zero():
    # The exact PF-ODE map to 0 as the prediction is exact in one step; with
    # more steps the DDIM re-noising leaves the trajectory, by a closed-form amount.
    z = latents(8)
    torch.testing.assert_close(samplers.student_sampler(GaussianNet(mode='flow_to_zero'), z, sigmas=[80.0, 0.0]), exact_endpoint(z), rtol=0, atol=1e-12)
    sigmas = [80.0, 2.0, 0.1, 0.0]
    out = samplers.student_sampler(GaussianNet(mode='flow_to_zero'), z, sigmas=sigmas)
    a = z.numpy() * 80 - MU # x - mu, carried through the steps by hand.
    for j in range(3):
        c = S / np.sqrt(S ** 2 + sigmas[j] ** 2)
        a = c * a + sigmas[j + 1] / sigmas[j] * (1 - c) * a
    np.testing.assert_allclose(out.numpy(), MU + a, rtol=0, atol=1e-12)
    assert (out - exact_endpoint(z)).abs().max() > 1e-3

def test_stochastic_student():
    z, noise = latents(4, seed=1), latents(4, seed=2)
    calls = []
    def randn_like(x):
        calls.append(x.shape)
        return noise.clone()
    sigmas = [80.0, 1.5, 0.0]
    out = samplers.student_sampler(GaussianNet(mode='flow_to_zero'), z, sigmas=sigmas, randn_like=randn_like, stochastic=True)
    x1 = exact_endpoint(z) + 1.5 * noise
    torch.testing.assert_close(out, flow(x1, MU, S, 1.5, 0), rtol=0, atol=1e-12)
    assert len(calls) == 1 # No noise at the final step to sigma = 0.
    one_step = samplers.student_sampler(GaussianNet(mode='flow_to_zero'), z, sigmas=[80.0, 0.0], randn_like=randn_like, stochastic=True)
    torch.testing.assert_close(one_step, exact_endpoint(z), rtol=0, atol=1e-12)

#----------------------------------------------------------------------------
# Stochastic churn (EDM Algorithm 2).

def test_churn_raises_noise_levels_inside_the_window():
    num_steps, S_min, S_max = 8, 0.05, 5.0
    t = samplers.karras_sigmas(num_steps).tolist()
    for churn, gamma in ((1000.0, np.sqrt(2) - 1), (1.6, 0.2)): # gamma = min(S_churn / num_steps, sqrt(2) - 1).
        net = GaussianNet()
        samplers.edm_sampler(net, latents(2), num_steps=num_steps, S_churn=churn, S_min=S_min, S_max=S_max)
        first_calls = net.sigmas_seen[0::2] # Each step starts with a call at t_hat.
        expected = [ti * (1 + gamma) if S_min <= ti <= S_max else ti for ti in t]
        assert first_calls == pytest.approx(expected, rel=1e-12)
        assert any(S_min <= ti <= S_max for ti in t) and any(not S_min <= ti <= S_max for ti in t)

def test_churn_noise_amount():
    # With zero churn noise the step starts from x_cur at t_hat; with S_noise=0 likewise.
    z = latents(2)
    kwargs = dict(num_steps=3, S_churn=0.6)
    zero = samplers.euler_sampler(GaussianNet(), z, randn_like=torch.zeros_like, **kwargs)
    silent = samplers.euler_sampler(GaussianNet(), z, randn_like=torch.ones_like, S_noise=0, **kwargs)
    torch.testing.assert_close(zero, silent, rtol=0, atol=0)
    # One Euler step to 0 from t_hat = 1.2 * 80 with noise sqrt(t_hat^2 - 80^2) * ones: the prediction there.
    out = samplers.euler_sampler(GaussianNet(), z, randn_like=torch.ones_like, num_steps=1, S_churn=0.2)
    t_hat = 80 * 1.2
    x_hat = z * 80 + np.sqrt(t_hat ** 2 - 80 ** 2)
    torch.testing.assert_close(out, MU + S ** 2 / (S ** 2 + t_hat ** 2) * (x_hat - MU), rtol=1e-12, atol=1e-12)

def test_stochastic_samples_have_the_data_distribution():
    # 32,000 values; churn adds a discretization bias of about 1% at 128 steps.
    out = samplers.edm_sampler(GaussianNet(), latents(2000, seed=3), num_steps=128, S_churn=40,
        randn_like=samplers.StackedRandomGenerator('cpu', range(2000)).randn_like)
    assert abs(out.mean().item() - MU) < 0.01
    assert abs(out.std().item() / S - 1) < 0.03

#----------------------------------------------------------------------------
# Per-seed random numbers.

def test_stacked_random_generator_is_per_seed():
    seeds = [7, 3, 2 ** 32 + 5, 11]
    rnd = samplers.StackedRandomGenerator('cpu', seeds)
    x = rnd.randn([4, 2, 3, 3])
    labels = rnd.randint(10, size=[4])
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed % 2 ** 32)
        assert torch.equal(x[i], torch.randn([2, 3, 3], generator=gen))
        assert labels[i] == torch.randint(10, size=[], generator=gen)
    split = [samplers.StackedRandomGenerator('cpu', part) for part in ([7, 3], [2 ** 32 + 5], [11])]
    assert torch.equal(torch.cat([r.randn([len(r.generators), 2, 3, 3]) for r in split]), x)
    noise = rnd.randn_like(torch.zeros([4, 1, 2, 2], dtype=torch.float64))
    assert noise.dtype == torch.float64 and noise.shape == (4, 1, 2, 2)
    with pytest.raises(AssertionError):
        rnd.randn([3, 2])

"""The adjusted DDIM step (training/samplers.py) in the student sampler and in the
distillation loss's bridge: it reduces to DDIM with zero posterior variance,
and on the Gaussian of cd-spec section 9 it lands closer to the exact ODE
step than DDIM for a range of step sizes."""

import numpy as np
import pytest
import torch

from training import consistency_ops as ops
from training import samplers
from training.gmm import GaussianMixture
from training.loss_cd import ConsistencyDistillLoss

pytestmark = pytest.mark.usefixtures('one_thread')

MU, STD = 0.2, 0.5

def gauss_D(x, sigma):
    return MU + STD ** 2 / (STD ** 2 + sigma ** 2) * (x - MU)

def gauss_flow(x, sigma_a, sigma_b):
    return MU + (x - MU) * ((STD ** 2 + sigma_b ** 2) / (STD ** 2 + sigma_a ** 2)) ** 0.5

def typical(n, dim, sigma, seed):
    """Noisy Gaussian samples at sigma whose per-sample mean square deviation from MU is exactly STD^2 + sigma^2."""
    u = torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    u = u / u.square().mean(dim=1, keepdim=True).sqrt()
    return MU + np.sqrt(STD ** 2 + sigma ** 2) * u

#----------------------------------------------------------------------------

def test_addim_reduces_to_ddim():
    torch.manual_seed(0)
    x_a = torch.randn(6, 3, 4, 4, dtype=torch.float64) * 3
    x_hat = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    sigma_a = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.2, 0.1], dtype=torch.float64)
    sigma_b = sigma_a * torch.tensor([0.9, 0.5, 0.1, 0.3, 0.0, 0.7], dtype=torch.float64)
    ddim = ops.ddim_step(x_hat, x_a, sigma_a, sigma_b, dtype=torch.float64)

    # Zero posterior variance, scalar or per sample: exactly DDIM.
    for x_var in [0.0, torch.zeros(6, dtype=torch.float64)]:
        torch.testing.assert_close(samplers.addim_step(x_hat, x_a, sigma_a, sigma_b, x_var), ddim, rtol=0, atol=1e-14)

    # A vanishing step: (1 - sigma_b / sigma_a)^2 -> 0, so the adjustment vanishes quadratically.
    gaps = [1e-2, 1e-3, 1e-4]
    diffs = []
    for gap in gaps:
        sb = sigma_a * (1 - gap)
        diffs.append(float((samplers.addim_step(x_hat, x_a, sigma_a, sb, 0.05) - ops.ddim_step(x_hat, x_a, sigma_a, sb, dtype=torch.float64)).abs().max()))
    assert diffs[0] / diffs[1] > 50 and diffs[1] / diffs[2] > 50, diffs

    # Positive variance: only the norm of the implied noise changes, never its direction (steps to a positive level).
    out = samplers.addim_step(x_hat, x_a, sigma_a, sigma_b, 0.05)
    keep = sigma_b > 0
    n_ddim, n_addim = (ddim - x_hat)[keep].flatten(1), (out - x_hat)[keep].flatten(1)
    cos = (n_ddim * n_addim).sum(dim=1) / (n_ddim.norm(dim=1) * n_addim.norm(dim=1))
    torch.testing.assert_close(cos, torch.ones(5, dtype=torch.float64))
    assert bool((n_addim.norm(dim=1) > n_ddim.norm(dim=1)).all())

def test_addim_variance_formula():
    sigma = torch.tensor([0.01, 0.5, 1.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(samplers.addim_variance(sigma), 0.1 / (2 + 1 / sigma ** 2))   # The paper's 0.1 / (2 + SNR).
    torch.testing.assert_close(samplers.addim_variance(sigma, scale=1, prior=STD ** 2), STD ** 2 * sigma ** 2 / (STD ** 2 + sigma ** 2))

def _step_errors(sigma_a, sigma_b, scale, prior):
    """RMS distance of the DDIM and aDDIM steps of the exact denoiser to the exact ODE step, on
    typical samples (d = 64) and on random ones (d = 4096)."""
    out = []
    for x_a in [typical(4, 64, sigma_a, seed=1), MU + np.sqrt(STD ** 2 + sigma_a ** 2) * torch.randn(64, 4096, dtype=torch.float64, generator=torch.Generator().manual_seed(2))]:
        x_hat = gauss_D(x_a, sigma_a)
        exact = gauss_flow(x_a, sigma_a, sigma_b)
        err_ddim = float((ops.ddim_step(x_hat, x_a, sigma_a, sigma_b, dtype=torch.float64) - exact).square().mean().sqrt())
        x_var = samplers.addim_variance(sigma_a, scale=scale, prior=prior)
        err_addim = float((samplers.addim_step(x_hat, x_a, sigma_a, sigma_b, x_var) - exact).square().mean().sqrt())
        out.append((err_addim, err_ddim))
    return out

NOISY_STEPS = [(80.0, 0.0), (80.0, 9.7), (80.0, 40.0), (9.7, 0.47), (9.7, 5.0), (5.0, 4.0), (2.0, 1.0), (1.0, 0.5), (1.0, 0.1)]

@pytest.mark.parametrize('scale, prior, steps', [
    (1.0, STD ** 2, NOISY_STEPS),                                           # The exact posterior variance of the Gaussian.
    (0.1, 0.5, NOISY_STEPS + [(0.47, 0.2), (0.47, 0.002), (0.3, 0.25)]),    # The paper's analytic variance.
])
def test_addim_is_closer_to_the_exact_ode_step_than_ddim(scale, prior, steps):
    for sigma_a, sigma_b in steps:
        for err_addim, err_ddim in _step_errors(sigma_a, sigma_b, scale, prior):
            assert err_addim < 0.9 * err_ddim, (sigma_a, sigma_b, err_addim, err_ddim)

def test_addim_overshoots_where_prediction_and_noise_are_aligned():
    # The norm correction assumes x_hat and the implied noise orthogonal. Well below the data's scale
    # (sigma_a << s) the Gaussian's x_hat - MU is parallel to the noise, and the full variance overshoots.
    for sigma_a, sigma_b in [(0.1, 0.002), (0.05, 0.01)]:
        for err_addim, err_ddim in _step_errors(sigma_a, sigma_b, 1.0, STD ** 2):
            assert err_addim > 2 * err_ddim, (sigma_a, sigma_b, err_addim, err_ddim)

def test_addim_with_exact_variance_on_typical_samples_follows_the_closed_form():
    # For x_a with |x_a - MU|^2 / d = s^2 + sigma_a^2, aDDIM with the exact posterior variance gives
    # MU + (s^2 + sqrt(sa^2 sb^2 + s^2 (sa - sb)^2)) / (s^2 + sa^2) (x_a - MU) (technical report section 9.1).
    s2 = STD ** 2
    for sa, sb in [(10.0, 3.0), (1.0, 0.5), (0.3, 0.01)]:
        x_a = typical(3, 16, sa, seed=3)
        out = samplers.addim_step(gauss_D(x_a, sa), x_a, sa, sb, samplers.addim_variance(sa, scale=1, prior=s2))
        coef = (s2 + np.sqrt(sa ** 2 * sb ** 2 + s2 * (sa - sb) ** 2)) / (s2 + sa ** 2)
        torch.testing.assert_close(out, MU + coef * (x_a - MU), rtol=0, atol=1e-12)

#----------------------------------------------------------------------------

class _GaussNet(torch.nn.Module):
    img_channels, img_resolution, label_dim, sigma_min, sigma_max = 1, 4, 0, 0, float('inf')
    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)
    def forward(self, x, sigma, class_labels=None):
        return gauss_D(x, torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1))

def test_student_sampler_addim():
    net = _GaussNet()
    z = torch.randn(8, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sigmas = samplers.student_sigmas(4)
    plain = samplers.student_sampler(net, z, sigmas=sigmas)
    torch.testing.assert_close(samplers.student_sampler(net, z, sigmas=sigmas, addim_scale=0), plain, rtol=0, atol=0)

    # The same loop written out: aDDIM between the levels, x_hat at the last.
    x = z * sigmas[0]
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        x_hat = net(x, a)
        x = x_hat if b == 0 else samplers.addim_step(x_hat, x, a, b, samplers.addim_variance(a, 0.1, 0.5))
    torch.testing.assert_close(samplers.student_sampler(net, z, sigmas=sigmas, addim_scale=0.1), x, rtol=0, atol=1e-12)
    assert float((x - plain).abs().max()) > 1e-3
    with pytest.raises(AssertionError):
        samplers.student_sampler(net, z, sigmas=sigmas, stochastic=True, addim_scale=0.1)
    with pytest.raises(AssertionError):
        samplers.student_sampler(net, z, sigmas=sigmas, addim_scale=-1)

#----------------------------------------------------------------------------

def _gauss_teacher():
    return GaussianMixture(torch.full([1, 1, 2, 2], MU, dtype=torch.float64), [1.0], torch.zeros(1, 4, 1), STD, img_channels=1, img_resolution=2)

@pytest.mark.parametrize('layout', ['karras', 'karras_open'])
def test_loss_addim_bridge(layout):
    teacher = _gauss_teacher()
    images = MU + STD * torch.randn(512, 1, 2, 2, generator=torch.Generator().manual_seed(5))
    draws = dict()
    for scale in [0, 0.1]:
        loss_fn = ConsistencyDistillLoss(S=4, T_start=32, T_end=32, target_mode='teacher',
            student_sigmas=layout, precision='float64', addim_scale=scale).set_teacher(teacher)
        torch.manual_seed(6)
        draws[scale] = loss_fn.draw(_gauss_teacher(), images)
    ddim, addim = draws[0], draws[0.1]
    assert torch.equal(ddim.k, addim.k)
    general = addim.general
    assert general.any()
    other = ~general
    torch.testing.assert_close(addim.target[other], ddim.target[other], rtol=0, atol=0) # Terminal and boundary rows: unchanged.

    # General rows: the aDDIM step of the target's prediction from sigma_s to the boundary (x_hat_s at a boundary of 0).
    s_g, r_g = addim.sigma_s[general], addim.sigma_ref[general]
    x_var = samplers.addim_variance(s_g, 0.1, 0.5) * (r_g > 0)
    x_ref = samplers.addim_step(addim.target_out[general], addim.x_s[general], s_g, r_g, x_var)
    torch.testing.assert_close(addim.x_ref[general], x_ref, rtol=0, atol=1e-12)
    positive = r_g > 0
    assert float((addim.target[general][positive] - ddim.target[general][positive]).abs().min()) > 0
    torch.testing.assert_close(addim.target[general][~positive], ddim.target[general][~positive], rtol=0, atol=0)

    # With the teacher as target, the Euler bridge misses the exact flow at the boundary; aDDIM misses it by less.
    exact = gauss_flow(addim.x_s[general], s_g.reshape(-1, 1, 1, 1), r_g.reshape(-1, 1, 1, 1))
    err = lambda d: float((d.x_ref[general][positive] - exact[positive]).square().mean().sqrt())
    assert err(addim) < 0.9 * err(ddim), (err(addim), err(ddim))

def test_loss_rejects_bad_addim():
    with pytest.raises(ValueError, match='addim_scale=-0.1'):
        ConsistencyDistillLoss(addim_scale=-0.1)
    with pytest.raises(ValueError, match='addim_prior=0'):
        ConsistencyDistillLoss(addim_scale=0.1, addim_prior=0)

#----------------------------------------------------------------------------

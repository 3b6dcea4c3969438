"""The adjusted DDIM step (training/samplers.py) as the teacher's hop of the distillation and as a teacher
sampler: it reduces to Euler (DDIM) with zero posterior variance, and on the Gaussian of cd-spec section 9 it
lands closer to the exact ODE step than Euler for a range of step sizes; the bridge and the student sampler have
no aDDIM, and files of the old aDDIM bridge are refused."""

import inspect
import pickle
import re

import numpy as np
import pytest
import torch

from training import checkpoint
from training import consistency_ops as ops
from training import samplers
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
    """The Gaussian's exact denoiser behind EDM's interface; counts its calls."""
    img_channels, img_resolution, label_dim, sigma_min, sigma_max = 1, 4, 0, 0, float('inf')
    calls = 0
    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)
    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        return gauss_D(x, torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1))

def _hop(x_a, sigma_a, sigma_b, **kwargs):
    n = len(x_a)
    sigmas = (torch.full([n], v, dtype=torch.float64) for v in (sigma_a, sigma_b))
    return ops.addim_hop(_GaussNet(), x_a, *sigmas, dtype=torch.float64, **kwargs)

def test_the_addim_teacher_hop_with_zero_variance_is_the_euler_hop():
    x_a = torch.randn(6, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    for sigma_a, sigma_b in [(5.0, 4.0), (1.0, 0.1), (0.5, 0.0)]:
        euler = ops.ddim_step(gauss_D(x_a, sigma_a), x_a, sigma_a, sigma_b, dtype=torch.float64)
        torch.testing.assert_close(_hop(x_a, sigma_a, sigma_b, scale=0), euler, rtol=0, atol=1e-13)
    torch.testing.assert_close(_hop(x_a, 0.5, 0.0), gauss_D(x_a, 0.5), rtol=0, atol=0) # To sigma = 0: the prediction.

@pytest.mark.parametrize('sigma_a, sigma_b', NOISY_STEPS[1:] + [(0.47, 0.2), (0.3, 0.25)])
def test_the_addim_teacher_hop_lands_closer_to_the_exact_flow_than_the_euler_hop(sigma_a, sigma_b):
    x_a = MU + np.sqrt(STD ** 2 + sigma_a ** 2) * torch.randn(64, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = gauss_flow(x_a, sigma_a, sigma_b)
    err = lambda x: float((x - exact).square().mean().sqrt())
    assert err(_hop(x_a, sigma_a, sigma_b)) < 0.9 * err(_hop(x_a, sigma_a, sigma_b, scale=0)) # The paper's variance.

@pytest.mark.parametrize('hop, calls', [('addim', 1), ('heun', 2)])
def test_the_draw_runs_one_teacher_evaluation_per_addim_hop(hop, calls):
    teacher = _GaussNet()
    loss_fn = ConsistencyDistillLoss(S=4, T_start=16, T_end=16, target_mode='ema', teacher_hop=hop, precision='float64')
    d = loss_fn.set_teacher(teacher).draw(_GaussNet(), MU + STD * torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(5)))
    assert teacher.calls == calls
    if hop == 'addim':
        torch.testing.assert_close(d.x_s, ops.addim_hop(_GaussNet(), d.x_t, d.sigma_t, d.sigma_s, dtype=torch.float64))

def test_the_loss_and_the_student_sampler_have_no_addim_option():
    for fn in (ConsistencyDistillLoss.__init__, samplers.student_sampler):
        assert not [name for name in inspect.signature(fn).parameters if 'addim' in name]

def test_the_addim_sampler_is_euler_with_lengthened_steps():
    net, z = _GaussNet(), torch.randn(8, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    euler = samplers.euler_sampler(net, z, num_steps=4)
    torch.testing.assert_close(samplers.addim_sampler(net, z, num_steps=4, addim_scale=0), euler, rtol=0, atol=0)
    levels = torch.cat([samplers.karras_sigmas(4), torch.zeros(1, dtype=torch.float64)])
    x = z * levels[0]
    for a, b in zip(levels[:-1], levels[1:]): # The loop written out: aDDIM steps, the prediction at the last.
        x_hat = net(x, a)
        x = x_hat if b == 0 else samplers.addim_step(x_hat, x, a, b, samplers.addim_variance(a))
    torch.testing.assert_close(samplers.addim_sampler(net, z, num_steps=4), x, rtol=0, atol=1e-12)
    assert float((x - euler).abs().max()) > 1e-3

def test_snapshots_and_states_of_the_old_addim_bridge_are_refused(tmp_path):
    fix = 'which this version replaced by the teacher\'s aDDIM hop; distil again, with --teacher_hop=addim.'
    for loss in [dict(class_name='training.loss_cd.ConsistencyDistillLoss', init_args=[], init_kwargs=dict(addim_scale=0.1)),
            dict(addim_scale=0.1, class_name='training.loss_cd.ConsistencyDistillLoss')]: # A snapshot's, a state's.
        with pytest.raises(ValueError, match=re.escape('comes from a distillation with the aDDIM bridge (addim_scale=0.1), ' + fix)):
            checkpoint.check_no_addim_bridge(loss, 'X')
    path = tmp_path / 'old.pkl'
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=_GaussNet(), loss_fn=dict(init_kwargs=dict(addim_scale=0.5))), f)
    with pytest.raises(ValueError, match=re.escape(f'"{path}" comes from a distillation with the aDDIM bridge (addim_scale=0.5)')):
        checkpoint.load_snapshot(str(path))
    checkpoint.check_no_addim_bridge(dict(init_kwargs=dict(addim_scale=0)), 'X') # Zero: plain DDIM, accepted.

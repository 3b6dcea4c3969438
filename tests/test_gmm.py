"""training/gmm.py and the benchmark's mixtures against closed forms (cd-spec
section 9): the single Gaussian, dense Wiener filters and log-likelihoods, a
Monte-Carlo posterior mean, sampling, and the reference ODE endpoints."""

import os
import sys

import pytest
import torch

from training import samplers
from training.gmm import GaussianMixture

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'benchmarks'))
import gmm_distill # pylint: disable=wrong-import-position

pytestmark = pytest.mark.usefixtures('one_thread')

def _gen(seed):
    return torch.Generator().manual_seed(seed)

def _dense(mixture, x, sigma):
    """Log-likelihoods and the posterior-weighted Wiener filter from dense covariances."""
    X = x.reshape(x.shape[0], -1).to(torch.float64)
    eye = torch.eye(mixture.dim, dtype=torch.float64)
    logliks, filters = [], []
    for k in range(mixture.num_components):
        cov = mixture.factors[k] @ mixture.factors[k].T + mixture.noise_var[k] * eye
        noisy = torch.distributions.MultivariateNormal(mixture.means[k], cov + sigma ** 2 * eye)
        logliks.append(noisy.log_prob(X) + mixture.weights[k].log())
        filters.append(mixture.means[k] + (cov @ torch.linalg.solve(cov + sigma ** 2 * eye, (X - mixture.means[k]).T)).T)
    loglik = torch.stack(logliks, dim=1)
    D = (torch.softmax(loglik, dim=1)[:, :, None] * torch.stack(filters, dim=1)).sum(dim=1)
    return loglik, D.reshape(x.shape)

#----------------------------------------------------------------------------

def test_single_gaussian_matches_closed_form():
    mu, s = 0.3, 0.4
    gauss = GaussianMixture(torch.full([1, 2, 3, 3], mu, dtype=torch.float64), [1.0], torch.zeros(1, 18, 1), s, img_channels=2, img_resolution=3)
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64, generator=_gen(0)) * 3
    for sigma in [0.002, 0.5, 7.0, 80.0]:
        torch.testing.assert_close(gauss(x, torch.tensor(sigma, dtype=torch.float64)), mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu), rtol=0, atol=1e-12)

    # The reference endpoints (Heun to sigma_min = 1e-4, then Euler) against the exact flow to 0,
    # and step doubling bounds their error.
    z = torch.randn(64, 2, 3, 3, dtype=torch.float64, generator=_gen(1))
    fine, doubling_rms, _ = gmm_distill.references(gauss, z, 64, sigma_min=1e-4)
    exact = mu + (80 * z - mu) * s / (s ** 2 + 80 ** 2) ** 0.5
    err = float((fine - exact).square().mean().sqrt())
    assert err < 0.5 * doubling_rms < 1e-3, (err, doubling_rms)

@pytest.mark.parametrize('name', ['gmm8', 'gmm16'])
def test_benchmark_mixture_matches_dense_computation(name):
    mixture = gmm_distill.make_mixture(name)
    y, k = mixture.sample(8, generator=_gen(2))
    assert torch.equal(mixture.assign(y), k) # Well separated: every clean sample lies in its own component.
    for sigma in [0.05, 0.7, 10.0]:
        x = y + sigma * torch.randn(y.shape, dtype=torch.float64, generator=_gen(3))
        loglik, D = _dense(mixture, x, sigma)
        torch.testing.assert_close(mixture.log_likelihoods(x, sigma), loglik, rtol=1e-10, atol=1e-8)
        torch.testing.assert_close(mixture(x, torch.tensor(sigma)), D, rtol=0, atol=1e-7)
    assert mixture(x.to(torch.float32), torch.tensor(1.0)).dtype == torch.float32

def test_denoiser_is_monte_carlo_posterior_mean():
    # A small overlapping mixture: E[y | x] by self-normalised importance sampling from the prior.
    gen = _gen(4)
    means = torch.randn(3, 4, dtype=torch.float64, generator=gen) * 0.6
    factors = torch.randn(3, 4, 2, dtype=torch.float64, generator=gen) * 0.3
    mixture = GaussianMixture(means, [0.2, 0.5, 0.3], factors, [0.1, 0.2, 0.15], img_channels=1, img_resolution=2)
    y, _ = mixture.sample(400000, generator=gen)
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=gen) * 0.8
    sigma = 0.5
    logw = -((x.reshape(4, 1, -1) - y.reshape(1, -1, 4)).square().sum(dim=2)) / (2 * sigma ** 2)
    w = torch.softmax(logw, dim=1)
    mc = (w @ y.reshape(-1, 4)).reshape(x.shape)
    ess = 1 / w.square().sum(dim=1)
    assert bool((ess > 5000).all()), ess
    torch.testing.assert_close(mixture(x, torch.tensor(sigma)), mc, rtol=0, atol=0.02)

def test_sampling_follows_weights_and_moments():
    mixture = gmm_distill.make_mixture('gmm16')
    y, k = mixture.sample(20000, generator=_gen(5))
    shares = torch.bincount(k, minlength=mixture.num_components).to(torch.float64) / len(k)
    assert float((shares - mixture.weights).abs().max()) < 0.015
    c = 7
    rows = y[k == c].reshape(-1, mixture.dim)
    assert float((rows.mean(dim=0) - mixture.means[c]).abs().max()) < 0.05
    cov = mixture.factors[c] @ mixture.factors[c].T
    assert float((rows.var(dim=0) - cov.diagonal() - mixture.noise_var[c]).abs().max()) < 0.01

def test_edm_interface_and_bad_input():
    mixture = gmm_distill.make_mixture('gmm8')
    assert (mixture.img_resolution, mixture.img_channels, mixture.label_dim) == (8, 1, 0)
    z = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=_gen(6))
    assert samplers.edm_sampler(mixture, z, num_steps=4).shape == z.shape
    with pytest.raises(AssertionError):
        GaussianMixture(mixture.means, [1.0, 1.0, 1.0], mixture.factors, 0.1, img_channels=1, img_resolution=8)
    with pytest.raises(AssertionError):
        GaussianMixture(mixture.means, [1.0] * 4, mixture.factors, 0.0, img_channels=1, img_resolution=8)

#----------------------------------------------------------------------------

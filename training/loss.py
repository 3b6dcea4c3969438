"""Denoising score matching losses of EDM (Karras et al. 2022, Table 1) and EDM2
(Karras et al. 2024).

Each loss draws one noise level per image from its training distribution,
optionally augments the clean images, and returns the per-element loss
`weight(sigma) * (D(y + n; sigma) - y)^2` with `n ~ N(0, sigma^2 I)`; the
caller reduces it. The EDM2 loss also divides by the network's learned
uncertainty exp(u(sigma)) and adds u(sigma).
"""

import torch
from torch_utils import persistence

#----------------------------------------------------------------------------

def _noisy_denoising_error(net, images, labels, sigma, weight, augment_pipe):
    """weight * (D(y + n; sigma) - y)^2 for the (optionally augmented) images y."""
    if augment_pipe is not None:
        y, augment_labels = augment_pipe(images)
    else:
        y, augment_labels = images, None
    n = torch.randn_like(y) * sigma
    D_yn = net(y + n, sigma, labels, augment_labels=augment_labels)
    return weight * ((D_yn - y) ** 2)

@persistence.persistent_class
class VPLoss:
    """Variance preserving loss: t ~ U(epsilon_t, 1), sigma = sigma_VP(t), weight 1 / sigma^2."""

    def __init__(self,
        beta_d      = 19.9,     # Extent of the noise schedule.
        beta_min    = 0.1,      # Initial slope of the noise schedule.
        epsilon_t   = 1e-5,     # Smallest t used in training.
    ):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma ** 2
        return _noisy_denoising_error(net, images, labels, sigma, weight, augment_pipe)

    def sigma(self, t):
        """Noise level at time t of the VP schedule."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

@persistence.persistent_class
class VELoss:
    """Variance exploding loss: log sigma ~ U(log sigma_min, log sigma_max), weight 1 / sigma^2."""

    def __init__(self,
        sigma_min   = 0.02,     # Smallest noise level.
        sigma_max   = 100,      # Largest noise level.
    ):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        weight = 1 / sigma ** 2
        return _noisy_denoising_error(net, images, labels, sigma, weight, augment_pipe)

def _lognormal_sigma_and_edm_weight(images, P_mean, P_std, sigma_data):
    """Per-image sigma with ln sigma ~ N(P_mean, P_std^2), and EDM's weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    sigma = (torch.randn([images.shape[0], 1, 1, 1], device=images.device) * P_std + P_mean).exp()
    return sigma, (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2

@persistence.persistent_class
class EDMLoss:
    """EDM loss: ln sigma ~ N(P_mean, P_std^2), weight (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""

    def __init__(self,
        P_mean      = -1.2,     # Mean of ln sigma.
        P_std       = 1.2,      # Standard deviation of ln sigma.
        sigma_data  = 0.5,      # Standard deviation of the training data.
    ):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigma, weight = _lognormal_sigma_and_edm_weight(images, self.P_mean, self.P_std, self.sigma_data)
        return _noisy_denoising_error(net, images, labels, sigma, weight, augment_pipe)

#----------------------------------------------------------------------------

@persistence.persistent_class
class EDM2Loss:
    """EDM2 loss: ln sigma ~ N(P_mean, P_std^2), EDM's weight lambda(sigma), and the
    network's log-variance u(sigma): lambda(sigma) / exp(u) * (D - y)^2 + u."""

    def __init__(self,
        P_mean      = -0.4,     # Mean of ln sigma.
        P_std       = 1.0,      # Standard deviation of ln sigma.
        sigma_data  = 0.5,      # Standard deviation of the training data.
    ):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigma, weight = _lognormal_sigma_and_edm_weight(images, self.P_mean, self.P_std, self.sigma_data)
        if augment_pipe is not None:
            y, augment_labels = augment_pipe(images)
            net_kwargs = dict(augment_labels=augment_labels)
        else:
            y, net_kwargs = images, dict()
        n = torch.randn_like(y) * sigma
        D_yn, logvar = net(y + n, sigma, labels, return_logvar=True, **net_kwargs)
        return (weight / logvar.exp()) * ((D_yn - y) ** 2) + logvar

#----------------------------------------------------------------------------

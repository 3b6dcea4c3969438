"""The per-element denoising losses of EDM (Table 1) and EDM2: weight(sigma) * (D(y + n; sigma) - y)^2."""

import torch
from torch_utils import persistence

#----------------------------------------------------------------------------

def _noisy(images, sigma, augment_pipe):
    """The (optionally augmented) images y, their augment labels and y + n, n ~ N(0, sigma^2 I)."""
    y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
    return y, augment_labels, y + torch.randn_like(y) * sigma

def _edm_error(net, images, labels, sigma, weight, augment_pipe):
    y, augment_labels, yn = _noisy(images, sigma, augment_pipe)
    return weight * ((net(yn, sigma, labels, augment_labels=augment_labels) - y) ** 2)

@persistence.persistent_class
class VPLoss:
    """Variance preserving loss: t ~ U(epsilon_t, 1), sigma = sigma_VP(t), weight 1 / sigma^2."""

    def __init__(self,
        beta_d      = 19.9,     # Extent of the noise schedule.
        beta_min    = 0.1,      # Initial slope of the noise schedule.
        epsilon_t   = 1e-5,     # Smallest t used in training.
    ):
        self.beta_d, self.beta_min, self.epsilon_t = beta_d, beta_min, epsilon_t

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        return _edm_error(net, images, labels, sigma, 1 / sigma ** 2, augment_pipe)

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

@persistence.persistent_class
class VELoss:
    """Variance exploding loss: log sigma ~ U(log sigma_min, log sigma_max), weight 1 / sigma^2."""

    def __init__(self,
        sigma_min   = 0.02,     # Smallest noise level.
        sigma_max   = 100,      # Largest noise level.
    ):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], device=images.device)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        return _edm_error(net, images, labels, sigma, 1 / sigma ** 2, augment_pipe)

def _lognormal_sigma_and_edm_weight(images, P_mean, P_std, sigma_data):
    """Per-image sigma with ln sigma ~ N(P_mean, P_std^2) and EDM's weight."""
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
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigma, weight = _lognormal_sigma_and_edm_weight(images, self.P_mean, self.P_std, self.sigma_data)
        return _edm_error(net, images, labels, sigma, weight, augment_pipe)

@persistence.persistent_class
class EDM2Loss:
    """EDM2 loss: EDM's, divided by exp(u) and plus u, u(sigma) the network's log-variance."""

    def __init__(self,
        P_mean      = -0.4,     # Mean of ln sigma.
        P_std       = 1.0,      # Standard deviation of ln sigma.
        sigma_data  = 0.5,      # Standard deviation of the training data.
    ):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigma, weight = _lognormal_sigma_and_edm_weight(images, self.P_mean, self.P_std, self.sigma_data)
        y, augment_labels, yn = _noisy(images, sigma, augment_pipe)
        net_kwargs = dict() if augment_pipe is None else dict(augment_labels=augment_labels)
        D_yn, logvar = net(yn, sigma, labels, return_logvar=True, **net_kwargs)
        return (weight / logvar.exp()) * ((D_yn - y) ** 2) + logvar

#----------------------------------------------------------------------------

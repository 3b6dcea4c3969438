"""The closed-form Gaussian of cd-spec section 9, shared by the tests.

Data y ~ N(mu, s^2 I). Its ideal denoiser at noise level sigma is
mu + s^2 / (s^2 + sigma^2) (x - mu), and the PF-ODE moves x from sigma_a to
sigma_b as x_b = mu + (x_a - mu) sqrt(s^2 + sigma_b^2) / sqrt(s^2 + sigma_a^2).
Per-sample sigmas (tensors of N values) broadcast over the samples of x.
`GaussianNet` (sampler and generate.py tests) pickles with its source
(persistent class), so snapshots built from it load in generate.py like any
EDM snapshot; `GaussianDenoiser` (distillation tests) has buffers, classes
and augmentation labels.
"""

import torch
from torch_utils import persistence

def _per_sample(sigma, x):
    """sigma as a tensor of x's dtype that broadcasts over x, one value per sample (or one for all)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma.reshape([-1] + [1] * (x.ndim - 1)) if sigma.numel() > 1 else sigma

def denoise(x, mu, s, sigma):
    """The ideal denoiser of the Gaussian at noise level sigma."""
    sigma = _per_sample(sigma, x)
    return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)

def flow(x, mu, s, sigma_a, sigma_b):
    """The exact PF-ODE map of the Gaussian from sigma_a to sigma_b."""
    sigma_a, sigma_b = _per_sample(sigma_a, x), _per_sample(sigma_b, x)
    return mu + (x - mu) * torch.sqrt(s ** 2 + sigma_b ** 2) / torch.sqrt(s ** 2 + sigma_a ** 2)

@persistence.persistent_class
class GaussianNet(torch.nn.Module):
    """Closed-form network for N(mu, s^2 I) data, called like an EDM wrapper.

    mode='denoiser':      the ideal denoiser mu + s^2 / (s^2 + sigma^2) (x - mu).
    mode='flow_to_zero':  the exact PF-ODE map to sigma = 0.
    mode='student':       the ideal multistep consistency student of the grid
                          `student_sigmas`: the x-prediction whose DDIM step lands
                          on the exact ODE solution at the next student sigma.
    Every call is counted in `num_calls` and its sigma kept in `sigmas_seen`.
    """

    def __init__(self, img_resolution=4, img_channels=1, label_dim=0, mu=0.1, s=0.5, class_means=None,
            mode='denoiser', student_sigmas=None, sigma_min=0, sigma_max=float('inf')):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.mu = mu
        self.s = s
        self.class_means = class_means
        self.mode = mode
        self.student_sigmas = student_sigmas
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.num_calls = 0
        self.sigmas_seen = []

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def mean(self, x, class_labels):
        if self.label_dim == 0:
            return self.mu
        means = torch.as_tensor(self.class_means, dtype=torch.float64, device=x.device)
        return (class_labels.to(torch.float64) @ means).reshape(-1, 1, 1, 1)

    def forward(self, x, sigma, class_labels=None):
        self.num_calls += 1
        x = x.to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        self.sigmas_seen.append(float(sigma.flatten()[0]))
        mu, s = self.mean(x, class_labels), self.s
        if self.mode == 'denoiser':
            return denoise(x, mu, s, sigma.reshape(-1).expand(x.shape[0]))
        if self.mode == 'flow_to_zero':
            return flow(x, mu, s, sigma.reshape(-1).expand(x.shape[0]), 0)
        assert self.mode == 'student' and sigma.numel() == 1
        sigma = float(sigma)
        sigma_b = max(v for v in self.student_sigmas if v < sigma)
        x_ref = flow(x, mu, s, sigma, sigma_b)
        r = sigma_b / sigma
        return (x_ref - r * x) / (1 - r)

def _batch(sigma, x):
    """sigma as N per-sample values of x's dtype."""
    return torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1).expand(x.shape[0])

class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of y ~ N(mu, s^2 I) behind EDM's network interface.
    Computes in the input's precision; `out_dtype` casts its output (reduced-precision networks).
    With `class_shift` [label_dim] the mean moves by class_labels @ class_shift, and by the first
    augmentation label when one is given (a conditional Gaussian per sample)."""

    def __init__(self, mu, std, img_channels, img_resolution, out_dtype=None, class_shift=None):
        super().__init__()
        self.register_buffer('mu', torch.as_tensor(mu, dtype=torch.float64).reshape(1, img_channels, img_resolution, img_resolution))
        self.class_shift = None if class_shift is None else torch.as_tensor(class_shift, dtype=torch.float64)
        self.std = std
        self.img_channels = img_channels
        self.img_resolution = img_resolution
        self.label_dim = 0 if class_shift is None else len(class_shift)
        self.sigma_min = 0
        self.sigma_max = float('inf')
        self.out_dtype = out_dtype
        self.sigmas = [] # Noise levels of every call, for the tests.

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def mean(self, dtype, class_labels=None, augment_labels=None):
        mu = self.mu.to(dtype)
        if self.class_shift is not None and class_labels is not None:
            mu = mu + (class_labels.to(dtype) @ self.class_shift.to(dtype)).reshape(-1, 1, 1, 1)
        if augment_labels is not None:
            mu = mu + augment_labels[:, :1].to(dtype).reshape(-1, 1, 1, 1)
        return mu

    def flow(self, x, sigma_a, sigma_b, class_labels=None, augment_labels=None):
        """Exact probability-flow ODE map sigma_a -> sigma_b."""
        return flow(x, self.mean(x.dtype, class_labels, augment_labels), self.std, _batch(sigma_a, x), _batch(sigma_b, x))

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        self.sigmas.append(torch.as_tensor(sigma, dtype=x.dtype).flatten().clone())
        out = denoise(x, self.mean(x.dtype, class_labels, augment_labels), self.std, _batch(sigma, x))
        return out if self.out_dtype is None else out.to(self.out_dtype)

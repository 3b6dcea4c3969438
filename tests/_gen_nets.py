"""Closed-form networks for the sampler tests (cd-spec section 9).

Data y ~ N(mu, s^2 I), with mu per class for a conditional network. The
PF-ODE moves x from sigma_a to sigma_b as
x_b = mu + (x_a - mu) sqrt(s^2 + sigma_b^2) / sqrt(s^2 + sigma_a^2).
`GaussianNet` pickles with its source (persistent class), so snapshots built
from it load in generate.py like any EDM snapshot.
"""

import torch
from torch_utils import persistence

def flow(x, mu, s, sigma_a, sigma_b):
    """The exact PF-ODE map of the Gaussian from sigma_a to sigma_b."""
    return mu + (x - mu) * ((s ** 2 + sigma_b ** 2) / (s ** 2 + sigma_a ** 2)) ** 0.5

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
            sigma = sigma.reshape(-1, 1, 1, 1)
            return mu + s ** 2 / (s ** 2 + sigma ** 2) * (x - mu)
        if self.mode == 'flow_to_zero':
            return flow(x, mu, s, sigma.reshape(-1, 1, 1, 1), 0)
        assert self.mode == 'student' and sigma.numel() == 1
        sigma = float(sigma)
        sigma_b = max(v for v in self.student_sigmas if v < sigma)
        x_ref = flow(x, mu, s, sigma, sigma_b)
        r = sigma_b / sigma
        return (x_ref - r * x) / (1 - r)

"""Gaussian-mixture data with a closed-form denoiser (cd-spec section 9).

`GaussianMixture` holds K components N(mu_k, Sigma_k) with weights w_k over
images of C x R x R pixels, each covariance low-rank plus isotropic,
Sigma_k = U_k U_k^T + s_k^2 I, so that everything is exact and cheap in
float64 through the Woodbury identity. At noise level sigma the noisy
marginal is the mixture of N(mu_k, Sigma_k + sigma^2 I), and the ideal
denoiser is the posterior-weighted Wiener filter

    D(x; sigma) = sum_k p(k | x; sigma) (mu_k + Sigma_k (Sigma_k + sigma^2 I)^-1 (x - mu_k)).

The module has the interface of an EDM network (`img_resolution`,
`img_channels`, `label_dim` = 0, `sigma_min`, `sigma_max`, `round_sigma`,
`forward(x, sigma, class_labels=None)`), so the project's samplers and the
distillation loss use it as a teacher. It computes in float64 and returns
the input's dtype.
"""

import numpy as np
import torch

#----------------------------------------------------------------------------

class GaussianMixture(torch.nn.Module):
    """A mixture of low-rank-plus-isotropic Gaussians over images, with its exact denoiser."""

    def __init__(self,
        means,                  # Component means [K, C, R, R] (or [K, C*R*R]).
        weights,                # Mixture weights [K], positive; normalised here.
        factors,                # Low-rank factors U_k [K, C*R*R, r] (r may be 0).
        noise_std,              # Isotropic standard deviations s_k [K] (or a scalar), positive.
        img_channels,           # Channels C.
        img_resolution,         # Resolution R.
    ):
        super().__init__()
        dim = img_channels * img_resolution ** 2
        means = torch.as_tensor(means, dtype=torch.float64).reshape(-1, dim)
        K = means.shape[0]
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        factors = torch.as_tensor(factors, dtype=torch.float64).reshape(K, dim, -1)
        noise_std = torch.as_tensor(noise_std, dtype=torch.float64).reshape(-1).expand(K).clone()
        if weights.shape[0] != K or not bool((weights > 0).all()):
            raise ValueError(f'weights of shape {tuple(weights.shape)} are invalid: give {K} positive weights, one per component.')
        if not bool((noise_std > 0).all()):
            raise ValueError(f'noise_std={noise_std.tolist()} is invalid: every isotropic standard deviation must be positive.')
        self.register_buffer('means', means)
        self.register_buffer('weights', weights / weights.sum())
        self.register_buffer('factors', factors)
        self.register_buffer('noise_var', noise_std ** 2)
        lam, vecs = torch.linalg.eigh(factors.transpose(1, 2) @ factors)    # U_k^T U_k = V diag(lambda) V^T.
        basis = factors @ vecs                                              # W_k = U_k V_k: orthogonal columns, |w_i|^2 = lambda_i.
        self.register_buffer('lam', lam)
        self.register_buffer('basis', basis.transpose(0, 1).contiguous())   # [D, K, r]
        self.register_buffer('mean_proj', torch.einsum('kd,kdr->kr', means, basis))
        self.img_channels = img_channels
        self.img_resolution = img_resolution
        self.label_dim = 0
        self.sigma_min = 0
        self.sigma_max = float('inf')

    @property
    def num_components(self):
        return self.means.shape[0]

    @property
    def dim(self):
        return self.means.shape[1]

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def _stats(self, x, sigma):
        """Log-likelihoods log w_k N(x; mu_k, Sigma_k + sigma^2 I) [N, K] and the denoiser [N, D], by matrix
        products in the eigenbasis of U_k^T U_k. With c = s_k^2 + sigma^2 each Wiener filter is
        mu_k + (s_k^2 / c) v + sigma^2 / c W_k diag(1 / (c + lambda)) W_k^T v, v = x - mu_k (no cancellation at large sigma)."""
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        N, K, r = x.shape[0], self.num_components, self.lam.shape[1]
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(N)
        c = self.noise_var[None, :] + sigma[:, None] ** 2                                       # [N, K]
        sq = (x.square().sum(dim=1, keepdim=True) - 2 * x @ self.means.T + self.means.square().sum(dim=1)[None, :])
        proj = (x @ self.basis.reshape(self.dim, K * r)).reshape(N, K, r) - self.mean_proj[None]  # W_k^T (x - mu_k)
        shrink = 1 / (c[..., None] + self.lam[None])                                            # 1 / (c + lambda)
        quad = (sq - (proj.square() * shrink).sum(dim=2)) / c
        logdet = (self.dim - r) * c.log() + (c[..., None] + self.lam[None]).log().sum(dim=2)
        loglik = self.weights.log()[None, :] - 0.5 * (quad + logdet + self.dim * np.log(2 * np.pi))
        resp = torch.softmax(loglik, dim=1)
        iso = resp * self.noise_var[None, :] / c                                                # p_k s_k^2 / c_k
        low = (resp[..., None] * (sigma[:, None, None] ** 2 / c[..., None]) * shrink * proj).reshape(N, K * r)
        denoised = x * iso.sum(dim=1, keepdim=True) + (resp - iso) @ self.means + low @ self.basis.reshape(self.dim, K * r).T
        return loglik, denoised

    def log_likelihoods(self, x, sigma=0):
        """log w_k + log N(x; mu_k, Sigma_k + sigma^2 I) for every component, float64 [N, K]."""
        return self._stats(x, sigma)[0]

    def posterior(self, x, sigma=0):
        """Responsibilities p(k | x; sigma), float64 [N, K]."""
        return torch.softmax(self.log_likelihoods(x, sigma), dim=1)

    def assign(self, x):
        """The most likely component of every clean sample x (int64 [N])."""
        return self.log_likelihoods(x, 0).argmax(dim=1)

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        """The exact denoiser E[y | x; sigma] (input dtype)."""
        return self._stats(x, sigma)[1].reshape(x.shape).to(x.dtype)

    def sample(self, n, generator=None):
        """n clean images (float64 [n, C, R, R]) and their components (int64 [n])."""
        device = self.means.device
        k = torch.multinomial(self.weights, int(n), replacement=True, generator=generator)
        z = torch.randn([int(n), self.factors.shape[2]], dtype=torch.float64, generator=generator).to(device)
        e = torch.randn([int(n), self.dim], dtype=torch.float64, generator=generator).to(device)
        y = self.means[k] + torch.einsum('ndr,nr->nd', self.factors[k], z) + self.noise_var[k, None].sqrt() * e
        return y.reshape(int(n), self.img_channels, self.img_resolution, self.img_resolution), k

#----------------------------------------------------------------------------

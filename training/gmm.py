"""A mixture of Gaussians N(mu_k, U_k U_k^T + s_k^2 I) over images whose exact denoiser is an EDM-style teacher."""

import numpy as np
import torch

#----------------------------------------------------------------------------

class GaussianMixture(torch.nn.Module):
    def __init__(self,
        means,          # Means [K, C, R, R] or [K, C*R*R].
        weights,        # Positive weights [K], normalised here.
        factors,        # Low-rank factors U_k [K, C*R*R, r], r >= 0.
        noise_std,      # Isotropic stds s_k [K] or a scalar, positive.
        img_channels,   # Channels C.
        img_resolution, # Resolution R.
    ):
        super().__init__()
        dim = img_channels * img_resolution ** 2
        means = torch.as_tensor(means, dtype=torch.float64).reshape(-1, dim)
        K = means.shape[0]
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        factors = torch.as_tensor(factors, dtype=torch.float64).reshape(K, dim, -1)
        noise_std = torch.as_tensor(noise_std, dtype=torch.float64).reshape(-1).expand(K).clone()
        assert weights.shape[0] == K and bool((weights > 0).all()) and bool((noise_std > 0).all())
        lam, vecs = torch.linalg.eigh(factors.transpose(1, 2) @ factors) # U_k^T U_k = V diag(lambda) V^T.
        basis = factors @ vecs # W_k = U_k V_k, |w_i|^2 = lambda_i; stored as [D, K, r].
        buffers = dict(means=means, weights=weights / weights.sum(), factors=factors, noise_var=noise_std ** 2, lam=lam,
            basis=basis.transpose(0, 1).contiguous(), mean_proj=torch.einsum('kd,kdr->kr', means, basis))
        for name, value in buffers.items():
            self.register_buffer(name, value)
        self.img_channels, self.img_resolution, self.label_dim = img_channels, img_resolution, 0
        self.sigma_min, self.sigma_max = 0, float('inf')

    @property
    def num_components(self):
        return self.means.shape[0]

    @property
    def dim(self):
        return self.means.shape[1]

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def _stats(self, x, sigma):
        """log w_k N(x; mu_k, Sigma_k + sigma^2 I) [N, K] and the posterior-weighted Wiener filters [N, D]."""
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        N, K, r = x.shape[0], self.num_components, self.lam.shape[1]
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1).expand(N)
        c = self.noise_var[None, :] + sigma[:, None] ** 2 # [N, K]
        sq = (x.square().sum(dim=1, keepdim=True) - 2 * x @ self.means.T + self.means.square().sum(dim=1)[None, :])
        basis = self.basis.reshape(self.dim, K * r)
        proj = (x @ basis).reshape(N, K, r) - self.mean_proj[None] # W_k^T (x - mu_k)
        shrink = 1 / (c[..., None] + self.lam[None]) # 1 / (c + lambda)
        quad = (sq - (proj.square() * shrink).sum(dim=2)) / c
        logdet = (self.dim - r) * c.log() + (c[..., None] + self.lam[None]).log().sum(dim=2)
        loglik = self.weights.log()[None, :] - 0.5 * (quad + logdet + self.dim * np.log(2 * np.pi))
        resp = torch.softmax(loglik, dim=1)
        iso = resp * self.noise_var[None, :] / c # p_k s_k^2 / c_k
        low = (resp[..., None] * (sigma[:, None, None] ** 2 / c[..., None]) * shrink * proj).reshape(N, K * r)
        return loglik, x * iso.sum(dim=1, keepdim=True) + (resp - iso) @ self.means + low @ basis.T

    def log_likelihoods(self, x, sigma=0):
        """log w_k + log N(x; mu_k, Sigma_k + sigma^2 I) for every component, float64 [N, K]."""
        return self._stats(x, sigma)[0]

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

"""EDM's Heun and Euler samplers, aDDIM, the consistency student's, their noise levels and image helpers
(docs/cd-spec.md)."""

import numpy as np
import torch

#----------------------------------------------------------------------------
# Noise-level grids.

def _round(round_sigma, sigmas):
    return sigmas if round_sigma is None else torch.as_tensor(round_sigma(sigmas)).to(torch.float64)

def karras_sigmas(num_nodes, sigma_min=0.002, sigma_max=80, rho=7, round_sigma=None):
    """The descending Karras grid of `num_nodes` levels (float64, no final 0), through `round_sigma`."""
    num_nodes = int(num_nodes)
    assert num_nodes >= 1 and rho > 0
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f'sigma_min={sigma_min}, sigma_max={sigma_max} are invalid; use 0 < sigma_min < sigma_max.')
    if num_nodes == 1:
        return _round(round_sigma, torch.tensor([sigma_max], dtype=torch.float64))
    frac = torch.arange(num_nodes, dtype=torch.float64) / (num_nodes - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _round(round_sigma, (hi + frac * (lo - hi)) ** rho)

def student_sigmas(S, layout='karras', sigma_min=0.002, sigma_max=80, rho=7, interior=None, round_sigma=None):
    """S + 1 student levels: S Karras nodes, the first S of S + 1, or sigma_max and the `interior` ones, then 0."""
    S = int(S)
    assert S >= 1 and (interior is None) == (layout != 'explicit')
    if layout == 'explicit':
        interior = [float(v) for v in interior]
        if len(interior) != S - 1:
            raise ValueError(f'{len(interior)} interior sigmas were given for S={S}; give exactly S - 1 = {S - 1}.')
        nodes = torch.tensor([float(sigma_max)] + interior, dtype=torch.float64)
    else:
        assert layout in ('karras', 'karras_open')
        nodes = karras_sigmas(S + (layout == 'karras_open'), sigma_min, sigma_max, rho)[:S]
    return check_student_sigmas(torch.cat([_round(round_sigma, nodes), torch.zeros(1, dtype=torch.float64)]))

def check_student_sigmas(sigmas):
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    v = sigmas.tolist()
    if sigmas.ndim != 1 or len(v) < 2 or v[-1] != 0 or not all(np.isfinite(a) and a > b for a, b in zip(v, v[1:])):
        raise ValueError(f'student sigmas {v} are invalid; give S + 1 >= 2 finite levels that descend strictly to 0.')
    return sigmas

def noise_range(net):
    """(sigma_min, sigma_max, round_sigma) of a network; those it lacks (EDM2) are 0, inf and no rounding."""
    return getattr(net, 'sigma_min', 0), getattr(net, 'sigma_max', np.inf), getattr(net, 'round_sigma', lambda s: s)

def noise_range_note(net, what='The network', grid='the noise levels of the grid'):
    """A sentence naming which of sigma_min, sigma_max, round_sigma a network lacks, or None."""
    missing = ', '.join(name for name in ('sigma_min', 'sigma_max', 'round_sigma') if not hasattr(net, name))
    return f'{what} ({type(net).__name__}) has no {missing}: {grid} are used without rounding.' if missing else None

#----------------------------------------------------------------------------
# Teacher samplers (EDM grid, optional stochastic churn).

def _karras_ode_sampler(net, latents, class_labels, randn_like, num_steps, sigma_min, sigma_max,
    rho, S_churn, S_min, S_max, S_noise, second_order, addim_scale=0, addim_prior=0.5):
    num_steps = int(num_steps)
    net_min, net_max, round_sigma = noise_range(net)
    t_steps = karras_sigmas(num_steps, max(sigma_min, net_min), min(sigma_max, net_max), rho, round_sigma)
    t_steps = torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)]).to(latents.device)
    max_gamma = min(S_churn / num_steps, np.sqrt(2) - 1)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        # Churn (noise drawn at every step, as in EDM).
        gamma = max_gamma if S_min <= t_cur <= S_max else 0
        t_hat = _round(round_sigma, t_cur + gamma * t_cur)
        x_hat = x_next
        if S_churn > 0:
            x_hat = x_hat + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_hat)
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if addim_scale > 0 and t_next > 0:
            x_next = addim_step(denoised, x_hat, t_hat, t_next, addim_variance(t_hat, addim_scale, addim_prior))
        if second_order and i < num_steps - 1:
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

def edm_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps   = 18,           # Noise levels before the final 0.
    sigma_min   = 0.002,        # At least net.sigma_min.
    sigma_max   = 80,           # At most net.sigma_max.
    rho         = 7,
    S_churn     = 0,            # 0 = deterministic.
    S_min       = 0,
    S_max       = float('inf'),
    S_noise     = 1,
):
    """EDM's Heun sampler (2 * num_steps - 1 evaluations) from unit Gaussian `latents`; returns float64 images."""
    return _karras_ode_sampler(**locals(), second_order=True)

def euler_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1):
    """edm_sampler without the second-order correction (Euler = DDIM, num_steps evaluations)."""
    return _karras_ode_sampler(**locals(), second_order=False)

def addim_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
    addim_scale=0.1, addim_prior=0.5):
    """Heek et al.'s aDDIM sampler (2024, Algorithm 3): Euler steps lengthened by the variance estimate of
    addim_variance (num_steps evaluations; technical report section 9.1)."""
    return _karras_ode_sampler(**locals(), second_order=False)

#----------------------------------------------------------------------------
# Adjusted DDIM (Heek, Hoogeboom & Salimans 2024; technical report section 9.1) and the student sampler.

def addim_variance(sigma, scale=0.1, prior=0.5):
    """aDDIM's per-element posterior variance scale * prior sigma^2 / (prior + sigma^2)."""
    sigma = sigma if isinstance(sigma, torch.Tensor) else torch.as_tensor(sigma, dtype=torch.float64)
    return scale * prior * sigma ** 2 / (prior + sigma ** 2)

def addim_step(x_hat, x_a, sigma_a, sigma_b, x_var, dtype=torch.float64):
    """aDDIM step sigma_a > 0 -> sigma_b from the prediction x_hat with posterior variance x_var (0 = DDIM)."""
    x_hat, x_a = x_hat.to(dtype), x_a.to(dtype)
    shape = [-1] + [1] * (x_a.ndim - 1)
    sa, sb, var = (torch.as_tensor(v, dtype=dtype, device=x_a.device) for v in (sigma_a, sigma_b, x_var))
    sa, sb, var = (v.reshape(shape) if v.ndim > 0 else v for v in (sa, sb, var))
    n = (x_a - x_hat) / sa
    n_sq = n.square().flatten(1).mean(dim=1).reshape(shape).clamp(min=torch.finfo(dtype).tiny)
    return x_hat + (sb.square() + (1 - sb / sa).square() * var / n_sq).sqrt() * n

def student_sampler(
    net, latents, class_labels=None,
    sigmas      = None,             # S + 1 levels ending in 0.
    randn_like  = torch.randn_like,
    stochastic  = False,            # Re-noise instead of the DDIM step?
):
    """Sample a multistep consistency student in S evaluations (DDIM steps); returns float64 images."""
    assert sigmas is not None
    sigmas = check_student_sigmas(sigmas).to(latents.device)
    x = latents.to(torch.float64) * sigmas[0]
    for sigma_cur, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x_hat = net(x, sigma_cur, class_labels).to(torch.float64)
        if sigma_next == 0:
            x = x_hat
        elif stochastic:
            x = x_hat + sigma_next * randn_like(x_hat)
        else:
            x = x_hat + (sigma_next / sigma_cur) * (x - x_hat)
    return x

#----------------------------------------------------------------------------
# Images of seeds.

class StackedRandomGenerator:
    """Random numbers for a batch whose row i is seeded with seeds[i] mod 2^32."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])

def generate_images(net, seeds, device, sample_fn, classes=None, clip=True, **sample_kwargs):
    """Float64 images [N, C, H, W] of `seeds` by `sample_fn`; each seed draws its latents, then its class."""
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    class_labels = None
    if net.label_dim:
        idx = rnd.randint(net.label_dim, size=[len(seeds)], device=device)
        if classes is not None:
            idx = torch.as_tensor(classes, device=device).expand(len(seeds)) % net.label_dim
        class_labels = torch.eye(net.label_dim, device=device)[idx]
    with torch.no_grad():
        images = sample_fn(net, latents, class_labels, randn_like=rnd.randn_like, **sample_kwargs).to(torch.float64)
    return images.clip(-1, 1) if clip else images

def to_uint8(images):
    """Images in [-1, 1] -> uint8, quantized as generate.py writes them."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)

def image_grid(images):
    """Tile uint8 HWC images into a near-square HWC grid (empty cells black)."""
    cols = int(np.ceil(np.sqrt(len(images))))
    rows = (len(images) - 1) // cols + 1
    h, w, c = images[0].shape
    grid = np.zeros([rows, cols, h, w, c], dtype=np.uint8)
    for i, image in enumerate(images):
        grid[i // cols, i % cols] = image
    return grid.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)

#----------------------------------------------------------------------------

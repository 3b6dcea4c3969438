"""Samplers of the project, shared by generate.py and in-training validation.

* `edm_sampler`: the second-order (Heun) sampler of Karras et al. (2022),
  Algorithm 2, deterministic or with stochastic churn; 2 * num_steps - 1
  network evaluations.
* `euler_sampler`: the first-order (Euler = DDIM) sampler on the same grid;
  num_steps evaluations. At equal NFE it is the teacher's own few-step
  baseline (Euler with 2 * n - 1 steps against Heun with n).
* `student_sampler`: the S-step sampler of a multistep consistency student
  over its grid of S + 1 noise levels (cd-spec section 8); S evaluations,
  with DDIM steps, aDDIM steps or re-noising between them.
* `addim_step`, `addim_variance`: the adjusted DDIM step of Heek et al.
  (2024) in EDM space, shared with the distillation loss.

The noise-level grids are defined here once: `karras_sigmas` (the teacher
grid, also used by the distillation) and `student_sigmas` (the student
layouts of cd-spec section 3). Grids are float64; the samplers do their
arithmetic in float64 as EDM does and hand the network float64 inputs, which
the EDM wrappers cast to the precision they run in. Every sampler returns
float64 images in [-1, 1] (up to sampling error) at noise level 0.

`StackedRandomGenerator` draws the random numbers of a batch from one
generator per seed, so that each image depends only on its own seed;
`generate_images` samples the images of a list of seeds with it, as
generate.py, validation and the demo do, and `to_uint8` and `image_grid`
turn them into what those write.
"""

import numpy as np
import torch

#----------------------------------------------------------------------------
# Noise-level grids.

def karras_sigmas(num_nodes, sigma_min=0.002, sigma_max=80, rho=7, round_sigma=None):
    """The Karras et al. (2022) grid of `num_nodes` noise levels, descending.

    sigma_i = (sigma_max^(1/rho) + i / (num_nodes - 1) * (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    for i = 0 .. num_nodes - 1, computed in float64 on the CPU; a single node
    is sigma_max alone. `round_sigma` (a network's `round_sigma`) is applied
    to the result when given. Returns a float64 tensor without the final 0.
    """
    num_nodes = int(num_nodes)
    if num_nodes < 1:
        raise ValueError(f'num_nodes={num_nodes} is invalid: a Karras grid needs at least 1 node.')
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f'sigma_min={sigma_min}, sigma_max={sigma_max} is invalid: the grid needs 0 < sigma_min < sigma_max.')
    if not rho > 0:
        raise ValueError(f'rho={rho} is invalid: it must be positive.')
    if num_nodes == 1:
        sigmas = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        frac = torch.arange(num_nodes, dtype=torch.float64) / (num_nodes - 1)
        lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
        sigmas = (hi + frac * (lo - hi)) ** rho
    if round_sigma is not None:
        sigmas = torch.as_tensor(round_sigma(sigmas)).to(torch.float64)
    return sigmas

def student_sigmas(S, layout='karras', sigma_min=0.002, sigma_max=80, rho=7, interior=None, round_sigma=None):
    """The S + 1 noise levels of a student with S segments, descending, ending in 0.

    layout='karras':       the S Karras nodes from sigma_max to sigma_min, then 0.
    layout='karras_open':  the first S nodes of an (S + 1)-node Karras grid, then 0.
    layout='explicit':     sigma_max, the S - 1 descending values of `interior`
                           (each inside (0, sigma_max)), then 0.
    The positive nodes pass through `round_sigma` when given. Returns float64.
    """
    S = int(S)
    if S < 1:
        raise ValueError(f'S={S} is invalid: a student needs at least 1 step.')
    if layout != 'explicit' and interior is not None:
        raise ValueError(f'interior sigmas were given with layout="{layout}"; pass layout="explicit" to use them.')
    if layout == 'karras':
        nodes = karras_sigmas(S, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    elif layout == 'karras_open':
        nodes = karras_sigmas(S + 1, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)[:S]
    elif layout == 'explicit':
        if interior is None:
            raise ValueError('layout="explicit" needs the S - 1 interior sigmas; pass them as `interior`.')
        interior = [float(v) for v in interior]
        if len(interior) != S - 1:
            raise ValueError(f'{len(interior)} interior sigmas were given for S={S}; give exactly S - 1 = {S - 1}.')
        if not all(0 < v < sigma_max for v in interior) or any(a <= b for a, b in zip(interior[:-1], interior[1:])):
            raise ValueError(f'interior sigmas {interior} are invalid: they must descend strictly inside (0, sigma_max={sigma_max}).')
        nodes = torch.tensor([float(sigma_max)] + interior, dtype=torch.float64)
    else:
        raise ValueError(f'layout="{layout}" is unknown; use "karras", "karras_open" or "explicit".')
    if round_sigma is not None:
        nodes = torch.as_tensor(round_sigma(nodes)).to(torch.float64)
    sigmas = torch.cat([nodes, torch.zeros(1, dtype=torch.float64)])
    check_student_sigmas(sigmas)
    return sigmas

def check_student_sigmas(sigmas):
    """Return `sigmas` as a float64 tensor after checking it is a student grid.

    A student grid holds S + 1 >= 2 strictly descending values, the last 0
    and the others positive and finite; a `ValueError` says which rule fails.
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    values = sigmas.tolist() if sigmas.ndim == 1 else None
    if values is None or len(values) < 2:
        raise ValueError(f'student sigmas {sigmas.tolist()} are invalid: give a list of S + 1 >= 2 noise levels.')
    if values[-1] != 0 or not all(np.isfinite(v) and v > 0 for v in values[:-1]):
        raise ValueError(f'student sigmas {values} are invalid: all must be positive and finite except the last, which must be 0.')
    if any(a <= b for a, b in zip(values[:-1], values[1:])):
        raise ValueError(f'student sigmas {values} are invalid: they must descend strictly.')
    return sigmas

def noise_range(net):
    """(sigma_min, sigma_max, round_sigma) of a network; EDM2's networks, which have
    none of them, support every noise level and need no rounding."""
    return getattr(net, 'sigma_min', 0), getattr(net, 'sigma_max', float('inf')), getattr(net, 'round_sigma', lambda sigma: sigma)

def noise_range_note(net, what='The network', grid='the noise levels of the grid'):
    """The sentence that says a network lacks sigma_min, sigma_max or round_sigma (so that `grid` is used
    without rounding), or None when it has all three."""
    missing = [name for name in ('sigma_min', 'sigma_max', 'round_sigma') if not hasattr(net, name)]
    return f'{what} ({type(net).__name__}) has no {", ".join(missing)}: {grid} are used without rounding.' if missing else None

#----------------------------------------------------------------------------
# Teacher samplers (EDM grid, optional stochastic churn).

def _karras_ode_sampler(net, latents, class_labels, randn_like, num_steps, sigma_min, sigma_max,
    rho, S_churn, S_min, S_max, S_noise, second_order):
    """Shared loop of `edm_sampler` (second_order=True) and `euler_sampler`."""
    num_steps = int(num_steps)
    if num_steps < 1:
        raise ValueError(f'num_steps={num_steps} is invalid: sample with at least 1 step.')
    net_min, net_max, round_sigma = noise_range(net)
    sigma_min = max(sigma_min, net_min)
    sigma_max = min(sigma_max, net_max)
    t_steps = karras_sigmas(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, round_sigma=round_sigma)
    t_steps = torch.cat([t_steps, torch.zeros(1, dtype=torch.float64)]).to(latents.device)
    max_gamma = min(S_churn / num_steps, np.sqrt(2) - 1)

    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next

        # Churn: raise the noise level from t_cur to t_hat with fresh noise.
        gamma = max_gamma if S_min <= t_cur <= S_max else 0
        t_hat = torch.as_tensor(round_sigma(t_cur + gamma * t_cur)).to(torch.float64)
        x_hat = x_cur
        if S_churn > 0: # Noise is drawn at every step, so the random stream matches EDM's.
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)

        # Euler step from t_hat to t_next.
        denoised = net(x_hat, t_hat, class_labels).to(torch.float64)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Second-order correction (trapezoid), except on the step to 0.
        if second_order and i < num_steps - 1:
            denoised = net(x_next, t_next, class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

def edm_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps   = 18,           # Noise levels of the Karras grid (before the final 0).
    sigma_min   = 0.002,        # Lowest noise level (raised to net.sigma_min if needed).
    sigma_max   = 80,           # Highest noise level (lowered to net.sigma_max if needed).
    rho         = 7,            # Exponent of the Karras grid.
    S_churn     = 0,            # Total stochasticity; 0 = deterministic ODE sampler.
    S_min       = 0,            # Churn only at noise levels >= S_min ...
    S_max       = float('inf'), # ... and <= S_max.
    S_noise     = 1,            # Scale of the churn noise.
):
    """EDM's Heun sampler (2 * num_steps - 1 network evaluations).

    `latents` are unit Gaussian noise [N, C, H, W], scaled here to sigma_max;
    `randn_like` draws the churn noise. Returns float64 images.
    """
    return _karras_ode_sampler(net, latents, class_labels, randn_like, num_steps, sigma_min, sigma_max,
        rho, S_churn, S_min, S_max, S_noise, second_order=True)

def euler_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like,
    num_steps   = 18,           # Noise levels of the Karras grid (before the final 0).
    sigma_min   = 0.002,        # Lowest noise level (raised to net.sigma_min if needed).
    sigma_max   = 80,           # Highest noise level (lowered to net.sigma_max if needed).
    rho         = 7,            # Exponent of the Karras grid.
    S_churn     = 0,            # Total stochasticity; 0 = deterministic ODE sampler.
    S_min       = 0,            # Churn only at noise levels >= S_min ...
    S_max       = float('inf'), # ... and <= S_max.
    S_noise     = 1,            # Scale of the churn noise.
):
    """First-order (Euler = DDIM) sampler on EDM's grid (num_steps network evaluations).

    The same grid and churn as `edm_sampler`, without the second-order
    correction. Returns float64 images.
    """
    return _karras_ode_sampler(net, latents, class_labels, randn_like, num_steps, sigma_min, sigma_max,
        rho, S_churn, S_min, S_max, S_noise, second_order=False)

#----------------------------------------------------------------------------
# Adjusted DDIM (Heek, Hoogeboom & Salimans 2024, section 3.2; technical report section 9.1).

def addim_variance(sigma, scale=0.1, prior=0.5):
    """The analytic per-element posterior variance of aDDIM at noise level `sigma`:
    scale * prior sigma^2 / (prior + sigma^2), i.e. `scale` times the posterior
    variance of data with a factorised Gaussian prior of variance `prior`
    (a tensor keeps its dtype, a number becomes float64)."""
    sigma = sigma if isinstance(sigma, torch.Tensor) else torch.as_tensor(sigma, dtype=torch.float64)
    return scale * prior * sigma ** 2 / (prior + sigma ** 2)

def addim_step(x_hat, x_a, sigma_a, sigma_b, x_var, dtype=torch.float64):
    """aDDIM step sigma_a -> sigma_b for the x-prediction x_hat [N, ...]:
    x_b = x_hat + sqrt(sigma_b^2 + (1 - sigma_b / sigma_a)^2 x_var / mean(n^2)) n
    with n = (x_a - x_hat) / sigma_a (per-sample mean over the elements) and
    `x_var` the per-element posterior variance of the data given x_a (scalar
    or [N]). With x_var = 0 it is the DDIM step x_hat + sigma_b n. Requires sigma_a > 0."""
    x_hat = x_hat.to(dtype)
    x_a = x_a.to(dtype)
    shape = [-1] + [1] * (x_a.ndim - 1)
    sa = torch.as_tensor(sigma_a, dtype=dtype, device=x_a.device)
    sb = torch.as_tensor(sigma_b, dtype=dtype, device=x_a.device)
    sa, sb = (s.reshape(shape) if s.ndim > 0 else s for s in (sa, sb))
    var = torch.as_tensor(x_var, dtype=dtype, device=x_a.device)
    var = var.reshape(shape) if var.ndim > 0 else var
    n = (x_a - x_hat) / sa
    n_sq = n.square().flatten(1).mean(dim=1).reshape(shape).clamp(min=torch.finfo(dtype).tiny)
    coef = (sb.square() + (1 - sb / sa).square() * var / n_sq).sqrt()
    return x_hat + coef * n

#----------------------------------------------------------------------------
# Student sampler.

def student_sampler(
    net, latents, class_labels=None,
    sigmas      = None,             # Student grid: S + 1 descending noise levels ending in 0.
    randn_like  = torch.randn_like, # Noise of the stochastic variant.
    stochastic  = False,            # Re-noise the prediction to the next level instead of the DDIM step?
    addim_scale = 0,                # aDDIM steps with addim_variance(sigma, addim_scale, addim_prior); 0 = DDIM.
    addim_prior = 0.5,              # Prior variance of that posterior variance.
):
    """Sample a multistep consistency student in S = len(sigmas) - 1 network evaluations.

    x = latents * sigmas[0]; for j = 0 .. S - 1: x_hat = net(x, sigmas[j]) and
    x = x_hat + sigmas[j+1] / sigmas[j] * (x - x_hat) (deterministic; the
    aDDIM step with addim_scale > 0), or x = x_hat + sigmas[j+1] * noise
    (stochastic); the last step returns x_hat. Returns float64 images.
    """
    if sigmas is None:
        raise ValueError('student_sampler needs the student grid; pass sigmas (e.g. the snapshot\'s consistency["student_sigmas"]).')
    if not addim_scale >= 0 or not addim_prior > 0:
        raise ValueError(f'addim_scale={addim_scale}, addim_prior={addim_prior} are invalid: the scale must be 0 (DDIM) or positive and the prior variance positive.')
    if stochastic and addim_scale > 0:
        raise ValueError(f'stochastic=True and addim_scale={addim_scale} both choose the step between levels; pass only one of them.')
    sigmas = check_student_sigmas(sigmas).to(latents.device)
    x = latents.to(torch.float64) * sigmas[0]
    for sigma_cur, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x_hat = net(x, sigma_cur, class_labels).to(torch.float64)
        if sigma_next == 0:
            x = x_hat
        elif stochastic:
            x = x_hat + sigma_next * randn_like(x_hat)
        elif addim_scale > 0:
            x = addim_step(x_hat, x, sigma_cur, sigma_next, addim_variance(sigma_cur, addim_scale, addim_prior))
        else:
            x = x_hat + (sigma_next / sigma_cur) * (x - x_hat)
    return x

#----------------------------------------------------------------------------
# Per-seed random numbers.

class StackedRandomGenerator:
    """Random numbers for a batch drawn from one torch.Generator per seed.

    Row i of every draw comes from the generator of seeds[i] (seeded with
    seed mod 2^32), so it does not depend on the other seeds of the batch.
    """

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        if size[0] != len(self.generators):
            raise ValueError(f'size[0]={size[0]} does not match the {len(self.generators)} seeds of the batch.')
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        if size[0] != len(self.generators):
            raise ValueError(f'size[0]={size[0]} does not match the {len(self.generators)} seeds of the batch.')
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])

#

#----------------------------------------------------------------------------
# Images of seeds.

def generate_images(net, seeds, device, sample_fn, classes=None, clip=True, **sample_kwargs):
    """Sample the images of `seeds` with `sample_fn(net, latents, class_labels,
    randn_like, **sample_kwargs)`. Each seed's generator draws its latents, then
    (for a conditional network) a random class, which `classes` overrides: an int
    for every image or one class index per seed. Returns float64 [N, C, H, W]
    images clipped to [-1, 1] (with `clip`; a latent network's final latents are
    not clipped)."""
    rnd = StackedRandomGenerator(device, seeds)
    latents = rnd.randn([len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device)
    class_labels = None
    if net.label_dim:
        idx = rnd.randint(net.label_dim, size=[len(seeds)], device=device)
        if classes is not None:
            idx = torch.as_tensor(classes, device=device).expand(len(seeds)) % net.label_dim
        class_labels = torch.eye(net.label_dim, device=device)[idx]
    with torch.no_grad():
        images = sample_fn(net, latents, class_labels, randn_like=rnd.randn_like, **sample_kwargs)
    return images.to(torch.float64).clip(-1, 1) if clip else images.to(torch.float64)

def to_uint8(images):
    """Images in [-1, 1] -> uint8 (N, C, H, W), quantized as generate.py writes them."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)

def image_grid(images):
    """Tile uint8 HWC images row by row into a near-square uint8 HWC grid (empty cells black)."""
    cols = int(np.ceil(np.sqrt(len(images))))
    rows = (len(images) - 1) // cols + 1
    h, w, c = images[0].shape
    grid = np.zeros([rows, cols, h, w, c], dtype=np.uint8)
    for i, image in enumerate(images):
        grid[i // cols, i % cols] = image
    return grid.transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)

#----------------------------------------------------------------------------

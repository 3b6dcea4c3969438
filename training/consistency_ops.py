"""Consistency distillation's hops, teacher grid and segments, edge sampling and T annealing (docs/cd-spec.md)."""

import numpy as np
import torch

from training.samplers import addim_step, addim_variance, karras_sigmas, student_sigmas, check_student_sigmas

#----------------------------------------------------------------------------

TERMINAL        = 0         # Edge ending at sigma = 0.
BOUNDARY        = 1         # Edge whose teacher hop reaches the segment boundary.
GENERAL         = 2         # Edge ending above the boundary: the target network bridges the rest.
CASE_NAMES      = ('terminal', 'boundary', 'general')
SAMPLING_MODES  = ('uniform', 'vp', 'edm')
ANNEAL_MODES    = ('geometric', 'linear')
SIGMA_RTOL      = 1e-5      # Relative tolerance of "a teacher node is a student sigma".

#----------------------------------------------------------------------------
# One-step maps (cd-spec section 2).

def expand_sigma(sigma, x):
    """Noise levels [N] (or a scalar) shaped to broadcast against x [N, ...], in x's dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return sigma if sigma.ndim == 0 else sigma.reshape([-1] + [1] * (x.ndim - 1))

def ddim_step(x_hat, x_a, sigma_a, sigma_b, dtype=torch.float32):
    """DDIM (Euler) step sigma_a -> sigma_b: x_hat + (sigma_b / sigma_a) (x_a - x_hat). Requires sigma_a > 0."""
    x_hat, x_a = x_hat.to(dtype), x_a.to(dtype)
    ratio = expand_sigma(sigma_b, x_a) / expand_sigma(sigma_a, x_a)
    return x_hat + ratio * (x_a - x_hat)

def inverse_ddim(x_ref, x_t, sigma_t, sigma_ref, dtype=torch.float32):
    """(x_hat*, gain): the prediction with which DDIM from (x_t, sigma_t) lands on x_ref at sigma_ref, 1 / (1 - r)."""
    x_ref, x_t = x_ref.to(dtype), x_t.to(dtype)
    sigma_ref, sigma_t = (torch.as_tensor(v, dtype=dtype, device=x_t.device) for v in (sigma_ref, sigma_t))
    r = sigma_ref / sigma_t
    gain = 1 / (1 - r)
    return (x_ref - expand_sigma(r, x_t) * x_t) * expand_sigma(gain, x_t), gain

def heun_hop(denoise, x_a, sigma_a, sigma_b, dtype=torch.float32):
    """The teacher's Heun hop sigma_a -> sigma_b per sample (Euler where sigma_b = 0), denoising the whole batch."""
    x_a = x_a.to(dtype)
    sigma_a, sigma_b = (torch.as_tensor(v, dtype=dtype, device=x_a.device).expand(len(x_a)) for v in (sigma_a, sigma_b))
    sa, sb = expand_sigma(sigma_a, x_a), expand_sigma(sigma_b, x_a)
    k1 = (x_a - denoise(x_a, sigma_a).to(dtype)) / sa
    x_e = x_a + (sb - sa) * k1
    positive = sb > 0
    sigma_2 = torch.where(sigma_b > 0, sigma_b, sigma_a)
    x_2 = torch.where(positive, x_e, x_a)
    k2 = (x_2 - denoise(x_2, sigma_2).to(dtype)) / expand_sigma(sigma_2, x_a)
    return torch.where(positive, x_a + (sb - sa) * ((k1 + k2) / 2), x_e)

def addim_hop(denoise, x_a, sigma_a, sigma_b, dtype=torch.float32, scale=0.1, prior=0.5):
    """The teacher's aDDIM hop (Heek et al. 2024, Algorithm 1): its Euler step lengthened by the variance estimate
    addim_variance(sigma_a, scale, prior); one evaluation; scale = 0, or sigma_b = 0, is the Euler step."""
    x_a = x_a.to(dtype)
    sigma_a, sigma_b = (torch.as_tensor(v, dtype=dtype, device=x_a.device).expand(len(x_a)) for v in (sigma_a, sigma_b))
    x_var = addim_variance(sigma_a, scale, prior) * (sigma_b > 0)
    return addim_step(denoise(x_a, sigma_a), x_a, sigma_a, sigma_b, x_var, dtype=dtype)

def make_denoiser(net, labels=None, augment_labels=None):
    """An EDM-style network as the `denoise(x, sigma)` of `heun_hop`."""
    kwargs = {} if augment_labels is None else dict(augment_labels=augment_labels)
    return lambda x, sigma: net(x, sigma, labels, **kwargs)

#----------------------------------------------------------------------------
# Teacher grid and sigma-anchored segments (cd-spec section 3).

def teacher_sigmas(T, student, sigma_min=0.002, sigma_max=80, rho=7, round_sigma=None, rtol=SIGMA_RTOL):
    """The smallest Karras grid keeping T' >= T edges once repeats and inner nodes on a student sigma are removed."""
    num_nodes = T = int(T)
    assert T >= 1
    interior = check_student_sigmas(student)[1:-1]
    while True:
        nodes = karras_sigmas(num_nodes, sigma_min, sigma_max, rho, round_sigma)
        keep = torch.ones(len(nodes), dtype=torch.bool)
        keep[1:] = nodes[1:] < nodes[:-1] # Rounding may produce repeats.
        if len(interior) > 0 and len(nodes) > 2:
            on_student = ((nodes[1:-1, None] - interior[None, :]).abs() <= rtol * interior[None, :]).any(dim=1)
            keep[1:-1] &= ~on_student
        nodes = nodes[keep]
        if len(nodes) >= T:
            return torch.cat([nodes, torch.zeros(1, dtype=torch.float64)])
        num_nodes += 1

def segment_edges(teacher, student, T=None, rtol=SIGMA_RTOL):
    """Segment j of every teacher edge, the one whose (sigma^s_{j+1}, sigma^s_j] holds its upper sigma."""
    teacher = torch.as_tensor(teacher, dtype=torch.float64).cpu()
    student = check_student_sigmas(student)
    S = len(student) - 1
    seg = (student[None, 1:] >= teacher[:-1, None] * (1 - rtol)).sum(dim=1)
    empty = (torch.bincount(seg, minlength=S) == 0).nonzero().flatten().tolist()
    if empty:
        text = lambda sigmas: '[' + ', '.join(f'{float(v):.6g}' for v in sigmas) + ']'
        raise ValueError(f'With S={S}, T={len(teacher) - 1 if T is None else T} (teacher grid {text(teacher)}) and '
            f'student grid {text(student)}, segment(s) {empty} hold no teacher edge; '
            f'raise T (T_start) or spread the student sigmas further apart.')
    return seg

def edge_probs(sigma_t, seg, S, mode='vp', rho=7, terminal_anchor=True, terminal_prob=None, P_mean=-1.2, P_std=1.2):
    """The float64 probability of each teacher edge under `mode` (the last one `terminal_prob` if `terminal_anchor`)."""
    sigma_t = torch.as_tensor(sigma_t, dtype=torch.float64).cpu()
    seg = torch.as_tensor(seg).cpu()
    if mode == 'uniform':
        counts = torch.bincount(seg, minlength=S).to(torch.float64)
        weights = 1 / (S * counts[seg])
    elif mode == 'vp':
        weights = sigma_t ** (1 - 1 / rho) / (1 + sigma_t ** 2)
    else:
        assert mode == 'edm'
        weights = sigma_t ** (-1 / rho) * torch.exp(-(sigma_t.log() - P_mean) ** 2 / (2 * P_std ** 2))
    assert terminal_prob is None or 0 < terminal_prob < 1
    if terminal_anchor and len(sigma_t) > 1:
        p_term = 1 / len(sigma_t) if terminal_prob is None else float(terminal_prob)
        rest = weights[:-1] / weights[:-1].sum()
        return torch.cat([rest * (1 - p_term), torch.tensor([p_term], dtype=torch.float64)])
    return weights / weights.sum()

class TeacherGrid:
    """Per-edge tables of one teacher grid: seg, case, sigma_t, sigma_s (hop end), sigma_ref (boundary), gain, probs."""

    def __init__(self,
        T,                          # The grid has T' >= T edges.
        student,                    # S + 1 values ending in 0.
        sigma_min       = 0.002,
        sigma_max       = 80,
        rho             = 7,
        round_sigma     = None,     # The teacher's, or None.
        sampling_mode   = 'vp',     # 'uniform', 'vp' or 'edm'.
        terminal_anchor = True,     # Fixed terminal edge probability?
        terminal_prob   = None,     # None = 1/T'.
        device          = 'cpu',
    ):
        self.T = int(T)
        self.student = check_student_sigmas(student)
        self.S = len(self.student) - 1
        self.sigmas = teacher_sigmas(self.T, self.student, sigma_min, sigma_max, rho, round_sigma)
        self.num_edges = len(self.sigmas) - 1
        seg = segment_edges(self.sigmas, self.student, T=self.T)
        upper, lower = self.sigmas[:-1], self.sigmas[1:]
        sigma_b = self.student[seg + 1]
        case = torch.where(lower <= sigma_b * (1 + SIGMA_RTOL), BOUNDARY, GENERAL)
        case[-1] = TERMINAL
        sigma_s, sigma_ref = torch.where(case == GENERAL, lower, sigma_b), sigma_b.clone()
        sigma_s[-1] = sigma_ref[-1] = 0
        assert bool((sigma_ref < upper).all())
        probs = edge_probs(upper, seg, self.S, sampling_mode, rho, terminal_anchor, terminal_prob)
        tables = dict(seg=seg, case=case, sigma_t=upper, sigma_s=sigma_s, sigma_ref=sigma_ref,
            gain=1 / (1 - sigma_ref / upper), probs=probs)
        self.device = torch.device(device)
        cuda = self.device.type == 'cuda'
        for name, value in tables.items(): # Without blocking: a new T needs no host synchronisation.
            value = value.pin_memory().to(self.device, non_blocking=True) if cuda else value.to(self.device)
            setattr(self, name, value)

    def sample(self, n, generator=None):
        """n edge indices drawn from `probs` with replacement."""
        return torch.multinomial(self.probs, int(n), replacement=True, generator=generator)

class TeacherGridCache:
    """TeacherGrids by (T, device), built on demand; keeps the `capacity` most recent."""

    def __init__(self, capacity=4, **grid_kwargs):
        self.capacity = capacity
        self.grid_kwargs = grid_kwargs
        self._grids = dict()

    def get(self, T, device='cpu'):
        key = (int(T), str(torch.device(device)))
        grid = self._grids.pop(key, None)
        if grid is None:
            grid = TeacherGrid(T, device=device, **self.grid_kwargs)
        self._grids[key] = grid
        while len(self._grids) > self.capacity:
            self._grids.pop(next(iter(self._grids)))
        return grid

#----------------------------------------------------------------------------
# Edge-count annealing (cd-spec section 6) and the student grid.

def anneal_T(cur_nimg, T_start=64, T_end=1280, T_anneal_kimg=10000, mode='geometric'):
    """Teacher edge count after `cur_nimg` images, from T_start to T_end over T_anneal_kimg."""
    assert mode in ANNEAL_MODES and int(T_start) >= 1 and int(T_end) >= 1
    frac = 1.0 if T_anneal_kimg <= 0 else float(np.clip(cur_nimg / (T_anneal_kimg * 1000), 0, 1))
    T = T_start * (T_end / T_start) ** frac if mode == 'geometric' else T_start + frac * (T_end - T_start)
    return int(np.clip(round(T), min(T_start, T_end), max(T_start, T_end)))

def parse_student_sigmas(text):
    """`student_sigmas` text: a layout name, or the S - 1 interior sigmas as floats."""
    if text in ('karras', 'karras_open'):
        return text
    try:
        values = [float(part) for part in text.split(',')]
    except ValueError:
        values = []
    if not values or not all(np.isfinite(values)):
        raise ValueError(f'student_sigmas={text} is neither karras, karras_open nor a comma-separated list of numbers; '
            'pass a layout name or the S-1 interior sigmas, e.g. 2.5,0.5,0.1.')
    return values

def build_student_sigmas(S, grid='karras', sigma_min=0.002, sigma_max=80, rho=7, round_sigma=None):
    """Student grid of 'karras', 'karras_open' or the S - 1 interior sigmas (a sequence or text)."""
    grid = parse_student_sigmas(grid) if isinstance(grid, str) else list(grid)
    layout, interior = (grid, None) if isinstance(grid, str) else ('explicit', grid)
    return student_sigmas(S, layout, sigma_min, sigma_max, rho, interior, round_sigma)

#----------------------------------------------------------------------------

"""Building blocks of multistep consistency distillation in EDM space
(docs: cd-spec sections 2, 3 and 5).

* One-step maps: `ddim_step`, `inverse_ddim` (with its gain) and the
  teacher's `heun_hop`, all computed in a stated float dtype (float32 by
  default, float64 on request) whatever precision the networks run in.
* Grids: the Karras grid and the student layouts come from
  `training.samplers` (`karras_sigmas`, `student_sigmas`); this module adds
  the teacher grid of a target edge count T (`teacher_sigmas`), its
  sigma-anchored segmentation (`segment_edges`) and the per-edge tables of a
  training draw (`TeacherGrid`, cached per T by `TeacherGridCache`).
* Edge sampling: `edge_probs` for `uniform | vp | edm` with the optional
  terminal anchor; `TeacherGrid.sample` draws a batch of edges at once.
* Annealing: `anneal_T` maps the number of images seen to the edge count.

Decisions where the spec is silent:
* Teacher nodes that `round_sigma` maps onto an equal or larger value than
  their predecessor are dropped as duplicates, so the grid stays strictly
  descending; the student-sigma filter (relative tolerance 1e-5) spares the
  first node and the last positive one.
* Comparisons of teacher nodes with student sigmas use the same relative
  tolerance, so a teacher node within 1e-5 of a student sigma counts as lying
  on it (it belongs to the segment below and a hop that reaches it is a
  boundary hop).
* `TeacherGridCache` keeps the grids of the few most recent T only: T grows
  monotonically during training, so older grids are not needed again, and
  thousands of distinct T over an annealing run would otherwise pile up.
"""

import numpy as np
import torch

from training.samplers import karras_sigmas, student_sigmas, check_student_sigmas

#----------------------------------------------------------------------------
# Constants.

TERMINAL        = 0         # Case of an edge ending at sigma = 0: the reference is the clean image.
BOUNDARY        = 1         # Case of an edge whose teacher hop reaches the segment boundary.
GENERAL         = 2         # Case of an edge ending strictly above the boundary: the target network bridges the rest.
CASE_NAMES      = ('terminal', 'boundary', 'general')
SAMPLING_MODES  = ('uniform', 'vp', 'edm')
ANNEAL_MODES    = ('geometric', 'linear')
SIGMA_RTOL      = 1e-5      # Relative tolerance for "this teacher node is a student sigma".

#----------------------------------------------------------------------------
# One-step maps (cd-spec section 2).

def expand_sigma(sigma, x):
    """Per-sample noise levels [N] (or a scalar) shaped to broadcast against x [N, ...], in x's dtype."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        return sigma
    return sigma.reshape([-1] + [1] * (x.ndim - 1))

def ddim_step(x_hat, x_a, sigma_a, sigma_b, dtype=torch.float32):
    """DDIM / Euler step sigma_a -> sigma_b for the x-prediction x_hat:
    x_b = x_hat + (sigma_b / sigma_a) (x_a - x_hat). Requires sigma_a > 0."""
    x_hat = x_hat.to(dtype)
    x_a = x_a.to(dtype)
    ratio = expand_sigma(sigma_b, x_a) / expand_sigma(sigma_a, x_a)
    return x_hat + ratio * (x_a - x_hat)

def inverse_ddim(x_ref, x_t, sigma_t, sigma_ref, dtype=torch.float32):
    """The x-prediction with which DDIM from (x_t, sigma_t) lands on x_ref at sigma_ref.

    x_hat* = (x_ref - r x_t) / (1 - r) with r = sigma_ref / sigma_t, which
    requires 0 <= sigma_ref < sigma_t (the caller guarantees it; the grids of
    this module do). Returns (x_hat*, gain) with gain = 1 / (1 - r) per sample.
    """
    x_ref = x_ref.to(dtype)
    x_t = x_t.to(dtype)
    r = torch.as_tensor(sigma_ref, dtype=dtype, device=x_t.device) / torch.as_tensor(sigma_t, dtype=dtype, device=x_t.device)
    gain = 1 / (1 - r)
    r_x = expand_sigma(r, x_t)
    return (x_ref - r_x * x_t) * expand_sigma(gain, x_t), gain

def heun_hop(denoise, x_a, sigma_a, sigma_b, dtype=torch.float32):
    """The teacher's deterministic Heun hop sigma_a -> sigma_b, per sample.

    `denoise(x, sigma)` evaluates the teacher on x [n, ...] at the noise
    levels sigma [n]; every call covers the whole batch, so that the shapes
    are fixed. Samples with sigma_b = 0 take the
    Euler step x_b = D(x_a; sigma_a): the second evaluation sees them at
    (x_a, sigma_a) and its result is discarded, so the teacher is never
    evaluated at sigma = 0. All arithmetic is in `dtype`.
    """
    x_a = x_a.to(dtype)
    sigma_a = torch.as_tensor(sigma_a, dtype=dtype, device=x_a.device).expand(x_a.shape[0])
    sigma_b = torch.as_tensor(sigma_b, dtype=dtype, device=x_a.device).expand(x_a.shape[0])
    sa = expand_sigma(sigma_a, x_a)
    sb = expand_sigma(sigma_b, x_a)
    k1 = (x_a - denoise(x_a, sigma_a).to(dtype)) / sa
    x_e = x_a + (sb - sa) * k1
    positive = sb > 0
    sigma_2 = torch.where(sigma_b > 0, sigma_b, sigma_a)
    x_2 = torch.where(positive, x_e, x_a)
    k2 = (x_2 - denoise(x_2, sigma_2).to(dtype)) / expand_sigma(sigma_2, x_a)
    return torch.where(positive, x_a + (sb - sa) * ((k1 + k2) / 2), x_e) # For sigma_b = 0 the Euler step lands on D(x_a; sigma_a).

def make_denoiser(net, labels=None, augment_labels=None):
    """Wrap an EDM-style network as the `denoise(x, sigma)` callable of `heun_hop`, for a whole batch
    with its labels and augmentation labels."""
    def denoise(x, sigma):
        if augment_labels is None:
            return net(x, sigma, labels)
        return net(x, sigma, labels, augment_labels=augment_labels)
    return denoise

#----------------------------------------------------------------------------
# Teacher grid and sigma-anchored segments (cd-spec section 3).

def _grid_text(sigmas):
    return '[' + ', '.join(f'{float(v):.6g}' for v in sigmas) + ']'

def teacher_sigmas(T, student, sigma_min=0.002, sigma_max=80, rho=7, round_sigma=None, rtol=SIGMA_RTOL):
    """The teacher grid for a target edge count T against the student grid `student` (S + 1 values).

    A Karras grid of N >= T nodes (float64, through `round_sigma`) from which
    every node except the first and the last equal to an interior student
    sigma (within `rtol`) is removed, plus a final 0; N is the smallest
    count >= T that leaves at least T edges. Returns a float64 tensor sigma^t_0 > ... > sigma^t_T' = 0.
    """
    T = int(T)
    if T < 1:
        raise ValueError(f'T={T} is invalid: the teacher grid needs at least 1 edge.')
    student = check_student_sigmas(student)
    interior = student[1:-1]
    num_nodes = T
    while True:
        nodes = karras_sigmas(num_nodes, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, round_sigma=round_sigma)
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
    """Segment index j of every teacher edge: the one whose interval
    (sigma^s_{j+1}, sigma^s_j] holds the edge's upper sigma (sigma-anchored).
    Raises ValueError, naming S, T and the grids, when a segment holds no edge."""
    teacher = torch.as_tensor(teacher, dtype=torch.float64).cpu()
    student = check_student_sigmas(student)
    S = len(student) - 1
    upper = teacher[:-1]
    seg = (student[None, 1:] >= upper[:, None] * (1 - rtol)).sum(dim=1)
    counts = torch.bincount(seg, minlength=S)
    empty = (counts == 0).nonzero().flatten().tolist()
    if len(empty) > 0:
        T_text = f'T={T}' if T is not None else f'T={len(teacher) - 1}'
        raise ValueError(f'With S={S}, {T_text} (teacher grid {_grid_text(teacher)}) and student grid {_grid_text(student)}, '
            f'segment(s) {empty} hold no teacher edge; raise T (T_start) or spread the student sigmas further apart.')
    return seg

def edge_probs(sigma_t, seg, S, mode='vp', rho=7, terminal_anchor=True, terminal_prob=None, P_mean=-1.2, P_std=1.2):
    """Probability of drawing each teacher edge (cd-spec section 5), float64 [T'].

    `sigma_t` are the upper sigmas of the edges (the last edge is the terminal
    one), `seg` their segments. `uniform`: a segment uniformly, then an edge
    uniformly inside it. `vp`: weights sigma^(1 - 1/rho) / (1 + sigma^2).
    `edm`: weights sigma^(-1/rho) exp(-(ln sigma - P_mean)^2 / (2 P_std^2)).
    With `terminal_anchor` the terminal edge gets `terminal_prob` (None: 1/T')
    and the other edges share the rest in proportion to their weights.
    """
    sigma_t = torch.as_tensor(sigma_t, dtype=torch.float64).cpu()
    seg = torch.as_tensor(seg).cpu()
    num_edges = len(sigma_t)
    if mode == 'uniform':
        counts = torch.bincount(seg, minlength=S).to(torch.float64)
        weights = 1 / (S * counts[seg])
    elif mode == 'vp':
        weights = sigma_t ** (1 - 1 / rho) / (1 + sigma_t ** 2)
    elif mode == 'edm':
        weights = sigma_t ** (-1 / rho) * torch.exp(-(sigma_t.log() - P_mean) ** 2 / (2 * P_std ** 2))
    else:
        raise ValueError(f'sampling_mode="{mode}" is unknown; use one of {", ".join(SAMPLING_MODES)}.')
    if terminal_prob is not None and not 0 < terminal_prob < 1:
        raise ValueError(f'terminal_prob={terminal_prob:g} is outside (0, 1); pass a probability strictly between 0 and 1, or leave it out for 1/T\'.')
    if terminal_anchor and num_edges > 1:
        p_term = 1 / num_edges if terminal_prob is None else float(terminal_prob)
        rest = weights[:-1] / weights[:-1].sum()
        return torch.cat([rest * (1 - p_term), torch.tensor([p_term], dtype=torch.float64)])
    return weights / weights.sum()

class TeacherGrid:
    """Per-edge tables of one teacher grid, for vectorised training draws.

    For edge k (sigma^t_k -> sigma^t_{k+1}) in segment j with boundary
    sigma_b = sigma^s_{j+1}: `sigma_t` = sigma^t_k; `sigma_s` = the end of
    the teacher hop, max(sigma^t_{k+1}, sigma_b) (0 for the terminal edge);
    `sigma_ref` = sigma_b (0 for the terminal edge); `case` = TERMINAL,
    BOUNDARY or GENERAL; `gain` = 1 / (1 - sigma_ref / sigma_t); `probs` =
    the sampling probabilities. All float64 except `seg` and `case` (int64).
    """

    def __init__(self,
        T,                          # Target edge count; the grid has T' >= T edges.
        student,                    # Student grid, S + 1 values ending in 0.
        sigma_min       = 0.002,    # Lowest positive teacher sigma.
        sigma_max       = 80,       # Highest teacher sigma.
        rho             = 7,        # Exponent of the Karras grid.
        round_sigma     = None,     # The teacher's round_sigma, or None.
        sampling_mode   = 'vp',     # 'uniform', 'vp' or 'edm'.
        terminal_anchor = True,     # Give the terminal edge a fixed probability?
        terminal_prob   = None,     # That probability; None = 1/T'.
        device          = 'cpu',    # Device of the tables.
    ):
        self.T = int(T)
        self.student = check_student_sigmas(student)
        self.S = len(self.student) - 1
        self.sigmas = teacher_sigmas(self.T, self.student, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, round_sigma=round_sigma)
        self.num_edges = len(self.sigmas) - 1
        seg = segment_edges(self.sigmas, self.student, T=self.T)
        upper, lower = self.sigmas[:-1], self.sigmas[1:]
        sigma_b = self.student[seg + 1]
        case = torch.where(lower <= sigma_b * (1 + SIGMA_RTOL), BOUNDARY, GENERAL)
        case[-1] = TERMINAL
        sigma_s = torch.where(case == GENERAL, lower, sigma_b)
        sigma_s[-1] = 0
        sigma_ref = sigma_b.clone()
        sigma_ref[-1] = 0
        if not bool((sigma_ref < upper).all()):
            raise ValueError(f'The teacher grid {_grid_text(self.sigmas)} puts an edge on a student boundary it starts from; this is a bug.')
        probs = edge_probs(upper, seg, self.S, mode=sampling_mode, rho=rho, terminal_anchor=terminal_anchor, terminal_prob=terminal_prob)
        tables = dict(seg=seg, case=case, sigma_t=upper, sigma_s=sigma_s, sigma_ref=sigma_ref,
            gain=1 / (1 - sigma_ref / upper), probs=probs)
        self.device = torch.device(device)
        for name, value in tables.items(): # Built on the host; copied without blocking, so that a new T costs a step no host synchronisation.
            setattr(self, name, value.pin_memory().to(self.device, non_blocking=True) if self.device.type == 'cuda' else value.to(self.device))

    def sample(self, n, generator=None):
        """Indices of n edges drawn independently from `probs` (int64 [n], on the grid's device)."""
        return torch.multinomial(self.probs, int(n), replacement=True, generator=generator)

class TeacherGridCache:
    """TeacherGrid objects by (T, device), built on demand; keeps the `capacity` most recent."""

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
# Edge-count annealing (cd-spec section 6).

def anneal_T(cur_nimg, T_start=64, T_end=1280, T_anneal_kimg=10000, mode='geometric'):
    """Teacher edge count after `cur_nimg` training images: from T_start
    (0 images) to T_end (T_anneal_kimg thousand images and beyond),
    geometrically or linearly in between, rounded to the nearest integer."""
    if mode not in ANNEAL_MODES:
        raise ValueError(f'T_anneal="{mode}" is unknown; use one of {", ".join(ANNEAL_MODES)}.')
    if int(T_start) < 1 or int(T_end) < 1:
        raise ValueError(f'T_start={T_start}, T_end={T_end} are invalid: both must be at least 1.')
    if T_anneal_kimg <= 0:
        frac = 1.0
    else:
        frac = float(np.clip(cur_nimg / (T_anneal_kimg * 1000), 0, 1))
    if mode == 'geometric':
        T = T_start * (T_end / T_start) ** frac
    else:
        T = T_start + frac * (T_end - T_start)
    return int(np.clip(round(T), min(T_start, T_end), max(T_start, T_end)))

#----------------------------------------------------------------------------
# Student grid from the loss options.

def parse_student_sigmas(text):
    """The `student_sigmas` option as text: a layout name, or the S - 1 interior sigmas as a list of floats."""
    if text in ('karras', 'karras_open'):
        return text
    try:
        values = [float(part) for part in text.split(',') if part.strip()]
    except ValueError:
        values = []
    if not values or not all(np.isfinite(values)):
        raise ValueError(f'student_sigmas={text} is neither karras, karras_open nor a comma-separated list of numbers; pass a layout name or the S-1 interior sigmas, e.g. 2.5,0.5,0.1.')
    return values

def build_student_sigmas(S, grid='karras', sigma_min=0.002, sigma_max=80, rho=7, round_sigma=None):
    """Student grid from the `student_sigmas` option: 'karras', 'karras_open',
    or a sequence (or comma-separated string) of the S - 1 interior sigmas."""
    if isinstance(grid, str) and grid in ('karras', 'karras_open'):
        return student_sigmas(S, layout=grid, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, round_sigma=round_sigma)
    if isinstance(grid, str):
        try:
            grid = [float(v) for v in grid.split(',') if v.strip() != '']
        except ValueError:
            raise ValueError(f'student_sigmas="{grid}" is invalid: use "karras", "karras_open" or a comma-separated list of the S - 1 interior sigmas.') from None
    return student_sigmas(S, layout='explicit', interior=list(grid), sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, round_sigma=round_sigma)

#----------------------------------------------------------------------------

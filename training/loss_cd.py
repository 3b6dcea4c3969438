"""Multistep consistency distillation loss in EDM space (cd-spec sections 4-7).

`ConsistencyDistillLoss` has the interface of EDM's losses,
`loss_fn(net, images, labels=None, augment_pipe=None)` -> per-element loss,
plus the hooks a distillation run needs: `set_progress(cur_nimg)` (edge-count
annealing), `update_target(net)` (the fast `ema` target, after every
optimizer step), `frozen_parameters(net, augment_pipe)` (layers it never uses),
`student_sigmas()` (the student grid), `set_teacher(net)`,
and `state_dict()` / `load_state_dict()` (exact resume).

Decisions where the spec is silent:
* Reduction. EDM's training loop computes
  `loss.sum().mul(loss_scaling / batch_gpu_total)`. Element-wise distances
  (`l2`, `huber`) return lambda(sigma) times the per-element distance, as
  EDMLoss does. Per-sample distances (`pseudo_huber`, `l2_root`) return the
  per-sample value lambda(sigma) d divided by the number of elements per
  sample, broadcast over the sample's elements; so the loop's figure is the
  batch mean of lambda(sigma) d for every distance (the per-element l2 and
  huber summed over each sample's elements).
* `huber_c=None` means c = 0.00054 sqrt(d) for `pseudo_huber` (Song &
  Dhariwal 2023; d = elements per sample) and, as the per-element analogue,
  delta = 0.00054 for `huber`.
* `terminal_anchor=None` (the default) turns the anchor on for the weighted
  sampling modes (`vp`, `edm`) and off for `uniform`; True or False force it.
  `terminal_prob` needs the anchor.
* Fixed shapes. The teacher (both Heun evaluations), the target network and
  the student each run once on the whole batch, and per-sample masks pick
  each sample's case (`torch.where`); the statistics are masked moments on
  the device. A step thus has the same shapes every time (what torch.compile
  and CUDA graphs want) and reads nothing back to the host. Per sample the
  results are cd-spec section 4's; the price is evaluations whose results are
  discarded: the teacher's on the terminal samples (a share of about 1/T'
  with the terminal anchor), its second one on samples that end at sigma = 0
  (it sees them at (x_t, sigma_t), never at sigma = 0), and the target's on
  the non-general samples.
* Dropout replay. With `sync_dropout` and a student in training mode, the
  target network (`live` or `ema`) starts from the random state the
  student's pass then starts from; since both run on the same shapes, every
  sample sees the student's own dropout masks, and only the general rows
  are used. Without `sync_dropout` the target draws its own masks. The RNG
  replayed is the one of the device the network runs on (CUDA generator on
  CUDA, CPU generator otherwise). The `ema` target always runs in the
  student's train/eval mode.
* Pickling. The teacher, the `ema` target, pending target state and the grid
  cache are dropped: a snapshot stays as small as EDM's and loads without the
  teacher. The target EMA and the annealing state travel in `state_dict()`
  (saved with the training state) for exact resume; after unpickling,
  `set_teacher()` re-attaches the teacher. The teacher is never a
  constructor argument, so the persistence wrapper never copies it.
* Statistics (torch_utils.training_stats, the same names on every rank and
  every step, empty where a case did not occur): `CD/loss`,
  `CD/loss_terminal|boundary|general`, `CD/loss_seg<j>`, `CD/frac_terminal|
  boundary|general` (per-sample indicators: their mean is the share),
  `CD/T` (edges T' of the current grid), `CD/T_nominal` (the annealed T),
  `CD/gain_mean` (per-sample gains) and `CD/gain_max|p95|p99` (per step and
  rank, over the local batch), the same four with `_boundary` / `_general`
  appended. Gradient norm and learning rate belong to the training loop.
* Augmentation: the augmented image is the draw's data point, and every
  network (teacher, target, student) sees the same augmentation labels.
* aDDIM bridge (`addim_scale` > 0): the general case's step from the target
  prediction at sigma_s to the boundary is the adjusted DDIM step of Heek et
  al. (2024) with the analytic variance addim_variance(sigma_s, addim_scale,
  addim_prior); a bridge to sigma = 0 stays x_hat_s, as the sampler's last step.
* Device: the teacher is moved to the device of the images at the first
  call, so a training loop need not know about it.
"""

import copy

import numpy as np
import torch

import dnnlib
from torch_utils import misc
from torch_utils import persistence
from torch_utils import training_stats
from training import consistency_ops as ops
from training.samplers import addim_step, addim_variance

#----------------------------------------------------------------------------

LOSSES              = ('l2', 'huber', 'pseudo_huber', 'l2_root')
WEIGHT_MODES        = ('edm', 'sqrt_karras', 'snr', 'snr+1', 'karras', 'truncated-snr', 'uniform')
TARGET_MODES        = ('live', 'ema', 'teacher')
PRECISIONS          = dict(float32=torch.float32, float64=torch.float64)
STUDENT_GRID_KEYS   = ('S', 'student_sigmas', 'sigma_min', 'sigma_max', 'rho') # Keywords of the student grid, which a resumed run must keep.
HUBER_SCALE         = 0.00054   # Per-element scale of the default pseudo-Huber / Huber constant.

def default_terminal_anchor(sampling_mode):
    """The terminal anchor when none is asked for: on for the weighted sampling modes, off for 'uniform'."""
    return sampling_mode != 'uniform'

def loss_weight(sigma, mode='sqrt_karras', sigma_data=0.5):
    """lambda(sigma) of cd-spec section 6 for the noise levels `sigma` (a tensor)."""
    sd2 = sigma_data ** 2
    if mode == 'edm':
        return (sigma ** 2 + sd2) / (sigma * sigma_data) ** 2
    if mode == 'sqrt_karras':
        return (sigma ** 2 + sd2).sqrt() / (sigma * sigma_data)
    if mode == 'snr':
        return 1 / sigma ** 2
    if mode == 'snr+1':
        return 1 / sigma ** 2 + 1
    if mode == 'karras':
        return 1 / sigma ** 2 + 1 / sd2
    if mode == 'truncated-snr':
        return (1 / sigma ** 2).clamp(min=1)
    if mode == 'uniform':
        return torch.ones_like(sigma)
    raise ValueError(f'weight_mode="{mode}" is unknown; use one of {", ".join(WEIGHT_MODES)}.')

def distance(diff, mode='pseudo_huber', huber_c=None):
    """Distance of cd-spec section 6 for the differences `diff` [N, ...].

    Returns (per_element, per_sample): the per-element contribution (for the
    per-sample distances the sample's value divided by its element count,
    broadcast) and the per-sample total, which is per_element summed over
    each sample's elements.
    """
    flat = diff.flatten(1)
    num = flat.shape[1]
    if mode == 'l2':
        elems = diff.square()
    elif mode == 'huber':
        delta = HUBER_SCALE if huber_c is None else huber_c
        elems = torch.nn.functional.huber_loss(diff, torch.zeros_like(diff), reduction='none', delta=delta)
    elif mode in ('pseudo_huber', 'l2_root'):
        if mode == 'pseudo_huber':
            c = HUBER_SCALE * np.sqrt(num) if huber_c is None else huber_c
            per_sample = (flat.square().sum(dim=1) + c ** 2).sqrt() - c
        else:
            per_sample = torch.linalg.vector_norm(flat, dim=1)
        elems = (per_sample / num).reshape([-1] + [1] * (diff.ndim - 1)).expand_as(diff)
        return elems, per_sample
    else:
        raise ValueError(f'loss="{mode}" is unknown; use one of {", ".join(LOSSES)}.')
    return elems, elems.flatten(1).sum(dim=1)

def _get_rng_state(device):
    if device.type == 'cuda':
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()

def _set_rng_state(device, state):
    if device.type == 'cuda':
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)

#----------------------------------------------------------------------------

@persistence.persistent_class
class ConsistencyDistillLoss:
    """Multistep consistency distillation of a frozen EDM teacher into an S-step student."""

    resume_keys = STUDENT_GRID_KEYS # Keywords that a training state must share with the run that resumes it.

    def __init__(self, *,
        S                       = 8,                # Student steps (segments).
        T_start                 = 64,               # Teacher edge count at the start of training.
        T_end                   = 1280,             # Teacher edge count after the annealing.
        T_anneal_kimg           = 10000,            # Length of the annealing in thousands of images; 0 = T_end at once.
        T_anneal                = 'geometric',      # Interpolation of T: 'geometric' or 'linear'.
        rho                     = 7,                # Exponent of the Karras grids.
        sigma_min               = 0.002,            # Lowest positive noise level.
        sigma_max               = 80,               # Highest noise level.
        sigma_data              = 0.5,              # Standard deviation of the data (for the loss weights).
        student_sigmas          = 'karras',         # Student grid: 'karras', 'karras_open' or the S - 1 interior sigmas.
        sampling_mode           = 'vp',             # Edge sampling: 'uniform', 'vp' or 'edm'.
        terminal_anchor         = None,             # Fixed probability for the terminal edge; None = on for 'vp' and 'edm'.
        terminal_prob           = None,             # That probability, in (0, 1); None = 1/T'.
        terminal_teacher_hop    = False,            # Terminal reference D_teacher(x_t) instead of the clean image?
        target_mode             = 'ema',            # Target network: 'live', 'ema' or 'teacher'.
        target_ema              = 0.95,             # Per-step decay of the 'ema' target.
        sync_dropout            = True,             # Replay the student's dropout masks in the target pass?
        loss                    = 'pseudo_huber',   # Distance: 'l2', 'huber', 'pseudo_huber' or 'l2_root'.
        huber_c                 = None,             # c of pseudo_huber / delta of huber; None = 0.00054 scaled (see module doc).
        weight_mode             = 'sqrt_karras',    # lambda(sigma): 'edm', 'sqrt_karras', 'snr', 'snr+1', 'karras', 'truncated-snr', 'uniform'.
        precision               = 'float32',        # Arithmetic of hops, DDIM, inverse DDIM and loss: 'float32' or 'float64'.
        addim_scale             = 0,                # aDDIM bridge of the general case with this variance scale; 0 = DDIM.
        addim_prior             = 0.5,              # Prior variance of the aDDIM posterior variance.
    ):
        if int(S) != S or S < 1:
            raise ValueError(f'S={S} is invalid: the student needs a whole number of steps, at least 1.')
        for name, value in [('T_start', T_start), ('T_end', T_end)]:
            if int(value) != value or value < 1:
                raise ValueError(f'{name}={value} is invalid: the teacher grid needs a whole number of edges, at least 1.')
        if not T_anneal_kimg >= 0:
            raise ValueError(f'T_anneal_kimg={T_anneal_kimg} is invalid: it must be 0 or positive.')
        if T_anneal not in ops.ANNEAL_MODES:
            raise ValueError(f'T_anneal="{T_anneal}" is unknown; use one of {", ".join(ops.ANNEAL_MODES)}.')
        if sampling_mode not in ops.SAMPLING_MODES:
            raise ValueError(f'sampling_mode="{sampling_mode}" is unknown; use one of {", ".join(ops.SAMPLING_MODES)}.')
        if terminal_prob is not None and not (default_terminal_anchor(sampling_mode) if terminal_anchor is None else terminal_anchor):
            raise ValueError(f'terminal_prob={terminal_prob:g} needs the terminal anchor, which is off here (terminal_anchor=False, or its default for '
                f'sampling_mode=uniform); pass terminal_anchor=True or leave terminal_prob out.')
        if target_mode not in TARGET_MODES:
            raise ValueError(f'target_mode="{target_mode}" is unknown; use one of {", ".join(TARGET_MODES)}.')
        if not 0 <= target_ema < 1:
            raise ValueError(f'target_ema={target_ema} is invalid: the decay must lie in [0, 1).')
        if loss not in LOSSES:
            raise ValueError(f'loss="{loss}" is unknown; use one of {", ".join(LOSSES)}.')
        if huber_c is not None and not huber_c > 0:
            raise ValueError(f'huber_c={huber_c} is invalid: it must be positive (or None for the default).')
        if weight_mode not in WEIGHT_MODES:
            raise ValueError(f'weight_mode="{weight_mode}" is unknown; use one of {", ".join(WEIGHT_MODES)}.')
        if precision not in PRECISIONS:
            raise ValueError(f'precision="{precision}" is unknown; use "float32" or "float64".')
        if not addim_scale >= 0 or not addim_prior > 0:
            raise ValueError(f'addim_scale={addim_scale}, addim_prior={addim_prior} are invalid: the scale must be 0 (DDIM bridge) or positive and the prior variance positive.')

        self.S = int(S)
        self.T_start = int(T_start)
        self.T_end = int(T_end)
        self.T_anneal_kimg = T_anneal_kimg
        self.T_anneal = T_anneal
        self.rho = rho
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.student_layout = student_sigmas if isinstance(student_sigmas, str) else [float(v) for v in student_sigmas]
        self.sampling_mode = sampling_mode
        self.terminal_anchor = default_terminal_anchor(sampling_mode) if terminal_anchor is None else bool(terminal_anchor)
        self.terminal_prob = terminal_prob
        self.terminal_teacher_hop = bool(terminal_teacher_hop)
        self.target_mode = target_mode
        self.target_ema = target_ema
        self.sync_dropout = bool(sync_dropout)
        self.loss = loss
        self.huber_c = huber_c
        self.weight_mode = weight_mode
        self.precision = precision
        self.addim_scale = float(addim_scale)
        self.addim_prior = float(addim_prior)
        self.cur_nimg = 0
        self._init_runtime()
        self.set_teacher(None)

    def _init_runtime(self):
        self._teacher = None        # Frozen teacher network.
        self._target = None         # Fast EMA of the student ('ema' mode).
        self._target_state = None   # Target state_dict waiting for the target to exist.
        self._grids = None          # TeacherGridCache for the current teacher.
        self._compile_fn = None     # compile_fn(module) -> callable, for the teacher and the target; None = eager.
        self._compiled = dict()     # id(module) -> (module, its compiled form).

    def __getstate__(self):
        state = dict(self.__dict__)
        for name in ('_teacher', '_target', '_target_state', '_grids', '_compile_fn'):
            state[name] = None
        state['_compiled'] = dict()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    #------------------------------------------------------------------------
    # Configuration.

    @property
    def dtype(self):
        return PRECISIONS[self.precision]

    @property
    def T(self):
        """The annealed target edge count for the images seen so far."""
        return ops.anneal_T(self.cur_nimg, self.T_start, self.T_end, self.T_anneal_kimg, self.T_anneal)

    @property
    def teacher(self):
        return self._teacher

    def set_teacher(self, teacher_net):
        """Attach the frozen teacher (eval mode, no gradients) and rebuild the grids with its round_sigma;
        None detaches it. Checks that T_start and T_end give every segment an edge. Returns self."""
        round_sigma = None
        if teacher_net is not None:
            teacher_net.eval().requires_grad_(False)
            round_sigma = getattr(teacher_net, 'round_sigma', None)
        student = ops.build_student_sigmas(self.S, self.student_layout, sigma_min=self.sigma_min,
            sigma_max=self.sigma_max, rho=self.rho, round_sigma=round_sigma)
        grids = ops.TeacherGridCache(capacity=4, student=student, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
            rho=self.rho, round_sigma=round_sigma, sampling_mode=self.sampling_mode,
            terminal_anchor=self.terminal_anchor, terminal_prob=self.terminal_prob)
        for T in (self.T_start, self.T_end):
            grids.get(T)
        self._student_sigmas = student.tolist()
        self._grids = grids
        self._teacher = teacher_net
        return self

    def frozen_parameters(self, net, augment_pipe=None):
        """Names of the parameters of the student that the loss never uses, which the training loop leaves
        untrained: the distillation evaluates D alone, so EDM2's uncertainty head (`logvar_*`) stays as it
        starts, and so does the augmentation-label layer (`map_augment`) of a run without augmentation."""
        return [name for name, _param in misc.unwrap_module(net).named_parameters()
            if name.startswith('logvar_') or (augment_pipe is None and 'map_augment' in name.split('.'))]

    def set_compile(self, compile_fn):
        """Evaluate the teacher and the target network through `compile_fn(module)`
        (e.g. training.compiling.compile_network); None = eager. Returns self."""
        self._compile_fn = compile_fn
        self._compiled = dict()
        return self

    def _run(self, module):
        """The form in which `module` (teacher or target) is evaluated: compiled once, or itself."""
        if self._compile_fn is None or not isinstance(module, torch.nn.Module):
            return module
        if id(module) not in self._compiled:
            self._compiled[id(module)] = (module, self._compile_fn(module))
        return self._compiled[id(module)][1]

    def student_sigmas(self):
        """The student grid: S + 1 descending noise levels ending in 0 (float64 tensor)."""
        return torch.tensor(self._student_sigmas, dtype=torch.float64)

    def grid(self, device='cpu', T=None):
        """The TeacherGrid for T (default: the current annealed T) on `device`."""
        if self._grids is None:
            self.set_teacher(None)
        return self._grids.get(self.T if T is None else T, device)

    def set_progress(self, cur_nimg):
        """Tell the loss how many training images have been seen (drives the T annealing)."""
        self.cur_nimg = int(cur_nimg)

    #------------------------------------------------------------------------
    # Target network.

    def _new_target(self, student):
        target = copy.deepcopy(student).requires_grad_(False)
        if self._target_state is not None:
            target.load_state_dict(self._target_state)
            self._target_state = None
        return target

    @torch.no_grad()
    def update_target(self, net, finite=None):
        """After an optimizer step: target <- target_ema * target + (1 - target_ema) * student ('ema' mode only);
        with `finite` (a device tensor) false, the target stays where it is."""
        if self.target_mode != 'ema':
            return
        student = misc.unwrap_module(net)
        if self._target is None:
            self._target = self._new_target(student)
            return
        params = dict(student.named_parameters())
        for name, p_target in self._target.named_parameters():
            weight = 1 - self.target_ema if finite is None else finite.to(device=p_target.device, dtype=p_target.dtype) * (1 - self.target_ema)
            p_target.lerp_(params[name].detach().to(p_target.dtype), weight)
        buffers = dict(student.named_buffers())
        for name, b_target in self._target.named_buffers():
            b_target.copy_(buffers[name] if finite is None else torch.where(finite.to(b_target.device), buffers[name], b_target))

    @property
    def target(self):
        """The 'ema' target network (None before the first training step)."""
        return self._target

    def state_dict(self):
        """Resume state: images seen and the 'ema' target's parameters (CPU copies)."""
        target = self._target.state_dict() if self._target is not None else self._target_state
        if target is not None:
            target = {name: value.detach().to('cpu', copy=True) for name, value in target.items()}
        return dict(cur_nimg=int(self.cur_nimg), target=target)

    def load_state_dict(self, state):
        """Restore what state_dict() returned; the target is applied when it exists (or is next created)."""
        self.set_progress(state['cur_nimg'])
        target = state.get('target', None)
        if target is not None and self._target is not None:
            self._target.load_state_dict(target)
        else:
            self._target_state = target

    #------------------------------------------------------------------------
    # The loss.

    def _check(self, student, images):
        teacher = self._teacher
        if teacher is None:
            raise ValueError('The distillation loss has no teacher; call set_teacher(teacher_net) first (a loss restored from a pickle carries none).')
        for attr in ('img_resolution', 'img_channels', 'label_dim'):
            t_value = getattr(teacher, attr, None)
            s_value = getattr(student, attr, None)
            if t_value is not None and s_value is not None and t_value != s_value:
                raise ValueError(f'The student has {attr}={s_value} but the teacher {attr}={t_value}; distill into a network of the teacher\'s shape.')
        tensors = list(teacher.parameters()) + list(teacher.buffers()) if isinstance(teacher, torch.nn.Module) else []
        if len(tensors) > 0 and tensors[0].device != images.device:
            teacher.to(images.device) # The teacher follows the data to its device.
        res = getattr(teacher, 'img_resolution', None)
        ch = getattr(teacher, 'img_channels', None)
        if images.ndim != 4 or (ch is not None and images.shape[1] != ch) or (res is not None and tuple(images.shape[2:]) != (res, res)):
            raise ValueError(f'Images of shape {tuple(images.shape)} do not match the teacher ({ch} channels, {res}x{res}); use data of the teacher\'s resolution and channels.')

    @torch.no_grad()
    def draw(self, net, images, labels=None, augment_pipe=None):
        """Everything of one training draw that needs no gradient (cd-spec section 4),
        in fixed shapes: every network runs on the whole batch and masks pick each
        sample's case, so nothing is read back to the host.

        Returns an EasyDict-like dict: y, x_t, k (edges), seg, case, sigma_t,
        sigma_s, sigma_ref, gain, x_ref, target (x_hat*), augment_labels,
        general (mask of the general samples), x_s (the teacher's hop to sigma_s),
        x_in, s_in and target_out (the target's inputs, x_s at sigma_s for the
        general samples and x_t at sigma_t for the others, and its x-prediction;
        only the general rows are used), and rng_state (where the student's pass
        must start; None = wherever the generator is).
        """
        student = misc.unwrap_module(net)
        self._check(student, images)
        dtype = self.dtype
        device = images.device
        N = images.shape[0]
        if augment_pipe is not None:
            y, augment_labels = augment_pipe(images)
        else:
            y, augment_labels = images, None
        y = y.to(dtype)

        grid = self.grid(device)
        k = grid.sample(N)
        seg, case = grid.seg[k], grid.case[k]
        sigma_t = grid.sigma_t[k].to(dtype)
        sigma_s = grid.sigma_s[k].to(dtype)
        sigma_ref = grid.sigma_ref[k].to(dtype)
        x_t = y + ops.expand_sigma(sigma_t, y) * torch.randn_like(y)
        rows = lambda mask: ops.expand_sigma(mask, y).to(torch.bool)

        # Teacher: Heun hops of boundary and general samples, optionally the terminal D_teacher(x_t).
        teacher = self._run(self._teacher)
        x_s = ops.heun_hop(ops.make_denoiser(teacher, labels, augment_labels), x_t, sigma_t, sigma_s, dtype=dtype)
        x_ref = x_s if self.terminal_teacher_hop else torch.where(rows(case != ops.TERMINAL), x_s, y)

        # Target network: x_ref of the general samples = DDIM of its prediction from sigma_s to the boundary.
        if self.target_mode == 'ema' and self._target is None:
            self._target = self._new_target(student) # The student before its first step, on every rank.
        if self.target_mode == 'teacher':
            target_net = teacher
        else:
            target_net = self._run(student if self.target_mode == 'live' else self._target.train(student.training))
        general = case == ops.GENERAL
        x_in = torch.where(rows(general), x_s, x_t)
        s_in = torch.where(general, sigma_s, sigma_t)
        replay = self.target_mode != 'teacher' and self.sync_dropout and student.training
        rng_state = _get_rng_state(device) if replay else None
        target_out = ops.make_denoiser(target_net, labels, augment_labels)(x_in, s_in).to(dtype)
        if replay:
            _set_rng_state(device, rng_state)
        r_in = torch.where(general, sigma_ref, 0)
        if self.addim_scale > 0:
            x_var = addim_variance(s_in, self.addim_scale, self.addim_prior) * (r_in > 0)
            bridged = addim_step(target_out, x_in, s_in, r_in, x_var, dtype=dtype)
        else:
            bridged = ops.ddim_step(target_out, x_in, s_in, r_in, dtype=dtype)
        x_ref = torch.where(rows(general), bridged, x_ref)

        target, gain = ops.inverse_ddim(x_ref, x_t, sigma_t, sigma_ref, dtype=dtype)
        return dnnlib.EasyDict(y=y, x_t=x_t, k=k, seg=seg, case=case, sigma_t=sigma_t, sigma_s=sigma_s,
            sigma_ref=sigma_ref, gain=gain, x_ref=x_ref, target=target, augment_labels=augment_labels,
            general=general, x_s=x_s, x_in=x_in, s_in=s_in, target_out=target_out, rng_state=rng_state, num_edges=grid.num_edges)

    def __call__(self, net, images, labels=None, augment_pipe=None):
        d = self.draw(net, images, labels, augment_pipe)
        dtype = self.dtype
        denoise = ops.make_denoiser(net, labels, d.augment_labels)
        x_hat = denoise(d.x_t, d.sigma_t).to(dtype)
        elems, per_sample = distance(x_hat - d.target, self.loss, self.huber_c)
        weight = loss_weight(d.sigma_t, self.weight_mode, self.sigma_data)
        loss = elems * ops.expand_sigma(weight, elems)
        self._report(d, (per_sample * weight).detach())
        return loss

    def _report(self, d, per_sample):
        """Diagnostics of cd-spec section 7 (same names on every rank and step), as masked
        moments on the device: nothing is read back to the host."""
        per_sample = per_sample.to(torch.float64)
        gain = d.gain.to(torch.float64)
        training_stats.report('CD/loss', per_sample)
        training_stats.report('CD/T', [float(d.num_edges)])
        training_stats.report('CD/T_nominal', [float(self.T)])
        for c, name in enumerate(ops.CASE_NAMES):
            mask = d.case == c
            training_stats.report(f'CD/loss_{name}', per_sample, mask=mask)
            training_stats.report(f'CD/frac_{name}', mask.to(torch.float64))
        for j in range(self.S):
            training_stats.report(f'CD/loss_seg{j}', per_sample, mask=(d.seg == j))
        for suffix, mask in [('', None), ('_boundary', d.case == ops.BOUNDARY), ('_general', d.case == ops.GENERAL)]:
            training_stats.report(f'CD/gain_mean{suffix}', gain, mask=mask)
            (q_max, q95, q99), nonempty = training_stats.masked_quantiles(gain, mask, [1, 0.95, 0.99])
            training_stats.report(f'CD/gain_max{suffix}', q_max, mask=nonempty)
            training_stats.report(f'CD/gain_p95{suffix}', q95, mask=nonempty)
            training_stats.report(f'CD/gain_p99{suffix}', q99, mask=nonempty)

#----------------------------------------------------------------------------

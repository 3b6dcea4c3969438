"""Multistep consistency distillation loss in EDM space (docs/cd-spec.md sections 4-7; the choices the spec leaves
open are in docs/distillation.md)."""

import copy

import numpy as np
import torch

import dnnlib
from torch_utils import misc
from torch_utils import persistence
from torch_utils import training_stats
from training import consistency_ops as ops

#----------------------------------------------------------------------------

LOSSES              = ('l2', 'huber', 'pseudo_huber', 'l2_root')
WEIGHT_MODES        = ('edm', 'sqrt_karras', 'snr', 'snr+1', 'karras', 'truncated-snr', 'uniform')
TARGET_MODES        = ('live', 'ema', 'teacher')
TEACHER_HOPS        = ('heun', 'addim')
PRECISIONS          = dict(float32=torch.float32, float64=torch.float64)
HUBER_SCALE         = 0.00054   # Per-element scale of the default Huber constants.

def default_terminal_anchor(sampling_mode):
    return sampling_mode != 'uniform'

def loss_weight(sigma, mode='sqrt_karras', sigma_data=0.5):
    """lambda(sigma) of cd-spec section 6."""
    sd2 = sigma_data ** 2
    return {
        'edm':              lambda: (sigma ** 2 + sd2) / (sigma * sigma_data) ** 2,
        'sqrt_karras':      lambda: (sigma ** 2 + sd2).sqrt() / (sigma * sigma_data),
        'snr':              lambda: 1 / sigma ** 2,
        'snr+1':            lambda: 1 / sigma ** 2 + 1,
        'karras':           lambda: 1 / sigma ** 2 + 1 / sd2,
        'truncated-snr':    lambda: (1 / sigma ** 2).clamp(min=1),
        'uniform':          lambda: torch.ones_like(sigma),
    }[mode]()

def distance(diff, mode='pseudo_huber', huber_c=None):
    """(per_element, per_sample) distance of cd-spec section 6 for `diff` [N, ...]."""
    flat = diff.flatten(1)
    num = flat.shape[1]
    if mode == 'l2':
        elems = diff.square()
    elif mode == 'huber':
        delta = HUBER_SCALE if huber_c is None else huber_c
        elems = torch.nn.functional.huber_loss(diff, torch.zeros_like(diff), reduction='none', delta=delta)
    else:
        assert mode in ('pseudo_huber', 'l2_root'), mode
        if mode == 'pseudo_huber':
            c = HUBER_SCALE * np.sqrt(num) if huber_c is None else huber_c
            per_sample = (flat.square().sum(dim=1) + c ** 2).sqrt() - c
        else:
            per_sample = torch.linalg.vector_norm(flat, dim=1)
        elems = (per_sample / num).reshape([-1] + [1] * (diff.ndim - 1)).expand_as(diff)
        return elems, per_sample
    return elems, elems.flatten(1).sum(dim=1)

#----------------------------------------------------------------------------

@persistence.persistent_class
class ConsistencyDistillLoss:
    """Multistep consistency distillation of a frozen EDM teacher into an S-step student, or with `ct`, consistency
    training or tuning without one (cd-spec section 10)."""

    def __init__(self, *,
        S                       = 8,                # Student steps (segments).
        T_start                 = 64,               # Teacher edges at the start.
        T_end                   = 1280,             # Teacher edges after the annealing.
        T_anneal_kimg           = 10000,            # 0 = T_end at once.
        T_anneal                = 'geometric',      # Or 'linear'.
        rho                     = 7,
        sigma_min               = 0.002,
        sigma_max               = 80,
        sigma_data              = 0.5,
        student_sigmas          = 'karras',         # 'karras', 'karras_open' or the S - 1 interior sigmas.
        sampling_mode           = 'vp',             # 'uniform', 'vp' or 'edm'.
        terminal_anchor         = None,             # Fixed terminal edge probability? None = off for 'uniform'.
        terminal_prob           = None,             # In (0, 1); None = 1/T'.
        terminal_teacher_hop    = False,            # Terminal reference D_teacher(x_t) instead of the image?
        target_mode             = 'ema',            # 'live', 'ema' or 'teacher'.
        target_ema              = 0.95,             # Per-step decay of the 'ema' target.
        sync_dropout            = True,             # Replay the student's dropout masks in the target pass?
        loss                    = 'pseudo_huber',   # One of LOSSES.
        huber_c                 = None,             # c of pseudo_huber, delta of huber; None = from HUBER_SCALE.
        weight_mode             = 'sqrt_karras',    # One of WEIGHT_MODES.
        precision               = 'float32',        # Of hops, DDIM and loss.
        teacher_hop             = 'heun',           # Or the paper's 'addim': one teacher evaluation per hop.
        ct                      = False,            # Consistency training: hop to y + sigma_s eps, no teacher.
    ):
        anchor = default_terminal_anchor(sampling_mode) if terminal_anchor is None else bool(terminal_anchor)
        assert int(S) == S >= 1 and int(T_start) == T_start >= 1 and int(T_end) == T_end >= 1 and T_anneal_kimg >= 0
        assert T_anneal in ops.ANNEAL_MODES and sampling_mode in ops.SAMPLING_MODES and target_mode in TARGET_MODES
        assert loss in LOSSES and weight_mode in WEIGHT_MODES and 0 <= target_ema < 1 and teacher_hop in TEACHER_HOPS
        assert (huber_c is None or huber_c > 0) and (terminal_prob is None or anchor)
        assert not (ct and target_mode == 'teacher')
        if terminal_prob is not None and not 0 < terminal_prob < 1:
            raise ValueError(f'terminal_prob={terminal_prob:g} is outside (0, 1); pass a probability in that range.')
        if precision not in PRECISIONS:
            raise ValueError(f'precision="{precision}" is unknown; use "float32" or "float64".')
        self.S, self.T_start, self.T_end, self.T_anneal_kimg = int(S), int(T_start), int(T_end), T_anneal_kimg
        self.T_anneal, self.rho, self.sigma_min, self.sigma_max = T_anneal, rho, sigma_min, sigma_max
        self.sigma_data = sigma_data
        self.student_layout = student_sigmas if isinstance(student_sigmas, str) else [float(v) for v in student_sigmas]
        self.sampling_mode, self.terminal_anchor, self.terminal_prob = sampling_mode, anchor, terminal_prob
        self.terminal_teacher_hop = bool(terminal_teacher_hop)
        self.target_mode, self.target_ema, self.sync_dropout = target_mode, target_ema, bool(sync_dropout)
        self.loss, self.huber_c, self.weight_mode, self.precision = loss, huber_c, weight_mode, precision
        self.teacher_hop, self.ct, self.cur_nimg = teacher_hop, bool(ct), 0
        self._init_runtime()
        self.set_teacher(None)

    def _init_runtime(self):
        self._teacher = None
        self._target = None         # Fast EMA of the student ('ema' mode).
        self._target_state = None   # Waiting for the target to exist.
        self._grids = None          # TeacherGridCache.
        self._compile_fn = None     # None = eager.
        self._compiled = dict()     # id(module) -> (module, its compiled form).

    def __getstate__(self):
        return dict(self.__dict__, _teacher=None, _target=None, _target_state=None, _grids=None, _compile_fn=None,
            _compiled=dict())

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_runtime()

    @property
    def dtype(self):
        return PRECISIONS[self.precision]

    @property
    def T(self):
        """The annealed teacher edge count."""
        return ops.anneal_T(self.cur_nimg, self.T_start, self.T_end, self.T_anneal_kimg, self.T_anneal)

    @property
    def teacher(self):
        return self._teacher

    def set_teacher(self, teacher_net):
        """Attach the frozen teacher (None detaches it) and rebuild the grids with its round_sigma."""
        if teacher_net is not None:
            teacher_net.eval().requires_grad_(False)
        round_sigma = getattr(teacher_net, 'round_sigma', None)
        student = ops.build_student_sigmas(self.S, self.student_layout, sigma_min=self.sigma_min,
            sigma_max=self.sigma_max, rho=self.rho, round_sigma=round_sigma)
        grids = ops.TeacherGridCache(capacity=4, student=student, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
            rho=self.rho, round_sigma=round_sigma, sampling_mode=self.sampling_mode,
            terminal_anchor=self.terminal_anchor, terminal_prob=self.terminal_prob)
        for T in (self.T_start, self.T_end): # Every segment must hold an edge at both ends of the annealing.
            grids.get(T)
        self._student_sigmas, self._grids, self._teacher = student.tolist(), grids, teacher_net
        return self

    def frozen_parameters(self, net, augment_pipe=None):
        """Names of the student's parameters the loss never uses (EDM2's logvar_*, an unused map_augment)."""
        return [name for name, _param in misc.unwrap_module(net).named_parameters()
            if name.startswith('logvar_') or (augment_pipe is None and 'map_augment' in name.split('.'))]

    def set_compile(self, compile_fn):
        """Evaluate the teacher and the target through `compile_fn(module)`; None = eager."""
        self._compile_fn, self._compiled = compile_fn, dict()
        return self

    def _run(self, module):
        if self._compile_fn is None or not isinstance(module, torch.nn.Module):
            return module
        if id(module) not in self._compiled:
            self._compiled[id(module)] = (module, self._compile_fn(module))
        return self._compiled[id(module)][1]

    def student_sigmas(self):
        """S + 1 descending noise levels ending in 0 (float64)."""
        return torch.tensor(self._student_sigmas, dtype=torch.float64)

    def grid(self, device='cpu', T=None):
        """The TeacherGrid for T (default: the current one)."""
        if self._grids is None:
            self.set_teacher(None)
        return self._grids.get(self.T if T is None else T, device)

    def set_progress(self, cur_nimg):
        """Images seen so far (drives the T annealing)."""
        self.cur_nimg = int(cur_nimg)

    def _new_target(self, student):
        target = copy.deepcopy(student).requires_grad_(False)
        if self._target_state is not None:
            target.load_state_dict(self._target_state)
            self._target_state = None
        return target

    @torch.no_grad()
    def update_target(self, net, finite=None):
        """Move the 'ema' target towards the student after a step, unless `finite` is false."""
        if self.target_mode != 'ema':
            return
        student = misc.unwrap_module(net)
        if self._target is None:
            self._target = self._new_target(student)
            return
        params = dict(student.named_parameters())
        for name, p in self._target.named_parameters():
            weight = 1 - self.target_ema if finite is None else finite.to(p.device, p.dtype) * (1 - self.target_ema)
            p.lerp_(params[name].detach().to(p.dtype), weight)
        buffers = dict(student.named_buffers())
        for name, buf in self._target.named_buffers():
            buf.copy_(buffers[name] if finite is None else torch.where(finite.to(buf.device), buffers[name], buf))

    @property
    def target(self):
        """None before the first training step."""
        return self._target

    def state_dict(self):
        """Images seen and the 'ema' target's parameters (CPU copies)."""
        target = self._target.state_dict() if self._target is not None else self._target_state
        if target is not None:
            target = {name: value.detach().to('cpu', copy=True) for name, value in target.items()}
        return dict(cur_nimg=int(self.cur_nimg), target=target)

    def load_state_dict(self, state):
        """The target is applied when it exists (or is next created)."""
        self.set_progress(state['cur_nimg'])
        target = state.get('target', None)
        if target is not None and self._target is not None:
            self._target.load_state_dict(target)
        else:
            self._target_state = target

    def _check(self, student, images):
        teacher = self._teacher
        assert teacher is not None or self.ct, 'call set_teacher() first'
        for attr in ('img_resolution', 'img_channels', 'label_dim'):
            t_value, s_value = getattr(teacher, attr, None), getattr(student, attr, None)
            if t_value is not None and s_value is not None and t_value != s_value:
                raise ValueError(f'The student has {attr}={s_value} but the teacher {attr}={t_value}; '
                    'distill into a network of the teacher\'s shape.')
        tensors = list(teacher.parameters()) + list(teacher.buffers()) if isinstance(teacher, torch.nn.Module) else []
        if len(tensors) > 0 and tensors[0].device != images.device:
            teacher.to(images.device)
        res, ch = getattr(teacher, 'img_resolution', None), getattr(teacher, 'img_channels', None)
        bad = images.ndim != 4 or (ch is not None and images.shape[1] != ch)
        if bad or (res is not None and images.shape[2:] != (res, res)):
            raise ValueError(f'Images of shape {tuple(images.shape)} do not match the teacher ({ch} channels, '
                f'{res}x{res}); use data of the teacher\'s resolution and channels.')

    @torch.no_grad()
    def draw(self, net, images, labels=None, augment_pipe=None):
        """Everything of one training draw that needs no gradient (cd-spec section 4)."""
        student = misc.unwrap_module(net)
        self._check(student, images)
        dtype, device, N = self.dtype, images.device, images.shape[0]
        y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
        y = y.to(dtype)

        grid = self.grid(device)
        k = grid.sample(N)
        seg, case = grid.seg[k], grid.case[k]
        sigma_t, sigma_s, sigma_ref = (sigmas[k].to(dtype) for sigmas in (grid.sigma_t, grid.sigma_s, grid.sigma_ref))
        eps = torch.randn_like(y)
        x_t = y + ops.expand_sigma(sigma_t, y) * eps
        rows = lambda mask: ops.expand_sigma(mask, y).to(torch.bool)

        # Hop to sigma_s: the teacher's Heun or aDDIM hop, or the draw's own point (consistency training).
        teacher = self._run(self._teacher)
        if self.ct:
            x_s = y + ops.expand_sigma(sigma_s, y) * eps
        else:
            hop = ops.heun_hop if self.teacher_hop == 'heun' else ops.addim_hop
            x_s = hop(ops.make_denoiser(teacher, labels, augment_labels), x_t, sigma_t, sigma_s, dtype=dtype)
        x_ref = x_s if self.terminal_teacher_hop else torch.where(rows(case != ops.TERMINAL), x_s, y)

        # Target: x_ref of the general samples = DDIM of its prediction from sigma_s to the boundary.
        if self.target_mode == 'ema' and self._target is None:
            self._target = self._new_target(student) # The student before its first step, on every rank.
        target_net = teacher if self.target_mode == 'teacher' else \
            self._run(student if self.target_mode == 'live' else self._target.train(student.training))
        general = case == ops.GENERAL
        x_in = torch.where(rows(general), x_s, x_t)
        s_in = torch.where(general, sigma_s, sigma_t)
        replay = self.target_mode != 'teacher' and self.sync_dropout and student.training
        cuda = device.type == 'cuda'
        rng_state = (torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()) if replay else None
        target_out = ops.make_denoiser(target_net, labels, augment_labels)(x_in, s_in).to(dtype)
        if replay and cuda:
            torch.cuda.set_rng_state(rng_state, device)
        elif replay:
            torch.set_rng_state(rng_state)
        bridged = ops.ddim_step(target_out, x_in, s_in, torch.where(general, sigma_ref, 0), dtype=dtype)
        x_ref = torch.where(rows(general), bridged, x_ref)

        target, gain = ops.inverse_ddim(x_ref, x_t, sigma_t, sigma_ref, dtype=dtype)
        return dnnlib.EasyDict(y=y, x_t=x_t, k=k, seg=seg, case=case, sigma_t=sigma_t, sigma_s=sigma_s,
            sigma_ref=sigma_ref, gain=gain, x_ref=x_ref, target=target, augment_labels=augment_labels, general=general,
            x_s=x_s, x_in=x_in, s_in=s_in, target_out=target_out, rng_state=rng_state, num_edges=grid.num_edges)

    def __call__(self, net, images, labels=None, augment_pipe=None):
        d = self.draw(net, images, labels, augment_pipe)
        x_hat = ops.make_denoiser(net, labels, d.augment_labels)(d.x_t, d.sigma_t).to(self.dtype)
        elems, per_sample = distance(x_hat - d.target, self.loss, self.huber_c)
        weight = loss_weight(d.sigma_t, self.weight_mode, self.sigma_data)
        loss = elems * ops.expand_sigma(weight, elems)
        self._report(d, (per_sample * weight).detach())
        return loss

    def _report(self, d, per_sample):
        """Diagnostics of cd-spec section 7, on the device."""
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
            for stat, value in [('max', q_max), ('p95', q95), ('p99', q99)]:
                training_stats.report(f'CD/gain_{stat}{suffix}', value, mask=nonempty)

#----------------------------------------------------------------------------

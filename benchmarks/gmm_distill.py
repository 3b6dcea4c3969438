"""Student quality per training budget against an exact ground truth.

The teacher is the closed-form denoiser of a Gaussian mixture in image shape
(`training.gmm.GaussianMixture`, cd-spec section 9), so the probability-flow
ODE endpoint of every noise draw is known to float64 accuracy. For each S in
--S a small EDM U-Net is distilled with `ConsistencyDistillLoss` for a fixed
budget (--steps x --batch images, the training loop's learning-rate ramp-up,
Adam step and EMA), from random weights or, with --init_steps, from the same
U-Net first trained as the mixture's denoiser (as real distillation starts
from the teacher's checkpoint), then sampled from fixed noise with the
student sampler. Reported per S, as mean +- std over
--seeds: RMSE of the student's samples to the exact endpoints, the
total-variation distance between the component shares of its samples (each
assigned to its most likely component) and the mixture weights, and the wall
time; with the teacher's own Euler and Heun samplers at equal or lower NFE
for comparison. The reference endpoints use EDM's Heun sampler in float64,
and step doubling shows their error is far below the errors compared.

Mixtures: `gmm8` (1x8x8, 4 well-separated equal-weight components) and
`gmm16` (3x16x16, 8 components of unequal weight), both with smooth means
and rank-4-plus-isotropic covariances. Configurations (--config) are the presets of CONFIGS,
`current` being today's defaults; --set KEY=VALUE overrides a keyword of
ConsistencyDistillLoss, or of the student sampler with the prefix `sampler_`.
The `oracle` presets are a control: their reference is the teacher's own ODE
solution to the segment boundary (OracleTargetLoss), which bounds what any
target choice can reach. --profile adds each segment's error from the exact
ODE states; --init_cache keeps the denoiser checkpoint for the next run.

    python benchmarks/gmm_distill.py                   # current defaults, both mixtures, S=2,4,8, 3 seeds: ~9 min on 1 thread
    python benchmarks/gmm_distill.py --mixture=gmm8 --S=4,8 --config=target_teacher --out=teacher.json
    python benchmarks/gmm_distill.py --set target_ema=0.9 --set sampler_stochastic=true
    python benchmarks/gmm_distill.py --init_steps=1600     # students start from a denoiser checkpoint
    python benchmarks/gmm_distill.py --init_steps=1600 --init_cache=ckpt --config=oracle   # the bound of any target choice
"""

import copy
import json
import os
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import consistency_ops as ops              # pylint: disable=wrong-import-position
from training import samplers                            # pylint: disable=wrong-import-position
from training.gmm import GaussianMixture                 # pylint: disable=wrong-import-position
from training.loss import EDMLoss                         # pylint: disable=wrong-import-position
from training.loss_cd import ConsistencyDistillLoss      # pylint: disable=wrong-import-position
from training.networks import EDMPrecond                 # pylint: disable=wrong-import-position
from training.steps import accumulate_gradients, learning_rate, optimizer_step, update_ema # pylint: disable=wrong-import-position

#----------------------------------------------------------------------------
# Mixtures.

def _smooth(gen, n, channels, resolution, low):
    """n random images [n, C*R*R] of low spatial frequency (bilinear upsampling of low x low noise), unit RMS."""
    z = torch.randn([n, channels, low, low], dtype=torch.float64, generator=gen)
    up = torch.nn.functional.interpolate(z, size=(resolution, resolution), mode='bilinear', align_corners=True)
    up = up.reshape(n, -1)
    return up / up.square().mean(dim=1, keepdim=True).sqrt()

def make_mixture(name):
    """The benchmark's mixtures, built deterministically."""
    gen = torch.Generator().manual_seed(2024)
    if name == 'gmm8':
        K, C, R, rank = 4, 1, 8, 4
        means = 0.6 * _smooth(gen, K, C, R, 2)
        factors = 0.1 * _smooth(gen, K * rank, C, R, 4).reshape(K, rank, -1).transpose(1, 2)
        return GaussianMixture(means, torch.ones(K), factors, 0.05, img_channels=C, img_resolution=R)
    if name == 'gmm16':
        K, C, R, rank = 8, 3, 16, 4
        means = 0.5 * _smooth(gen, K, C, R, 2)
        factors = 0.1 * _smooth(gen, K * rank, C, R, 4).reshape(K, rank, -1).transpose(1, 2)
        weights = torch.arange(1, K + 1, dtype=torch.float64)
        return GaussianMixture(means, weights, factors, torch.linspace(0.03, 0.08, K), img_channels=C, img_resolution=R)
    raise click.ClickException(f'--mixture={name} is unknown; use gmm8, gmm16 or both.')

MIXTURES = ('gmm8', 'gmm16')

#----------------------------------------------------------------------------
# Configurations: keywords of ConsistencyDistillLoss, and of the student sampler as sampler_*.

# Student grids that put the interior levels where gmm8's students err (sigma ~ 0.25-12): found by hand
# from the per-segment errors of the `karras` students, a value per S (interior sigmas, descending).
MID_LAYOUTS = {2: '2', 4: '8,2,0.5', 8: '12,6,3.5,2,1.2,0.6,0.25'}

CONFIGS = {
    'current':      dict(),
    'T16':          dict(T_start=16, T_end=16),
    'T_budget':     dict(T_start=16, T_end=64, T_anneal_kimg=None),
    'T_budget256':  dict(T_start=16, T_end=256, T_anneal_kimg=None),
    'target_live':  dict(target_mode='live'),
    'target_ema0':  dict(target_ema=0.0),
    'target_ema09': dict(target_ema=0.9),
    'target_teacher': dict(target_mode='teacher'),
    'teacher_addim': dict(target_mode='teacher', addim_scale=0.1),
    'teacher_l2':   dict(target_mode='teacher', loss='l2', weight_mode='edm'),
    'karras_open':  dict(student_sigmas='karras_open'),
    'rho3':         dict(rho=3),
    'l2_edm':       dict(loss='l2', weight_mode='edm'),
    'l2root':       dict(loss='l2_root'),
    'huber_c10':    dict(huber_c='10x'),
    'snr1':         dict(weight_mode='snr+1'),
    'w_uniform':    dict(weight_mode='uniform'),
    'l2_uniform':   dict(loss='l2', weight_mode='uniform'),
    'edm_edges':    dict(sampling_mode='edm'),
    'uniform_edges': dict(sampling_mode='uniform'),
    'term_prob':    dict(terminal_prob=0.1),
    'addim_bridge': dict(addim_scale=0.1),
    'addim_sampler': dict(sampler_addim_scale=0.1),
    'stochastic':   dict(sampler_stochastic=True),
    'layout_mid':   dict(student_sigmas=MID_LAYOUTS),
    'layout_mid_teacher': dict(student_sigmas=MID_LAYOUTS, target_mode='teacher'),
    'oracle':       dict(oracle_substeps=8),
    'oracle_layout_mid': dict(oracle_substeps=8, student_sigmas=MID_LAYOUTS),
}

def parse_value(text):
    """A --set value: true/false/none, an int, a float, or the string itself."""
    low = text.strip().lower()
    if low in ('true', 'false'):
        return low == 'true'
    if low == 'none':
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text

def resolve_config(name, overrides, budget_kimg, dim):
    """(loss keywords, sampler keywords) of a preset with --set overrides applied.
    T_anneal_kimg=None means the whole budget; huber_c='<f>x' means f times the default 0.00054 sqrt(d)."""
    if name not in CONFIGS:
        raise click.ClickException(f'--config={name} is unknown; use one of {", ".join(CONFIGS)}.')
    merged = dict(CONFIGS[name])
    for item in overrides:
        if '=' not in item:
            raise click.ClickException(f'--set {item} is not of the form KEY=VALUE; write e.g. --set target_ema=0.9.')
        key, value = item.split('=', 1)
        merged[key.strip()] = parse_value(value)
    loss_kwargs = {k: v for k, v in merged.items() if not k.startswith('sampler_')}
    sampler_kwargs = {k[len('sampler_'):]: v for k, v in merged.items() if k.startswith('sampler_')}
    if 'T_anneal_kimg' in loss_kwargs and loss_kwargs['T_anneal_kimg'] is None:
        loss_kwargs['T_anneal_kimg'] = budget_kimg
    if isinstance(loss_kwargs.get('huber_c'), str) and loss_kwargs['huber_c'].endswith('x'):
        loss_kwargs['huber_c'] = float(loss_kwargs['huber_c'][:-1]) * 0.00054 * np.sqrt(dim)
    return loss_kwargs, sampler_kwargs

def for_S(loss_kwargs, S):
    """The keywords for an S-step student: a value given per S (a dict) is resolved."""
    missing = [key for key, value in loss_kwargs.items() if isinstance(value, dict) and S not in value]
    if missing:
        raise click.ClickException(f'The preset gives {missing[0]} for S = {", ".join(str(v) for v in sorted(loss_kwargs[missing[0]]))} only, not S={S}; '
            f'pick --S among those.')
    return {key: (value[S] if isinstance(value, dict) else value) for key, value in loss_kwargs.items()}

class OracleTargetLoss(ConsistencyDistillLoss):
    """A control, not a method: the reference point of every non-terminal draw is the teacher's own ODE
    solution from sigma_t to the segment boundary (`substeps` Heun steps, geometric in sigma; a boundary
    of 0 ends with the denoiser at sigma_min), so there is neither target network nor bootstrapping and
    the student regresses onto the exact segment map. It bounds what any target choice can reach."""

    def __init__(self, *, oracle_substeps=8, **kwargs):
        super().__init__(**dict(kwargs, target_mode='teacher'))
        self.oracle_substeps = int(oracle_substeps)

    @torch.no_grad()
    def draw(self, net, images, labels=None, augment_pipe=None):
        d = super().draw(net, images, labels, augment_pipe)
        denoise = ops.make_denoiser(self.teacher, labels, d.augment_labels)
        sigma_t = d.sigma_t.to(torch.float64)
        end = torch.where(d.sigma_ref > 0, d.sigma_ref.to(torch.float64), torch.full_like(sigma_t, self.sigma_min).minimum(sigma_t / 2))
        x = d.x_t.to(torch.float64)
        for i in range(self.oracle_substeps):
            x = ops.heun_hop(denoise, x, sigma_t * (end / sigma_t) ** (i / self.oracle_substeps),
                sigma_t * (end / sigma_t) ** ((i + 1) / self.oracle_substeps), dtype=torch.float64)
        x = torch.where(ops.expand_sigma(d.sigma_ref > 0, x).to(torch.bool), x, denoise(x, end).to(torch.float64))
        x_ref = torch.where(ops.expand_sigma(d.case == ops.TERMINAL, x).to(torch.bool), d.y.to(torch.float64), x)
        d.target, d.gain = ops.inverse_ddim(x_ref, d.x_t, d.sigma_t, d.sigma_ref, dtype=self.dtype)
        d.x_ref = x_ref.to(self.dtype)
        return d

#----------------------------------------------------------------------------
# Ground truth and metrics.

def references(mixture, latents, num_steps, sigma_min):
    """Exact PF-ODE endpoints (EDM's Heun sampler in float64 with 2 * num_steps
    levels down to sigma_min, then the Euler step to 0) and the RMS and largest
    difference to the solution with half as many levels (step doubling)."""
    coarse = samplers.edm_sampler(mixture, latents, num_steps=num_steps, sigma_min=sigma_min)
    fine = samplers.edm_sampler(mixture, latents, num_steps=2 * num_steps, sigma_min=sigma_min)
    diff = coarse - fine
    return fine, float(diff.square().mean().sqrt()), float(diff.abs().max())

def exact_states(mixture, latents, sigmas, substeps):
    """The exact PF-ODE states at every level of a student grid (sigmas, ending in 0) for the noise
    `latents`: Heun steps on a Karras grid of `substeps` levels between consecutive levels, a last
    segment ending at 1e-4 and the Euler step to 0 (as the reference), float64."""
    sigmas = [float(v) for v in sigmas]
    states = [latents.to(torch.float64) * sigmas[0]]
    denoise = lambda x, sigma: mixture(x, sigma)
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        grid = samplers.karras_sigmas(substeps, sigma_min=max(b, 1e-4), sigma_max=a).tolist() + ([0.0] if b == 0 else [])
        x = states[-1]
        for sa, sb in zip(grid[:-1], grid[1:]):
            x = ops.heun_hop(denoise, x, sa, sb, dtype=torch.float64)
        states.append(x)
    return states

@torch.no_grad()
def segment_profile(student, states, sigmas):
    """Where a student errs: per segment j, the RMSE of its DDIM step from the exact state at
    sigmas[j] to the exact state at sigmas[j+1] (`one_step`), and the RMSE to the exact endpoint
    of the student's remaining steps from the exact state at sigmas[j] (`from_exact`)."""
    sigmas = [float(v) for v in sigmas]
    def step(x, a, b):
        x_hat = student(x, torch.as_tensor(a, dtype=torch.float64), None).to(torch.float64)
        return x_hat if b == 0 else x_hat + (b / a) * (x - x_hat)
    S = len(sigmas) - 1
    one_step = [rmse(step(states[j], sigmas[j], sigmas[j + 1]), states[j + 1]) for j in range(S)]
    from_exact = []
    for j in range(S):
        x = states[j]
        for k in range(j, S):
            x = step(x, sigmas[k], sigmas[k + 1])
        from_exact.append(rmse(x, states[-1]))
    return dict(one_step=one_step, from_exact=from_exact)

def rmse(x, ref):
    return float((x.to(torch.float64) - ref).square().mean().sqrt())

def coverage_tv(mixture, x):
    """Total-variation distance between the component shares of the samples and the weights."""
    counts = torch.bincount(mixture.assign(x), minlength=mixture.num_components).to(torch.float64)
    return float(0.5 * (counts / counts.sum() - mixture.weights.cpu()).abs().sum())

#----------------------------------------------------------------------------
# One student.

def make_student(mixture, cbase):
    mult = [1, 2] if mixture.img_resolution <= 8 else [1, 2, 2]
    return EDMPrecond(img_resolution=mixture.img_resolution, img_channels=mixture.img_channels, model_type='SongUNet',
        model_channels=cbase, channel_mult=mult, num_blocks=1, attn_resolutions=[], dropout=0)

def optimize(net, mixture, loss_fn, seed, steps, batch, lr, lr_rampup_kimg, ema_halflife_kimg, ema_rampup_ratio):
    """Train `net` on fresh mixture samples with the training loop's step pieces; returns its EMA."""
    distill = isinstance(loss_fn, ConsistencyDistillLoss)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=[0.9, 0.999], eps=1e-8)
    data_gen = torch.Generator().manual_seed(1000 + seed)
    def next_batch():
        return mixture.sample(batch, generator=data_gen)[0].to(torch.float32), None
    cur_nimg = 0
    for _ in range(steps):
        if distill:
            loss_fn.set_progress(cur_nimg)
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(net, loss_fn, next_batch, 1, batch)
        optimizer_step(net, optimizer, learning_rate(lr, cur_nimg, lr_rampup_kimg))
        if distill:
            loss_fn.update_target(net)
        update_ema(ema, net, cur_nimg, batch, ema_halflife_kimg, ema_rampup_ratio)
        cur_nimg += batch
    return ema

def pretrain_denoiser(mixture, steps, batch, lr, lr_rampup_kimg, ema_halflife_kimg, ema_rampup_ratio, cbase, seed=10000):
    """The student U-Net trained as the mixture's denoiser with EDM's loss: the diffusion
    checkpoint that real distillation starts every student from."""
    torch.manual_seed(seed)
    net = make_student(mixture, cbase).train().requires_grad_(True)
    return optimize(net, mixture, EDMLoss(), seed, steps, batch, lr, lr_rampup_kimg, ema_halflife_kimg, ema_rampup_ratio)

def train_student(mixture, S, seed, loss_kwargs, steps, batch, lr, lr_rampup_kimg, ema_halflife_kimg, ema_rampup_ratio, cbase, init=None):
    """Distil the mixture into an S-step student, from random weights or from the network `init`;
    returns its EMA and the loss (for the grid)."""
    torch.manual_seed(seed)
    net = make_student(mixture, cbase) if init is None else copy.deepcopy(init)
    net.train().requires_grad_(True)
    loss_kwargs = for_S(loss_kwargs, S)
    loss_class = OracleTargetLoss if 'oracle_substeps' in loss_kwargs else ConsistencyDistillLoss
    loss_fn = loss_class(S=S, **loss_kwargs).set_teacher(mixture)
    return optimize(net, mixture, loss_fn, seed, steps, batch, lr, lr_rampup_kimg, ema_halflife_kimg, ema_rampup_ratio), loss_fn

def sample_student(student, loss_fn, latents, sampler_kwargs, seed):
    gen = torch.Generator().manual_seed(5000 + seed)
    randn_like = lambda x: torch.randn(x.shape, dtype=x.dtype, generator=gen)
    with torch.no_grad():
        return samplers.student_sampler(student, latents, sigmas=loss_fn.student_sigmas(), randn_like=randn_like, **sampler_kwargs)

def mean_std(values):
    return dict(mean=float(np.mean(values)), std=float(np.std(values)), values=[float(v) for v in values])

#----------------------------------------------------------------------------

def run_mixture(name, S_list, seeds, config, overrides, steps, batch, lr, lr_rampup, ema, ema_rampup, cbase, num, ref_steps, init_steps, init_cache, profile, log):
    """All figures of one mixture as a dict."""
    start = time.time()
    mixture = make_mixture(name)
    budget_kimg = steps * batch / 1000
    loss_kwargs, sampler_kwargs = resolve_config(config, overrides, budget_kimg, mixture.dim)
    for S in S_list:
        for_S(loss_kwargs, S)
    latents = torch.randn([num, mixture.img_channels, mixture.img_resolution, mixture.img_resolution],
        dtype=torch.float64, generator=torch.Generator().manual_seed(777))
    exact, doubling_rms, doubling_max = references(mixture, latents, ref_steps, sigma_min=1e-4)
    ref_time = time.time() - start
    log(f'{name}: {mixture.img_channels}x{mixture.img_resolution}x{mixture.img_resolution}, {mixture.num_components} components; '
        f'reference: Heun with {2 * ref_steps} levels, step doubling RMS {doubling_rms:.2e} (max {doubling_max:.2e}), '
        f'exact samples\' TV {coverage_tv(mixture, exact):.3f}, {ref_time:.1f} s')
    out = dict(mixture=name, shape=[mixture.img_channels, mixture.img_resolution, mixture.img_resolution],
        components=mixture.num_components, loss_kwargs=loss_kwargs, sampler_kwargs=sampler_kwargs,
        reference=dict(num_steps=2 * ref_steps, sigma_min=1e-4, doubling_rms=doubling_rms, doubling_max=doubling_max,
        exact_tv=coverage_tv(mixture, exact), seconds=ref_time), S=dict())
    init = None
    if init_steps > 0:
        t0 = time.time()
        cache = None if init_cache is None else os.path.join(init_cache,
            f'{name}-denoiser-{init_steps}x{batch}-lr{lr:g}-rampup{lr_rampup:g}-ema{ema:g}-{ema_rampup:g}-c{cbase}.pt')
        if cache is not None and os.path.isfile(cache):
            init = make_student(mixture, cbase).eval().requires_grad_(False)
            init.load_state_dict(torch.load(cache, map_location='cpu'))
        else:
            init = pretrain_denoiser(mixture, init_steps, batch, lr, lr_rampup, ema, ema_rampup, cbase)
            if cache is not None:
                os.makedirs(init_cache, exist_ok=True)
                torch.save(init.state_dict(), cache + '.tmp')
                os.replace(cache + '.tmp', cache)
        out['init'] = dict(steps=init_steps, seconds=time.time() - t0, cache=cache)
        log(f'  initial student: the U-Net trained as the denoiser for {init_steps} steps x {batch} images'
            f'{" (from " + cache + ")" if cache is not None else ""}, {time.time() - t0:.1f} s')
    for S in S_list:
        rows = dict(rmse=[], tv=[], seconds=[])
        profiles, states = [], None
        for seed in seeds:
            t0 = time.time()
            student, loss_fn = train_student(mixture, S, seed, loss_kwargs, steps, batch, lr, lr_rampup, ema, ema_rampup, cbase, init=init)
            x = sample_student(student, loss_fn, latents, sampler_kwargs, seed)
            rows['rmse'].append(rmse(x, exact))
            rows['tv'].append(coverage_tv(mixture, x))
            rows['seconds'].append(time.time() - t0)
            if profile and not sampler_kwargs:
                states = states if states is not None else exact_states(mixture, latents, loss_fn.student_sigmas(), ref_steps)
                profiles.append(segment_profile(student, states, loss_fn.student_sigmas()))
        heun_steps = (S + 1) // 2
        euler = samplers.euler_sampler(mixture, latents, num_steps=S)
        heun = samplers.edm_sampler(mixture, latents, num_steps=heun_steps)
        entry = dict(student=dict(rmse=mean_std(rows['rmse']), tv=mean_std(rows['tv']), seconds=mean_std(rows['seconds'])),
            euler=dict(nfe=S, rmse=rmse(euler, exact), tv=coverage_tv(mixture, euler)),
            heun=dict(nfe=2 * heun_steps - 1, rmse=rmse(heun, exact), tv=coverage_tv(mixture, heun)))
        if len(profiles) > 0:
            entry['segments'] = dict(sigmas=loss_fn.student_sigmas().tolist(),
                **{key: [float(np.mean(v)) for v in zip(*[p[key] for p in profiles])] for key in ('one_step', 'from_exact')})
            log(f'  S={S} per segment (mean over seeds): one step from the exact state ' + ' '.join(f'{v:.3f}' for v in entry['segments']['one_step']) +
                ' | RMSE of the remaining steps from the exact state ' + ' '.join(f'{v:.3f}' for v in entry['segments']['from_exact']))
        if init is not None:
            with torch.no_grad():
                x = samplers.euler_sampler(init, latents.to(torch.float32), num_steps=S)
            entry['init_euler'] = dict(nfe=S, rmse=rmse(x, exact), tv=coverage_tv(mixture, x))
        out['S'][str(S)] = entry
        st = entry['student']
        log(f'  S={S}: student RMSE {st["rmse"]["mean"]:.4f} +- {st["rmse"]["std"]:.4f}, TV {st["tv"]["mean"]:.3f} +- {st["tv"]["std"]:.3f}, '
            f'{st["seconds"]["mean"]:.1f} s/seed | teacher Euler ({S} NFE) RMSE {entry["euler"]["rmse"]:.4f} TV {entry["euler"]["tv"]:.3f} | '
            f'Heun ({2 * heun_steps - 1} NFE) RMSE {entry["heun"]["rmse"]:.4f} TV {entry["heun"]["tv"]:.3f}' +
            (f' | initial student\'s Euler ({S} NFE) RMSE {entry["init_euler"]["rmse"]:.4f}' if 'init_euler' in entry else ''))
    out['seconds'] = time.time() - start
    return out

@click.command()
@click.option('--mixture',      help='Mixture(s)', type=click.Choice(['gmm8', 'gmm16', 'both']), default='both', show_default=True)
@click.option('--config',       help='Loss configuration preset', type=click.Choice(list(CONFIGS)), default='current', show_default=True)
@click.option('--set', 'overrides', help='KEY=VALUE override of a loss (or sampler_*) keyword; repeatable', metavar='KEY=VALUE', multiple=True)
@click.option('--S', 'S_list',  help='Student steps, one student each', metavar='LIST', type=str, default='2,4,8', show_default=True)
@click.option('--seeds',        help='Training seeds', metavar='LIST', type=str, default='0,1,2', show_default=True)
@click.option('--steps',        help='Optimizer steps per student', metavar='INT', type=click.IntRange(min=1), default=200, show_default=True)
@click.option('--batch',        help='Images per step', metavar='INT', type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--lr',           help='Peak learning rate (Adam)', metavar='FLOAT', type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option('--lr_rampup',    help='Learning-rate ramp-up', metavar='KIMG', type=click.FloatRange(min=0), default=0.64, show_default=True)
@click.option('--ema',          help='EMA half-life of the evaluated student', metavar='KIMG', type=click.FloatRange(min=0), default=0.5, show_default=True)
@click.option('--ema_rampup',   help='EMA half-life cap as a fraction of the images seen', metavar='FLOAT', type=click.FloatRange(min=0), default=0.25, show_default=True)
@click.option('--init_steps',   help='Steps of denoiser training that give the initial student (0: random weights)', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--init_cache',   help='Keep the denoiser checkpoint in this folder and reuse it', metavar='DIR', type=str)
@click.option('--cbase',        help='Channel base of the student U-Net', metavar='INT', type=click.IntRange(min=4), default=16, show_default=True)
@click.option('--num',          help='Evaluation samples (fixed noise)', metavar='INT', type=click.IntRange(min=2), default=512, show_default=True)
@click.option('--ref_steps',    help='Heun levels of the coarse reference (the fine one has twice as many)', metavar='INT', type=click.IntRange(min=2), default=128, show_default=True)
@click.option('--profile',      help='Also report each segment\'s error from the exact states (deterministic sampler only)', is_flag=True)
@click.option('--threads',      help='CPU threads', metavar='INT', type=click.IntRange(min=1), default=1, show_default=True)
@click.option('--out',          help='Write the figures to this JSON file', metavar='JSON', type=str)
def main(mixture, config, overrides, S_list, seeds, steps, batch, lr, lr_rampup, ema, ema_rampup, init_steps, init_cache, cbase, num, ref_steps, profile, threads, out):
    """Distil Gaussian-mixture teachers into S-step students and compare them with the exact ODE endpoints."""
    torch.set_num_threads(threads)
    S_list = [int(v) for v in S_list.split(',') if v.strip()]
    seeds = [int(v) for v in seeds.split(',') if v.strip()]
    names = MIXTURES if mixture == 'both' else (mixture,)
    start = time.time()
    print(f'Config {config} {list(overrides)}; budget {steps} steps x {batch} images per student, S={S_list}, seeds {seeds}, {threads} thread(s)', flush=True)
    log = lambda text: print(text, flush=True)
    results = [run_mixture(name, S_list, seeds, config, overrides, steps, batch, lr, lr_rampup, ema, ema_rampup, cbase, num, ref_steps, init_steps, init_cache, profile, log) for name in names]
    total = time.time() - start
    print(f'Total wall time {total:.1f} s', flush=True)
    if out is not None:
        with open(out, 'w') as f:
            json.dump(dict(config=config, overrides=list(overrides), S=S_list, seeds=seeds,
                budget=dict(steps=steps, batch=batch, kimg=steps * batch / 1000, lr=lr, lr_rampup_kimg=lr_rampup,
                ema_halflife_kimg=ema, ema_rampup_ratio=ema_rampup, cbase=cbase, init_steps=init_steps, init_cache=init_cache),
                num=num, threads=threads, seconds=total, mixtures=results), f, indent=2)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

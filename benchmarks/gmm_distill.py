"""Students of a Gaussian-mixture teacher (`training.gmm`) against its exact PF-ODE endpoints: RMSE and TV of the
component shares per S, next to the teacher's Euler and Heun (docs/quality-study.md)."""

import copy
import json
import os
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from training import samplers, consistency_ops as ops
from training.gmm import GaussianMixture
from training.loss import EDMLoss
from training.loss_cd import ConsistencyDistillLoss
from training.networks import EDMPrecond
from training.steps import accumulate_gradients, learning_rate, optimizer_step, update_ema

#----------------------------------------------------------------------------
# gmm8: 1x8x8, 4 equal components; gmm16: 3x16x16, 8 unequal ones; smooth means, rank-4 covariances.

MIXTURES = ('gmm8', 'gmm16')

def _smooth(gen, n, channels, resolution, low):
    """[n, C*R*R] of unit RMS upsampled from low x low noise."""
    z = torch.randn([n, channels, low, low], dtype=torch.float64, generator=gen)
    up = torch.nn.functional.interpolate(z, size=(resolution,) * 2, mode='bilinear', align_corners=True).reshape(n, -1)
    return up / up.square().mean(dim=1, keepdim=True).sqrt()

def make_mixture(name):
    gen = torch.Generator().manual_seed(2024)
    K, C, R, rank, scale = (4, 1, 8, 4, 0.6) if name == 'gmm8' else (8, 3, 16, 4, 0.5)
    means = scale * _smooth(gen, K, C, R, 2)
    factors = 0.1 * _smooth(gen, K * rank, C, R, 4).reshape(K, rank, -1).transpose(1, 2)
    weights = torch.ones(K) if name == 'gmm8' else torch.arange(1, K + 1, dtype=torch.float64)
    noise = 0.05 if name == 'gmm8' else torch.linspace(0.03, 0.08, K)
    return GaussianMixture(means, weights, factors, noise, img_channels=C, img_resolution=R)

#----------------------------------------------------------------------------
# Presets of loss keywords (a dict: one value per S); `--set KEY=VALUE` adds any keyword, sampler_* to the sampler.
# Interior sigmas per S where gmm8's `karras` students err, set by hand.
MID_LAYOUTS = {2: '2', 4: '8,2,0.5', 8: '12,6,3.5,2,1.2,0.6,0.25'}
ONE_EDGE = {S: S for S in (1, 2, 4, 8, 16)} # T_start of consistency training: one edge per segment.

CONFIGS = dict(
    current=dict(), addim_hop=dict(teacher_hop='addim'), oracle=dict(oracle_substeps=8),
    layout_mid=dict(student_sigmas=MID_LAYOUTS), oracle_layout_mid=dict(oracle_substeps=8, student_sigmas=MID_LAYOUTS),
    layout_mid_teacher=dict(student_sigmas=MID_LAYOUTS, target_mode='teacher'),
    ct=dict(ct=True, T_start=ONE_EDGE, T_anneal_kimg=None), # Consistency training (tuning with --init_steps).
)

def parse_value(text):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return dict(true=True, false=False, none=None).get(text.strip().lower(), text)

def resolve_config(name, overrides, budget_kimg, dim):
    """(loss, sampler) keywords; T_anneal_kimg=None is the whole budget, huber_c='<f>x' f times 0.00054 sqrt(d)."""
    merged = dict(CONFIGS[name])
    for item in overrides:
        if '=' not in item:
            raise click.ClickException(f'--set {item}: write KEY=VALUE, e.g. --set target_ema=0.9.')
        key, value = item.split('=', 1)
        merged[key.strip()] = parse_value(value)
    loss = {k: v for k, v in merged.items() if not k.startswith('sampler_')}
    sampler = {k.removeprefix('sampler_'): v for k, v in merged.items() if k.startswith('sampler_')}
    if loss.get('T_anneal_kimg', 0) is None:
        loss['T_anneal_kimg'] = budget_kimg
    if str(loss.get('huber_c')).endswith('x'):
        loss['huber_c'] = float(loss['huber_c'][:-1]) * 0.00054 * np.sqrt(dim)
    return loss, sampler

def for_S(loss_kwargs, S):
    for key, value in loss_kwargs.items():
        if isinstance(value, dict) and S not in value:
            raise click.ClickException(f'The preset gives {key} for S in {sorted(value)} only, not S={S}.')
    return {key: (value[S] if isinstance(value, dict) else value) for key, value in loss_kwargs.items()}

class OracleTargetLoss(ConsistencyDistillLoss):
    """Control: every non-terminal reference is the teacher's ODE solution (`oracle_substeps` Heun steps; to a
    boundary of 0, down to sigma_min, then the denoiser)."""

    def __init__(self, *, oracle_substeps=8, **kwargs):
        super().__init__(**dict(kwargs, target_mode='teacher'))
        self.oracle_substeps = int(oracle_substeps)

    @torch.no_grad()
    def draw(self, net, images, labels=None, augment_pipe=None):
        d = super().draw(net, images, labels, augment_pipe)
        denoise = ops.make_denoiser(self.teacher, labels, d.augment_labels)
        sigma_t = d.sigma_t.to(torch.float64)
        end = torch.where(d.sigma_ref > 0, d.sigma_ref.to(torch.float64), (sigma_t / 2).clamp(max=self.sigma_min))
        x, n = d.x_t.to(torch.float64), self.oracle_substeps
        for i in range(n):
            a, b = (sigma_t * (end / sigma_t) ** (k / n) for k in (i, i + 1))
            x = ops.heun_hop(denoise, x, a, b, dtype=torch.float64)
        x = torch.where(ops.expand_sigma(d.sigma_ref > 0, x).to(torch.bool), x, denoise(x, end).to(torch.float64))
        x_ref = torch.where(ops.expand_sigma(d.case == ops.TERMINAL, x).to(torch.bool), d.y.to(torch.float64), x)
        d.target, d.gain = ops.inverse_ddim(x_ref, d.x_t, d.sigma_t, d.sigma_ref, dtype=self.dtype)
        d.x_ref = x_ref.to(self.dtype)
        return d

#----------------------------------------------------------------------------

def references(mixture, latents, num_steps, sigma_min):
    """Exact endpoints (float64 Heun, 2 * num_steps levels), RMS and largest step-doubling difference."""
    coarse, fine = (samplers.edm_sampler(mixture, latents, num_steps=k * num_steps, sigma_min=sigma_min)
        for k in (1, 2))
    return fine, rmse(coarse, fine), float((coarse - fine).abs().max())

def exact_states(mixture, latents, sigmas, substeps):
    """Float64 PF-ODE states at a student grid's levels (per segment, Heun on `substeps` levels)."""
    sigmas = [float(v) for v in sigmas]
    states = [latents.to(torch.float64) * sigmas[0]]
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        grid = samplers.karras_sigmas(substeps, sigma_min=max(b, 1e-4), sigma_max=a).tolist() + [0.0] * (b == 0)
        x = states[-1]
        for sa, sb in zip(grid[:-1], grid[1:]):
            x = ops.heun_hop(mixture, x, sa, sb, dtype=torch.float64)
        states.append(x)
    return states

@torch.no_grad()
def segment_profile(student, states, sigmas):
    """Per segment j, RMSE of the student's step from exact state j to j+1 and of its steps to the end."""
    sigmas, S = [float(v) for v in sigmas], len(sigmas) - 1
    def run(j, end): # The student's DDIM steps from exact state j to level `end`, against exact state `end`.
        x = states[j]
        for a, b in zip(sigmas[j:end], sigmas[j + 1:end + 1]):
            x_hat = student(x, torch.as_tensor(a, dtype=torch.float64), None).to(torch.float64)
            x = x_hat if b == 0 else x_hat + (b / a) * (x - x_hat)
        return rmse(x, states[end])
    return dict(one_step=[run(j, j + 1) for j in range(S)], from_exact=[run(j, S) for j in range(S)])

def rmse(x, ref):
    return float((x.to(torch.float64) - ref).square().mean().sqrt())

def coverage_tv(mixture, x):
    """TV of the samples' component shares."""
    counts = torch.bincount(mixture.assign(x), minlength=mixture.num_components).to(torch.float64)
    return float(0.5 * (counts / counts.sum() - mixture.weights.cpu()).abs().sum())

#----------------------------------------------------------------------------

def make_student(mixture, cbase):
    mult = [1, 2] if mixture.img_resolution <= 8 else [1, 2, 2]
    return EDMPrecond(img_resolution=mixture.img_resolution, img_channels=mixture.img_channels, model_type='SongUNet',
        model_channels=cbase, channel_mult=mult, num_blocks=1, attn_resolutions=[], dropout=0)

def optimize(mixture, loss_fn, seed, steps, cbase, batch, lr, lr_rampup_kimg, ema_halflife_kimg, ema_rampup_ratio,
        init=None):
    """The student U-Net, from random weights or a copy of `init`, trained on fresh mixture samples; returns its EMA."""
    torch.manual_seed(seed)
    net = (make_student(mixture, cbase) if init is None else copy.deepcopy(init)).train().requires_grad_(True)
    distill = isinstance(loss_fn, ConsistencyDistillLoss)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr, betas=[0.9, 0.999], eps=1e-8)
    data_gen = torch.Generator().manual_seed(1000 + seed)
    next_batch = lambda: (mixture.sample(batch, generator=data_gen)[0].to(torch.float32), None)
    for cur_nimg in range(0, steps * batch, batch):
        if distill:
            loss_fn.set_progress(cur_nimg)
        optimizer.zero_grad(set_to_none=True)
        accumulate_gradients(net, loss_fn, next_batch, 1, batch)
        optimizer_step(net, optimizer, learning_rate(lr, cur_nimg, lr_rampup_kimg))
        if distill:
            loss_fn.update_target(net)
        update_ema(ema, net, cur_nimg, batch, ema_halflife_kimg, ema_rampup_ratio)
    return ema

def train_student(mixture, S, seed, loss_kwargs, **opt):
    """(EMA, loss) of an S-step student; `opt`: optimize's arguments after `seed`."""
    loss_kwargs = for_S(loss_kwargs, S)
    loss_fn = (OracleTargetLoss if 'oracle_substeps' in loss_kwargs else ConsistencyDistillLoss)(S=S, **loss_kwargs)
    return optimize(mixture, loss_fn.set_teacher(mixture), seed, **opt), loss_fn

def log(text):
    print(text, flush=True)

#----------------------------------------------------------------------------

def run_mixture(name, S_list, seeds, config, overrides, num, ref_steps, profile, steps, kimg, cbase, init_steps,
        init_cache, **opt):
    start, mixture = time.time(), make_mixture(name)
    loss_kwargs, sampler_kwargs = resolve_config(config, overrides, kimg, mixture.dim)
    for S in S_list:
        for_S(loss_kwargs, S)
    shape = [mixture.img_channels, mixture.img_resolution, mixture.img_resolution]
    latents = torch.randn([num, *shape], dtype=torch.float64, generator=torch.Generator().manual_seed(777))
    exact, doubling_rms, doubling_max = references(mixture, latents, ref_steps, sigma_min=1e-4)
    ref = dict(num_steps=2 * ref_steps, sigma_min=1e-4, doubling_rms=doubling_rms, doubling_max=doubling_max,
        exact_tv=coverage_tv(mixture, exact), seconds=time.time() - start)
    log(f'{name}: {"x".join(map(str, shape))}, {mixture.num_components} components; reference: Heun with '
        f'{2 * ref_steps} levels, step doubling RMS {doubling_rms:.2e} (max {doubling_max:.2e}), '
        f'exact samples\' TV {ref["exact_tv"]:.3f}, {ref["seconds"]:.1f} s')
    out = dict(mixture=name, shape=shape, components=mixture.num_components, loss_kwargs=loss_kwargs,
        sampler_kwargs=sampler_kwargs, reference=ref, S=dict())
    init, t0 = None, time.time()
    if init_steps > 0:
        cache = init_cache and os.path.join(init_cache, f'{name}-denoiser-{init_steps}x{opt["batch"]}-lr{opt["lr"]:g}'
            f'-rampup{opt["lr_rampup_kimg"]:g}-ema{opt["ema_halflife_kimg"]:g}-{opt["ema_rampup_ratio"]:g}-c{cbase}.pt')
        if cache and os.path.isfile(cache):
            init = make_student(mixture, cbase).eval().requires_grad_(False)
            init.load_state_dict(torch.load(cache, map_location='cpu'))
        else:
            init = optimize(mixture, EDMLoss(), 10000, init_steps, cbase, **opt) # The denoiser: EDM's loss.
            if cache:
                os.makedirs(init_cache, exist_ok=True)
                torch.save(init.state_dict(), cache + '.tmp')
                os.replace(cache + '.tmp', cache)
        out['init'] = dict(steps=init_steps, seconds=time.time() - t0, cache=cache)
        log(f'  initial student: the U-Net trained as the denoiser for {init_steps} steps x {opt["batch"]} images'
            f'{" (from " + cache + ")" if cache else ""}, {time.time() - t0:.1f} s')
    score = lambda x, nfe: dict(nfe=nfe, rmse=rmse(x, exact), tv=coverage_tv(mixture, x))
    for S in S_list:
        rows, profiles, states = [], [], None
        for seed in seeds:
            t0 = time.time()
            student, loss_fn = train_student(mixture, S, seed, loss_kwargs, steps=steps, cbase=cbase, init=init, **opt)
            gen, sigmas = torch.Generator().manual_seed(5000 + seed), loss_fn.student_sigmas()
            x = samplers.student_sampler(student, latents, sigmas=sigmas, **sampler_kwargs,
                randn_like=lambda x, gen=gen: torch.randn(x.shape, dtype=x.dtype, generator=gen))
            rows.append((rmse(x, exact), coverage_tv(mixture, x), time.time() - t0))
            if profile and not sampler_kwargs:
                states = states or exact_states(mixture, latents, sigmas, ref_steps)
                profiles.append(segment_profile(student, states, sigmas))
        cols = zip(('rmse', 'tv', 'seconds'), zip(*rows))
        entry = dict(student={k: dict(mean=float(np.mean(v)), std=float(np.std(v)), values=list(v)) for k, v in cols},
            euler=score(samplers.euler_sampler(mixture, latents, num_steps=S), S),
            heun=score(samplers.edm_sampler(mixture, latents, num_steps=(S + 1) // 2), S + S % 2 - 1))
        if profiles:
            seg = entry['segments'] = dict(sigmas=sigmas.tolist())
            seg.update({key: np.mean([p[key] for p in profiles], 0).tolist() for key in ('one_step', 'from_exact')})
            fmt = lambda key: ' '.join(f'{v:.3f}' for v in seg[key])
            log(f'  S={S} per segment (mean over seeds): one step from the exact state {fmt("one_step")} | '
                f'RMSE of the remaining steps from the exact state {fmt("from_exact")}')
        if init is not None:
            entry['init_euler'] = score(samplers.euler_sampler(init, latents.to(torch.float32), num_steps=S), S)
        out['S'][str(S)] = entry
        st = entry['student']
        tail = '' if init is None else f' | initial student\'s Euler ({S} NFE) RMSE {entry["init_euler"]["rmse"]:.4f}'
        ms = lambda key, fmt: f'{st[key]["mean"]:{fmt}} +- {st[key]["std"]:{fmt}}'
        rt = lambda key: f'({entry[key]["nfe"]} NFE) RMSE {entry[key]["rmse"]:.4f} TV {entry[key]["tv"]:.3f}'
        log(f'  S={S}: student RMSE {ms("rmse", ".4f")}, TV {ms("tv", ".3f")}, {st["seconds"]["mean"]:.1f} s/seed | '
            f'teacher Euler {rt("euler")} | Heun {rt("heun")}{tail}')
    out['seconds'] = time.time() - start
    return out

@click.command(context_settings=dict(show_default=True))
@click.option('--mixture', help='Mixture(s)', type=click.Choice(['gmm8', 'gmm16', 'both']), default='both')
@click.option('--config', help='Loss configuration preset', type=click.Choice(list(CONFIGS)), default='current')
@click.option('--set', 'overrides', help='Loss (or sampler_*) keyword; repeatable', metavar='KEY=VALUE', multiple=True)
@click.option('--S', 'S_list', help='Student steps, one student each', metavar='LIST', default='2,4,8')
@click.option('--seeds', help='Training seeds', metavar='LIST', default='0,1,2')
@click.option('--steps', help='Optimizer steps per student', metavar='INT', type=click.IntRange(1), default=200)
@click.option('--batch', help='Images per step', metavar='INT', type=click.IntRange(1), default=32)
@click.option('--lr', help='Peak learning rate', metavar='FLOAT', type=click.FloatRange(0, min_open=True), default=2e-3)
@click.option('--lr_rampup', help='Learning-rate ramp-up', metavar='KIMG', type=click.FloatRange(0), default=0.64)
@click.option('--ema', help='EMA half-life', metavar='KIMG', type=click.FloatRange(0), default=0.5)
@click.option('--ema_rampup', help='EMA ramp-up ratio', metavar='FLOAT', type=click.FloatRange(0), default=0.25)
@click.option('--init_steps', help='Initial denoiser steps (0: none)', metavar='INT', type=click.IntRange(0), default=0)
@click.option('--init_cache', help='Folder of denoiser checkpoints', metavar='DIR')
@click.option('--cbase', help='Channel base of the U-Net', metavar='INT', type=click.IntRange(4), default=16)
@click.option('--num', help='Evaluation samples', metavar='INT', type=click.IntRange(2), default=512)
@click.option('--ref_steps', help='Heun levels, coarse reference', metavar='INT', type=click.IntRange(2), default=128)
@click.option('--profile', help='Per-segment errors from the exact states (deterministic sampler)', is_flag=True)
@click.option('--threads', help='CPU threads', metavar='INT', type=click.IntRange(1), default=1)
@click.option('--out', help='JSON file of the figures', metavar='JSON')
def main(mixture, config, overrides, S_list, seeds, steps, batch, lr, lr_rampup, ema, ema_rampup, init_steps,
        init_cache, cbase, num, ref_steps, profile, threads, out):
    """Distil Gaussian-mixture teachers into S-step students, against the exact ODE endpoints."""
    torch.set_num_threads(threads)
    S_list, seeds = ([int(v) for v in text.split(',') if v.strip()] for text in (S_list, seeds))
    budget = dict(steps=steps, batch=batch, kimg=steps * batch / 1000, lr=lr, lr_rampup_kimg=lr_rampup,
        ema_halflife_kimg=ema, ema_rampup_ratio=ema_rampup, cbase=cbase, init_steps=init_steps, init_cache=init_cache)
    start = time.time()
    log(f'Config {config} {list(overrides)}; budget {steps} steps x {batch} images per student, S={S_list}, '
        f'seeds {seeds}, {threads} thread(s)')
    results = [run_mixture(name, S_list, seeds, config, overrides, num, ref_steps, profile, **budget)
        for name in (MIXTURES if mixture == 'both' else (mixture,))]
    total = time.time() - start
    log(f'Total wall time {total:.1f} s')
    if out is not None:
        with open(out, 'w') as f:
            json.dump(dict(config=config, overrides=list(overrides), S=S_list, seeds=seeds, budget=budget, num=num,
                threads=threads, seconds=total, mixtures=results), f, indent=2)

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

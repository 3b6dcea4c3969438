"""Print the figures docs/technical-report.md quotes about the code, each line starting with its report section
(float64 on the CPU, seconds): python benchmarks/report_figures.py"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
import dnnlib
from training import consistency_ops as ops
from training.loss_cd import ConsistencyDistillLoss, HUBER_SCALE
from training.networks import EDMPrecond, VPPrecond
from training.samplers import addim_step, addim_variance, karras_sigmas, student_sampler

f64, gen, one = torch.float64, torch.manual_seed(0), torch.ones(1, 1, dtype=torch.float64)
randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=f64)
e = lambda v, d=0: f'{float(v):.{d}e}'.replace('e-0', 'e-')
g3 = lambda v: f'{float(v):.{max(0, 2 - int(np.floor(np.log10(float(v)))))}f}' # 3 digits, no exponent.

def gauss(s, st=None): # N(0, s^2) data: its exact denoiser, or with student levels `st` its ideal student.
    def forward(x, sigma, *_args):
        sig, s2 = ops.expand_sigma(sigma, x), s ** 2
        if st is None:
            return s2 / (s2 + sig ** 2) * x
        r = st[(st[None, 1:] >= sig.flatten()[:, None] * (1 - ops.SIGMA_RTOL)).sum(1) + 1].reshape(sig.shape) / sig
        return (((s2 + (r * sig) ** 2) / (s2 + sig ** 2)).sqrt() - r) / (1 - r) * x
    return forward

def rel(sa, sb, v=0, s=0.5, heun=False): # Signed relative error of an aDDIM (or Heun) step of N(0, s^2), typical x_a.
    sa, sb = torch.broadcast_tensors(*(torch.as_tensor(t, dtype=f64).reshape(-1) for t in (sa, sb)))
    x = (s * s + sa ** 2).sqrt()[:, None]
    out = ops.heun_hop(gauss(s), x, sa, sb, f64) if heun else addim_step(gauss(s)(x, sa), x, sa, sb, v)
    return out.flatten() / (s * s + sb ** 2).sqrt() - 1

c_noise = EDMPrecond.coefficients(dnnlib.EasyDict(sigma_data=0.5), torch.tensor([0.002, 80], dtype=f64))[3]
print(f'1. c_noise at sigma 0.002, 80: {c_noise[0]:.2f}, {c_noise[1]:.2f}')
loss = ConsistencyDistillLoss()
g64, g1280, st8 = loss.grid(T=loss.T_start), loss.grid(T=loss.T_end), loss.student_sigmas()
for g in (g64, g1280):
    k, bnd, order = int(g.gain.argmax()), g.case == ops.BOUNDARY, g.gain.argsort()
    q = g.gain[order][torch.searchsorted(g.probs[order].cumsum(0), torch.tensor([0.95, 0.99], dtype=f64))]
    print(f'3.2 S={loss.S} karras, T={g.T}: {int(bnd.sum())} boundary gains {g.gain[bnd].min():.0f} to '
        f'{g3(g.gain.max())} (node {100 * (g.sigma_t[k] / g.sigma_ref[k] - 1):.2g}% above {g.sigma_ref[k]:.4g}), '
        f'general <= {g.gain[g.case == ops.GENERAL].max():.0f}; vp mean {(g.probs * g.gain).sum():.2g}, '
        f'p95 {q[0]:.0f}, p99 {q[1]:.0f}')
a, b = g1280.sigma_t[k:k + 1], g1280.sigma_ref[k:k + 1]
target = lambda D: ops.inverse_ddim(ops.heun_hop(D, one, a, b, f64), one, a, b, f64)[0]
factor = (target(lambda x, s: gauss(0.5)(x, s) + 1e-3) - target(gauss(0.5))) / 1e-3
print(f'3.2 teacher error -> target, s=0.5, g={g1280.gain[k]:.0f}: factor {float(factor):.6f}')
levels = lambda lay: ', '.join(f'{v:.4g}' for v in ops.build_student_sigmas(4, lay))
N = next(n for n in range(g64.T, 2 * g64.T) if torch.equal(karras_sigmas(n)[:2], g64.sigmas[:2]))
on = int(((karras_sigmas(g64.T)[1:-1, None] / st8[None, 1:-1] - 1).abs() <= ops.SIGMA_RTOL).sum())
extra = sorted({len(ops.teacher_sigmas(T, st8)) - 1 - T for T in range(1, loss.T_end + 1)})
print(f"4. S=4 karras {levels('karras')}; karras_open {levels('karras_open')}; S=8, T={g64.T}: {on} nodes of "
    f"N={g64.T} on student levels, N={N}, T'={g64.num_edges}; T={g64.T + 1}: T'={loss.grid(T=g64.T + 1).num_edges}; "
    f"T' - T for T=1..{loss.T_end}: {extra}; rtol {e(ops.SIGMA_RTOL)}")
lim, vp = torch.tensor([0.002, 1, 80], dtype=f64), VPPrecond(4, 1, model_channels=8, channel_mult=[1], num_blocks=1)
below = [f'{100 * (t[1] - t[0]) / (t[2] - t[0]):.0f}%' for t in (vp.sigma_inv(lim), lim.atan())]
g, F = ops.TeacherGrid(20000, st8), dict(vp=torch.atan, edm=lambda s: torch.erf((s.log() + 1.2) / 1.2 / 2 ** 0.5))
cdf = lambda F: (F(g.sigmas[0]) - F(g.sigmas[1:].clamp(min=0.002))) / (F(g.sigmas[0]) - F(g.sigmas[-2]))
dev = lambda p, mode: float((p.cumsum(0) - cdf(F[mode])).abs().max())
probs = lambda g, mode='vp': ops.edge_probs(g.sigma_t, g.seg, 8, mode, terminal_anchor=False)
w = 1 / (1 + g.sigma_t ** 2)
print(f'6. mass below 1: linear-beta VP {below[0]}, cosine {below[1]}; 20,000-node CDF error vp '
    f'{e(dev(probs(g), "vp"), 1)}, edm {e(dev(probs(g, "edm"), "edm"), 1)}, vp without Jacobian '
    f'{dev(w / w.sum(), "vp"):.2f}; vp terminal prob, T={g64.T}, {g1280.T}: {e(probs(g64)[-1], 1)}, '
    f'{e(probs(g1280)[-1], 1)}')
print(f'7. huber delta {HUBER_SCALE:g}, target_ema {loss.target_ema:g}')
for lay in ('karras', 'karras_open'):
    st = ops.build_student_sigmas(4, lay)
    f, z, v = gauss(0.4, st), randn(100_000, 1, 1, 1), st[0] ** 2
    det, sto = (student_sampler(f, z / z.std(), sigmas=st, stochastic=s, randn_like=lambda x: randn(x.shape))
        for s in (False, True))
    for a, b in zip(st[:-1], st[1:]):
        v = f(one, a) ** 2 * v + b ** 2
    print(f'9. S=4 {lay}, s=0.4: deterministic std {det.std():.3f}; stochastic std {sto.std():.3f}, '
        f'recursion {float(v.sqrt()):.3f}')
steps = torch.tensor([[80, 0], [9.7, 0.47], [1, 0.1], [0.47, 0.002], [0.1, 0.002]], dtype=f64)
errs = [rel(*steps.T, v).abs() for v in (0, addim_variance(steps[:, 0], 1, 0.25), addim_variance(steps[:, 0]))]
print('9.1 s=0.5, DDIM / aDDIM exact v / aDDIM paper v:', ', '.join(f'{a:g}->{b:g} ' + '/'.join(
    f'{float(r[i]):.2g}' for r in errs) for i, (a, b) in enumerate(steps.tolist())))
a, b = g64.sigma_t[:-1], g64.sigma_s[:-1]
q, heun = (rel(a, b, v, heun=v is None).abs() / rel(a, b).abs() for v in (addim_variance(a), None))
print(f'9.1 T={g64.T} hops, s=0.5, error / Euler: aDDIM {q[a >= 1].min():.2f} to {q[a >= 1].max():.2f} at '
    f'sigma_t >= 1, > 1 from {a[q > 1].max():.2g} down; Heun <= {heun.max():.2f}')

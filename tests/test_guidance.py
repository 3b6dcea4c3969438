"""Guided teachers (training/guidance.py): the denoiser D_g + w (D - D_g) against
closed-form Gaussians (cd-spec section 9) in the teacher's Heun hop and the
distillation target, generate.py --gnet/--guidance, and bad input."""

import os
import pickle

import pytest
import torch
from click.testing import CliRunner

import generate
from training import consistency_ops as ops
from training import guidance
from training.loss_cd import ConsistencyDistillLoss
from _gaussian import GaussianDenoiser, GaussianNet, denoise, flow

MU, STD = 0.3, 0.5      # The guided network's Gaussian.
MU_G, STD_G = -0.2, 0.8 # The guide's.
W = 2.0                 # Guidance weight.

def guided_exact(x, sigma, w=W):
    """D_g + w (D - D_g) of the two Gaussians, from the closed forms."""
    D, D_g = denoise(x, MU, STD, sigma), denoise(x, MU_G, STD_G, sigma)
    return D_g + w * (D - D_g)

def guided_ode(x, sigma_a, sigma_b, num_steps=400, w=W):
    """The guided probability-flow ODE dx/dsigma = (x - D_w(x; sigma)) / sigma from sigma_a to sigma_b
    (per sample), by classical Runge-Kutta with num_steps uniform steps in float64."""
    shape = [-1] + [1] * (x.ndim - 1)
    sigma_a, sigma_b = (torch.as_tensor(s, dtype=torch.float64).expand(x.shape[0]) for s in (sigma_a, sigma_b))
    h = ((sigma_b - sigma_a) / num_steps).reshape(shape)
    f = lambda x, s: (x - guided_exact(x, s.flatten(), w)) / s
    s = sigma_a.reshape(shape)
    for _ in range(num_steps):
        k1 = f(x, s)
        k2 = f(x + h / 2 * k1, s + h / 2)
        k3 = f(x + h / 2 * k2, s + h / 2)
        k4 = f(x + h * k3, s + h)
        x, s = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4), s + h
    return x

def gaussian_pair(resolution=2):
    net = GaussianDenoiser(torch.full([resolution * resolution], MU, dtype=torch.float64), STD, img_channels=1, img_resolution=resolution)
    gnet = GaussianDenoiser(torch.full([resolution * resolution], MU_G, dtype=torch.float64), STD_G, img_channels=1, img_resolution=resolution)
    return net, gnet

#----------------------------------------------------------------------------

def test_guided_denoiser_blends_the_network_and_its_guide():
    net, gnet = gaussian_pair()
    x = torch.randn([5, 1, 2, 2], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.01, 0.3, 1.0, 7.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(guidance.guided(net, gnet, W)(x, sigma), guided_exact(x, sigma), rtol=1e-12, atol=1e-12)
    assert torch.equal(guidance.guided(net, gnet, 1.0)(x, sigma), net(x, sigma))  # w = 1: the network, bit for bit,
    assert len(gnet.sigmas) == 1                                                   # ... without evaluating the guide.
    assert torch.equal(guidance.guided(net, gnet, 0.0)(x, sigma), gnet(x, sigma))  # w = 0: the guide.
    assert guidance.guided(net) is net and guidance.unwrap(guidance.guided(net, gnet, W)) is net

def test_guided_heun_hop_follows_the_guided_ode_to_third_order():
    net, gnet = gaussian_pair()
    teacher = ops.make_denoiser(guidance.guided(net, gnet, W))
    x = 1.0 + 0.7 * torch.randn([4, 1, 2, 2], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(guided_ode(x, 1.0, 0.5, w=1), flow(x, MU, STD, 1.0, 0.5), rtol=0, atol=1e-11) # The solver, against the exact flow.
    errors = []
    for h in (0.2, 0.1, 0.05):
        hop = ops.heun_hop(teacher, x, 1.0, 1.0 - h, dtype=torch.float64)
        errors.append(float((hop - guided_ode(x, 1.0, 1.0 - h)).abs().max()))
    assert all(6 < a / b < 10 for a, b in zip(errors[:-1], errors[1:])), errors # Local error O(h^3): halving h divides it by 8.
    assert errors[-1] < 1e-4

def test_guided_distillation_target_agrees_with_the_guided_ode(monkeypatch):
    """Every edge of the teacher grid once: x_ref and the target x_hat* of draw() against the exact
    solution of the guided ODE. x_ref's error is O(h^3) in the hop length h = sigma_t - sigma_s (Heun's
    local order), with the same constant as T doubles; the target's is the gain times it."""
    net, gnet = gaussian_pair()
    max_errors, constants = [], []
    for T in (64, 128):
        loss = ConsistencyDistillLoss(S=2, T_start=T, T_end=T, precision='float64', target_mode='teacher', sampling_mode='uniform')
        loss.set_teacher(guidance.guided(net, gnet, W))
        grid = loss.grid('cpu')
        monkeypatch.setattr(grid, 'sample', lambda n, generator=None: torch.arange(n)) # noqa: B023
        y = 0.5 * torch.randn([grid.num_edges, 1, 2, 2], dtype=torch.float64, generator=torch.Generator().manual_seed(T))
        d = loss.draw(net, y)
        assert torch.equal(d.k, torch.arange(grid.num_edges)) and set(d.case.tolist()) == {ops.TERMINAL, ops.BOUNDARY, ops.GENERAL}

        # The exact reference on the boundary: the ODE to sigma_s, then (general edges) the DDIM step of the exact D_w.
        hop = d.case != ops.TERMINAL
        x_s = d.y.clone()
        x_s[hop] = guided_ode(d.x_t[hop], d.sigma_t[hop], d.sigma_s[hop])
        x_ref = x_s.clone()
        general = d.case == ops.GENERAL
        x_hat = guided_exact(x_s[general], d.sigma_s[general])
        x_ref[general] = x_hat + (d.sigma_ref[general] / d.sigma_s[general]).reshape(-1, 1, 1, 1) * (x_s[general] - x_hat)
        r = (d.sigma_ref / d.sigma_t).reshape(-1, 1, 1, 1)
        target = (x_ref - r * d.x_t) / (1 - r)

        ref_error = (d.x_ref - x_ref).flatten(1).abs().max(dim=1).values
        target_error = (d.target - target).flatten(1).abs().max(dim=1).values
        assert torch.equal(ref_error[~hop], torch.zeros_like(ref_error[~hop])) # Terminal edges: the clean image.
        assert bool((target_error <= d.gain * ref_error * (1 + 1e-6) + 1e-12).all())
        max_errors.append(float(ref_error.max()))
        constants.append(float((ref_error[hop] / (d.sigma_t[hop] - d.sigma_s[hop]) ** 3).max()))
    assert max(constants) < 5 and max_errors[1] < 1e-4 and max_errors[0] / max_errors[1] > 4, (constants, max_errors)

#----------------------------------------------------------------------------
# generate.py --gnet --guidance.

CLASS_MEANS = [-0.6 + 0.13 * c for c in range(10)]

def snapshot(path, **kwargs):
    net = GaussianNet(**dict(dict(img_resolution=8, img_channels=3, label_dim=10, class_means=CLASS_MEANS, s=0.3), **kwargs))
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net, loss_fn=None, augment_pipe=None, dataset_kwargs={}), f)
    return str(path)

def images(outdir, *args):
    result = CliRunner().invoke(generate.main, [*args, f'--outdir={outdir}', '--seeds=0-5', '--steps=4', '--device=cpu'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    files = sorted(os.listdir(outdir))
    assert files == [f'{seed:06d}.png' for seed in range(6)]
    return [open(os.path.join(outdir, name), 'rb').read() for name in files], result.output

def test_generate_with_guidance_blends_the_network_and_its_guide(tmp_path):
    net = snapshot(tmp_path / 'net.pkl')
    guide = snapshot(tmp_path / 'guide.pkl', label_dim=0, class_means=None, mu=0.4, s=0.6) # Unconditional: classifier-free guidance.
    own, _ = images(tmp_path / 'own', f'--network={net}')
    guide_own, _ = images(tmp_path / 'guide_own', f'--network={guide}')
    w1, _ = images(tmp_path / 'w1', f'--network={net}', f'--gnet={guide}', '--guidance=1')
    w0, _ = images(tmp_path / 'w0', f'--network={net}', f'--gnet={guide}', '--guidance=0')
    w2, text = images(tmp_path / 'w2', f'--network={net}', f'--gnet={guide}', '--guidance=2')
    assert w1 == own and w0 == guide_own
    assert all(a != b and a != c for a, b, c in zip(w2, own, guide_own))
    assert f'guided by "{guide}" (guidance 2)' in text

def error(*args):
    result = CliRunner().invoke(generate.main, [*args, '--device=cpu'])
    lines = [line for line in result.output.splitlines() if line.startswith('Error: ')]
    assert result.exit_code != 0 and len(lines) == 1 and 'Traceback' not in result.output, result.output
    return lines[0]

def test_guidance_bad_input(tmp_path):
    net = snapshot(tmp_path / 'net.pkl')
    out = f'--outdir={tmp_path / "out"}'
    for kwargs, expected in [
        (dict(img_resolution=16), 'Error: The guide "{}" has resolution 16, but the guided network has 8; pass a guide of the network\'s resolution.'),
        (dict(img_channels=1), 'Error: The guide "{}" has channel count 1, but the guided network has 3; pass a guide of the network\'s channel count.'),
        (dict(label_dim=5, class_means=CLASS_MEANS[:5]), 'Error: The guide "{}" is conditioned on 5 classes, but the guided network on 10; pass an unconditional '
            'guide (classifier-free guidance) or one of the network\'s classes (autoguidance).'),
    ]:
        guide = snapshot(tmp_path / 'guide.pkl', **kwargs)
        assert error(f'--network={net}', f'--gnet={guide}', '--guidance=2', out) == expected.format(guide)
    guide = snapshot(tmp_path / 'guide.pkl', label_dim=0, class_means=None)
    assert error(f'--network={net}', '--guidance=2', out) == 'Error: --guidance=2 needs a guiding network; pass --gnet=PKL|URL, or leave --guidance out.'
    assert error(f'--network={net}', f'--gnet={guide}', out) == \
        'Error: --gnet was given without a guidance weight; pass --guidance=W (1 = no guidance, EDM2 publishes values from 1.2 to 2.9).'
    assert "Invalid value for '--guidance': -1.0 is not in the range x>=0." in error(f'--network={net}', f'--gnet={guide}', '--guidance=-1', out)
    student = tmp_path / 'student.pkl'
    with open(student, 'wb') as f:
        pickle.dump(dict(ema=GaussianNet(img_resolution=8, img_channels=3), consistency=dict(S=2, student_sigmas=[80.0, 1.0, 0.0])), f)
    assert error(f'--network={student}', f'--gnet={guide}', '--guidance=2', out).startswith('Error: --gnet guides only --sampler=heun, euler or addim;')
    with pytest.raises(AssertionError): # An internal invariant: the scripts refuse a negative weight with a sentence (above).
        guidance.guided(*gaussian_pair(), -0.5)
    assert not os.path.exists(tmp_path / 'out')

#----------------------------------------------------------------------------

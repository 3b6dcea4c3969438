"""training/loss_cd.py: the distillation target against the closed-form
Gaussian (cd-spec section 9), the target modes and dropout replay, precision
under autocast, reduction, diagnostics, pickling and resume, bad input, and an
end-to-end distillation of a small student from random initialisation."""

import copy
import math
import pickle

import numpy as np
import pytest
import torch

from _gaussian import GaussianDenoiser
from torch_utils import training_stats
from training import consistency_ops as ops
from training import samplers
from training.loss_cd import ConsistencyDistillLoss, distance, loss_weight
from training.networks import EDMPrecond

pytestmark = pytest.mark.usefixtures('one_thread')

#----------------------------------------------------------------------------
# The closed-form Gaussian teacher (_gaussian.py) and the exact consistency function.

class ExactConsistency(torch.nn.Module):
    """The ideal multistep student of the Gaussian: at sigma in segment j it predicts the x whose
    DDIM step to the boundary sigma_b = s_{j+1} lands on the exact flow."""

    def __init__(self, teacher, student_sigmas):
        super().__init__()
        self.teacher = teacher
        self.student = torch.as_tensor(student_sigmas, dtype=torch.float64)
        self.img_channels, self.img_resolution, self.label_dim = teacher.img_channels, teacher.img_resolution, teacher.label_dim

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        x = x.to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        j = (self.student[None, 1:] >= sigma[:, None] * (1 - 1e-5)).sum(dim=1)
        sigma_b = self.student[j + 1]
        r = (sigma_b / sigma).reshape(-1, 1, 1, 1)
        return (self.teacher.flow(x, sigma, sigma_b, class_labels, augment_labels) - r * x) / (1 - r)

MU = [0.3, -0.2, 0.1, 0.0]
STD = 0.5

def gaussian(out_dtype=None):
    return GaussianDenoiser(MU, STD, img_channels=4, img_resolution=1, out_dtype=out_dtype)

def gaussian_images(n, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.tensor(MU, dtype=torch.float64).reshape(1, 4, 1, 1) + STD * torch.randn(n, 4, 1, 1, generator=gen, dtype=torch.float64)).to(dtype)

#----------------------------------------------------------------------------
# Must-show 1: the target x_hat* in closed form.

def _closed_form_target(d, student, teacher_grid, terminal_teacher_hop, mu=None, teacher_target=False):
    """x_hat* of every sample from scratch: sigmas from the grids, the Heun hop of the linear
    Gaussian denoiser as a scalar factor, the exact flow behind the exact target network (or,
    with `teacher_target`, the DDIM step of the teacher's denoiser). `mu` [N, ...] gives each
    sample's own mean (conditional Gaussian)."""
    s2 = STD ** 2
    nodes = teacher_grid.tolist()
    stud = student.tolist()
    out = torch.empty_like(d.x_t, dtype=torch.float64)
    for i in range(d.x_t.shape[0]):
        mu_i = torch.tensor(MU, dtype=torch.float64).reshape(1, 4, 1, 1) if mu is None else mu[i:i+1]
        x_t = d.x_t[i:i+1].to(torch.float64)
        k = int(np.argmin(np.abs(np.array(nodes) - float(d.sigma_t[i]))))
        sigma_t = nodes[k]
        assert float(d.sigma_t[i]) == pytest.approx(sigma_t, rel=1e-7)
        lower = nodes[k + 1]
        sigma_b = max(v for v in stud if v < sigma_t * (1 - 1e-5))
        if lower == 0: # Terminal.
            ref = d.y[i:i+1].to(torch.float64) if not terminal_teacher_hop else mu_i + s2 / (s2 + sigma_t ** 2) * (x_t - mu_i)
            out[i] = ref[0]
            continue
        sigma_s = max(lower, sigma_b)
        if lower <= sigma_b * (1 + 1e-5):
            sigma_s = sigma_b
        g1 = sigma_t / (s2 + sigma_t ** 2)
        e = 1 + (sigma_s - sigma_t) * g1
        heun = 1 + (sigma_s - sigma_t) / 2 * (g1 + e * sigma_s / (s2 + sigma_s ** 2))
        x_s = mu_i + (x_t - mu_i) * heun
        if teacher_target:
            x_hat_s = mu_i + s2 / (s2 + sigma_s ** 2) * (x_s - mu_i)
            x_ref = x_hat_s + sigma_b / sigma_s * (x_s - x_hat_s)
        else:
            x_ref = mu_i + (x_s - mu_i) * math.sqrt(s2 + sigma_b ** 2) / math.sqrt(s2 + sigma_s ** 2)
        r = sigma_b / sigma_t
        out[i] = ((x_ref - r * x_t) / (1 - r))[0]
    return out

@pytest.mark.parametrize('layout', ['karras', 'karras_open'])
@pytest.mark.parametrize('terminal_teacher_hop', [False, True])
def test_target_matches_closed_form(layout, terminal_teacher_hop):
    teacher = gaussian()
    for precision, atol in [('float64', 1e-5), ('float32', None)]:
        loss_fn = ConsistencyDistillLoss(S=8, T_start=64, T_end=64, student_sigmas=layout,
            sampling_mode='uniform', target_mode='live', terminal_teacher_hop=terminal_teacher_hop, precision=precision).set_teacher(teacher)
        exact = ExactConsistency(teacher, loss_fn.student_sigmas())
        torch.manual_seed(0)
        d = loss_fn.draw(exact, gaussian_images(400, seed=1))
        assert {int(c) for c in d.case} == {ops.TERMINAL, ops.BOUNDARY, ops.GENERAL}
        assert d.target.dtype == loss_fn.dtype
        expected = _closed_form_target(d, loss_fn.student_sigmas(), loss_fn.grid().sigmas, terminal_teacher_hop)
        err = (d.target.to(torch.float64) - expected).abs().flatten(1).max(dim=1).values
        if atol is None: # float32 arithmetic: cancellation in x_ref - r x_t scales with |x_t| and the gain.
            atol_i = 1e-6 * (1 + d.x_t.abs().flatten(1).max(dim=1).values.to(torch.float64)) * d.gain.to(torch.float64)
            assert bool((err <= atol_i).all()), float((err / atol_i).max())
        else:
            for c in range(3):
                assert float(err[d.case == c].max()) < atol, (ops.CASE_NAMES[c], float(err[d.case == c].max()))

class ShiftAugment:
    """Augmentation pipe stand-in: shifts each image by a random constant, which it returns as the label."""
    def __call__(self, images):
        shift = torch.randn(images.shape[0], 1, dtype=images.dtype)
        return images + shift.reshape(-1, 1, 1, 1), shift.repeat(1, 9)

@pytest.mark.parametrize('target_mode', ['live', 'teacher'])
def test_labels_and_augmentation_follow_the_samples(target_mode):
    # A conditional Gaussian: every network must see each sample's own class and augmentation
    # labels, through the subsets of the teacher hop and the target pass.
    teacher = GaussianDenoiser(MU, STD, 4, 1, class_shift=[-1.0, 0.0, 2.0])
    loss_fn = ConsistencyDistillLoss(S=4, T_start=32, T_end=32, sampling_mode='uniform',
        target_mode=target_mode, terminal_teacher_hop=True, precision='float64').set_teacher(teacher)
    student = ExactConsistency(teacher, loss_fn.student_sigmas())
    gen = torch.Generator().manual_seed(11)
    classes = torch.randint(0, 3, [300], generator=gen)
    labels = torch.nn.functional.one_hot(classes, 3).to(torch.float32)
    images = gaussian_images(300, seed=12) + torch.tensor([-1.0, 0.0, 2.0])[classes].reshape(-1, 1, 1, 1)
    torch.manual_seed(13)
    d = loss_fn.draw(student, images, labels, augment_pipe=ShiftAugment())
    mu = teacher.mean(torch.float64, labels, d.augment_labels)
    assert mu.shape[0] == 300 and len(set(mu[:, 0].flatten().tolist())) == 300
    expected = _closed_form_target(d, loss_fn.student_sigmas(), loss_fn.grid().sigmas, True, mu=mu,
        teacher_target=(target_mode == 'teacher'))
    torch.testing.assert_close(d.target, expected, rtol=0, atol=1e-9)

@pytest.mark.parametrize('layout', ['karras', 'karras_open'])
def test_target_converges_to_exact_consistency_function(layout):
    # With the exact denoiser and target, only the Heun hop errs: at T = 1280 the boundary and
    # general targets are the exact consistency function f(x_t, sigma_t) to 2e-5, and
    # the error falls like the square of the edge width (T 256 -> 1280: 25x; require 8x).
    teacher = gaussian()
    errors = []
    for T in [256, 1280]:
        loss_fn = ConsistencyDistillLoss(S=8, T_start=T, T_end=T, student_sigmas=layout,
            sampling_mode='uniform', target_mode='live', precision='float64').set_teacher(teacher)
        exact = ExactConsistency(teacher, loss_fn.student_sigmas())
        torch.manual_seed(1)
        d = loss_fn.draw(exact, gaussian_images(2000, seed=2, dtype=torch.float64))
        hop = d.case != ops.TERMINAL
        errors.append(float((d.target - exact(d.x_t, d.sigma_t))[hop].abs().max()))
    assert errors[1] < 2e-5 and errors[0] / errors[1] > 8, errors

#----------------------------------------------------------------------------
# Must-show 3: target modes, dropout replay, precision.

class MaskNet(torch.nn.Module):
    """Tiny denoiser with dropout that records the masks it draws."""

    def __init__(self, p=0.5):
        super().__init__()
        self.img_channels, self.img_resolution, self.label_dim = 4, 1, 0
        self.lin1 = torch.nn.Linear(5, 32)
        self.lin2 = torch.nn.Linear(32, 4)
        self.p = p
        self.masks = []

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        x = x.to(torch.float32).flatten(1)
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, 1).expand(x.shape[0], 1)
        h = torch.nn.functional.silu(self.lin1(torch.cat([x / (1 + sigma), sigma.log()], dim=1)))
        mask = torch.nn.functional.dropout(torch.ones_like(h), p=self.p, training=self.training)
        self.masks.append(mask.detach().clone())
        return (x + self.lin2(h * mask)).reshape(-1, 4, 1, 1)

def test_live_target_replays_student_dropout():
    torch.manual_seed(0)
    net = MaskNet().train()
    loss_fn = ConsistencyDistillLoss(S=4, T_start=32, T_end=32, target_mode='live', sampling_mode='uniform').set_teacher(gaussian())
    images = gaussian_images(64, seed=3)
    loss_fn(net, images).sum().backward()
    target_mask, student_mask = net.masks
    assert 0.3 < float((student_mask == 0).to(torch.float32).mean()) < 0.7
    torch.testing.assert_close(target_mask, student_mask, rtol=0, atol=0)

    # The target's predictions for the general samples are what the student itself outputs
    # there under its own pass's dropout masks.
    d = loss_fn.draw(net, images)
    assert d.general.any() and d.rng_state is not None
    torch.set_rng_state(d.rng_state)
    x_in, s_in = d.x_t.clone(), d.sigma_t.clone()
    x_in[d.general], s_in[d.general] = d.x_s[d.general], d.sigma_s[d.general]
    with torch.no_grad():
        own = net(x_in, s_in)
    torch.testing.assert_close(d.target_out[d.general], own[d.general], rtol=0, atol=0)

    # Control: without sync_dropout the target draws masks of its own.
    loss_fn = ConsistencyDistillLoss(S=4, T_start=32, T_end=32, target_mode='live', sync_dropout=False).set_teacher(gaussian())
    net.masks.clear()
    d = loss_fn.draw(net, images)
    net(d.x_t, d.sigma_t)
    target_mask, student_mask = net.masks
    assert target_mask.shape == student_mask.shape # The target ran on the whole batch (fixed shapes)...
    assert not torch.equal(target_mask, student_mask) # ...with masks of its own.

def test_live_target_replays_dropout_of_edm_network():
    torch.manual_seed(1)
    net = EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=16, channel_mult=[1, 2],
        num_blocks=1, attn_resolutions=[4], dropout=0.3).train()
    teacher = copy.deepcopy(net)
    with torch.no_grad(): # Leave EDM's near-zero output initialisation, so that dropout shows.
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    loss_fn = ConsistencyDistillLoss(S=4, T_start=32, T_end=32, target_mode='live').set_teacher(teacher)
    d = loss_fn.draw(net, torch.rand(12, 1, 8, 8) * 2 - 1)
    assert d.general.any()
    torch.set_rng_state(d.rng_state)
    x_in, s_in = d.x_t.clone(), d.sigma_t.clone()
    x_in[d.general], s_in[d.general] = d.x_s[d.general], d.sigma_s[d.general]
    with torch.no_grad():
        own = net(x_in, s_in)[d.general]
        fresh = net(x_in, s_in)[d.general]
    torch.testing.assert_close(d.target_out[d.general], own, rtol=0, atol=0)
    assert float((fresh - own).abs().max()) > 1e-3 # Dropout is active: other masks give other outputs.

def test_ema_target_moves_by_decay():
    torch.manual_seed(2)
    net = MaskNet(p=0)
    loss_fn = ConsistencyDistillLoss(S=4, T_start=32, T_end=32, target_mode='ema', target_ema=0.9).set_teacher(gaussian())
    loss_fn(net, gaussian_images(16, seed=4))
    before = {k: v.clone() for k, v in loss_fn.target.state_dict().items()}
    for k, v in net.state_dict().items():
        torch.testing.assert_close(before[k], v, rtol=0, atol=0) # Created as a copy of the student.
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    loss_fn.update_target(net)
    after = loss_fn.target.state_dict()
    for k, v in net.state_dict().items():
        torch.testing.assert_close(after[k], 0.9 * before[k] + 0.1 * v)
    assert not any(p.requires_grad for p in loss_fn.target.parameters())

    # The target's x-prediction in the loss is the EMA network's, not the student's.
    d = loss_fn.draw(net.eval(), gaussian_images(32, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(d.target_out, loss_fn.target(d.x_in, d.s_in))
        assert not torch.allclose(d.target_out[d.general], net(d.x_in, d.s_in)[d.general])

def test_teacher_target_and_vectorised_calls():
    teacher = gaussian()
    student = MaskNet(p=0).eval()
    loss_fn = ConsistencyDistillLoss(S=4, T_start=32, T_end=32, target_mode='teacher', sampling_mode='uniform').set_teacher(teacher)
    torch.manual_seed(3)
    d = loss_fn.draw(student, gaussian_images(200, seed=6))
    hop = d.case != ops.TERMINAL
    # Teacher calls, each on the whole batch (fixed shapes): Heun's two evaluations, then the target pass.
    assert [len(s) for s in teacher.sigmas] == [200, 200, 200]
    torch.testing.assert_close(teacher.sigmas[0], d.sigma_t.to(torch.float32))
    torch.testing.assert_close(teacher.sigmas[1][hop], d.sigma_s[hop])
    assert all(bool((s > 0).all()) for s in teacher.sigmas)
    torch.testing.assert_close(teacher.sigmas[2], d.s_in.to(torch.float32))
    torch.testing.assert_close(d.target_out, teacher(d.x_in, d.s_in))
    torch.testing.assert_close(d.x_in[d.general], d.x_s[d.general])
    torch.testing.assert_close(d.x_in[~d.general], d.x_t[~d.general])
    # With the student in eval mode, the live target runs once, on the whole batch.
    calls = []
    student.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    loss_fn = ConsistencyDistillLoss(S=4, T_start=32, T_end=32, target_mode='live', sampling_mode='uniform').set_teacher(gaussian())
    d = loss_fn.draw(student, gaussian_images(200, seed=7))
    assert calls == [200]

def test_float32_arithmetic_under_autocast():
    images = gaussian_images(128, seed=8)
    results = []
    for autocast in [False, True]:
        teacher = gaussian(out_dtype=torch.bfloat16 if autocast else None)
        student = GaussianDenoiser(MU, 0.4, 4, 1, out_dtype=torch.bfloat16 if autocast else None)
        if not autocast: # The same bfloat16-rounded outputs, as float32.
            teacher.forward = _rounded(teacher.forward)
            student.forward = _rounded(student.forward)
        loss_fn = ConsistencyDistillLoss(S=4, T_start=32, T_end=32, target_mode='live', loss='l2').set_teacher(teacher)
        torch.manual_seed(4)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            d = loss_fn.draw(student, images)
            torch.manual_seed(4)
            loss = loss_fn(student, images)
        assert d.x_ref.dtype == d.target.dtype == loss.dtype == torch.float32
        results.append((d.target, loss))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)

def _rounded(forward):
    return lambda *args, **kwargs: forward(*args, **kwargs).to(torch.bfloat16).to(torch.float32)

#----------------------------------------------------------------------------
# Reduction, weights, diagnostics.

@pytest.mark.parametrize('mode', ['l2', 'huber', 'pseudo_huber', 'l2_root'])
def test_distance_and_reduction(mode):
    torch.manual_seed(5)
    diff = torch.randn(6, 3, 4, 4) * torch.tensor([1e-4, 1e-3, 1e-2, 0.1, 1, 10]).reshape(-1, 1, 1, 1)
    elems, per_sample = distance(diff, mode, huber_c=None)
    assert elems.shape == diff.shape
    torch.testing.assert_close(elems.flatten(1).sum(dim=1), per_sample, rtol=1e-5, atol=0)
    a = diff.to(torch.float64).flatten(1)
    if mode == 'l2':
        expected = (a ** 2).sum(dim=1)
    elif mode == 'huber':
        delta = 0.00054
        expected = torch.where(a.abs() <= delta, 0.5 * a ** 2, delta * (a.abs() - 0.5 * delta)).sum(dim=1)
    elif mode == 'pseudo_huber':
        c = 0.00054 * math.sqrt(48)
        expected = torch.sqrt((a ** 2).sum(dim=1) + c ** 2) - c
    else:
        expected = torch.sqrt((a ** 2).sum(dim=1))
    torch.testing.assert_close(per_sample.to(torch.float64), expected, rtol=1e-5, atol=1e-12)

def test_loss_weights():
    sigma = torch.tensor([0.01, 0.5, 3.0, 80.0], dtype=torch.float64)
    sd = 0.5
    expected = {
        'edm':           (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2,
        'sqrt_karras':   torch.sqrt(sigma ** 2 + sd ** 2) / (sigma * sd),
        'snr':           1 / sigma ** 2,
        'snr+1':         1 / sigma ** 2 + 1,
        'karras':        1 / sigma ** 2 + 1 / sd ** 2,
        'truncated-snr': torch.tensor([1e4, 4.0, 1.0, 1.0], dtype=torch.float64),
        'uniform':       torch.ones(4, dtype=torch.float64),
    }
    for mode, value in expected.items():
        torch.testing.assert_close(loss_weight(sigma, mode, sd), value)

def test_loss_value_and_diagnostics():
    torch.manual_seed(6)
    teacher = gaussian()
    student = GaussianDenoiser(MU, 0.45, 4, 1)
    loss_fn = ConsistencyDistillLoss(S=4, T_start=32, T_end=32, target_mode='live').set_teacher(teacher)
    collector = training_stats.Collector(regex='CD/.*', keep_previous=False)
    images = gaussian_images(256, seed=9)
    torch.manual_seed(7)
    d = loss_fn.draw(student, images)
    torch.manual_seed(7)
    loss = loss_fn(student, images)
    # Per-sample loss: lambda(sigma_t) times the pseudo-Huber distance of D_student(x_t) to x_hat*.
    diff = (student(d.x_t, d.sigma_t) - d.target).flatten(1)
    c = 0.00054 * math.sqrt(4)
    per_sample = loss_weight(d.sigma_t, 'sqrt_karras') * (torch.sqrt(diff.square().sum(dim=1) + c ** 2) - c)
    torch.testing.assert_close(loss.flatten(1).sum(dim=1), per_sample)
    assert loss.shape == images.shape
    collector.update()
    stats = collector.as_dict()
    assert stats['CD/loss'].num == 256
    assert stats['CD/loss'].mean == pytest.approx(float(per_sample.mean()), rel=1e-5)
    assert stats['CD/T'].mean == loss_fn.grid().num_edges and stats['CD/T_nominal'].mean == 32
    assert sum(stats[f'CD/frac_{n}'].mean for n in ops.CASE_NAMES) == pytest.approx(1)
    assert sum(stats[f'CD/loss_seg{j}'].num for j in range(4)) == 256
    assert stats['CD/gain_max'].mean == pytest.approx(float(d.gain.max()))
    assert stats['CD/gain_mean_general'].num == int((d.case == ops.GENERAL).sum())
    # Every name is registered even when a case did not occur (same names on every rank).
    loss_fn(student, images[:1])
    names = set(collector.names())
    expected = {'CD/loss', 'CD/T', 'CD/T_nominal'} | {f'CD/loss_seg{j}' for j in range(4)}
    expected |= {f'CD/{kind}_{n}' for kind in ('loss', 'frac') for n in ops.CASE_NAMES}
    expected |= {f'CD/gain_{s}{c}' for s in ('mean', 'max', 'p95', 'p99') for c in ('', '_boundary', '_general')}
    assert expected <= names

def test_annealing_drives_grid():
    loss_fn = ConsistencyDistillLoss(S=4, T_start=16, T_end=256, T_anneal_kimg=10).set_teacher(gaussian())
    assert loss_fn.T == 16 and loss_fn.grid().num_edges >= 16
    loss_fn.set_progress(5000)
    assert loss_fn.T == 64 and loss_fn.grid().num_edges >= 64
    loss_fn.set_progress(10**6)
    assert loss_fn.T == 256

#----------------------------------------------------------------------------
# Pickling, resume, bad input.

def test_pickle_drops_teacher_and_resume_is_exact():
    torch.manual_seed(8)
    teacher = gaussian()
    net = MaskNet(p=0.2).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    loss_fn = ConsistencyDistillLoss(S=4, T_start=16, T_end=64, T_anneal_kimg=1, target_ema=0.5).set_teacher(teacher)
    assert 'teacher_net' not in loss_fn.init_kwargs and loss_fn.init_kwargs.S == 4

    def step(loss_fn, net, opt, nimg, seed):
        loss_fn.set_progress(nimg)
        torch.manual_seed(seed)
        opt.zero_grad()
        loss = loss_fn(net, gaussian_images(32, seed=seed))
        loss.sum().backward()
        opt.step()
        loss_fn.update_target(net)
        return loss.detach()

    for i in range(3):
        step(loss_fn, net, opt, 32 * i, seed=i)
    data = pickle.dumps(loss_fn)
    state = copy.deepcopy(loss_fn.state_dict())
    net_state = copy.deepcopy(net.state_dict())
    restored = pickle.loads(data)
    assert restored.teacher is None and restored.target is None
    assert b'_rebuild' not in data and b'MaskNet' not in data and b'GaussianDenoiser' not in data # No network, no tensor.
    assert restored.student_sigmas().tolist() == loss_fn.student_sigmas().tolist()
    with pytest.raises(AssertionError, match='set_teacher'):
        restored(net, gaussian_images(4, seed=0))
    restored.set_teacher(teacher)
    restored.load_state_dict(state)
    assert restored.cur_nimg == 64

    net2 = MaskNet(p=0.2).train()
    net2.load_state_dict(net_state)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.05)
    for i in range(3, 6):
        a = step(loss_fn, net, opt, 32 * i, seed=i)
        b = step(restored, net2, opt2, 32 * i, seed=i)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for k, v in loss_fn.target.state_dict().items():
        torch.testing.assert_close(restored.target.state_dict()[k], v, rtol=0, atol=0)

def test_bad_input():
    teacher = gaussian()
    with pytest.raises(ValueError, match=r'S=8, T=4 '):
        ConsistencyDistillLoss(S=8, T_start=4, T_end=64).set_teacher(teacher)
    with pytest.raises(ValueError, match=r'S=3, T=64 .*segment\(s\) \[1\]'):
        ConsistencyDistillLoss(S=3, T_start=64, T_end=64, student_sigmas=[10.0, 9.999]).set_teacher(teacher)
    for p in [0, 1, 1.5, -0.2]:
        with pytest.raises(ValueError, match=f'terminal_prob={p} '):
            ConsistencyDistillLoss(terminal_prob=p).set_teacher(teacher)
    for kwargs in [dict(target_mode='frozen'), dict(loss='l1'), dict(weight_mode='snr2'), dict(sampling_mode='lognormal'),
            dict(target_ema=1.0), dict(S=0), dict(terminal_prob=0.5, sampling_mode='uniform')]:
        with pytest.raises(AssertionError): # click and preflight refuse these before the loss is built.
            ConsistencyDistillLoss(**kwargs).set_teacher(teacher)
    with pytest.raises(ValueError, match='precision'):
        ConsistencyDistillLoss(precision='float16')
    loss_fn = ConsistencyDistillLoss(S=4, T_start=32, T_end=32).set_teacher(teacher)
    wrong = GaussianDenoiser([0.0] * 9, STD, img_channels=1, img_resolution=3)
    with pytest.raises(ValueError, match='img_resolution=3 but the teacher img_resolution=1'):
        loss_fn(wrong, gaussian_images(4, seed=0))
    with pytest.raises(ValueError, match=r'shape \(4, 1, 3, 3\)'):
        loss_fn(gaussian(), torch.zeros(4, 1, 3, 3))

#----------------------------------------------------------------------------
# Must-show 4 (first half): distillation from random initialisation beats the teacher's S-step Euler.

class MLPDenoiser(torch.nn.Module):
    """A small MLP with EDM preconditioning over 4-dimensional 'images'."""

    def __init__(self, hidden=64, sigma_data=0.5):
        super().__init__()
        self.img_channels, self.img_resolution, self.label_dim = 4, 1, 0
        self.sigma_min, self.sigma_max, self.sigma_data = 0, float('inf'), sigma_data
        self.register_buffer('freqs', torch.arange(1, 9, dtype=torch.float32))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4 + 16, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.SiLU(),
            torch.nn.Linear(hidden, 4))

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        dtype = x.dtype
        x = x.to(torch.float32).flatten(1)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sigma ** 2 + sd ** 2).sqrt()
        c_noise = sigma.log() / 4
        emb = torch.cat([(c_noise * self.freqs).sin(), (c_noise * self.freqs).cos()], dim=1)
        F = self.net(torch.cat([c_in * x, emb], dim=1))
        return (c_skip * x + c_out * F).reshape(-1, 4, 1, 1).to(dtype)

def test_distilled_student_beats_teacher_euler():
    torch.manual_seed(9)
    teacher = gaussian()
    S = 8
    student = MLPDenoiser().train()
    batch, steps = 256, 400
    loss_fn = ConsistencyDistillLoss(S=S, T_start=16, T_end=128, T_anneal_kimg=80).set_teacher(teacher)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    for i in range(steps):
        loss_fn.set_progress(i * batch)
        for g in opt.param_groups:
            g['lr'] = 3e-3 * min(1, 2 * (1 - i / steps))
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(student, gaussian_images(batch, seed=1000 + i))
        loss.sum().mul(1 / batch).backward()
        opt.step()
        loss_fn.update_target(student)

    student.eval()
    z = torch.randn(2000, 4, 1, 1, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    exact = teacher.flow(z * 80, 80.0, 0.0)
    with torch.no_grad():
        x_student = samplers.student_sampler(student, z, sigmas=loss_fn.student_sigmas())
    x_euler = samplers.euler_sampler(teacher, z, num_steps=S)
    rmse_student = float((x_student - exact).square().mean().sqrt())
    rmse_euler = float((x_euler - exact).square().mean().sqrt())
    assert rmse_student < 0.5 * rmse_euler, (rmse_student, rmse_euler)

#----------------------------------------------------------------------------

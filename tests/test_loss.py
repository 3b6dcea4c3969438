"""training/loss.py: noise distributions, weightings and the augmentation hook of the EDM losses."""

import pickle

import numpy as np
import pytest
import torch

from training import loss as losses

class RecordingNet:
    """Stand-in denoiser: records its inputs and returns `output(x, y)`."""

    def __init__(self, output):
        self.output = output
        self.calls = []

    def __call__(self, x, sigma, labels, augment_labels=None):
        self.calls.append(dict(x=x, sigma=sigma, labels=labels, augment_labels=augment_labels))
        return self.output(x)

def zero_net():
    return RecordingNet(lambda x: torch.zeros_like(x))

def all_losses():
    return [losses.VPLoss(), losses.VELoss(), losses.EDMLoss()]

def sample_sigma(loss_fn, n=20000, seed=0):
    """Run the loss on n one-pixel images; returns the drawn sigma [n] and the loss of a zero denoiser."""
    torch.manual_seed(seed)
    images = torch.ones([n, 1, 1, 1])
    net = zero_net()
    out = loss_fn(net, images, None)
    return net.calls[0]['sigma'].flatten().double(), out.flatten().double()

def test_edm_noise_distribution_and_weight():
    sigma, out = sample_sigma(losses.EDMLoss())
    log_sigma = sigma.log()
    assert log_sigma.mean().item() == pytest.approx(-1.2, abs=0.05)
    assert log_sigma.std().item() == pytest.approx(1.2, abs=0.05)
    # Zero denoiser, unit images: the loss equals the weight.
    assert torch.allclose(out, (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2, rtol=1e-5)

def test_edm_weight_hand_computed():
    # lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2: sigma = 0.5 gives 8, sigma = 1 gives 5.
    for value, weight in [(0.5, 8.0), (1.0, 5.0)]:
        loss_fn = losses.EDMLoss(P_mean=np.log(value), P_std=0)
        torch.manual_seed(0)
        images = torch.full([2, 1, 2, 2], 0.5)
        out = loss_fn(zero_net(), images)
        assert torch.allclose(out, torch.full_like(images, weight * 0.25), rtol=1e-5)

def test_ve_noise_distribution_and_weight():
    sigma, out = sample_sigma(losses.VELoss())
    a, b = np.log(0.02), np.log(100)
    log_sigma = sigma.log()
    assert log_sigma.min().item() >= a - 1e-5 and log_sigma.max().item() <= b + 1e-5
    assert log_sigma.mean().item() == pytest.approx((a + b) / 2, abs=0.05)
    assert log_sigma.var().item() == pytest.approx((b - a) ** 2 / 12, rel=0.03)
    assert torch.allclose(out, 1 / sigma ** 2, rtol=1e-5)

def test_vp_noise_distribution_and_weight():
    loss_fn = losses.VPLoss()
    sigma, out = sample_sigma(loss_fn)
    # t = sigma_VP^-1(sigma) is uniform on [epsilon_t, 1].
    t = ((0.1 ** 2 + 2 * 19.9 * (1 + sigma ** 2).log()).sqrt() - 0.1) / 19.9
    assert t.min().item() >= 1e-5 - 1e-4 and t.max().item() <= 1 + 1e-5
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    assert t.var().item() == pytest.approx(1 / 12, rel=0.03)
    assert loss_fn.sigma(1.0).item() == pytest.approx(np.sqrt(np.expm1(0.5 * 19.9 + 0.1)), rel=1e-6)
    assert torch.allclose(out, 1 / sigma ** 2, rtol=1e-5)

@pytest.mark.parametrize('loss_fn', all_losses(), ids=lambda l: type(l).__name__)
def test_noise_is_gaussian_with_std_sigma(loss_fn):
    torch.manual_seed(1)
    images = torch.randn([64, 3, 8, 8])
    net = zero_net()
    loss_fn(net, images)
    call = net.calls[0]
    z = (call['x'] - images) / call['sigma']
    assert call['sigma'].shape == (64, 1, 1, 1)
    assert z.mean().item() == pytest.approx(0, abs=0.03)
    assert z.std().item() == pytest.approx(1, abs=0.03)

@pytest.mark.parametrize('loss_fn', all_losses(), ids=lambda l: type(l).__name__)
def test_perfect_denoiser_has_zero_loss(loss_fn):
    torch.manual_seed(2)
    images = torch.randn([8, 3, 4, 4])
    labels = torch.eye(8)
    net = RecordingNet(lambda x: images)
    out = loss_fn(net, images, labels)
    assert out.shape == images.shape
    assert torch.equal(out, torch.zeros_like(images))
    assert net.calls[0]['labels'] is labels
    assert net.calls[0]['augment_labels'] is None

@pytest.mark.parametrize('loss_fn', all_losses(), ids=lambda l: type(l).__name__)
def test_augment_hook(loss_fn):
    torch.manual_seed(3)
    images = torch.randn([8, 3, 4, 4])
    augmented = images.flip(3) * 2 + 1
    augment_labels = torch.randn([8, 9])
    def augment_pipe(batch):
        assert batch is images
        return augmented, augment_labels
    # The denoiser must reproduce the augmented images, and gets the augmentation labels.
    net = RecordingNet(lambda x: augmented)
    assert torch.equal(loss_fn(net, images, None, augment_pipe=augment_pipe), torch.zeros_like(images))
    assert net.calls[0]['augment_labels'] is augment_labels
    assert net.calls[0]['x'].shape == images.shape
    # Reproducing the original images instead is penalised.
    assert loss_fn(RecordingNet(lambda x: images), images, None, augment_pipe=augment_pipe).min().item() > 0

@pytest.mark.parametrize('loss_fn', all_losses(), ids=lambda l: type(l).__name__)
def test_losses_pickle(loss_fn):
    copy = pickle.loads(pickle.dumps(loss_fn))
    assert type(copy).__name__ == type(loss_fn).__name__
    assert vars(copy) == vars(loss_fn)

#----------------------------------------------------------------------------
# EDM2: learned uncertainty weighting.

class UncertainNet:
    """Stand-in EDM2 denoiser: D = `denoised(x)`, u(sigma) = `logvar(sigma)`; records its calls."""

    def __init__(self, denoised, logvar):
        self.denoised = denoised
        self.logvar = logvar
        self.calls = []

    def __call__(self, x, sigma, labels, return_logvar=False, **kwargs):
        self.calls.append(dict(x=x, sigma=sigma, labels=labels, return_logvar=return_logvar, **kwargs))
        assert return_logvar
        return self.denoised(x), self.logvar(sigma)

def test_edm2_loss_closed_form():
    torch.manual_seed(4)
    images = torch.randn([6, 2, 3, 3])
    labels = torch.eye(6)
    D = torch.randn_like(images)
    net = UncertainNet(lambda x: D, lambda sigma: 0.3 * sigma.log() - 0.2)
    out = losses.EDM2Loss(P_mean=-0.4, P_std=1.0, sigma_data=0.5)(net, images, labels)
    call = net.calls[0]
    assert call['labels'] is labels and 'augment_labels' not in call
    # Independent float64 evaluation with the drawn sigma.
    s = call['sigma'].double()
    u = 0.3 * s.log() - 0.2
    lam = (s ** 2 + 0.25) / (s * 0.5) ** 2
    expected = lam * torch.exp(-u) * (D.double() - images.double()) ** 2 + u
    assert out.shape == images.shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)

def test_edm2_loss_noise_distribution_and_optimal_uncertainty():
    torch.manual_seed(5)
    images = torch.ones([20000, 1, 1, 1])
    # Zero denoiser on unit images: the error is 1, so the loss is lambda e^-u + u, smallest at u = ln lambda.
    net = UncertainNet(lambda x: torch.zeros_like(x), lambda sigma: ((sigma ** 2 + 0.25) / (sigma * 0.5) ** 2).log())
    out = losses.EDM2Loss()(net, images)
    log_sigma = net.calls[0]['sigma'].flatten().double().log()
    assert log_sigma.mean().item() == pytest.approx(-0.4, abs=0.03)
    assert log_sigma.std().item() == pytest.approx(1.0, abs=0.03)
    sigma = log_sigma.exp()
    torch.testing.assert_close(out.flatten().double(), 1 + ((sigma ** 2 + 0.25) / (sigma * 0.5) ** 2).log(), rtol=1e-5, atol=1e-5)

def test_edm2_loss_augment_hook_and_pickle():
    torch.manual_seed(6)
    images = torch.randn([4, 3, 4, 4])
    augmented = images.flip(2)
    augment_labels = torch.randn([4, 9])
    net = UncertainNet(lambda x: augmented, lambda sigma: torch.zeros_like(sigma))
    out = losses.EDM2Loss()(net, images, None, augment_pipe=lambda batch: (augmented, augment_labels))
    assert torch.equal(out, torch.zeros_like(images))
    assert net.calls[0]['augment_labels'] is augment_labels
    copy = pickle.loads(pickle.dumps(losses.EDM2Loss(P_mean=-0.8, P_std=1.6)))
    assert vars(copy) == dict(P_mean=-0.8, P_std=1.6, sigma_data=0.5, _init_args=(), _init_kwargs=dict(P_mean=-0.8, P_std=1.6))

def test_edm2_loss_trains_the_uncertainty_of_a_real_network(one_thread):
    from training import networks_edm2 # pylint: disable=import-outside-toplevel
    torch.manual_seed(7)
    net = networks_edm2.Precond(img_resolution=8, img_channels=2, label_dim=3, model_channels=8, channel_mult=[1],
        num_blocks=1, attn_resolutions=[], logvar_channels=4, use_fp16=False)
    images = torch.randn([2, 2, 8, 8]) * 0.5
    out = losses.EDM2Loss()(net, images, torch.eye(3)[[0, 2]])
    assert out.shape == images.shape and torch.isfinite(out).all()
    out.mean().backward()
    assert net.logvar_linear.weight.grad.abs().sum() > 0
    assert net.unet.out_gain.grad.abs() > 0 # A new network's output gain is 0, so the U-Net learns through it first.

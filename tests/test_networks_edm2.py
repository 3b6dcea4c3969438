"""training/networks_edm2.py against the reference figures of the published EDM2 networks."""

import json
import os

import numpy as np
import pytest
import torch

from training import networks_edm2

from _numerics import output_and_gradients, relative_error

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'edm2_reference')
with open(os.path.join(FIXTURES, 'manifest.json')) as _f:
    MANIFEST = json.load(_f)
SMALL = sorted(name for name in MANIFEST if not name.startswith('full:'))
FULL = sorted(name for name in MANIFEST if name.startswith('full:'))
TOLERANCE = 1e-5

def reference_keys():
    """keys.txt as {configuration: [(name, shape), ...]}."""
    sections = {}
    with open(os.path.join(FIXTURES, 'keys.txt')) as f:
        for line in f:
            line = line.strip()
            if line.startswith('## '):
                current = sections.setdefault(line[3:].split()[0], [])
            elif line:
                name, shape = line.split(' ', 1)
                current.append((name, tuple(int(s) for s in shape.strip('()').split(',') if s.strip())))
    return sections

def load_fixture(name):
    with np.load(os.path.join(FIXTURES, f'{name}.npz')) as data:
        arrays = {key: torch.from_numpy(data[key]) for key in data.files}
    def section(prefix):
        return {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}
    return section('state/'), section('state_after_train/'), arrays

def build_loaded(name):
    state, _, arrays = load_fixture(name)
    net = networks_edm2.Precond(**MANIFEST[name]['kwargs'])
    net.load_state_dict(state, strict=True)
    return net.eval(), arrays

def fixture_call(net, arrays, **kwargs):
    """net(x, sigma, class_labels, **kwargs) and the raw U-Net output F_x of the same call."""
    captured = []
    hook = net.unet.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        result = net(arrays['input/x'], arrays['input/sigma'], arrays.get('input/class_labels'), **kwargs)
    finally:
        hook.remove()
    assert len(captured) == 1
    return result, captured[0]

def eval_errors(net, arrays):
    with torch.no_grad():
        (D_x, logvar), F_x = fixture_call(net, arrays, return_logvar=True)
    return {'D_x': relative_error(D_x, arrays['output/D_x']), 'F_x': relative_error(F_x, arrays['output/F_x']),
        'logvar': relative_error(logvar, arrays['output/logvar'])}

#----------------------------------------------------------------------------
# Reference configurations.

@pytest.mark.parametrize('name', SMALL)
def test_state_dict_names_order_and_counts(name):
    entry = MANIFEST[name]
    net = networks_edm2.Precond(**entry['kwargs'])
    ours = [(key, tuple(value.shape)) for key, value in net.state_dict().items()]
    ref = reference_keys()[name]
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a == b, f'{name}: state_dict entry {i} is {a}, keys.txt has {b}'
    assert len(ours) == len(ref) == entry['num_state_tensors']
    state, _, _ = load_fixture(name)
    assert list(state) == [key for key, _ in ref]
    assert sum(p.numel() for p in net.parameters()) == entry['num_params']

@pytest.mark.parametrize('name', SMALL)
def test_reproduces_reference_outputs(name, one_thread):
    net, arrays = build_loaded(name)
    errors = eval_errors(net, arrays)
    assert max(errors.values()) <= TOLERANCE, f'{name}: relative errors {errors}'
    # Evaluation leaves the weights alone.
    state, _, _ = load_fixture(name)
    assert all(torch.equal(value, state[key]) for key, value in net.state_dict().items())

@pytest.mark.parametrize('name', SMALL)
def test_training_pass_normalizes_the_stored_weights(name, one_thread):
    net, arrays = build_loaded(name)
    state, state_after, _ = load_fixture(name)
    net.train()
    D_x, _ = fixture_call(net, arrays)
    assert relative_error(D_x, arrays['output/D_x_train']) <= TOLERANCE
    assert list(state_after) == list(state)
    changed = 0
    for key, value in net.state_dict().items():
        assert relative_error(value, state_after[key]) <= TOLERANCE, f'{name}: {key} after the training pass'
        changed += not torch.allclose(state[key], state_after[key])
    assert changed > 0

@pytest.mark.parametrize('name', SMALL)
def test_every_state_tensor_shows_in_the_outputs(name, one_thread):
    # Changing every element of any one tensor by 1% (random signs) moves some output beyond the tolerance, so the comparison is not vacuous.
    net, arrays = build_loaded(name)
    gen = torch.Generator().manual_seed(0)
    tensors = dict(net.named_parameters()) | dict(net.named_buffers())
    for key, tensor in tensors.items():
        original = tensor.detach().clone()
        with torch.no_grad():
            tensor.mul_(1 + 0.01 * torch.randn(tensor.shape, generator=gen).sign())
        errors = eval_errors(net, arrays)
        with torch.no_grad():
            tensor.copy_(original)
        assert max(errors.values()) > TOLERANCE, f'{name}: perturbing {key} is invisible ({errors})'

@pytest.mark.parametrize('name', FULL)
def test_full_preset_parameter_counts(name):
    with torch.device('meta'):
        net = networks_edm2.Precond(**MANIFEST[name]['kwargs'])
    assert sum(p.numel() for p in net.parameters()) == MANIFEST[name]['num_params']

#----------------------------------------------------------------------------
# Magnitude-preserving building blocks.

def rms(x):
    return x.square().mean().sqrt().item()

def test_magnitude_preserving_operations():
    gen = torch.Generator().manual_seed(1)
    a = torch.randn([64, 32, 8, 8], generator=gen)
    b = torch.randn([64, 16, 8, 8], generator=gen)
    assert rms(networks_edm2.mp_silu(a)) == pytest.approx(1, abs=0.01)
    assert rms(networks_edm2.mp_sum(a, torch.randn(a.shape, generator=gen), t=0.3)) == pytest.approx(1, abs=0.01)
    cat = networks_edm2.mp_cat(a, b, t=0.3)
    assert cat.shape == (64, 48, 8, 8) and rms(cat) == pytest.approx(1, abs=0.01)
    # The weights of the two parts are in the ratio (1 - t) : t per channel group.
    assert rms(cat[:, :32]) / rms(cat[:, 32:]) == pytest.approx(0.7 / 0.3 * np.sqrt(16 / 32), rel=0.02)
    unit = networks_edm2.normalize(a * 7)
    torch.testing.assert_close(unit.square().mean(dim=[1, 2, 3]), torch.ones(64), rtol=1e-3, atol=0)
    features = networks_edm2.MPFourier(4096)(torch.randn([16], generator=gen))
    assert features.shape == (16, 4096) and rms(features) == pytest.approx(1, abs=0.05)

def test_resample_keeps_constants_and_shapes():
    x = torch.full([1, 2, 8, 8], 3.0)
    assert networks_edm2.resample(x, mode='keep') is x
    down = networks_edm2.resample(x, mode='down')
    up = networks_edm2.resample(x, mode='up')
    assert down.shape == (1, 2, 4, 4) and up.shape == (1, 2, 16, 16)
    torch.testing.assert_close(down, torch.full_like(down, 3.0))
    torch.testing.assert_close(up, torch.full_like(up, 3.0))
    with pytest.raises(AssertionError):
        networks_edm2.resample(x, mode='sideways')
    with pytest.raises(AssertionError):
        networks_edm2.resample(x, f=[1, 2, 1], mode='down')

def test_mpconv_forced_weight_normalization():
    torch.manual_seed(2)
    conv = networks_edm2.MPConv(3, 5, kernel=[3, 3])
    x = torch.randn([2, 3, 6, 6])
    with torch.no_grad():
        conv.weight.mul_(4)
    conv.eval()
    y = conv(x)
    assert torch.equal(torch.linalg.vector_norm(conv.weight, dim=[1, 2, 3]) > 3 * np.sqrt(27), torch.ones(5, dtype=torch.bool))
    # The output ignores the scale of each filter; a training pass stores unit-RMS filters.
    with torch.no_grad():
        conv.weight[0].mul_(10)
    torch.testing.assert_close(conv(x), y, rtol=1e-4, atol=1e-4) # Up to the eps of normalize().
    conv.train()
    torch.testing.assert_close(conv(x), y, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(torch.linalg.vector_norm(conv.weight, dim=[1, 2, 3]), torch.full([5], np.sqrt(27), dtype=torch.float32), rtol=1e-3, atol=0)
    linear = networks_edm2.MPConv(4, 2, kernel=[])
    assert linear(torch.randn([3, 4]), gain=0).abs().max() == 0

def einsum_attention(q, k, v):
    """EDM2's attention: softmax_k(q . k / sqrt(C)) by einsum, applied to v."""
    w = torch.einsum('nhcq,nhck->nhqk', q, k / np.sqrt(q.shape[2])).softmax(dim=3)
    return torch.einsum('nhqk,nhck->nhcq', w, v)

def test_attention_and_network_gradients_match_the_einsum_form(monkeypatch, one_thread):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 8, 6, requires_grad=True) for _ in range(3))
    upstream = torch.randn(2, 3, 8, 6)
    grads = torch.autograd.grad(networks_edm2.attention(q, k, v), [q, k, v], upstream)
    grads_ref = torch.autograd.grad(einsum_attention(q, k, v), [q, k, v], upstream)
    assert all(torch.allclose(g, g_ref, atol=1e-5) for g, g_ref in zip(grads, grads_ref))
    name = SMALL[0]
    def gradients():
        net, arrays = build_loaded(name)
        return output_and_gradients(net, arrays['input/x'], arrays['input/sigma'], arrays.get('input/class_labels'))
    D_x, grads = gradients()
    monkeypatch.setattr(networks_edm2, 'attention', einsum_attention)
    D_ref, grads_ref = gradients()
    assert relative_error(D_x, D_ref) < 1e-6
    assert grads.keys() == grads_ref.keys() and any('attn_qkv' in key for key in grads)
    assert all(relative_error(grads[key], grads_ref[key]) < 1e-5 for key in grads)

def test_block_bad_arguments():
    with pytest.raises(AssertionError):
        networks_edm2.Block(8, 8, 8, flavor='middle')
    with pytest.raises(AssertionError):
        networks_edm2.Block(8, 8, 8, resample_mode='sideways')

#----------------------------------------------------------------------------
# The wrapper.

def tiny_precond(**kwargs):
    """A small Precond whose gains (0 in a new network) are set to 1, so that the U-Net and its embedding matter."""
    net = networks_edm2.Precond(**{**dict(img_resolution=8, img_channels=2, label_dim=3, model_channels=8,
        channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], channels_per_head=8, logvar_channels=4), **kwargs})
    with torch.no_grad():
        for param in net.parameters():
            if param.ndim == 0:
                param.fill_(1)
    return net

def test_precond_interface(one_thread):
    torch.manual_seed(3)
    net = tiny_precond().eval()
    for attr in ('sigma_min', 'sigma_max', 'round_sigma'):
        assert not hasattr(net, attr)
    assert (net.img_resolution, net.img_channels, net.label_dim, net.sigma_data, net.use_fp16) == (8, 2, 3, 0.5, True)
    x = torch.randn([2, 2, 8, 8], dtype=torch.float64)
    sigma = torch.tensor([0.1, 5.0])
    with torch.no_grad():
        D_x = net(x, sigma, torch.eye(3)[[1, 1]])
        D_none = net(x, sigma)
        D_zero = net(x, sigma, torch.zeros([2, 3]))
        D_fp32, logvar = net(x, sigma, torch.eye(3)[[1, 1]], force_fp32=True, return_logvar=True)
    # use_fp16 does not apply on the CPU; missing labels mean the zero label.
    assert D_x.dtype == torch.float32 and torch.equal(D_x, D_fp32)
    assert torch.equal(D_none, D_zero) and not torch.equal(D_none, D_x)
    assert logvar.shape == (2, 1, 1, 1)
    # Tiny sigma: D(x) is close to x (c_skip -> 1, c_out -> 0).
    with torch.no_grad():
        D_small = net(x, torch.full([2], 1e-4))
    torch.testing.assert_close(D_small, x.float(), rtol=0, atol=1e-3)

def test_unconditional_precond_ignores_labels(one_thread):
    torch.manual_seed(4)
    net = tiny_precond(label_dim=0).eval()
    assert net.unet.emb_label is None
    x = torch.randn([1, 2, 8, 8])
    with torch.no_grad():
        assert torch.equal(net(x, torch.ones([1])), net(x, torch.ones([1]), torch.ones([1, 5])))

#----------------------------------------------------------------------------

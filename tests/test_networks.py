"""training/networks.py against the reference outputs of the published EDM networks."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from training import networks

from _numerics import output_and_gradients, relative_error

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'edm_reference')
with open(os.path.join(FIXTURES, 'manifest.json')) as _f:
    MANIFEST = json.load(_f)
SMALL = sorted(name for name in MANIFEST if not name.startswith('full:'))
FULL = sorted(name for name in MANIFEST if name.startswith('full:'))
TOLERANCE = 1e-4

def build(name, **overrides):
    entry = MANIFEST[name]
    return getattr(networks, entry['precond'])(**{**entry['kwargs'], **overrides})

def load_fixture(name):
    with np.load(os.path.join(FIXTURES, f'{name}.npz')) as data:
        arrays = {key: torch.from_numpy(data[key]) for key in data.files}
    state = {key[len('state/'):]: value for key, value in arrays.items() if key.startswith('state/')}
    return state, arrays

def fixture_call(net, arrays):
    """Run the wrapper on the fixture's inputs; returns D_x and the raw U-Net output F_x of the same call."""
    captured = []
    hook = net.model.register_forward_hook(lambda module, inputs, output: captured.append(output))
    try:
        with torch.no_grad():
            D_x = net(arrays['input/x'], arrays['input/sigma'], arrays.get('input/class_labels'), augment_labels=arrays.get('input/augment_labels'))
    finally:
        hook.remove()
    assert len(captured) == 1
    return D_x, captured[0]

def describe_mismatch(ours, ref):
    """Where ours and ref first differ by more than the tolerance."""
    bad = ((ours - ref).abs() > TOLERANCE * max(1.0, ref.abs().max().item())).nonzero()
    if len(bad) == 0:
        return 'no element beyond tolerance'
    idx = tuple(bad[0].tolist())
    return f'first differing element {idx}: ours {ours[idx].item():.6g}, reference {ref[idx].item():.6g}'

#----------------------------------------------------------------------------
# Reference configurations.

@pytest.mark.parametrize('name', SMALL)
def test_state_dict_names_and_shapes(name):
    entry = MANIFEST[name]
    net = build(name)
    ref_state, _ = load_fixture(name)
    ours = [(key, tuple(value.shape)) for key, value in net.state_dict().items()]
    ref = [(key, tuple(value.shape)) for key, value in ref_state.items()]
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a == b, f'{name} {entry["kwargs"]}: state_dict entry {i} is {a}, reference has {b}'
    assert len(ours) == len(ref) == entry['num_state_tensors'], f'{name}: {len(ours)} state tensors, reference {len(ref)}'
    assert sum(p.numel() for p in net.parameters()) == entry['num_params']

@pytest.mark.parametrize('name', SMALL)
def test_reproduces_reference_outputs(name):
    entry = MANIFEST[name]
    net = build(name)
    state, arrays = load_fixture(name)
    net.load_state_dict(state, strict=True)
    net.eval()
    D_x, F_x = fixture_call(net, arrays)
    for label, ours, ref in [('D_x', D_x, arrays['output/D_x']), ('F_x', F_x, arrays['output/F_x'])]:
        assert ours.dtype == torch.float32 and ours.shape == ref.shape
        err = relative_error(ours, ref)
        assert err <= TOLERANCE, f'{name} {entry["precond"]} {entry["kwargs"]}: {label} off by {err:.3g}; {describe_mismatch(ours, ref)}'

@pytest.mark.parametrize('name', SMALL)
def test_every_parameter_matters(name):
    # A 1% change of the largest-norm parameter tensor must show in F_x, so the comparison above is not vacuous.
    net = build(name)
    state, arrays = load_fixture(name)
    net.load_state_dict(state, strict=True)
    net.eval()
    _, F_ref = fixture_call(net, arrays)
    param_name = max((n for n, _ in net.named_parameters()), key=lambda n: state[n].norm().item())
    with torch.no_grad():
        dict(net.named_parameters())[param_name].mul_(1.01)
    _, F_x = fixture_call(net, arrays)
    assert relative_error(F_x, F_ref) > TOLERANCE

@pytest.mark.parametrize('name', SMALL)
def test_round_sigma_and_noise_range(name):
    entry = MANIFEST[name]
    net = build(name)
    values = entry['round_sigma_example']
    rounded = net.round_sigma(values)
    assert isinstance(rounded, torch.Tensor)
    assert rounded.tolist() == values
    assert net.img_resolution == entry['kwargs']['img_resolution']
    assert net.img_channels == entry['kwargs']['img_channels']
    assert net.label_dim == entry['kwargs']['label_dim']
    assert 0 <= net.sigma_min < net.sigma_max

def test_sigma_range_of_each_wrapper():
    kwargs = dict(img_resolution=8, img_channels=1, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    vp = networks.VPPrecond(**kwargs)
    assert vp.sigma_min == pytest.approx(np.sqrt(np.expm1(0.5 * 19.9 * 1e-10 + 0.1 * 1e-5)), rel=0.05) # float32 exp() - 1, as in EDM.
    assert vp.sigma_max == pytest.approx(np.sqrt(np.expm1(0.5 * 19.9 + 0.1)), rel=1e-6)
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(vp.sigma_inv(vp.sigma(t)), t)
    ve = networks.VEPrecond(**kwargs)
    assert (ve.sigma_min, ve.sigma_max) == (0.02, 100)
    edm = networks.EDMPrecond(model_type='SongUNet', **kwargs)
    assert (edm.sigma_min, edm.sigma_max, edm.sigma_data) == (0, float('inf'), 0.5)

#----------------------------------------------------------------------------
# Full-size presets.

@pytest.mark.parametrize('name', FULL)
def test_full_preset_parameter_count(name):
    entry = MANIFEST[name]
    with torch.device('meta'):
        net = getattr(networks, entry['precond'])(**entry['kwargs'])
    assert sum(p.numel() for p in net.parameters()) == entry['num_params'], f'{name} {entry["kwargs"]}'

def test_train_py_presets_match_manifest():
    # The architecture presets of design.md (and EDM's train.py) give exactly the manifest's kwargs.
    ddpmpp = dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard', decoder_type='standard',
        channel_mult_noise=1, resample_filter=[1,1], model_channels=128, channel_mult=[2,2,2])
    ncsnpp = dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual', decoder_type='standard',
        channel_mult_noise=2, resample_filter=[1,3,3,1], model_channels=128, channel_mult=[2,2,2])
    adm = dict(model_type='DhariwalUNet', model_channels=192, channel_mult=[1,2,3,4])
    cifar = dict(img_resolution=32, img_channels=3, label_dim=0, augment_dim=9)
    assert MANIFEST['full:cifar10_ddpmpp_edm']['kwargs'] == {**cifar, **ddpmpp}
    assert MANIFEST['full:cifar10_ncsnpp_ve']['kwargs'] == {**cifar, **ncsnpp}
    assert MANIFEST['full:imagenet64_adm_cond_edm']['kwargs'] == dict(img_resolution=64, img_channels=3, label_dim=1000, **adm)

def test_structural_arguments_change_the_count():
    # Dropout does not change the parameter count, num_blocks does.
    entry = MANIFEST['full:cifar10_ddpmpp_edm']
    with torch.device('meta'):
        base = sum(p.numel() for p in networks.EDMPrecond(**entry['kwargs'], dropout=0.13).parameters())
        fewer = sum(p.numel() for p in networks.EDMPrecond(**entry['kwargs'], num_blocks=3).parameters())
    assert base == entry['num_params']
    assert fewer < base

#----------------------------------------------------------------------------
# Precision, labels, persistence.

def test_use_fp16_is_float32_on_cpu():
    name = 'edm_ddpmpp_uncond'
    net = build(name, use_fp16=True)
    state, arrays = load_fixture(name)
    net.load_state_dict(state, strict=True)
    net.eval()
    dtypes = []
    hook = net.model.register_forward_pre_hook(lambda module, args, kwargs: dtypes.append(args[0].dtype), with_kwargs=True)
    D_x, F_x = fixture_call(net, arrays)
    hook.remove()
    assert dtypes == [torch.float32]
    assert relative_error(D_x, arrays['output/D_x']) <= TOLERANCE
    D_x32 = net(arrays['input/x'], arrays['input/sigma'], force_fp32=True)
    assert torch.equal(D_x, D_x32)

@pytest.mark.skipif(not torch.cuda.is_available(), reason='float16 execution happens on CUDA only')
@pytest.mark.parametrize('name', ['edm_adm_cond', 'edm_ncsnpp_cond_aug'])
def test_use_fp16_on_cuda(name):
    net = build(name, use_fp16=True)
    state, arrays = load_fixture(name)
    net.load_state_dict(state, strict=True)
    net = net.eval().cuda()
    arrays = {key: value.cuda() for key, value in arrays.items()}
    D_x, F_x = fixture_call(net, arrays)
    assert F_x.dtype == torch.float16 and D_x.dtype == torch.float32
    assert relative_error(F_x.float(), arrays['output/F_x']) < 5e-2
    assert relative_error(D_x, arrays['output/D_x']) < 5e-2
    with torch.no_grad():
        D_x32 = net(arrays['input/x'], arrays['input/sigma'], arrays.get('input/class_labels'), force_fp32=True, augment_labels=arrays.get('input/augment_labels'))
    assert relative_error(D_x32, arrays['output/D_x']) < 1e-2 # cuDNN may use TF32.

@pytest.mark.parametrize('name', ['edm_adm_cond', 'edm_ncsnpp_cond_aug'])
def test_label_dropout(name):
    state, arrays = load_fixture(name)
    x, sigma, labels = arrays['input/x'], arrays['input/sigma'], arrays['input/class_labels']
    aug = arrays.get('input/augment_labels')
    results = {}
    for p in [0, 1]:
        net = build(name, label_dropout=p)
        net.load_state_dict(state, strict=True)
        net.train()
        with torch.no_grad():
            results[p] = net(x, sigma, labels, augment_labels=aug)
    net.eval()
    with torch.no_grad():
        unlabelled = net(x, sigma, torch.zeros_like(labels), augment_labels=aug)
        evaluated = net(x, sigma, labels, augment_labels=aug)
    assert torch.allclose(results[1], unlabelled, atol=1e-6)    # p = 1 drops every label in training...
    assert torch.allclose(evaluated, results[0], atol=1e-6)     # ...p = 0 drops none...
    assert relative_error(results[1], results[0]) > TOLERANCE   # ...and the label matters.
    with torch.no_grad():
        assert torch.allclose(net(x, sigma, None, augment_labels=aug), unlabelled, atol=1e-6) # No labels = zero labels.

def test_pickle_round_trip_keeps_outputs():
    name = 'edm_ncsnpp_cond_aug'
    net = build(name)
    state, arrays = load_fixture(name)
    net.load_state_dict(state, strict=True)
    net.eval()
    copy = pickle.loads(pickle.dumps(net))
    D_x, _ = fixture_call(copy, arrays)
    assert relative_error(D_x, arrays['output/D_x']) <= TOLERANCE
    assert copy.init_kwargs == dict(MANIFEST[name]['kwargs'])

#----------------------------------------------------------------------------
# Building blocks.

def einsum_attention(q, k, v):
    """EDM's attention: softmax_k(q . k / sqrt(C)) by einsum, applied to v."""
    w = torch.einsum('ncq,nck->nqk', q, k / np.sqrt(q.shape[1])).softmax(dim=2)
    return torch.einsum('nqk,nck->ncq', w, v)

def test_attention_and_its_gradients_match_the_einsum_form():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 8, 7, requires_grad=True) for _ in range(3))
    upstream = torch.randn(3, 8, 7)
    y = networks.attention(q, k, v)
    y_ref = einsum_attention(q, k, v)
    grads = torch.autograd.grad(y, [q, k, v], upstream)
    grads_ref = torch.autograd.grad(y_ref, [q, k, v], upstream)
    assert torch.allclose(y, y_ref, atol=1e-6)
    assert all(torch.allclose(g, g_ref, atol=1e-5) for g, g_ref in zip(grads, grads_ref))

def test_network_gradients_match_the_einsum_attention(monkeypatch):
    state, arrays = load_fixture('vp_ddpmpp_cond')
    def gradients():
        net = build('vp_ddpmpp_cond')
        net.load_state_dict(state, strict=True)
        return output_and_gradients(net, arrays['input/x'], arrays['input/sigma'], arrays['input/class_labels'])
    D_x, grads = gradients()
    monkeypatch.setattr(networks, 'attention', einsum_attention)
    D_ref, grads_ref = gradients()
    assert relative_error(D_x, D_ref) < 1e-6
    assert grads.keys() == grads_ref.keys() and any('qkv' in name for name in grads)
    assert all(relative_error(grads[name], grads_ref[name]) < 1e-5 for name in grads)

def test_resampling_closed_forms():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    up = networks.Conv2d(4, 4, kernel=0, up=True)
    down = networks.Conv2d(4, 4, kernel=0, down=True)
    assert torch.allclose(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    assert torch.allclose(down(x), torch.nn.functional.avg_pool2d(x, 2), atol=1e-6)
    conv = networks.Conv2d(4, 6, kernel=3, down=True, fused_resample=True, init_bias=1)
    ref = torch.nn.functional.avg_pool2d(torch.nn.functional.conv2d(x, conv.weight, padding=1), 2) + conv.bias.reshape(1, -1, 1, 1)
    assert torch.allclose(conv(x), ref, atol=1e-5)

@pytest.mark.parametrize('taps', [[1,1], [1,3,3,1]])
def test_fused_upsampling_agrees_inside_the_border(taps):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    plain = networks.Conv2d(4, 6, kernel=3, up=True, resample_filter=taps)
    fused = networks.Conv2d(4, 6, kernel=3, up=True, resample_filter=taps, fused_resample=True)
    fused.load_state_dict(plain.state_dict())
    a, b = plain(x), fused(x)
    assert a.shape == b.shape == (2, 6, 16, 16)
    assert torch.allclose(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], atol=1e-5)

def test_positional_embedding_closed_form():
    emb = networks.PositionalEmbedding(num_channels=8, endpoint=True)
    x = torch.tensor([0.0, 1.5, -3.0])
    freqs = 1e-4 ** (np.arange(4) / 3)
    angles = x.numpy()[:, None] * freqs[None, :]
    assert np.allclose(emb(x).numpy(), np.concatenate([np.cos(angles), np.sin(angles)], axis=1), atol=1e-6)

def test_group_norm_group_count():
    assert networks.GroupNorm(16).num_groups == 4
    assert networks.GroupNorm(256).num_groups == 32

def test_user_errors_are_value_errors():
    kwargs = dict(img_resolution=8, img_channels=1, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    with pytest.raises(AssertionError):
        networks.EDMPrecond(model_type='UNet', **kwargs)
    with pytest.raises(AssertionError):
        networks.EDMPrecond(model_type='SongUNet', embedding_type='sinusoidal', **kwargs)
    with pytest.raises(AssertionError):
        networks.EDMPrecond(model_type='SongUNet', encoder_type='resnet', **kwargs)
    with pytest.raises(AssertionError):
        networks.EDMPrecond(model_type='SongUNet', decoder_type='residual', **kwargs)
    with pytest.raises(ValueError, match='init_mode'):
        networks.Linear(4, 4, init_mode='orthogonal')
    with pytest.raises(AssertionError):
        networks.Conv2d(4, 4, kernel=3, up=True, down=True)

"""Snapshots in the format of the published EDM2 code, built by hand: a dict with
`encoder`, `ema` (Precond, float16), `loss_fn` and `dataset_kwargs`, whose
persistent objects carry module sources that use EDM2's torch_utils helpers.
They load with plain pickle.load, run on the CPU like training/networks_edm2.py,
and survive being pickled again, also in a fresh process."""

import os
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import dnnlib
from torch_utils import misc, persistence
from training import loss as losses
from training import networks_edm2

from _numerics import relative_error
from test_networks_edm2 import MANIFEST, load_fixture # pylint: disable=wrong-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5

# The network source as an EDM2 snapshot embeds it: the text of training/networks_edm2.py, made a distinct
# text so that loading executes it as a fresh module instead of reusing the imported one.
with open(os.path.join(ROOT, 'training', 'networks_edm2.py')) as _f:
    NETWORK_SRC = '# Embedded in an EDM2-format snapshot.\n' + _f.read()

# Stand-in for EDM2's training/encoders.py: pixels <-> final latents, with a VAE that is loaded on first use
# and never pickled (a toy VAE here, so that no download is needed).
ENCODER_SRC = textwrap.dedent('''
    import types
    import numpy as np
    import torch
    import dnnlib
    from torch_utils import persistence
    from torch_utils import misc

    @persistence.persistent_class
    class Encoder:
        def __init__(self):
            pass

        def init(self, device):
            pass

        def __getstate__(self):
            return self.__dict__

        def encode(self, x):
            return self.encode_latents(self.encode_pixels(x))

    @persistence.persistent_class
    class StandardRGBEncoder(Encoder):
        def encode_pixels(self, x):
            return x

        def encode_latents(self, x):
            return x.to(torch.float32) / 127.5 - 1

        def decode(self, x):
            return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)

    class ToyVAE(torch.nn.Module):
        def encode(self, x):
            pooled = torch.nn.functional.avg_pool2d(x, 8)
            mean = torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)
            return dict(latent_dist=types.SimpleNamespace(mean=mean, std=torch.full_like(mean, 0.1)))

        def decode(self, z):
            return dict(sample=torch.nn.functional.interpolate(z[:, :3], scale_factor=8, mode='nearest'))

    def load_vae(vae_name, device):
        assert isinstance(dnnlib.make_cache_dir_path('diffusers'), str)
        return ToyVAE().eval().requires_grad_(False).to(device)

    @persistence.persistent_class
    class StabilityVAEEncoder(Encoder):
        def __init__(self, vae_name='stabilityai/sd-vae-ft-mse', raw_mean=[5.81, 3.25, 0.12, -2.15],
                raw_std=[4.17, 4.62, 3.71, 3.28], final_mean=0, final_std=0.5, batch_size=8):
            super().__init__()
            self.vae_name = vae_name
            self.scale = np.float32(final_std) / np.float32(raw_std)
            self.bias = np.float32(final_mean) - np.float32(raw_mean) * self.scale
            self.batch_size = int(batch_size)
            self._vae = None

        def init(self, device):
            if self._vae is None:
                self._vae = load_vae(self.vae_name, device=device)

        def __getstate__(self):
            return dict(super().__getstate__(), _vae=None)

        def encode_pixels(self, x):
            self.init(x.device)
            x = x.to(torch.float32) / 255
            dists = [self._vae.encode(batch)['latent_dist'] for batch in x.split(self.batch_size)]
            return torch.cat([torch.cat([d.mean, d.std], dim=1) for d in dists])

        def encode_latents(self, x):
            mean, std = x.to(torch.float32).chunk(2, dim=1)
            x = mean + torch.randn_like(mean) * std
            return x * misc.const_like(x, self.scale).reshape(1, -1, 1, 1) + misc.const_like(x, self.bias).reshape(1, -1, 1, 1)

        def decode(self, x):
            self.init(x.device)
            x = (x.to(torch.float32) - misc.const_like(x, self.bias).reshape(1, -1, 1, 1)) / misc.const_like(x, self.scale).reshape(1, -1, 1, 1)
            x = torch.cat([self._vae.decode(batch)['sample'] for batch in x.split(self.batch_size)])
            return x.clamp(0, 1).mul(255).to(torch.uint8)
''')

# Stand-in for EDM2's training/training_loop.py, the module of its loss: executing it at load time needs
# everything that module imports from torch_utils.
LOSS_SRC = textwrap.dedent('''
    import os
    import psutil
    import numpy as np
    import torch
    import dnnlib
    from torch_utils import distributed as dist
    from torch_utils import training_stats
    from torch_utils import persistence
    from torch_utils import misc

    @persistence.persistent_class
    class EDM2Loss:
        def __init__(self, P_mean=-0.4, P_std=1.0, sigma_data=0.5):
            self.P_mean = P_mean
            self.P_std = P_std
            self.sigma_data = sigma_data

        def __call__(self, net, images, labels=None):
            sigma = (torch.randn([images.shape[0], 1, 1, 1], device=images.device) * self.P_std + self.P_mean).exp()
            weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
            noise = torch.randn_like(images) * sigma
            denoised, logvar = net(images + noise, sigma, labels, return_logvar=True)
            return (weight / logvar.exp()) * ((denoised - images) ** 2) + logvar

    def learning_rate_schedule(cur_nimg, batch_size, ref_lr=100e-4, ref_batches=70e3, rampup_Mimg=10):
        return ref_lr

    def training_loop(run_dir='.', device=torch.device('cuda')):
        return run_dir, device
''')

#----------------------------------------------------------------------------
# Building the pickle without our persistence's __reduce__.

class _PersistentCall:
    """Pickles as `_reconstruct_persistent_obj(meta)`, like an object saved by EDM2."""
    def __init__(self, meta):
        self.meta = meta
    def __reduce__(self):
        return (persistence._reconstruct_persistent_obj, (self.meta,))

def edm2_form(obj, module_src):
    """What EDM2's persistence makes of `obj` when pickling: persistent objects become
    _reconstruct_persistent_obj(meta) calls carrying `module_src`, recursively through submodules."""
    if obj is None:
        return None
    state = dict(obj.__getstate__())
    if isinstance(obj, torch.nn.Module):
        state['_modules'] = {name: edm2_form(child, module_src) for name, child in obj._modules.items()}
    if persistence.is_persistent(obj):
        return _PersistentCall(dict(type='class', version=6, module_src=module_src, class_name=type(obj).__name__, state=state))
    clone = type(obj).__new__(type(obj))
    clone.__dict__.update(state)
    return clone

def reference_net(name):
    """Our Precond with the fixture's weights rounded to float16, as an EDM2 snapshot stores them."""
    state, _, arrays = load_fixture(name)
    net = networks_edm2.Precond(**MANIFEST[name]['kwargs'])
    net.load_state_dict(state, strict=True)
    return net.eval().requires_grad_(False).to(torch.float16), arrays

def edm2_snapshot_bytes(name):
    """An EDM2-format snapshot of the fixture network `name`, as bytes."""
    net, _ = reference_net(name)
    encoders = persistence._src_to_module(ENCODER_SRC)
    loss_module = persistence._src_to_module(LOSS_SRC)
    latent = MANIFEST[name]['kwargs']['img_channels'] == 4
    encoder = encoders.StabilityVAEEncoder() if latent else encoders.StandardRGBEncoder()
    encoder.init(torch.device('cpu'))
    data = dnnlib.EasyDict(
        encoder         = edm2_form(encoder, ENCODER_SRC),
        dataset_kwargs  = dnnlib.EasyDict(class_name='training.dataset.ImageFolderDataset', path='img512-sd.zip', use_labels=not latent, cache=True),
        loss_fn         = edm2_form(loss_module.EDM2Loss(), LOSS_SRC),
        ema             = edm2_form(net, NETWORK_SRC),
    )
    return pickle.dumps(data)

def run_fixture(net, arrays):
    with torch.no_grad():
        return net(arrays['input/x'], arrays['input/sigma'], arrays.get('input/class_labels'), return_logvar=True)

NAMES = ['edm2_cond', 'edm2_uncond_latent']

#----------------------------------------------------------------------------

@pytest.mark.parametrize('name', NAMES)
def test_edm2_snapshot_loads_and_matches_networks_edm2(name, one_thread):
    data = edm2_snapshot_bytes(name)
    snapshot = pickle.loads(data)
    net = snapshot['ema']
    assert type(net).__name__ == 'Precond' and persistence.is_persistent(net)
    assert type(net).__module__.startswith('_imported_module_') and type(net)._orig_module_src == NETWORK_SRC
    assert type(net) is not networks_edm2.Precond
    assert net.init_kwargs == MANIFEST[name]['kwargs']
    assert all(t.dtype == torch.float16 for t in misc.params_and_buffers(net))
    assert isinstance(snapshot['dataset_kwargs'], dnnlib.EasyDict)

    ours, arrays = reference_net(name)
    ours = ours.to(torch.float32)
    expected = run_fixture(ours, arrays)
    got = run_fixture(net.to(torch.float32), arrays)
    errors = [relative_error(a, b) for a, b in zip(got, expected)]
    assert max(errors) <= TOLERANCE, f'{name}: D_x, logvar off by {errors}'
    # The float16 weights are close to the fixture's float32 ones, so the outputs are close to the reference.
    assert relative_error(got[0], arrays['output/D_x']) < 5e-3

    # Copying by name into our class gives the same network.
    copied = networks_edm2.Precond(**MANIFEST[name]['kwargs']).eval()
    misc.copy_params_and_buffers(net, copied, require_all=True)
    assert [n for n, _ in copied.named_parameters()] == [n for n, _ in net.named_parameters()]
    assert max(relative_error(a, b) for a, b in zip(run_fixture(copied, arrays), expected)) <= TOLERANCE

def test_float16_snapshot_runs_on_the_cpu_without_casting(one_thread):
    net = pickle.loads(edm2_snapshot_bytes('edm2_cond'))['ema']
    ours, arrays = reference_net('edm2_cond')
    D_x, logvar = run_fixture(net, arrays)
    assert D_x.dtype == torch.float32 and logvar.dtype == torch.float32
    D_ref, logvar_ref = run_fixture(ours.to(torch.float32), arrays)
    assert relative_error(D_x, D_ref) < 5e-3 and relative_error(logvar, logvar_ref) < 5e-3

def test_encoders_of_edm2_snapshots():
    rgb = pickle.loads(edm2_snapshot_bytes('edm2_cond'))['encoder']
    assert type(rgb).__name__ == 'StandardRGBEncoder' and persistence.is_persistent(rgb)
    pixels = torch.arange(0, 256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    latents = rgb.encode(pixels)
    assert latents.dtype == torch.float32 and latents.min() == -1 and latents.max() == 1
    assert torch.equal(rgb.decode(latents), pixels)

    vae = pickle.loads(edm2_snapshot_bytes('edm2_uncond_latent'))['encoder']
    assert type(vae).__name__ == 'StabilityVAEEncoder' and vae._vae is None # The VAE is not in the pickle.
    raw = torch.cat([torch.tensor([5.81, 3.25, 0.12, -2.15]).reshape(1, 4, 1, 1).expand(2, 4, 8, 8), torch.zeros([2, 4, 8, 8])], dim=1)
    torch.testing.assert_close(vae.encode_latents(raw), torch.zeros([2, 4, 8, 8]), rtol=0, atol=1e-6)
    images = vae.decode(torch.zeros([2, 4, 8, 8]))
    assert vae._vae is not None and images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    assert pickle.loads(pickle.dumps(vae))._vae is None

def test_loss_of_edm2_snapshots_matches_edm2loss(one_thread):
    snapshot = pickle.loads(edm2_snapshot_bytes('edm2_cond'))
    loss_fn = snapshot['loss_fn']
    assert type(loss_fn).__name__ == 'EDM2Loss' and type(loss_fn) is not losses.EDM2Loss
    assert (loss_fn.P_mean, loss_fn.P_std, loss_fn.sigma_data) == (-0.4, 1.0, 0.5)
    ours, arrays = reference_net('edm2_cond')
    ours = ours.to(torch.float32)
    images, labels = arrays['input/x'] * 0.5, arrays['input/class_labels']
    torch.manual_seed(8)
    with torch.no_grad():
        theirs = loss_fn(net=snapshot['ema'].to(torch.float32), images=images, labels=labels)
    torch.manual_seed(8)
    with torch.no_grad():
        mine = losses.EDM2Loss()(net=ours, images=images, labels=labels)
    assert torch.isfinite(mine).all()
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)

@pytest.mark.parametrize('name', NAMES)
def test_edm2_snapshot_round_trips(name, one_thread, tmp_path):
    snapshot = pickle.loads(edm2_snapshot_bytes(name))
    _, arrays = reference_net(name)
    expected = run_fixture(snapshot['ema'].to(torch.float32), arrays)
    snapshot['ema'].to(torch.float16)
    again = pickle.loads(pickle.dumps(snapshot))
    assert type(again['ema']) is type(snapshot['ema']) and type(again['encoder']) is type(snapshot['encoder'])
    assert all(t.dtype == torch.float16 for t in misc.params_and_buffers(again['ema']))
    got = run_fixture(again['ema'].to(torch.float32), arrays)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    if name != 'edm2_cond':
        return

    # A fresh process that has never imported training/: plain pickle.load, a float32 run, dumped and loaded again.
    path = tmp_path / 'network-snapshot-0000000-0.100.pkl'
    path.write_bytes(pickle.dumps(snapshot))
    torch.save({key: arrays[key] for key in ['input/x', 'input/sigma', 'input/class_labels']}, tmp_path / 'inputs.pt')
    script = textwrap.dedent(f'''
        import pickle, sys, torch
        sys.path.insert(0, {ROOT!r})
        torch.set_num_threads(1)
        with open({str(path)!r}, 'rb') as f:
            data = pickle.load(f)
        assert 'training.networks_edm2' not in sys.modules
        inputs = torch.load({str(tmp_path / 'inputs.pt')!r})
        net = pickle.loads(pickle.dumps(data))['ema'].to(torch.float32)
        with torch.no_grad():
            D_x, logvar = net(inputs['input/x'], inputs['input/sigma'], inputs['input/class_labels'], return_logvar=True)
        images = data['encoder'].decode(D_x)
        torch.save(dict(D_x=D_x, logvar=logvar, images=images), {str(tmp_path / 'outputs.pt')!r})
    ''')
    subprocess.run([sys.executable, '-c', script], cwd=str(tmp_path), check=True, timeout=120)
    outputs = torch.load(tmp_path / 'outputs.pt')
    assert torch.equal(outputs['D_x'], expected[0]) and torch.equal(outputs['logvar'], expected[1])
    assert outputs['images'].dtype == torch.uint8 and outputs['images'].shape == (4, 3, 16, 16)

#----------------------------------------------------------------------------

"""Student snapshots open elsewhere: with only EDM/EDM2-compatible code on the path (dnnlib, torch_utils and the
network modules) a student pickle of either family, pixels or latents, loads with plain pickle.load, its `ema`
gives the same outputs, its loss and `consistency` entries are plain data, and an Euler loop on the levels of
that entry reproduces generate.py's images. Student snapshots written before still load and sample the same."""

import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import convert_snapshot
import generate
from training import checkpoint
from training import encoders
from training import loss_cd
from training import networks
from training import networks_edm2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, 'tests', 'fixtures', 'portable')
PORTABLE = ['dnnlib', 'torch_utils', 'training/__init__.py', 'training/networks.py', 'training/networks_edm2.py',
    'training/encoders.py'] # What EDM's and EDM2's code bases hold too; no loss, sampler or consistency code.
SEEDS = [0, 1]
LOSS_KWARGS = dict(S=3, T_start=8, T_end=16, T_anneal_kimg=2)

# Run with only the folder argv[1] (and the installed packages) on the path: load the pickle argv[2], evaluate its
# `ema` on the inputs of argv[3], run S Euler steps on the levels of its `consistency` entry, save to argv[4].
OPEN_ELSEWHERE = r'''
import os, pickle, sys
folder, pkl, inputs, out = sys.argv[1:]
sys.path.insert(0, folder)
import torch
import training
torch.set_num_threads(1)
inputs = torch.load(inputs, weights_only=True)
with open(pkl, 'rb') as f:
    data = pickle.load(f)
net = data['ema']
with torch.no_grad():
    D = net(inputs['x'], inputs['sigma'], inputs['labels'])
    sigmas = torch.tensor(data['consistency']['student_sigmas'], dtype=torch.float64)
    x = inputs['latents'].to(torch.float64) * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x_hat = net(x, sigma, inputs['seed_labels']).to(torch.float64)
        x = x_hat + (sigma_next / sigma) * (x - x_hat)
torch.save(dict(D=D, x=x, training=training.__file__, path=sys.path, loss_fn=data['loss_fn'],
    consistency=data['consistency'], encoder=type(data.get('encoder')).__name__), out)
'''

#----------------------------------------------------------------------------
# Helpers.

def portable_folder(tmp_path):
    """A folder with copies of the EDM-compatible part of this repository."""
    folder = tmp_path / 'elsewhere'
    for name in PORTABLE:
        src, dst = os.path.join(ROOT, name), folder / name
        os.makedirs(dst.parent, exist_ok=True)
        if os.path.isdir(src):
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns('__pycache__'))
        else:
            shutil.copy(src, dst)
    return folder

def open_elsewhere(tmp_path, pkl, inputs):
    """OPEN_ELSEWHERE in a fresh process (-P: no script folder on the path), cwd and path the portable folder; its
    results, or its stderr if it failed."""
    folder = portable_folder(tmp_path)
    torch.save(inputs, tmp_path / 'inputs.pt')
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME', 'PYTHONSTARTUP')}
    cmd = [sys.executable, '-P', '-c', OPEN_ELSEWHERE, str(folder), str(pkl), str(tmp_path / 'inputs.pt'),
        str(tmp_path / 'out.pt')]
    proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        return proc.stderr
    out = torch.load(tmp_path / 'out.pt', weights_only=True) # Only tensors and plain Python data come back.
    assert out['training'] == str(folder / 'training' / '__init__.py')
    assert ROOT not in out['path'] and '' not in out['path']
    return out

def one_hot(idx, label_dim):
    return torch.eye(label_dim)[idx] if label_dim else None

def seed_draws(net):
    """The latents and labels generate.py draws for SEEDS: per seed, its generator's latents, then its class."""
    latents, idx = [], []
    for seed in SEEDS:
        gen = torch.Generator().manual_seed(seed)
        latents.append(torch.randn([net.img_channels, net.img_resolution, net.img_resolution], generator=gen))
        idx.append(int(torch.randint(net.label_dim, size=[], generator=gen)) if net.label_dim else 0)
    return torch.stack(latents), one_hot(idx, net.label_dim)

def generated(network, outdir):
    """generate.py's images of SEEDS, uint8 [N, H, W(, C)]."""
    args = [f'--network={network}', f'--outdir={outdir}', f'--seeds={SEEDS[0]}-{SEEDS[-1]}', '--device=cpu']
    result = CliRunner().invoke(generate.main, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert 'student sampler, S=3' in result.output
    return np.stack([np.asarray(PIL.Image.open(os.path.join(outdir, f'{seed:06d}.png'))) for seed in SEEDS])

def assert_images_match(a, b):
    """At most one level apart (float rounding on another CPU), nearly all equal, and not flat."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    assert np.abs(a.astype(np.int16) - b).max() <= 1 and (a == b).mean() > 0.99 and a.std() > 5

def student(family, tmp_path):
    """A tiny student with non-trivial weights, its distillation loss (itself as the teacher, images seen) and an
    encoder for latents."""
    torch.manual_seed(0)
    edm2 = dict(use_fp16=False, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[],
        logvar_channels=8)
    encoder = None
    if family == 'edm':
        net = networks.VPPrecond(img_resolution=8, img_channels=1, label_dim=3, model_channels=8, channel_mult=[1],
            num_blocks=1, attn_resolutions=[], dropout=0.0)
    elif family == 'edm2':
        net = networks_edm2.Precond(img_resolution=8, img_channels=3, label_dim=4, **edm2)
    else:
        from _tiny_vae import save_tiny_vae # pylint: disable=import-outside-toplevel
        net = networks_edm2.Precond(img_resolution=4, img_channels=4, label_dim=0, **edm2)
        encoder = encoders.StabilityVAEEncoder(vae_name=save_tiny_vae(tmp_path / 'vae'))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    loss_fn = loss_cd.ConsistencyDistillLoss(**LOSS_KWARGS).set_teacher(net)
    loss_fn.set_progress(1500)
    return net.eval(), loss_fn, encoder

#----------------------------------------------------------------------------

@pytest.mark.parametrize('family', ['edm', 'edm2', 'edm2-latent'])
def test_student_opens_with_only_edm_code_and_samples_like_generate(family, tmp_path, one_thread):
    net, loss_fn, encoder = student(family, tmp_path)
    pkl = str(tmp_path / 'network-snapshot-000001.pkl')
    data = checkpoint.snapshot_data(ema=net, loss_fn=loss_fn, dataset_kwargs=dict(path='data.zip'), encoder=encoder)
    checkpoint.save_snapshot(pkl, data)
    images = generated(pkl, tmp_path / 'out')

    # Loaded elsewhere: the same network, plain entries.
    gen = torch.Generator().manual_seed(7)
    x = torch.randn([2, net.img_channels, net.img_resolution, net.img_resolution], generator=gen)
    sigma, labels = torch.tensor([0.3, 5.0]), one_hot([1, 2], net.label_dim)
    latents, seed_labels = seed_draws(net)
    out = open_elsewhere(tmp_path, pkl, dict(x=x, sigma=sigma, labels=labels, latents=latents, seed_labels=seed_labels))
    assert isinstance(out, dict), out
    with torch.no_grad():
        torch.testing.assert_close(out['D'], net(x, sigma, labels), rtol=0, atol=1e-6)
    assert out['loss_fn'] == dict(class_name='training.loss_cd.ConsistencyDistillLoss', init_args=[],
        init_kwargs=LOSS_KWARGS)
    levels = out['consistency']['student_sigmas']
    assert out['consistency']['S'] == 3 and levels == loss_fn.student_sigmas().tolist() and levels[-1] == 0
    assert out['consistency']['cur_nimg'] == 1500
    assert out['consistency']['T'] == round(8 * 2 ** 0.75) # Geometric from 8 to 16 edges, 3/4 of the way.
    assert out['encoder'] == ('StabilityVAEEncoder' if encoder else 'NoneType')

    # Its Euler steps on those levels give generate.py's images.
    if encoder is None:
        euler = (out['x'].clip(-1, 1) * 127.5 + 128).clip(0, 255).to(torch.uint8)
    else:
        euler = encoder.decode(out['x'])
    euler = euler.permute(0, 2, 3, 1).numpy()
    assert_images_match(euler[..., 0] if euler.shape[-1] == 1 else euler, images)

    # The code-free twin holds the same plain entries (and the encoder) and gives the same images.
    twin = checkpoint.load_snapshot(checkpoint.safetensors_path(pkl))
    assert twin['loss_fn'] == out['loss_fn'] and twin['consistency'] == out['consistency']
    assert type(twin.get('encoder')).__name__ == out['encoder']
    assert np.array_equal(generated(checkpoint.safetensors_path(pkl), tmp_path / 'twin'), images)

def test_student_snapshots_written_before_still_load_and_sample_the_same(tmp_path, one_thread):
    old = os.path.join(FIXTURES, 'old-student-edm.pkl')
    expected = np.load(os.path.join(FIXTURES, 'old-student-edm-seeds0-1.npy'))
    data = checkpoint.load_snapshot(old)
    assert type(data['loss_fn']).__name__ == 'ConsistencyDistillLoss' and data['loss_fn'].S == 3 # The object.
    assert checkpoint.student_levels(data, old).tolist() == data['consistency']['student_sigmas']
    st = str(tmp_path / 'old.safetensors')
    result = CliRunner().invoke(convert_snapshot.main, [f'--src={old}', f'--dest={st}'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    for name, network in (('pkl', old), ('safetensors', st)):
        assert_images_match(generated(network, tmp_path / name), expected)

    # Its pickled loss needs this repository: the folder of the test above really holds nothing more.
    zeros = torch.zeros([1, 1, 8, 8])
    inputs = dict(x=zeros, sigma=torch.ones([1]), labels=None, latents=zeros, seed_labels=None)
    err = open_elsewhere(tmp_path, old, inputs)
    assert isinstance(err, str) and "cannot import name 'consistency_ops' from 'training'" in err

#----------------------------------------------------------------------------

"""Latent diffusion end to end with a tiny AutoencoderKL the test saves:
dataset_tool.py encode -> train.py --arch=edm2 on the latents -> a consistency
student of that latent teacher -> generate.py's decoded PNGs of the image size
(and --save_latents); the run's encoder in its snapshots; validation decodes
before its detector; bad input (latent data with a pixel teacher and the
reverse, a VAE that cannot be loaded)."""

import json
import os
import pickle
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dataset_tool
import generate
import train
from _train_helpers import invoke
from training import checkpoint
from training import encoders
from training import networks_edm2
from training import validation

RUN = ['--batch=40', '--tick=1', '--snap=1', '--dump=1', '--seed=1', '--workers=0', '--lr_rampup=0', '--device=cpu', '--duration=0.001']
EDM2 = ['--arch=edm2', '--cbase=16', '--cres=1', '--phema=0.100']
CD = ['--consistency=True', '--S=2', '--T_start=4', '--T_end=4', '--T_anneal_kimg=0']
SIZE = 32 # Images of 32x32: latents of 4x4 (8 stored channels, 4 for the network).

#----------------------------------------------------------------------------
# Fixtures: the VAE, the images and their latents, the latent teacher and its student.

def ok(main, *args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output

def load(path):
    with open(path, 'rb') as f:
        return pickle.load(f)

def last_snapshot(outdir):
    return os.path.join(outdir, sorted(name for name in os.listdir(outdir) if name.startswith('network-snapshot-0') and name.endswith('.pkl'))[-1])

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """The tiny VAE's folder, 8 RGB images as a dataset and its latents (dataset_tool.py encode)."""
    from _tiny_vae import save_tiny_vae # pylint: disable=import-outside-toplevel
    root = tmp_path_factory.mktemp('latent')
    torch.set_num_threads(1)
    vae = save_tiny_vae(root / 'tiny-vae')
    images = np.random.default_rng(0).integers(0, 256, size=(8, SIZE, SIZE, 3), dtype=np.uint8)
    np.savez(root / 'rgb.npz', images=images)
    ok(dataset_tool.main, f'--source={root / "rgb.npz"}', f'--dest={root / "rgb.zip"}')
    ok(dataset_tool.main, 'encode', f'--source={root / "rgb.zip"}', f'--dest={root / "latents.zip"}', f'--vae={vae}', '--batch=4', '--device=cpu')
    return dict(root=root, vae=vae, rgb=str(root / 'rgb.zip'), latents=str(root / 'latents.zip'))

@pytest.fixture(scope='module')
def teacher(data):
    """train.py --arch=edm2 on the latents, 1 kimg, validated on the decoded images against rgb.zip; its last snapshot."""
    outdir = data['root'] / 'teacher'
    ok(train.main, f'--outdir={outdir}', '--nosubdir', f'--data={data["latents"]}', *EDM2, *RUN,
        '--val=1', '--val_detector=pixels', f'--val_ref_data={data["rgb"]}', '--val_num=4', '--val_batch=4', '--val_every=1')
    return last_snapshot(outdir)

@pytest.fixture(scope='module')
def student(data, teacher):
    """train.py --consistency=True with that latent teacher, 1 kimg; its last snapshot."""
    outdir = data['root'] / 'student'
    ok(train.main, f'--outdir={outdir}', '--nosubdir', f'--data={data["latents"]}', f'--teacher={teacher}', *CD, *RUN)
    return last_snapshot(outdir)

@pytest.fixture(scope='module')
def pixel_teacher(data):
    """An EDM2 network of 3-channel 4x4 pixel images (no encoder in its snapshot)."""
    torch.manual_seed(0)
    net = networks_edm2.Precond(img_resolution=4, img_channels=3, label_dim=0, model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[])
    path = str(data['root'] / 'pixel-teacher.pkl')
    with open(path, 'wb') as f:
        pickle.dump(dict(ema=net.eval(), loss_fn=None, dataset_kwargs={}), f)
    return path

#----------------------------------------------------------------------------

def test_encode_records_the_vae(data):
    with zipfile.ZipFile(data['latents']) as archive:
        entry = json.loads(archive.read('dataset.json'))['encoder']
    assert entry == dict(class_name='training.encoders.StabilityVAEEncoder', vae_name=os.path.abspath(data['vae']))

def test_training_on_latents(data, teacher):
    snapshot = load(teacher)
    net, encoder = snapshot['ema'], snapshot['encoder']
    assert type(net).__name__ == 'Precond' and (net.img_channels, net.img_resolution) == (4, 4) # The encoder's output, not the 8 stored channels.
    assert isinstance(encoder, encoders.StabilityVAEEncoder) and encoder.vae_name == os.path.abspath(data['vae']) and encoder._vae is None
    assert checkpoint.load_snapshot(teacher.replace('.pkl', '.safetensors'))['encoder'].vae_name == encoder.vae_name
    with open(os.path.join(os.path.dirname(teacher), 'stats.jsonl')) as f:
        losses = [json.loads(line)['Loss/loss']['mean'] for line in f]
    assert all(np.isfinite(losses))
    with open(os.path.join(os.path.dirname(teacher), 'metrics-val.jsonl')) as f:
        entries = [json.loads(line) for line in f]
    assert len(entries) == 1 and all(np.isfinite(entry['figures']['fd_pixels']) for entry in entries) # Decoded 32x32 images against rgb.zip.

def test_latent_batches_are_posterior_draws(data):
    """What the training loop feeds the network: encode_latents of the stored mean and std, drawn after the micro-batch's seed."""
    from training import dataset # pylint: disable=import-outside-toplevel
    from training import steps # pylint: disable=import-outside-toplevel
    obj = dataset.ImageFolderDataset(path=data['latents'])
    encoder = encoders.dataset_encoder(obj)
    raw = torch.as_tensor(np.stack([obj[i][0] for i in range(4)]))
    assert isinstance(encoder, encoders.StabilityVAEEncoder) and raw.shape == (4, 8, 4, 4)
    seen = []
    def loss_fn(net, images, labels, augment_pipe):
        seen.append(images)
        return images.square().requires_grad_()
    for _ in range(2):
        steps.accumulate_gradients(torch.nn.Identity(), loss_fn, lambda: (encoder.encode_latents(raw), None), 1, 4, seed=5, step=3)
    mean, std = raw.chunk(2, dim=1)
    torch.manual_seed(steps.micro_batch_seed(5, 3, 0))
    expected = (mean + torch.randn_like(mean) * std) * torch.as_tensor(encoder.scale).reshape(1, -1, 1, 1) + torch.as_tensor(encoder.bias).reshape(1, -1, 1, 1)
    assert seen[0].shape == (4, 4, 4, 4) and torch.equal(seen[0], seen[1])
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=1e-6)
    assert (std > 0).all() and not torch.allclose(seen[0], mean * torch.as_tensor(encoder.scale).reshape(1, -1, 1, 1) + torch.as_tensor(encoder.bias).reshape(1, -1, 1, 1), atol=1e-3)

def test_generate_decodes_latents(data, teacher, tmp_path):
    out = tmp_path / 'out'
    ok(generate.main, f'--network={teacher}', f'--outdir={out}', '--seeds=0-2', '--steps=2', '--save_latents', '--device=cpu')
    assert sorted(os.listdir(out)) == sorted([f'{s:06d}.png' for s in range(3)] + [f'{s:06d}.npy' for s in range(3)])
    image = np.asarray(PIL.Image.open(out / '000001.png'))
    latent = np.load(out / '000001.npy')
    assert image.shape == (SIZE, SIZE, 3) and latent.shape == (4, 4, 4) and latent.dtype == np.float32
    encoder = load(teacher)['encoder']
    np.testing.assert_array_equal(image, encoder.decode(torch.from_numpy(latent)[None])[0].permute(1, 2, 0).numpy())

def test_distillation_on_latents(data, student, tmp_path):
    snapshot = load(student)
    assert snapshot['consistency']['S'] == 2 and isinstance(snapshot['encoder'], encoders.StabilityVAEEncoder)
    assert (snapshot['ema'].img_channels, snapshot['ema'].img_resolution) == (4, 4)
    output = ok(generate.main, f'--network={student}', f'--outdir={tmp_path}', '--seeds=0-1', '--device=cpu')
    assert 'student sampler, S=2' in output
    assert all(np.asarray(PIL.Image.open(tmp_path / f'{s:06d}.png')).shape == (SIZE, SIZE, 3) for s in range(2))

def test_validation_decodes_before_the_detector(data, teacher, tmp_path):
    seen = []
    class Detector:
        name, key, label, device = 'stand-in', 'fd_stand_in', 'FD', torch.device('cpu')
        def feature_dim(self, image_shape):
            seen.append(list(image_shape))
            return 3
        def __call__(self, images):
            assert images.dtype == torch.uint8
            seen.append(list(images.shape[1:]))
            return images.to(torch.float64).mean(dim=[2, 3])
    net, encoder = load(teacher)['ema'], load(teacher)['encoder']
    mu, sigma = np.zeros(3), np.eye(3)
    original = (validation.metrics.load_detector, validation._reference)
    validation.metrics.load_detector, validation._reference = (lambda *args, **kwargs: Detector()), (lambda *args: (mu, sigma))
    try:
        figures = validation.validate(net, None, 0, 0, str(tmp_path), 'cpu', lambda name: None, encoder=encoder, num=4, batch=2, ref='ref.npz',
            heun_steps=2, grid_num=2, save_best=False, agree_num=0)
    finally:
        validation.metrics.load_detector, validation._reference = original
    assert seen[0] == [3, SIZE, SIZE] and all(shape == [3, SIZE, SIZE] for shape in seen[1:])
    assert np.isfinite(figures['fd_stand_in']) and figures['samples'].shape == (SIZE, 2 * SIZE, 3)

#----------------------------------------------------------------------------
# Bad input, one sentence each.

def test_latent_data_with_a_pixel_teacher_and_the_reverse(data, teacher, pixel_teacher):
    pixel_pkl = pixel_teacher
    line = invoke(f'--outdir={data["root"] / "x"}', f'--data={data["latents"]}', f'--teacher={pixel_pkl}', *CD, *RUN, '-n')
    assert line == (f'Error: The teacher "{pixel_pkl}" works on 3-channel 4x4 images, but {data["latents"]} holds VAE latents (4x4x4 once encoded); '
        'pass a teacher trained on such latents (e.g. an edm2-img512 snapshot), or --data with pixel images for this teacher.')
    line = invoke(f'--outdir={data["root"] / "x"}', f'--data={data["rgb"]}', f'--teacher={teacher}', *CD, *RUN, '-n')
    assert line == (f'Error: The teacher "{teacher}" works on 4-channel VAE latents, but {data["rgb"]} holds 3-channel pixel images; '
        'pass --data with their latents (dataset_tool.py encode), or a pixel teacher.')

def test_a_vae_that_cannot_be_loaded_and_other_mistakes(data, pixel_teacher):
    missing = str(data['root'] / 'missing-vae')
    line = invoke(f'--outdir={data["root"] / "x"}', f'--data={data["latents"]}', f'--vae={missing}', *EDM2, *RUN, '-n')
    assert line == (f'Error: --data: {data["latents"]} holds latents of the VAE "{missing}", which cannot be loaded (VAE folder "{missing}" does not exist); '
        'pass --vae with its folder (AutoencoderKL.save_pretrained) or hub name.')
    line = invoke(f'--outdir={data["root"] / "x"}', f'--data={data["rgb"]}', f'--vae={data["vae"]}', *EDM2, *RUN, '-n')
    assert line.startswith('Error: ') and line.endswith(f'The VAE "{data["vae"]}" applies to latents, but this dataset holds images; leave it out.')
    line = invoke(f'--outdir={data["root"] / "x"}', f'--data={data["latents"]}', '--arch=ddpmpp', '--cbase=16', '--cres=1', *RUN, '-n')
    assert line == 'Error: --augment=0.12 augments pixel images, but --data holds VAE latents; pass --augment=0.'
    line = invoke(f'--outdir={data["root"] / "x"}', f'--data={data["latents"]}', *EDM2, *RUN, '--val=1', '--val_detector=pixels', '-n')
    assert line == (f'Error: --val: Validation dataset ref_data="{data["latents"]}" holds latents, not images; '
        'pass reference statistics as ref (e.g. EDM2\'s img512.pkl) or a dataset of the images they encode.')
    result = CliRunner().invoke(generate.main, [f'--network={pixel_teacher}', f'--outdir={data["root"] / "y"}', '--save_latents', '--device=cpu'])
    assert result.exit_code == 1 and 'makes pixel images; leave it out.' in result.output

#----------------------------------------------------------------------------

"""Any EDM-family teacher, with no architecture flags: an EDM2 snapshot (in the
format of EDM2's pickles, embedding its code) and an EDM snapshot written by
train.py are distilled on a small RGB dataset and their students sampled in S
steps; a pickle's embedded code is replaced by the project's class after a
probe check; guided distillation resumes bit-identically; bad input."""

import json
import os
import pickle
import socket

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import dnnlib
import generate
import train
from _train_helpers import invoke, run_dirs
from training import checkpoint
from training import preflight
from training import guidance
from training import networks_edm2
from training import training_loop
from training.loss_cd import ConsistencyDistillLoss
from training.networks import EDMPrecond
from test_persistence_edm2 import NETWORK_SRC, edm2_form # pylint: disable=wrong-import-order

RUN = ['--batch=500', '--tick=1', '--snap=1', '--dump=1', '--seed=1', '--workers=0', '--lr_rampup=0', '--device=cpu']
CD = ['--consistency=True', '--S=2', '--T_start=4', '--T_end=4']
EDM2_KWARGS = dict(model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[], use_fp16=True)

#----------------------------------------------------------------------------
# Helpers and fixtures.

def edm2_net(seed, img_resolution=4, img_channels=3, label_dim=0, scale=3):
    """A small EDM2 Precond with random weights, `scale` times the unit magnitude that forced weight normalization gives."""
    torch.manual_seed(seed)
    net = networks_edm2.Precond(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim, **EDM2_KWARGS).eval()
    with torch.no_grad():
        for param in net.parameters():
            param.mul_(scale).add_(0.1 if param.ndim == 0 else 0) # A non-zero out_gain, so the network is no mere skip connection.
    return net

def write(path, data):
    with open(path, 'wb') as f:
        pickle.dump(data, f)
    return str(path)

def edm2_snapshot(path, net, module_src=NETWORK_SRC):
    """A snapshot in the format of EDM2's: float16 weights, the network's module source embedded in the pickle."""
    return write(path, dict(ema=edm2_form(net.to(torch.float16), module_src), loss_fn=None, dataset_kwargs=dict(path='imagenet-64x64.zip')))

def load(path):
    with open(path, 'rb') as f:
        return pickle.load(f)

def train_ok(*args):
    result = CliRunner().invoke(train.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output

def generate_ok(network, outdir, monkeypatch):
    """generate.py on 4 seeds with no sampler options: its output, the images and the noise levels of every network evaluation."""
    sigmas, load_snapshot = [], checkpoint.load_snapshot
    def load_counting(path):
        data = load_snapshot(path)
        data['ema'].register_forward_pre_hook(lambda _module, args: sigmas.append(float(torch.as_tensor(args[1]).flatten()[0])))
        return data
    monkeypatch.setattr(checkpoint, 'load_snapshot', load_counting)
    result = CliRunner().invoke(generate.main, [f'--network={network}', f'--outdir={outdir}', '--seeds=0-3', '--device=cpu'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    images = np.stack([np.asarray(PIL.Image.open(os.path.join(outdir, f'{seed:06d}.png'))) for seed in range(4)])
    return result.output, images, sigmas

def outputs(net, seed=0, label_dim=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn([4, net.img_channels, net.img_resolution, net.img_resolution], generator=gen)
    labels = torch.eye(label_dim)[torch.arange(4) % label_dim] if label_dim else None
    with torch.no_grad():
        return net.to(torch.float32)(x * 2, torch.tensor([0.01, 0.3, 2.0, 50.0]), labels)

@pytest.fixture(scope='module')
def rgb4(tmp_path_factory):
    """16 random RGB images of 4x4."""
    path = tmp_path_factory.mktemp('rgb4') / 'rgb4'
    path.mkdir()
    rnd = np.random.RandomState(0)
    for idx in range(16):
        PIL.Image.fromarray(rnd.randint(0, 256, [4, 4, 3]).astype(np.uint8)).save(path / f'img{idx:02d}.png')
    return str(path)

@pytest.fixture(scope='module')
def edm2_teacher(tmp_path_factory):
    return edm2_snapshot(tmp_path_factory.mktemp('edm2') / 'network-snapshot-0000000-0.100.pkl', edm2_net(seed=1))

#----------------------------------------------------------------------------
# Must-show 1: distillation of an EDM2 and an EDM teacher with no architecture flags.

def test_edm2_teacher_distils_without_architecture_flags(tmp_path, rgb4, edm2_teacher, one_thread, monkeypatch):
    text = train_ok(f'--outdir={tmp_path}', f'--data={rgb4}', f'--teacher={edm2_teacher}', *RUN, *CD, '--duration=0.001')
    run_dir, = run_dirs(str(tmp_path))
    assert os.path.basename(run_dir) == '00000-rgb4-uncond-teacher-edm2-gpus1-batch500-fp32-cd2'
    assert 'The teacher (Precond) has no sigma_min, sigma_max, round_sigma: the noise levels of the distillation\'s grids (--sigma_min, --sigma_max) are used without rounding.' in text
    assert 'keeps the code embedded' not in text and "Network:          the teacher's architecture (training.networks_edm2.Precond), fp32" in text
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        options = json.load(f)
    assert options['network_kwargs'] == dict(class_name='training.networks_edm2.Precond', **dict(EDM2_KWARGS, use_fp16=False)) # The teacher's, at --fp16.
    assert options['optimizer_kwargs']['betas'] == [0.9, 0.99] and options['lr_decay_batches'] is None # EDM2's Adam; no decay in a distillation.
    assert options['phema_stds'] == [0.05, 0.1] and options['ema_halflife_kimg'] is None and 'augment_kwargs' not in options

    # The first step has learning rate 0: the student is the teacher (its weights normalized, which leaves its outputs alone).
    teacher = load(edm2_teacher)['ema']
    first = load(os.path.join(run_dir, 'network-snapshot-0000000-0.050.pkl'))
    assert type(first['ema']) is networks_edm2.Precond and first['consistency']['S'] == 2 and first['consistency']['guidance'] is None
    torch.testing.assert_close(outputs(first['ema']), outputs(teacher), rtol=0, atol=1e-4)

    # Forced weight normalization: the trained weights have unit magnitude per output channel (the teacher's are 3).
    state = torch.load(os.path.join(run_dir, 'training-state-000001.pt'), weights_only=False)
    for name, weight in state['net'].items():
        if name.startswith('unet.') and name.endswith('weight'):
            rms = weight.flatten(1).square().mean(dim=1).sqrt()
            assert torch.allclose(rms, torch.ones_like(rms), atol=0.02), (name, rms)

    # generate.py samples the student in S = 2 steps, with no sampler flags.
    text, images, sigmas = generate_ok(os.path.join(run_dir, 'network-snapshot-0000000-0.100.pkl'), tmp_path / 'out', monkeypatch)
    assert 'student sampler, S=2' in text and images.shape == (4, 4, 4, 3) and images.std() > 0
    assert sigmas == pytest.approx(first['consistency']['student_sigmas'][:2]) # S = 2 evaluations, at the student's noise levels.

    # The teacher with EDM's sampler: its grid without rounding, said once.
    result = CliRunner().invoke(generate.main, [f'--network={edm2_teacher}', f'--outdir={tmp_path / "heun"}', '--seeds=0', '--steps=2', '--device=cpu'])
    assert result.exit_code == 0, result.output
    assert result.output.count('The network (Precond) has no sigma_min, sigma_max, round_sigma: the noise levels of --sigma_min, --sigma_max and --steps are used') == 1

def test_edm_teacher_written_by_train_py_distils_without_architecture_flags(tmp_path, rgb4, one_thread, monkeypatch):
    train_ok(f'--outdir={tmp_path / "teacher"}', '--nosubdir', f'--data={rgb4}', '--arch=ddpmpp', '--cbase=16', '--cres=1', '--augment=0',
        '--dropout=0.05', *RUN, '--duration=0.001')
    teacher_pkl = str(tmp_path / 'teacher' / 'network-snapshot-000000.pkl')
    teacher = load(teacher_pkl)['ema']
    train_ok(f'--outdir={tmp_path / "cd"}', f'--data={rgb4}', f'--teacher={teacher_pkl}', *RUN, *CD, '--duration=0.001')
    run_dir, = run_dirs(str(tmp_path / 'cd'))
    assert os.path.basename(run_dir) == '00000-rgb4-uncond-teacher-edm-gpus1-batch500-fp32-cd2'
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        options = json.load(f)
    expected = dict(teacher.init_kwargs, class_name='training.networks.EDMPrecond')
    for name in ('img_resolution', 'img_channels', 'label_dim'):
        del expected[name]
    assert options['network_kwargs'] == expected and expected['dropout'] == 0.05 and expected['model_channels'] == 16 # The teacher's, dropout included.
    assert options['resume_pkl'] == teacher_pkl and 'augment_kwargs' not in options
    first = load(os.path.join(run_dir, 'network-snapshot-000000.pkl'))['ema']
    assert first.state_dict().keys() == teacher.state_dict().keys() and all(torch.equal(v, teacher.state_dict()[k]) for k, v in first.state_dict().items())
    text, images, sigmas = generate_ok(os.path.join(run_dir, 'network-snapshot-000001.pkl'), tmp_path / 'out', monkeypatch)
    assert 'student sampler, S=2' in text and images.shape == (4, 4, 4, 3) and images.std() > 0
    assert sigmas == pytest.approx(load(os.path.join(run_dir, 'network-snapshot-000001.pkl'))['consistency']['student_sigmas'][:2])

def test_edm2_student_trains_under_ddp(tmp_path, rgb4, edm2_teacher, one_thread, monkeypatch):
    """DDP needs a gradient of every parameter that requires one, so the uncertainty head, which the distillation
    never uses, is frozen (loss_fn.frozen_parameters): a one-rank gloo group (DDP's checks, in this process) trains
    as a plain process does, bit for bit; without the freezing DDP stops at the second step."""
    args = [f'--data={rgb4}', f'--teacher={edm2_teacher}', *RUN, *CD, '--duration=0.001']
    train_ok(f'--outdir={tmp_path / "plain"}', *args)
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    for name, value in dict(RANK=0, WORLD_SIZE=1, LOCAL_RANK=0, LOCAL_WORLD_SIZE=1, MASTER_ADDR='127.0.0.1', MASTER_PORT=port).items():
        monkeypatch.setenv(name, str(value))
    train_ok(f'--outdir={tmp_path / "ddp"}', *args)
    plain, ddp = (torch.load(os.path.join(run_dirs(str(tmp_path / name))[0], 'training-state-000001.pt'), weights_only=False) for name in ('plain', 'ddp'))
    assert plain['net'].keys() == ddp['net'].keys() and all(torch.equal(plain['net'][k], ddp['net'][k]) for k in plain['net'])
    teacher = load(edm2_teacher)['ema'].state_dict()
    assert torch.equal(ddp['net']['logvar_linear.weight'], teacher['logvar_linear.weight'].to(torch.float32)) # Not trained.
    monkeypatch.setattr(ConsistencyDistillLoss, 'frozen_parameters', lambda self, net, augment_pipe=None: [])
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "unfrozen"}', *args])
    assert result.exit_code != 0 and 'parameters that were not used in producing loss' in str(result.exception)

@pytest.mark.parametrize('precond', ['VPPrecond', 'VEPrecond'])
def test_vp_and_ve_teachers_need_no_architecture_flags(tmp_path, rgb4, precond):
    net = dnnlib.util.construct_class_by_name(class_name=f'training.networks.{precond}', img_resolution=4, img_channels=3, label_dim=0,
        model_type='SongUNet', model_channels=16, channel_mult=[1], num_blocks=1)
    teacher = write(tmp_path / 'teacher.pkl', dict(ema=net))
    result = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "out"}', f'--data={rgb4}', f'--teacher={teacher}', *RUN, *CD, '--dry-run'])
    assert result.exit_code == 0, result.output
    options = json.loads(result.output[result.output.index('Training options:') + len('Training options:'):result.output.index('Run directory:')])
    assert options['network_kwargs'] == dict(class_name=f'training.networks.{precond}', model_type='SongUNet', model_channels=16, channel_mult=[1],
        num_blocks=1, use_fp16=False)
    assert options['resume_pkl'] == teacher and f'-uncond-teacher-{precond[:2].lower()}-gpus1-' in options['run_dir']

def test_layers_the_distillation_never_uses_are_frozen():
    names = lambda net: [name for name, _param in net.named_parameters()]
    edm2 = ConsistencyDistillLoss().frozen_parameters(edm2_net(seed=0))
    assert edm2 == [name for name in names(edm2_net(seed=0)) if name.startswith('logvar_')] and edm2 # EDM2's uncertainty head.
    net = EDMPrecond(img_resolution=4, img_channels=3, label_dim=0, model_type='SongUNet', model_channels=16, channel_mult=[1], num_blocks=1, augment_dim=9)
    assert ConsistencyDistillLoss().frozen_parameters(net) == ['model.map_augment.weight'] # No augmentation labels without a pipeline.
    assert ConsistencyDistillLoss().frozen_parameters(net, augment_pipe=object()) == []

#----------------------------------------------------------------------------
# Must-show 3: the teacher on the project's implementation of its class.

def test_teacher_of_embedded_code_runs_on_the_projects_class(tmp_path):
    net = edm2_net(seed=3, label_dim=4)
    embedded = load(edm2_snapshot(tmp_path / 'a.pkl', net))['ema']
    assert type(embedded) is not networks_edm2.Precond and type(embedded).__name__ == 'Precond'
    ours = preflight.on_project_class(embedded)
    assert type(ours) is networks_edm2.Precond and all(p.dtype == torch.float16 for p in ours.parameters()) # Same weights, same dtypes.
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), embedded.state_dict().values()))
    for seed in range(2): # Inputs other than the probe's: the pickle's code is the second implementation.
        expected = outputs(embedded, seed=seed + 10, label_dim=4)
        assert float((outputs(ours, seed=seed + 10, label_dim=4) - expected).abs().max()) <= 1e-5 * max(1, float(expected.abs().max()))
    assert preflight.on_project_class(ours) is ours

    # Embedded code that computes something else: a warning, and the pickle's own code.
    other_src = NETWORK_SRC.replace('D_x = c_skip * x + c_out * F_x.to(torch.float32)', 'D_x = c_skip * x + 1.001 * c_out * F_x.to(torch.float32)')
    assert other_src != NETWORK_SRC
    other = load(edm2_snapshot(tmp_path / 'b.pkl', edm2_net(seed=3, label_dim=4), other_src))['ema']
    with pytest.warns(UserWarning, match=r'^The teacher \(Precond\) keeps the code embedded in its pickle: on the project\'s training\.networks_edm2\.Precond its outputs differ by '):
        assert preflight.on_project_class(other) is other

#----------------------------------------------------------------------------
# Must-show 5: a guided distillation resumes bit-identically.

def test_guided_distillation_resumes_bit_identically(tmp_path, rgb4, edm2_teacher, one_thread):
    gnet = write(tmp_path / 'guide.pkl', dict(ema=edm2_net(seed=2, scale=1)))
    args = [f'--data={rgb4}', f'--teacher={edm2_teacher}', f'--gnet={gnet}', '--guidance=1.5', *RUN, *CD, '--cd_target_mode=teacher']
    text = train_ok(f'--outdir={tmp_path / "a"}', *args, '--duration=0.002')
    assert f'guided by "{gnet}" (guidance 1.5)' in text
    train_ok(f'--outdir={tmp_path / "bc"}', *args, '--duration=0.001', '--desc=b')
    dir_b, = run_dirs(str(tmp_path / 'bc'))
    msg = invoke(f'--outdir={tmp_path / "bc"}', *[a.replace('1.5', '2') for a in args], '--duration=0.002', f'--resume={dir_b}')
    assert 'belongs to a run with other settings (guidance 1.5 -> 2.0)' in msg
    train_ok(f'--outdir={tmp_path / "bc"}', *args, '--duration=0.002', f'--resume={dir_b}', '--desc=c')
    dir_a, = run_dirs(str(tmp_path / 'a'))
    dir_c = run_dirs(str(tmp_path / 'bc'))[1]
    a, c = (torch.load(os.path.join(d, 'training-state-000002.pt'), weights_only=False) for d in (dir_a, dir_c))
    assert a['cur_nimg'] == c['cur_nimg'] == 2000
    equal = lambda x, y: x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert equal(a['net'], c['net']) and all(equal(x, y) for x, y in zip(a['phema']['emas'], c['phema']['emas']))
    assert all(equal(a['optimizer_state']['state'][k], c['optimizer_state']['state'][k]) for k in a['optimizer_state']['state'])
    assert a['teacher_digest'] == c['teacher_digest'] and a['settings']['guidance'] == 1.5 and a['settings']['gnet_pkl'] == gnet
    snapshot = load(os.path.join(dir_c, 'network-snapshot-0000002-0.050.pkl'))
    assert snapshot['consistency']['guidance'] == dict(weight=1.5, gnet=gnet) # What the student learned.

def test_setup_attaches_the_guided_teacher_that_validation_uses(tmp_path, rgb4, edm2_teacher, one_thread):
    gnet = write(tmp_path / 'guide.pkl', dict(ema=edm2_net(seed=2, scale=1)))
    kwargs = dict(dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=rgb4), network_kwargs=dict(class_name='training.networks_edm2.Precond',
        **EDM2_KWARGS), loss_kwargs=dict(class_name='training.loss_cd.ConsistencyDistillLoss', S=2, T_start=4, T_end=4), batch_size=8, teacher_pkl=edm2_teacher,
        resume_pkl=edm2_teacher, device=torch.device('cpu'))
    plain = preflight.setup(**kwargs)
    guided = preflight.setup(**kwargs, gnet_pkl=gnet, guidance=2.5)
    teacher = guided.loss_fn.teacher # What the Heun hops, the teacher target and validation's teacher figures evaluate.
    assert isinstance(teacher, guidance.GuidedDenoiser) and teacher.guidance == 2.5 and not teacher.training
    assert type(teacher.net) is networks_edm2.Precond and type(teacher.gnet) is networks_edm2.Precond # Both on the project's class.
    assert guided.init_net is teacher.net and guided.teacher_digest != plain.teacher_digest
    expected = outputs(teacher.gnet) + 2.5 * (outputs(teacher.net) - outputs(teacher.gnet))
    torch.testing.assert_close(outputs(teacher), expected, rtol=0, atol=1e-5)

#----------------------------------------------------------------------------
# Bad input: one sentence each.

def test_bad_guides_and_teachers(tmp_path, rgb4, edm2_teacher):
    base = [f'--outdir={tmp_path / "out"}', f'--data={rgb4}', *RUN, *CD, f'--teacher={edm2_teacher}']
    for kwargs, what in [(dict(img_resolution=16), 'has resolution 16, but the guided network has 4; pass a guide of the network\'s resolution.'),
            (dict(img_channels=1), 'has channel count 1, but the guided network has 3; pass a guide of the network\'s channel count.'),
            (dict(label_dim=5), 'is conditioned on 5 classes, but the guided network on 0; pass an unconditional guide (classifier-free guidance) '
                'or one of the network\'s classes (autoguidance).')]:
        gnet = write(tmp_path / 'guide.pkl', dict(ema=edm2_net(seed=2, **kwargs)))
        assert invoke(*base, f'--gnet={gnet}', '--guidance=2') == f'Error: The guide "{gnet}" {what}'
    assert invoke(*base, '--guidance=2') == 'Error: --guidance=2 needs a guiding network; pass --gnet=PKL|URL, or leave --guidance out.'
    result = CliRunner().invoke(train.main, [*base, f'--gnet={gnet}', '--guidance=-1'])
    assert result.exit_code == 2 and "Error: Invalid value for '--guidance': -1.0 is not in the range x>=0." in result.output
    assert invoke(f'--outdir={tmp_path / "out"}', f'--data={rgb4}', f'--gnet={gnet}') == \
        'Error: --gnet applies only to consistency distillation; pass --consistency=True or leave it out.'

    # A teacher class without an implementation here: the student's architecture must be given.
    call = edm2_form(edm2_net(seed=1), NETWORK_SRC.replace('class Precond(', 'class OtherPrecond('))
    call.meta['class_name'] = 'OtherPrecond'
    other = write(tmp_path / 'other.pkl', dict(ema=call))
    base[-1] = f'--teacher={other}'
    assert invoke(*base) == f'Error: The teacher "{other}" is a OtherPrecond, a class this project has no implementation of (or whose constructor arguments it did not ' \
        'record); distil it into an architecture given by the options (--arch, --precond, --cbase, --cres) with --student_init=random.'
    result = CliRunner().invoke(train.main, [*base, '--student_init=random', '--arch=edm2', '--cbase=16', '--cres=1', '--dry-run'])
    assert result.exit_code == 0, result.output
    assert not os.path.exists(tmp_path / 'out')

#----------------------------------------------------------------------------

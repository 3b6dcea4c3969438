"""The code-free safetensors form of network snapshots: written next to every
pickle, read back without unpickling anything into the same networks (EDM,
consistency students, EDM2 in float16), taken by generate.py and by the
teacher and --transfer of the training loop, made from an EDM2-format pickle
by convert_snapshot.py; foreign class names and broken files are refused
with one sentence."""

import json
import os
import pathlib
import pickle

import numpy as np
import PIL.Image
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

import convert_snapshot
import generate
from torch_utils import persistence
from training import augment
from training import checkpoint
from training import encoders
from training import preflight
from training import loss as losses
from training import loss_cd
from training import networks
from training import networks_edm2
from training import training_loop

from test_persistence_edm2 import edm2_snapshot_bytes # pylint: disable=wrong-import-order
from test_networks_edm2 import MANIFEST # pylint: disable=wrong-import-order

TINY_NET = dict(img_resolution=8, img_channels=1, label_dim=0, model_type='SongUNet', embedding_type='positional', encoder_type='standard',
    decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[1], dropout=0.0)

#----------------------------------------------------------------------------
# Helpers.

def edm_snapshot(seed=0, **extras):
    """A snapshot dict of a tiny EDMPrecond with non-trivial weights, as the training loop makes it."""
    torch.manual_seed(seed)
    net = networks.EDMPrecond(**TINY_NET)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    pipe = augment.AugmentPipe(p=0.5, xflip=1e8, scale=1)
    return checkpoint.snapshot_data(ema=net, loss_fn=losses.EDMLoss(P_mean=-1.0), augment_pipe=pipe, dataset_kwargs=dict(path='digits8.zip', resolution=8), extras=extras)

def outputs(net, seed=1, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn([3, net.img_channels, net.img_resolution, net.img_resolution], generator=gen)
    with torch.no_grad():
        return net(x, torch.tensor([0.05, 1.0, 20.0]), **kwargs)

def save_both(tmp_path, data, name='network-snapshot-000000'):
    pkl = str(tmp_path / f'{name}.pkl')
    checkpoint.save_snapshot(pkl, data)
    return pkl, checkpoint.safetensors_path(pkl)

def forbid_unpickling(monkeypatch):
    """From here on, every way of unpickling raises (deepcopy of persistent objects too)."""
    def refuse(*_args, **_kwargs):
        raise AssertionError('something was unpickled')
    for name in ('load', 'loads', 'Unpickler'):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, 'load', refuse)
    monkeypatch.setattr(persistence, '_reconstruct_persistent_obj', refuse)

def one_sentence(message):
    assert '\n' not in message and message.endswith('.') and 'Traceback' not in message, message
    return message

def rewrite_header(path, edit):
    """Write the safetensors file `path` again with its header passed through `edit(header)`."""
    with safetensors.safe_open(path, framework='pt') as f:
        tensors = {name: f.get_tensor(name).clone() for name in f.keys()} # Off the memory map, which the rewrite truncates.
        header = json.loads(f.metadata()['snapshot'])
    edit(header)
    with open(path, 'wb') as f:
        f.write(safetensors.torch.save(tensors, metadata=dict(snapshot=json.dumps(header))))

#----------------------------------------------------------------------------
# Same networks as the pickle, without unpickling.

def test_edm_snapshot_loads_from_safetensors_like_its_pickle(tmp_path):
    data = edm_snapshot()
    pkl, st = save_both(tmp_path, data)
    assert sorted(os.listdir(tmp_path)) == ['network-snapshot-000000.pkl', 'network-snapshot-000000.safetensors'] # No temporary files left.
    from_pkl, from_st = checkpoint.load_snapshot(pkl), checkpoint.load_snapshot(st)
    assert list(from_st) == list(from_pkl) == ['ema', 'loss_fn', 'augment_pipe', 'dataset_kwargs']
    assert type(from_st['ema']) is networks.EDMPrecond and not from_st['ema'].training and not any(p.requires_grad for p in from_st['ema'].parameters())
    assert torch.equal(outputs(from_st['ema']), outputs(from_pkl['ema']))
    assert type(from_st['loss_fn']) is losses.EDMLoss and from_st['loss_fn'].P_mean == -1.0 # Rebuilt from its class and arguments.
    assert type(from_st['augment_pipe']) is augment.AugmentPipe and from_st['augment_pipe'].init_kwargs == from_pkl['augment_pipe'].init_kwargs
    assert from_st['dataset_kwargs'] == dict(path='digits8.zip', resolution=8) and from_st['dataset_kwargs'].path == 'digits8.zip'

    with safetensors.safe_open(st, framework='pt') as f:
        header = json.loads(f.metadata()['snapshot'])
        names = set(f.keys())
    assert header['format'] == 1 and header['entries']['ema']['module']['class_name'] == 'training.networks.EDMPrecond'
    assert header['entries']['ema']['module']['init_kwargs'] == TINY_NET and header['entries']['loss_fn'] == dict(object=dict(class_name='training.loss.EDMLoss', init_args=[], init_kwargs=dict(P_mean=-1.0)))
    assert names == {f'ema.{name}' for name in data['ema'].state_dict()}

def test_loading_safetensors_unpickles_nothing(tmp_path, monkeypatch):
    pkl, st = save_both(tmp_path, edm_snapshot(consistency=dict(S=2, student_sigmas=[80.0, 1.0, 0.0])))
    forbid_unpickling(monkeypatch)
    data = checkpoint.load_snapshot(st)
    assert type(data['ema']) is networks.EDMPrecond and data['consistency'] == dict(S=2, student_sigmas=[80.0, 1.0, 0.0])
    assert checkpoint.load_snapshot(pathlib.Path(st).as_uri())['consistency']['S'] == 2 # A file:// URL.
    with pytest.raises(AssertionError, match='something was unpickled'): # The guard is real: the pickle cannot load under it.
        checkpoint.load_snapshot(pkl)

def test_student_snapshot_samples_the_same_from_safetensors(tmp_path, one_thread):
    grid = [80.0, 2.5, 0.3, 0.002, 0.0]
    student = loss_cd.ConsistencyDistillLoss(S=4, T_start=8, T_end=16, T_anneal_kimg=2)
    data = checkpoint.snapshot_data(ema=edm_snapshot()['ema'], loss_fn=student, dataset_kwargs=dict(path='digits8.zip'), extras=dict(consistency=dict(S=4, student_sigmas=grid)))
    pkl, st = save_both(tmp_path, data)
    loaded = checkpoint.load_snapshot(st)
    assert loaded['loss_fn'] == dict(class_name='training.loss_cd.ConsistencyDistillLoss', init_args=[], init_kwargs=dict(S=4, T_start=8, T_end=16, T_anneal_kimg=2)) # Plain data.
    for network, outdir in ((pkl, 'from_pkl'), (st, 'from_st')):
        result = CliRunner().invoke(generate.main, [f'--network={network}', f'--outdir={tmp_path / outdir}', '--seeds=0-1', '--device=cpu'])
        assert result.exit_code == 0, result.output + repr(result.exception)
        assert 'student sampler, S=4' in result.output
    for seed in range(2):
        a, b = (np.asarray(PIL.Image.open(tmp_path / outdir / f'{seed:06d}.png')) for outdir in ('from_pkl', 'from_st'))
        assert np.array_equal(a, b)

def test_edm2_float16_snapshot_comes_back_in_float16(tmp_path):
    kwargs = MANIFEST['edm2_cond']['kwargs']
    torch.manual_seed(0)
    net = networks_edm2.Precond(**kwargs).to(torch.float16)
    pkl, st = save_both(tmp_path, checkpoint.snapshot_data(ema=net, loss_fn=losses.EDM2Loss()))
    from_pkl, from_st = checkpoint.load_snapshot(pkl), checkpoint.load_snapshot(st)
    assert type(from_st['ema']) is networks_edm2.Precond and type(from_st['loss_fn']) is losses.EDM2Loss
    assert [(n, t.dtype) for n, t in from_st['ema'].state_dict().items()] == [(n, t.dtype) for n, t in net.state_dict().items()]
    assert all(t.dtype == torch.float16 for t in from_st['ema'].state_dict().values())
    labels = torch.eye(kwargs['label_dim'])[:3]
    assert all(torch.equal(a, b) for a, b in zip(outputs(from_st['ema'], class_labels=labels, return_logvar=True), outputs(from_pkl['ema'], class_labels=labels, return_logvar=True)))

def test_teacher_and_transfer_from_safetensors(tmp_path, digits8, monkeypatch):
    _pkl, st = save_both(tmp_path, edm_snapshot())
    calls = []
    for module, name in ((pickle, 'load'), (pickle, 'loads'), (torch, 'load')): # Counted, not refused: torch's meta device imports Unpickler subclasses.
        monkeypatch.setattr(module, name, lambda *args, _f=getattr(module, name), **kwargs: calls.append(args) or _f(*args, **kwargs))
    network_kwargs = dict(class_name='training.networks.EDMPrecond', **{k: v for k, v in TINY_NET.items() if k not in ('img_resolution', 'img_channels', 'label_dim')})
    common = dict(dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=digits8), network_kwargs=network_kwargs, batch_size=8, seed=0, device='cpu')
    cd_loss = dict(class_name='training.loss_cd.ConsistencyDistillLoss', S=2, T_start=8, T_end=8)
    inputs = preflight.setup(**common, loss_kwargs=cd_loss, teacher_pkl=st, resume_pkl=st)
    assert type(inputs.teacher) is networks.EDMPrecond and inputs.init_net is inputs.teacher
    inputs = preflight.setup(**common, loss_kwargs=dict(class_name='training.loss.EDMLoss'), resume_pkl=st)
    assert torch.equal(outputs(inputs.init_net), outputs(checkpoint.load_snapshot(st)['ema'])) and calls == []

#----------------------------------------------------------------------------
# Writing, and what cannot be written.

class ForeignLoss(losses.EDMLoss):
    """A loss defined outside training/: it cannot be rebuilt, so it is left out."""

def test_entries_that_cannot_be_rebuilt(tmp_path):
    data = edm_snapshot()
    data['loss_fn'] = ForeignLoss()
    _pkl, st = save_both(tmp_path, data)
    with safetensors.safe_open(st, framework='pt') as f:
        assert json.loads(f.metadata()['snapshot'])['entries']['loss_fn'] == dict(dropped='test_snapshot_safetensors.ForeignLoss')
    assert checkpoint.load_snapshot(st)['loss_fn'] is None

    data['ema'] = torch.nn.Linear(2, 2) # A network outside training/: nothing is written.
    with pytest.raises(ValueError, match=r'^The snapshot entry "ema" is a torch\.nn\.modules\.linear\.Linear, which a safetensors snapshot cannot rebuild; .*\.$'):
        checkpoint.save_snapshot(str(tmp_path / 'other.pkl'), data)
    assert sorted(os.listdir(tmp_path)) == ['network-snapshot-000000.pkl', 'network-snapshot-000000.safetensors']

#----------------------------------------------------------------------------
# The converter.

def test_converter_round_trip_of_an_edm2_format_pickle(tmp_path, one_thread):
    src = tmp_path / 'network-snapshot-0000000-0.100.pkl'
    src.write_bytes(edm2_snapshot_bytes('edm2_cond')) # Classes from embedded sources, as in an official EDM2 file.
    dest = tmp_path / 'edm2.safetensors'
    result = CliRunner().invoke(convert_snapshot.main, [f'--src={src}', f'--dest={dest}'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert 'runs the code it carries, on the user\'s say-so' in result.output and 'left out' not in result.output
    with open(src, 'rb') as f:
        original = pickle.load(f)
    converted = checkpoint.load_snapshot(str(dest))
    assert type(original['ema']) is not networks_edm2.Precond and type(converted['ema']) is networks_edm2.Precond
    assert all(t.dtype == torch.float16 for t in converted['ema'].state_dict().values())
    labels = torch.eye(original['ema'].label_dim)[:3]
    assert all(torch.equal(a, b) for a, b in zip(outputs(converted['ema'], class_labels=labels, return_logvar=True), outputs(original['ema'], class_labels=labels, return_logvar=True)))
    assert type(converted['loss_fn']) is losses.EDM2Loss and converted['dataset_kwargs'] == original['dataset_kwargs']
    assert type(converted['encoder']) is getattr(encoders, type(original['encoder']).__name__) # Ours, as for the network.
    assert converted['encoder'].init_kwargs == original['encoder'].init_kwargs

    help_text = CliRunner().invoke(convert_snapshot.main, ['--help']).output
    assert 'runs the code it carries' in help_text
    result = CliRunner().invoke(convert_snapshot.main, [f'--src={src}', f'--dest={tmp_path / "x.pkl"}'])
    assert result.exit_code == 1 and one_sentence(result.output.strip().splitlines()[-1]).startswith('Error: --dest=') and not (tmp_path / 'x.pkl').exists()

#----------------------------------------------------------------------------
# Refused files, each with one sentence.

@pytest.mark.parametrize('class_name', ['torch.nn.Linear', 'training.networks.torch.nn.Linear', 'training.checkpoint.save_snapshot', 'training.loss.EDMLoss', 'os.system'])
def test_class_from_elsewhere_is_refused(tmp_path, class_name, monkeypatch):
    _pkl, st = save_both(tmp_path, edm_snapshot())
    rewrite_header(st, lambda header: header['entries']['ema']['module'].update(class_name=class_name))
    forbid_unpickling(monkeypatch)
    with pytest.raises(ValueError) as info:
        checkpoint.load_snapshot(st)
    assert one_sentence(str(info.value)) == (f'"{st}" names the class "{class_name}" for "ema", which is not a network class of training/; '
        'load the pickle instead.')

def test_broken_files_are_refused(tmp_path):
    _pkl, st = save_both(tmp_path, edm_snapshot())
    content = open(st, 'rb').read()
    cases = {
        'truncated.safetensors':    (content[:len(content) // 2], 'cannot be read as a safetensors snapshot'),
        'garbage.safetensors':      (b'\x80\x04not a safetensors file at all', 'cannot be read as a safetensors snapshot'),
        'foreign.safetensors':      (safetensors.torch.save({'w': torch.zeros(2)}), 'has no valid snapshot header'),
    }
    for name, (data, expected) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as info:
            checkpoint.load_snapshot(str(tmp_path / name))
        assert expected in one_sentence(str(info.value)) and str(tmp_path / name) in str(info.value)

    rewrite_header(st, lambda header: header['entries']['ema']['module']['init_kwargs'].update(model_channels=32))
    with pytest.raises(ValueError) as info:
        checkpoint.load_snapshot(st)
    assert 'holds tensors of "ema" that do not fit training.networks.EDMPrecond (' in one_sentence(str(info.value))
    rewrite_header(st, lambda header: header['entries']['ema']['module']['init_kwargs'].update(model_channels=16, no_such_argument=1))
    with pytest.raises(ValueError, match='with arguments it refuses'):
        checkpoint.load_snapshot(st)

#----------------------------------------------------------------------------

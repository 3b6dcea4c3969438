"""Training states are read with torch.load(weights_only=True): what the loop
saves (generator states, EasyDict options) reads back exactly, states of the
previous format still load, and a state that carries code is refused without
running it."""

import os
import random
import zipfile

import numpy as np
import pytest
import torch

import dnnlib
from training import checkpoint
from training import training_loop

#----------------------------------------------------------------------------

def loop_state(**overrides):
    """A training state as the loop saves it, with EasyDict options and this process's generator states."""
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, betas=[0.9, 0.999])
    net(torch.ones([1, 3])).sum().backward()
    optimizer.step()
    state = dict(net=net.state_dict(), ema=net.state_dict(), optimizer_state=optimizer.state_dict(), loss_state=dict(cur_nimg=64, target=net.state_dict()),
        cur_nimg=128, cur_tick=2, seed=5, batch_size=64, batch_gpu=32, world_size=1, rng_states=[training_loop.get_rng_states(torch.device('cpu'))],
        network_kwargs=dnnlib.EasyDict(class_name='training.networks.EDMPrecond', channel_mult=[1, 2], extra=dnnlib.EasyDict(a=1)),
        loss_kwargs=dnnlib.EasyDict(class_name='training.loss.EDMLoss'))
    state.update(overrides)
    return state

def draws():
    return torch.rand([4]).tolist(), np.random.rand(4).tolist(), [random.random() for _ in range(4)]

def test_state_round_trip_restores_the_generators(tmp_path):
    np.random.normal() # A cached Gaussian in NumPy's state.
    state = loop_state()
    expected = draws()
    path = str(tmp_path / 'training-state-000000.pt')
    checkpoint.save_training_state(path, state)
    loaded = checkpoint.load_training_state(path)
    assert loaded['format'] == checkpoint.STATE_FORMAT and loaded['cur_nimg'] == 128
    assert type(loaded['network_kwargs']) is dict and type(loaded['network_kwargs']['extra']) is dict and loaded['network_kwargs'] == state['network_kwargs']
    assert all(torch.equal(loaded['net'][k], v) for k, v in state['net'].items())
    assert loaded['optimizer_state']['param_groups'] == state['optimizer_state']['param_groups']
    training_loop.set_rng_states(loaded['rng_states'][0], torch.device('cpu'))
    assert draws() == expected

def test_state_of_format_1_still_loads(tmp_path):
    state = dict(loop_state(), format=1, network_kwargs=dict(class_name='training.networks.EDMPrecond'), loss_kwargs=dict(class_name='training.loss.EDMLoss'))
    expected = draws()
    path = str(tmp_path / 'old.pt')
    torch.save(state, path) # What the previous version wrote: NumPy's state as an array.
    loaded = checkpoint.load_training_state(path)
    training_loop.set_rng_states(loaded['rng_states'][0], torch.device('cpu'))
    assert draws() == expected

CALLS = []

def _record(*args):
    CALLS.append(args)
    return 0

class Payload:
    """Unpickling this calls _record: code that a weights_only load must not run."""
    def __reduce__(self):
        return (_record, ('ran',))

def test_state_that_carries_code_is_refused_without_running_it(tmp_path):
    path = str(tmp_path / 'evil.pt')
    torch.save(dict(loop_state(), format=checkpoint.STATE_FORMAT, network_kwargs=Payload()), path)
    CALLS.clear()
    with pytest.raises(ValueError, match=r'^".*evil\.pt" cannot be read as a training state \(.*\); pass a training-state-\*\.pt written by train\.py\.$'):
        checkpoint.load_training_state(path)
    assert CALLS == []
    assert zipfile.is_zipfile(path) and os.path.getsize(path) > 0
    torch.load(path, weights_only=False) # The same file with full unpickling runs the payload: the test above can fail.
    assert CALLS == [('ran',)]

#----------------------------------------------------------------------------

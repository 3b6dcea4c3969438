"""torch_utils.persistence: the pickle format of EDM snapshots, built by hand,
loaded, run, pickled again and loaded again."""

import copy
import importlib
import pickle
import pickletools
import subprocess
import sys
import textwrap

import pytest
import torch

import dnnlib
from torch_utils import persistence

ROOT = __import__('os').path.dirname(__import__('os').path.dirname(__import__('os').path.abspath(__file__)))

#----------------------------------------------------------------------------
# A module source as an EDM pickle would embed it.

MODULE_SRC = textwrap.dedent('''
    import torch
    from torch_utils import persistence

    @persistence.persistent_class
    class Inner(torch.nn.Module):
        def __init__(self, features):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(features, features))
            self.register_buffer('offset', torch.zeros(features))

        def forward(self, x):
            return x @ self.weight.t() + self.offset

    @persistence.persistent_class
    class Outer(torch.nn.Module):
        def __init__(self, features, scale):
            super().__init__()
            self.inner = Inner(features)
            self.cfg = dict(scale=scale)

        def forward(self, x):
            return self.inner(x) * self.cfg['scale']
''')

class _PersistentCall:
    """Pickles as `_reconstruct_persistent_obj(meta)`, like an object saved by EDM."""
    def __init__(self, meta):
        self.meta = meta
    def __reduce__(self):
        return (persistence._reconstruct_persistent_obj, (self.meta,))

def _module_state(params=None, buffers=None, modules=None, **attrs):
    """The __dict__ of an nn.Module with the given members, as EDM pickles hold it."""
    state = dict(torch.nn.Module().__dict__)
    state['_parameters'] = dict(params or {})
    state['_buffers'] = dict(buffers or {})
    state['_modules'] = dict(modules or {})
    state.update(attrs)
    return state

def _hand_made_pickle(weight, offset, scale):
    inner_meta = dict(type='class', version=6, module_src=MODULE_SRC, class_name='Inner',
        state=_module_state(params=dict(weight=torch.nn.Parameter(weight)), buffers=dict(offset=offset),
            _init_args=(weight.shape[0],), _init_kwargs={}))
    outer_meta = dict(type='class', version=6, module_src=MODULE_SRC, class_name='Outer',
        state=_module_state(modules=dict(inner=_PersistentCall(inner_meta)),
            cfg=dnnlib.EasyDict(scale=scale), _init_args=(), _init_kwargs=dnnlib.EasyDict(features=weight.shape[0], scale=scale)))
    snapshot = dict(ema=_PersistentCall(outer_meta), dataset_kwargs=dnnlib.EasyDict(class_name='x', path='y'))
    return pickle.dumps(snapshot)

def _global_names(data):
    """The module-level names a pickle refers to."""
    names = set()
    strings = []
    for op, arg, _pos in pickletools.genops(data):
        if op.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'UNICODE'):
            strings.append(arg)
        if op.name == 'STACK_GLOBAL':
            names.add(f'{strings[-2]}.{strings[-1]}')
        if op.name == 'GLOBAL':
            names.add(arg.replace(' ', '.'))
    return names

#----------------------------------------------------------------------------

def test_hand_made_edm_pickle_loads_runs_and_round_trips():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn([4, 4], generator=gen)
    offset = torch.randn([4], generator=gen)
    data = _hand_made_pickle(weight, offset, scale=3.0)
    names = _global_names(data)
    assert 'torch_utils.persistence._reconstruct_persistent_obj' in names
    assert not any('test_persistence' in name or '__main__' in name for name in names)

    snapshot = pickle.loads(data)
    net = snapshot['ema']
    assert type(net).__name__ == 'Outer' and persistence.is_persistent(net)
    assert persistence.is_persistent(net.inner) and type(net.inner).__name__ == 'Inner'
    assert isinstance(net.cfg, dnnlib.EasyDict) and isinstance(snapshot['dataset_kwargs'], dnnlib.EasyDict)
    assert net.init_kwargs == dict(features=4, scale=3.0)
    x = torch.randn([2, 4], generator=gen)
    expected = (x @ weight.t() + offset) * 3.0
    torch.testing.assert_close(net(x), expected)
    assert [name for name, _ in net.named_parameters()] == ['inner.weight']
    assert [name for name, _ in net.named_buffers()] == ['inner.offset']

    # Pickled again by our code, loaded again: same source, same class, same output.
    data2 = pickle.dumps(snapshot)
    net2 = pickle.loads(data2)['ema']
    assert type(net2) is type(net)
    assert type(net2)._orig_module_src == MODULE_SRC
    torch.testing.assert_close(net2(x), expected)
    net3 = copy.deepcopy(net2)
    torch.testing.assert_close(net3(x), expected)

def test_hand_made_pickle_loads_in_fresh_process(tmp_path):
    weight = torch.eye(3) * 2
    path = tmp_path / 'snap.pkl'
    path.write_bytes(_hand_made_pickle(weight, torch.ones(3), scale=0.5))
    script = textwrap.dedent(f'''
        import pickle, sys, torch
        sys.path.insert(0, {ROOT!r})
        with open({str(path)!r}, 'rb') as f:
            net = pickle.load(f)['ema']
        y = net(torch.ones(1, 3))
        data = pickle.dumps(net)
        assert torch.equal(pickle.loads(data)(torch.ones(1, 3)), y)
        print(y.tolist())
    ''')
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=str(tmp_path), check=True).stdout
    assert out.strip() == '[[1.5, 1.5, 1.5]]'

#----------------------------------------------------------------------------

def test_decorated_class_from_a_file_pickles_its_source(tmp_path, monkeypatch):
    (tmp_path / 'mynet_mod.py').write_text(MODULE_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module('mynet_mod')
    net = module.Outer(features=2, scale=2.0)
    assert net.init_kwargs == dict(features=2, scale=2.0)
    with torch.no_grad():
        net.inner.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    data = pickle.dumps(net)
    assert 'mynet_mod.Outer' not in _global_names(data)
    sys.modules.pop('mynet_mod')
    loaded = pickle.loads(data)
    assert type(loaded)._orig_module_src == MODULE_SRC
    torch.testing.assert_close(loaded(torch.ones(1, 2)), torch.tensor([[6.0, 14.0]]))

def test_import_hook_can_patch_old_sources():
    data = _hand_made_pickle(torch.eye(2), torch.zeros(2), scale=1.0)
    def hook(meta):
        if meta.class_name == 'Outer':
            meta.module_src = meta.module_src.replace("* self.cfg['scale']", "* self.cfg['scale'] * 10")
        return meta
    persistence.import_hook(hook)
    try:
        net = pickle.loads(data)['ema']
    finally:
        persistence._import_hooks.remove(hook)
    torch.testing.assert_close(net(torch.ones(1, 2)), torch.full([1, 2], 10.0))

def test_record_init_args_can_be_switched_off(tmp_path, monkeypatch):
    # EDM2's persistence lets a constructor opt out of recording its arguments.
    (tmp_path / 'norecord_mod.py').write_text(textwrap.dedent('''
        from torch_utils import persistence

        @persistence.persistent_class
        class Quiet:
            def __init__(self, big):
                self._record_init_args = False
                self.size = len(big)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module('norecord_mod')
    obj = pickle.loads(pickle.dumps(module.Quiet(big=list(range(5)))))
    assert obj.size == 5 and obj._init_args is None and obj._init_kwargs is None
    with pytest.raises(ValueError, match='_record_init_args'):
        obj.init_kwargs # pylint: disable=pointless-statement
    with pytest.raises(ValueError, match='_record_init_args'):
        obj.init_args # pylint: disable=pointless-statement
    sys.modules.pop('norecord_mod')

def test_bad_uses():
    with pytest.raises(AssertionError):
        persistence.persistent_class(lambda: None)
    with pytest.raises(AssertionError):
        persistence.import_hook(42)
    meta = dict(type='class', version=99, module_src=MODULE_SRC, class_name='Inner', state={})
    with pytest.raises(ValueError, match='version 99'):
        pickle.loads(pickle.dumps(_PersistentCall(meta)))
    meta = dict(type='class', version=6, module_src=MODULE_SRC, class_name='Missing', state={})
    with pytest.raises(ValueError, match='"Missing"'):
        pickle.loads(pickle.dumps(_PersistentCall(meta)))

#----------------------------------------------------------------------------

"""The GPU path on the CPU: --precision, --teacher_precision and
--compile from the command line to the networks, the eager fallback of
torch.compile, and the step's pieces that need no GPU. What needs one is in
benchmarks/gpu_check.py."""

import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from _train_helpers import invoke
from _train_helpers import run_loop
from torch_utils import misc
from training import compiling
from training import networks
from training import precision as precisions
from training import steps
from training import training_loop

#----------------------------------------------------------------------------
# Precision.

def test_precision_resolves_fp16_and_refuses_two_precisions():
    assert precisions.resolve(None, use_fp16=False) == 'fp32' and precisions.resolve(None, use_fp16=True) == 'fp16'
    assert precisions.resolve('bf16') == 'bf16' and precisions.resolve('fp16', use_fp16=True) == 'fp16'
    with pytest.raises(AssertionError): # train.py's checks refuse it with a sentence (below).
        precisions.resolve('bf16', use_fp16=True)

def test_train_py_precision_mistakes_are_one_sentence(tmp_path):
    common = [f'--outdir={tmp_path}', f'--data={tmp_path}/none.zip', '--device=cpu']
    assert invoke(*common, '--fp16=True', '--precision=bf16') == 'Error: --fp16=True and --precision=bf16 ask for two precisions; pass only --precision=bf16.'
    assert invoke(*common, '--teacher_precision=bf16').startswith('Error: --teacher_precision applies only to consistency distillation; pass --consistency=True')

def dry_run(*args):
    import train # pylint: disable=import-outside-toplevel
    result = CliRunner().invoke(train.main, [*args, '--dry-run'])
    assert result.exit_code == 0, result.output
    text = result.output
    return json.loads(text[text.index('Training options:') + len('Training options:'):text.index('Run directory:')]), text

def test_train_py_options_reach_the_loop(tmp_path, digits8):
    common = [f'--outdir={tmp_path}', f'--data={digits8}', '--device=cpu', '--arch=ddpmpp', '--cbase=16', '--cres=1']
    c, text = dry_run(*common, '--precision=bf16', '--compile')
    assert (c['precision'], c['compile_networks'], c['network_kwargs']['use_fp16'], c['teacher_precision']) == ('bf16', True, False, None)
    assert '-batch512-bf16' in c['run_dir'] and 'Network:          ddpmpp, edm preconditioning, bf16 (reduced precision needs CUDA)' in text
    for flags in (['--fp16=True'], ['--precision=fp16']): # EDM's --fp16 is --precision=fp16.
        c, _ = dry_run(*common, *flags)
        assert (c['precision'], c['compile_networks'], c['network_kwargs']['use_fp16']) == (None, False, True) and c['run_dir'].endswith('-fp16')

def test_teacher_in_its_own_precision_is_the_network_on_the_cpu():
    torch.manual_seed(0)
    net = networks.EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=16, channel_mult=[1], num_blocks=1).eval()
    x, sigma = torch.randn(3, 1, 8, 8), torch.tensor([0.5, 2.0, 10.0])
    with torch.no_grad():
        expected = net(x, sigma)
        for name in precisions.PRECISIONS:
            teacher = precisions.Teacher(net, name)
            assert teacher.use_fp16 == (name == 'fp16') and teacher.img_resolution == 8 and teacher.round_sigma(0.5) == net.round_sigma(0.5)
            assert torch.equal(teacher(x, sigma), expected) # Reduced precision takes effect on CUDA only.
    assert list(precisions.Teacher(net, 'bf16').parameters()) == list(net.parameters())

def test_autocast_dtypes():
    net = torch.nn.Linear(2, 2)
    edm = networks.EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=16, channel_mult=[1], num_blocks=1)
    assert [precisions.autocast_dtype(net, name, 'cpu') for name in precisions.PRECISIONS] == [None, None, None] # No autocast on the CPU.
    assert [precisions.autocast_dtype(net, name, 'cuda') for name in precisions.PRECISIONS] == [None, torch.float16, torch.bfloat16]
    assert [precisions.autocast_dtype(edm, name, 'cuda') for name in precisions.PRECISIONS] == [None, None, torch.bfloat16] # fp16: EDM's use_fp16.

#----------------------------------------------------------------------------
# torch.compile and its fallback.

@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(compiling, '_warned', [])

def test_compile_falls_back_to_eager_with_one_warning(monkeypatch, fresh_warning):
    net = torch.nn.Linear(3, 2)
    x = torch.randn(4, 3)
    def unavailable(*_args, **_kwargs):
        raise RuntimeError('torch.compile is not supported on this platform')
    monkeypatch.setattr(torch, 'compile', unavailable)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        first, second = compiling.compile_network(net), compiling.compile_network(net)
        assert torch.equal(first(x), net(x)) and torch.equal(second(x), net(x))
    assert [str(w.message) for w in caught] == ['torch.compile is unavailable here (RuntimeError: torch.compile is not supported on this platform); the networks run eagerly.']

def test_compile_failing_at_the_first_call_falls_back(monkeypatch, fresh_warning):
    net = torch.nn.Linear(3, 2)
    calls = []
    def compiled_that_fails(module, **kwargs):
        calls.append(kwargs)
        def run(*_args):
            raise RuntimeError('no C++ compiler found')
        return run
    monkeypatch.setattr(torch, 'compile', compiled_that_fails)
    wrapped = compiling.compile_network(net)
    x = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match='no C\\+\\+ compiler found'):
        assert torch.equal(wrapped(x), net(x))
    assert torch.equal(wrapped(x), net(x)) and wrapped._compiled[0] is None # pylint: disable=protected-access
    assert calls == [dict(backend='inductor', mode=None, dynamic=False)] # Fixed shapes by construction.
    assert wrapped.out_features == 2 and list(wrapped.parameters()) == list(net.parameters()) and wrapped._orig_mod is net # pylint: disable=protected-access

def test_ddp_wraps_the_compiled_network(monkeypatch, fresh_warning):
    monkeypatch.setattr(torch, 'compile', lambda module, **_kwargs: module)
    torch.distributed.init_process_group('gloo', store=torch.distributed.HashStore(), rank=0, world_size=1)
    ddp = None
    try:
        net = torch.nn.Linear(3, 2)
        ddp = steps.distributed(compiling.compile_network(net), torch.device('cpu'))
        ddp(torch.randn(4, 3)).sum().backward()
        assert net.weight.grad is not None and misc.unwrap_module(ddp) is net
        net.use_fp16 = True # A network with half precision of its own keeps autocast off behind DDP too.
        assert precisions.autocast_dtype(ddp, 'fp16', 'cuda') is None and precisions.autocast_dtype(ddp, 'bf16', 'cuda') == torch.bfloat16
    finally:
        del ddp # DDP's reducer holds the group: it goes first (a group destroyed under a live reducer can hang).
        torch.distributed.destroy_process_group()

def test_loop_compiles_student_teacher_and_target_and_sets_teacher_precision(tmp_path, digits8, teacher, monkeypatch, one_thread):
    compiled = []
    def recording_compile(module, **_kwargs):
        compiled.append(type(module).__name__)
        return module # Eager: what compiles is recorded, not timed.
    monkeypatch.setattr(torch, 'compile', recording_compile)
    seen = []
    def extras(loss_fn, **_kwargs):
        seen.append((loss_fn.teacher.precision, loss_fn.teacher.use_fp16, loss_fn._compile_fn is compiling.compile_network)) # pylint: disable=protected-access
        return {}
    run_loop(run_dir=str(tmp_path), dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=digits8),
        data_loader_kwargs=dict(num_workers=0), network_kwargs=dict(class_name='training.networks.EDMPrecond', model_type='SongUNet',
        model_channels=16, channel_mult=[1], num_blocks=1), loss_kwargs=dict(class_name='training.loss_cd.ConsistencyDistillLoss',
        S=2, T_start=4, T_end=4, target_mode='ema'), optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3), batch_size=8, total_kimg=0.016,
        kimg_per_tick=1, teacher_pkl=teacher, teacher_precision='fp16', compile_networks=True, snapshot_extras=extras, state_dump_ticks=None,
        device=torch.device('cpu'))
    assert seen[-1] == ('fp16', True, True)
    assert sorted(compiled) == ['EDMPrecond', 'EDMPrecond', 'Teacher'] # The student, the ema target, the teacher; each once.

#----------------------------------------------------------------------------
# The optimizer step.

def test_step_after_loading_the_state_of_an_unfused_optimizer():
    net = torch.nn.Linear(3, 2)
    unfused = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    unfused.step()
    fused = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True) # Fused Adam runs on the CPU too.
    fused.load_state_dict(unfused.state_dict()) # The groups now say fused=None, as in an older training state.
    before = net.weight.detach().clone()
    assert torch.isfinite(steps.optimizer_step(net, fused, 1e-3)) and not torch.equal(net.weight, before)
    net.weight.grad.fill_(float('nan'))
    before = net.weight.detach().clone()
    assert not torch.isfinite(steps.optimizer_step(net, fused, 1e-3)) and torch.equal(net.weight, before)

def test_fused_adam_on_cuda_only():
    params = [torch.nn.Parameter(torch.zeros(2))]
    kwargs = dict(class_name='torch.optim.Adam', lr=1e-3)
    assert not steps.make_optimizer(params, kwargs, 'cpu').defaults.get('fused')
    assert steps.make_optimizer(params, dict(kwargs, fused=False), 'cuda').defaults['fused'] is False # Given: kept (and nothing runs on CUDA).

def test_skipped_step_leaves_ema_and_target_where_they_are():
    net, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = [p.detach().clone() for p in ema.parameters()]
    steps.update_ema(ema, net, cur_nimg=100, batch_size=10, ema_halflife_kimg=0.01, finite=torch.tensor(False))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.parameters()))
    beta = steps.update_ema(ema, net, cur_nimg=100, batch_size=10, ema_halflife_kimg=0.01, finite=torch.tensor(True))
    torch.testing.assert_close(list(ema.parameters())[0], before[0] * beta + net.weight.detach() * (1 - beta))
    class Hook:
        def __init__(self):
            self.calls = []
        def update_target(self, net):
            self.calls.append(net)
    hook = Hook()
    steps.update_target(hook, net, torch.tensor(False))
    steps.update_target(hook, net, torch.tensor(True))
    assert hook.calls == [net] # A hook without `finite` is called for finite steps only.

#----------------------------------------------------------------------------

def test_official_edm_code_cannot_run_in_bf16():
    class Official(torch.nn.Module): # The guard of the published EDM code, embedded in its pickles.
        _orig_module_src = 'F_x = self.model(...)\n        assert F_x.dtype == dtype\n'
    precisions.check_network(Official(), 'fp16')
    with pytest.raises(ValueError, match=r'^The teacher runs the code embedded in its official EDM pickle, which cannot run in bf16; '):
        precisions.Teacher(Official(), 'bf16')
    precisions.check_network(networks.EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=16, channel_mult=[1], num_blocks=1), 'bf16')

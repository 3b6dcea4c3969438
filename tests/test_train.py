"""train.py and training/training_loop.py on the CPU: the run directory, the
snapshot in a fresh process, exact resume, W&B offline, the loop's hooks and
its arithmetic, and every bad input.

The runs use the digits dataset at 8x8 and one OpenMP thread per process, to
stay fast on a shared 2-core machine."""

import glob
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import train
from _train_helpers import ROOT, SMALL_RUN, VALIDATION_CALLS, HookLoss, RecordingRun, finish, invoke, read_stats, read_wandb_history, run_dirs, start_train, subprocess_env
from _train_helpers import run_loop
from training import checkpoint
from training import steps
from training import training_loop

RUN_NAME = 'digits8-uncond-ddpmpp-edm-gpus1-batch64-fp32'

#----------------------------------------------------------------------------
# Fixtures: the dataset, and three runs of train.py.

@pytest.fixture(scope='module')
def runs(tmp_path_factory, digits8):
    """A: 2 kimg uninterrupted. B: the same options stopped at 1 kimg, with W&B
    offline through WANDB_MODE. C: B resumed to 2 kimg, W&B too. A and B run under `-X importtime`."""
    outdir_a, outdir_bc = str(tmp_path_factory.mktemp('runs_a')), str(tmp_path_factory.mktemp('runs_bc'))
    args = [f'--data={digits8}', '--arch=ddpmpp', '--cbase=32', '--cres=1,2', '--batch-gpu=32', *SMALL_RUN]
    proc_a = start_train(f'--outdir={outdir_a}', *args, '--duration=0.002', python_flags=['-X', 'importtime'])
    wandb = dict(wandb_home=tmp_path_factory.mktemp('wandb_home'), env=dict(WANDB_MODE='offline'))
    res_b = finish(start_train(f'--outdir={outdir_bc}', *args, '--duration=0.001', '--wandb=True', '--desc=b', python_flags=['-X', 'importtime'], **wandb))
    assert res_b[0] == 0, res_b[2][-3000:]
    dir_b, = run_dirs(outdir_bc)
    res_c = finish(start_train(f'--outdir={outdir_bc}', *args, '--duration=0.002', f'--resume={dir_b}', '--desc=c', '--wandb=True', **wandb))
    assert res_c[0] == 0, res_c[2][-3000:]
    res_a = finish(proc_a)
    assert res_a[0] == 0, res_a[2][-3000:]
    dir_a, = run_dirs(outdir_a)
    dir_c = run_dirs(outdir_bc)[1]
    return dict(a=dir_a, b=dir_b, c=dir_c, res_a=res_a, res_b=res_b, res_c=res_c)

def imported_modules(importtime_stderr):
    """Top-level package names in the output of `python -X importtime`."""
    names = re.findall(r'^import time:\s+\d+ \|\s+\d+ \|\s*([\w.]+)', importtime_stderr, flags=re.M)
    return {name.split('.')[0] for name in names}

#----------------------------------------------------------------------------
# Must show 1: the run directory, and the snapshot in a fresh process.

def test_run_directory_is_complete(runs):
    run_dir = runs['a']
    assert os.path.basename(run_dir) == f'00000-{RUN_NAME}'
    assert sorted(os.listdir(run_dir)) == ['log.txt', *[f'network-snapshot-00000{k}.{ext}' for k in range(3) for ext in ('pkl', 'safetensors')],
        'stats.jsonl', 'training-state-000001.pt', 'training-state-000002.pt', 'training_options.json']
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        options = json.load(f)
    assert options['network_kwargs']['class_name'] == 'training.networks.EDMPrecond'
    assert options['network_kwargs']['model_channels'] == 32 and options['network_kwargs']['channel_mult'] == [1, 2]
    assert options['loss_kwargs']['class_name'] == 'training.loss.EDMLoss'
    assert options['batch_size'] == 64 and options['batch_gpu'] == 32 and options['total_kimg'] == 2 and options['seed'] == 1
    assert options['dataset_kwargs']['resolution'] == 8 and options['dataset_kwargs']['max_size'] == 1797

    # One line per tick; ticks end after 1 step, then every >= 1 kimg, and at the end.
    stats = read_stats(run_dir)
    assert [s['Progress/kimg']['mean'] for s in stats] == pytest.approx([0.064, 1.088, 2.048])
    assert [s['Progress/tick']['mean'] for s in stats] == [0, 1, 2]
    assert [s['Loss/loss']['num'] for s in stats] == [64 * 64, 16 * 64 * 64, 15 * 64 * 64] # Steps x images x pixels.
    assert [s['Progress/lr']['mean'] for s in stats] == pytest.approx([0, 1e-3, 1e-3]) # The first step is at cur_nimg = 0.
    for s in stats:
        for name in ('Loss/grad_norm', 'Timing/sec_per_tick', 'Timing/sec_per_kimg', 'Timing/maintenance_sec', 'Resources/cpu_mem_gb', 'Resources/peak_gpu_mem_gb'):
            assert np.isfinite(s[name]['mean'])
    assert stats[-1]['Loss/loss']['mean'] < stats[0]['Loss/loss']['mean']

    with open(os.path.join(run_dir, 'log.txt')) as f:
        log = f.read()
    assert log.startswith('Building the network...') and log.endswith('Done.\n') # Starts where the options (in training_options.json) end.
    assert re.search(r'^tick 2 +kimg 2\.0 +time \S+ +sec/tick [\d.]+ +sec/kimg [\d.]+ +maintenance [\d.]+ +cpumem [\d.]+ +gpumem 0\.00', log, flags=re.M)
    state = torch.load(os.path.join(run_dir, 'training-state-000002.pt'), weights_only=False)
    assert state['cur_nimg'] == 2048 and state['cur_tick'] == 2 and len(state['rng_states']) == 1

def test_snapshot_loads_in_fresh_process_and_denoises(runs, digits8, tmp_path):
    from training.dataset import ImageFolderDataset
    dataset = ImageFolderDataset(digits8)
    clean = np.stack([dataset[i][0] for i in range(512)]).astype(np.float32) / 127.5 - 1
    noise = np.random.default_rng(0).standard_normal(clean.shape).astype(np.float32)
    np.savez(tmp_path / 'data.npz', clean=clean, noise=noise)
    script = '\n'.join([
        'import json, pickle, sys, numpy as np, torch',
        f'sys.path.insert(0, {ROOT!r})',
        f'with open({os.path.join(runs["a"], "network-snapshot-000002.pkl")!r}, "rb") as f:',
        '    data = pickle.load(f)',
        f'arrays = np.load({str(tmp_path / "data.npz")!r})',
        'y, n = torch.from_numpy(arrays["clean"]), torch.from_numpy(arrays["noise"])',
        'errors = {}',
        'for sigma in (0.5, 1.0, 2.0):',
        '    with torch.no_grad():',
        '        D = data["ema"](y + sigma * n, torch.full([len(y)], sigma))',
        '    errors[sigma] = float(((D - y) ** 2).mean())',
        'print(json.dumps(dict(keys=sorted(data), ema=type(data["ema"]).__name__, training=data["ema"].training,',
        '    loss=type(data["loss_fn"]).__name__, augment=type(data["augment_pipe"]).__name__, dataset=data["dataset_kwargs"], errors=errors)))',
    ])
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300, env=subprocess_env(), cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res['keys'] == ['augment_pipe', 'dataset_kwargs', 'ema', 'loss_fn']
    assert res['ema'] == 'EDMPrecond' and res['training'] is False and res['loss'] == 'EDMLoss' and res['augment'] == 'AugmentPipe'
    assert res['dataset']['path'] == digits8 and res['dataset']['resolution'] == 8
    for sigma, error in res['errors'].items():
        sigma = float(sigma)
        c_skip = 0.25 / (sigma ** 2 + 0.25) # The untrained network's output is c_skip * x (its last layer starts at zero).
        untrained = float((((c_skip - 1) * clean + c_skip * sigma * noise) ** 2).mean())
        assert error < 0.7 * untrained, (sigma, error, untrained)
        assert error < sigma ** 2 # Better than the noisy input itself.

#----------------------------------------------------------------------------
# Must show 3: exact resume.

def test_resumed_run_is_bit_identical_to_uninterrupted_run(runs):
    assert os.path.basename(runs['b']) == f'00000-{RUN_NAME}-b' and os.path.basename(runs['c']) == f'00001-{RUN_NAME}-c'
    with open(os.path.join(runs['c'], 'log.txt')) as f:
        assert 'Continuing from the training state' in f.read()
    state_b = torch.load(os.path.join(runs['b'], 'training-state-000001.pt'), weights_only=False)
    assert state_b['cur_nimg'] == 1024 and state_b['cur_tick'] == 1
    assert [s['Progress/tick']['mean'] for s in read_stats(runs['c'])] == [2] # Ticks continue from the state.

    a = torch.load(os.path.join(runs['a'], 'training-state-000002.pt'), weights_only=False)
    c = torch.load(os.path.join(runs['c'], 'training-state-000002.pt'), weights_only=False)
    assert a['cur_nimg'] == c['cur_nimg'] == 2048
    for key in ('net', 'ema'):
        assert a[key].keys() == c[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], c[key][name]), (key, name)
    assert not all(torch.equal(a['net'][k], state_b['net'][k]) for k in a['net']) # The second half did train.
    opt_a, opt_c = a['optimizer_state'], c['optimizer_state']
    assert opt_a['param_groups'] == opt_c['param_groups'] and opt_a['state'].keys() == opt_c['state'].keys()
    for idx in opt_a['state']:
        for key, value in opt_a['state'][idx].items():
            assert torch.equal(value, opt_c['state'][idx][key]), (idx, key)
    assert torch.equal(a['rng_states'][0]['torch'], c['rng_states'][0]['torch'])

    with open(os.path.join(runs['a'], 'network-snapshot-000002.pkl'), 'rb') as f:
        ema_a = pickle.load(f)['ema']
    with open(os.path.join(runs['c'], 'network-snapshot-000002.pkl'), 'rb') as f:
        ema_c = pickle.load(f)['ema']
    assert all(torch.equal(p, q) for p, q in zip(ema_a.state_dict().values(), ema_c.state_dict().values()))

#----------------------------------------------------------------------------
# Must show 4: W&B.

def test_wandb_offline_run_holds_the_loss_history(runs):
    for run in 'bc':
        history, stats = read_wandb_history(runs[run]), read_stats(runs[run])
        assert [h['Progress/kimg'] for h in history] == pytest.approx([s['Progress/kimg']['mean'] for s in stats])
        assert [h['Loss/loss'] for h in history] == pytest.approx([s['Loss/loss']['mean'] for s in stats], rel=1e-12)
        assert [h['Loss/grad_norm'] for h in history] == pytest.approx([s['Loss/grad_norm']['mean'] for s in stats], rel=1e-12)
    assert [h['Progress/kimg'] for h in read_wandb_history(runs['b'])] == pytest.approx([0.064, 1.024])
    assert [h['Progress/lr'] for h in read_wandb_history(runs['b'])] == pytest.approx([0, 1e-3])

def test_wandb_mode_comes_from_the_environment_and_a_resumed_run_continues_its_wandb_run(runs):
    ids = [re.fullmatch(r'offline-run-\d+_\d+-(\w+)', os.path.basename(path)) for run in 'bc'
        for path in glob.glob(os.path.join(runs[run], 'wandb', 'offline-run-*'))]
    assert len(ids) == 2 and all(ids) and ids[0].group(1) == ids[1].group(1)

def test_wandb_is_not_imported_without_the_flag(runs):
    assert 'torch' in imported_modules(runs['res_a'][2]) # The import log works ...
    assert 'wandb' in imported_modules(runs['res_b'][2]) # ... and sees wandb when it is used,
    assert 'wandb' not in imported_modules(runs['res_a'][2]) # ... but not otherwise.
    assert not os.path.exists(os.path.join(runs['a'], 'wandb'))

#----------------------------------------------------------------------------
# Must show 5: bad input, each one sentence before any work.

@pytest.fixture
def unlabeled(tmp_path):
    folder = tmp_path / 'unlabeled'
    folder.mkdir()
    for idx in range(4):
        PIL.Image.fromarray(np.full([8, 8], idx * 60, dtype=np.uint8)).save(folder / f'img{idx}.png')
    return str(folder)

def test_missing_dataset(tmp_path):
    missing = str(tmp_path / 'nothing.zip')
    msg = invoke(f'--outdir={tmp_path / "out"}', f'--data={missing}')
    assert msg.startswith('Error: --data: ') and missing in msg and 'does not exist' in msg
    assert not os.path.exists(tmp_path / 'out')

def test_cond_without_labels(tmp_path, unlabeled):
    msg = invoke(f'--outdir={tmp_path / "out"}', f'--data={unlabeled}', '--cond=1')
    assert msg == f'Error: --cond=True needs class labels, but {unlabeled} has none that can be used; pass --cond=False or rebuild it with labels using dataset_tool.py.'
    assert not os.path.exists(tmp_path / 'out')

def test_batch_that_does_not_divide(tmp_path, unlabeled):
    msg = invoke(f'--outdir={tmp_path / "out"}', f'--data={unlabeled}', '--batch=10', '--batch-gpu=4')
    assert msg == 'Error: --batch=10 gives 10 images per rank, which --batch-gpu=4 does not divide; pass a --batch that is a multiple of 4.'

def test_wandb_that_cannot_be_imported(tmp_path, unlabeled, monkeypatch):
    monkeypatch.setitem(sys.modules, 'wandb', None) # Makes `import wandb` fail.
    msg = invoke(f'--outdir={tmp_path / "out"}', f'--data={unlabeled}', '--wandb=True')
    assert msg.startswith('Error: --wandb=True needs the wandb package, which cannot be imported (')
    assert msg.endswith('); install it with "pip install wandb" or pass --wandb=False.')
    assert not os.path.exists(tmp_path / 'out')

def test_wandb_that_cannot_start(tmp_path, unlabeled, monkeypatch):
    class FailingWandb:
        @staticmethod
        def init(**_kwargs):
            raise RuntimeError('no route to api.wandb.ai')
    monkeypatch.setitem(sys.modules, 'wandb', FailingWandb)
    msg = invoke(f'--outdir={tmp_path / "out"}', f'--data={unlabeled}', '--wandb=True', '--nosubdir', '--device=cpu')
    assert msg == 'Error: --wandb=True: W&B could not start a run (no route to api.wandb.ai); check the login and --wandb_project/--wandb_entity, use --wandb_mode=offline, or pass --wandb=False.'
    assert not os.path.exists(tmp_path / 'out' / 'stats.jsonl') # Training never started.

def test_resume_from_another_configuration(tmp_path, runs, digits8):
    state = os.path.join(runs['a'], 'training-state-000002.pt')
    msg = invoke(f'--outdir={tmp_path / "out"}', f'--data={digits8}', '--cbase=16', '--cres=1,2', '--duration=1', f'--resume={state}')
    assert re.fullmatch(r'Error: The --resume state ".*training-state-000002\.pt" holds "[\w.]+" with shape \[[\d, ]+\], but the network here has shape \[[\d, ]+\]; resume with the options of the run that wrote it\.', msg), msg
    msg = invoke(f'--outdir={tmp_path / "out"}', f'--data={digits8}', '--cbase=32', '--cres=1,2', '--precond=vp', '--duration=1', f'--resume={state}')
    assert "loss_kwargs.class_name 'training.loss.EDMLoss' -> 'training.loss.VPLoss'" in msg and 'belongs to a run with other settings (' in msg
    assert "network_kwargs.class_name 'training.networks.EDMPrecond' -> 'training.networks.VPPrecond'" in msg
    msg = invoke(f'--outdir={tmp_path / "out"}', f'--data={digits8}', '--cbase=32', '--cres=1,2', *SMALL_RUN, '--duration=0.002', f'--resume={state}')
    assert msg.endswith('has already seen 0.002048 Mimg, which reaches --duration=0.002; pass a longer --duration.')
    snapshot = os.path.join(runs['a'], 'network-snapshot-000002.pkl')
    msg = invoke(f'--outdir={tmp_path / "out"}', f'--data={digits8}', f'--resume={snapshot}')
    assert msg == f'Error: --resume: "{snapshot}" is not a training state (torch.save writes zip archives); pass a training-state-*.pt written by train.py.'
    msg = invoke(f'--outdir={tmp_path / "out"}', f'--data={digits8}', f'--resume={tmp_path}')
    assert msg == f'Error: --resume: "{tmp_path}" is a folder without training-state-*.pt files; pass a training state or a run directory that holds one.'
    assert not os.path.exists(tmp_path / 'out')

def test_transfer_with_shapes_that_do_not_match(tmp_path, runs, digits8):
    snapshot = os.path.join(runs['a'], 'network-snapshot-000002.pkl')
    msg = invoke(f'--outdir={tmp_path / "out"}', f'--data={digits8}', '--cbase=16', '--cres=1,2', f'--transfer={snapshot}')
    assert re.fullmatch(r'Error: The --transfer snapshot ".*" holds "[\w.]+" with shape \[[\d, ]+\], but the network here has shape \[[\d, ]+\]; choose the --arch, --cbase, --cres, --cond and --augment of the network in it\.', msg), msg
    msg = invoke(f'--outdir={tmp_path / "out"}', f'--data={digits8}', f'--transfer={tmp_path / "none.pkl"}')
    assert msg == f'Error: --transfer: "{tmp_path / "none.pkl"}" is neither an existing file nor an http(s):// or file:// URL; check the path.'
    msg = invoke(f'--outdir={tmp_path / "out"}', f'--data={digits8}', f'--transfer={snapshot}', f'--resume={runs["a"]}')
    assert msg == 'Error: --transfer and --resume cannot be used together; --resume already restores the network.'
    assert not os.path.exists(tmp_path / 'out')

#----------------------------------------------------------------------------
# Options: dry run, presets, run directory names, transfer.

def dry_run(*args):
    result = CliRunner().invoke(train.main, [*args, '--dry-run'])
    assert result.exit_code == 0, result.output
    text = result.output
    options = json.loads(text[text.index('Training options:') + len('Training options:'):text.index('Run directory:')])
    return options, text

@pytest.mark.parametrize('arch,precond,model_type,net_class,loss_class', [
    ('ddpmpp', 'edm', 'SongUNet', 'EDMPrecond', 'EDMLoss'),
    ('ncsnpp', 've', 'SongUNet', 'VEPrecond', 'VELoss'),
    ('adm', 'vp', 'DhariwalUNet', 'VPPrecond', 'VPLoss'),
])
def test_dry_run_prints_presets_and_creates_nothing(tmp_path, digits8, arch, precond, model_type, net_class, loss_class):
    outdir = tmp_path / 'out'
    (outdir / '00007-old').mkdir(parents=True)
    options, text = dry_run(f'--outdir={outdir}', f'--data={digits8}', f'--arch={arch}', f'--precond={precond}', '--cond=1', '--fp16=1', '--desc=x', '--seed=3')
    assert options['run_dir'] == str(outdir / f'00008-digits8-cond-{arch}-{precond}-gpus1-batch512-fp16-x')
    assert options['network_kwargs']['class_name'] == f'training.networks.{net_class}' and options['network_kwargs']['model_type'] == model_type
    assert options['loss_kwargs']['class_name'] == f'training.loss.{loss_class}'
    assert options['network_kwargs']['augment_dim'] == 9 and options['augment_kwargs']['p'] == 0.12
    assert options['network_kwargs']['use_fp16'] is True and options['dataset_kwargs']['use_labels'] is True
    assert options['ema_rampup_ratio'] == 0.05 and options['lr_rampup_kimg'] == 10000 and options['total_kimg'] == 200000
    if arch == 'ncsnpp':
        assert options['network_kwargs']['embedding_type'] == 'fourier' and options['network_kwargs']['resample_filter'] == [1, 3, 3, 1]
    assert 'Dry run: nothing written.' in text
    assert os.listdir(outdir) == ['00007-old']

def test_transfer_and_nosubdir_options(tmp_path, runs, digits8):
    snapshot = os.path.join(runs['a'], 'network-snapshot-000002.pkl')
    options, _ = dry_run(f'--outdir={tmp_path}', f'--data={digits8}', '--cbase=32', '--cres=1,2', f'--transfer={snapshot}', '--nosubdir', '--augment=0')
    assert options['resume_pkl'] == snapshot and options['ema_rampup_ratio'] is None and options['run_dir'] == str(tmp_path)
    assert 'augment_kwargs' not in options and 'augment_dim' not in options['network_kwargs']
    options, _ = dry_run(f'--outdir={tmp_path}', f'--data={digits8}', f'--resume={runs["a"]}', '--cbase=32', '--cres=1,2', '--batch=64', '--lr_rampup=0')
    assert options['resume_state_dump'] == os.path.join(runs['a'], 'training-state-000002.pt') # The newest state of the run.
    assert options['seed'] == 1 # The resumed run's seed.

#----------------------------------------------------------------------------
# The loop's pieces, against closed forms.

def test_learning_rate_ramp_up():
    assert steps.learning_rate(1e-3, 0, 10) == 0
    assert steps.learning_rate(1e-3, 2500, 10) == pytest.approx(2.5e-4)
    assert steps.learning_rate(1e-3, 20000, 10) == 1e-3
    assert steps.learning_rate(1e-3, 64, 0) == 1e-3

def test_ema_half_life_and_ramp_up():
    net, ema = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    torch.nn.init.ones_(net.weight)
    torch.nn.init.zeros_(ema.weight)
    for step in range(5): # Half-life 50 images = 5 steps of 10: the old value keeps half its weight.
        steps.update_ema(ema, net, cur_nimg=10**9, batch_size=10, ema_halflife_kimg=0.05, ema_rampup_ratio=0.05)
    assert float(ema.weight.detach()) == pytest.approx(0.5, rel=1e-6)
    beta = steps.update_ema(ema, net, cur_nimg=100, batch_size=10, ema_halflife_kimg=0.05, ema_rampup_ratio=0.05)
    assert beta == pytest.approx(0.25) # Ramp-up: half-life min(50, 100 * 0.05) = 5 images.
    assert float(ema.weight.detach()) == pytest.approx(0.5 * 0.25 + 0.75, rel=1e-6)
    assert steps.update_ema(ema, net, cur_nimg=0, batch_size=10, ema_halflife_kimg=0.05, ema_rampup_ratio=None) == pytest.approx(0.5 ** 0.2)

def test_optimizer_step_skips_non_finite_gradients():
    net = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    opt = torch.optim.Adam(net.parameters(), lr=0.5)
    net.weight.grad = torch.tensor([[float('nan'), 1.0, -1.0, 2.0]])
    assert not torch.isfinite(steps.optimizer_step(net, opt, lr=1.0))
    assert net.weight.detach().tolist() == [[0, 0, 0, 0]] and opt.state_dict()['state'] == {} # Weights and optimizer untouched.
    net.weight.grad = torch.tensor([[0.0, 3.0, -4.0, 0.0]]) * 4
    assert float(steps.optimizer_step(net, opt, lr=1.0, loss_scaling=4)) == pytest.approx(5)
    assert net.weight.detach()[0].tolist() == pytest.approx([0, -1, 1, 0]) # Adam's first step: lr * sign (up to eps).

def test_find_latest_state(tmp_path):
    assert checkpoint.find_latest_state(str(tmp_path)) is None
    for kimg in (2, 10, 9):
        (tmp_path / f'training-state-{kimg:06d}.pt').write_bytes(b'')
    (tmp_path / 'training-state-000099.pt.tmp-1').write_bytes(b'')
    assert checkpoint.find_latest_state(str(tmp_path)) == str(tmp_path / 'training-state-000010.pt')

#----------------------------------------------------------------------------
# The loop's hooks, in-process with a tiny network.

def loop_kwargs(run_dir, digits8, **kwargs):
    return dict(dict(
        run_dir             = run_dir,
        dataset_kwargs      = dict(class_name='training.dataset.ImageFolderDataset', path=digits8, cache=True),
        data_loader_kwargs  = dict(num_workers=0),
        network_kwargs      = dict(class_name='training.networks.EDMPrecond', model_type='SongUNet', model_channels=16, channel_mult=[1], num_blocks=1, attn_resolutions=[], dropout=0.1),
        loss_kwargs         = dict(class_name='_train_helpers.HookLoss'),
        optimizer_kwargs    = dict(class_name='torch.optim.Adam', lr=1e-3),
        seed                = 5,
        batch_size          = 16,
        total_kimg          = 0.096,    # 6 steps.
        kimg_per_tick       = 0.032,    # Ticks end at steps 1, 3, 5 and 6.
        lr_rampup_kimg      = 0,
        snapshot_ticks      = 100,
        state_dump_ticks    = 100,
        device              = torch.device('cpu'),
    ), **kwargs)

def test_loop_hooks_extras_and_validation(tmp_path, digits8, one_thread):
    calls = []
    def validation_fn(net, loss_fn, cur_tick, cur_nimg, run_dir, device, save_snapshot):
        calls.append((cur_tick, cur_nimg, net.training, run_dir, str(device)))
        torch.randn([100]) # Draws must not disturb training.
        np.random.rand()
        save_snapshot('network-snapshot-val.pkl')
        return {'score': float(cur_nimg), 'image': np.zeros([4, 4, 3], dtype=np.uint8)}

    HookLoss.log.clear()
    run1 = tmp_path / 'run1'
    run1.mkdir()
    wandb_run = RecordingRun()
    run_loop(**loop_kwargs(str(run1), digits8, snapshot_extras=dict(consistency=dict(S=4)),
        validation_fn=validation_fn, val_every=2, val_at_start=True, wandb_run=wandb_run))
    log = HookLoss.log
    assert [e[1] for e in log if e[0] == 'set_progress'] == [0, 16, 32, 48, 64, 80] # Before every step, at the images seen.
    assert [e for e in log if e[0] == 'update_target'] == [('update_target', 'EDMPrecond', True)] * 6 # After every step, with the training network.
    assert [i for i, e in enumerate(log) if e[0] != 'set_progress'][:3] == [0, 2, 4] # init, then set_progress/update_target alternate.
    assert calls == [(0, 0, False, str(run1), 'cpu'), (2, 80, False, str(run1), 'cpu'), (3, 96, False, str(run1), 'cpu')]

    stats = read_stats(str(run1))
    assert [s['Progress/tick']['mean'] for s in stats] == [0, 1, 2, 3]
    assert [s.get('Validation/score', {}).get('mean') for s in stats] == [0.0, None, 80.0, 96.0] # The start's figure joins tick 0.
    import wandb # pylint: disable=import-outside-toplevel
    assert [logged['Progress/kimg'] for _, logged in wandb_run.logged] == pytest.approx([0.016, 0.048, 0.08, 0.096])
    for (_, logged), line in zip(wandb_run.logged, stats):
        assert {k: v for k, v in logged.items() if k != 'Validation/image'} == {k: v['mean'] for k, v in line.items() if k != 'timestamp'}
    assert [isinstance(logged.get('Validation/image'), wandb.Image) for _, logged in wandb_run.logged] == [True, False, True, True]
    with open(run1 / 'network-snapshot-000000.pkl', 'rb') as f:
        snapshot = pickle.load(f)
    assert sorted(snapshot) == ['augment_pipe', 'consistency', 'dataset_kwargs', 'ema', 'loss_fn']
    assert snapshot['consistency'] == dict(S=4) and snapshot['loss_fn'].updates == 6 and snapshot['augment_pipe'] is None
    assert os.path.isfile(run1 / 'network-snapshot-val.pkl')
    state1 = torch.load(run1 / 'training-state-000000.pt', weights_only=False)
    assert state1['loss_state'] == dict(updates=6) and state1['cur_nimg'] == 96 and state1['cur_tick'] == 3

    # Without validation the training is the same to the bit: validation's draws are isolated.
    run2 = tmp_path / 'run2'
    run2.mkdir()
    run_loop(**loop_kwargs(str(run2), digits8, snapshot_extras=lambda net, ema, loss_fn, cur_nimg: dict(nimg=cur_nimg)))
    state2 = torch.load(run2 / 'training-state-000000.pt', weights_only=False)
    assert all(torch.equal(state1['net'][k], state2['net'][k]) for k in state1['net'])
    assert all(torch.equal(state1['ema'][k], state2['ema'][k]) for k in state1['ema'])
    with open(run2 / 'network-snapshot-000000.pkl', 'rb') as f:
        assert pickle.load(f)['nimg'] == 96

    # Resume: the loss gets its state back and the progress continues.
    HookLoss.log.clear()
    run3 = tmp_path / 'run3'
    run3.mkdir()
    VALIDATION_CALLS.clear()
    run_loop(**loop_kwargs(str(run3), digits8, total_kimg=0.128, resume_state_dump=str(run1 / 'training-state-000000.pt'),
        validation_fn=dict(func_name='_train_helpers.record_validation', tag='x'), val_every=1))
    assert VALIDATION_CALLS == [('x', 4, 128, False)] # Ticks continue after the state's tick 3.
    assert read_stats(str(run3))[-1]['Validation/calls']['mean'] == 1
    assert ('load_state_dict', dict(updates=6)) in HookLoss.log
    assert [e[1] for e in HookLoss.log if e[0] == 'set_progress'] == [96, 112]
    assert torch.load(run3 / 'training-state-000000.pt', weights_only=False)['loss_state'] == dict(updates=8)

def test_loop_refuses_a_batch_that_does_not_divide(tmp_path, digits8):
    with pytest.raises(ValueError, match=r'^--batch=10 gives 10 images per rank, which --batch-gpu=4 does not divide; pass a --batch that is a multiple of 4\.$'):
        run_loop(**loop_kwargs(str(tmp_path), digits8, batch_size=10, batch_gpu=4))

#----------------------------------------------------------------------------

"""train.py --consistency=True on the CPU: a teacher written by train.py is
distilled into a 4-step student on the 8x8 digits; the student snapshot is
sampled by generate.py without sampler flags; a resumed distillation is
bit-identical to an uninterrupted one; the statistics of cd-spec section 7
reach stats.jsonl; every bad input stops with one sentence before any work.

The runs use one OpenMP thread per process, to stay fast on a shared 2-core
machine."""

import builtins
import collections
import io
import json
import os
import pickle

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

import generate
import train
from _train_helpers import SMALL_RUN, TINY_ARCH, finish, interrupted_runs, invoke, read_stats, start_train, tensors_equal
from _train_helpers import run_loop
from training import checkpoint
from training import samplers
from training.networks import EDMPrecond

TEACHER_ARCH = TINY_ARCH
CD_RUN = [*TEACHER_ARCH, *SMALL_RUN, '--batch=32', '--lr_rampup=1', '--consistency=True', '--S=4', '--T_start=8', '--T_end=16', '--T_anneal_kimg=2']
RUN_NAME = 'digits8-uncond-ddpmpp-edm-gpus1-batch32-fp32-cd4'

#----------------------------------------------------------------------------
# Fixtures: three distillation runs of the shared teacher (conftest.py).

@pytest.fixture(scope='module')
def runs(tmp_path_factory, digits8, teacher):
    """A: 2 kimg of distillation, uninterrupted. B: the same, stopped at 1 kimg. C: B resumed to 2 kimg."""
    outdirs = (str(tmp_path_factory.mktemp(name)) for name in ('cd_a', 'cd_bc'))
    return interrupted_runs(*outdirs, [f'--data={digits8}', f'--teacher={teacher}', *CD_RUN])

def load_pickle(path):
    with open(path, 'rb') as f:
        return pickle.load(f)

#----------------------------------------------------------------------------
# The distillation run and its student snapshot.

def test_distillation_writes_a_student_snapshot(runs, teacher):
    run_dir = runs['a']
    assert os.path.basename(run_dir) == f'00000-{RUN_NAME}'
    assert sorted(os.listdir(run_dir)) == ['log.txt', *[f'network-snapshot-00000{k}.{ext}' for k in range(3) for ext in ('pkl', 'safetensors')],
        'stats.jsonl', 'training-state-000001.pt', 'training-state-000002.pt', 'training_options.json']
    with open(os.path.join(run_dir, 'training_options.json')) as f:
        options = json.load(f)
    assert options['teacher_pkl'] == teacher and options['resume_pkl'] == teacher # The student starts from the teacher.
    assert options['loss_kwargs'] == dict(class_name='training.loss_cd.ConsistencyDistillLoss', S=4, T_start=8, T_end=16, T_anneal_kimg=2.0,
        T_anneal='geometric', rho=7.0, sigma_min=0.002, sigma_max=80.0, student_sigmas='karras', sampling_mode='vp', terminal_anchor=True,
        terminal_prob=None, terminal_teacher_hop=False, target_mode='ema', target_ema=0.95, sync_dropout=True, loss='pseudo_huber',
        huber_c=None, weight_mode='sqrt_karras', teacher_hop='heun', ct=False)
    assert 'Distillation:     S=4 student of' in runs['out_a'] and 'Loading the teacher' in runs['out_a']

    teacher_net = load_pickle(teacher)['ema']
    first, last = load_pickle(os.path.join(run_dir, 'network-snapshot-000000.pkl')), load_pickle(os.path.join(run_dir, 'network-snapshot-000002.pkl'))
    assert sorted(last) == ['augment_pipe', 'consistency', 'dataset_kwargs', 'ema', 'loss_fn']
    expected = samplers.student_sigmas(4, layout='karras').tolist() # 80, the two interior Karras nodes, 0.002, 0.
    assert last['consistency']['S'] == 4 and last['consistency']['student_sigmas'] == pytest.approx(expected, rel=1e-12)
    assert last['consistency']['student_sigmas'][-1] == 0 and len(last['consistency']['student_sigmas']) == 5
    loss_kwargs = dict(options['loss_kwargs'])
    assert type(last['ema']).__name__ == 'EDMPrecond' and last['loss_fn'] == dict(class_name=loss_kwargs.pop('class_name'), init_args=[], init_kwargs=loss_kwargs) # Plain data, no teacher.
    code_free = checkpoint.load_snapshot(os.path.join(run_dir, 'network-snapshot-000002.safetensors')) # The same student, without unpickling.
    assert tensors_equal(code_free['ema'].state_dict(), last['ema'].state_dict()) and code_free['consistency'] == last['consistency']
    assert code_free['loss_fn'] == last['loss_fn']

    # The first step has learning rate 0 (--lr_rampup): the student's EMA is still the teacher, bit for bit. Then it trains.
    assert tensors_equal(first['ema'].state_dict(), teacher_net.state_dict())
    assert not tensors_equal(last['ema'].state_dict(), teacher_net.state_dict())

def test_generate_samples_the_student_with_no_sampler_flags(runs, tmp_path, monkeypatch):
    pkl = os.path.join(runs['a'], 'network-snapshot-000002.pkl')
    sigmas_seen = []
    load_snapshot = checkpoint.load_snapshot
    def load_counting(path):
        data = load_snapshot(path)
        data['ema'].register_forward_pre_hook(lambda _module, args: sigmas_seen.append(torch.as_tensor(args[1]).flatten().tolist()))
        return data
    monkeypatch.setattr(checkpoint, 'load_snapshot', load_counting)
    result = CliRunner().invoke(generate.main, [f'--network={pkl}', f'--outdir={tmp_path / "out"}', '--seeds=0-9', '--batch=5', '--device=cpu'])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert 'student sampler, S=4' in result.output
    sigmas = load_pickle(pkl)['consistency']['student_sigmas']
    assert len(sigmas_seen) == 2 * 4 # Two batches, S network evaluations each,
    for step, seen in enumerate(sigmas_seen): # ... at the student's sigmas (not EDM's 18-step Heun grid).
        assert seen == pytest.approx([sigmas[step % 4]] * len(seen), rel=1e-6)
    assert sorted(os.listdir(tmp_path / 'out')) == [f'{seed:06d}.png' for seed in range(10)]
    images = np.stack([np.asarray(PIL.Image.open(tmp_path / 'out' / f'{seed:06d}.png')) for seed in range(10)])
    assert images.shape == (10, 8, 8) and images.dtype == np.uint8 and images.std() > 0

#----------------------------------------------------------------------------
# Statistics of cd-spec section 7.

def test_stats_jsonl_holds_the_distillation_statistics(runs):
    stats = read_stats(runs['a'])
    assert [s['Progress/kimg']['mean'] for s in stats] == pytest.approx([0.032, 1.056, 2.016]) # Ticks end after 1 step, after >= 1 kimg, and at >= 2000 images.
    steps = [1, 32, 30]
    names = ['CD/loss', 'CD/T', 'CD/T_nominal', 'Loss/grad_norm', 'Progress/lr']
    names += [f'CD/{kind}_{case}' for kind in ('loss', 'frac') for case in ('terminal', 'boundary', 'general')]
    names += [f'CD/loss_seg{j}' for j in range(4)]
    names += [f'CD/gain_{stat}{suffix}' for stat in ('mean', 'max', 'p95', 'p99') for suffix in ('', '_boundary', '_general')]
    for s, num_steps in zip(stats, steps):
        missing = [name for name in names if name not in s]
        assert not missing, missing
        assert s['CD/loss']['num'] == 32 * num_steps and s['Loss/loss']['num'] == 32 * num_steps * 64 # Per image; per pixel.
        assert s['CD/loss']['mean'] == pytest.approx(64 * s['Loss/loss']['mean'], rel=1e-5) # pseudo_huber: the loop's figure is the per-image loss / 64.
        assert sum(s[f'CD/frac_{case}']['mean'] for case in ('terminal', 'boundary', 'general')) == pytest.approx(1, abs=1e-12)
        assert s['CD/gain_mean']['mean'] >= 1 and s['CD/T']['mean'] >= s['CD/T_nominal']['mean']
    for s in stats[1:]: # The karras layout's last segment holds only the terminal edge.
        assert s['CD/loss_seg3']['mean'] == pytest.approx(s['CD/loss_terminal']['mean'], rel=1e-12)

    # T anneals geometrically from 8 to 16 over 2 kimg, as a function of the images seen before each step.
    def T_at(nimg):
        return int(np.clip(round(8 * 2 ** (nimg / 2000)), 8, 16))
    first_nimg = [0, 32, 1056]
    for s, nimg0, num_steps in zip(stats, first_nimg, steps):
        assert s['CD/T_nominal']['mean'] == pytest.approx(np.mean([T_at(nimg0 + 32 * i) for i in range(num_steps)]), rel=1e-12)
    assert stats[0]['CD/T_nominal']['mean'] == 8 and stats[0]['Progress/lr']['mean'] == 0

#----------------------------------------------------------------------------
# Exact resume.

def test_resumed_distillation_is_bit_identical(runs):
    assert os.path.basename(runs['b']) == f'00000-{RUN_NAME}-b' and os.path.basename(runs['c']) == f'00001-{RUN_NAME}-c'
    assert 'Loading the teacher' in runs['out_c'] and 'Continuing from the training state' in runs['out_c']
    b = torch.load(os.path.join(runs['b'], 'training-state-000001.pt'), weights_only=False)
    a = torch.load(os.path.join(runs['a'], 'training-state-000002.pt'), weights_only=False)
    c = torch.load(os.path.join(runs['c'], 'training-state-000002.pt'), weights_only=False)
    assert b['cur_nimg'] == 1024 and a['cur_nimg'] == c['cur_nimg'] == 2016
    assert tensors_equal(a['net'], c['net']) and tensors_equal(a['ema'], c['ema'])
    assert not tensors_equal(a['net'], b['net']) # The second half did train.
    opt_a, opt_c = a['optimizer_state'], c['optimizer_state']
    assert opt_a['param_groups'] == opt_c['param_groups'] and opt_a['state'].keys() == opt_c['state'].keys()
    for idx in opt_a['state']:
        assert tensors_equal(opt_a['state'][idx], opt_c['state'][idx]), idx
    loss_a, loss_c = a['loss_state'], c['loss_state']
    assert loss_a['cur_nimg'] == loss_c['cur_nimg'] == 1984 # Set before the last step.
    assert loss_a['target'] is not None and tensors_equal(loss_a['target'], loss_c['target']) # The fast target EMA.
    assert not tensors_equal(loss_a['target'], a['net'])
    assert torch.equal(a['rng_states'][0]['torch'], c['rng_states'][0]['torch'])

#----------------------------------------------------------------------------
# The loop's teacher hook, in-process.

def test_loop_attaches_the_frozen_teacher_in_the_students_precision(tmp_path, digits8, teacher):
    seen = []
    def extras(loss_fn, **_kwargs):
        t = loss_fn.teacher
        seen.append((type(t).__name__, type(t.net).__name__, t.precision, t.training, any(p.requires_grad for p in t.parameters()), t.use_fp16))
        return {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_loop(run_dir=str(tmp_path), dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=digits8),
            data_loader_kwargs=dict(num_workers=0), network_kwargs=dict(class_name='training.networks.EDMPrecond', model_type='SongUNet',
            model_channels=16, channel_mult=[1], num_blocks=1, use_fp16=True), loss_kwargs=dict(class_name='training.loss_cd.ConsistencyDistillLoss',
            S=2, T_start=4, T_end=4), optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3), batch_size=8, total_kimg=0.008,
            teacher_pkl=teacher, snapshot_extras=extras, state_dump_ticks=None, device=torch.device('cpu'))
    finally:
        torch.set_num_threads(threads)
    assert load_pickle(teacher)['ema'].use_fp16 is False
    assert seen == [('Teacher', 'EDMPrecond', 'fp16', False, False, True)] # Frozen, and in fp16 like the student (which takes effect on CUDA).
    assert load_pickle(tmp_path / 'network-snapshot-000000.pkl')['consistency']['S'] == 2
    with pytest.raises(ValueError, match=r'^teacher_pkl=".*" was given, but the loss EDMLoss takes no teacher; use a loss with set_teacher\(\) or leave teacher_pkl out\.$'):
        run_loop(run_dir=str(tmp_path), dataset_kwargs=dict(class_name='training.dataset.ImageFolderDataset', path=digits8),
            data_loader_kwargs=dict(num_workers=0), network_kwargs=dict(class_name='training.networks.EDMPrecond', model_type='SongUNet',
            model_channels=16, channel_mult=[1], num_blocks=1), loss_kwargs=dict(class_name='training.loss.EDMLoss'),
            optimizer_kwargs=dict(class_name='torch.optim.Adam', lr=1e-3), batch_size=8, total_kimg=0.008, teacher_pkl=teacher, device=torch.device('cpu'))

#----------------------------------------------------------------------------
# Options (dry runs).

def dry_run(*args):
    result = CliRunner().invoke(train.main, [*args, '--dry-run'])
    assert result.exit_code == 0, result.output
    text = result.output
    return json.loads(text[text.index('Training options:') + len('Training options:'):text.index('Run directory:')]), text

def test_defaults_and_student_start(tmp_path, digits8, teacher):
    base = [f'--outdir={tmp_path}', f'--data={digits8}', '--consistency=True', f'--teacher={teacher}']
    options, text = dry_run(*base, *TEACHER_ARCH)
    loss = options['loss_kwargs']
    assert (loss['S'], loss['T_start'], loss['T_end'], loss['T_anneal_kimg'], loss['T_anneal']) == (8, 64, 1280, 10000, 'geometric')
    assert (loss['loss'], loss['weight_mode'], loss['sampling_mode'], loss['terminal_anchor'], loss['target_mode'], loss['target_ema']) == ('pseudo_huber', 'sqrt_karras', 'vp', True, 'ema', 0.95)
    assert (loss['student_sigmas'], loss['sync_dropout'], loss['terminal_teacher_hop'], loss['huber_c']) == ('karras', True, False, None)
    assert (loss['rho'], loss['sigma_min'], loss['sigma_max']) == (7, 0.002, 80)
    assert options['teacher_pkl'] == teacher and options['resume_pkl'] == teacher and options['ema_rampup_ratio'] == 0.05
    assert options['run_dir'].endswith('-fp32-cd8') and 'starting from the teacher' in text
    assert not os.listdir(tmp_path)

    options, _ = dry_run(*base, *TEACHER_ARCH, '--S=4', '--student_sigmas=2.5, 0.5,0.1', '--sampling_mode=uniform', '--cd_loss=l2',
        '--cd_huber_c=0.1', '--cd_weight_mode=snr', '--cd_target_mode=live', '--no_sync_dropout', '--terminal_teacher_hop', '--T_anneal=linear')
    loss = options['loss_kwargs']
    assert loss['student_sigmas'] == [2.5, 0.5, 0.1] and loss['terminal_anchor'] is False # Off by default for uniform.
    assert (loss['loss'], loss['huber_c'], loss['weight_mode'], loss['target_mode'], loss['sync_dropout'], loss['terminal_teacher_hop'], loss['T_anneal']) == \
        ('l2', 0.1, 'snr', 'live', False, True, 'linear')
    options, _ = dry_run(*base, *TEACHER_ARCH, '--sampling_mode=uniform', '--terminal_anchor', '--terminal_prob=0.2')
    assert options['loss_kwargs']['terminal_anchor'] is True and options['loss_kwargs']['terminal_prob'] == 0.2

    # A random start frees the architecture; --transfer starts the student from another snapshot.
    options, text = dry_run(*base, '--student_init=random', '--cbase=32', '--cres=1,2', '--precond=vp')
    assert 'resume_pkl' not in options and options['network_kwargs']['model_channels'] == 32 and 'starting from random' in text
    options, _ = dry_run(*base, *TEACHER_ARCH, f'--transfer={teacher}')
    assert options['resume_pkl'] == teacher and options['ema_rampup_ratio'] is None

#----------------------------------------------------------------------------
# Bad input: one sentence each, before any work.

def image_folder(path, resolution, channels):
    path.mkdir()
    for idx in range(4):
        shape = [resolution, resolution] + ([channels] if channels > 1 else [])
        PIL.Image.fromarray(np.full(shape, idx * 60, dtype=np.uint8)).save(path / f'img{idx}.png')
    return str(path)

def test_bad_teacher_files_and_flags(tmp_path, digits8, teacher, runs):
    out = tmp_path / 'out'
    base = [f'--outdir={out}', f'--data={digits8}', *TEACHER_ARCH, '--consistency=True']
    assert invoke(*base) == 'Error: --consistency=True needs a teacher to distil; pass --teacher with a network snapshot (path or URL), or --ct=True to train without one.'
    missing = str(tmp_path / 'none.pkl')
    msg = invoke(*base, f'--teacher={missing}')
    assert msg == f'Error: --teacher: "{missing}" is neither an existing file nor an http(s):// or file:// URL; check the path.'
    state = os.path.join(runs['a'], 'training-state-000002.pt') # A zip archive, not a pickle.
    assert 'cannot be loaded as a network snapshot' in invoke(*base, f'--teacher={state}')
    no_ema = tmp_path / 'no_ema.pkl'
    no_ema.write_bytes(pickle.dumps(dict(net=None)))
    assert invoke(*base, f'--teacher={no_ema}') == f'Error: --teacher: "{no_ema}" is not a network snapshot (no network under "ema"); pass a network-snapshot-*.pkl or its URL.'

    # Options of distillation without --consistency=True.
    plain = [f'--outdir={out}', f'--data={digits8}']
    assert invoke(*plain, '--S=4') == 'Error: --S applies only to consistency distillation; pass --consistency=True or leave it out.'
    assert invoke(*plain, f'--teacher={teacher}') == 'Error: --teacher applies only to consistency distillation; pass --consistency=True or leave it out.'
    assert invoke(*plain, '--no_terminal_anchor').startswith('Error: --no_terminal_anchor applies only to consistency distillation;')

    # Probabilities, grids and segments.
    base.append(f'--teacher={teacher}')
    for value in ('0', '1', '1.5', '-0.1'):
        assert invoke(*base, f'--terminal_prob={value}') == f'Error: --terminal_prob={float(value):g} is outside (0, 1); pass a probability strictly between 0 and 1, or leave it out for 1/T\'.'
    assert invoke(*base, '--terminal_prob=0.1', '--no_terminal_anchor').startswith('Error: --terminal_prob=0.1 needs the terminal anchor, which is off here')
    msg = invoke(*base, '--S=8', '--T_start=4')
    assert msg.startswith('Error: With S=8, T=4 (teacher grid [') and 'hold no teacher edge; raise T (T_start) or spread the student sigmas further apart.' in msg
    msg = invoke(*base, '--S=3', '--student_sigmas=1.0,0.9999', '--T_start=64')
    assert msg.startswith('Error: With S=3, T=64 (') and 'segment(s) [1] hold no teacher edge' in msg
    assert invoke(*base, '--S=4', '--student_sigmas=1,0.5') == 'Error: 2 interior sigmas were given for S=4; give exactly S - 1 = 3.'
    assert invoke(*base, '--student_sigmas=karas').startswith('Error: --student_sigmas=karas is neither karras, karras_open nor a comma-separated list of numbers;')
    assert invoke(*base, f'--transfer={teacher}', '--student_init=teacher') == \
        'Error: --transfer and --student_init=teacher both choose the weights the student starts from; pass only one of them.'
    assert not os.path.exists(out)

def test_teacher_that_does_not_match_the_data_or_the_student(tmp_path, digits8, teacher, runs):
    out = tmp_path / 'out'
    cd = ['--consistency=True', f'--teacher={teacher}']
    data16 = image_folder(tmp_path / 'gray16', 16, 1)
    assert invoke(f'--outdir={out}', f'--data={data16}', *TEACHER_ARCH, *cd) == \
        f'Error: The teacher "{teacher}" works on 8x8 images, but {data16} holds 16x16 images; pass --data at the teacher\'s resolution.'
    rgb8 = image_folder(tmp_path / 'rgb8', 8, 3)
    assert invoke(f'--outdir={out}', f'--data={rgb8}', *TEACHER_ARCH, *cd) == \
        f'Error: The teacher "{teacher}" works on 1-channel images, but {rgb8} holds 3-channel images; pass --data with the teacher\'s channels.'
    assert invoke(f'--outdir={out}', f'--data={digits8}', '--cond=True', *TEACHER_ARCH, *cd) == \
        f'Error: The teacher "{teacher}" is unconditional, but this run has --cond=True; pass --cond=False.'
    cond_teacher = str(tmp_path / 'cond.pkl')
    net = EDMPrecond(img_resolution=8, img_channels=1, label_dim=10, model_type='SongUNet', model_channels=16, channel_mult=[1], num_blocks=1)
    with open(cond_teacher, 'wb') as f:
        pickle.dump(dict(ema=net), f)
    assert invoke(f'--outdir={out}', f'--data={digits8}', *TEACHER_ARCH, '--consistency=True', f'--teacher={cond_teacher}') == \
        f'Error: The teacher "{cond_teacher}" is conditioned on 10 classes, but this run is unconditional; pass --cond=True with a dataset of 10 classes.'

    # The student starts from the teacher: same class, names and shapes.
    fix = 'pass the teacher\'s architecture options (--arch, --precond, --cbase, --cres, --cond, --augment) or --student_init=random.'
    base = [f'--outdir={out}', f'--data={digits8}', *cd]
    msg = invoke(*base, '--cbase=32', '--cres=1', '--augment=0')
    assert msg == f'Error: The teacher "{teacher}" holds "model.map_layer0.weight" with shape [64, 16], but the network here has shape [128, 32]; {fix}'
    assert invoke(*base, '--cbase=16', '--cres=1') == f'Error: The teacher "{teacher}" lacks "model.map_augment.weight", which the network here has; {fix}'
    assert invoke(*base, *TEACHER_ARCH, '--precond=vp') == f'Error: The teacher "{teacher}" is of class EDMPrecond, but the student would be of class VPPrecond; {fix}'

    # A resumed run keeps the student grid.
    msg = invoke(*base, *TEACHER_ARCH, '--S=2', '--duration=1', f'--resume={runs["b"]}')
    assert msg.startswith('Error: The --resume state "') and 'belongs to a run with other settings (' in msg and 'loss_kwargs.S 4 -> 2' in msg
    assert msg.endswith('; resume with the options of the run that wrote it, or start a new run from one of its snapshots with --transfer.')
    assert not os.path.exists(out)

#----------------------------------------------------------------------------

#----------------------------------------------------------------------------
# Each file a run starts from is read once per process.

def test_teacher_transfer_and_state_files_are_read_once(tmp_path, digits8, teacher, runs, monkeypatch):
    transfer = os.path.join(runs['a'], 'network-snapshot-000001.pkl')
    state = os.path.join(runs['b'], 'training-state-000001.pt')
    opened = collections.Counter()
    real_open = builtins.open
    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened[os.path.realpath(file)] += 1
        return real_open(file, *args, **kwargs)
    monkeypatch.setattr(builtins, 'open', counting_open)
    monkeypatch.setattr(io, 'open', counting_open)
    base = [f'--data={digits8}', f'--teacher={teacher}', *CD_RUN, '--snap=1000', '--dump=1000']
    for args, files in [
        (['--duration=0.001'], [teacher]),                                # The student starts from the teacher: one file, one read.
        ([f'--transfer={transfer}', '--duration=0.001'], [teacher, transfer]),
        (['--ct=True', f'--transfer={transfer}', '--duration=0.001'], [teacher, transfer]), # Tuning: built like it.
        ([f'--resume={state}', '--duration=0.002'], [teacher, state]),
    ]:
        opened.clear()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            result = CliRunner().invoke(train.main, [f'--outdir={tmp_path / "out"}', *base, *args])
        finally:
            torch.set_num_threads(threads)
        assert result.exit_code == 0, result.output + repr(result.exception)
        assert [opened[os.path.realpath(path)] for path in files] == [1] * len(files), (args, opened)

def test_resume_refuses_changes_that_break_the_run_and_logs_the_others(tmp_path, digits8, teacher, runs):
    base = [f'--outdir={tmp_path / "out"}', f'--data={digits8}', f'--teacher={teacher}', *CD_RUN, f'--resume={runs["b"]}']
    other_teacher = str(tmp_path / 'teacher2.pkl')
    data = load_pickle(teacher)
    with torch.no_grad():
        next(data['ema'].parameters()).add_(1) # Same architecture, other weights.
    with open(other_teacher, 'wb') as f:
        pickle.dump(data, f)
    for args, change in [
        ([f'--teacher={other_teacher}'], 'the teacher (its weights differ)'),
        (['--cd_loss=l2'], "loss_kwargs.loss 'pseudo_huber' -> 'l2'"),
        (['--cd_target_mode=live'], "loss_kwargs.target_mode 'ema' -> 'live'"),
        (['--T_end=32'], 'loss_kwargs.T_end 16 -> 32'),
        (['--seed=5'], 'seed 1 -> 5'),
    ]:
        msg = invoke(*base, '--duration=0.002', *args)
        assert 'belongs to a run with other settings (' in msg and change in msg and msg.endswith('with --transfer.'), msg
    assert not os.path.exists(tmp_path / 'out')

    # Duration and validation may change: the run goes on, and the log says what changed.
    res = finish(start_train(f'--outdir={tmp_path / "ok"}', f'--data={digits8}', f'--teacher={teacher}', *CD_RUN, f'--resume={runs["b"]}',
        '--duration=0.003', '--val=1', '--val_detector=pixels', '--val_num=0', '--val_agree_num=8', '--val_batch=8', '--val_every=10'))
    assert res[0] == 0, res[2][-3000:]
    assert 'Resuming with total_kimg changed from 1 to 3 (the run stays one run).' in res[1]
    assert "Resuming with validation_fn.func_name changed from None to 'training.validation.validate'" in res[1]

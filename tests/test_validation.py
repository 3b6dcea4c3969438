"""training/validation.py: the figures against an independent computation
(per-seed sampling, numpy statistics, scipy's matrix square root), the
history (teacher once, best snapshot, cached reference, resume), the
training loop calling it, 2 gloo ranks against 1, and bad input."""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch

from _train_helpers import ROOT, read_stats, subprocess_env
from _train_helpers import run_loop
from _val_worker import LABEL_DIM, NET_KWARGS, VAL_KWARGS, make_loss, make_net, write_dataset
from training import metrics, precision, samplers, training_loop, validation
from training.loss import EDMLoss

pytestmark = pytest.mark.usefixtures('one_thread')

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp('data') / 'quadrants')

def run(net, loss_fn, run_dir, saved=None, cur_tick=0, cur_nimg=0, **kwargs):
    """validate() in this process, with the shared options; snapshot names go to `saved`."""
    kwargs = {**VAL_KWARGS, 'batch': 32, **kwargs}
    saved = [] if saved is None else saved
    return validation.validate(net, loss_fn, cur_tick=cur_tick, cur_nimg=cur_nimg, run_dir=None if run_dir is None else str(run_dir),
        device=torch.device('cpu'), save_snapshot=saved.append, **kwargs)

def history(run_dir):
    with open(os.path.join(run_dir, validation.HISTORY_FILE)) as f:
        return [json.loads(line) for line in f]

#----------------------------------------------------------------------------
# A second implementation of what validation computes.

def latent_and_label(i, seed=VAL_KWARGS['seed']):
    latent = torch.randn([1, 8, 8], generator=torch.Generator().manual_seed(seed + i))[None].to(torch.float64)
    label = torch.zeros([1, LABEL_DIM])
    label[0, i % LABEL_DIM] = 1
    return latent, label

def student_images(net, sigmas, num):
    """The S-step student, one seed at a time, written out: x <- x_hat + s_next / s (x - x_hat)."""
    out = []
    with torch.no_grad():
        for i in range(num):
            latent, label = latent_and_label(i)
            x = latent * sigmas[0]
            for s, s_next in zip(sigmas[:-1], sigmas[1:]):
                x_hat = net(x, s, label).to(torch.float64)
                x = x_hat if s_next == 0 else x_hat + s_next / s * (x - x_hat)
            out.append(x[0].numpy())
    return np.clip(np.stack(out), -1, 1)

def heun_images(net, num, steps=VAL_KWARGS['heun_steps']):
    out = []
    with torch.no_grad():
        for i in range(num):
            latent, label = latent_and_label(i)
            out.append(samplers.edm_sampler(net, latent, label, num_steps=steps)[0].numpy())
    return np.clip(np.stack(out), -1, 1)

def pixel_features(images_float):
    """The pixel detector on 8x8 grayscale: no pooling, uint8 pixels scaled to [-1, 1]."""
    u8 = np.clip(images_float * 127.5 + 128, 0, 255).astype(np.uint8)
    return u8.reshape(len(u8), -1) / 127.5 - 1

def dataset_features(data_dir):
    names = sorted(n for n in os.listdir(data_dir) if n.endswith('.png'))
    return np.stack([np.asarray(PIL.Image.open(os.path.join(data_dir, n))) for n in names]).reshape(len(names), -1) / 127.5 - 1

def fd_sqrtm(a, b):
    """Fréchet distance of two feature sets with numpy statistics and scipy.linalg.sqrtm."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(np.square(mu_a - mu_b).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))

#----------------------------------------------------------------------------

def test_figures_match_an_independent_computation(tmp_path, data_dir):
    teacher, student = make_net(1), make_net(2)
    loss_fn = make_loss(teacher)
    figures = run(student, loss_fn, tmp_path, ref_data=data_dir)
    assert sorted(figures) == ['agree_psnr', 'agree_rmse', 'fd_pixels', 'samples', 'sec', 'teacher_fd_pixels']

    num, agree_num = VAL_KWARGS['num'], VAL_KWARGS['agree_num']
    ref = dataset_features(data_dir)
    s_img = student_images(student, loss_fn.student_sigmas(), num)
    t_img = heun_images(teacher, num)
    assert figures['fd_pixels'] == pytest.approx(fd_sqrtm(pixel_features(s_img), ref), rel=1e-6)
    assert figures['teacher_fd_pixels'] == pytest.approx(fd_sqrtm(pixel_features(t_img), ref), rel=1e-6)
    assert abs(figures['fd_pixels'] - figures['teacher_fd_pixels']) > 1 # The two are not the same figure.
    mse = np.mean(np.square(s_img[:agree_num] - t_img[:agree_num]))
    assert figures['agree_rmse'] == pytest.approx(np.sqrt(mse), rel=1e-6)
    assert figures['agree_psnr'] == pytest.approx(10 * np.log10(4 / mse), rel=1e-6)

    # The reference statistics kept in the run directory are those of the dataset.
    name = validation.ref_file_name('pixels', data_dir)
    cached = metrics.load_ref_stats(str(tmp_path / name))
    assert cached.detector == 'pixels' and np.allclose(cached.mu, ref.mean(0), atol=1e-12) and np.allclose(cached.sigma, np.cov(ref, rowvar=False), atol=1e-12)

    # The grid holds the first grid_num student images, row by row (4 columns for 10 images).
    grid = figures['samples']
    assert grid.dtype == np.uint8 and grid.shape == (24, 32, 1)
    u8 = np.clip(s_img * 127.5 + 128, 0, 255).astype(np.uint8)
    for i in range(12):
        cell = grid[(i // 4) * 8 : (i // 4 + 1) * 8, (i % 4) * 8 : (i % 4 + 1) * 8, 0]
        assert np.array_equal(cell, u8[i, 0] if i < 10 else np.zeros([8, 8], np.uint8))

    # Without the teacher's figure the others stay the same (the teacher's agreement images are kept in memory).
    figures = run(student, loss_fn, None, ref_data=data_dir, teacher=False, grid_num=0)
    assert sorted(figures) == ['agree_psnr', 'agree_rmse', 'fd_pixels', 'sec'] and figures['agree_rmse'] == pytest.approx(np.sqrt(mse), rel=1e-6)

    # Agreement alone needs neither detector nor reference.
    figures = run(student, loss_fn, None, num=0, detector='/no/such/detector.pkl', grid_num=0)
    assert sorted(figures) == ['agree_psnr', 'agree_rmse', 'sec'] and figures['agree_rmse'] == pytest.approx(np.sqrt(mse), rel=1e-6)

def test_edm_training_is_validated_with_heun_without_agreement(tmp_path, data_dir):
    net = make_net(1)
    saved = []
    figures = run(net, EDMLoss(), tmp_path, saved, ref_data=data_dir, grid_num=0)
    assert sorted(figures) == ['fd_pixels', 'sec'] and saved == [validation.BEST_SNAPSHOT]
    assert figures['fd_pixels'] == pytest.approx(fd_sqrtm(pixel_features(heun_images(net, VAL_KWARGS['num'])), dataset_features(data_dir)), rel=1e-6)
    assert history(tmp_path)[0]['sampler'] == 'heun, 4 steps'

def test_non_finite_samples_are_reported_as_such(tmp_path, data_dir):
    net = make_net(1)
    with torch.no_grad():
        next(net.parameters()).fill_(float('nan')) # A diverged network.
    saved = []
    figures = run(net, EDMLoss(), tmp_path, saved, ref_data=data_dir, grid_num=0)
    assert figures['nonfinite_frac'] == 1 and np.isnan(figures['fd_pixels']) and saved == [] # No best snapshot of it.

def test_history_teacher_once_best_snapshot_and_resume(tmp_path, data_dir, monkeypatch):
    teacher = make_net(1)
    loss_fn = make_loss(teacher)
    run_a, run_b, run_c = tmp_path / 'a', tmp_path / 'b', tmp_path / 'c'
    for d in (run_a, run_b, run_c):
        d.mkdir()
    saved = []
    first = run(make_net(2), loss_fn, run_a, saved, cur_tick=0, cur_nimg=0, ref_data=data_dir)
    assert saved == [validation.BEST_SNAPSHOT]

    # Later calls reuse the cached reference and skip the teacher; a snapshot is kept only when it beats all earlier ones.
    def no_recompute(*args, **kwargs):
        raise AssertionError('the reference statistics were computed again')
    monkeypatch.setattr(metrics, 'compute_dataset_stats', no_recompute)
    saved.clear()
    same = run(make_net(2), loss_fn, run_a, saved, cur_tick=2, cur_nimg=200, ref_data=data_dir)
    assert 'teacher_fd_pixels' not in same and same['fd_pixels'] == first['fd_pixels'] and saved == [] # Equal is not better.
    other = run(make_net(3), loss_fn, run_a, saved, cur_tick=4, cur_nimg=400, ref_data=data_dir)
    better = other['fd_pixels'] < first['fd_pixels']
    assert saved == ([validation.BEST_SNAPSHOT] if better else [])

    lines = history(run_a)
    assert [(e['tick'], e['kimg']) for e in lines] == [(0, 0.0), (2, 0.2), (4, 0.4)]
    assert [e['best'] for e in lines] == [True, False, better]
    assert lines[0]['figures'] == {k: v for k, v in first.items() if k != 'samples'}
    assert lines[0]['sampler'] == 'student, S=2' and lines[0]['detector'] == 'pixels' and lines[0]['num'] == 96 and lines[0]['agree_num'] == 16
    assert lines[0]['time_start'] <= lines[0]['time_end'] <= lines[1]['time_start']

    # Resume into another run directory: the earlier history counts, the reference is copied over, not recomputed.
    saved.clear()
    resumed = run(make_net(2), loss_fn, run_b, saved, ref_data=data_dir, resume_dir=str(run_a))
    assert 'teacher_fd_pixels' not in resumed and saved == []
    assert os.path.isfile(run_b / validation.ref_file_name('pixels', data_dir))

    # The best so far comes from the file, and a line cut short by a crash spoils nothing.
    with open(run_c / validation.HISTORY_FILE, 'w') as f:
        f.write(json.dumps(dict(tick=1, kimg=0.1, figures=dict(fd_pixels=1e-9, teacher_fd_pixels=1.0))) + '\n{"tick": 3, "fig')
    monkeypatch.undo()
    saved.clear()
    figures = run(make_net(2), loss_fn, run_c, saved, ref_data=data_dir)
    assert saved == [] and 'teacher_fd_pixels' not in figures
    with open(run_c / validation.HISTORY_FILE) as f:
        assert f.read().count('\n') == 3 # The cut line was ended before the new one.
    assert [e['tick'] for e in validation.read_history(str(run_c))] == [1, 0]

def test_kept_teacher_images_are_read_not_sampled(tmp_path, data_dir, monkeypatch):
    student, seed, steps = make_net(2), VAL_KWARGS['seed'], VAL_KWARGS['heun_steps']
    first = run(student, make_loss(make_net(1)), None, ref_data=data_dir, grid_num=0)
    teacher, blocks = make_net(1), [list(range(i, i + 32)) for i in range(0, 96, 32)] # The blocks of run()'s batch.
    images = torch.cat([samplers.generate_images(teacher, [seed + i for i in block], 'cpu', samplers.edm_sampler,
        classes=block, num_steps=steps) for block in blocks])
    validation.save_heun_images(str(tmp_path), teacher, images, 32, 'cpu', seed=seed, heun_steps=steps)
    def no_sampling(*args, **kwargs):
        raise AssertionError('the teacher was sampled')
    monkeypatch.setattr(samplers, 'edm_sampler', no_sampling)
    kept = run(student, make_loss(precision.Teacher(make_net(1), 'fp32')), tmp_path, ref_data=data_dir, grid_num=0)
    assert {k: v for k, v in kept.items() if k != 'sec'} == {k: v for k, v in first.items() if k != 'sec'}
    name = validation.heun_file_name(teacher, 'cpu', seed=seed, heun_steps=steps)
    assert os.listdir(tmp_path).count(name) == 1 and name not in [validation.heun_file_name(*args, seed=seed,
        heun_steps=steps + k) for args, k in [((make_net(3), 'cpu'), 0), ((teacher, 'cpu'), 1), ((teacher, 'meta'), 0)]]

def test_training_loop_runs_validation(tmp_path, data_dir):
    teacher = make_net(1)
    teacher_pkl = tmp_path / 'teacher.pkl'
    with open(teacher_pkl, 'wb') as f:
        pickle.dump(dict(ema=teacher), f)
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    run_loop(
        run_dir             = str(run_dir),
        dataset_kwargs      = dict(class_name='training.dataset.ImageFolderDataset', path=data_dir, use_labels=True, cache=True),
        data_loader_kwargs  = dict(num_workers=0),
        network_kwargs      = NET_KWARGS,
        loss_kwargs         = dict(class_name='training.loss_cd.ConsistencyDistillLoss', S=2, T_start=4, T_end=4, T_anneal_kimg=0),
        teacher_pkl         = str(teacher_pkl),
        optimizer_kwargs    = dict(class_name='torch.optim.Adam', lr=1e-2),
        seed                = 1,
        batch_size          = 8,
        total_kimg          = 0.032,    # 4 steps.
        kimg_per_tick       = 0.016,    # Ticks end at steps 1, 3 and 4.
        lr_rampup_kimg      = 0,
        ema_halflife_kimg   = 0.004,
        snapshot_ticks      = 1,
        state_dump_ticks    = None,
        validation_fn       = dict(func_name='training.validation.validate', batch=32, ref_data=data_dir, **VAL_KWARGS),
        val_every           = 1,
        val_at_start        = True,
        device              = torch.device('cpu'),
    )
    lines = history(run_dir)
    assert [(e['tick'], e['kimg']) for e in lines] == [(0, 0.0), (1, 0.024), (2, 0.032)]
    assert ['teacher_fd_pixels' in e['figures'] for e in lines] == [True, False, False]
    fds = [e['figures']['fd_pixels'] for e in lines]
    assert all(set(e['figures']) >= {'fd_pixels', 'agree_rmse', 'agree_psnr'} for e in lines)
    assert len(set(fds)) == 3 # The network changes between validations.
    assert [e['best'] for e in lines] == [i == 0 or fd < min(fds[:i]) for i, fd in enumerate(fds)]

    # The figures join stats.jsonl at their ticks (the start's with tick 0).
    stats = read_stats(str(run_dir))
    assert [s['Validation/fd_pixels']['mean'] for s in stats] == pytest.approx(fds, rel=1e-6) # Statistics are float32.
    assert [s['Validation/agree_rmse']['mean'] for s in stats] == pytest.approx([e['figures']['agree_rmse'] for e in lines], rel=1e-6)
    assert 'Validation/teacher_fd_pixels' in stats[0] and 'Validation/teacher_fd_pixels' not in stats[1]

    # The best snapshot is the network of the lowest figure, the last snapshot that of the last one.
    for file_name, expected in [(validation.BEST_SNAPSHOT, min(fds)), ('network-snapshot-000000.pkl', fds[-1])]:
        with open(run_dir / file_name, 'rb') as f:
            ema = pickle.load(f)['ema']
        assert run(ema, make_loss(teacher), None, ref_data=data_dir, grid_num=0)['fd_pixels'] == pytest.approx(expected, rel=1e-9)

def test_two_gloo_ranks_match_one(tmp_path, data_dir):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', os.path.join(ROOT, 'tests', '_val_worker.py'), data_dir, str(tmp_path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    (tmp_path / 'one').mkdir()
    one = run(make_net(2), make_loss(make_net(1)), tmp_path / 'one', ref_data=data_dir, batch=7) # Meanwhile, in this process.
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out + err)[-3000:]
    with open(tmp_path / 'figures.json') as f:
        two = json.load(f)
    assert two['world'] == 2 and two['saved'] == [validation.BEST_SNAPSHOT]
    assert sorted(two['figures']) == sorted(k for k in one if k != 'samples')
    for name in ('fd_pixels', 'teacher_fd_pixels', 'agree_rmse', 'agree_psnr'):
        assert two['figures'][name] == pytest.approx(one[name], rel=1e-9, abs=0), name # The same images; sums in another order.
    assert np.array_equal(np.load(tmp_path / 'samples.npy'), one['samples'])
    ref_two = metrics.load_ref_stats(str(tmp_path / 'run' / validation.ref_file_name('pixels', data_dir)))
    ref_one = metrics.load_ref_stats(str(tmp_path / 'one' / validation.ref_file_name('pixels', data_dir)))
    assert np.allclose(ref_two.mu, ref_one.mu, rtol=0, atol=1e-12) and np.allclose(ref_two.sigma, ref_one.sigma, rtol=0, atol=1e-12)
    assert history(tmp_path / 'run')[0]['world_size'] == 2

#----------------------------------------------------------------------------
# Bad input.

def test_bad_input(tmp_path, data_dir):
    student, loss_fn = make_net(2), make_loss(make_net(1))
    no_mu = str(tmp_path / 'no_mu.npz')
    np.savez(no_mu, mean=np.zeros(64))
    small = str(tmp_path / 'small.npz')
    metrics.save_ref_stats(small, np.zeros(10), np.eye(10), detector='pixels')
    tiny = write_dataset(tmp_path / 'tiny', num=4)
    for name in os.listdir(tiny):
        if name.endswith('.png'):
            with PIL.Image.open(os.path.join(tiny, name)) as image:
                small_image = image.resize([4, 4])
            small_image.save(os.path.join(tiny, name))
    cases = [
        (dict(ref=no_mu),                           r'^Reference statistics ".*no_mu\.npz" hold \[\'mean\'\] but no mu and sigma; compute them with fid\.py ref\.$'),
        (dict(ref=small),                           r'^Reference statistics ".*small\.npz" have 10 features but detector "pixels" gives 64; compute the reference with the same detector: .*\.$'),
        (dict(),                                    r'^Validation with num=96 needs reference statistics; pass a statistics file or URL \(ref\) or the dataset to compute them from \(ref_data\), or num=0 for the teacher agreement alone\.$'),
        (dict(ref=small, ref_data=data_dir),        r'^Validation got both ref=".*" and ref_data=".*"; pass only one source of reference statistics\.$'),
        (dict(ref_data=tiny),                       r'^Validation dataset ref_data=".*tiny" holds images of shape \[1, 4, 4\] but the network makes \[1, 8, 8\]; pass the dataset the network is trained on\.$'),
        (dict(ref_data=str(tmp_path / 'none')),     r'^Dataset path .* does not exist; pass a folder or \.zip made by dataset_tool\.py\.$'),
        (dict(ref_data=data_dir, detector=str(tmp_path / 'no_such.pkl')), r'^Detector ".*no_such\.pkl" is neither an existing file nor an http\(s\):// URL; .*\.$'),
        (dict(ref_data=data_dir, num=1),            r'^Validation option num=1 is too small for feature statistics; pass num >= 2, or num=0 to skip the Fréchet distance\.$'),
        (dict(ref_data=data_dir, agree_num=-1),     r'^Validation option agree_num=-1 is invalid; pass a whole number of at least 0\.$'),
        (dict(num=0, agree_num=0),                  r'^Validation with num=0 and agree_num=0 computes nothing; .*\.$'),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            run(student, loss_fn, tmp_path, **kwargs)
        with pytest.raises(ValueError, match=pattern): # The same check before training starts.
            validation.check_options([1, 8, 8], **{**VAL_KWARGS, **kwargs})
    assert not os.path.exists(tmp_path / validation.HISTORY_FILE)
    validation.check_options([1, 8, 8], **dict(func_name='training.validation.validate', ref_data=data_dir, **VAL_KWARGS)) # Good options pass, as the loop's dict.

#----------------------------------------------------------------------------

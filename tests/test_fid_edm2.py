"""fid.py with EDM2's detectors and references: --detector=dinov2 with a
stand-in ViT the test builds (in the published state-dict layout), FID and
FD-DINOv2 from one pass, EDM2-style reference pickles, precision and recall,
and the mistakes around them."""

import pickle

import numpy as np
import pytest
import torch

from training import dataset, metrics, validation

import _fid_detector
from _vit_standin import save_standin
from test_fid import error_line, figure, random_images, run_fid, sqrtm_frechet, write_images, write_standin

@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('edm2')
    images, shifted = random_images(0, [40, 3, 8, 8], 60)
    inception, weight = write_standin(tmp / 'inception-standin.pkl', in_dim=3 * 8 * 8)
    return dict(tmp=tmp, images=images, folder=write_images(tmp / 'images', images), shifted=write_images(tmp / 'shifted', shifted), shifted_images=shifted,
        inception=inception, weight=weight, dinov2=save_standin(tmp / 'dinov2-standin.pth'))

@pytest.fixture(autouse=True)
def standins(setup, monkeypatch):
    """'inception' and 'dinov2' load the stand-ins: their URLs point at the files."""
    monkeypatch.setattr(metrics, 'INCEPTION_URL', setup['inception'])
    monkeypatch.setattr(metrics, 'DINOV2_URL', setup['dinov2'])
    monkeypatch.setattr(metrics, '_detector_cache', dict())

def figures(result):
    assert result.exit_code == 0, result.output
    return {line.split(': ')[0]: float(line.split(': ')[1]) for line in result.stdout.splitlines() if ': ' in line and not line.startswith(('Note', 'Loading'))}

#----------------------------------------------------------------------------
# Must show 3: FD-DINOv2.

def test_fd_dinov2_of_a_set_against_itself_and_a_shifted_set(setup, tmp_path):
    result = run_fid('ref', f'--data={setup["folder"]}', f'--dest={tmp_path / "ref.npz"}', '--detector=dinov2', '--workers=0', '--batch=16')
    assert result.exit_code == 0 and '64 features, detector "dinov2"' in result.output, result.output
    common = [f'--ref={tmp_path / "ref.npz"}', '--num=40', '--detector=dinov2', '--workers=0']
    same = figure(run_fid('calc', f'--images={setup["folder"]}', *common), 'FD-DINOv2')
    shifted = figure(run_fid('calc', f'--images={setup["shifted"]}', *common), 'FD-DINOv2')
    assert abs(same) < 1e-6 and shifted > 1e-3

#----------------------------------------------------------------------------
# Must show 4: EDM2's reference pickles; both figures from one pass.

def edm2_reference(setup, path):
    """A pickle as EDM2's calculate_metrics.py writes it, with statistics of both stand-ins."""
    dino = metrics.load_detector('dinov2')(torch.from_numpy(setup['images'])).numpy()
    inception = _fid_detector.features_numpy(setup['images'], setup['weight'])
    stats = dict(num_images=40, fid=dict(mu=inception.mean(0), sigma=np.cov(inception, rowvar=False)),
        fd_dinov2=dict(mu=dino.mean(0), sigma=np.cov(dino, rowvar=False)))
    with open(path, 'wb') as f:
        pickle.dump(stats, f)
    return str(path), inception

def test_edm2_reference_pickle_and_one_pass(setup, tmp_path, monkeypatch):
    ref, inception = edm2_reference(setup, tmp_path / 'img.pkl')
    reads = []
    load = dataset.ImageFolderDataset._load_raw_image # pylint: disable=protected-access
    monkeypatch.setattr(dataset.ImageFolderDataset, '_load_raw_image', lambda self, idx: reads.append(idx) or load(self, idx))
    both = figures(run_fid('calc', f'--images={setup["shifted"]}', f'--ref={ref}', '--metrics=fid,fd_dinov2', '--num=40', '--workers=0'))
    assert len(reads) == 40 + 1 # One pass over the images (and the first image read when the dataset opens).
    fid = figure(run_fid('calc', f'--images={setup["shifted"]}', f'--ref={ref}', '--num=40', '--workers=0'), 'FID')
    fd_dinov2 = figure(run_fid('calc', f'--images={setup["shifted"]}', f'--ref={ref}', '--detector=dinov2', '--num=40', '--workers=0'), 'FD-DINOv2')
    assert sorted(both) == ['FD-DINOv2', 'FID'] and both == dict(FID=fid, **{'FD-DINOv2': fd_dinov2})
    assert fid == pytest.approx(sqrtm_frechet(_fid_detector.features_numpy(setup['shifted_images'], setup['weight']), inception), rel=1e-5)
    assert fd_dinov2 > 0 and figures(run_fid('calc', f'--images={setup["folder"]}', f'--ref={ref}', '--metrics=fd_dinov2', '--num=40', '--workers=0'))['FD-DINOv2'] < 1e-6

def test_ref_writes_edm2s_pickle(setup, tmp_path):
    result = run_fid('ref', f'--data={setup["folder"]}', f'--dest={tmp_path / "both.pkl"}', '--metrics=fid,fd_dinov2', '--workers=0')
    assert 'Wrote reference statistics of 40 images (32 features, detector "inception"; 64 features, detector "dinov2")' in result.output, result.output
    ref, inception = edm2_reference(setup, tmp_path / 'expected.pkl')
    with open(tmp_path / 'both.pkl', 'rb') as f, open(ref, 'rb') as g:
        ours, expected = pickle.load(f), pickle.load(g) # As EDM2 reads it.
    assert ours['num_images'] == 40 and 'features' not in ours['fid']
    for key in ('fid', 'fd_dinov2'):
        np.testing.assert_allclose(ours[key]['mu'], expected[key]['mu'], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours[key]['sigma'], expected[key]['sigma'], rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(ours['fid']['mu'], inception.mean(0), rtol=1e-12)
    # The training validation's --val_ref reads it too, each detector its own entry.
    det = metrics.load_detector('dinov2')
    np.testing.assert_array_equal(validation._load_ref(str(tmp_path / 'both.pkl'), det, 64).mu, ours['fd_dinov2']['mu']) # pylint: disable=protected-access

#----------------------------------------------------------------------------
# Precision and recall through fid.py.

def test_precision_recall_through_fid_py(setup, tmp_path):
    result = run_fid('ref', f'--data={setup["folder"]}', f'--dest={tmp_path / "pr.pkl"}', '--metrics=fid,fd_dinov2,pr', '--workers=0')
    assert result.exit_code == 0, result.output
    with open(tmp_path / 'pr.pkl', 'rb') as f:
        stored = pickle.load(f)
    np.testing.assert_allclose(stored['fid']['features'], _fid_detector.features_numpy(setup['images'], setup['weight']), rtol=1e-6, atol=1e-7)
    common = [f'--ref={tmp_path / "pr.pkl"}', '--metrics=fid,fd_dinov2,pr', '--num=40', '--workers=0']
    same = figures(run_fid('calc', f'--images={setup["folder"]}', *common))
    assert [same[k] for k in ('Precision-Inception', 'Recall-Inception', 'Precision-DINOv2', 'Recall-DINOv2')] == [1, 1, 1, 1]
    other = figures(run_fid('calc', f'--images={setup["shifted"]}', *common))
    real = stored['fid']['features']
    expected = metrics.precision_recall(real, _fid_detector.features_numpy(np.clip(setup['images'].astype(np.int64) + 60, 0, 255).astype(np.uint8), setup['weight']))
    assert other['Precision-Inception'] == pytest.approx(expected['precision'], abs=1e-5) and other['Recall-Inception'] == pytest.approx(expected['recall'], abs=1e-5)
    assert other['FID'] > 0

#----------------------------------------------------------------------------
# Bad input: one sentence each.

def test_reference_without_the_detectors_statistics(setup, tmp_path):
    with open(tmp_path / 'fid-only.pkl', 'wb') as f:
        pickle.dump(dict(num_images=40, fid=dict(mu=np.zeros(32), sigma=np.eye(32))), f)
    result = run_fid('calc', f'--images={setup["folder"]}', f'--ref={tmp_path / "fid-only.pkl"}', '--detector=dinov2', '--num=40')
    assert error_line(result) == (f'Error: Reference statistics "{tmp_path / "fid-only.pkl"}" hold no statistics of detector "dinov2" (they have: fid); '
        'compute them with fid.py ref for the metric fd_dinov2 or use a detector they have.')
    result = run_fid('calc', f'--images={setup["folder"]}', f'--ref={tmp_path / "fid-only.pkl"}', '--metrics=fid,pr', '--num=40')
    assert error_line(result).endswith('hold no features of detector "inception", which precision and recall need; '
        'compute them with fid.py ref for the metrics fid,pr.')

def test_unknown_metric_and_npz_for_two_detectors(setup, tmp_path):
    result = run_fid('calc', f'--images={setup["folder"]}', f'--ref={tmp_path / "x.pkl"}', '--metrics=fid,kid')
    assert error_line(result) == 'Error: --metrics=fid,kid names the unknown metric "kid"; choose from fid, fd_dinov2, fd_pixels, pr.'
    result = run_fid('ref', f'--data={setup["folder"]}', f'--dest={tmp_path / "two.npz"}', '--metrics=fid,fd_dinov2')
    assert 'would be an .npz file, which holds the mean and covariance of one detector only; pass a path ending in .pkl' in error_line(result)
    assert not (tmp_path / 'two.npz').exists()

def test_pickle_that_runs_code_is_refused(setup, tmp_path):
    with open(tmp_path / 'evil.pkl', 'wb') as f:
        pickle.dump(dict(fid=dict(mu=np.zeros(2), sigma=np.eye(2), hook=print)), f)
    result = run_fid('calc', f'--images={setup["folder"]}', f'--ref={tmp_path / "evil.pkl"}', '--num=40')
    assert 'are neither an .npz file nor a pickle of statistics (it refers to builtins.print, which statistics do not hold)' in error_line(result)

#----------------------------------------------------------------------------

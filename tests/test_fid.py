"""fid.py ref and calc on image folders the tests make, with a pickled
stand-in detector and with the pixel detector; 2 gloo ranks under torchrun."""

import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
from click.testing import CliRunner

import fid
from training import metrics

import _fid_detector

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def random_images(seed, shape, shift):
    """Random uint8 images of `shape` [N, C, H, W] and their copies shifted by `shift` levels (clipped)."""
    images = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return images, np.clip(images.astype(np.int64) + shift, 0, 255).astype(np.uint8)

def write_images(path, images):
    """uint8 images [N, C, H, W] as PNGs in a folder, or in a zip if path ends in .zip."""
    files = []
    for idx, image in enumerate(images):
        pil = PIL.Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
        name = f'{idx // 1000:05d}/img{idx:08d}.png'
        files.append((name, pil))
    if str(path).endswith('.zip'):
        with zipfile.ZipFile(path, 'w') as z:
            for name, pil in files:
                with z.open(name, 'w') as f:
                    pil.save(f, format='png')
    else:
        for name, pil in files:
            os.makedirs(os.path.join(path, os.path.dirname(name)), exist_ok=True)
            pil.save(os.path.join(path, name))
    return str(path)

def write_standin(path, in_dim, out_dim=32, seed=0):
    net = _fid_detector.ProjectionDetector(in_dim=in_dim, out_dim=out_dim, seed=seed)
    with open(path, 'wb') as f:
        pickle.dump(net, f)
    return str(path), net.weight.numpy()

def run_fid(*args):
    return CliRunner().invoke(fid.main, [str(arg) for arg in args])

def figure(result, label):
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith(f'{label}: '), last
    return float(last.split()[-1])

def sqrtm_frechet(features1, features2):
    """The Fréchet distance of two sets of features, with numpy statistics and scipy's sqrtm."""
    mu1, mu2 = features1.mean(0), features2.mean(0)
    sigma1, sigma2 = np.cov(features1, rowvar=False), np.cov(features2, rowvar=False)
    s = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * s)))

def error_line(result):
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert 'Traceback' not in result.output
    return result.stderr.strip().splitlines()[-1]

@pytest.fixture(scope='module')
def rgb(tmp_path_factory):
    """48 random 3x8x8 images, their shifted copies, a stand-in detector and its reference statistics."""
    tmp = tmp_path_factory.mktemp('rgb')
    images, shifted = random_images(0, [48, 3, 8, 8], 40)
    det, weight = write_standin(tmp / 'standin.pkl', in_dim=3 * 8 * 8)
    folder = write_images(tmp / 'images', images)
    result = run_fid('ref', f'--data={folder}', f'--dest={tmp / "ref.npz"}', f'--detector={det}', '--batch=10', '--workers=0')
    assert result.exit_code == 0, result.output
    return dict(tmp=tmp, images=images, shifted=shifted, det=det, weight=weight, folder=folder, ref=str(tmp / 'ref.npz'))

#----------------------------------------------------------------------------

def test_standin_detector_ref_and_calc(rgb):
    features = _fid_detector.features_numpy(rgb['images'], rgb['weight'])
    with np.load(rgb['ref']) as ref:
        assert str(ref['detector']) == rgb['det'] and ref['sigma'].dtype == np.float64
        np.testing.assert_allclose(ref['mu'], features.mean(0), rtol=1e-12)
        np.testing.assert_allclose(ref['sigma'], np.cov(features, rowvar=False), rtol=1e-10, atol=1e-15)

    common = [f'--ref={rgb["ref"]}', '--num=48', f'--detector={rgb["det"]}', '--batch=7', '--workers=0']
    same = figure(run_fid('calc', f'--images={rgb["folder"]}', *common), 'FID')
    shifted_zip = write_images(rgb['tmp'] / 'shifted.zip', rgb['shifted'])
    shifted = figure(run_fid('calc', f'--images={shifted_zip}', *common), 'FID')
    expected = sqrtm_frechet(_fid_detector.features_numpy(rgb['shifted'], rgb['weight']), features)
    assert abs(same) < 1e-10
    assert shifted == pytest.approx(expected, rel=1e-5) and shifted > 0.1

def test_pixels_ref_and_calc(tmp_path):
    images, shifted = random_images(1, [80, 1, 8, 8], -30)
    folder = write_images(tmp_path / 'gray.zip', images)
    result = run_fid('ref', f'--data={folder}', f'--dest={tmp_path / "pixels.npz"}', '--detector=pixels', '--workers=0')
    assert result.exit_code == 0 and '64 features, detector "pixels"' in result.output, result.output
    features = images.reshape(80, -1) / 127.5 - 1
    with np.load(tmp_path / 'pixels.npz') as ref:
        assert str(ref['detector']) == 'pixels'
        np.testing.assert_allclose(ref['mu'], features.mean(0), rtol=1e-12)
        np.testing.assert_allclose(ref['sigma'], np.cov(features, rowvar=False), rtol=1e-10, atol=1e-15)

    common = [f'--ref={tmp_path / "pixels.npz"}', '--num=80', '--detector=pixels', '--workers=0']
    same = figure(run_fid('calc', f'--images={folder}', *common), 'FD-pixels')
    other = figure(run_fid('calc', f'--images={write_images(tmp_path / "shifted", shifted)}', *common), 'FD-pixels')
    assert abs(same) < 1e-10
    assert other == pytest.approx(sqrtm_frechet(shifted.reshape(80, -1) / 127.5 - 1, features), rel=1e-5) and other > 0.1

def test_calc_uses_a_seeded_subset(rgb):
    common = [f'--images={rgb["folder"]}', f'--ref={rgb["ref"]}', f'--detector={rgb["det"]}', '--num=30', '--workers=0']
    seed0 = figure(run_fid('calc', *common), 'FID')
    assert figure(run_fid('calc', *common, '--seed=0'), 'FID') == seed0
    assert figure(run_fid('calc', *common, '--seed=1'), 'FID') != seed0
    picked = np.sort(np.random.RandomState(0).choice(48, size=30, replace=False))
    features = _fid_detector.features_numpy(rgb['images'], rgb['weight'])
    assert seed0 == pytest.approx(sqrtm_frechet(features[picked], features), rel=1e-5)

#----------------------------------------------------------------------------
# --metrics.

def test_parse_metrics():
    assert fid.parse_metrics(None, 'dinov2') == (['dinov2'], False)
    assert fid.parse_metrics('fid,fd_dinov2,pr') == (['inception', 'dinov2'], True)
    assert fid.parse_metrics('fd_dinov2, fid', 'net.pkl') == (['dinov2', 'net.pkl'], False) # A pickled network stands in for Inception.
    assert fid.parse_metrics('pr', 'pixels') == (['pixels'], True)
    with pytest.raises(ValueError) as info:
        fid.parse_metrics('fid,fd_dino')
    assert str(info.value) == '--metrics=fid,fd_dino names the unknown metric "fd_dino"; choose from fid, fd_dinov2, fd_pixels, pr.'

#----------------------------------------------------------------------------
# Bad input: one sentence each, no traceback.

def test_too_few_images(rgb):
    result = run_fid('calc', f'--images={rgb["folder"]}', f'--ref={rgb["ref"]}', f'--detector={rgb["det"]}', '--num=49')
    assert error_line(result) == f'Error: "{rgb["folder"]}" holds 48 images, fewer than the 49 asked for; ask for at most 48 or add images.'

def test_ref_without_mu_sigma(rgb, tmp_path):
    np.savez(tmp_path / 'bad.npz', features=np.zeros([3, 2]))
    result = run_fid('calc', f'--images={rgb["folder"]}', f'--ref={tmp_path / "bad.npz"}', f'--detector={rgb["det"]}', '--num=48')
    assert 'hold [\'features\'] but no mu and sigma; compute them with fid.py ref.' in error_line(result)

def test_ref_of_another_dimension_or_detector(rgb, tmp_path):
    det16, _ = write_standin(tmp_path / 'standin16.pkl', in_dim=3 * 8 * 8, out_dim=16)
    result = run_fid('calc', f'--images={rgb["folder"]}', f'--ref={rgb["ref"]}', f'--detector={det16}', '--num=48')
    assert f'have 32 features but detector "{det16}" gives 16; compute the reference with the same detector' in error_line(result)
    result = run_fid('calc', f'--images={rgb["folder"]}', f'--ref={rgb["ref"]}', '--detector=pixels', '--num=48')
    assert f'come from detector "{rgb["det"]}" but the images go through "pixels"' in error_line(result)

def test_pixels_ref_is_refused_before_the_inception_download(rgb, tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, 'INCEPTION_URL', 'http://127.0.0.1:9/x.pkl')
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    metrics.save_ref_stats(str(tmp_path / 'pixels.npz'), np.zeros(192), np.eye(192), detector='pixels')
    result = run_fid('calc', f'--images={rgb["folder"]}', f'--ref={tmp_path / "pixels.npz"}', '--num=48')
    assert error_line(result).startswith(f'Error: Reference statistics "{tmp_path / "pixels.npz"}" come from detector "pixels" but the images go through "inception"')
    assert 'Downloading' not in result.output

def test_detector_that_cannot_be_loaded(rgb, tmp_path):
    result = run_fid('ref', f'--data={rgb["folder"]}', f'--dest={tmp_path / "x.npz"}', f'--detector={tmp_path / "none.pkl"}')
    assert 'none.pkl" is neither an existing file nor an http(s):// URL' in error_line(result)
    assert not (tmp_path / 'x.npz').exists()

def test_detector_for_other_images(rgb, tmp_path):
    det, _ = write_standin(tmp_path / 'standin-16x16.pkl', in_dim=3 * 16 * 16)
    result = run_fid('calc', f'--images={rgb["folder"]}', f'--ref={rgb["ref"]}', f'--detector={det}', '--num=48')
    assert f'Detector "{det}" fails on uint8 images of shape [3, 8, 8] (' in error_line(result)
    result = run_fid('ref', f'--data={rgb["folder"]}', f'--dest={tmp_path / "x.npz"}', f'--detector={det}')
    assert error_line(result).endswith('pass a detector made for such images.') and not (tmp_path / 'x.npz').exists()

def test_broken_or_odd_image_stops_before_any_feature(rgb, tmp_path):
    folder = write_images(tmp_path / 'images', rgb['images'][:6])
    (tmp_path / 'images' / '00000' / 'img00000004.png').write_bytes(b'not a png')
    result = run_fid('calc', f'--images={folder}', f'--ref={rgb["ref"]}', f'--detector={rgb["det"]}', '--num=6')
    assert "Image '00000/img00000004.png'" in error_line(result) and 'cannot be read' in error_line(result)
    assert 'Computing features' not in result.output
    PIL.Image.fromarray(np.zeros([4, 4, 3], dtype=np.uint8)).save(tmp_path / 'images' / '00000' / 'img00000004.png')
    result = run_fid('ref', f'--data={folder}', f'--dest={tmp_path / "x.npz"}', f'--detector={rgb["det"]}')
    assert "Image '00000/img00000004.png'" in error_line(result) and 'is 4x4 color, but the first is 8x8 color' in error_line(result)
    assert 'Computing features' not in result.output and not (tmp_path / 'x.npz').exists()

def test_missing_images(rgb, tmp_path):
    result = run_fid('calc', f'--images={tmp_path / "none"}', f'--ref={rgb["ref"]}', f'--detector={rgb["det"]}')
    assert error_line(result) == f"Error: Dataset path '{tmp_path / 'none'}' does not exist; pass a folder or .zip made by dataset_tool.py."

def test_dest_that_exists_or_cannot_be_written(rgb, tmp_path):
    (tmp_path / 'old.npz').write_bytes(b'kept')
    result = run_fid('ref', f'--data={rgb["folder"]}', f'--dest={tmp_path / "old.npz"}', f'--detector={rgb["det"]}')
    assert 'already exists; delete it or pass another path' in error_line(result)
    assert (tmp_path / 'old.npz').read_bytes() == b'kept'
    result = run_fid('ref', f'--data={rgb["folder"]}', f'--dest={tmp_path / "old.npz" / "x.npz"}', f'--detector={rgb["det"]}')
    assert error_line(result) == f'Error: --dest={tmp_path / "old.npz" / "x.npz"} cannot be created: "{tmp_path / "old.npz"}" is a file, not a folder; choose another path.'
    assert 'Computing features' not in result.output

@pytest.mark.parametrize('option', ['--seed=-1', '--num=1', '--batch=0', '--workers=-1'])
def test_out_of_range_values(rgb, option):
    result = run_fid('calc', f'--images={rgb["folder"]}', f'--ref={rgb["ref"]}', f'--detector={rgb["det"]}', option)
    assert result.exit_code == 2 and f"Invalid value for '{option.split('=')[0]}'" in result.output and 'Traceback' not in result.output

#----------------------------------------------------------------------------

def torchrun(*args):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '--', 'fid.py', *[str(arg) for arg in args]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout

def test_two_gloo_ranks_match_one(rgb, tmp_path):
    images = np.random.default_rng(2).integers(0, 256, [37, 1, 8, 8], dtype=np.uint8) # Grayscale, odd count.
    folder = write_images(tmp_path / 'gray', images)
    args = [f'--data={folder}', f'--detector={rgb["det"]}', '--batch=8', '--workers=0']
    assert run_fid('ref', *args, f'--dest={tmp_path / "one.npz"}').exit_code == 0
    assert torchrun('ref', *args, f'--dest={tmp_path / "two.npz"}').count('Wrote reference statistics of 37 images') == 1
    with np.load(tmp_path / 'one.npz') as one, np.load(tmp_path / 'two.npz') as two:
        np.testing.assert_allclose(two['mu'], one['mu'], rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(two['sigma'], one['sigma'], rtol=1e-11, atol=1e-15)
    features = _fid_detector.features_numpy(np.repeat(images, 3, axis=1), rgb['weight'])
    with np.load(tmp_path / 'two.npz') as two:
        np.testing.assert_allclose(two['mu'], features.mean(0), rtol=1e-12)

    args = [f'--images={rgb["folder"]}', f'--ref={tmp_path / "one.npz"}', '--num=31', f'--detector={rgb["det"]}', '--batch=4', '--workers=0']
    one = run_fid('calc', *args).stdout
    two = torchrun('calc', *args)
    assert two.count('FID: ') == 1 and two.strip().splitlines()[-1] == one.strip().splitlines()[-1]

#----------------------------------------------------------------------------

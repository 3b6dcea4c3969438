"""training/metrics.py: Fréchet distance against scipy's sqrtm and closed
forms, feature statistics against numpy, detectors and reference files."""

import hashlib
import pickle

import numpy as np
import pytest
import scipy.linalg
import torch

import dnnlib
from training import metrics

import _fid_detector

def sqrtm_frechet(mu1, sigma1, mu2, sigma2):
    """The Fréchet distance through a general matrix square root, as EDM computes it."""
    s = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * s)))

def random_cov(rng, dim, samples, scale=1.0):
    a = rng.standard_normal([dim, samples]) * scale
    return a @ a.T / samples

#----------------------------------------------------------------------------
# Fréchet distance.

def test_frechet_matches_sqrtm_dense():
    rng = np.random.default_rng(0)
    dim = 256
    sigma1, sigma2 = random_cov(rng, dim, dim + 100), random_cov(rng, dim, dim + 100, scale=np.linspace(0.5, 1.5, dim)[:, None])
    mu1, mu2 = rng.standard_normal(dim) * 0.1, rng.standard_normal(dim) * 0.1
    expected = sqrtm_frechet(mu1, sigma1, mu2, sigma2)
    assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)

def test_frechet_matches_sqrtm_2048():
    # Dense random 2,048-dimensional covariances Q B Q^T, with B block-diagonal and Q a random rotation:
    # the distance is invariant under Q and adds up over the blocks, so scipy's sqrtm of eight
    # 256x256 products gives a reference value that needs no general matrix square root of size 2048.
    rng = np.random.default_rng(0)
    dim, block = 2048, 256
    q, _ = np.linalg.qr(rng.standard_normal([dim, dim]))
    blocks1 = [random_cov(rng, block, block + 64) for _ in range(dim // block)]
    blocks2 = [random_cov(rng, block, block + 64, scale=rng.uniform(0.5, 1.5, [block, 1])) for _ in range(dim // block)]
    m1, m2 = rng.standard_normal(dim) * 0.1, rng.standard_normal(dim) * 0.1
    zero = np.zeros(block)
    expected = np.square(m1 - m2).sum() + sum(sqrtm_frechet(zero, b1, zero, b2) for b1, b2 in zip(blocks1, blocks2))
    sigma1 = q @ scipy.linalg.block_diag(*blocks1) @ q.T
    sigma2 = q @ scipy.linalg.block_diag(*blocks2) @ q.T
    value = metrics.frechet_distance(q @ m1, sigma1, q @ m2, sigma2)
    assert value == pytest.approx(expected, rel=1e-9)
    # And scipy's sqrtm of the full 2048x2048 product, as EDM computes FID.
    assert value == pytest.approx(sqrtm_frechet(q @ m1, sigma1, q @ m2, sigma2), rel=1e-9)

def test_frechet_closed_form_for_commuting_covariances():
    rng = np.random.default_rng(1)
    dim = 64
    q, _ = np.linalg.qr(rng.standard_normal([dim, dim]))
    a, b = rng.uniform(0.1, 3, dim), rng.uniform(0, 2, dim)
    b[:10] = 0 # sigma2 singular.
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    value = metrics.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert value == pytest.approx(expected, rel=1e-10)
    assert metrics.frechet_distance(mu2, (q * b) @ q.T, mu1, (q * a) @ q.T) == pytest.approx(expected, rel=1e-10)

def test_frechet_of_rank_deficient_covariances():
    rng = np.random.default_rng(2)
    dim, rank = 48, 20
    a = rng.standard_normal([dim, rank])
    sigma1, sigma2 = a @ a.T / rank, random_cov(rng, dim, 100)
    mu1, mu2 = rng.standard_normal(dim), np.zeros(dim)
    # The nonzero eigenvalues of sigma1 sigma2 are those of the small, well-conditioned a^T sigma2 a / rank.
    trace_sqrt = np.sqrt(np.linalg.eigvalsh(a.T @ sigma2 @ a / rank)).sum()
    expected = np.square(mu1).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    assert metrics.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-10)
    assert metrics.frechet_distance(mu2, sigma2, mu1, sigma1) == pytest.approx(expected, rel=1e-10)
    assert abs(metrics.frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-12 * np.trace(sigma1)

def test_frechet_refuses_mismatched_shapes():
    with pytest.raises(AssertionError):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))

#----------------------------------------------------------------------------
# Feature statistics.

def test_feature_stats_match_numpy():
    rng = np.random.default_rng(3)
    x = rng.standard_normal([101, 7]) * 3 + 5
    x[:10] = x[:10].astype(np.float32) # This batch goes in as a float32 tensor.
    stats = metrics.FeatureStats()
    stats.append(torch.from_numpy(x[:10]).float())
    for start, stop in [(10, 40), (40, 40), (40, 101)]:
        stats.append(x[start:stop])
    mu, sigma = stats.all_reduce().mean_cov()
    assert stats.num == 101 and mu.dtype == np.float64 and sigma.shape == (7, 7)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10)
    with pytest.raises(AssertionError):
        stats.append(np.zeros([2, 5]))
    one = metrics.FeatureStats()
    one.append(np.zeros([1, 3]))
    with pytest.raises(AssertionError):
        one.mean_cov()

def test_kept_features_are_the_chosen_rows_in_row_order():
    x = np.random.default_rng(4).standard_normal([20, 3]).astype(np.float32)
    keep = metrics.subsample(np.arange(20), 6, seed=1)
    stats = metrics.FeatureStats(keep_rows=keep)
    for rows in [[1, 3, 5, 7, 9, 11, 13, 15, 17, 19], [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]]: # Two ranks' interleaved rows, one after the other.
        stats.append(x[rows], rows)
    np.testing.assert_array_equal(stats.all_reduce().feature_array(), x[keep])
    np.testing.assert_array_equal(keep, np.sort(keep))
    assert stats.num == 20 and metrics.FeatureStats().feature_array().shape == (0, 0)

def test_compute_feature_stats_of_tensors_and_batches():
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, [23, 3, 4, 4], dtype=np.uint8)
    weight = np.asarray(rng.standard_normal([48, 6]))
    net = _fid_detector.ProjectionDetector(in_dim=48, out_dim=6)
    net.weight.copy_(torch.from_numpy(weight))
    detector = metrics.Detector('standin', net, 'cpu')
    features = _fid_detector.features_numpy(images, weight)
    from_tensor = metrics.compute_feature_stats(torch.from_numpy(images), detector, batch_size=5)
    from_batches = metrics.compute_feature_stats(((images[i : i + 9], None) for i in range(0, 23, 9)), detector)
    for stats in (from_tensor, from_batches):
        mu, sigma = stats.mean_cov()
        np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-9)

#----------------------------------------------------------------------------
# Detectors.

def test_pixel_detector_pools_to_at_most_1024():
    detector = metrics.load_detector('pixels')
    assert detector.label == 'FD-pixels' and detector.is_pixels
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, [2, 3, 32, 32], dtype=np.uint8)
    blocks = (rgb.astype(np.float64) / 127.5 - 1).reshape(2, 3, 16, 2, 16, 2).mean((3, 5))
    np.testing.assert_allclose(detector(rgb).numpy(), blocks.reshape(2, -1), rtol=1e-12)
    gray = rng.integers(0, 256, [2, 1, 32, 32], dtype=np.uint8)
    np.testing.assert_allclose(detector(gray).numpy(), gray.reshape(2, -1) / 127.5 - 1, rtol=1e-12)
    for shape, dim in [([1, 64, 64], 1024), ([3, 64, 64], 768), ([3, 8, 8], 192), ([3, 28, 28], 588), ([1, 7, 5], 35)]:
        assert detector(torch.zeros([1, *shape], dtype=torch.uint8)).shape == (1, dim)

def test_network_detector_repeats_grayscale_and_checks_io():
    calls = []
    def net(images, return_features=False):
        calls.append((images.shape, return_features))
        return images.flatten(1)[:, :5].float()
    detector = metrics.Detector('mock', net, 'cpu')
    assert detector.label == 'FID'
    gray = torch.randint(0, 256, [4, 1, 6, 6], dtype=torch.uint8)
    assert detector(gray).dtype == torch.float64
    assert calls == [((4, 3, 6, 6), True)]
    with pytest.raises(AssertionError):
        detector(gray.float())
    with pytest.raises(ValueError, match='returned \\[4\\] for 4 images'):
        metrics.Detector('flat', lambda x, return_features: x.sum((1, 2, 3)), 'cpu')(gray)

def test_default_detector_download_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, 'INCEPTION_URL', 'http://127.0.0.1:9/x.pkl')
    monkeypatch.setenv('DNNLIB_ALLOW_HTTP', '1')
    monkeypatch.setenv('DNNLIB_CACHE_DIR', str(tmp_path / 'cache'))
    with pytest.raises(ValueError) as info:
        metrics.load_detector(num_attempts=1, verbose=False)
    assert str(info.value) == ('The Inception-v3 detector could not be downloaded from http://127.0.0.1:9/x.pkl; '
        'pass a local copy instead, or use the detector "pixels".')
    metrics._detector_cache.clear() # pylint: disable=protected-access
    with pytest.raises(ValueError, match=r'pass a local copy with --val_detector=PATH, or use --val_detector=pixels'): # As train.py names it.
        metrics.load_detector(num_attempts=1, verbose=False, option='--val_detector')

def test_default_detector_comes_from_the_download_cache(tmp_path, monkeypatch):
    url = 'http://127.0.0.1:9/inception-copy.pkl'
    monkeypatch.setattr(metrics, 'INCEPTION_URL', url)
    monkeypatch.setenv('DNNLIB_ALLOW_HTTP', '1')
    cache = tmp_path / 'downloads'
    cache.mkdir()
    path = cache / (hashlib.md5(url.encode()).hexdigest() + '_inception-copy.pkl')
    with open(path, 'wb') as f:
        pickle.dump(_fid_detector.ProjectionDetector(in_dim=3 * 4 * 4, out_dim=8), f)
    (cache / (path.name + '.sha256')).write_text(dnnlib.util.sha256_of_file(str(path)) + '\n') # As a download leaves it.
    detector = metrics.load_detector('inception', cache_dir=str(cache), num_attempts=1)
    assert detector.name == 'inception' and detector.label == 'FID'
    assert metrics.load_detector(url, cache_dir=str(cache)) is detector
    assert detector(torch.zeros([2, 1, 4, 4], dtype=torch.uint8)).shape == (2, 8)

def test_detector_files_that_cannot_be_loaded(tmp_path):
    with pytest.raises(ValueError, match='is neither an existing file nor an http'):
        metrics.load_detector(str(tmp_path / 'missing.pkl'))
    (tmp_path / 'junk.pkl').write_bytes(b'not a pickle')
    with pytest.raises(ValueError, match='could not be unpickled \\(UnpicklingError'):
        metrics.load_detector(str(tmp_path / 'junk.pkl'))
    with open(tmp_path / 'dict.pkl', 'wb') as f:
        pickle.dump(dict(a=1), f)
    with pytest.raises(ValueError, match='holds a dict, not a network'):
        metrics.load_detector(str(tmp_path / 'dict.pkl'))

#----------------------------------------------------------------------------
# Reference statistics.

def test_ref_stats_round_trip_and_edm_format(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3) * 2
    metrics.save_ref_stats(str(tmp_path / 'ref.npz'), mu, sigma, detector='pixels')
    ref = metrics.load_ref_stats(str(tmp_path / 'ref.npz'))
    assert ref.detector == 'pixels' and ref.mu.dtype == np.float64
    np.testing.assert_array_equal(ref.sigma, sigma)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['ref.npz']
    np.savez(tmp_path / 'edm.npz', mu=mu.astype(np.float32), sigma=sigma)
    ref = metrics.load_ref_stats((tmp_path / 'edm.npz').as_uri())
    assert ref.detector is None and ref.mu.dtype == np.float64

def test_bad_ref_stats(tmp_path):
    np.savez(tmp_path / 'nomu.npz', mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"hold \['mean'\] but no mu and sigma; compute them with"):
        metrics.load_ref_stats(str(tmp_path / 'nomu.npz'))
    np.savez(tmp_path / 'shape.npz', mu=np.zeros(3), sigma=np.zeros([3, 4]))
    with pytest.raises(ValueError, match=r'mu of shape \[3\] and sigma of shape \[3, 4\], not \[D\] and \[D, D\]'):
        metrics.load_ref_stats(str(tmp_path / 'shape.npz'))
    (tmp_path / 'text.npz').write_text('hello')
    with pytest.raises(ValueError, match='are not a readable .npz file'):
        metrics.load_ref_stats(str(tmp_path / 'text.npz'))
    with pytest.raises(ValueError, match='missing.npz" do not exist'):
        metrics.load_ref_stats(str(tmp_path / 'missing.npz'))

def test_check_ref_stats_refuses_other_detectors():
    ref = dnnlib.EasyDict(mu=np.zeros(64), sigma=np.eye(64), detector='pixels', path='ref.npz')
    metrics.check_ref_stats(ref, 'pixels', 64)
    with pytest.raises(ValueError, match='have 64 features but detector "pixels" gives 192; compute the reference with the same detector'):
        metrics.check_ref_stats(ref, 'pixels', 192)
    with pytest.raises(ValueError, match='come from detector "pixels" but the images go through "net.pkl"'):
        metrics.check_ref_stats(ref, 'net.pkl')
    metrics.check_ref_stats(dnnlib.EasyDict(ref, detector=None), 'net.pkl', 64)
    metrics.check_ref_stats(dnnlib.EasyDict(ref, detector='inception'), 'net.pkl', 64)

#----------------------------------------------------------------------------
# Precision and recall (Kynkäänniemi et al. 2019), on point sets with known overlap.

def clusters(rng, centers, per_cluster, dim=5, spread=0.1):
    return np.concatenate([c + rng.uniform(-spread, spread, [per_cluster, dim]) for c in centers])

def test_precision_recall_of_sets_with_known_overlap():
    rng = np.random.default_rng(0)
    far = [np.full(5, 100.0 * i) for i in range(5)] # Clusters much farther apart than any neighbour radius.
    real = clusters(rng, far[:3], 10)               # Clusters A, B, C.
    fake = np.concatenate([real[:10], clusters(rng, far[3:4], 30)]) # A copy of A, and a cluster D the real set lacks.
    pr = metrics.precision_recall(real, fake)
    assert pr['precision'] == pytest.approx(10 / 40) and pr['recall'] == pytest.approx(10 / 30)
    assert metrics.precision_recall(real, real) == dict(precision=1.0, recall=1.0)
    # A subset of the real set: every fake point is real (precision 1); its manifold covers the cluster it samples.
    pr = metrics.precision_recall(real, real[10:20], batch=7)
    assert pr == dict(precision=1.0, recall=pytest.approx(10 / 30))

def test_precision_recall_radius_is_the_kth_neighbour():
    # On a line: real points 0, 1, ..., 9; the 3rd nearest other point of an inner point is 2 away.
    real = np.arange(10.0)[:, None]
    assert metrics.precision_recall(real, np.array([[4.5], [11.9], [12.1], [30], [31], [32], [33]]))['precision'] == pytest.approx(2 / 7) # 9 reaches 9 + 3.
    with pytest.raises(ValueError, match=r'need more than 3 generated feature vectors, not \[3, 1\]; use more images'):
        metrics.precision_recall(real, real[:3])
    with pytest.raises(AssertionError):
        metrics.precision_recall(real, np.zeros([5, 2]))

#----------------------------------------------------------------------------

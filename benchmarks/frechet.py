"""Time the Fréchet distance of training/metrics.py against scipy.linalg.sqrtm and sqrt(sigma1) from eigh, on
random covariances of 2,048 dimensions (with OPENBLAS_NUM_THREADS=1: the arithmetic alone)."""

import os
import sys
import time

import click
import numpy as np
import scipy.linalg

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import metrics # pylint: disable=wrong-import-position

#----------------------------------------------------------------------------

def sqrtm_frechet(mu1, sigma1, mu2, sigma2):
    s = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * s)))

def eigh_frechet(mu1, sigma1, mu2, sigma2):
    """tr sqrt(sigma1 sigma2) as tr sqrt(sqrt(sigma1) sigma2 sqrt(sigma1)), sqrt(sigma1) from eigh."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sigma2 @ root), 0, None)).sum()
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_root)

def random_stats(rng, dim, scale):
    a = rng.standard_normal([dim, dim + dim // 4]) * scale
    return rng.standard_normal(dim) * 0.1, a @ a.T / (dim + dim // 4)

#----------------------------------------------------------------------------

@click.command(context_settings=dict(show_default=True))
@click.option('--dim', help='Feature dimension', metavar='INT', type=click.IntRange(2), default=2048)
@click.option('--repeats', help='Timed runs per method (best counts)', metavar='INT', type=click.IntRange(1), default=3)
@click.option('--seed', help='Seed of the random covariances', metavar='INT', type=int, default=0)
def main(dim, repeats, seed):
    """Fréchet distance: symmetric eigendecompositions against scipy.linalg.sqrtm."""
    rng = np.random.default_rng(seed)
    args = (*random_stats(rng, dim, 1.0), *random_stats(rng, dim, np.linspace(0.5, 1.5, dim)[:, None]))
    def best_time(fn):
        runs = [(time.perf_counter(), fn(*args), time.perf_counter()) for _ in range(repeats)]
        return runs[-1][1], min(end - start for start, _result, end in runs)
    reference, t_sqrtm = best_time(sqrtm_frechet)
    threads = os.environ.get('OPENBLAS_NUM_THREADS', 'unset')
    print(f'dim {dim}, best of {repeats}, {os.cpu_count()} CPU cores, OPENBLAS_NUM_THREADS={threads}')
    print(f'scipy.linalg.sqrtm         {t_sqrtm:8.3f} s   FD = {reference:.12g}')
    for name, fn in [('sqrt(sigma1) from eigh', eigh_frechet), ('metrics.frechet_distance', metrics.frechet_distance)]:
        value, t = best_time(fn)
        rel, speed = abs(value - reference) / abs(reference), t_sqrtm / t
        print(f'{name:<26} {t:8.3f} s   FD = {value:.12g}   relative difference {rel:.1e}   speed-up {speed:.1f}x')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""Time the Fréchet distance of training/metrics.py (pivoted Cholesky and one
symmetric eigendecomposition) against the general matrix square root of
scipy.linalg.sqrtm, and against a square root of sigma1 from its
eigendecomposition, on random covariances of Inception's 2,048 dimensions.

    python benchmarks/frechet.py [--dim=2048] [--repeats=3]

Timings on a machine shared with other work vary a lot; with
OPENBLAS_NUM_THREADS=1 they measure the arithmetic of each method rather
than how well its threads fare against the other processes.
"""

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
    """The Fréchet distance through scipy's general matrix square root of sigma1 sigma2."""
    s = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(np.real(np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * s)))

def eigh_frechet(mu1, sigma1, mu2, sigma2):
    """The Fréchet distance through sqrt(sigma1) from eigh: tr sqrt(sqrt(sigma1) sigma2 sqrt(sigma1))."""
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    eig = np.linalg.eigvalsh(root @ sigma2 @ root)
    return float(np.square(mu1 - mu2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())

def random_stats(rng, dim, samples, scale):
    a = rng.standard_normal([dim, samples]) * scale
    return rng.standard_normal(dim) * 0.1, a @ a.T / samples

def best_time(fn, args, repeats):
    """Result of fn(*args) and the shortest of `repeats` wall-clock times."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return result, min(times)

#----------------------------------------------------------------------------

@click.command()
@click.option('--dim',     help='Feature dimension', metavar='INT', type=click.IntRange(min=2), default=2048, show_default=True)
@click.option('--repeats', help='Timed runs of each method (the fastest counts)', metavar='INT', type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--seed',    help='Seed of the random covariances', metavar='INT', type=int, default=0, show_default=True)
def main(dim, repeats, seed):
    """Fréchet distance: symmetric eigendecompositions against scipy.linalg.sqrtm."""
    rng = np.random.default_rng(seed)
    mu1, sigma1 = random_stats(rng, dim, dim + dim // 4, scale=1.0)
    mu2, sigma2 = random_stats(rng, dim, dim + dim // 4, scale=np.linspace(0.5, 1.5, dim)[:, None])
    args = (mu1, sigma1, mu2, sigma2)
    reference, t_sqrtm = best_time(sqrtm_frechet, args, repeats)
    threads = os.environ.get('OPENBLAS_NUM_THREADS', 'unset')
    print(f'dim {dim}, best of {repeats}, {os.cpu_count()} CPU cores, OPENBLAS_NUM_THREADS={threads}')
    print(f'scipy.linalg.sqrtm         {t_sqrtm:8.3f} s   FD = {reference:.12g}')
    for name, fn in [('sqrt(sigma1) from eigh', eigh_frechet), ('metrics.frechet_distance', metrics.frechet_distance)]:
        value, t = best_time(fn, args, repeats)
        print(f'{name:<26} {t:8.3f} s   FD = {value:.12g}   relative difference {abs(value - reference) / abs(reference):.1e}   speed-up {t_sqrtm / t:.1f}x')

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

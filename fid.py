"""Fréchet distance of a set of images to reference statistics: FID with
EDM's Inception-v3 detector, or FD-pixels with the weight-free pixel detector.
Works in a single process and under torchrun, each rank reading a share."""

import contextlib
import os

import click

import dnnlib
from torch_utils import distributed as dist
from training import metrics

#----------------------------------------------------------------------------

@contextlib.contextmanager
def user_errors():
    """Stop with the one-sentence message of a ValueError from the library (bad path, file or shape)."""
    try:
        yield
    except ValueError as err:
        raise click.ClickException(str(err)) from err

def dataset_stats(images, detector, batch, workers):
    """Mean and covariance of the detector's features of all images, over all ranks."""
    dist.print0(f'Computing features of {len(images)} images with detector "{detector.name}" on {dist.get_world_size()} rank(s)...')
    stats = metrics.compute_dataset_stats(images, detector, batch_size=batch, num_workers=workers, progress=(dist.get_rank() == 0))
    return stats.mean_cov()

#----------------------------------------------------------------------------

@click.group()
def main():
    """Fréchet distance of generated images to a dataset (FID or FD-pixels).

    \b
    Reference statistics of a dataset, then the FID of 50,000 generated images:
      python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
      python fid.py calc --images=fid-tmp --ref=fid-refs/cifar10-32x32.npz

    \b
    Offline, without the Inception-v3 download (reported as FD-pixels):
      python fid.py ref --data=datasets/digits-16x16.zip --dest=digits-pixels.npz --detector=pixels
      python fid.py calc --images=out --ref=digits-pixels.npz --num=1797 --detector=pixels

    \b
    On several GPUs (or CPU processes); the -- keeps torchrun from reading --num
    as an abbreviation of its own --numa-binding:
      torchrun --standalone --nproc_per_node=8 -- fid.py calc --images=fid-tmp --ref=REF.npz --num=10000
    """

detector_option = click.option('--detector', help="'inception', 'pixels', or a pickled network", metavar='NAME|PKL|URL', type=str, default=metrics.INCEPTION_NAME, show_default=True)
batch_option = click.option('--batch', help='Images per detector call on each rank', metavar='INT', type=click.IntRange(min=1), default=64, show_default=True)
workers_option = click.option('--workers', help='Data loader processes per rank', metavar='INT', type=click.IntRange(min=0), default=2, show_default=True)

#----------------------------------------------------------------------------

@main.command()
@click.option('--images', 'image_path', help='Images to evaluate', metavar='DIR|ZIP', type=str, required=True)
@click.option('--ref', 'ref_path',      help='Reference statistics of the dataset', metavar='NPZ|URL', type=str, required=True)
@click.option('--num',                  help='Number of images to use', metavar='INT', type=click.IntRange(min=2), default=50000, show_default=True)
@click.option('--seed',                 help='Seed that picks the images when there are more', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@batch_option
@detector_option
@workers_option
def calc(image_path, ref_path, num, seed, batch, detector, workers):
    """Fréchet distance of a folder or zip of images to reference statistics."""
    device = dist.init()
    dist.print0(f'Loading reference statistics from "{ref_path}"...')
    with user_errors():
        with dist.rank0_first():
            ref = metrics.load_ref_stats(ref_path)
        metrics.check_ref_stats(ref, metrics.detector_name(detector))
        detector = metrics.load_detector(detector, device=device)
        images = metrics.open_image_dataset(image_path, num=num, seed=seed)
        metrics.check_ref_stats(ref, detector.name, detector.feature_dim(images.image_shape))
    if ref.detector is not None and ref.detector != detector.name:
        dist.print0(f'Note: the reference statistics come from detector "{ref.detector}", the images go through "{detector.name}".')

    mu, sigma = dataset_stats(images, detector, batch, workers)
    if dist.get_rank() == 0:
        value = metrics.frechet_distance(mu, sigma, ref.mu, ref.sigma)
        print(f'{detector.label}: {value:g}')
    dist.barrier()
    dist.shutdown()

#----------------------------------------------------------------------------

@main.command()
@click.option('--data', 'data_path', help='Dataset', metavar='DIR|ZIP', type=str, required=True)
@click.option('--dest', 'dest_path', help='Where to write the statistics', metavar='NPZ', type=str, required=True)
@batch_option
@detector_option
@workers_option
def ref(data_path, dest_path, batch, detector, workers):
    """Reference statistics of a dataset, needed by 'calc'."""
    if os.path.isdir(dest_path):
        raise click.ClickException(f'--dest={dest_path} is a folder; pass the path of an .npz file to write.')
    if os.path.exists(dest_path):
        raise click.ClickException(f'--dest={dest_path} already exists; delete it or pass another path, so that no reference statistics are replaced by mistake.')
    device = dist.init()
    with user_errors():
        dnnlib.util.check_writable(dest_path, '--dest')
        detector = metrics.load_detector(detector, device=device)
        images = metrics.open_image_dataset(data_path)
        detector.feature_dim(images.image_shape)
    mu, sigma = dataset_stats(images, detector, batch, workers)
    if dist.get_rank() == 0:
        metrics.save_ref_stats(dest_path, mu, sigma, detector=detector.name)
        print(f'Wrote reference statistics of {len(images)} images ({mu.shape[0]} features, detector "{detector.name}") to "{dest_path}".')
    dist.barrier()
    dist.shutdown()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

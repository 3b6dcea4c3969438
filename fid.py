"""Fréchet distance of images to reference statistics (FID, FD-DINOv2, FD-pixels), several from one pass over
the images, with precision and recall; in one process or under torchrun."""

import os

import click

import dnnlib
from torch_utils import distributed as dist
from training import metrics

#----------------------------------------------------------------------------

def parse_metrics(names, detector=metrics.INCEPTION_NAME):
    """(detector names, with_pr) of --metrics (None: the Fréchet distance of --detector alone)."""
    detector = metrics.detector_name(detector)
    if names is None:
        return [detector], False
    known = [*metrics.LABELS, metrics.PR_NAME]
    wanted = [name.strip() for name in str(names).split(',') if name.strip()]
    for name in wanted or ['']:
        if name not in known:
            raise ValueError(f'--metrics={names} names the unknown metric "{name}"; choose from {", ".join(known)}.')
    by_metric = {v: k for k, v in metrics.METRIC_KEYS.items()}
    by_metric['fid'] = metrics.INCEPTION_NAME if detector in metrics.METRIC_KEYS else detector # Or a pickled network.
    detectors = list(dict.fromkeys(by_metric[name] for name in wanted if name != metrics.PR_NAME)) or [detector]
    return detectors, metrics.PR_NAME in wanted

def dataset_stats(images, detectors, batch, workers, keep_num=None, keep_seed=0):
    """FeatureStats of every detector's features of all images, over all ranks, from one pass."""
    names = ', '.join(f'"{det.name}"' for det in detectors)
    dist.print0(f'Computing features of {len(images)} images with {names} on {dist.get_world_size()} rank(s)...')
    return metrics.compute_dataset_stats(images, detectors, batch_size=batch, num_workers=workers,
        progress=(dist.get_rank() == 0), keep_num=keep_num, keep_seed=keep_seed)

#----------------------------------------------------------------------------

@click.group()
def main():
    """Fréchet distance of generated images to a dataset (FID, FD-DINOv2 or FD-pixels).

    \b
    python fid.py ref --data=datasets/cifar10-32x32.zip --dest=fid-refs/cifar10-32x32.npz
    python fid.py calc --images=fid-tmp --ref=fid-refs/cifar10-32x32.npz
    python fid.py ref --data=datasets/img512.zip --dest=img512-pr.pkl --metrics=fid,fd_dinov2,pr  # EDM2's metrics.
    torchrun --standalone --nproc_per_node=8 -- fid.py calc --images=fid-tmp --ref=REF.npz --num=10000
    """

detector_option = click.option('--detector', help="'inception', 'dinov2', 'pixels', or a pickled network",
    metavar='NAME|PKL|URL', default=metrics.INCEPTION_NAME, show_default=True)
metrics_option = click.option('--metrics', 'metric_names', metavar='LIST',
    help="Any of fid, fd_dinov2, fd_pixels, pr (default: the Fréchet distance of --detector)")
pr_num_option = click.option('--pr_num', help='Most images of each set for precision and recall', metavar='INT',
    type=click.IntRange(min=4), default=10000, show_default=True)
batch_option = click.option('--batch', help='Images per detector call on each rank', metavar='INT',
    type=click.IntRange(min=1), default=64, show_default=True)
workers_option = click.option('--workers', help='Data loader processes per rank', metavar='INT',
    type=click.IntRange(min=0), default=2, show_default=True)

#----------------------------------------------------------------------------

@main.command()
@click.option('--images', 'image_path', help='Images to evaluate', metavar='DIR|ZIP', required=True)
@click.option('--ref', 'ref_path', help='Reference statistics of the dataset', metavar='NPZ|PKL|URL', required=True)
@click.option('--num', help='Number of images to use', metavar='INT', type=click.IntRange(min=2), default=50000,
    show_default=True)
@click.option('--seed', help='Seed that picks the images when there are more', metavar='INT',
    type=click.IntRange(min=0), default=0, show_default=True)
@batch_option
@detector_option
@metrics_option
@pr_num_option
@workers_option
def calc(image_path, ref_path, num, seed, batch, detector, metric_names, pr_num, workers):
    """Fréchet distances (and precision and recall) of a folder or zip of images to reference statistics."""
    device = dist.init()
    dist.print0(f'Loading reference statistics from "{ref_path}"...')
    with dnnlib.util.user_errors():
        names, with_pr = parse_metrics(metric_names, detector)
        with dist.rank0_first():
            refs = [metrics.load_ref_stats(ref_path, name, need_features=with_pr) for name in names]
        for ref_stats, name in zip(refs, names):
            metrics.check_ref_stats(ref_stats, name)
        detectors = [metrics.load_detector(name, device=device) for name in names]
        images = metrics.open_image_dataset(image_path, num=num, seed=seed)
        for ref_stats, det in zip(refs, detectors):
            metrics.check_ref_stats(ref_stats, det.name, det.feature_dim(images.image_shape))
            if ref_stats.detector not in (None, det.name):
                dist.print0(f'Note: the reference comes from detector "{ref_stats.detector}", the images go through '
                    f'"{det.name}".')

    stats = dataset_stats(images, detectors, batch, workers, keep_num=(pr_num if with_pr else None), keep_seed=seed)
    if dist.get_rank() == 0:
        with dnnlib.util.user_errors():
            for ref_stats, det, det_stats in zip(refs, detectors, stats):
                mu, sigma = det_stats.mean_cov()
                print(f'{det.label}: {metrics.frechet_distance(mu, sigma, ref_stats.mu, ref_stats.sigma):g}')
                if with_pr:
                    real = metrics.subsample(ref_stats.features, pr_num)
                    pr = metrics.precision_recall(real, det_stats.feature_array(), device=device)
                    print(f'Precision-{det.feature_label}: {pr["precision"]:g}')
                    print(f'Recall-{det.feature_label}: {pr["recall"]:g}')
    dist.barrier()
    dist.shutdown()

#----------------------------------------------------------------------------

@main.command()
@click.option('--data', 'data_path', help='Dataset', metavar='DIR|ZIP', required=True)
@click.option('--dest', 'dest_path', help="Where to write the statistics (.pkl: EDM2's format)", metavar='NPZ|PKL',
    required=True)
@batch_option
@detector_option
@metrics_option
@pr_num_option
@workers_option
def ref(data_path, dest_path, batch, detector, metric_names, pr_num, workers):
    """Reference statistics of a dataset, needed by 'calc'."""
    with dnnlib.util.user_errors():
        dnnlib.util.check_writable(dest_path, '--dest')
    if os.path.exists(dest_path):
        raise click.ClickException(f'--dest={dest_path} already exists; delete it or pass another path.')
    device = dist.init()
    with dnnlib.util.user_errors():
        names, with_pr = parse_metrics(metric_names, detector)
        is_pkl = dest_path.lower().endswith('.pkl')
        if not is_pkl and (len(names) > 1 or with_pr):
            raise ValueError(f'--dest={dest_path} would be an .npz file, which holds the mean and covariance of one '
                'detector only; pass a path ending in .pkl.')
        detectors = [metrics.load_detector(name, device=device) for name in names]
        images = metrics.open_image_dataset(data_path)
        for det in detectors:
            det.feature_dim(images.image_shape)
    stats = dataset_stats(images, detectors, batch, workers, keep_num=(pr_num if with_pr else None))
    if dist.get_rank() == 0:
        entries = dict()
        for det, det_stats in zip(detectors, stats):
            mu, sigma = det_stats.mean_cov()
            entries[det.name] = dict(mu=mu, sigma=sigma, features=(det_stats.feature_array() if with_pr else None))
        if is_pkl:
            metrics.save_ref_pickle(dest_path, len(images), entries)
        else:
            metrics.save_ref_stats(dest_path, mu, sigma, detector=detectors[0].name)
        what = '; '.join(f'{entry["mu"].shape[0]} features, detector "{name}"' for name, entry in entries.items())
        print(f'Wrote reference statistics of {len(images)} images ({what}) to "{dest_path}".')
    dist.barrier()
    dist.shutdown()

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

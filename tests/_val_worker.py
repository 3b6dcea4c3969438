"""The tiny setup of test_validation.py (dataset, teacher, student, loss), and
its worker: run under torchrun with 2 CPU (gloo) ranks, it validates the same
student as the test does in one process, in batches of 7 (both ranks hold
images of the agreement and of the grid, the last batch is short), and
writes the figures and the image grid of rank 0 into the folder given as
argument."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
import PIL.Image
import torch

LABEL_DIM = 4
RESOLUTION = 8

# Validation options shared by the tests: 96 images (more than the 64 pixel features, so that
# the covariances have full rank), agreement on 16 seeds, a 4-step Heun teacher.
VAL_KWARGS = dict(num=96, seed=7, agree_num=16, heun_steps=4, detector='pixels', grid_num=10, workers=0)

def write_dataset(folder, num=160, seed=0):
    """`num` 8x8 grayscale PNGs in 4 classes (a bright quadrant per class plus noise), with dataset.json."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = []
    for i in range(num):
        c = i % LABEL_DIM
        image = rng.normal(80, 40, size=[RESOLUTION, RESOLUTION])
        image[(c // 2) * 4 : (c // 2) * 4 + 4, (c % 2) * 4 : (c % 2) * 4 + 4] += 120
        name = f'img{i:05d}.png'
        PIL.Image.fromarray(image.clip(0, 255).astype(np.uint8), 'L').save(os.path.join(folder, name))
        labels.append([name, c])
    with open(os.path.join(folder, 'dataset.json'), 'w') as f:
        json.dump(dict(labels=labels), f)
    return str(folder)

NET_KWARGS = dict(class_name='training.networks.EDMPrecond', model_type='SongUNet', model_channels=16, channel_mult=[1],
    num_blocks=1, attn_resolutions=[], dropout=0)

def make_net(seed):
    """A tiny conditional EDMPrecond for 8x8 grayscale images, its weights drawn from `seed`."""
    from training.networks import EDMPrecond # pylint: disable=import-outside-toplevel
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in NET_KWARGS.items() if k != 'class_name'}
    net = EDMPrecond(img_resolution=RESOLUTION, img_channels=1, label_dim=LABEL_DIM, **kwargs)
    with torch.no_grad(): # Random weights of visible size everywhere, so that samples vary with seed and class.
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return net.eval().requires_grad_(False)

def make_loss(teacher):
    """A 2-step consistency distillation loss with `teacher` attached."""
    from training.loss_cd import ConsistencyDistillLoss # pylint: disable=import-outside-toplevel
    return ConsistencyDistillLoss(S=2, T_start=4, T_end=4, T_anneal_kimg=0).set_teacher(teacher)

if __name__ == '__main__':
    from torch_utils import distributed as dist
    from training import validation
    torch.set_num_threads(1)
    data_dir, out_dir = sys.argv[1], sys.argv[2]
    device = dist.init(device_type='cpu')
    rank = dist.get_rank()
    run_dir = os.path.join(out_dir, 'run') if rank == 0 else None
    if rank == 0:
        os.makedirs(run_dir)
    saved = []
    figures = validation.validate(make_net(2), make_loss(make_net(1)), cur_tick=3, cur_nimg=300, run_dir=run_dir, device=device,
        save_snapshot=saved.append, batch=7, ref_data=data_dir, **VAL_KWARGS)
    if rank == 0:
        np.save(os.path.join(out_dir, 'samples.npy'), figures.pop('samples'))
        with open(os.path.join(out_dir, 'figures.json'), 'w') as f:
            json.dump(dict(figures=figures, saved=saved, world=dist.get_world_size()), f)
    dist.shutdown()

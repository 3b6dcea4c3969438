"""Time an EDM training step, a consistency distillation step (target on the CPU: <= 2.0x EDM) and a consistency
training step (target: <= 0.75x distillation), alternating, on the same network, batch and Adam
(docs/distillation.md, docs/consistency-training.md)."""

import copy
import os
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from training import compiling, precision as precisions
from training.loss import EDMLoss
from training.loss_cd import ConsistencyDistillLoss
from training.networks import EDMPrecond

#----------------------------------------------------------------------------

def _timed_step(net, loss_fn, optimizer, images, device, precision):
    """One training step: (wall-clock seconds, CPU seconds)."""
    sync = lambda: torch.cuda.synchronize(device) if device.type == 'cuda' else None
    sync()
    start, start_cpu = time.perf_counter(), time.process_time()
    optimizer.zero_grad(set_to_none=True)
    with precisions.autocast(net, precision, device):
        loss = loss_fn(net=net, images=images)
    loss.sum().mul(1 / images.shape[0]).backward()
    optimizer.step()
    if hasattr(loss_fn, 'update_target'):
        loss_fn.update_target(net)
    sync()
    return time.perf_counter() - start, time.process_time() - start_cpu

@click.command(context_settings=dict(show_default=True))
@click.option('--resolution', help='Image resolution', metavar='INT', type=click.IntRange(4), default=16)
@click.option('--channels', help='Image channels', metavar='INT', type=click.IntRange(1), default=3)
@click.option('--cbase', help='Channel base', metavar='INT', type=click.IntRange(8), default=32)
@click.option('--blocks', help='Residual blocks per resolution', metavar='INT', type=click.IntRange(1), default=4)
@click.option('--dropout', help='Dropout', metavar='FLOAT', type=click.FloatRange(0, 1, max_open=True), default=0.13)
@click.option('--batch', help='Batch size', metavar='INT', type=click.IntRange(1), default=32)
@click.option('--S', 'S', help='Student steps', metavar='INT', type=click.IntRange(1), default=8)
@click.option('--T', 'T', help='Teacher edges (fixed)', metavar='INT', type=click.IntRange(1), default=1280)
@click.option('--target', help='Target network', type=click.Choice(['live', 'ema']), default='ema')
@click.option('--steps', help='Timed steps of each kind', metavar='INT', type=click.IntRange(1), default=10)
@click.option('--device', help='Device', metavar='STR', default='cpu')
@click.option('--threads', help='CPU threads; 0 = PyTorch default', metavar='INT', type=click.IntRange(0), default=0)
@click.option('--seed', help='Random seed', metavar='INT', type=int, default=0)
@click.option('--precision', help='Precision (reduced: CUDA only)', type=click.Choice(precisions.PRECISIONS),
    default='fp32')
@click.option('--compile', 'compile_networks', help='Use torch.compile', is_flag=True)
def main(resolution, channels, cbase, blocks, dropout, batch, S, T, target, steps, device, threads, seed, precision,
        compile_networks):
    """Time an EDM training step and a consistency distillation step."""
    device = torch.device(device)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    teacher = precisions.configure(EDMPrecond(img_resolution=resolution, img_channels=channels, model_type='SongUNet',
        model_channels=cbase, channel_mult=[2, 2, 2], num_blocks=blocks, attn_resolutions=[resolution // 2],
        dropout=dropout), precision).to(device)
    edm_net, cd_net, ct_net = (copy.deepcopy(teacher).train().requires_grad_(True) for _ in range(3))
    teacher.eval().requires_grad_(False)
    cd_loss = ConsistencyDistillLoss(S=S, T_start=T, T_end=T, target_mode=target)
    cd_loss.set_teacher(precisions.Teacher(teacher, precision))
    images = torch.rand([batch, channels, resolution, resolution], device=device) * 2 - 1
    wrap = compiling.compile_network if compile_networks else lambda net: net
    if compile_networks:
        cd_loss.set_compile(compiling.compile_network)
    ct_loss = ConsistencyDistillLoss(S=S, T_start=T, T_end=T, target_mode=target, ct=True)
    runs = dict(edm=(wrap(edm_net), EDMLoss(), torch.optim.Adam(edm_net.parameters(), lr=1e-4)),
        cd=(wrap(cd_net), cd_loss, torch.optim.Adam(cd_net.parameters(), lr=1e-4)),
        ct=(wrap(ct_net), ct_loss, torch.optim.Adam(ct_net.parameters(), lr=1e-4)))
    times = dict(edm=[], cd=[], ct=[])
    for _ in range(2 + steps):
        for name, run in runs.items():
            times[name].append(_timed_step(*run, images, device, precision))
    warmup = {name: t[0][0] + t[1][0] for name, t in times.items()}
    print(f'Network: DDPM++ {resolution}x{resolution}x{channels}, model_channels={cbase}, num_blocks={blocks}, '
        f'{sum(p.numel() for p in teacher.parameters())} parameters, dropout={dropout}; batch {batch}, S={S}, T={T}, '
        f'target={target}, device {device}, {torch.get_num_threads()} threads, {precision}, '
        f'{"compiled" if compile_networks else "eager"}')
    print(f'Warm-up (2 steps each, compilation included): EDM {warmup["edm"]:.1f} s, distillation {warmup["cd"]:.1f} s, '
        f'consistency training {warmup["ct"]:.1f} s')
    table = {name: [1000 * float(f([x[k] for x in t[2:]])) for f, k in ((np.median, 0), (np.min, 0), (np.median, 1))]
        for name, t in times.items()}
    print(f'{"":19s}{"wall, median":>14s}{"wall, fastest":>15s}{"CPU time, median":>18s}')
    for name, label in [('edm', 'EDM step'), ('cd', 'Distillation step'), ('ct', 'CT step')]:
        print(f'{label + ":":19s}' + ''.join(f'{v:{w}.1f} ms' for v, w in zip(table[name], [11, 12, 15])))
    for a, b in [('cd', 'edm'), ('ct', 'cd')]:
        print(f'{f"Ratio {a}/{b}:":19s}' + ''.join(f'{x / y:{w}.2f}x  ' for x, y, w in zip(table[a], table[b], [11, 12, 15])))

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

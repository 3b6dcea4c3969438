"""Time an EDM training step against a consistency distillation step.

Both steps run in this process on the same network architecture, batch and
optimizer (zero_grad, loss, backward, Adam step; the distillation step also
updates its `ema` target). The teacher is a frozen copy of the network, T is
fixed. The two kinds of step alternate; the median and the fastest wall-clock
time of each are reported with their ratios, and on the CPU also the median
CPU time of the process (with --threads=1 the steadiest figure on a machine
that other work keeps busy). The project's target on the CPU: distillation
<= 2.0x EDM. `--precision` runs the networks as train.py's option does
(reduced precision on CUDA only); `--compile` runs them through torch.compile
(training/compiling.py), whose compilation happens in the warm-up steps and
is reported separately.

    python benchmarks/cd_step.py                       # 16x16 DDPM++, 32 channels, batch 32
    python benchmarks/cd_step.py --threads=1           # steadier figures on a busy CPU
    python benchmarks/cd_step.py --threads=1 --compile
    python benchmarks/cd_step.py --device=cuda --batch=256 --precision=bf16
"""

import copy
import os
import sys
import time

import click
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training import compiling                          # pylint: disable=wrong-import-position
from training import precision as precisions            # pylint: disable=wrong-import-position
from training.loss import EDMLoss                       # pylint: disable=wrong-import-position
from training.loss_cd import ConsistencyDistillLoss     # pylint: disable=wrong-import-position
from training.networks import EDMPrecond                # pylint: disable=wrong-import-position

#----------------------------------------------------------------------------

def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)

def _timed_step(net, loss_fn, optimizer, images, device, precision):
    """One training step; returns its wall-clock seconds and the CPU seconds of this process."""
    _sync(device)
    start = time.perf_counter()
    start_cpu = time.process_time()
    optimizer.zero_grad(set_to_none=True)
    with precisions.autocast(net, precision, device):
        loss = loss_fn(net=net, images=images)
    loss.sum().mul(1 / images.shape[0]).backward()
    optimizer.step()
    if hasattr(loss_fn, 'update_target'):
        loss_fn.update_target(net)
    _sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu

@click.command()
@click.option('--resolution',   help='Image resolution', metavar='INT',                 type=click.IntRange(min=4), default=16, show_default=True)
@click.option('--channels',     help='Image channels', metavar='INT',                   type=click.IntRange(min=1), default=3, show_default=True)
@click.option('--cbase',        help='Channel base of the DDPM++ network', metavar='INT', type=click.IntRange(min=8), default=32, show_default=True)
@click.option('--blocks',       help='Residual blocks per resolution', metavar='INT',   type=click.IntRange(min=1), default=4, show_default=True)
@click.option('--dropout',      help='Dropout of the network', metavar='FLOAT',         type=click.FloatRange(min=0, max=1, max_open=True), default=0.13, show_default=True)
@click.option('--batch',        help='Batch size', metavar='INT',                       type=click.IntRange(min=1), default=32, show_default=True)
@click.option('--S',            'S', help='Student steps', metavar='INT',               type=click.IntRange(min=1), default=8, show_default=True)
@click.option('--T',            'T', help='Teacher edges (fixed)', metavar='INT',        type=click.IntRange(min=1), default=1280, show_default=True)
@click.option('--target',       help='Target network', type=click.Choice(['live', 'ema', 'teacher']), default='ema', show_default=True)
@click.option('--steps',        help='Timed steps of each kind', metavar='INT',         type=click.IntRange(min=1), default=10, show_default=True)
@click.option('--device',       help='Device', metavar='STR',                           type=str, default='cpu', show_default=True)
@click.option('--threads',      help='CPU threads; 0 = PyTorch default', metavar='INT', type=click.IntRange(min=0), default=0, show_default=True)
@click.option('--seed',         help='Random seed', metavar='INT',                      type=int, default=0, show_default=True)
@click.option('--precision',    help='Precision of the networks (reduced: CUDA only)',  type=click.Choice(list(precisions.PRECISIONS)), default='fp32', show_default=True)
@click.option('--compile',      'compile_networks', help='Run the networks through torch.compile', is_flag=True)
def main(resolution, channels, cbase, blocks, dropout, batch, S, T, target, steps, device, threads, seed, precision, compile_networks):
    """Time an EDM training step and a consistency distillation step."""
    device = torch.device(device)
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    net_kwargs = dict(img_resolution=resolution, img_channels=channels, model_type='SongUNet', model_channels=cbase,
        channel_mult=[2,2,2], num_blocks=blocks, attn_resolutions=[resolution // 2], dropout=dropout)
    teacher = precisions.configure(EDMPrecond(**net_kwargs), precision).to(device)
    edm_net = copy.deepcopy(teacher).train().requires_grad_(True)
    cd_net = copy.deepcopy(teacher).train().requires_grad_(True)
    teacher.eval().requires_grad_(False)
    edm_loss = EDMLoss()
    cd_loss = ConsistencyDistillLoss(S=S, T_start=T, T_end=T, target_mode=target).set_teacher(precisions.Teacher(teacher, precision))
    edm_opt = torch.optim.Adam(edm_net.parameters(), lr=1e-4)
    cd_opt = torch.optim.Adam(cd_net.parameters(), lr=1e-4)
    images = torch.rand([batch, channels, resolution, resolution], device=device) * 2 - 1
    edm_student, cd_student = edm_net, cd_net
    if compile_networks:
        edm_student, cd_student = compiling.compile_network(edm_net), compiling.compile_network(cd_net)
        cd_loss.set_compile(compiling.compile_network)

    warmup = dict(edm=0.0, cd=0.0)
    for _ in range(2):
        warmup['edm'] += _timed_step(edm_student, edm_loss, edm_opt, images, device, precision)[0]
        warmup['cd'] += _timed_step(cd_student, cd_loss, cd_opt, images, device, precision)[0]
    times = dict(edm=[], cd=[])
    for _ in range(steps):
        times['edm'].append(_timed_step(edm_student, edm_loss, edm_opt, images, device, precision))
        times['cd'].append(_timed_step(cd_student, cd_loss, cd_opt, images, device, precision))
    params = sum(p.numel() for p in teacher.parameters())
    print(f'Network: DDPM++ {resolution}x{resolution}x{channels}, model_channels={cbase}, num_blocks={blocks}, {params} parameters, dropout={dropout}; '
        f'batch {batch}, S={S}, T={T}, target={target}, device {device}, {torch.get_num_threads()} threads, {precision}'
        f'{", compiled" if compile_networks else ", eager"}')
    print(f'Warm-up (2 steps each, compilation included): EDM {warmup["edm"]:.1f} s, distillation {warmup["cd"]:.1f} s')
    table = {name: [1000 * float(np.median([w for w, _ in t])), 1000 * float(np.min([w for w, _ in t])),
        1000 * float(np.median([c for _, c in t]))] for name, t in times.items()}
    print(f'{"":19s}{"wall, median":>14s}{"wall, fastest":>15s}{"CPU time, median":>18s}')
    for name, label in [('edm', 'EDM step'), ('cd', 'Distillation step')]:
        print(f'{label + ":":19s}' + ''.join(f'{v:{w}.1f} ms' for v, w in zip(table[name], [11, 12, 15])))
    print(f'{"Ratio:":19s}' + ''.join(f'{c / e:{w}.2f}x  ' for c, e, w in zip(table['cd'], table['edm'], [11, 12, 15])))

#----------------------------------------------------------------------------

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------

"""Run under torchrun with 2 CPU (gloo) processes by test_train_ddp.py.

One training step made of the training loop's own functions, twice from the
same initial network: over DDP, each rank taking half of a global batch of 8
in two accumulation rounds of 2, and in a single process taking the whole
batch at once. Writes rank<r>.json into the folder given as argument."""

import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch_utils import distributed as dist
from torch_utils import misc
from training import networks, steps

class FixedLoss:
    """EDM-weighted denoising error with fixed noise levels and a deterministic
    stand-in for the noise, so that every process computes the same thing."""
    def __call__(self, net, images, labels=None, augment_pipe=None):
        sigma = torch.full([images.shape[0], 1, 1, 1], 0.8)
        noisy = images + sigma * torch.sin(17 * images + 3)
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        return weight * (net(noisy, sigma, labels) - images) ** 2

def batches(images, batch_gpu):
    """next_batch() for accumulate_gradients(): consecutive slices of `images`."""
    chunks = iter(images.split(batch_gpu))
    return lambda: (next(chunks), torch.zeros([batch_gpu, 0]))

def flat(tensors):
    return torch.cat([t.detach().flatten() for t in tensors])

device = dist.init(device_type='cpu')
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0) # The same network and data on every rank.
net = networks.EDMPrecond(img_resolution=8, img_channels=1, model_type='SongUNet', model_channels=16, channel_mult=[1,2],
    num_blocks=1, attn_resolutions=[4], dropout=0).train().requires_grad_(True)
single = copy.deepcopy(net)
images = torch.rand([8, 1, 8, 8]) * 2 - 1
batch_size, batch_gpu = 8, 2
batch_gpu_total = batch_size // world
shard = images[rank * batch_gpu_total : (rank + 1) * batch_gpu_total]
loss_fn = FixedLoss()

# Gradients: DDP over the ranks, without synchronisation (a control), and one process.
ddp = steps.distributed(net, device)
steps.accumulate_gradients(ddp, loss_fn, batches(shard, batch_gpu), num_rounds=batch_gpu_total // batch_gpu, batch_size=batch_size)
grad_ddp = flat(p.grad for p in net.parameters())
local = copy.deepcopy(single)
steps.accumulate_gradients(local, loss_fn, batches(shard, batch_gpu), num_rounds=batch_gpu_total // batch_gpu, batch_size=batch_size)
grad_local = flat(p.grad for p in local.parameters())
steps.accumulate_gradients(single, loss_fn, batches(images, batch_size), num_rounds=1, batch_size=batch_size)
grad_single = flat(p.grad for p in single.parameters())
scale = grad_single.abs().max()
gathered = [torch.zeros_like(grad_ddp) for _ in range(world)]
torch.distributed.all_gather(gathered, grad_ddp)

# One optimizer step on each.
opt_ddp = torch.optim.Adam(net.parameters(), lr=1e-3)
opt_single = torch.optim.Adam(single.parameters(), lr=1e-3)
norm_ddp = steps.optimizer_step(net, opt_ddp, lr=1e-3)
norm_single = steps.optimizer_step(single, opt_single, lr=1e-3)
params_ddp = flat(net.parameters())
params_all = [torch.zeros_like(params_ddp) for _ in range(world)]
torch.distributed.all_gather(params_all, params_ddp)
try:
    misc.check_ddp_consistency(net)
    consistent = True
except RuntimeError as err:
    consistent = str(err)

result = dict(
    rank                = rank,
    world               = world,
    grad_rel_err        = float((grad_ddp - grad_single).abs().max() / scale),
    local_rel_err       = float((grad_local - grad_single).abs().max() / scale),
    grads_equal_ranks   = all(torch.equal(g, gathered[0]) for g in gathered),
    params_equal_ranks  = all(torch.equal(p, params_all[0]) for p in params_all),
    params_moved        = float((params_ddp - flat(local.parameters())).abs().max()), # `local` never stepped.
    param_err           = float((params_ddp - flat(single.parameters())).abs().max()),
    norm_ddp            = float(norm_ddp),
    norm_single         = float(norm_single),
    consistent          = consistent,
)
with open(os.path.join(sys.argv[1], f'rank{rank}.json'), 'w') as f:
    json.dump(result, f)
dist.shutdown()

"""The pieces of one optimizer step, shared by the training loop and the
benchmarks: the learning rate (EDM's ramp-up, EDM2's decay), gradient
accumulation over rounds and ranks, the optimizer step, and EDM's EMA."""

import numpy as np
import torch

from torch_utils import misc
from torch_utils import training_stats
from training import schedules

#----------------------------------------------------------------------------

def learning_rate(base_lr, cur_nimg, lr_rampup_kimg, batch_size=None, decay_batches=None):
    """The learning rate after `cur_nimg` images: a linear ramp-up over `lr_rampup_kimg`
    (EDM), then with `decay_batches` EDM2's inverse-square-root decay after that many
    optimizer steps of `batch_size` images."""
    if decay_batches is not None:
        return schedules.learning_rate_edm2(base_lr, cur_nimg, batch_size, ref_batches=decay_batches, rampup_Mimg=lr_rampup_kimg / 1000)
    return base_lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)

def _allreduce_sum(process_group, bucket):
    """DDP communication hook: the gradients summed over the ranks, not averaged."""
    work = torch.distributed.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])

def distributed(net, device):
    """`net` in DistributedDataParallel, summing the gradients over the ranks
    (the loss is already divided by the global batch), for accumulate_gradients()."""
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=([device] if device.type == 'cuda' else None), forward_sync_buffers=False)
    ddp.register_comm_hook(state=None, hook=_allreduce_sum)
    return ddp

def micro_batch_seed(seed, step, index):
    """The seed of the generators for micro-batch `index` of the global batch of optimizer step `step`."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, dtype=np.uint64)[0])

def accumulate_gradients(ddp, loss_fn, next_batch, num_rounds, batch_size, loss_scaling=1, augment_pipe=None, seed=None, step=0, first_index=0):
    """Forward and backward passes over `num_rounds` micro-batches from
    `next_batch()` (images in [-1, 1], or final latents, and labels, on the device). The loss is
    summed and divided by the global `batch_size` (times `loss_scaling`); a
    DDP module from distributed() sums the gradients over the ranks on the
    last round only, so that the result is the gradient of the mean loss over
    the global batch whatever the numbers of ranks and rounds. Given a `seed`,
    the torch generators (CPU and CUDA) are seeded before round k by
    micro_batch_seed(seed, step, first_index + k), before its batch is drawn: the random numbers of a
    micro-batch depend on its place in the global batch, not on the rank."""
    for round_idx in range(num_rounds):
        with misc.ddp_sync(ddp, sync=(round_idx == num_rounds - 1)):
            if seed is not None:
                torch.manual_seed(micro_batch_seed(seed, step, first_index + round_idx))
            images, labels = next_batch() # After the seed: a latent dataset draws its posterior samples here.
            loss = loss_fn(net=ddp, images=images, labels=labels, augment_pipe=augment_pipe)
            training_stats.report('Loss/loss', loss)
            (loss.sum() * (loss_scaling / batch_size)).backward()

def optimizer_step(net, optimizer, lr, loss_scaling=1):
    """Set the learning rate and step, unless a gradient is not finite: then the
    step is skipped (weights and optimizer state untouched). Returns the norm of
    the unscaled gradient (not finite for a skipped step)."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    grads = [param.grad for param in net.parameters() if param.grad is not None]
    grad_norm = torch.zeros([])
    if len(grads) > 0:
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) / loss_scaling
    if torch.isfinite(grad_norm):
        optimizer.step()
    return grad_norm

@torch.no_grad()
def update_ema(ema, net, cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio=None):
    """Move the EMA parameters towards the network's after a step taken at
    `cur_nimg` images. The half-life is `ema_halflife_kimg`, capped at
    `cur_nimg * ema_rampup_ratio` early on. Returns the decay used."""
    ema_halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
    ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        p_ema.lerp_(p_net.detach(), 1 - ema_beta)
    return ema_beta

#----------------------------------------------------------------------------

"""The pieces of one optimizer step, shared by the training loop and the
benchmarks: the learning rate (EDM's ramp-up, EDM2's decay), gradient
accumulation over rounds and ranks, the optimizer step, and EDM's EMA."""

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

def accumulate_gradients(ddp, loss_fn, next_batch, num_rounds, batch_gpu_total, loss_scaling=1, augment_pipe=None):
    """Forward and backward passes over `num_rounds` batches from `next_batch()`
    (images in [-1, 1] and labels, on the device). A DDP module averages the
    gradients across ranks on the last round only. The result is the gradient
    of the loss summed over the global batch and divided by its size (times
    `loss_scaling`), whatever the numbers of ranks and rounds."""
    for round_idx in range(num_rounds):
        with misc.ddp_sync(ddp, sync=(round_idx == num_rounds - 1)):
            images, labels = next_batch()
            loss = loss_fn(net=ddp, images=images, labels=labels, augment_pipe=augment_pipe)
            training_stats.report('Loss/loss', loss)
            (loss.sum() * (loss_scaling / batch_gpu_total)).backward()

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

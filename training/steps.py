"""The pieces of one optimizer step, shared by the training loop and the
benchmarks: the learning rate (EDM's ramp-up, EDM2's decay), the optimizer
(fused Adam on CUDA), gradient accumulation over rounds and ranks (in the
networks' precision), the optimizer step, and EDM's EMA.

On CUDA a step reads nothing back to the host: a step with a non-finite
gradient is skipped on the device (fused Adam's `found_inf`; the EMA and the
target move by a weight of 0), and its flag is returned as a tensor for the
loop to count and read once per tick."""

import inspect

import numpy as np
import torch

import dnnlib
from torch_utils import misc
from torch_utils import training_stats
from training import precision as precisions
from training import schedules

#----------------------------------------------------------------------------

def learning_rate(base_lr, cur_nimg, lr_rampup_kimg, batch_size=None, decay_batches=None):
    """The learning rate after `cur_nimg` images: a linear ramp-up over `lr_rampup_kimg`
    (EDM), then with `decay_batches` EDM2's inverse-square-root decay after that many
    optimizer steps of `batch_size` images."""
    if decay_batches is not None:
        return schedules.learning_rate_edm2(base_lr, cur_nimg, batch_size, ref_batches=decay_batches, rampup_Mimg=lr_rampup_kimg / 1000)
    return base_lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)

def make_optimizer(params, optimizer_kwargs, device):
    """The optimizer of `optimizer_kwargs` (class_name and arguments); Adam and AdamW
    are fused on CUDA unless `fused` is given."""
    kwargs = dict(optimizer_kwargs)
    if torch.device(device).type == 'cuda' and kwargs['class_name'] in ('torch.optim.Adam', 'torch.optim.AdamW'):
        kwargs.setdefault('fused', True)
    return dnnlib.util.construct_class_by_name(params=params, **kwargs)

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

def accumulate_gradients(ddp, loss_fn, next_batch, num_rounds, batch_size, loss_scaling=1, augment_pipe=None, seed=None, step=0, first_index=0, precision='fp32'):
    """Forward and backward passes over `num_rounds` micro-batches from
    `next_batch()` (images in [-1, 1], or final latents, and labels, on the device). The loss is
    summed and divided by the global `batch_size` (times `loss_scaling`); a
    DDP module from distributed() sums the gradients over the ranks on the
    last round only, so that the result is the gradient of the mean loss over
    the global batch whatever the numbers of ranks and rounds. Given a `seed`,
    the torch generators (CPU and CUDA) are seeded before round k by
    micro_batch_seed(seed, step, first_index + k), before its batch is drawn: the random
    numbers of a micro-batch depend on its place in the global batch, not on the rank.
    The loss runs in the networks' `precision` (training/precision.py)."""
    for round_idx in range(num_rounds):
        with misc.ddp_sync(ddp, sync=(round_idx == num_rounds - 1)):
            if seed is not None:
                torch.manual_seed(micro_batch_seed(seed, step, first_index + round_idx))
            images, labels = next_batch() # After the seed: a latent dataset draws its posterior samples here.
            with precisions.autocast(ddp, precision, images.device):
                loss = loss_fn(net=ddp, images=images, labels=labels, augment_pipe=augment_pipe)
            training_stats.report('Loss/loss', loss)
            (loss.sum() * (loss_scaling / batch_size)).backward()

def optimizer_step(net, optimizer, lr, loss_scaling=1):
    """Set the learning rate and step, unless a gradient is not finite: then the
    step is skipped (weights and optimizer state untouched), on the device for a
    fused optimizer. Returns the norm of the unscaled gradient (not finite for a
    skipped step), a tensor on the device."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    grads = [param.grad for param in net.parameters() if param.grad is not None]
    grad_norm = torch.zeros([])
    if len(grads) > 0:
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) / loss_scaling
    if all(group.get('fused') for group in optimizer.param_groups): # As the optimizer decides, per group.
        optimizer.found_inf = (~torch.isfinite(grad_norm)).to(torch.float32) # Read by the fused kernel, which then leaves everything as it was.
        optimizer.step()
    elif torch.isfinite(grad_norm):
        optimizer.step()
    return grad_norm

def update_target(loss_fn, net, finite):
    """The loss's `update_target(net)` hook after a step whose gradient was `finite` (a
    device tensor): a hook that takes `finite` skips on the device, another is called
    only for a finite step."""
    if not hasattr(loss_fn, 'update_target'):
        return
    if 'finite' in inspect.signature(loss_fn.update_target).parameters:
        loss_fn.update_target(net, finite=finite)
    elif bool(finite):
        loss_fn.update_target(net)

@torch.no_grad()
def update_ema(ema, net, cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio=None, finite=None):
    """Move the EMA parameters towards the network's after a step taken at
    `cur_nimg` images. The half-life is `ema_halflife_kimg`, capped at
    `cur_nimg * ema_rampup_ratio` early on; with `finite` (a device tensor)
    false, the EMA stays where it is. Returns the decay used."""
    ema_halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
    ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        weight = 1 - ema_beta if finite is None else finite.to(device=p_ema.device, dtype=p_ema.dtype) * (1 - ema_beta)
        p_ema.lerp_(p_net.detach(), weight)
    return ema_beta

#----------------------------------------------------------------------------

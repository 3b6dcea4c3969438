"""One optimizer step in pieces (learning rate, accumulation, step, EMA); on CUDA nothing is read back to the host."""

import inspect

import numpy as np
import torch

import dnnlib
from torch_utils import misc
from torch_utils import training_stats
from training import precision as precisions

#----------------------------------------------------------------------------

def learning_rate_edm2(ref_lr, cur_nimg, batch_size, ref_batches=70e3, rampup_Mimg=10):
    """EDM2's ref_lr / sqrt(max(step / ref_batches, 1)) times a ramp-up over rampup_Mimg (0 = none for either)."""
    assert ref_lr >= 0 and cur_nimg >= 0 and batch_size > 0 and ref_batches >= 0 and rampup_Mimg >= 0
    lr = ref_lr
    if ref_batches > 0:
        lr /= np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return float(lr)

def learning_rate(base_lr, cur_nimg, lr_rampup_kimg, batch_size=None, decay_batches=None):
    """EDM's linear ramp-up over `lr_rampup_kimg`, then with `decay_batches` EDM2's inverse-square-root decay."""
    if decay_batches is not None:
        return learning_rate_edm2(base_lr, cur_nimg, batch_size, decay_batches, lr_rampup_kimg / 1000)
    return base_lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)

def make_optimizer(params, optimizer_kwargs, device):
    """The optimizer of `optimizer_kwargs`; Adam and AdamW are fused on CUDA unless `fused` is given."""
    kwargs = dict(optimizer_kwargs)
    if torch.device(device).type == 'cuda' and kwargs['class_name'] in ('torch.optim.Adam', 'torch.optim.AdamW'):
        kwargs.setdefault('fused', True)
    return dnnlib.util.construct_class_by_name(params=params, **kwargs)

def _allreduce_sum(process_group, bucket):
    work = torch.distributed.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])

def distributed(net, device):
    """`net` in DistributedDataParallel, summing (not averaging) the gradients over the ranks."""
    device_ids = [device] if device.type == 'cuda' else None
    ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids, forward_sync_buffers=False)
    ddp.register_comm_hook(state=None, hook=_allreduce_sum)
    return ddp

def micro_batch_seed(seed, step, index):
    """The seed of micro-batch `index` of the global batch of optimizer step `step`."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, dtype=np.uint64)[0])

def accumulate_gradients(ddp, loss_fn, next_batch, num_rounds, batch_size, loss_scaling=1, augment_pipe=None,
    seed=None, step=0, first_index=0, precision='fp32'):
    """Accumulate the gradient of the mean loss over the global `batch_size` from `num_rounds` micro-batches."""
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
    """Step with learning rate `lr` unless a gradient is not finite; returns the unscaled gradient norm (a tensor)."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    grads = [param.grad for param in net.parameters() if param.grad is not None]
    grad_norm = torch.zeros([])
    if len(grads) > 0:
        norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        grad_norm = torch.linalg.vector_norm(norms) / loss_scaling
    if all(group.get('fused') for group in optimizer.param_groups): # As the optimizer decides, per group.
        optimizer.found_inf = (~torch.isfinite(grad_norm)).to(torch.float32) # The fused kernel then changes nothing.
        optimizer.step()
    elif torch.isfinite(grad_norm):
        optimizer.step()
    return grad_norm

def update_target(loss_fn, net, finite):
    """Call the loss's `update_target(net)` hook, with `finite` when it takes it, else only after a finite step."""
    hook = getattr(loss_fn, 'update_target', None)
    if hook is not None and 'finite' in inspect.signature(hook).parameters:
        hook(net, finite=finite)
    elif hook is not None and bool(finite):
        hook(net)

@torch.no_grad()
def update_ema(ema, net, cur_nimg, batch_size, ema_halflife_kimg, ema_rampup_ratio=None, finite=None):
    """Move the EMA towards `net` unless the device tensor `finite` is false; returns the decay."""
    ema_halflife_nimg = ema_halflife_kimg * 1000
    if ema_rampup_ratio is not None:
        ema_halflife_nimg = min(ema_halflife_nimg, cur_nimg * ema_rampup_ratio)
    ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
    for p_ema, p_net in zip(ema.parameters(), net.parameters()):
        weight = 1 - ema_beta
        if finite is not None:
            weight = finite.to(device=p_ema.device, dtype=p_ema.dtype) * weight
        p_ema.lerp_(p_net.detach(), weight)
    return ema_beta

#----------------------------------------------------------------------------

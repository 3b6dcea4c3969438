"""Learning-rate schedules."""

import numpy as np

#----------------------------------------------------------------------------

def learning_rate_edm2(
    ref_lr,                     # Learning rate after the ramp-up and before the decay.
    cur_nimg,                   # Training images seen so far.
    batch_size,                 # Images per optimizer step.
    ref_batches = 70e3,         # Steps before the inverse-square-root decay begins; 0 = no decay.
    rampup_Mimg = 10,           # Length of the linear ramp-up in millions of images; 0 = no ramp-up.
):
    """EDM2's schedule (Karras et al. 2024): ref_lr / sqrt(max(t / ref_batches, 1))
    at t = cur_nimg / batch_size optimizer steps, times a linear ramp-up from 0
    to 1 over the first `rampup_Mimg` million images."""
    if ref_lr < 0 or cur_nimg < 0 or batch_size <= 0 or ref_batches < 0 or rampup_Mimg < 0:
        raise ValueError(f'learning_rate_edm2() got ref_lr={ref_lr}, cur_nimg={cur_nimg}, batch_size={batch_size}, '
            f'ref_batches={ref_batches}, rampup_Mimg={rampup_Mimg}; batch_size must be positive and the others non-negative.')
    lr = ref_lr
    if ref_batches > 0:
        lr /= np.sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    if rampup_Mimg > 0:
        lr *= min(cur_nimg / (rampup_Mimg * 1e6), 1)
    return float(lr)

#----------------------------------------------------------------------------

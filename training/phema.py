"""EDM2's power-function EMA: profiles of relative width sigma_rel, tracked in training and combined post hoc."""

import copy

import numpy as np
import torch

#----------------------------------------------------------------------------
# Profile width <-> exponent.

def exp_to_std(exp):
    """sigma_rel of the power-function profile with exponent `exp` (scalar or array)."""
    exp = np.float64(exp)
    assert np.all(exp > -1)
    return np.sqrt((exp + 1) / ((exp + 2) ** 2 * (exp + 3)))

_MAX_STD = float(exp_to_std((np.sqrt(5) - 3) / 2)) # The widest profile (about 0.3003).

def std_to_exp(std):
    """The exponent gamma of the profile of width `std` (scalar or array)."""
    std = np.float64(std)
    bad = std[~((std > 0) & (std <= _MAX_STD))]
    if bad.size:
        bad = ", ".join(f"{v:g}" for v in bad)
        raise ValueError(f'The EMA width sigma_rel = {bad} lies outside (0, {_MAX_STD:.4f}]; use e.g. 0.05 or 0.10.')
    exp = [np.roots([1, 7, 16 - s, 12 - s]).real.max() for s in std.reshape(-1) ** -2]
    return np.float64(exp).reshape(std.shape)

#----------------------------------------------------------------------------
# Tracking during training.

def power_function_beta(std, t_next, t_delta):
    """The decay (1 - t_delta / t_next)^(gamma + 1) from the profile at t_next - t_delta to that at t_next."""
    assert 0 < t_delta <= t_next
    return (1 - t_delta / t_next) ** (std_to_exp(std) + 1)

def check_stds(stds):
    """Raise ValueError unless `stds` is an increasing list of reconstructable widths sigma_rel."""
    stds = [float(std) for std in stds]
    std_to_exp(stds)
    if len(stds) == 0 or any(b <= a for a, b in zip(stds[:-1], stds[1:])):
        raise ValueError(f'The power-function EMA widths {stds} are not an increasing list; '
            'give each sigma_rel once, in increasing order, e.g. 0.050,0.100.')

class PowerFunctionEMA:
    """Power-function EMAs of the parameters of `net`, one copy of the network per sigma_rel."""

    @torch.no_grad()
    def __init__(self, net, stds): # The network being trained, sigma_rel of the tracked profiles.
        check_stds(stds)
        self.net = net
        self.stds = list(stds)
        self.emas = [copy.deepcopy(net) for _std in self.stds]

    @torch.no_grad()
    def update(self, cur_nimg, batch_size):
        """Fold in the parameters after the step that brought the images seen to `cur_nimg`."""
        for std, ema in zip(self.stds, self.emas):
            beta = power_function_beta(std=std, t_next=cur_nimg, t_delta=batch_size)
            for p_net, p_ema in zip(self.net.parameters(), ema.parameters()):
                p_ema.lerp_(p_net, 1 - beta)

    @torch.no_grad()
    def get(self):
        """[(ema_network, suffix), ...] with suffixes like '-0.050'; buffers are copied from `net`."""
        for ema in self.emas:
            for b_net, b_ema in zip(self.net.buffers(), ema.buffers()):
                b_ema.copy_(b_net)
        return [(ema, f'-{std:.3f}') for std, ema in zip(self.stds, self.emas)]

    def state_dict(self):
        return dict(stds=self.stds, emas=[ema.state_dict() for ema in self.emas])

    def load_state_dict(self, state):
        stds = list(state['stds'])
        if len(stds) != len(self.emas):
            raise ValueError(f'The EMA state has profiles {stds}, this tracker {len(self.emas)}; use stds={stds}.')
        self.stds = stds
        for ema, ema_state in zip(self.emas, state['emas']):
            ema.load_state_dict(ema_state)

#----------------------------------------------------------------------------
# Post-hoc reconstruction.

def power_function_correlation(a_ofs, a_std, b_ofs, b_std):
    """Inner product of two normalized power-function profiles (broadcasting)."""
    a_exp, b_exp = std_to_exp(a_std), std_to_exp(b_std)
    a_ofs, b_ofs = np.float64(a_ofs), np.float64(b_ofs)
    t_hi, t_lo = np.maximum(a_ofs, b_ofs), np.minimum(a_ofs, b_ofs)
    exp_hi = np.where(a_ofs < b_ofs, b_exp, a_exp)
    return (a_exp + 1) * (b_exp + 1) / (a_exp + b_exp + 1) * (t_lo / t_hi) ** exp_hi / t_hi

def _profiles(in_ofs, in_std, out_ofs, out_std):
    """Inner products of the stored profiles [num_in, num_in] and with the requested ones [num_in, num_out]."""
    in_ofs, in_std = np.broadcast_arrays(np.float64(in_ofs), np.float64(in_std))
    out_ofs, out_std = np.broadcast_arrays(np.float64(out_ofs), np.float64(out_std))
    assert np.all(in_ofs > 0) and np.all(out_ofs > 0)
    col, row = lambda v: v.reshape(-1, 1), lambda v: v.reshape(1, -1)
    gram = power_function_correlation(col(in_ofs), col(in_std), row(in_ofs), row(in_std))
    cross = power_function_correlation(col(in_ofs), col(in_std), row(out_ofs), row(out_std))
    return gram, cross, out_ofs, out_std

def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std):
    """Least-squares weights [num_in, num_out] of the stored profiles for the requested ones, columns summing to 1."""
    gram, cross = _profiles(in_ofs, in_std, out_ofs, out_std)[:2]
    try:
        coefs = np.linalg.solve(gram, cross)
    except np.linalg.LinAlgError:
        raise ValueError('The stored EMA profiles are linearly dependent; keep each (time, width) pair once.') from None
    return coefs / coefs.sum(axis=0, keepdims=True)

def posthoc_error(in_ofs, in_std, out_ofs, out_std, coefs):
    """Relative L2 error of each requested profile's reconstruction with `coefs`."""
    gram, cross, out_ofs, out_std = _profiles(in_ofs, in_std, out_ofs, out_std)
    norm2 = power_function_correlation(out_ofs, out_std, out_ofs, out_std)
    err2 = norm2 - 2 * (coefs * cross).sum(axis=0) + np.einsum('ij,ik,kj->j', coefs, gram, coefs)
    return np.sqrt(np.maximum(err2, 0) / norm2)

#----------------------------------------------------------------------------

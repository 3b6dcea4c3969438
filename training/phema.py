"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024).

An EMA profile of this family, at training time t, averages the weights seen
at times tau in [0, t] with density proportional to tau^gamma. Its width is
given by the relative standard deviation sigma_rel of that density (in units
of t), which depends on the exponent gamma only. `PowerFunctionEMA` tracks such
profiles during training; `solve_posthoc_coefficients` combines stored
snapshots of them into other profiles after training. Times may be counted
in images or in optimizer steps: the coefficients do not depend on the unit.
"""

import copy

import numpy as np
import torch

#----------------------------------------------------------------------------
# Profile width <-> exponent.

def exp_to_std(exp):
    """sigma_rel of the power-function profile with exponent `exp` (scalar or array)."""
    exp = np.float64(exp)
    bad = exp[exp <= -1]
    if bad.size:
        raise ValueError(f'The power-function exponent {", ".join(f"{v:g}" for v in bad)} is not above -1; use an exponent greater than -1.')
    return np.sqrt((exp + 1) / ((exp + 2) ** 2 * (exp + 3)))

_MAX_STD = float(exp_to_std((np.sqrt(5) - 3) / 2)) # The widest profile of the family (about 0.3003).

def std_to_exp(std):
    """The exponent gamma of the profile with relative standard deviation `std` (scalar or array).

    sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)) is a cubic equation in
    gamma, gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with s = sigma_rel^-2;
    the profile is its largest real root.
    """
    std = np.float64(std)
    bad = std[~((std > 0) & (std <= _MAX_STD))]
    if bad.size:
        raise ValueError(f'The EMA width sigma_rel = {", ".join(f"{v:g}" for v in bad)} lies outside (0, {_MAX_STD:.4f}]; use values such as 0.05 or 0.10.')
    inv_var = std.reshape(-1) ** -2
    exp = [np.roots([1, 7, 16 - s, 12 - s]).real.max() for s in inv_var]
    return np.float64(exp).reshape(std.shape)

#----------------------------------------------------------------------------
# Tracking during training.

def power_function_beta(std, t_next, t_delta):
    """Per-step decay that turns the profile of time t_next - t_delta into that of t_next.

    ema(t_next) = beta ema(t_next - t_delta) + (1 - beta) w(t_next) with
    beta = (1 - t_delta / t_next)^(gamma + 1).
    """
    if not 0 < t_delta <= t_next:
        raise ValueError(f'power_function_beta() needs 0 < t_delta <= t_next, got t_delta={t_delta}, t_next={t_next}.')
    return (1 - t_delta / t_next) ** (std_to_exp(std) + 1)

def check_stds(stds):
    """Raise ValueError unless `stds` is an increasing list of reconstructable widths sigma_rel."""
    stds = [float(std) for std in stds]
    std_to_exp(stds)
    if len(stds) == 0 or any(b <= a for a, b in zip(stds[:-1], stds[1:])):
        raise ValueError(f'The power-function EMA widths {stds} are not an increasing list; give each sigma_rel once, in increasing order, e.g. 0.050,0.100.')

class PowerFunctionEMA:
    """Power-function EMAs of the parameters of `net`, one copy of the network per sigma_rel."""

    @torch.no_grad()
    def __init__(self,
        net,                        # The network being trained.
        stds    = [0.050, 0.100],   # sigma_rel of the tracked profiles.
    ):
        check_stds(stds)
        self.net = net
        self.stds = list(stds)
        self.emas = [copy.deepcopy(net) for _std in self.stds]

    @torch.no_grad()
    def reset(self):
        """Set every EMA to the current parameters."""
        for ema in self.emas:
            for p_net, p_ema in zip(self.net.parameters(), ema.parameters()):
                p_ema.copy_(p_net)

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
        if len(state['stds']) != len(self.emas):
            raise ValueError(f'The EMA state has {len(state["stds"])} profiles {state["stds"]}, this tracker {len(self.emas)}; build the tracker with stds={state["stds"]}.')
        self.stds = list(state['stds'])
        for ema, ema_state in zip(self.emas, state['emas']):
            ema.load_state_dict(ema_state)

#----------------------------------------------------------------------------
# Post-hoc reconstruction.

def power_function_correlation(a_ofs, a_std, b_ofs, b_std):
    """Inner product of two normalized power-function profiles (broadcasting).

    For profiles ending at T_a <= T_b with exponents gamma_a, gamma_b the
    integral is (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * (T_a / T_b)^gamma_b / T_b;
    swap the roles of a and b when T_a > T_b.
    """
    a_exp = std_to_exp(a_std)
    b_exp = std_to_exp(b_std)
    a_ofs, b_ofs = np.float64(a_ofs), np.float64(b_ofs)
    t_hi = np.maximum(a_ofs, b_ofs)
    t_lo = np.minimum(a_ofs, b_ofs)
    exp_hi = np.where(a_ofs < b_ofs, b_exp, a_exp)
    return (a_exp + 1) * (b_exp + 1) / (a_exp + b_exp + 1) * (t_lo / t_hi) ** exp_hi / t_hi

def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std):
    """Least-squares weights [num_in, num_out] that combine stored profiles into requested ones.

    Stored snapshot i is the EMA with width in_std[i] at time in_ofs[i]; output j
    is the profile out_std[j] at time out_ofs[j]. Column j minimizes the L2
    distance between sum_i X[i, j] p_i and q_j, and is then scaled to sum to 1.
    """
    in_ofs, in_std = np.broadcast_arrays(np.float64(in_ofs), np.float64(in_std))
    out_ofs, out_std = np.broadcast_arrays(np.float64(out_ofs), np.float64(out_std))
    if np.any(in_ofs <= 0) or np.any(out_ofs <= 0):
        raise ValueError(f'Post-hoc EMA times must be positive, got in_ofs={in_ofs.tolist()} and out_ofs={out_ofs.tolist()}.')
    col = lambda v: v.reshape(-1, 1)
    row = lambda v: v.reshape(1, -1)
    gram = power_function_correlation(col(in_ofs), col(in_std), row(in_ofs), row(in_std))
    cross = power_function_correlation(col(in_ofs), col(in_std), row(out_ofs), row(out_std))
    try:
        coefs = np.linalg.solve(gram, cross)
    except np.linalg.LinAlgError:
        raise ValueError('The stored EMA profiles are linearly dependent (the same time and width twice?); keep each (in_ofs, in_std) pair once.') from None
    return coefs / coefs.sum(axis=0, keepdims=True)

#

def posthoc_error(in_ofs, in_std, out_ofs, out_std, coefs):
    """Relative L2 distance between each requested profile and its reconstruction
    sum_i coefs[i, j] p_i (one value per output), from the inner products of the profiles."""
    in_ofs, in_std = np.broadcast_arrays(np.float64(in_ofs), np.float64(in_std))
    out_ofs, out_std = np.broadcast_arrays(np.float64(out_ofs), np.float64(out_std))
    gram = power_function_correlation(in_ofs.reshape(-1, 1), in_std.reshape(-1, 1), in_ofs.reshape(1, -1), in_std.reshape(1, -1))
    cross = power_function_correlation(in_ofs.reshape(-1, 1), in_std.reshape(-1, 1), out_ofs.reshape(1, -1), out_std.reshape(1, -1))
    norm2 = power_function_correlation(out_ofs, out_std, out_ofs, out_std)
    err2 = norm2 - 2 * (coefs * cross).sum(axis=0) + np.einsum('ij,ik,kj->j', coefs, gram, coefs)
    return np.sqrt(np.maximum(err2, 0) / norm2)

#----------------------------------------------------------------------------

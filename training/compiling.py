"""torch.compile for the networks of a training step, falling back to eager
with one warning where compilation is unavailable.

Shapes are fixed by construction: every network of a step (student, teacher,
target) runs on the whole micro-batch of `batch_gpu` images
(training/loss_cd.py), so the graphs are compiled once with `dynamic=False`.
Random operations (dropout) use eager PyTorch's generator
(`torch._inductor.config.fallback_random`), so that a compiled network draws
the same masks as an eager one and the target's replay of the student's
dropout masks (cd-spec section 6) holds. The wrapper keeps the network as
`_orig_mod`, like torch's own compiled modules, so that code looking for the
network inside (torch_utils.misc.unwrap_module) finds it; snapshots and training states
save the network itself, never the wrapper."""

import importlib
import warnings

import torch

#----------------------------------------------------------------------------

_warned = [] # The one warning of this process, once given.

def _warn_once(err):
    if not _warned:
        _warned.append(str(err))
        warnings.warn(f'--compile: torch.compile is unavailable here ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ""}); '
            f'the networks run eagerly.', RuntimeWarning, stacklevel=3)

class CompiledNetwork(torch.nn.Module):
    """`net` through torch.compile; the first call that fails to compile switches to eager for good."""

    def __init__(self, net, backend='inductor', mode=None):
        super().__init__()
        self._orig_mod = net
        self._compiled = [None]     # The compiled callable (kept out of the module tree), None = eager.
        self._proven = False        # Has a compiled call succeeded?
        try:
            importlib.import_module('torch._inductor.config').fallback_random = True
            self._compiled[0] = torch.compile(net, backend=backend, mode=mode, dynamic=False)
        except Exception as err: # pylint: disable=broad-except
            _warn_once(err)

    def forward(self, *args, **kwargs):
        if self._compiled[0] is not None:
            if self._proven:
                return self._compiled[0](*args, **kwargs)
            try:
                result = self._compiled[0](*args, **kwargs)
                self._proven = True
                return result
            except Exception as err: # pylint: disable=broad-except
                _warn_once(err)
                self._compiled[0] = None
        return self._orig_mod(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules['_orig_mod'], name)

def compile_network(net, backend='inductor', mode=None):
    """`net` wrapped in CompiledNetwork (a callable module with the network's attributes)."""
    return CompiledNetwork(net, backend=backend, mode=mode)

#----------------------------------------------------------------------------

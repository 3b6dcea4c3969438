"""torch.compile with fixed shapes and eager random numbers (cd-spec section 6), else eager with one warning."""

import importlib
import warnings

import torch

#----------------------------------------------------------------------------

class Wrapper(torch.nn.Module):
    """A module around one network, kept as the attribute `_inner` names; its other attributes are the network's."""
    _inner = '_orig_mod' # Where torch_utils.misc.unwrap_module looks, as in torch's compiled modules.

    def __init__(self, net):
        super().__init__()
        setattr(self, self._inner, net)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules[self._inner], name)

_warned = [] # The one warning of this process, once given.

def _warn_once(err):
    if not _warned:
        _warned.append(str(err))
        first = ''.join(str(err).strip().splitlines()[:1])
        warnings.warn(f'torch.compile is unavailable here ({type(err).__name__}: {first}); the networks run eagerly.',
            RuntimeWarning, stacklevel=3)

class CompiledNetwork(Wrapper):
    """`net` through torch.compile; the first call that fails to compile switches to eager for good."""

    def __init__(self, net, backend='inductor', mode=None):
        super().__init__(net)
        self._compiled = [None]     # Compiled callable, out of the module tree; None = eager.
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

compile_network = CompiledNetwork

#----------------------------------------------------------------------------

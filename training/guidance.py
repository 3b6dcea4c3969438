"""Guided denoisers (EDM2's guidance, Karras et al. 2024): the denoiser
D_w(x; sigma) = D_g(x; sigma) + w (D(x; sigma) - D_g(x; sigma)) of a network D
and a guiding network D_g, with w = 1 the network alone. The guide is an
unconditional network (classifier-free guidance) or a weaker conditional one
of the same classes (autoguidance).

`GuidedDenoiser` has the interface of the EDM wrappers (`img_resolution`,
`img_channels`, `label_dim`, `sigma_min`, `sigma_max`, `round_sigma`,
`use_fp16`), so the samplers, the distillation loss and validation use it as
they use a teacher. `guided()` checks the pair and builds it.

Decisions:
* w = 1 evaluates the network alone (its own outputs, bit for bit); any other
  w evaluates both on the same inputs, the guide without class labels when it
  is unconditional.
* The supported noise levels are those both networks support; the rounding
  of noise levels is the network's (none when it has no `round_sigma`).
"""

import torch

from training import precision
from training import samplers

#----------------------------------------------------------------------------

def check_guide(net, gnet, where='The guide'):
    """Raise ValueError unless `gnet` can guide `net`: the same resolution and
    channels, and no classes or the network's classes."""
    for attr, what in [('img_resolution', 'resolution'), ('img_channels', 'channel count')]:
        if getattr(gnet, attr, None) != getattr(net, attr, None):
            raise ValueError(f'{where} has {what} {getattr(gnet, attr, None)}, but the guided network has {getattr(net, attr, None)}; '
                f'pass a guide of the network\'s {what}.')
    if gnet.label_dim not in (0, net.label_dim):
        raise ValueError(f'{where} is conditioned on {gnet.label_dim} classes, but the guided network on {net.label_dim}; '
            f'pass an unconditional guide (classifier-free guidance) or one of the network\'s classes (autoguidance).')

def check_guidance(gnet, guidance):
    """Raise ValueError for a guidance weight that does not fit the presence of a guide."""
    if gnet is None and guidance is not None:
        raise ValueError(f'--guidance={guidance:g} needs a guiding network; pass --gnet=PKL|URL, or leave --guidance out.')
    if gnet is not None and guidance is None:
        raise ValueError('--gnet was given without a guidance weight; pass --guidance=W (1 = no guidance, EDM2 publishes values from 1.2 to 2.9).')
    if guidance is not None and not guidance >= 0:
        raise ValueError(f'--guidance={guidance:g} is negative; pass a weight of 0 or more (0 = the guide alone, 1 = no guidance).')

class GuidedDenoiser(torch.nn.Module):
    """D_g + w (D - D_g) of a network and its guide, behind EDM's network interface."""

    def __init__(self,
        net,                # The guided network D.
        gnet,               # The guiding network D_g.
        guidance,           # Guidance weight w >= 0; 1 = D alone.
        gnet_name = None,   # Where the guide came from (path or URL), for the records.
    ):
        super().__init__()
        check_guide(net, gnet)
        check_guidance(gnet, guidance)
        self.net = net
        self.gnet = gnet
        self.guidance = float(guidance)
        self.gnet_name = gnet_name
        self.img_resolution = net.img_resolution
        self.img_channels = net.img_channels
        self.label_dim = net.label_dim
        (min_a, max_a, self._round), (min_b, max_b, _) = samplers.noise_range(net), samplers.noise_range(gnet)
        self.sigma_min = max(min_a, min_b)
        self.sigma_max = min(max_a, max_b)

    def round_sigma(self, sigma):
        return self._round(sigma)

    @property
    def use_fp16(self):
        return bool(getattr(self.net, 'use_fp16', False))

    @use_fp16.setter
    def use_fp16(self, value):
        for module in (self.net, self.gnet):
            if hasattr(module, 'use_fp16'):
                module.use_fp16 = bool(value)

    def forward(self, x, sigma, class_labels=None, **kwargs):
        D = self.net(x, sigma, class_labels, **kwargs)
        if self.guidance == 1:
            return D
        D_g = self.gnet(x, sigma, class_labels if self.gnet.label_dim else None, **kwargs)
        D_g = D_g.to(D.dtype)
        return D_g + self.guidance * (D - D_g)

def guided(net, gnet=None, guidance=None, gnet_name=None):
    """`net` guided by `gnet` with weight `guidance`, or `net` itself without a guide (checked)."""
    check_guidance(gnet, guidance)
    return net if gnet is None else GuidedDenoiser(net, gnet, guidance, gnet_name=gnet_name)

def _guided(net):
    """The GuidedDenoiser in `net` (a precision.Teacher's network included), else None."""
    net = net.net if isinstance(net, precision.Teacher) else net
    return net if isinstance(net, GuidedDenoiser) else None

def unwrap(net):
    """The guided network of a GuidedDenoiser (also inside a precision.Teacher), else `net` itself."""
    return net if _guided(net) is None else _guided(net).net

def describe(net):
    """The guidance of a network as plain data: dict(weight, gnet) for a GuidedDenoiser, None for a network alone."""
    guided_net = _guided(net)
    return None if guided_net is None else dict(weight=guided_net.guidance, gnet=guided_net.gnet_name)

def describe_text(gnet_name, guidance):
    """' guided by "<gnet>" (guidance <w>)' for a guide, else ''."""
    return f' guided by "{gnet_name}" (guidance {guidance:g})' if gnet_name is not None else ''

#----------------------------------------------------------------------------

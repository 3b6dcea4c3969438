"""EDM2's guidance: D_g + w (D - D_g) of a network D and an unconditional or weaker guide D_g."""

import torch

from training import precision
from training import samplers

#----------------------------------------------------------------------------

def check_guide(net, gnet, where='The guide'):
    """Raise ValueError unless `gnet` has `net`'s resolution and channels, and no classes or `net`'s."""
    for attr, what in [('img_resolution', 'resolution'), ('img_channels', 'channel count')]:
        theirs, ours = getattr(gnet, attr, None), getattr(net, attr, None)
        if theirs != ours:
            raise ValueError(f'{where} has {what} {theirs}, but the guided network has {ours}; '
                f'pass a guide of the network\'s {what}.')
    if gnet.label_dim not in (0, net.label_dim):
        raise ValueError(f'{where} is conditioned on {gnet.label_dim} classes, but the guided network on '
            f'{net.label_dim}; pass an unconditional guide (classifier-free guidance) '
            f'or one of the network\'s classes (autoguidance).')

class GuidedDenoiser(torch.nn.Module):
    """D_g + w (D - D_g) of a network and its guide, behind EDM's network interface."""

    def __init__(self,
        net,                # The guided network D.
        gnet,               # The guiding network D_g.
        guidance,           # Guidance weight w >= 0; 1 = D alone.
        gnet_name = None,   # Path or URL of the guide, for the records.
    ):
        super().__init__()
        check_guide(net, gnet)
        assert guidance >= 0
        self.net, self.gnet, self.guidance, self.gnet_name = net, gnet, float(guidance), gnet_name
        self.img_resolution, self.img_channels, self.label_dim = net.img_resolution, net.img_channels, net.label_dim
        (min_a, max_a, self._round), (min_b, max_b, _) = samplers.noise_range(net), samplers.noise_range(gnet)
        self.sigma_min, self.sigma_max = max(min_a, min_b), min(max_a, max_b)

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
        D_g = self.gnet(x, sigma, class_labels if self.gnet.label_dim else None, **kwargs).to(D.dtype)
        return D_g + self.guidance * (D - D_g)

def guided(net, gnet=None, guidance=None, gnet_name=None):
    assert (gnet is None) == (guidance is None)
    return net if gnet is None else GuidedDenoiser(net, gnet, guidance, gnet_name=gnet_name)

def _guided(net): # The GuidedDenoiser of `net`, also inside a precision.Teacher, else None.
    net = net.net if isinstance(net, precision.Teacher) else net
    return net if isinstance(net, GuidedDenoiser) else None

def unwrap(net):
    """The network that `net`'s GuidedDenoiser guides, else `net` itself."""
    return net if _guided(net) is None else _guided(net).net

def describe(net):
    """dict(weight, gnet) of a GuidedDenoiser, None for a network alone."""
    guided_net = _guided(net)
    return None if guided_net is None else dict(weight=guided_net.guidance, gnet=guided_net.gnet_name)

def describe_text(gnet_name, guidance):
    return f' guided by "{gnet_name}" (guidance {guidance:g})' if gnet_name is not None else ''

#----------------------------------------------------------------------------

"""Numerical comparisons shared by the network, persistence and distillation tests."""

import torch

def relative_error(ours, ref):
    """Largest absolute difference, relative to the largest magnitude of ref (at least 1), in float64."""
    ours = torch.as_tensor(ours).detach().to(torch.float64)
    ref = torch.as_tensor(ref).detach().to(torch.float64)
    return float((ours - ref).abs().max() / max(1.0, float(ref.abs().max())))

def output_and_gradients(net, *inputs):
    """The output of one forward pass and the parameter gradients of its sum of squares, by name."""
    out = net(*inputs)
    out.square().sum().backward()
    return out.detach(), {name: p.grad for name, p in net.named_parameters() if p.grad is not None}

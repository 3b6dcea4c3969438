"""A stand-in for the Inception-v3 detector that the FID tests pickle: a fixed
random projection of the pixels, called as net(uint8 images, return_features=True)."""

import numpy as np
import torch

from torch_utils import persistence

@persistence.persistent_class
class ProjectionDetector(torch.nn.Module):
    def __init__(self,
        in_dim,             # C*H*W of the images it takes (C = 3: grayscale arrives repeated).
        out_dim = 32,       # Number of features.
        seed    = 0,        # Seed of the projection.
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer('weight', torch.randn([in_dim, out_dim], generator=gen, dtype=torch.float64) / in_dim ** 0.5)

    def forward(self, images, return_features=False):
        assert return_features and images.dtype == torch.uint8
        x = images.to(torch.float64).flatten(1) / 127.5 - 1
        return torch.tanh(x @ self.weight)

def features_numpy(images, weight):
    """The same features, computed with numpy from uint8 images [N, 3, H, W]."""
    x = images.reshape(images.shape[0], -1).astype(np.float64) / 127.5 - 1
    return np.tanh(x @ weight)

"""A stand-in for DINOv2 ViT-L/14 that the tests build: a random state dict with
the names and layout of the published dinov2_vitl14_pretrain.pth, only tiny
(64 channels: one head of DINOv2's 64 channels; 2 blocks; 14-pixel patches; a
4x4 stored position grid, interpolated to the 16x16 patches of 224x224 input)."""

import torch

def standin_state_dict(dim=64, depth=2, hidden=96, patch=14, grid=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=0.2: torch.randn(shape, generator=gen) * scale
    state = {'cls_token': rand(1, 1, dim), 'pos_embed': rand(1, grid * grid + 1, dim), 'mask_token': torch.zeros(1, dim),
        'patch_embed.proj.weight': rand(dim, 3, patch, patch, scale=0.05), 'patch_embed.proj.bias': rand(dim)}
    for i in range(depth):
        b = f'blocks.{i}.'
        state.update({b + 'norm1.weight': 1 + rand(dim), b + 'norm1.bias': rand(dim),
            b + 'attn.qkv.weight': rand(3 * dim, dim), b + 'attn.qkv.bias': rand(3 * dim),
            b + 'attn.proj.weight': rand(dim, dim), b + 'attn.proj.bias': rand(dim), b + 'ls1.gamma': rand(dim),
            b + 'norm2.weight': 1 + rand(dim), b + 'norm2.bias': rand(dim),
            b + 'mlp.fc1.weight': rand(hidden, dim), b + 'mlp.fc1.bias': rand(hidden),
            b + 'mlp.fc2.weight': rand(dim, hidden), b + 'mlp.fc2.bias': rand(dim), b + 'ls2.gamma': rand(dim)})
    state.update({'norm.weight': 1 + rand(dim), 'norm.bias': rand(dim)})
    return state

def save_standin(path, **kwargs):
    torch.save(standin_state_dict(**kwargs), str(path))
    return str(path)

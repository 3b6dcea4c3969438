"""DINOv2's vision transformer (Oquab et al. 2023) as far as `model(x)` of facebookresearch/dinov2 needs it
(the normalized class token), with the parameter names of the published state dicts."""

import re

import torch

HEAD_DIM = 64               # Channels per attention head of every published DINOv2.
INTERPOLATE_OFFSET = 0.1    # DINOv2's offset of the patch grid in interpolating the position embedding.

#----------------------------------------------------------------------------

class Attention(torch.nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = torch.nn.Linear(dim, dim * 3)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, t, c))

class Mlp(torch.nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = torch.nn.Linear(dim, hidden_dim)
        self.fc2 = torch.nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(x)))

class LayerScale(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma

class Block(torch.nn.Module):
    def __init__(self, dim, num_heads, hidden_dim):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = torch.nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, hidden_dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))

class PatchEmbed(torch.nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)

#----------------------------------------------------------------------------

class VisionTransformer(torch.nn.Module):
    def __init__(self, embed_dim, depth, num_heads, hidden_dim, patch_size, grid_size):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, grid_size ** 2 + 1, embed_dim))
        self.mask_token = torch.nn.Parameter(torch.zeros(1, embed_dim)) # Unused, but in the state dict.
        self.blocks = torch.nn.ModuleList([Block(embed_dim, num_heads, hidden_dim) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(embed_dim, eps=1e-6)

    def position_embedding(self, rows, cols):
        """The stored embedding, interpolated to a grid of rows x cols patches."""
        pos = self.pos_embed.float()
        grid = int(round((pos.shape[1] - 1) ** 0.5))
        if rows == grid and cols == grid:
            return pos
        patches = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        scale = ((rows + INTERPOLATE_OFFSET) / grid, (cols + INTERPOLATE_OFFSET) / grid)
        patches = torch.nn.functional.interpolate(patches, scale_factor=scale, mode='bicubic', antialias=False)
        return torch.cat([pos[:, :1], patches.permute(0, 2, 3, 1).reshape(1, rows * cols, -1)], dim=1)

    def forward(self, x):
        """Features [N, embed_dim] of normalized images [N, 3, H, W]."""
        rows, cols = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_embedding(rows, cols).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 0]

def from_state_dict(state, name='DINOv2'):
    """The VisionTransformer of a published DINOv2 state dict, in evaluation mode."""
    try:
        dim = state['cls_token'].shape[-1]
        depth = sum(re.fullmatch(r'blocks\.\d+\.norm1\.weight', key) is not None for key in state)
        net = VisionTransformer(embed_dim=dim, depth=depth, num_heads=dim // HEAD_DIM,
            hidden_dim=state['blocks.0.mlp.fc1.weight'].shape[0], patch_size=state['patch_embed.proj.weight'].shape[-1],
            grid_size=int(round((state['pos_embed'].shape[1] - 1) ** 0.5)))
        net.load_state_dict(state, strict=True)
    except (KeyError, AttributeError, TypeError, RuntimeError) as err:
        raise ValueError(f'{name} is not the state dict of a DINOv2 vision transformer ({type(err).__name__}: '
            f'{str(err).splitlines()[0]}); pass the published dinov2_vitl14_pretrain.pth.') from err
    return net.eval().requires_grad_(False)

#----------------------------------------------------------------------------

"""EDM's non-leaking augmentation (Karras et al. 2022, after ADA): AugmentPipe(images) returns the images and the
per-image `augment_labels` the network receives (9 with EDM's train.py settings)."""

import numpy as np
import torch
from torch_utils import misc
from torch_utils import persistence

#----------------------------------------------------------------------------
# Low-pass filter of the sym6 wavelet, for the geometric transformations.

SYM6_LOWPASS = [
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
]

#----------------------------------------------------------------------------
# Homogeneous transformation matrices [*batch, rows, cols] of numbers or batch-shaped tensors.

def matrix(*rows, device=None):
    assert all(len(row) == len(rows[0]) for row in rows)
    entries = [v for row in rows for v in row]
    like = next((v for v in entries if isinstance(v, torch.Tensor)), None)
    if like is None:
        return misc.constant(np.asarray(rows), device=device)
    entries = [v if isinstance(v, torch.Tensor) else misc.constant(v, shape=like.shape, device=like.device)
        for v in entries]
    return torch.stack(entries, dim=-1).reshape(like.shape + (len(rows), -1))

def translate2d(tx, ty, **kwargs):
    return matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], **kwargs)

def translate3d(tx, ty, tz, **kwargs):
    return matrix([1, 0, 0, tx], [0, 1, 0, ty], [0, 0, 1, tz], [0, 0, 0, 1], **kwargs)

def scale2d(sx, sy, **kwargs):
    return matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], **kwargs)

def scale3d(sx, sy, sz, **kwargs):
    return matrix([sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1], **kwargs)

def rotate2d(theta, **kwargs):
    c, s = torch.cos(theta), torch.sin(theta)
    return matrix([c, torch.sin(-theta), 0], [s, c, 0], [0, 0, 1], **kwargs)

def rotate3d(v, theta, **kwargs):
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    s, c = torch.sin(theta), torch.cos(theta)
    d = 1 - c
    return matrix(
        [x * x * d + c,     x * y * d - z * s, x * z * d + y * s, 0],
        [y * x * d + z * s, y * y * d + c,     y * z * d - x * s, 0],
        [z * x * d - y * s, z * y * d + x * s, z * z * d + c,     0],
        [0,                 0,                 0,                 1],
        **kwargs)

#----------------------------------------------------------------------------

@persistence.persistent_class
class AugmentPipe:
    """Each augmentation applies with probability p times its multiplier (0 = off); *_std and *_max set strengths."""

    def __init__(self, p=1,
        xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125,
        scale=0, rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1, aniso_std=0.2,
        aniso_rotate_prob=0.5, translate_frac_std=0.125,
        brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2, contrast_std=0.5, hue_max=1,
        saturation_std=1,
    ):
        for name, value in dict(locals()).items():
            if name != 'self':
                setattr(self, name, float(value))

    def __call__(self, images):
        """(augmented images, labels [N, L]) of images [N, C, H, W]."""
        N = images.shape[0]
        labels = [torch.zeros([N, 0], device=images.device)]
        images = self._blit(images, labels)
        images = self._geometric(images, labels)
        images = self._color(images, labels)
        labels = torch.cat([v.to(torch.float32).reshape(N, -1) for v in labels], dim=1)
        return images, labels

    def _gate(self, w, multiplier, shape=None):
        """`w` where chosen with probability multiplier * p, else 0."""
        chosen = torch.rand(w.shape if shape is None else shape, device=w.device) < multiplier * self.p
        return torch.where(chosen, w, torch.zeros_like(w))

    def _blit(self, images, labels):
        """Flips, 90-degree rotations and integer translations."""
        N, C, H, W = images.shape
        device = images.device
        per_image = [N, 1, 1, 1]

        for prob, axis in [(self.xflip, 3), (self.yflip, 2)]:
            if prob > 0:
                w = self._gate(torch.randint(2, per_image, device=device), prob)
                images = torch.where(w == 1, images.flip(axis), images)
                labels.append(w)

        if self.rotate_int > 0:
            w = self._gate(torch.randint(4, per_image, device=device), self.rotate_int)
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels.extend([(w == 1) | (w == 2), (w == 2) | (w == 3)])

        if self.translate_int > 0:
            w = self._gate(torch.rand([2, N, 1, 1, 1], device=device) * 2 - 1, self.translate_int, [1, N, 1, 1, 1])
            tx = w[0].mul(W * self.translate_int_max).round().to(torch.int64)
            ty = w[1].mul(H * self.translate_int_max).round().to(torch.int64)
            b, c, y, x = torch.meshgrid(*(torch.arange(n, device=device) for n in images.shape), indexing='ij')
            x = W - 1 - (W - 1 - (x - tx) % (W * 2 - 2)).abs() # Mirror at the borders.
            y = H - 1 - (H - 1 - (y + ty) % (H * 2 - 2)).abs()
            images = images.flatten()[(((b * C) + c) * H + y) * W + x]
            labels.extend([tx.div(W * self.translate_int_max), ty.div(H * self.translate_int_max)])
        return images

    def _geometric(self, images, labels):
        """Scaling, rotation, anisotropy and fractional translation."""
        N, C, H, W = images.shape
        device = images.device
        G_inv = I_3 = torch.eye(3, device=device)

        if self.scale > 0:
            w = self._gate(torch.randn([N], device=device), self.scale)
            s = w.mul(self.scale_std).exp2()
            G_inv = G_inv @ scale2d(1 / s, 1 / s)
            labels.append(w)

        if self.rotate_frac > 0:
            w = self._gate((torch.rand([N], device=device) * 2 - 1) * (np.pi * self.rotate_frac_max), self.rotate_frac)
            G_inv = G_inv @ rotate2d(w)
            labels.extend([w.cos() - 1, w.sin()])

        if self.aniso > 0:
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * np.pi
            w = self._gate(w, self.aniso)
            r = torch.where(torch.rand([N], device=device) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = w.mul(self.aniso_std).exp2()
            G_inv = G_inv @ rotate2d(-r) @ scale2d(1 / s, 1 / (1 / s)) @ rotate2d(r)
            labels.extend([w * r.cos(), w * r.sin()])

        if self.translate_frac > 0:
            w = self._gate(torch.randn([2, N], device=device), self.translate_frac, [1, N])
            std = self.translate_frac_std
            G_inv = G_inv @ translate2d(-w[0].mul(W * std), -w[1].mul(H * std))
            labels.extend([w[0], w[1]])

        if G_inv is I_3:
            return images

        # Reflect-pad to cover the transformed corners.
        conv2d = torch.nn.functional.conv2d
        cx, cy = (W - 1) / 2, (H - 1) / 2
        corners = matrix([-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1], device=device) # [corner, xyz]
        corners = G_inv @ corners.t() # [batch, xyz, corner]
        Hz = np.asarray(SYM6_LOWPASS, dtype=np.float32)
        Hz_pad = len(Hz) // 4
        reach = corners[:, :2, :].permute(1, 0, 2).flatten(1) # [xy, batch * corner]
        reach = torch.cat([-reach, reach]).max(dim=1).values # [x0, y0, x1, y1]
        reach = reach + misc.constant([Hz_pad * 2 - cx, Hz_pad * 2 - cy] * 2, device=device)
        reach = reach.max(misc.constant([0, 0] * 2, device=device))
        reach = reach.min(misc.constant([W - 1, H - 1] * 2, device=device))
        mx0, my0, mx1, my1 = reach.ceil().to(torch.int32)
        images = torch.nn.functional.pad(input=images, pad=[mx0, mx1, my0, my1], mode='reflect')
        G_inv = translate2d((mx0 - mx1) / 2, (my0 - my1) / 2) @ G_inv

        # Upsample 2x.
        taps = misc.constant(Hz[None, None, ::-1], dtype=images.dtype, device=device).tile([C, 1, 1])
        pad = (len(Hz) + 1) // 2
        images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
        images = conv2d(images, taps.unsqueeze(2), groups=C, padding=[0, pad])
        images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
        images = conv2d(images, taps.unsqueeze(3), groups=C, padding=[pad, 0])
        G_inv = scale2d(2, 2, device=device) @ G_inv @ scale2d(1 / 2, 1 / 2, device=device)
        G_inv = translate2d(-0.5, -0.5, device=device) @ G_inv @ translate2d(0.5, 0.5, device=device)

        # Resample.
        shape = [N, C, (H + Hz_pad * 2) * 2, (W + Hz_pad * 2) * 2]
        to_unit = scale2d(2 / images.shape[3], 2 / images.shape[2], device=device)
        G_inv = to_unit @ G_inv @ scale2d(1 / (2 / shape[3]), 1 / (2 / shape[2]), device=device)
        grid = torch.nn.functional.affine_grid(theta=G_inv[:, :2, :], size=shape, align_corners=False)
        images = torch.nn.functional.grid_sample(images, grid, mode='bilinear', padding_mode='zeros',
            align_corners=False)

        # Downsample 2x and crop.
        taps = misc.constant(Hz[None, None, :], dtype=images.dtype, device=device).tile([C, 1, 1])
        pad = (len(Hz) - 1) // 2
        images = conv2d(images, taps.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, pad])[:, :, :, Hz_pad : -Hz_pad]
        return conv2d(images, taps.unsqueeze(3), groups=C, stride=[2, 1], padding=[pad, 0])[:, :, Hz_pad : -Hz_pad, :]

    def _color(self, images, labels):
        """Brightness, contrast, luma flip, hue and saturation."""
        N, C, H, W = images.shape
        device = images.device
        M = I_4 = torch.eye(4, device=device)
        luma = misc.constant(np.asarray([1, 1, 1, 0]) / np.sqrt(3), device=device)

        if self.brightness > 0:
            w = self._gate(torch.randn([N], device=device), self.brightness)
            b = w * self.brightness_std
            M = translate3d(b, b, b) @ M
            labels.append(w)

        if self.contrast > 0:
            w = self._gate(torch.randn([N], device=device), self.contrast)
            c = w.mul(self.contrast_std).exp2()
            M = scale3d(c, c, c) @ M
            labels.append(w)

        if self.lumaflip > 0:
            w = self._gate(torch.randint(2, [N, 1, 1], device=device), self.lumaflip)
            M = (I_4 - 2 * luma.ger(luma) * w) @ M
            labels.append(w)

        if self.hue > 0:
            w = self._gate((torch.rand([N], device=device) * 2 - 1) * (np.pi * self.hue_max), self.hue)
            M = rotate3d(luma, w) @ M
            labels.extend([w.cos() - 1, w.sin()])

        if self.saturation > 0:
            w = self._gate(torch.randn([N, 1, 1], device=device), self.saturation)
            M = (luma.ger(luma) + (I_4 - luma.ger(luma)) * w.mul(self.saturation_std).exp2()) @ M
            labels.append(w)

        if M is I_4:
            return images
        images = images.reshape([N, C, H * W])
        if C == 3:
            images = M[:, :3, :3] @ images + M[:, :3, 3:]
        elif C == 1:
            M = M[:, :3, :].mean(dim=1, keepdims=True)
            images = images * M[:, :, :3].sum(dim=2, keepdims=True) + M[:, :, 3:]
        else:
            raise ValueError(f'Color augmentation needs 1 or 3 channels, not {C} channels; turn it off.')
        return images.reshape([N, C, H, W])

#----------------------------------------------------------------------------

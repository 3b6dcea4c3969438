"""Non-leaking augmentation of EDM (Karras et al. 2022), after ADA (Karras et al. 2020).

`AugmentPipe(images)` returns the augmented images and, for every image, the
vector of augmentation parameters that the network receives as
`augment_labels`; conditioning on it keeps the augmentations from leaking
into the generated distribution. With the settings of EDM's train.py
(`xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1`) the
vector has 9 entries, in this order: x-flip, y-flip, log2 scale / scale_std,
cos(angle) - 1, sin(angle), the two components of the anisotropy vector, and
the fractional x and y translations. Every entry is zero when no
augmentation was applied.
"""

import numpy as np
import torch
from torch_utils import misc
from torch_utils import persistence

#----------------------------------------------------------------------------
# Low-pass filter of the sym6 wavelet, used to resample around the geometric
# transformations.

SYM6_LOWPASS = [
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
]

#----------------------------------------------------------------------------
# Homogeneous transformation matrices. Each entry is a Python number or a
# tensor of batch shape; the result has shape [*batch, rows, cols].

def matrix(*rows, device=None):
    """Assemble a (batched) matrix from rows of numbers and tensors."""
    if any(len(row) != len(rows[0]) for row in rows):
        raise ValueError('matrix() got rows of different lengths; give every row the same number of entries.')
    entries = [v for row in rows for v in row]
    like = next((v for v in entries if isinstance(v, torch.Tensor)), None)
    if like is None:
        return misc.constant(np.asarray(rows), device=device)
    entries = [v if isinstance(v, torch.Tensor) else misc.constant(v, shape=like.shape, device=like.device) for v in entries]
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
    """Rotation by `theta` about the unit axis `v` (Rodrigues' formula), as a 4x4 matrix."""
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    s, c = torch.sin(theta), torch.cos(theta)
    d = 1 - c
    return matrix(
        [x * x * d + c,     x * y * d - z * s, x * z * d + y * s, 0],
        [y * x * d + z * s, y * y * d + c,     y * z * d - x * s, 0],
        [z * x * d - y * s, z * y * d + x * s, z * z * d + c,     0],
        [0,                 0,                 0,                 1],
        **kwargs)

def translate2d_inv(tx, ty, **kwargs):
    return translate2d(-tx, -ty, **kwargs)

def scale2d_inv(sx, sy, **kwargs):
    return scale2d(1 / sx, 1 / sy, **kwargs)

def rotate2d_inv(theta, **kwargs):
    return rotate2d(-theta, **kwargs)

#----------------------------------------------------------------------------

@persistence.persistent_class
class AugmentPipe:
    """EDM's augmentation pipeline; every augmentation is off unless its probability multiplier is set."""

    def __init__(self,
        p                   = 1,        # Global multiplier of all augmentation probabilities.

        xflip               = 0,        # Probability multiplier of horizontal flips.
        yflip               = 0,        # Probability multiplier of vertical flips.
        rotate_int          = 0,        # Probability multiplier of rotations by multiples of 90 degrees.
        translate_int       = 0,        # Probability multiplier of integer translations.
        translate_int_max   = 0.125,    # Largest integer translation, relative to the image size.

        scale               = 0,        # Probability multiplier of isotropic scaling.
        rotate_frac         = 0,        # Probability multiplier of arbitrary rotations.
        aniso               = 0,        # Probability multiplier of anisotropic scaling.
        translate_frac      = 0,        # Probability multiplier of fractional translations.
        scale_std           = 0.2,      # Standard deviation of log2 of the isotropic scale.
        rotate_frac_max     = 1,        # Largest rotation angle, in half turns (1 = full circle).
        aniso_std           = 0.2,      # Standard deviation of log2 of the anisotropic scale.
        aniso_rotate_prob   = 0.5,      # Probability of anisotropic scaling along a rotated axis.
        translate_frac_std  = 0.125,    # Standard deviation of fractional translations, relative to the image size.

        brightness          = 0,        # Probability multiplier of brightness shifts.
        contrast            = 0,        # Probability multiplier of contrast scaling.
        lumaflip            = 0,        # Probability multiplier of luma flips.
        hue                 = 0,        # Probability multiplier of hue rotations.
        saturation          = 0,        # Probability multiplier of saturation scaling.
        brightness_std      = 0.2,      # Standard deviation of brightness shifts.
        contrast_std        = 0.5,      # Standard deviation of log2 of the contrast.
        hue_max             = 1,        # Largest hue rotation, in half turns (1 = full circle).
        saturation_std      = 1,        # Standard deviation of log2 of the saturation.
    ):
        super().__init__()
        self.p = float(p)
        self.xflip = float(xflip)
        self.yflip = float(yflip)
        self.rotate_int = float(rotate_int)
        self.translate_int = float(translate_int)
        self.translate_int_max = float(translate_int_max)
        self.scale = float(scale)
        self.rotate_frac = float(rotate_frac)
        self.aniso = float(aniso)
        self.translate_frac = float(translate_frac)
        self.scale_std = float(scale_std)
        self.rotate_frac_max = float(rotate_frac_max)
        self.aniso_std = float(aniso_std)
        self.aniso_rotate_prob = float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.lumaflip = float(lumaflip)
        self.hue = float(hue)
        self.saturation = float(saturation)
        self.brightness_std = float(brightness_std)
        self.contrast_std = float(contrast_std)
        self.hue_max = float(hue_max)
        self.saturation_std = float(saturation_std)

    def __call__(self, images):
        """Augment a batch [N, C, H, W]; returns (images, labels [N, L]) with L set by the enabled augmentations."""
        N = images.shape[0]
        labels = [torch.zeros([N, 0], device=images.device)]
        images = self._blit(images, labels)
        images = self._geometric(images, labels)
        images = self._color(images, labels)
        labels = torch.cat([v.to(torch.float32).reshape(N, -1) for v in labels], dim=1)
        return images, labels

    def _chosen(self, shape, multiplier, device):
        """Boolean mask: which samples receive an augmentation of probability `multiplier * p`."""
        return torch.rand(shape, device=device) < multiplier * self.p

    def _blit(self, images, labels):
        """Flips, 90-degree rotations and integer translations (exact pixel moves)."""
        N, C, H, W = images.shape
        device = images.device
        per_image = [N, 1, 1, 1]

        if self.xflip > 0:
            w = torch.randint(2, per_image, device=device)
            w = torch.where(self._chosen(per_image, self.xflip, device), w, torch.zeros_like(w))
            images = torch.where(w == 1, images.flip(3), images)
            labels.append(w)

        if self.yflip > 0:
            w = torch.randint(2, per_image, device=device)
            w = torch.where(self._chosen(per_image, self.yflip, device), w, torch.zeros_like(w))
            images = torch.where(w == 1, images.flip(2), images)
            labels.append(w)

        if self.rotate_int > 0:
            w = torch.randint(4, per_image, device=device)
            w = torch.where(self._chosen(per_image, self.rotate_int, device), w, torch.zeros_like(w))
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels.extend([(w == 1) | (w == 2), (w == 2) | (w == 3)])

        if self.translate_int > 0:
            w = torch.rand([2, N, 1, 1, 1], device=device) * 2 - 1
            w = torch.where(self._chosen([1, N, 1, 1, 1], self.translate_int, device), w, torch.zeros_like(w))
            tx = w[0].mul(W * self.translate_int_max).round().to(torch.int64)
            ty = w[1].mul(H * self.translate_int_max).round().to(torch.int64)
            b, c, y, x = torch.meshgrid(*(torch.arange(n, device=device) for n in images.shape), indexing='ij')
            x = W - 1 - (W - 1 - (x - tx) % (W * 2 - 2)).abs() # Mirror at the borders.
            y = H - 1 - (H - 1 - (y + ty) % (H * 2 - 2)).abs()
            images = images.flatten()[(((b * C) + c) * H + y) * W + x]
            labels.extend([tx.div(W * self.translate_int_max), ty.div(H * self.translate_int_max)])
        return images

    def _geometric(self, images, labels):
        """Scaling, rotation, anisotropy and fractional translation, resampled at 2x through the sym6 filter."""
        N, C, H, W = images.shape
        device = images.device
        I_3 = torch.eye(3, device=device)
        G_inv = I_3

        if self.scale > 0:
            w = torch.randn([N], device=device)
            w = torch.where(self._chosen([N], self.scale, device), w, torch.zeros_like(w))
            s = w.mul(self.scale_std).exp2()
            G_inv = G_inv @ scale2d_inv(s, s)
            labels.append(w)

        if self.rotate_frac > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.rotate_frac_max)
            w = torch.where(self._chosen([N], self.rotate_frac, device), w, torch.zeros_like(w))
            G_inv = G_inv @ rotate2d_inv(-w)
            labels.extend([w.cos() - 1, w.sin()])

        if self.aniso > 0:
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * np.pi
            w = torch.where(self._chosen([N], self.aniso, device), w, torch.zeros_like(w))
            r = torch.where(torch.rand([N], device=device) < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = w.mul(self.aniso_std).exp2()
            G_inv = G_inv @ rotate2d_inv(r) @ scale2d_inv(s, 1 / s) @ rotate2d_inv(-r)
            labels.extend([w * r.cos(), w * r.sin()])

        if self.translate_frac > 0:
            w = torch.randn([2, N], device=device)
            w = torch.where(self._chosen([1, N], self.translate_frac, device), w, torch.zeros_like(w))
            G_inv = G_inv @ translate2d_inv(w[0].mul(W * self.translate_frac_std), w[1].mul(H * self.translate_frac_std))
            labels.extend([w[0], w[1]])

        if G_inv is I_3:
            return images

        # Reflect-pad just enough to cover the transformed image corners.
        cx = (W - 1) / 2
        cy = (H - 1) / 2
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

        # Upsample 2x: zero insertion followed by the reversed filter, per axis.
        taps = misc.constant(Hz[None, None, ::-1], dtype=images.dtype, device=device).tile([C, 1, 1])
        pad = (len(Hz) + 1) // 2
        images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
        images = torch.nn.functional.conv2d(images, taps.unsqueeze(2), groups=C, padding=[0, pad])
        images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
        images = torch.nn.functional.conv2d(images, taps.unsqueeze(3), groups=C, padding=[pad, 0])
        G_inv = scale2d(2, 2, device=device) @ G_inv @ scale2d_inv(2, 2, device=device)
        G_inv = translate2d(-0.5, -0.5, device=device) @ G_inv @ translate2d_inv(-0.5, -0.5, device=device)

        # Resample bilinearly in normalised coordinates.
        shape = [N, C, (H + Hz_pad * 2) * 2, (W + Hz_pad * 2) * 2]
        G_inv = scale2d(2 / images.shape[3], 2 / images.shape[2], device=device) @ G_inv @ scale2d_inv(2 / shape[3], 2 / shape[2], device=device)
        grid = torch.nn.functional.affine_grid(theta=G_inv[:, :2, :], size=shape, align_corners=False)
        images = torch.nn.functional.grid_sample(images, grid, mode='bilinear', padding_mode='zeros', align_corners=False)

        # Downsample 2x with the filter and crop the margin.
        taps = misc.constant(Hz[None, None, :], dtype=images.dtype, device=device).tile([C, 1, 1])
        pad = (len(Hz) - 1) // 2
        images = torch.nn.functional.conv2d(images, taps.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, pad])[:, :, :, Hz_pad : -Hz_pad]
        images = torch.nn.functional.conv2d(images, taps.unsqueeze(3), groups=C, stride=[2, 1], padding=[pad, 0])[:, :, Hz_pad : -Hz_pad, :]
        return images

    def _color(self, images, labels):
        """Brightness, contrast, luma flip, hue and saturation as one 4x4 color matrix per image."""
        N, C, H, W = images.shape
        device = images.device
        I_4 = torch.eye(4, device=device)
        M = I_4
        luma = misc.constant(np.asarray([1, 1, 1, 0]) / np.sqrt(3), device=device)

        if self.brightness > 0:
            w = torch.randn([N], device=device)
            w = torch.where(self._chosen([N], self.brightness, device), w, torch.zeros_like(w))
            b = w * self.brightness_std
            M = translate3d(b, b, b) @ M
            labels.append(w)

        if self.contrast > 0:
            w = torch.randn([N], device=device)
            w = torch.where(self._chosen([N], self.contrast, device), w, torch.zeros_like(w))
            c = w.mul(self.contrast_std).exp2()
            M = scale3d(c, c, c) @ M
            labels.append(w)

        if self.lumaflip > 0:
            w = torch.randint(2, [N, 1, 1], device=device)
            w = torch.where(self._chosen([N, 1, 1], self.lumaflip, device), w, torch.zeros_like(w))
            M = (I_4 - 2 * luma.ger(luma) * w) @ M
            labels.append(w)

        if self.hue > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.hue_max)
            w = torch.where(self._chosen([N], self.hue, device), w, torch.zeros_like(w))
            M = rotate3d(luma, w) @ M
            labels.extend([w.cos() - 1, w.sin()])

        if self.saturation > 0:
            w = torch.randn([N, 1, 1], device=device)
            w = torch.where(self._chosen([N, 1, 1], self.saturation, device), w, torch.zeros_like(w))
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
            raise ValueError(f'Color augmentation needs RGB (3 channels) or grayscale (1 channel) images, got {C} channels; disable brightness, contrast, lumaflip, hue and saturation.')
        return images.reshape([N, C, H, W])

#----------------------------------------------------------------------------

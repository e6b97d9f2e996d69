"""Non-leaking geometric augmentation (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", sec. 5 and appendix C.4).

Each training image is, with probability ``p`` per operation, flipped, shifted by whole pixels,
scaled, rotated, stretched and shifted by a fraction of a pixel. The parameters of what was done
are a vector of :data:`AUGMENT_DIM` numbers, all zero for the untouched image, that the U-Net
reads as extra conditioning (a bias-free linear layer added to its timestep embedding). The
network thus learns p(x | augmentation); sampling asks for "no augmentation" (the zero vector),
so rotated, shifted or scaled images never leak into the samples, while the network has seen
many more distinct images than the folder holds. DDPM's training objective (Ho et al. 2020,
Algorithm 1, eq. 14) is unchanged; only x0 and the network's conditioning are.

The vector determines the transform: :func:`draw` samples vectors, :func:`apply` warps images by
them (one batched ``grid_sample`` on the images' device, reflection at the borders as in EDM). Its
layout is EDM's, each entry divided by its operation's typical size (:data:`UNITS`), so that every
entry the network reads is of order 1 when its operation fires and 0 when it does not:

====  =======================================================================
0     horizontal flip: 1 if flipped
1, 2  whole-pixel shift in x and y, in units of 1/8 of the image side (at most 1)
3     log2 of the isotropic scale factor, in units of 0.2 octaves
4, 5  rotation angle a as (cos a - 1, sin a), in units of sin(pi/4)
6     log2 of the anisotropic stretch (x scaled by 2^s, y by 2^-s), in units of 0.2 octaves
7, 8  sub-pixel shift in x and y, in units of 1/8 of the image side
====  =======================================================================

Why the units: a 1-pixel shift of an 8x8 image is 1/8 of its side, and in EDM's raw units such a
vector is 0.125 away from "not augmented". A network is smooth in its inputs and Adam moves each
weight by about the learning rate per step whatever the input's size, so entries of 0.1 are learned
about 10x more slowly than entries of 1; until they are, the network at the zero vector predicts the
mixture of shifted images, which is exactly the leak the conditioning is there to prevent
(``benchmarks/augment.py`` measured it: samples' horizontal centre of mass spread twice as wide as
the real digits'). The transform a vector describes is unchanged by the units.

The operations are EDM's geometric ones; the ranges are narrower than EDM's (a quarter turn of
rotation rather than a full one, scales with a standard deviation of 0.2 octaves as in EDM) because
the CPU-sized models here have little capacity to spare for learning far-off transforms. Colour
operations are left out (not measured to help).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENT_DIM = 9
INT_SHIFT_MAX = 0.125  # whole-pixel shifts up to 1/8 of the side (EDM's translate_int_max)
SCALE_STD = 0.2  # log2 of the isotropic scale ~ N(0, 0.2^2) (EDM's scale_std)
ROTATE_MAX = math.pi / 4  # angle ~ U(-pi/4, pi/4); EDM rotates by up to a full turn
ANISO_STD = 0.2  # log2 of the stretch ~ N(0, 0.2^2) (EDM's aniso_std)
FRAC_SHIFT_STD = 0.125  # sub-pixel shift ~ N(0, 0.125^2) of the side (EDM's translate_frac_std)
#: Each entry's unit: the vector holds (EDM's parameter) / UNITS, so every entry is of order 1 when on.
UNITS = (1.0, INT_SHIFT_MAX, INT_SHIFT_MAX, SCALE_STD, math.sin(ROTATE_MAX), math.sin(ROTATE_MAX), ANISO_STD,
         FRAC_SHIFT_STD, FRAC_SHIFT_STD)  # fmt: skip


def draw(b: int, p: float, size: int, generator: torch.Generator, device: torch.device | str) -> torch.Tensor:
    """Augmentation vectors (b, AUGMENT_DIM) float32 on ``device``: each operation on with probability ``p``.

    Draws a fixed amount from ``generator`` (independent of ``p``), so the stream after it does not
    depend on which operations fired. ``size`` is the image side in pixels (whole-pixel shifts are
    multiples of 1 / size of the side). Entries are in :data:`UNITS`.
    """
    on = torch.rand((b, 6), generator=generator, device=device) < p  # one coin per operation
    u = torch.rand((b, 5), generator=generator, device=device)
    n = torch.randn((b, 4), generator=generator, device=device)
    flip = (u[:, 0] < 0.5).float()
    max_shift = math.floor(INT_SHIFT_MAX * size)
    shift = torch.floor(u[:, 1:3] * (2 * max_shift + 1)) - max_shift  # whole pixels in [-max, max]
    angle = (2 * u[:, 3] - 1) * ROTATE_MAX
    cols = [
        flip * on[:, 0],
        *(shift / size * on[:, 1:2]).unbind(1),
        n[:, 0] * SCALE_STD * on[:, 2],
        (torch.cos(angle) - 1) * on[:, 3],
        torch.sin(angle) * on[:, 3],
        n[:, 1] * ANISO_STD * on[:, 4],
        *(n[:, 2:4] * FRAC_SHIFT_STD * on[:, 5:6]).unbind(1),
    ]
    return torch.stack(cols, dim=1) / torch.tensor(UNITS, device=device)


def image_transform(labels: torch.Tensor) -> torch.Tensor:
    """The affine maps (B, 3, 3) the vectors describe, in ``grid_sample``'s [-1, 1] coordinates:
    a point q of the input image lands at M q of the augmented one (flip, stretch, scale, rotate, shift)."""
    b = labels.shape[0]
    labels = labels * torch.tensor(UNITS, dtype=labels.dtype, device=labels.device)  # EDM's parameters
    one, zero = torch.ones(b, device=labels.device), torch.zeros(b, device=labels.device)

    def mat(a, bb, c, d, tx, ty):
        return torch.stack([a, bb, tx, c, d, ty, zero, zero, one], dim=1).view(b, 3, 3)

    flip = mat(1 - 2 * labels[:, 0], zero, zero, one, zero, zero)
    stretch = mat(torch.exp2(labels[:, 6]), zero, zero, torch.exp2(-labels[:, 6]), zero, zero)
    s = torch.exp2(labels[:, 3])
    cos, sin = labels[:, 4] + 1, labels[:, 5]
    rotate_scale = mat(s * cos, -s * sin, s * sin, s * cos, zero, zero)
    # A fraction f of the side is 2 f in [-1, 1] coordinates.
    shift = mat(one, zero, zero, one, 2 * (labels[:, 1] + labels[:, 7]), 2 * (labels[:, 2] + labels[:, 8]))
    return shift @ rotate_scale @ stretch @ flip


def apply(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) float augmented as ``labels`` (B, AUGMENT_DIM) say; images whose vector is all
    zero are returned bit-for-bit. Bilinear resampling with reflection at the borders (EDM pads by reflection)."""
    inverse = torch.linalg.inv(image_transform(labels.float()))[:, :2, :]  # output pixel -> where to read it
    grid = F.affine_grid(inverse.to(x.dtype), list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    touched = (labels != 0).any(dim=1)[:, None, None, None]
    return torch.where(touched, warped, x)

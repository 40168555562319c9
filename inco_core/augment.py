"""Batched augmentations: K views of a whole batch in one call, on the batch's device, seeded.

The paper's set for every method: random resized crop, brightness, contrast, horizontal and
vertical flip. Crop and flips are one affine resampling per view (``grid_sample``), so a batch of
B images becomes K * B views without a Python loop over images.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from inco_core.config import AugmentConfig

# Fixed input normalisation of the 0..1 gray values (NEU-CLS mean 0.49, std 0.23 on this scale).
PIXEL_MEAN = 0.5
PIXEL_STD = 0.25


def to_input(images: Tensor) -> Tensor:
    """uint8 [B, C, H, W] -> normalised float [B, C, H, W], the network input without augmentation."""
    return (images.float() / 255.0 - PIXEL_MEAN) / PIXEL_STD


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def augment_views(
    images: Tensor,
    views: int,
    cfg: AugmentConfig,
    generator: torch.Generator,
    *,
    out_size: int | None = None,
) -> Tensor:
    """K independently augmented views of every image.

    images: [B, C, H, W] uint8 (or float in 0..1), on any device; ``generator`` must live on the
        same device.
    Returns: [views * B, C, S, S] normalised float (S = ``out_size`` or H); view v of image i is
        row v * B + i.
    Raises: ValueError for an empty batch or views < 1.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"augment_views expects a non-empty [B, C, H, W] batch, got {tuple(images.shape)}")
    if views < 1:
        raise ValueError(f"views must be >= 1 (got {views})")
    b, c, h, _ = images.shape
    size = out_size or h
    device = images.device
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    n = views * b
    x = x.repeat(views, 1, 1, 1)  # [V * B, C, H, W]

    # Random resized crop: area fraction s and aspect ratio r give half-sizes in [-1, 1] coordinates.
    area = _uniform(n, *cfg.crop_scale, generator, device)
    log_r = _uniform(n, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]), generator, device)
    ratio = torch.exp(log_r)
    half_w = torch.sqrt(area * ratio).clamp(max=1.0)
    half_h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = (2 * torch.rand(n, generator=generator, device=device) - 1) * (1 - half_w)
    cy = (2 * torch.rand(n, generator=generator, device=device) - 1) * (1 - half_h)
    flip_x = torch.where(torch.rand(n, generator=generator, device=device) < cfg.hflip, -1.0, 1.0)
    flip_y = torch.where(torch.rand(n, generator=generator, device=device) < cfg.vflip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = half_w * flip_x
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = half_h * flip_y
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    # Brightness then contrast (around each view's mean), clipped to the valid range.
    bright = _uniform(n, 1 - cfg.brightness, 1 + cfg.brightness, generator, device).view(n, 1, 1, 1)
    out = out * bright
    contrast = _uniform(n, 1 - cfg.contrast, 1 + cfg.contrast, generator, device).view(n, 1, 1, 1)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = ((out - mean) * contrast + mean).clamp(0.0, 1.0)
    return (out - PIXEL_MEAN) / PIXEL_STD

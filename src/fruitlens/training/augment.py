"""Batched augmentation on cached uint8 images: the original's rotation, zoom, shift and flip as one affine warp per
image (``affine_grid`` + ``grid_sample``), plus crop and colour jitter, for a whole batch in one call.

This is what makes augmented feature views cheap: no image is decoded twice.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fruitlens.config import AugmentConfig
from fruitlens.models.preprocessing import Preprocessing


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment_batch(x: torch.Tensor, aug: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """``x``: (N, 3, H, W) uint8 -> float in [0, 1] with a different random warp and jitter per image.

    Areas moved in from outside the image are white (Fruits-360 style studio background).
    """
    n = x.shape[0]
    img = x.float() / 255.0
    angle = _uniform(n, -aug.rotation, aug.rotation, g) * math.pi / 180
    zoom = _uniform(n, 1 - aug.zoom, 1 + aug.zoom, g)
    if aug.random_crop:  # crop 60-100% of the area, shown at full size
        zoom = zoom / torch.sqrt(_uniform(n, 0.6, 1.0, g))
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if aug.hflip else torch.ones(n)
    shift = 2 * aug.shift  # grid coordinates span [-1, 1]
    tx, ty = _uniform(n, -shift, shift, g), _uniform(n, -shift, shift, g)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img - 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1.0
    if aug.color_jitter:
        j = aug.color_jitter
        shape = (n, 1, 1, 1)
        img = img * _uniform(n, 1 - j, 1 + j, g).view(shape)
        gray = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]).unsqueeze(1)
        mean = gray.mean(dim=(2, 3), keepdim=True)
        img = (img - mean) * _uniform(n, 1 - j, 1 + j, g).view(shape) + mean
        gray = (0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]).unsqueeze(1)
        img = (img - gray) * _uniform(n, 1 - j, 1 + j, g).view(shape) + gray
    return img.clamp_(0, 1)


def normalise(img: torch.Tensor, pre: Preprocessing) -> torch.Tensor:
    """[0, 1] floats -> the model's normalisation (from its Preprocessing, never literals)."""
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    return (img - mean) / std

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


_GRAY = (0.299, 0.587, 0.114)  # luma weights; they sum to 1, which the colour matrix below relies on


def augment_batch(x: torch.Tensor, aug: AugmentConfig, g: torch.Generator) -> torch.Tensor:
    """``x``: (N, 3, H, W) uint8 -> float in [0, 1] with a different random warp and jitter per image.

    Areas moved in from outside the image are white (Fruits-360 style studio background). Brightness, contrast and
    saturation are all linear in colour, so they are applied as one 3x3 matrix plus offset per image: one pass over
    the pixels instead of a dozen (this runs for every augmented feature view).
    """
    n, dev = x.shape[0], x.device  # the random draws come from ``g`` on the CPU, the pixel work runs on x's device
    img = x.float().mul_(1 / 255.0).sub_(1.0)  # white -> 0, so that grid_sample's zero padding is white
    angle = _uniform(n, -aug.rotation, aug.rotation, g) * math.pi / 180
    zoom = _uniform(n, 1 - aug.zoom, 1 + aug.zoom, g)
    flip = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0) if aug.hflip else torch.ones(n)
    shift = 2 * aug.shift  # grid coordinates span [-1, 1]
    tx, ty = _uniform(n, -shift, shift, g), _uniform(n, -shift, shift, g)
    wx = wy = torch.ones(n)
    if aug.random_crop:  # RandomResizedCrop: min_crop_area..100% of the area, aspect 3:4..4:3, anywhere inside
        area = _uniform(n, aug.min_crop_area, 1.0, g)
        ratio = torch.exp(_uniform(n, math.log(3 / 4), math.log(4 / 3), g))
        wx, wy = torch.sqrt(area * ratio).clamp_(max=1.0), torch.sqrt(area / ratio).clamp_(max=1.0)
        # centres so that the outermost samples stay on pixel centres inside the image (no white blends in)
        h, w = img.shape[-2:]
        tx = tx + _uniform(n, -1, 1, g) * (1 - wx) * (1 - 1 / w)
        ty = ty + _uniform(n, -1, 1, g) * (1 - wy) * (1 - 1 / h)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos * flip * wx, -sin * wy, tx], 1), torch.stack([sin * flip * wx, cos * wy, ty], 1)], 1
    ).to(dev)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)  # v - 1
    if not aug.color_jitter:
        return img.add_(1.0).clamp_(0, 1)
    j = aug.color_jitter
    b, c, s = (_uniform(n, 1 - j, 1 + j, g).to(dev) for _ in range(3))
    w = torch.tensor(_GRAY, device=dev)
    # on v = img + 1: brightness v*b; contrast around the mean gray m = b*mean(gray(v)); saturation around each
    # pixel's gray: S = s*I + (1-s)*1w^T. Together (S 1 = 1 because w sums to 1): out = c*b*S v + (1-c)*m
    m = b * (img.mean(dim=(2, 3)) @ w + 1.0)
    sat = s.view(n, 1, 1) * torch.eye(3, device=dev) + (1 - s).view(n, 1, 1) * w.view(1, 1, 3)
    mat = (c * b).view(n, 1, 1) * sat
    offset = (c * b + (1 - c) * m).view(n, 1, 1)  # M*1 + (1-c)*m, so that M is applied to img = v - 1
    out = torch.baddbmm(offset, mat, img.reshape(n, 3, -1))
    return out.view_as(img).clamp_(0, 1)


class BatchInput:
    """uint8 image batches -> the model's input, on the batch's device: augmented views while training (the same
    warps and jitter as the feature cache's views, so both training paths see the same images), clean otherwise."""

    def __init__(self, pre: Preprocessing, aug: AugmentConfig, seed: int = 0) -> None:
        self.pre, self.aug, self.seed = pre, aug if aug.enabled else None, seed
        self.g: torch.Generator | None = None

    def __call__(self, x: torch.Tensor, train: bool, rank: int = 0) -> torch.Tensor:
        if not train or self.aug is None:
            return self.pre.normalise(x)
        if self.g is None:  # per process: DDP ranks draw different augmentations
            self.g = torch.Generator().manual_seed(self.seed + 1000 * rank)
        return self.pre.normalise(augment_batch(x, self.aug, self.g))

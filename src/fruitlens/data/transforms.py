"""Transforms built from a model's Preprocessing (never from literals) plus the augmentation config."""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from fruitlens.config import AugmentConfig
from fruitlens.models.preprocessing import Preprocessing

_WHITE = (255, 255, 255)


def _to_tensor(pre: Preprocessing) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))]


def eval_transforms(pre: Preprocessing) -> v2.Compose:
    """Resize the shorter side, centre-crop, normalise: the exact path used by predict, export and serve."""
    return v2.Compose([v2.Resize(pre.resize_size, antialias=True), v2.CenterCrop(pre.image_size), *_to_tensor(pre)])


def train_transforms(pre: Preprocessing, aug: AugmentConfig) -> v2.Compose:
    """The original's rotation, zoom, shift and horizontal flip (each switchable), plus crop and colour jitter."""
    if not aug.enabled:
        return eval_transforms(pre)
    steps: list = [v2.Resize(pre.resize_size, antialias=True)]
    if aug.rotation or aug.zoom or aug.shift:
        steps.append(v2.RandomAffine(degrees=aug.rotation, translate=(aug.shift, aug.shift) if aug.shift else None,
                                     scale=(1 - aug.zoom, 1 + aug.zoom) if aug.zoom else None, fill=_WHITE))
    if aug.random_crop:
        steps.append(v2.RandomResizedCrop(pre.image_size, scale=(aug.min_crop_area, 1.0), antialias=True))
    else:
        steps.append(v2.CenterCrop(pre.image_size))
    if aug.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.color_jitter:  # no hue jitter: hue tells a Golden Delicious from a Granny Smith, a lemon from a lime
        j = aug.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    return v2.Compose(steps + _to_tensor(pre))

"""The evaluation transform, built from a model's Preprocessing (never from literals).

Training augments whole uint8 batches instead (``training/augment.py``), the same way on both training paths.
"""
from __future__ import annotations

import torch
from torchvision.transforms import v2

from fruitlens.models.preprocessing import Preprocessing


def eval_transforms(pre: Preprocessing) -> v2.Compose:
    """Resize the shorter side, centre-crop, normalise: the exact path used by predict, export and serve."""
    return v2.Compose([v2.Resize(pre.resize_size, antialias=True), v2.CenterCrop(pre.image_size), v2.ToImage(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))])

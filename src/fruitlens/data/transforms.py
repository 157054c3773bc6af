"""The evaluation transform, built from a model's Preprocessing (never from literals), and its uint8 twin.

Training datasets yield uint8 images in the evaluation geometry; augmentation and normalisation run on whole batches
(``training/augment.py``), the same way on both training paths.
"""
from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

from fruitlens.data.images import resize_crop
from fruitlens.models.preprocessing import Preprocessing


def eval_transforms(pre: Preprocessing) -> v2.Compose:
    """Resize the shorter side, centre-crop, normalise: the exact path used by predict, export and serve."""
    return v2.Compose([v2.Resize(pre.resize_size, antialias=True), v2.CenterCrop(pre.image_size), v2.ToImage(),
                       v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(pre.mean), list(pre.std))])


class Uint8Geometry:
    """The eval geometry (resize shorter side, centre crop; ``resize_crop``, pixel for pixel torchvision's) without
    normalisation, PIL image -> uint8 CHW tensor."""

    def __init__(self, pre: Preprocessing) -> None:
        self.resize, self.size = pre.resize_size, pre.image_size

    def __call__(self, img) -> torch.Tensor:
        return torch.from_numpy(np.array(resize_crop(img, self.resize, self.size))).permute(2, 0, 1)

"""A torch Dataset over one split of a Manifest: uint8 images in the model's evaluation geometry.

Augmentation and normalisation run on whole batches (``training/augment.py``), the same for both training paths. A
bad image mid-training is skipped and logged, not fatal.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from fruitlens.data.manifest import Manifest
from fruitlens.errors import DataError, ImageError
from fruitlens.models.preprocessing import Preprocessing

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """``(uint8 (3, H, W) tensor, class index)`` for each record of ``manifest``: ``Preprocessing.pixels``, the
    decode and geometry that predict and serve use too. ``cache`` keeps the decoded pixels in memory."""

    def __init__(self, manifest: Manifest, classes: list[str], pre: Preprocessing, cache: bool = False) -> None:
        self.paths = [str(p) for p in manifest.paths()]
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted({r.label for r in manifest} - set(index))
        if unknown:
            raise DataError(
                f"class(es) {', '.join(unknown)} are not among the model's classes {', '.join(classes)}",
                "use --class-map FILE to map them, or evaluate on data with the model's classes",
            )
        self.targets = [index[r.label] for r in manifest]
        self.pre = pre
        self.cache: dict[int, np.ndarray] | None = {} if cache else None
        self.skipped: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def pixels(self, i: int) -> np.ndarray:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        px = self.pre.pixels(self.paths[i])
        if self.cache is not None:
            self.cache[i] = px
        return px

    def __getitem__(self, i: int):
        for attempt in range(len(self.paths)):
            j = (i + attempt) % len(self.paths)
            try:
                px = self.pixels(j)
            except ImageError as exc:
                if self.paths[j] not in self.skipped:
                    self.skipped.add(self.paths[j])
                    log.warning("skipping %s", exc.message)
                continue
            return torch.from_numpy(px).permute(2, 0, 1), self.targets[j]
        raise DataError("no image of this split can be decoded", "run 'fruitlens check' on the data")


def class_weights(targets: list[int] | torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1) for the loss; absent classes get 0."""
    counts = torch.bincount(torch.as_tensor(targets, dtype=torch.long), minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w


def make_loader(
    ds: Dataset, batch_size: int, *, shuffle: bool, workers: int, balance: bool = False, seed: int = 0
) -> DataLoader:
    """DataLoader with an optional class-balanced sampler; workers stay alive between epochs."""
    sampler = None
    if balance:
        w = class_weights(ds.targets, max(ds.targets) + 1)[ds.targets]
        sampler = WeightedRandomSampler(
            w.double(), num_samples=len(ds), replacement=True, generator=torch.Generator().manual_seed(seed)
        )
        shuffle = False
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
    )

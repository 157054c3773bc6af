"""A torch Dataset over one split of a Manifest; a bad image mid-training is skipped and logged, not fatal."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from fruitlens.data.images import load_image
from fruitlens.data.manifest import Manifest
from fruitlens.errors import DataError

log = logging.getLogger(__name__)


class ImageDataset(Dataset):
    """Images of ``manifest`` with integer targets from ``classes``; optional in-memory cache of decoded images."""

    def __init__(self, manifest: Manifest, classes: list[str], transform: Callable, cache: bool = False,
                 min_side: int = 0) -> None:
        self.paths = [str(p) for p in manifest.paths()]
        index = {c: i for i, c in enumerate(classes)}
        unknown = sorted({r.label for r in manifest} - set(index))
        if unknown:
            raise DataError(f"class(es) {', '.join(unknown)} are not among the model's classes {', '.join(classes)}",
                            "use --class-map FILE to map them, or evaluate on data with the model's classes")
        self.targets = [index[r.label] for r in manifest]
        self.transform = transform
        self.cache: dict[int, object] | None = {} if cache else None
        self.skipped: set[str] = set()
        self.min_side = min_side

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, i: int):
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        img = load_image(self.paths[i], self.min_side)
        if self.cache is not None:
            self.cache[i] = img
        return img

    def __getitem__(self, i: int):
        for attempt in range(len(self.paths)):
            j = (i + attempt) % len(self.paths)
            try:
                img = self._image(j)
            except DataError as exc:
                if self.paths[j] not in self.skipped:
                    self.skipped.add(self.paths[j])
                    log.warning("skipping %s", exc.message)
                continue
            return self.transform(img), self.targets[j]
        raise DataError("no image of this split can be decoded", "run 'fruitlens check' on the data")


def class_weights(targets: list[int], num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1) for the loss; absent classes get 0."""
    counts = torch.bincount(torch.tensor(targets), minlength=num_classes).float()
    w = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    return w


def make_loader(ds: Dataset, batch_size: int, *, shuffle: bool, workers: int, balance: bool = False,
                seed: int = 0) -> DataLoader:
    """DataLoader with an optional class-balanced sampler; workers stay alive between epochs."""
    sampler = None
    if balance:
        w = class_weights(ds.targets, max(ds.targets) + 1)[ds.targets]
        sampler = WeightedRandomSampler(w.double(), num_samples=len(ds), replacement=True,
                                        generator=torch.Generator().manual_seed(seed))
        shuffle = False
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=workers,
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed) if shuffle else None)

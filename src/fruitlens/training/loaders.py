"""The loaders of the training phases: uint8 images of a split (``ImageDataset``), batched per phase."""

from __future__ import annotations

import os

from torch.utils.data import DataLoader

from fruitlens.config import TrainConfig
from fruitlens.data.dataset import ImageDataset, make_loader
from fruitlens.data.manifest import Manifest
from fruitlens.models.preprocessing import Preprocessing


def workers(cfg: TrainConfig) -> int:
    """Decoding processes: ``data.num_workers``, or up to 4 (-1)."""
    return cfg.data.num_workers if cfg.data.num_workers >= 0 else min(4, os.cpu_count() or 1)


def dataset(m: Manifest, classes: list[str], pre: Preprocessing, cfg: TrainConfig) -> ImageDataset:
    """uint8 images in the evaluation geometry; augmentation and normalisation happen per batch."""
    return ImageDataset(m, classes, pre, cache=cfg.data.cache_images)


def loader(ds: ImageDataset, cfg: TrainConfig, *, shuffle: bool, balance: bool = False) -> DataLoader:
    return make_loader(
        ds, cfg.fit.batch_size, shuffle=shuffle, workers=workers(cfg), balance=balance, seed=cfg.data.seed
    )

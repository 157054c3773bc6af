"""From DATA to a split manifest ready for training, and the loaders over it."""
from __future__ import annotations

import logging
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fruitlens.config import RRC_MIN_AREA, TrainConfig
from fruitlens.data.check import check
from fruitlens.data.dataset import ImageDataset, make_loader
from fruitlens.data.manifest import Manifest
from fruitlens.data.scan import scan
from fruitlens.data.split import split
from fruitlens.data.transforms import Uint8Geometry
from fruitlens.errors import DataError
from fruitlens.models.preprocessing import Preprocessing

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """The split manifest plus the facts the report shows (check summary, split notes, leaks, image size)."""

    manifest: Manifest
    facts: dict[str, Any]
    median_side: int


def prepare(cfg: TrainConfig) -> PreparedData:
    """scan -> check -> split (keeping a split the data has); stops on data that cannot train a classifier."""
    d = cfg.data
    report = check(scan(d.path), min_size=d.min_size, near_dup_distance=d.near_dup_distance)
    if report.summary["usable"] == 0:
        raise DataError(f"{d.path}: none of the {report.summary['images']} images can be used",
                        f"run 'fruitlens check {d.path}' to see why")
    result = split(report, val=d.val, test=d.test, seed=d.seed, group=d.group, group_pattern=d.group_pattern)
    m = result.manifest
    classes = m.classes
    if len(classes) < 2:
        raise DataError(f"{d.path}: found only the class '{classes[0]}'; a classifier needs at least two",
                        "add a folder per class: DATA/<class>/<images>")
    counts = m.counts()
    missing_train = [c for c in classes if not counts.get("train", {}).get(c)]
    if missing_train:
        raise DataError(f"class(es) {', '.join(missing_train)} have no training images after the split",
                        "add images to those classes or remove their folders")
    if not counts.get("val"):
        raise DataError("the validation split is empty", "use --val 0.15 (or more images per class)")
    for w in result.warnings:
        log.warning("split: %s", w)
    if result.excluded:
        log.warning("left out %d unusable image(s), e.g. %s", len(result.excluded), result.excluded[0][0])
    leak = result.leaks.get("test<-train", {})
    if leak.get("images"):
        log.warning("LEAK: %d of the test images (%.1f%%) have a near duplicate in train (%s). Test accuracy will "
                    "overstate accuracy on new photos.", leak["images"], 100 * leak["share"],
                    "the data's own split" if result.kept_existing else "linked groups")
    sides = sorted(min(f.width, f.height) for f in report.files if f.ok)
    facts = {"data": str(d.path), "check": report.summary, "check_findings": _finding_counts(report),
             "split": result.to_dict(), "leak_free": not any(v["images"] for v in result.leaks.values())}
    return PreparedData(m, facts, int(statistics.median(sides)) if sides else 224)


def _finding_counts(report) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in report.issues:
        key = f"{i.severity}:{i.code}"
        out[key] = out.get(key, 0) + 1
    return out


STUDIO_MAX_SIDE = 128  # a median shorter side up to this: small studio shots of one fruit (Fruits-360: 100 px)


def auto_image_size(median_side: int) -> int:
    """Input size from the data's median shorter side.

    Small studio shots (Fruits-360, 100 px) keep their size, floored to a multiple of 32 (96): upscaling costs time
    and adds nothing. Photos in which the fruit is a small part of a cluttered scene gain from a larger input than
    their own size (GroceryStore, median 348 px: 54% test accuracy at 224 px, 73% at 320, 77% at 448 with frozen
    MobileNetV2 features), so they get 1.25x their size rounded up to a multiple of 32, at most 448.
    """
    if median_side <= STUDIO_MAX_SIDE:
        return max(64, (median_side // 32) * 32)
    return max(160, min(448, -(-int(median_side * 1.25) // 32) * 32))


def auto_crop_scale(median_side: int) -> float:
    """Smallest random crop (fraction of the image area), with the same split between kinds of data as the size.

    Photos get torchvision's RandomResizedCrop range (8-100%): a close-up crop of a display looks like a close-up
    photo of the same fruit (GroceryStore, whose held-out photos are closer than its training photos: 73.3% -> 75.7%
    test accuracy, mean of 3 seeds). Small studio shots of one whole fruit keep 60-100%: a crop of a few percent
    of a Fruits-360 image shows skin only, which no test image does.
    """
    return 0.6 if median_side <= STUDIO_MAX_SIDE else RRC_MIN_AREA


def workers(cfg: TrainConfig) -> int:
    return cfg.data.num_workers if cfg.data.num_workers >= 0 else min(4, os.cpu_count() or 1)


def dataset(m: Manifest, classes: list[str], pre: Preprocessing, cfg: TrainConfig,
            cache: bool | None = None) -> ImageDataset:
    """uint8 images in the evaluation geometry (resize, centre crop); augmentation and normalisation happen per batch
    (``BatchInput`` on the image path, the feature cache's views), the same for both training paths."""
    min_side = int(pre.resize_size * 1.25)  # far below a phone photo's size: decoding stays cheap
    return ImageDataset(m, classes, Uint8Geometry(pre), cache=cfg.data.cache_images if cache is None else cache,
                        min_side=min_side)


def loader(ds: ImageDataset, cfg: TrainConfig, *, shuffle: bool, balance: bool = False):
    return make_loader(ds, cfg.fit.batch_size, shuffle=shuffle, workers=workers(cfg), balance=balance,
                       seed=cfg.data.seed)


def resolve_data_path(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file or folder", "pass a folder with one sub-folder per class")
    return str(p.resolve())

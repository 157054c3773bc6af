"""Photos -> photos (issue 34): which cheap change to the default's frozen-feature recipe gains on GroceryStore's own
photos without losing on another setting. Measured on frozen MobileNetV2 features (one pass of fruitlens's
preprocessing and augmentation, cached in benchmarks/out) and fruitlens's own linear head (the L-BFGS solver the
default refits its head with, weight decay 1e-4):

- on GroceryStore by cross-validation over train + val (5 folds of groups of similar photos, 2 seeds; the 111 val
  photos alone give +-8 points), accuracy and balanced accuracy over the 28 classes;
- on another setting: a head on every GroceryStore photo, scored by fruit kind on Fruits-360's Test frames of the
  kinds both data sets have (studio shots: a weak stand-in for other people's photos, the only one here);
- the cost: seconds of backbone per image for each input size, and of the head.

Candidates: test-time horizontal flips, more augmented views, the input size (224 against the default's 448 px),
both sizes side by side, block 17 beside the last layer. Fine-tuning (LP-FT and WiSE-FT of the last layer on cached
block-17 maps) is bench_photos_ft.py's.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from _measure import OUT, ROOT, SMOKE, data_path, machine, save, write_section

sys.path.insert(0, str(ROOT / "src"))
from bench_labels import class_kind, kind  # noqa: E402
from fruitlens.config import RRC_MIN_AREA, AugmentConfig  # noqa: E402
from fruitlens.data.dataset import ImageDataset  # noqa: E402
from fruitlens.data.manifest import Manifest, Record  # noqa: E402
from fruitlens.data.photos import near_copy_groups, read_photos  # noqa: E402
from fruitlens.inference import onnx as onnx_io  # noqa: E402
from fruitlens.models.registry import build_model  # noqa: E402
from fruitlens.runtime import limit_heap_growth  # noqa: E402
from fruitlens.training.augment import augment_batch  # noqa: E402
from fruitlens.training.heldout import HeadRecipe, train_head  # noqa: E402
from fruitlens.training.photos import similar_groups  # noqa: E402

SIZES = (64, 96) if SMOKE else (224, 448)  # the second is the default's for GroceryStore (auto_image_size)
DEFAULT = SIZES[1]
VIEWS = 2 if SMOKE else 4  # augmented views computed per photo (the default trains on 1)
FOLDS, SEEDS = (2, (0,)) if SMOKE else (5, (0, 1))
L2 = 1e-4  # the default's weight decay for a head on photos (training/auto.py WEIGHT_DECAY)


class _TwoLayers(nn.Module):
    """MobileNetV2's features: block 17 and the last layer, each average-pooled, from one pass."""

    def __init__(self, features: nn.Module) -> None:
        super().__init__()
        self.f = features

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        for j, m in enumerate(self.f):
            h = m(h)
            if j == 17:
                mid = h.mean((2, 3))
        return mid, h.mean((2, 3))


def _paths(root: Path, splits: tuple[str, ...]) -> tuple[list[str], list[str]]:
    paths, labels = [], []
    for split in splits:
        for c in sorted(p.name for p in (root / split).iterdir() if p.is_dir()):
            for f in sorted((root / split / c).glob("*.jpg")):
                paths.append(str(f))
                labels.append(c)
    return paths, labels


def features(size: int) -> dict:
    """{"grocery": {variant: (mid, last)}, "f360": {...}} with variants clean, flip, v0..v{VIEWS-1} (grocery only)."""
    path = OUT / f"photos_features_{size}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    limit_heap_growth()
    net = build_model("mobilenet_v2", 2, img_size=size)
    pre = net.preprocessing
    onnx = onnx_io.export_module(
        _TwoLayers(net.backbone.features).eval(), OUT / f"photos_{size}.onnx", size, output_names=("mid", "last")
    )
    sess = onnx_io.session(onnx)
    aug = AugmentConfig(crop_scale=RRC_MIN_AREA)
    out: dict = {"seconds_per_forward": {}}
    for name, (paths, labels), views in (
        ("grocery", _paths(data_path("grocery"), ("train", "val")), VIEWS),
        ("f360", _paths(data_path("fruits360"), ("Test",)), 0),
    ):
        ds = ImageDataset(Manifest(tuple(Record(p, lab) for p, lab in zip(paths, labels))), sorted(set(labels)), pre)
        g = torch.Generator().manual_seed(0)
        parts: dict[str, tuple[list, list]] = {}
        t0, n = time.perf_counter(), 0
        for x, _ in torch.utils.data.DataLoader(ds, batch_size=16, num_workers=1):
            batches = [("clean", x), ("flip", x.flip(3))] + [(f"v{i}", augment_batch(x, aug, g)) for i in range(views)]
            for variant, xx in batches:
                mid, last = sess.run(None, {"input": pre.normalise(xx).numpy()})
                parts.setdefault(variant, ([], []))
                parts[variant][0].append(torch.from_numpy(mid))
                parts[variant][1].append(torch.from_numpy(last))
                n += len(xx)
        out["seconds_per_forward"][name] = (time.perf_counter() - t0) / max(1, n)
        out[name] = {
            "paths": paths,
            "labels": labels,
            **{v: (torch.cat(a).half(), torch.cat(b).half()) for v, (a, b) in parts.items()},
        }
    torch.save(out, path)
    return out


CANDIDATES = (  # name, sizes, layers, augmented views, test-time flip, standardise
    ("the default: 448 px, the last layer, 1 augmented view", (DEFAULT,), ("last",), 1, False, False),
    (
        "+ test-time flip (the mean of the photo's and its mirror's probabilities)",
        (DEFAULT,),
        ("last",),
        1,
        True,
        False,
    ),
    ("4 augmented views", (DEFAULT,), ("last",), VIEWS, False, False),
    ("4 augmented views + test-time flip", (DEFAULT,), ("last",), VIEWS, True, False),
    ("224 px", (SIZES[0],), ("last",), 1, False, False),
    ("224 and 448 px side by side, standardised", SIZES, ("last",), 1, False, True),
    ("block 17 beside the last layer, standardised", (DEFAULT,), ("mid", "last"), 1, False, True),
)


class Bench:
    def __init__(self) -> None:
        self.f = {size: features(size) for size in SIZES}
        g = self.f[DEFAULT]["grocery"]
        self.classes = sorted(set(g["labels"]))
        self.y = np.array([self.classes.index(c) for c in g["labels"]])
        near = near_copy_groups(read_photos(g["paths"], what="bench").files)
        self.groups = similar_groups(near, g["clean"][1].float(), self.y)
        # the other setting: Fruits-360 Test frames of the kinds GroceryStore has, scored by kind
        f360 = self.f[DEFAULT]["f360"]["labels"]
        kinds = {kind(c) for c in self.classes}
        self.other = np.array([class_kind(c) in kinds for c in f360])
        self.other_kind = np.array([class_kind(c) for c in f360])[self.other]

    def x(self, part: str, variant: str, sizes, layers) -> torch.Tensor:
        layer_index = {"mid": 0, "last": 1}
        return torch.cat([self.f[s][part][variant][layer_index[la]].float() for s in sizes for la in layers], 1)

    def head(self, rows: np.ndarray, sizes, layers, views: int, std: bool):
        xs = [self.x("grocery", "clean", sizes, layers)[rows]]
        xs += [self.x("grocery", f"v{i}", sizes, layers)[rows] for i in range(views)]
        x = torch.cat(xs)
        y = torch.from_numpy(np.tile(self.y[rows], 1 + views))
        stats = (x.mean(0), x.std(0) + 1e-3) if std else None
        return train_head(x, y, len(self.classes), HeadRecipe(weight_decay=L2, stats=stats))

    def probs(self, head, part: str, rows, sizes, layers, flip: bool) -> np.ndarray:
        with torch.inference_mode():
            p = torch.softmax(head(self.x(part, "clean", sizes, layers)[rows]), 1)
            if flip:
                p = (p + torch.softmax(head(self.x(part, "flip", sizes, layers)[rows]), 1)) / 2
        return p.numpy()

    def measure(self, name: str, sizes, layers, views: int, flip: bool, std: bool) -> dict:
        from sklearn.model_selection import StratifiedGroupKFold

        t0 = time.perf_counter()
        acc, bal = [], []
        for seed in SEEDS:
            folds = StratifiedGroupKFold(FOLDS, shuffle=True, random_state=seed)
            for tr, te in folds.split(np.zeros(len(self.y)), self.y, self.groups):
                head = self.head(tr, sizes, layers, views, std)
                right = self.probs(head, "grocery", te, sizes, layers, flip).argmax(1) == self.y[te]
                acc.append(right.mean())
                bal.append(np.mean([right[self.y[te] == c].mean() for c in np.unique(self.y[te])]))
        cv_seconds = time.perf_counter() - t0
        head = self.head(np.arange(len(self.y)), sizes, layers, views, std)
        pred = self.probs(head, "f360", np.flatnonzero(self.other), sizes, layers, flip).argmax(1)
        right = np.array([kind(self.classes[p]) for p in pred]) == self.other_kind
        per_image = sum(self.f[s]["seconds_per_forward"]["grocery"] for s in sizes)
        row = {
            "name": name,
            "cv_accuracy": float(np.mean(acc)),
            "cv_balanced": float(np.mean(bal)),
            "cv_std": float(np.std(acc)),
            "other_accuracy": float(right.mean()),
            "other_balanced": float(np.mean([right[self.other_kind == k].mean() for k in np.unique(self.other_kind)])),
            "other_images": int(len(right)),
            # backbone seconds per training photo (clean + views) and per answered photo (x2 with the flip)
            "train_backbone_s_per_photo": round(per_image * (1 + views), 4),
            "predict_backbone_s_per_photo": round(per_image * (2 if flip else 1), 4),
            "head_seconds": round(cv_seconds / (FOLDS * len(SEEDS)), 2),
        }
        print(json.dumps(row), flush=True)
        return row


def markdown(res: dict) -> str:
    lines = [
        "## Photos -> photos: cheap changes to the frozen-feature recipe (`python benchmarks/bench_photos.py`)",
        "",
        f"Measured {res['machine']['date']} ({res['machine']['cores']} cores). GroceryStore train + val "
        f"({res['photos']} photos, 28 classes): cross-validation over {FOLDS} folds of groups of similar photos, "
        f"seeds {', '.join(map(str, SEEDS))}. Other setting: a head on all of them, scored by fruit kind on "
        f"{res['rows'][0]['other_images']:,} Fruits-360 Test frames of the kinds both data sets have. Frozen "
        "MobileNetV2 (ImageNet), fruitlens's preprocessing, augmentation and L-BFGS head (weight decay 1e-4). "
        "Backbone seconds are per photo on this machine (ONNX Runtime): training photos count their clean view and "
        "their augmented views, answers count the mirror too where the flip is on.",
        "",
        "| recipe | CV accuracy | CV balanced | fold std | other setting | other balanced | backbone s per "
        "training photo | backbone s per answer | head s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['name']} | {100 * r['cv_accuracy']:.1f}% | {100 * r['cv_balanced']:.1f}% | "
            f"{100 * r['cv_std']:.1f} | {100 * r['other_accuracy']:.1f}% | {100 * r['other_balanced']:.1f}% | "
            f"{r['train_backbone_s_per_photo']} | {r['predict_backbone_s_per_photo']} | {r['head_seconds']} |"
        )
    lines += [
        "",
        "Fine-tuning is not measured here: `bench_photos_ft.py` fine-tunes the last layer on cached block-17 maps "
        "after the probe (LP-FT) and averages the weights (WiSE-FT), by the same folds.",
    ]
    return "\n".join(lines)


def main() -> None:
    t0 = time.perf_counter()
    b = Bench()
    rows = [b.measure(*c) for c in CANDIDATES]
    res = {"machine": machine(), "seconds": round(time.perf_counter() - t0, 1), "photos": len(b.y), "rows": rows}
    save("photos", res)
    write_section("photos", markdown(res))


if __name__ == "__main__":
    main()

"""Photos -> photos, fine-tuning (issue 34): the top of MobileNetV2 fine-tuned on cached intermediate feature maps,
after the linear probe (LP-FT), and the weights of the probe and the fine-tuned model averaged (WiSE-FT), measured as
``bench_photos.py`` measures the frozen recipes:

- on GroceryStore by cross-validation over train + val (5 folds of groups of similar photos, 2 seeds), accuracy and
  balanced accuracy over the 28 classes;
- on another setting: a model on every GroceryStore photo, scored by fruit kind on Fruits-360's Test frames of the
  kinds both data sets have;
- the cost: seconds of fine-tuning per fold on this machine.

MobileNetV2's blocks 0-17 stay frozen at the default's 448 px: their output (320 x 14 x 14 at 448 px) is computed once
per photo and view (clean + 3 augmented views, fruitlens's augmentation) and cached, as the feature cache does for
the default. Trained from the probe: the last layer (1x1 convolution 320 -> 1280 with its BatchNorm, statistics
kept) and the head, for 3 epochs (AdamW, layer lr 1e-4, head lr 1e-3, cosine, label smoothing 0.1), a random view
of each photo in each epoch. WiSE-FT: (1 - a) x probe + a x fine-tuned, layer and head, for a in 0.5 and 1 (a = 0 is
the probe). The probe: fruitlens's L-BFGS head (weight decay 1e-4) on the clean view and one augmented view, the
default's recipe.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from _measure import OUT, SMOKE, data_path, machine, save, write_section
from bench_labels import class_kind, kind
from bench_photos import FOLDS, L2, SEEDS, SIZES, _paths
from fruitlens.config import RRC_MIN_AREA, AugmentConfig
from fruitlens.data.dataset import ImageDataset
from fruitlens.data.manifest import Manifest, Record
from fruitlens.data.photos import near_copy_groups, read_photos
from fruitlens.inference import onnx as onnx_io
from fruitlens.models.registry import build_model
from fruitlens.runtime import limit_heap_growth
from fruitlens.training.augment import augment_batch
from fruitlens.training.heldout import HeadRecipe, train_head
from fruitlens.training.photos import similar_groups

SIZE = SIZES[1]  # the default's input size for GroceryStore
VIEWS = 1 if SMOKE else 3  # augmented views cached per photo
EPOCHS, BATCH = (1, 16) if SMOKE else (3, 32)
ALPHAS = (0.0, 0.5, 1.0)  # WiSE-FT mixing weights (0: the probe, 1: the fine-tuned model)
LR_LAYER, LR_HEAD, SMOOTHING = 1e-4, 1e-3, 0.1


def maps() -> dict:
    """{"grocery": {"paths", "labels", "clean", "v0".. }, "f360": {...}}: block 17's output maps, fp16."""
    path = OUT / f"photos_maps_{SIZE}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    limit_heap_growth()
    net = build_model("mobilenet_v2", 2, img_size=SIZE)
    pre = net.preprocessing
    low = net.backbone.features[:18].eval()
    sess = onnx_io.session(onnx_io.export_module(low, OUT / f"photos_low_{SIZE}.onnx", SIZE))
    aug = AugmentConfig(crop_scale=RRC_MIN_AREA)
    out: dict = {}
    for name, (paths, labels), views in (
        ("grocery", _paths(data_path("grocery"), ("train", "val")), VIEWS),
        ("f360", _paths(data_path("fruits360"), ("Test",)), 0),
    ):
        ds = ImageDataset(Manifest(tuple(Record(p, lab) for p, lab in zip(paths, labels))), sorted(set(labels)), pre)
        g = torch.Generator().manual_seed(0)
        parts: dict[str, list] = {}
        for x, _ in torch.utils.data.DataLoader(ds, batch_size=16, num_workers=1):
            for variant, xx in [("clean", x)] + [(f"v{i}", augment_batch(x, aug, g)) for i in range(views)]:
                m = sess.run(None, {"input": pre.normalise(xx).numpy()})[0]
                parts.setdefault(variant, []).append(torch.from_numpy(m).half())
        out[name] = {"paths": paths, "labels": labels, **{v: torch.cat(a) for v, a in parts.items()}}
    torch.save(out, path)
    return out


class Top(nn.Module):
    """MobileNetV2's last layer (conv 320 -> 1280, BatchNorm, ReLU6), average pooling, and a linear head."""

    def __init__(self, last: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.last, self.head = last, head

    def pooled(self, m: torch.Tensor) -> torch.Tensor:
        return self.last(m).mean((2, 3))

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(m))


def _chunks(fn, x: torch.Tensor, size: int = 256) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(x[i : i + size].float()) for i in range(0, len(x), size)])


class Bench:
    def __init__(self) -> None:
        self.m = maps()
        g = self.m["grocery"]
        self.classes = sorted(set(g["labels"]))
        self.y = np.array([self.classes.index(c) for c in g["labels"]])
        net = build_model("mobilenet_v2", 2, img_size=SIZE)
        self.last = net.backbone.features[18].eval()
        frozen = Top(self.last, nn.Linear(1280, len(self.classes)))
        self.pooled = {  # the frozen last layer's features of every cached map
            part: {v: _chunks(frozen.pooled, t) for v, t in self.m[part].items() if isinstance(t, torch.Tensor)}
            for part in ("grocery", "f360")
        }
        near = near_copy_groups(read_photos(g["paths"], what="bench").files)
        self.groups = similar_groups(near, self.pooled["grocery"]["clean"], self.y)
        f360 = self.m["f360"]["labels"]
        kinds = {kind(c) for c in self.classes}
        self.other = np.flatnonzero([class_kind(c) in kinds for c in f360])
        self.other_kind = np.array([class_kind(c) for c in f360])[self.other]

    def probe(self, rows: np.ndarray) -> nn.Linear:
        """The default's head: the L-BFGS solver on the clean view and one augmented view, as a plain linear layer."""
        p = self.pooled["grocery"]
        x = torch.cat([p["clean"][rows], p["v0"][rows]])
        y = torch.from_numpy(np.tile(self.y[rows], 2))
        fit = train_head(x, y, len(self.classes), HeadRecipe(weight_decay=L2))
        lin = nn.Linear(x.shape[1], len(self.classes))
        with torch.no_grad():  # logits = ((x - mean) / std) W^T + b, folded into one layer
            w = fit.weight / fit.std
            lin.weight.copy_(w)
            lin.bias.copy_(fit.bias - w @ fit.mean)
        return lin

    def fine_tune(self, probe: Top, rows: np.ndarray, seed: int) -> Top:
        """LP-FT: from the probe, the last layer and the head trained together on random cached views."""
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        model = copy.deepcopy(probe)
        model.last.train()
        for m in model.modules():  # BatchNorm statistics kept (ImageNet's)
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        opt = torch.optim.AdamW(
            [
                {"params": model.last.parameters(), "lr": LR_LAYER},
                {"params": model.head.parameters(), "lr": LR_HEAD},
            ],
            weight_decay=1e-4,
        )
        steps = EPOCHS * math.ceil(len(rows) / BATCH)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
        variants = ["clean"] + [f"v{i}" for i in range(VIEWS)]
        gm, y = self.m["grocery"], torch.from_numpy(self.y)
        for _ in range(EPOCHS):
            order = torch.from_numpy(rows)[torch.randperm(len(rows), generator=g)]
            view = torch.randint(0, len(variants), (len(order),), generator=g)
            for i in range(0, len(order), BATCH):
                idx, v = order[i : i + BATCH], view[i : i + BATCH]
                x = torch.stack([gm[variants[int(k)]][int(j)] for j, k in zip(idx, v)]).float()
                loss = F.cross_entropy(model(x), y[idx], label_smoothing=SMOOTHING)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        return model.eval()

    @staticmethod
    def mix(probe: Top, tuned: Top, a: float) -> Top:
        """WiSE-FT: the weights (1 - a) x probe + a x fine-tuned."""
        out = copy.deepcopy(probe)
        sp, st = probe.state_dict(), tuned.state_dict()
        out.load_state_dict({k: (1 - a) * sp[k] + a * st[k] if sp[k].is_floating_point() else sp[k] for k in sp})
        return out.eval()

    def models(self, rows: np.ndarray, seed: int) -> tuple[dict[float, Top], float]:
        probe = Top(copy.deepcopy(self.last), self.probe(rows)).eval()
        t0 = time.perf_counter()
        tuned = self.fine_tune(probe, rows, seed)
        return {a: self.mix(probe, tuned, a) for a in ALPHAS}, time.perf_counter() - t0

    def run(self) -> dict:
        from sklearn.model_selection import StratifiedGroupKFold

        acc = {a: [] for a in ALPHAS}
        bal = {a: [] for a in ALPHAS}
        seconds = []
        for seed in SEEDS:
            folds = StratifiedGroupKFold(FOLDS, shuffle=True, random_state=seed)
            for tr, te in folds.split(np.zeros(len(self.y)), self.y, self.groups):
                models, dt = self.models(tr, seed)
                seconds.append(dt)
                for a, model in models.items():
                    right = _chunks(model, self.m["grocery"]["clean"][te]).argmax(1).numpy() == self.y[te]
                    acc[a].append(right.mean())
                    bal[a].append(np.mean([right[self.y[te] == c].mean() for c in np.unique(self.y[te])]))
                print(
                    json.dumps(
                        {
                            "seed": seed,
                            "fold": len(seconds),
                            "seconds": round(dt, 1),
                            **{str(a): round(float(acc[a][-1]), 4) for a in ALPHAS},
                        }
                    ),
                    flush=True,
                )
        other = {a: [] for a in ALPHAS}
        other_bal = {a: [] for a in ALPHAS}
        for seed in SEEDS:  # a model on every photo, read on the other setting
            models, _ = self.models(np.arange(len(self.y)), seed)
            for a, model in models.items():
                pred = _chunks(model, self.m["f360"]["clean"][self.other]).argmax(1).numpy()
                right = np.array([kind(self.classes[p]) for p in pred]) == self.other_kind
                other[a].append(right.mean())
                other_bal[a].append(np.mean([right[self.other_kind == k].mean() for k in np.unique(self.other_kind)]))
        name = {0.0: "the probe (the default's head on the frozen last layer)", 1.0: "LP-FT: the last layer fine-tuned"}
        rows = [
            {
                "name": name.get(a, f"WiSE-FT a = {a}: (1 - a) x probe + a x fine-tuned"),
                "alpha": a,
                "cv_accuracy": float(np.mean(acc[a])),
                "cv_balanced": float(np.mean(bal[a])),
                "cv_std": float(np.std(acc[a])),
                "other_accuracy": float(np.mean(other[a])),
                "other_balanced": float(np.mean(other_bal[a])),
            }
            for a in ALPHAS
        ]
        return {"rows": rows, "fine_tune_seconds_per_fold": round(float(np.mean(seconds)), 1)}


def markdown(res: dict) -> str:
    lines = [
        "## Photos -> photos: fine-tuning the top on cached feature maps (`python benchmarks/bench_photos_ft.py`)",
        "",
        f"Measured {res['machine']['date']} ({res['machine']['cores']} cores), as bench_photos measures: "
        f"GroceryStore train + val ({res['photos']} photos) by cross-validation over {FOLDS} folds of groups of "
        f"similar photos, seeds {', '.join(map(str, SEEDS))}; the other setting: a model on all of them, scored by "
        f"kind on {res['other_images']:,} Fruits-360 Test frames (mean of the seeds). {SIZE} px; blocks 0-17 frozen "
        f"(their maps cached: clean + {VIEWS} augmented views); the last layer and the head trained from the probe "
        f"for {EPOCHS} epochs (AdamW, layer lr {LR_LAYER:g}, head lr {LR_HEAD:g}, cosine, label smoothing "
        f"{SMOOTHING}, BatchNorm statistics kept): **{res['fine_tune_seconds_per_fold']} s** of fine-tuning per "
        f"fold (about {res['photos'] * (FOLDS - 1) // FOLDS} photos).",
        "",
        "| model | CV accuracy | CV balanced | fold std | other setting | other balanced |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['name']} | {100 * r['cv_accuracy']:.1f}% | {100 * r['cv_balanced']:.1f}% | "
            f"{100 * r['cv_std']:.1f} | {100 * r['other_accuracy']:.1f}% | {100 * r['other_balanced']:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    t0 = time.perf_counter()
    b = Bench()
    res = b.run()
    res |= {
        "machine": machine(),
        "seconds": round(time.perf_counter() - t0, 1),
        "photos": len(b.y),
        "other_images": int(len(b.other)),
    }
    save("photos_ft", res)
    write_section("photos_ft", markdown(res))


if __name__ == "__main__":
    sys.exit(main())

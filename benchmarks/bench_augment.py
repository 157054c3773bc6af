"""Photo-like augmentation and adaptation ideas for studio shots (issue 18), measured on frozen features.

Each idea is measured the same way, faster than a full run: every 6th Fruits-360 training frame (about 2,100 images,
upscaled to 224 px), its clean view plus 2 augmented views through frozen ImageNet MobileNetV2 (ONNX Runtime), a
linear head (Adam, dropout 0.2, 60 epochs, mean of 2 seeds), scored on GroceryStore's photos of the fruit kinds
Fruits-360 has (train + val, 812 photos, ``grocery-from-fruits360.json``): accuracy and balanced accuracy.

The ideas: the default augmentation (``training/augment.py``) at several crop ranges and colour strengths; scale and
position (the fruit small and off centre); backgrounds under the white-background mask (gradients, and blurred
clutter of other fruit); piles (several fruit of the class in one view); colour, white balance, shadows, blur and
noise; dense mosaics (a k x k pile of the class packed edge to edge, any rotation). On the photo side: test-time
crops (the mean of the scores over crops and tiles of each photo) and features from an earlier block of the
backbone. Then the adaptations to unlabeled photos (grocery/train, scored on grocery/val and on all 812):
pseudo-labels (over a score threshold, and class-balanced as ``--adapt-to`` does), CORAL, mean and per-dimension
alignment of the features, and AdaBN (the backbone's BatchNorm statistics re-estimated on the photos).
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from _measure import ROOT, SMOKE, data_path, machine, save, write_section

sys.path.insert(0, str(ROOT / "src"))
from fruitlens.config import AugmentConfig  # noqa: E402
from fruitlens.models.registry import build_model  # noqa: E402
from fruitlens.training.adapt import confident, shares  # noqa: E402
from fruitlens.training.augment import augment_batch  # noqa: E402
from fruitlens.training.engine import Engine  # noqa: E402

SIZE, STEP, VIEWS, SEEDS = (64, 4, 1, 1) if SMOKE else (224, 6, 2, 2)
F360, GROCERY = data_path("fruits360"), data_path("grocery")
CLASSES = sorted(p.name for p in (F360 / "Training").iterdir())  # Fruits-360's 27
NET = build_model("mobilenet_v2", len(CLASSES), img_size=SIZE)
PRE = NET.preprocessing


def _pixels(files: list[Path]) -> torch.Tensor:
    return torch.from_numpy(np.stack([PRE.pixels(f) for f in files])).permute(0, 3, 1, 2).contiguous()


def load_data() -> dict:
    classes = CLASSES
    files, ys = [], []
    for ci, c in enumerate(classes):
        for f in sorted((F360 / "Training" / c).glob("*.jpg"))[::STEP]:
            files.append(f)
            ys.append(ci)
    cmap = json.loads(data_path("grocery-from-fruits360.json").read_text())
    kinds = sorted(cmap)
    allowed = torch.zeros(len(kinds), len(classes), dtype=torch.bool)
    for gi, g in enumerate(kinds):
        for c in [cmap[g]] if isinstance(cmap[g], str) else cmap[g]:
            allowed[gi, classes.index(c)] = True
    gfiles, gy, gval = [], [], []
    for split in ("train", "val"):
        for gi, g in enumerate(kinds):
            for f in sorted((GROCERY / split / g).glob("*.jpg")):
                gfiles.append(f)
                gy.append(gi)
                gval.append(split == "val")
    unlabeled = sorted((GROCERY / "train").rglob("*.jpg"))  # all 28 kinds, labels never read
    big = PRE.with_image_size(2 * SIZE)  # for test-time crops: a crop of half the side still has 224 px
    gx2 = torch.from_numpy(np.stack([big.pixels(f) for f in gfiles])).permute(0, 3, 1, 2).contiguous()
    return {
        "x": _pixels(files),
        "y": torch.tensor(ys),
        "gx": _pixels(gfiles),
        "gy": torch.tensor(gy),
        "gval": torch.tensor(gval),
        "allowed": allowed,
        "ux": _pixels(unlabeled),
        "gx2": gx2,
    }


def features(x8: torch.Tensor, backbone=None) -> torch.Tensor:
    eng = Engine(backbone if backbone is not None else NET.backbone, SIZE)
    return torch.cat([eng(PRE.normalise(x8[i : i + 64])) for i in range(0, len(x8), 64)])


# --- the augmentation ideas (float [0, 1] out, (N, 3, H, W) uint8 in) ---


def _u(n, lo, hi, g):
    return lo + (hi - lo) * torch.rand(n, generator=g)


def fg_mask(x: torch.Tensor) -> torch.Tensor:
    """Soft foreground mask of studio shots: not near white, holes closed, the white fringe eroded."""
    m = (x.min(1, keepdim=True).values < 0.92).float()
    m = -F.max_pool2d(-F.max_pool2d(m, 7, 1, 3), 11, 1, 5)
    return F.avg_pool2d(m, 5, 1, 2)


def _warp(img, angle, scale, tx, ty, flip):
    c, s = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([c * flip, -s, tx], 1), torch.stack([s * flip, c, ty], 1)], 1)
    return F.grid_sample(
        img,
        F.affine_grid(theta, list(img.shape), align_corners=False),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )


def backgrounds(x, g, kind):
    n, _, h, w = x.shape
    if kind == "white":
        return torch.ones(n, 3, h, w)
    a = _u(n, 0, 2 * math.pi, g).view(n, 1, 1, 1)
    t = torch.linspace(0, 1, w).view(1, 1, 1, w) * torch.cos(a) + torch.linspace(0, 1, h).view(1, 1, h, 1) * torch.sin(
        a
    )
    t = (t - t.amin((2, 3), keepdim=True)) / (t.amax((2, 3), keepdim=True) - t.amin((2, 3), keepdim=True) + 1e-6)
    bg = torch.rand(n, 3, 1, 1, generator=g) * (1 - t) + torch.rand(n, 3, 1, 1, generator=g) * t  # a gradient
    if kind == "solid":
        return bg
    other = x[torch.randperm(n, generator=g)]  # clutter: other fruit of the batch, enlarged and blurred
    big = (
        _warp(
            other - 1,
            _u(n, -3.14, 3.14, g),
            _u(n, 1.5, 3.0, g),
            _u(n, -0.5, 0.5, g),
            _u(n, -0.5, 0.5, g),
            torch.ones(n),
        )
        + 1
    )
    mo = fg_mask(big)
    clutter = F.avg_pool2d(F.pad(bg * (1 - mo) + big * mo, (4,) * 4, mode="replicate"), 9, 1)
    mix = (torch.rand(n, generator=g) < 0.5).view(n, 1, 1, 1).float()  # "mix": half clutter, half gradients
    return mix * clutter + (1 - mix) * bg


def _same_class(y, g):
    return torch.stack(
        [
            (y == y[i]).nonzero().flatten()[torch.randint(int((y == y[i]).sum()), (1,), generator=g)][0]
            for i in range(len(y))
        ]
    )


def _paste(out, fruit, mask, ang, sc, px, py, on, g):
    """``out`` with ``fruit`` (under its ``mask``) rotated by ``ang``, scaled to ``sc`` of the frame, centred at
    ``(px, py)`` in [-1, 1] and flipped at random, where ``on``."""
    tx = -(torch.cos(ang) * px - torch.sin(ang) * py) / sc
    ty = -(torch.sin(ang) * px + torch.cos(ang) * py) / sc
    flip = torch.where(torch.rand(len(out), generator=g) < 0.5, -1.0, 1.0)
    wv = _warp(torch.cat([fruit - 1, mask], 1), ang, sc, tx, ty, flip)
    mm = wv[:, 3:] * on.float().view(-1, 1, 1, 1)
    return out * (1 - mm) + (wv[:, :3] + 1) * mm


def photo_aug(x8, y, g, pile=(1, 1), scale=(0.35, 1.0), bg="white", color=0.0, blur=0.0, rot=20.0, geo=0.0):
    """Pasting ``pile`` fruit of the class (the image itself on top) at ``scale`` of the frame on ``bg``; or, with
    ``geo``, the default augmentation's warp (crops of ``geo``-100% of the area) on ``bg``; then colour and blur."""
    x = x8.float() / 255
    n, _, h, w = x.shape
    out = backgrounds(x, g, bg)
    if geo:
        xa = augment_batch(x8, AugmentConfig(crop_scale=geo), g)
        m = fg_mask(xa)
        out = out * (1 - m) + xa * m
    else:
        m = fg_mask(x)
        k = torch.randint(pile[0], pile[1] + 1, (n,), generator=g)
        kmax = int(k.max())
        for j in range(kmax):
            src = torch.arange(n) if j == kmax - 1 else _same_class(y, g)
            sc = _u(n, *scale, g) / torch.sqrt(k.float()) * torch.where(k > 1, 1.4, 1.0)
            lim = torch.where(k > 1, torch.full((n,), 0.75), (1 - sc).clamp(min=0))  # where the centre lands
            px, py = _u(n, -1, 1, g) * lim, _u(n, -1, 1, g) * lim
            ang = _u(n, -rot, rot, g) * math.pi / 180
            out = _paste(out, x[src], m[src], ang, sc, px, py, j >= kmax - k, g)
    if color:  # white balance, brightness, a shadow across the view
        out = (
            out
            * torch.exp(_u(n * 3, -color, color, g)).view(n, 3, 1, 1)
            * torch.exp(_u(n, -color, color, g)).view(n, 1, 1, 1)
        )
        a = _u(n, 0, 2 * math.pi, g).view(n, 1, 1, 1)
        ramp = (
            torch.linspace(-1, 1, w).view(1, 1, 1, w) * torch.cos(a)
            + torch.linspace(-1, 1, h).view(1, 1, h, 1) * torch.sin(a)
        ) * 0.5 + 0.5
        out = out * (1 - _u(n, 0, 0.5, g).view(n, 1, 1, 1) * ramp)
    if blur:  # lens blur and low resolution, then sensor noise
        f = 1 + torch.rand(1, generator=g).item() * blur
        out = (
            F.interpolate(
                F.interpolate(out, scale_factor=1 / f, mode="bilinear", antialias=True), size=(h, w), mode="bilinear"
            )
            + torch.randn(out.shape, generator=g) * 0.02
        )
    return out.clamp(0, 1)


def mosaic(x8, y, g, k=(2, 5), scale=(1.1, 1.6)):
    """A supermarket pile: k x k fruit of the class (k drawn from ``k``) packed on a jittered grid, each at
    ``scale`` of its cell, any rotation, drawn in random order over a dark colour gradient."""
    x = x8.float() / 255
    n, _, h, w = x.shape
    m = fg_mask(x)
    out = backgrounds(x, g, "solid") * _u(n, 0.2, 0.8, g).view(n, 1, 1, 1)
    kn = torch.randint(k[0], k[1] + 1, (n,), generator=g).float()
    for t in torch.randperm(k[1] ** 2, generator=g).tolist():
        r, c = divmod(t, k[1])
        src = _same_class(y, g)
        sc = _u(n, *scale, g) / kn
        px = (c + 0.5) / kn * 2 - 1 + _u(n, -0.3, 0.3, g) / kn
        py = (r + 0.5) / kn * 2 - 1 + _u(n, -0.3, 0.3, g) / kn
        out = _paste(out, x[src], m[src], _u(n, -math.pi, math.pi, g), sc, px, py, (r < kn) & (c < kn), g)
    return out.clamp(0, 1)


def default_aug(**kw):
    aug = AugmentConfig(**{"crop_scale": 0.6, **kw})
    return lambda x8, y, g: augment_batch(x8, aug, g)


IDEAS = [  # (name, what it is, the augmentation)
    (
        "default",
        "fruitlens's augmentation (rotation, zoom, shift, flip, crops 60-100%, colour jitter 0.2)",
        default_aug(),
    ),
    ("crops 30-100%", "closer crops", default_aug(crop_scale=0.3)),
    ("crops 85-100%", "wider crops", default_aug(crop_scale=0.85)),
    ("no colour jitter", "", default_aug(color_jitter=0.0)),
    ("colour jitter 0.4", "", default_aug(color_jitter=0.4)),
    (
        "small, off centre",
        "scale and position: the fruit at 35-100% of the frame, anywhere, on white",
        lambda x, y, g: photo_aug(x, y, g),
    ),
    (
        "+ gradient backgrounds",
        "the same on random colour gradients (white-background mask)",
        lambda x, y, g: photo_aug(x, y, g, bg="solid"),
    ),
    (
        "+ clutter backgrounds",
        "the same on gradients or blurred clutter of other fruit, half each",
        lambda x, y, g: photo_aug(x, y, g, bg="mix"),
    ),
    (
        "piles on white",
        "1-8 fruit of the class in one view (a supermarket pile)",
        lambda x, y, g: photo_aug(x, y, g, pile=(1, 8)),
    ),
    ("piles on clutter", "the same on clutter backgrounds", lambda x, y, g: photo_aug(x, y, g, pile=(1, 8), bg="mix")),
    (
        "default + clutter",
        "the default augmentation's views on clutter backgrounds",
        lambda x, y, g: photo_aug(x, y, g, bg="mix", geo=0.6),
    ),
    (
        "mosaic piles",
        "2x2 to 5x5 fruit of the class packed edge to edge, any rotation, on dark gradients",
        lambda x, y, g: mosaic(x, y, g),
    ),
    (
        "default + clutter + light + blur",
        "and white balance, brightness, shadows (0.3), blur, noise",
        lambda x, y, g: photo_aug(x, y, g, bg="mix", geo=0.6, color=0.3, blur=2.0),
    ),
]


def views(d: dict, fn, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(d["x"]), generator=g)  # batches of mixed classes (clutter takes other fruit)
    eng = Engine(NET.backbone, SIZE)
    fs, ys = [], []
    for _ in range(VIEWS):
        for i in range(0, len(perm), 64):
            b = perm[i : i + 64]
            fs.append(eng(PRE.normalise(fn(d["x"][b], d["y"][b], g))))
            ys.append(d["y"][b])
    return torch.cat(fs), torch.cat(ys)


def head(X, Y, seed=0, epochs=60, wd=1e-4, drop=0.2, smoothing=0.0, cosine=0.0):
    """A linear head (or a cosine classifier of scale ``cosine``), Adam; returns its scoring function."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(X.shape[1], len(CLASSES), bias=not cosine)
    opt = torch.optim.Adam(lin.parameters(), 1e-3, weight_decay=wd)
    fwd = (lambda z: cosine * F.normalize(z, dim=1) @ F.normalize(lin.weight, dim=1).T) if cosine else lin
    for _ in range(epochs):
        perm = torch.randperm(len(X))
        for i in range(0, len(X), 256):
            b = perm[i : i + 256]
            loss = F.cross_entropy(fwd(F.dropout(X[b], drop)), Y[b], label_smoothing=smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return fwd


def score(d, lin, gf, sel=None) -> tuple[float, float]:
    with torch.no_grad():
        return score_probs(d, lin(gf), sel)


def score_probs(d, scores, sel=None) -> tuple[float, float]:
    ok = d["allowed"][d["gy"], scores.argmax(1)]
    sel = torch.ones(len(ok), dtype=torch.bool) if sel is None else sel
    ok, y = ok[sel], d["gy"][sel]
    return float(ok.float().mean()), float(torch.stack([ok[y == c].float().mean() for c in y.unique()]).mean())


def mean_score(d, X, Y, gf, sel=None):
    r = [score(d, head(X, Y, s), gf, sel) for s in range(SEEDS)]
    return tuple(sum(v) / len(v) for v in zip(*r))


# --- the photo side: test-time crops, features of an earlier block ---


def _crops(x8: torch.Tensor, scheme: str) -> list[torch.Tensor]:
    """The views of 448-px photos that a test-time scheme averages, each resized to 224 px (float [0, 1])."""
    n, _, h, w = x8.shape
    down = lambda v: F.interpolate(v.float() / 255, size=(SIZE, SIZE), mode="bilinear", antialias=True)
    if scheme == "full":
        return [down(x8)]
    if scheme == "5 crops":  # the centre and the four corners, half the area each
        k = int(h * 0.5**0.5)
        return [
            down(x8[:, :, a : a + k, b : b + k])
            for a, b in [((h - k) // 2, (w - k) // 2), (0, 0), (0, w - k), (h - k, 0), (h - k, w - k)]
        ]
    t = int(scheme[0])  # "2x2 tiles", "3x3 tiles"
    return [
        down(x8[:, :, a * h // t : (a + 1) * h // t, b * w // t : (b + 1) * w // t]) for a in range(t) for b in range(t)
    ]


def test_time(d, X, Y) -> list[dict]:
    heads = [head(X, Y, s) for s in range(SEEDS)]
    feats = {s: [features(v) for v in _crops(d["gx2"], s)] for s in ("full", "5 crops", "2x2 tiles", "3x3 tiles")}
    schemes = [
        ("one view of the whole photo (as predict does)", ["full"]),
        ("5 crops of half the area", ["5 crops"]),
        ("the whole photo + 5 crops", ["full", "5 crops"]),
        ("the whole photo + 2x2 tiles", ["full", "2x2 tiles"]),
        ("the whole photo + 3x3 tiles", ["full", "3x3 tiles"]),
    ]
    rows = []
    for name, keys in schemes:
        fs = [f for k in keys for f in feats[k]]
        with torch.no_grad():
            r = [score_probs(d, sum(F.softmax(h(f), 1) for f in fs)) for h in heads]
        rows.append(
            {
                "scheme": name,
                "views": len(fs),
                "accuracy": sum(a for a, _ in r) / len(r),
                "balanced": sum(b for _, b in r) / len(r),
            }
        )
    return rows


BLOCKS = {
    "the last layer (1280 channels), mean (fruitlens)": (18, "mean"),
    "the last layer, max": (18, "max"),
    "block 17 (320 channels), mean": (17, "mean"),
    "block 6 (32 channels), mean": (6, "mean"),
}


@torch.inference_mode()
def block_features(x8: torch.Tensor, fn=None, y=None, g=None) -> dict:
    """Pooled outputs of the blocks in ``BLOCKS`` (PyTorch: ONNX Runtime's graph gives the last layer only)."""
    out = {k: [] for k in BLOCKS}
    for i in range(0, len(x8), 64):
        h = PRE.normalise(fn(x8[i : i + 64], y[i : i + 64], g) if fn else x8[i : i + 64])
        maps = {}
        for j, m in enumerate(NET.backbone.features):
            h = maps[j] = m(h)
        for k, (j, pool) in BLOCKS.items():
            out[k].append(maps[j].mean((2, 3)) if pool == "mean" else maps[j].amax((2, 3)))
    return {k: torch.cat(v) for k, v in out.items()}


def blocks(d) -> list[dict]:
    """A head on each block's features (clean view + one default view), on the raw features and on features
    standardised per dimension on the studio shots (the blocks' scales differ)."""
    g = torch.Generator().manual_seed(0)
    clean, aug, photos = (
        block_features(d["x"]),
        block_features(d["x"], default_aug(), d["y"], g),
        block_features(d["gx"]),
    )
    rows = []
    for k in BLOCKS:
        X, Y = torch.cat([clean[k], aug[k]]), torch.cat([d["y"], d["y"]])
        for std in (False, True):
            mu, sd = (X.mean(0), X.std(0) + 1e-3) if std else (0.0, 1.0)
            acc, bal = mean_score(d, (X - mu) / sd, Y, (photos[k] - mu) / sd)
            rows.append(
                {
                    "features": k + (", standardised" if std else ""),
                    "dims": X.shape[1],
                    "accuracy": acc,
                    "balanced": bal,
                }
            )
    return rows


# --- adaptation to unlabeled photos ---


def _sqrtm(c, inv=False):
    e, v = torch.linalg.eigh(c)
    return (v * e.clamp(min=1e-6) ** (-0.5 if inv else 0.5)) @ v.T


def coral(xs, xt, lam=1.0):
    eye = torch.eye(xs.shape[1])
    cs, ct = torch.cov((xs - xs.mean(0)).T) + lam * eye, torch.cov((xt - xt.mean(0)).T) + lam * eye
    return (xs - xs.mean(0)) @ _sqrtm(cs, True) @ _sqrtm(ct) + xt.mean(0)


def pseudo(X, Y, xt, thr=0.9, rounds=2, epochs=60):
    """Pseudo-labels above a score threshold, ``rounds`` times."""
    lin = head(X, Y, epochs=epochs)
    for _ in range(rounds):
        with torch.no_grad():
            conf, lab = F.softmax(lin(xt), 1).max(1)
        lin = head(torch.cat([X, xt[conf >= thr]]), torch.cat([Y, lab[conf >= thr]]), epochs=epochs)
    return lin


def balanced_pseudo(X, Y, xt, last=0.4, rounds=2, epochs=60):
    """fruitlens's --adapt-to (training/adapt.py): each class's surest photos, 20% then 40%."""
    lin = head(X, Y, epochs=epochs)
    for share in shares(last, rounds):
        idx, lab = confident(lin, xt, share)
        lin = head(torch.cat([X, xt[idx]]), torch.cat([Y, lab]), epochs=epochs)
    return lin


def restat(x8: torch.Tensor):
    """AdaBN: the backbone with its BatchNorm statistics re-estimated on ``x8``."""
    bb = copy.deepcopy(NET.backbone)
    for m in bb.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    bb.train()
    with torch.no_grad():
        for i in range(0, len(x8), 64):
            bb(PRE.normalise(x8[i : i + 64]))
    return bb.eval()


def adaptations(d, clean, aug) -> list[dict]:
    X, Y = torch.cat([clean, aug[0]]), torch.cat([d["y"], aug[1]])
    xt, gf, val = features(d["ux"]), d["gf"], d["gval"]
    both = lambda lin, f=gf: {"val": score(d, lin, f, val), "all": score(d, lin, f)}
    rows = [
        ("none", both(head(X, Y))),
        ("pseudo-labels (score >= 0.9, 2 rounds)", both(pseudo(X, Y, xt))),
        ("pseudo-labels (score >= 0.7, 2 rounds)", both(pseudo(X, Y, xt, 0.7))),
        ("class-balanced pseudo-labels (20% then 40% of each class)", both(balanced_pseudo(X, Y, xt))),
        # a head stopped after 2 epochs, as the 98% target stops fruitlens's head on Fruits-360
        ("none, 2-epoch heads", both(head(X, Y, epochs=2))),
        ("pseudo-labels (score >= 0.9), 2-epoch heads", both(pseudo(X, Y, xt, epochs=2))),
        ("class-balanced pseudo-labels, 2-epoch heads", both(balanced_pseudo(X, Y, xt, epochs=2))),
        ("CORAL", both(head(coral(X, xt), Y))),
        ("feature mean alignment", both(head(X - X.mean(0) + xt.mean(0), Y))),
        ("per-dimension mean and spread", both(head((X - X.mean(0)) / (X.std(0) + 1e-3) * xt.std(0) + xt.mean(0), Y))),
    ]
    target_bn = features(d["gx"], restat(d["ux"]))  # the photos through the backbone with the photos' statistics
    rows.append(("AdaBN on the photos (head as trained)", both(head(X, Y), target_bn)))
    source = features(d["x"], restat(d["x"]))  # clean views, each side with its own statistics
    rows.append(("AdaBN, both sides (clean views only)", both(head(source, d["y"]), target_bn)))
    return [{"method": m, **r} for m, r in rows]


def markdown(res: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}%"
    lines = [
        "## Photo-like augmentation and adaptation ideas (`python benchmarks/bench_augment.py`)",
        "",
        f"Measured {res['machine']['date']} on frozen MobileNetV2 features at {SIZE} px: every {STEP}th Fruits-360 "
        f"training frame ({res['images']:,} images), clean view + {VIEWS} augmented views, a linear head (mean of "
        f"{SEEDS} seeds), scored on GroceryStore's {res['photos']} photos of the kinds Fruits-360 has (train + "
        "val). Faster than a full run, so every idea gets the same test; one draw of the views each, so "
        "differences of 2-3 points are noise.",
        "",
        "| idea | what | accuracy on photos | balanced |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['name']} | {r['what']} | {pct(r['accuracy'])} | {pct(r['balanced'])} |" for r in res["ideas"]]
    lines += [
        "",
        f"Clean views alone (no augmentation): {pct(res['clean'][0])} ({pct(res['clean'][1])} balanced).",
        "",
        "Test-time crops: the default's head (clean + 2 default views), each photo's scores averaged over several "
        "views cut from it at 448 px and resized to 224 px:",
        "",
        "| views of each photo | views | accuracy on photos | balanced |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['scheme']} | {r['views']} | {pct(r['accuracy'])} | {pct(r['balanced'])} |" for r in res["test_time"]
    ]
    lines += [
        "",
        "Features of another block of the backbone (clean view + 1 default view, PyTorch), each raw and "
        "standardised per dimension on the studio shots:",
        "",
        "| features | dims | accuracy on photos | balanced |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['features']} | {r['dims']} | {pct(r['accuracy'])} | {pct(r['balanced'])} |" for r in res["blocks"]]
    lines += [
        "",
        "Adaptation to unlabeled photos (grocery/train, 1,142 photos of all 28 kinds, labels never read), on "
        "the default augmentation's features; scored on grocery/val (the photos the adaptation did not see) "
        "and on train + val (transductive for train's photos, but 812 photos instead of "
        f"{res['val_photos']}):",
        "",
        "| method | grocery val accuracy | balanced | train + val accuracy | balanced |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {pct(r['val'][0])} | {pct(r['val'][1])} | {pct(r['all'][0])} | {pct(r['all'][1])} |"
        for r in res["adaptations"]
    ]
    return "\n".join(lines)


def main() -> None:
    d = load_data()
    d["gf"] = features(d["gx"])
    clean = features(d["x"])
    res = {
        "machine": machine(),
        "images": len(d["x"]),
        "photos": len(d["gx"]),
        "val_photos": int(d["gval"].sum()),
        "clean": mean_score(d, clean, d["y"], d["gf"]),
        "ideas": [],
    }
    default_views = None
    for name, what, fn in IDEAS:
        t0 = time.perf_counter()
        fa, ya = views(d, fn)
        dt = round(time.perf_counter() - t0, 1)
        acc, bal = mean_score(d, torch.cat([clean, fa]), torch.cat([d["y"], ya]), d["gf"])
        res["ideas"].append({"name": name, "what": what, "accuracy": acc, "balanced": bal, "seconds": dt})
        print(json.dumps(res["ideas"][-1]), flush=True)
        if name == "default":
            default_views = (fa, ya)
    X, Y = torch.cat([clean, default_views[0]]), torch.cat([d["y"], default_views[1]])
    res["test_time"] = test_time(d, X, Y)
    print(json.dumps(res["test_time"]), flush=True)
    res["blocks"] = blocks(d)
    print(json.dumps(res["blocks"]), flush=True)
    res["adaptations"] = adaptations(d, clean, default_views)
    print(json.dumps(res["adaptations"]), flush=True)
    save("augment", res)
    write_section("augment", markdown(res))


if __name__ == "__main__":
    sys.exit(main())

"""Which features a head on studio shots should read, to read photos (issue 18; ``training/auto.py:
auto_feature_layer``): the blocks of frozen ImageNet MobileNetV2, their pooling, combinations of blocks, the head's
recipe, test-time tiles and a correction of the class prior, all measured as ``bench_augment.py`` measures its
ideas: every 6th Fruits-360 training frame (about 2,100 images, upscaled to 224 px), its clean view plus 2 views
of fruitlens's default augmentation, a linear head (Adam, dropout 0.2, weight decay 1e-3 as the default's studio
head, 60 epochs, mean of 2 seeds), scored on GroceryStore's photos of the fruit kinds Fruits-360 has (train + val,
812 photos, ``grocery-from-fruits360.json``). Features come from PyTorch (every block's output in one pass).
Also: the default's accuracy on each GroceryStore kind and what it calls each one."""

from __future__ import annotations

import collections
import json
import sys
import time

import torch
import torch.nn.functional as F

from _measure import data_path, machine, save, write_section
from bench_augment import CLASSES, NET, PRE, SEEDS, _crops, default_aug, load_data, score_probs
from bench_augment import head as augment_head

BLOCKS = (13, 14, 15, 16, 17, 18)  # 96, 160, 160, 160, 320 channels; 18: the last layer (1280)
POOLS = ("mean", "max", "gem")  # gem: generalised mean, p = 3
CLASS_MAP = data_path("grocery-from-fruits360.json")


@torch.inference_mode()
def block_features(x8: torch.Tensor, fn=None, y=None, g=None) -> dict:
    """``{(block, pool): (n, channels)}`` for every block in ``BLOCKS``, of ``fn``'s views (or the clean images)."""
    net = NET.backbone.features.eval()  # BatchNorm in inference mode: the running statistics, as fruitlens uses them
    out = {(j, p): [] for j in BLOCKS for p in POOLS}
    for i in range(0, len(x8), 64):
        h = PRE.normalise(fn(x8[i : i + 64], y[i : i + 64], g) if fn else x8[i : i + 64])
        for j, m in enumerate(net):
            h = m(h)
            if j in BLOCKS:
                out[(j, "mean")].append(h.mean((2, 3)))
                out[(j, "max")].append(h.amax((2, 3)))
                out[(j, "gem")].append(h.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3))
    return {k: torch.cat(v) for k, v in out.items()}


def head(X, Y, seed=0, epochs=60, wd=1e-3, **kw):
    """``bench_augment.head`` with the default's weight decay for a head on studio shots (1e-3)."""
    return augment_head(X, Y, seed, epochs, wd=wd, **kw)


class Probe:
    def __init__(self, d: dict, feats: dict) -> None:
        self.d, self.f = d, feats
        self.Y = torch.cat([d["y"]] * 3)

    def matrices(self, keys, std=True, l2=False, pca=0):
        """Training rows (clean + 2 views) and the photos' rows, of the features ``keys`` side by side."""
        side = lambda f: (lambda z: F.normalize(z, dim=1) if l2 else z)(torch.cat([f[k] for k in keys], 1))
        X = torch.cat([side(self.f["clean"]), side(self.f["aug1"]), side(self.f["aug2"])])
        others = {
            "photos": side(self.f["photos"]),
            "unl": side(self.f["unl"]),
            "tiles": [side(t) for t in self.f["tiles"]],
        }
        mu, sd = (X.mean(0), X.std(0) + 1e-3) if std else (torch.zeros(X.shape[1]), torch.ones(X.shape[1]))
        tf = lambda z: (z - mu) / sd
        if pca:  # whitened on the studio shots' top components
            Xc = tf(X)
            c = Xc.mean(0)
            _, s, v = torch.pca_lowrank(Xc - c, q=min(pca, *Xc.shape), center=False)  # (the rows: --smoke)
            w = v / s * len(X) ** 0.5
            tf = lambda z, tf0=tf: (tf0(z) - c) @ w
        return tf(X), {
            "photos": tf(others["photos"]),
            "unl": tf(others["unl"]),
            "tiles": [tf(t) for t in others["tiles"]],
        }

    def row(self, name: str, keys, std=True, l2=False, pca=0, **kw) -> dict:
        X, o = self.matrices(keys, std, l2, pca)
        r = []
        for s in range(SEEDS):
            h = head(X, self.Y, s, **kw)
            with torch.no_grad():
                r.append(score_probs(self.d, h(o["photos"])))
        return result(name, X.shape[1], r)


def result(name: str, dims: int, r: list[tuple[float, float]]) -> dict:
    """A table row from each seed's (accuracy, balanced accuracy), printed as it comes."""
    out = {
        "name": name,
        "dims": dims,
        "accuracy": sum(a for a, _ in r) / len(r),
        "balanced": sum(b for _, b in r) / len(r),
    }
    print(json.dumps(out), flush=True)
    return out


def studio_views(d: dict, g: torch.Generator) -> dict:
    """Every block's features of the studio shots' clean view and 2 default views, and of the photos."""
    return {
        "clean": block_features(d["x"]),
        "aug1": block_features(d["x"], default_aug(), d["y"], g),
        "aug2": block_features(d["x"], default_aug(), d["y"], g),
        "photos": block_features(d["gx"]),
    }


def main() -> None:
    t0 = time.perf_counter()
    d = load_data()
    g = torch.Generator().manual_seed(0)
    feats = {
        **studio_views(d, g),
        "unl": block_features(d["ux"]),
        "tiles": [block_features((v * 255).round().to(torch.uint8)) for v in _crops(d["gx2"], "2x2 tiles")],
    }
    feature_seconds = round(time.perf_counter() - t0, 1)
    p = Probe(d, feats)
    M = lambda j, pool="mean": (j, pool)
    res = {"machine": machine(), "images": len(d["x"]), "photos": len(d["gx"]), "feature_seconds": feature_seconds}
    res["features"] = [
        p.row("block 17 (320), mean, standardised (fruitlens default)", [M(17)]),
        p.row("block 17, mean, raw", [M(17)], std=False),
        p.row("the last layer (1280), mean, raw (--feature-layer last)", [M(18)], std=False),
        p.row("the last layer, mean, standardised", [M(18)]),
        *[p.row(f"block {j}, mean, standardised", [M(j)]) for j in (13, 14, 15, 16)],
        p.row("block 17, generalised mean (p = 3), standardised", [M(17, "gem")]),
        p.row("block 17, max, standardised", [M(17, "max")]),
        p.row("the last layer, max, standardised", [M(18, "max")]),
        p.row("block 17, mean and max side by side", [M(17), M(17, "max")]),
        p.row("blocks 16 + 17, mean", [M(16), M(17)]),
        p.row("block 17 + the last layer, mean", [M(17), M(18)]),
        p.row("blocks 15 + 16 + 17, mean", [M(15), M(16), M(17)]),
        p.row("blocks 13 to 17, mean", [M(j) for j in (13, 14, 15, 16, 17)]),
    ]
    b17 = [M(17)]
    res["heads"] = [
        p.row("weight decay 1e-4 (the original's)", b17, wd=1e-4),
        p.row("weight decay 1e-2", b17, wd=1e-2),
        p.row("weight decay 3e-2", b17, wd=3e-2),
        p.row("dropout 0.5", b17, drop=0.5),
        p.row("label smoothing 0.1", b17, smoothing=0.1),
        p.row("cosine classifier, scale 16", b17, cosine=16.0),
        p.row("cosine classifier, scale 32", b17, cosine=32.0),
        p.row("each image's features L2-normalised, then standardised", b17, l2=True),
        p.row("whitened on the top 64 principal components", b17, pca=64),
        p.row("whitened on the top 128 principal components", b17, pca=128),
        p.row("200 epochs", b17, epochs=200),
    ]
    # test-time tiles, an ensemble of both layers, and the class prior re-estimated on unlabeled photos
    probs = {}
    for j in (17, 18):
        X, o = p.matrices([M(j)], std=j == 17)
        probs[j] = []
        for s in range(SEEDS):
            h = head(X, p.Y, s)
            with torch.no_grad():
                probs[j].append(
                    {
                        "full": F.softmax(h(o["photos"]), 1),
                        "tiles": [F.softmax(h(t), 1) for t in o["tiles"]],
                        "unl": F.softmax(h(o["unl"]), 1),
                    }
                )
    mean = lambda scores: tuple(sum(v) / len(v) for v in zip(*[score_probs(d, s) for s in scores]))
    schemes = [
        ("block 17, the whole photo (as predict does)", [q["full"] for q in probs[17]]),
        ("block 17, the whole photo + its 2x2 tiles", [q["full"] + sum(q["tiles"]) for q in probs[17]]),
        ("the last layer, the whole photo", [q["full"] for q in probs[18]]),
        ("the last layer, the whole photo + its 2x2 tiles", [q["full"] + sum(q["tiles"]) for q in probs[18]]),
        ("block 17 and the last layer's heads averaged", [a["full"] + b["full"] for a, b in zip(probs[17], probs[18])]),
        (
            "block 17, divided by the mean score on unlabeled grocery/train photos",
            [q["full"] / q["unl"].mean(0) for q in probs[17]],
        ),
        ("block 17, divided by its square root", [q["full"] / q["unl"].mean(0).sqrt() for q in probs[17]]),
        (
            "block 17, times the class prior EM estimates on unlabeled grocery/train photos",
            [q["full"] * _em_prior(q["unl"]) for q in probs[17]],
        ),
    ]
    res["test_time"] = [{"name": n, **dict(zip(("accuracy", "balanced"), mean(s)))} for n, s in schemes]
    print(json.dumps(res["test_time"]), flush=True)
    res["kinds"] = kinds(d, probs[17][0]["full"])
    save("layers", res)
    write_section("layers", markdown(res))


def _em_prior(u: torch.Tensor, rounds: int = 30) -> torch.Tensor:
    """The class prior of unlabeled images, re-estimated by EM (Saerens et al. 2002), relative to a uniform one."""
    w = torch.full((u.shape[1],), 1.0 / u.shape[1])
    for _ in range(rounds):
        q = u * w
        w = (q / q.sum(1, keepdim=True)).mean(0)
    return w * u.shape[1]


def kinds(d: dict, scores: torch.Tensor) -> list[dict]:
    """Per GroceryStore kind: photos, accuracy, and the three Fruits-360 classes it is called most."""
    classes = CLASSES
    names = sorted(json.loads(CLASS_MAP.read_text()))
    pred = scores.argmax(1)
    out = []
    for gi, name in enumerate(names):
        sel = d["gy"] == gi
        called = collections.Counter(classes[i] for i in pred[sel].tolist()).most_common(3)
        out.append(
            {
                "kind": name,
                "photos": int(sel.sum()),
                "accuracy": float(d["allowed"][gi, pred[sel]].float().mean()),
                "called": [[c, n] for c, n in called],
            }
        )
    return out


def markdown(res: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}%"
    table = lambda rows, dims=True: (
        (
            ["| features | dims | accuracy on photos | balanced |", "|---|---|---|---|"]
            if dims
            else ["| scheme | accuracy on photos | balanced |", "|---|---|---|"]
        )
        + [
            f"| {r['name']} | {r['dims']} | {pct(r['accuracy'])} | {pct(r['balanced'])} |"
            if dims
            else f"| {r['name']} | {pct(r['accuracy'])} | {pct(r['balanced'])} |"
            for r in rows
        ]
    )
    lines = [
        "## Which features a head on studio shots should read (`python benchmarks/bench_layers.py`)",
        "",
        f"Measured {res['machine']['date']} on frozen MobileNetV2 features at 224 px (PyTorch, "
        f"{res['feature_seconds']:.0f} s for all of them): every 6th Fruits-360 training frame "
        f"({res['images']:,} images), clean view + 2 default augmented views, a linear head (weight decay 1e-3, "
        f"dropout 0.2, 60 epochs, mean of 2 seeds), scored on GroceryStore's {res['photos']} photos of the kinds "
        "Fruits-360 has (train + val). Differences of 2-3 points are noise.",
        "",
    ]
    lines += table(res["features"])
    lines += ["", "The head's recipe, on block 17's standardised features:", ""] + table(res["heads"])
    lines += [
        "",
        "At test time (2x2 tiles: each quarter of the photo at 448 px, resized to 224 px; the last rows use "
        "grocery/train's 1,142 unlabeled photos, as an adaptation would):",
        "",
    ] + table(res["test_time"], False)
    lines += [
        "",
        "What the default (block 17, standardised; seed 0) calls each GroceryStore kind:",
        "",
        "| kind | photos | accuracy | called most |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {k['kind']} | {k['photos']} | {pct(k['accuracy'])} | {', '.join(f'{c} ({n})' for c, n in k['called'])} |"
        for k in res["kinds"]
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

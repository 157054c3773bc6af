"""Two more ways a head on studio shots might read photos (issue 18), measured as ``bench_layers.py`` measures its
features (every 6th Fruits-360 training frame, clean view + 2 default views, a linear head with the default's
studio recipe, mean of 2 seeds, GroceryStore's 812 photos of the kinds Fruits-360 has):

- ImageNet's own classes: the pretrained classifier's 1000 scores (which MobileNetV2 learned on photos, not studio
  shots) as the head's features, all of them or only the ImageNet classes that the studio shots score highest (a
  concept bottleneck: what the training data never shows, such as a shop's shelves, cannot carry weight);
- nuisance directions: the directions in block 17's features along which a studio shot moves when the default
  augmentation's view is pasted on clutter backgrounds (bench_augment's "default + clutter"), projected out of the
  features, or those views added to the training rows.

- local descriptors: a head on block 17's features at each position of its 7 x 7 map that the white-background mask
  calls fruit (the skin's colour and texture, which a single studio fruit and a supermarket pile share), a photo
  scored by the mean over its positions (at 224 px, and at 448 px where each fruit of a pile covers more positions).

Also: what ImageNet's classifier itself calls the photos of each kind (zero-shot, no head)."""

from __future__ import annotations

import collections
import json
import sys
import time

import torch
import torch.nn.functional as F

from _measure import machine, save, write_section
from bench_augment import NET, PRE, SEEDS, default_aug, fg_mask, load_data, photo_aug, score_probs
from bench_layers import CLASS_MAP, block_features, head, result, studio_views

from fruitlens.models.registry import get_spec  # bench_augment put src/ on the path
from fruitlens.models.weights import load_state_dict, pick

B17, LAST = (17, "mean"), (18, "mean")


def imagenet_head() -> tuple[torch.nn.Linear, list[str]]:
    """MobileNetV2's ImageNet classifier (the layer fruitlens drops) and its class names."""
    enum = get_spec(NET.name).weights_enum
    w = pick(enum)
    sd = load_state_dict(w)
    lin = torch.nn.Linear(1280, 1000)
    lin.load_state_dict({"weight": sd["classifier.1.weight"], "bias": sd["classifier.1.bias"]})
    return lin.eval(), list(w.meta["categories"])


def clutter_view(d: dict, g: torch.Generator) -> torch.Tensor:
    """Block 17 of one clutter view per image, in ``d``'s order (mixed-class batches: clutter takes other fruit)."""
    perm = torch.randperm(len(d["x"]), generator=g)
    f = block_features(d["x"][perm], lambda x, y, gg: photo_aug(x, y, gg, bg="mix", geo=0.6), d["y"][perm], g)[B17]
    return f[torch.argsort(perm)]


@torch.inference_mode()
def block17_maps(x8: torch.Tensor, fn=None, y=None, g=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block 17's feature maps (n, 320, h, w; half precision) of ``fn``'s views or the images, and the share of
    each map position that the white-background mask calls fruit (n, h, w)."""
    net = NET.backbone.features.eval()
    maps, fruit = [], []
    for i in range(0, len(x8), 64):
        x = fn(x8[i : i + 64], y[i : i + 64], g) if fn else x8[i : i + 64]
        h = PRE.normalise(x)
        for m in net[: B17[0] + 1]:
            h = m(h)
        maps.append(h.half())
        fruit.append(
            F.adaptive_avg_pool2d(fg_mask(x.float() / 255 if x.dtype == torch.uint8 else x), h.shape[-2:]).squeeze(1)
        )
    return torch.cat(maps), torch.cat(fruit)


def local_rows(d: dict) -> list[dict]:
    """A head on the fruit positions of block 17's maps (clean + 2 default views; 5 epochs: ~100 times the rows of
    a pooled head), photos scored by the mean of their positions' scores or probabilities."""
    g = torch.Generator().manual_seed(0)
    train = [block17_maps(d["x"])] + [block17_maps(d["x"], default_aug(), d["y"], g) for _ in range(2)]
    X = torch.cat([m.float().permute(0, 2, 3, 1)[k > 0.5] for m, k in train])
    Y = torch.cat([d["y"].view(-1, 1, 1).expand_as(k)[k > 0.5] for _, k in train])
    mu, sd = X.mean(0), X.std(0) + 1e-3
    heads = [head((X - mu) / sd, Y, s, epochs=5) for s in range(SEEDS)]
    out = []
    for px, photos in ((224, d["gx"]), (448, d["gx2"])):
        z = (block17_maps(photos)[0].float().permute(0, 2, 3, 1) - mu) / sd
        with torch.no_grad():
            scores = [h(z.reshape(-1, z.shape[-1])).view(*z.shape[:3], -1) for h in heads]
        for how, agg in (
            ("mean score", lambda s: s.mean((1, 2))),
            ("mean probability", lambda s: F.softmax(s, -1).mean((1, 2))),
        ):
            out.append(
                result(
                    f"block 17 at each fruit position ({len(X):,} rows), the photo at {px} px, the {how} "
                    f"of its {z.shape[1]} x {z.shape[2]} positions",
                    X.shape[1],
                    [score_probs(d, agg(s)) for s in scores],
                )
            )
    return out


def row(
    d: dict,
    name: str,
    train: list[torch.Tensor],
    ys: torch.Tensor,
    photos: torch.Tensor,
    std: bool = True,
    proj: torch.Tensor | None = None,
) -> dict:
    X = torch.cat(train)
    mu, sd = (X.mean(0), X.std(0) + 1e-3) if std else (torch.zeros(X.shape[1]), torch.ones(X.shape[1]))
    X, P = (X - mu) / sd, (photos - mu) / sd
    if proj is not None:
        X, P = X @ proj, P @ proj
    r = []
    for s in range(SEEDS):
        h = head(X, ys, s)
        with torch.no_grad():
            r.append(score_probs(d, h(P)))
    return result(name, X.shape[1], r)


def main() -> None:
    t0 = time.perf_counter()
    d = load_data()
    g = torch.Generator().manual_seed(0)
    f = studio_views(d, g)
    clutter = clutter_view(d, g)
    feature_seconds = round(time.perf_counter() - t0, 1)
    lin, names = imagenet_head()
    with torch.no_grad():
        logits = {k: lin(v[LAST]) for k, v in f.items()}
    views = ("clean", "aug1", "aug2")
    ys = torch.cat([d["y"]] * 3)
    rows = lambda fn: [fn(f[k], logits[k]) for k in views]
    res = {"machine": machine(), "images": len(d["x"]), "photos": len(d["gx"]), "feature_seconds": feature_seconds}
    top = F.softmax(torch.cat([logits[k] for k in views]), 1).mean(0).argsort(descending=True)
    res["studio_top"] = [names[i] for i in top[:10].tolist()]
    within = lambda k: lambda b, z: F.softmax(z[:, top[:k]], 1)
    res["concepts"] = [
        row(
            d, "block 17 (320), mean, standardised (fruitlens default)", rows(lambda b, z: b[B17]), ys, f["photos"][B17]
        ),
        row(d, "ImageNet's 1000 class scores, raw", rows(lambda b, z: z), ys, logits["photos"], std=False),
        row(d, "ImageNet's 1000 class scores, standardised", rows(lambda b, z: z), ys, logits["photos"]),
        row(
            d,
            "ImageNet's 1000 class probabilities, standardised",
            rows(lambda b, z: F.softmax(z, 1)),
            ys,
            F.softmax(logits["photos"], 1),
        ),
        *[
            row(
                d,
                f"the {k} ImageNet classes the studio shots score highest, probabilities among them, standardised",
                rows(within(k)),
                ys,
                within(k)(None, logits["photos"]),
            )
            for k in (10, 20, 50)
        ],
        row(
            d,
            "block 17 + ImageNet's probabilities, standardised",
            rows(lambda b, z: torch.cat([b[B17], F.softmax(z, 1)], 1)),
            ys,
            torch.cat([f["photos"][B17], F.softmax(logits["photos"], 1)], 1),
        ),
    ]
    b17 = [f[k][B17] for k in views]
    X = torch.cat(b17)
    mu, sd = X.mean(0), X.std(0) + 1e-3
    moves = (clutter - mu) / sd - (f["clean"][B17] - mu) / sd  # where each studio shot goes on clutter
    _, _, v = torch.linalg.svd(moves, full_matrices=False)
    res["nuisance"] = [
        row(
            d,
            "block 17, the clutter views as a fourth training view",
            b17 + [clutter],
            torch.cat([d["y"]] * 4),
            f["photos"][B17],
        )
    ]
    res["nuisance"] += [
        row(
            d,
            f"block 17, the top {k} directions clutter moves the features along projected out",
            b17,
            ys,
            f["photos"][B17],
            proj=torch.eye(320) - v[:k].T @ v[:k],
        )
        for k in (4, 16, 48)
    ]
    res["local"] = local_rows(d)
    called = logits["photos"].argmax(1)
    kinds = sorted(json.loads(CLASS_MAP.read_text()))
    res["zero_shot"] = [
        {
            "kind": kind,
            "photos": int((d["gy"] == gi).sum()),
            "called": [[names[c], n] for c, n in collections.Counter(called[d["gy"] == gi].tolist()).most_common(3)],
        }
        for gi, kind in enumerate(kinds)
    ]
    save("concepts", res)
    write_section("concepts", markdown(res))


def markdown(res: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}%"
    table = lambda rows: (
        ["| features | dims | accuracy on photos | balanced |", "|---|---|---|---|"]
        + [f"| {r['name']} | {r['dims']} | {pct(r['accuracy'])} | {pct(r['balanced'])} |" for r in rows]
    )
    lines = [
        "## ImageNet's own classes and nuisance directions (`python benchmarks/bench_concepts.py`)",
        "",
        f"Measured {res['machine']['date']} as bench_layers measures ({res['images']:,} Fruits-360 frames, "
        f"clean + 2 default views, a linear head, mean of 2 seeds, GroceryStore's {res['photos']} photos; "
        f"{res['feature_seconds']:.0f} s of features). The studio shots' highest ImageNet classes: "
        f"{', '.join(res['studio_top'])}.",
        "",
    ]
    lines += table(res["concepts"])
    lines += [
        "",
        "Directions along which block 17's features move when a studio shot's default view is pasted on "
        "clutter backgrounds (the singular vectors of clean-to-clutter moves, in standardised units):",
        "",
    ]
    lines += table(res["nuisance"])
    lines += [
        "",
        "Local descriptors: a head on block 17's features at each map position the white-background mask "
        "calls fruit (standardised, 5 epochs), each photo scored over all its positions:",
        "",
    ]
    lines += table(res["local"])
    lines += [
        "",
        "What ImageNet's classifier itself calls each kind's photos (no head; its top 3):",
        "",
        "| kind | photos | called most |",
        "|---|---|---|",
    ]
    lines += [
        f"| {k['kind']} | {k['photos']} | {', '.join(f'{c} ({n})' for c, n in k['called'])} |" for k in res["zero_shot"]
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

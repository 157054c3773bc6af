"""What ImageNet's photo-trained classifier and the photo's colours add to a head on studio shots (issue 18), measured
as ``bench_layers.py`` measures its features (every 6th Fruits-360 training frame, clean view + 2 default views, a
linear head with the default's studio recipe, mean of 2 seeds, GroceryStore's 812 photos of the kinds Fruits-360 has):

- produce-weighted pooling: a photo's block-17 (or last-layer) map averaged with each position weighted by how much
  ImageNet's classifier, applied at that position, calls it produce (its 22 fruit and vegetable classes, 936-957),
  instead of the plain mean that lets a shop's shelves and floor weigh as much as the fruit;
- ImageNet's own judgement for the classes it has by name (Fruits-360's Apple Granny Smith, Lemon, Orange,
  Pomegranate, Strawberry): the head's probabilities and ImageNet's, for those classes, mixed as
  ``lam * q + (1 - lam * sum(q)) * p`` (ImageNet's probability of each named class goes to it; the rest keeps the
  head's proportions);
- both together;
- a head on colour alone: a hue x saturation histogram of the studio fruit's pixels (the white-background mask) and of
  the whole photo.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from _measure import machine, save, write_section
from bench_augment import CLASSES, NET, PRE, SEEDS, fg_mask, load_data, score_probs
from bench_concepts import imagenet_head
from bench_layers import head, result, studio_views

B17, LAST = (17, "mean"), (18, "mean")
PRODUCE = range(936, 958)  # ImageNet's head cabbage ... pomegranate
NAMED = {
    "Apple Granny Smith": "Granny Smith",
    "Lemon": "lemon",
    "Orange": "orange",
    "Pomegranate": "pomegranate",
    "Strawberry": "strawberry",
}  # Fruits-360 class -> the ImageNet class of the same name


@torch.inference_mode()
def photo_maps(x8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Block 17's and the last layer's feature maps of the photos, as (n, positions, channels)."""
    net = NET.backbone.features.eval()
    b17, last = [], []
    for i in range(0, len(x8), 64):
        h = PRE.normalise(x8[i : i + 64])
        for j, m in enumerate(net):
            h = m(h)
            if j == B17[0]:
                b17.append(h.flatten(2).transpose(1, 2))
        last.append(h.flatten(2).transpose(1, 2))
    return torch.cat(b17), torch.cat(last)


def produce_weights(last: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    """(n, positions, 1) pooling weights: ImageNet's probability of produce at each position, summing to 1."""
    with torch.no_grad():
        w = F.softmax(lin(last), -1)[..., list(PRODUCE)].sum(-1) + 1e-4
    return (w / w.sum(1, keepdim=True)).unsqueeze(-1)


def named_mix(p: torch.Tensor, q: torch.Tensor, idx: dict[int, int], lam: float) -> torch.Tensor:
    """The head's probabilities ``p`` with ImageNet's ``q`` of the classes it has by name (``idx``: class -> ImageNet
    class) mixed in at weight ``lam``."""
    m = torch.zeros_like(p)
    for c, j in idx.items():
        m[:, c] = q[:, j]
    return lam * m + (1 - lam * m.sum(1, keepdim=True)).clamp(min=0) * p


def hue_histogram(x8: torch.Tensor, mask=None, hues: int = 16, sats: int = 4, greys: int = 4) -> torch.Tensor:
    """Per image, the share of its pixels (under ``mask``) in each hue x saturation bin, and in ``greys`` brightness
    bins for pixels of little colour; square-rooted (Hellinger)."""
    out = []
    for i in range(0, len(x8), 128):
        x = x8[i : i + 128].float() / 255
        mx, arg = x.max(1)
        c = mx - x.min(1).values
        r, g, b = x.unbind(1)
        h = torch.stack([((g - b) / (c + 1e-9)) % 6, (b - r) / (c + 1e-9) + 2, (r - g) / (c + 1e-9) + 4], 1)
        h = h.gather(1, arg.unsqueeze(1)).squeeze(1) / 6
        s = c / (mx + 1e-9)
        colour = s > 0.15
        idx = torch.where(
            colour,
            (h * hues).long().clamp(0, hues - 1) * sats + ((s - 0.15) / 0.85 * sats).long().clamp(0, sats - 1),
            hues * sats + (mx * greys).long().clamp(0, greys - 1),
        )
        w = torch.ones_like(mx) if mask is None else mask(x).squeeze(1)
        hist = torch.zeros(len(x), hues * sats + greys).scatter_add_(1, idx.flatten(1), w.flatten(1))
        out.append((hist / hist.sum(1, keepdim=True).clamp(min=1e-6)).sqrt())
    return torch.cat(out)


def heads_on(X: torch.Tensor, Y: torch.Tensor, std: bool = True) -> tuple[list, torch.Tensor, torch.Tensor]:
    """The default's heads (one per seed) on ``X``, standardised where ``std``, and the standardisation."""
    mu, sd = (X.mean(0), X.std(0) + 1e-3) if std else (torch.zeros(X.shape[1]), torch.ones(X.shape[1]))
    return [head((X - mu) / sd, Y, s) for s in range(SEEDS)], mu, sd


def main() -> None:
    t0 = time.perf_counter()
    d = load_data()
    f = studio_views(d, torch.Generator().manual_seed(0))
    m17, mlast = photo_maps(d["gx"])
    feature_seconds = round(time.perf_counter() - t0, 1)
    lin, names = imagenet_head()
    classes = CLASSES
    idx = {classes.index(c): names.index(n) for c, n in NAMED.items() if c in classes}  # all 5 but under --smoke
    with torch.no_grad():
        q = F.softmax(lin(f["photos"][LAST]), 1)
    wts = produce_weights(mlast, lin)
    Y = torch.cat([d["y"]] * 3)
    views = ("clean", "aug1", "aug2")
    res = {
        "machine": machine(),
        "images": len(d["x"]),
        "photos": len(d["gx"]),
        "feature_seconds": feature_seconds,
        "named": NAMED,
        "rows": [],
    }
    for layer, key, maps, std in (
        ("block 17 (320), standardised", B17, m17, True),
        ("the last layer (1280), raw", LAST, mlast, False),
    ):
        X = torch.cat([f[k][key] for k in views])
        heads, mu, sd = heads_on(X, Y, std)
        with torch.no_grad():
            probs = {
                pool: [F.softmax(h((P - mu) / sd), 1) for h in heads]
                for pool, P in (("mean", maps.mean(1)), ("produce", (maps * wts).sum(1)))
            }
        for pool, what in (("mean", "mean (as fruitlens pools)"), ("produce", "produce-weighted mean")):
            for lam in (0.0, 0.25, 0.5, 0.75, 1.0):
                name = f"{layer}, {what}" + (f", ImageNet's named classes mixed in at {lam:g}" if lam else "")
                res["rows"].append(
                    result(name, X.shape[1], [score_probs(d, named_mix(p, q, idx, lam)) for p in probs[pool]])
                )
    hs, hp = hue_histogram(d["x"], fg_mask), hue_histogram(d["gx"])
    heads, mu, sd = heads_on(hs, d["y"])
    with torch.no_grad():
        res["rows"].append(
            result(
                "colour alone: hue x saturation histogram (fruit pixels of the studio shots, the "
                "whole photo), clean views",
                hs.shape[1],
                [score_probs(d, h((hp - mu) / sd)) for h in heads],
            )
        )
    save("priors", res)
    write_section("priors", markdown(res))


def markdown(res: dict) -> str:
    pct = lambda v: f"{100 * v:.1f}%"
    named = ", ".join(f"{c} = {n}" for c, n in res["named"].items())
    lines = [
        "## ImageNet's judgement and the photo's colours (`python benchmarks/bench_priors.py`)",
        "",
        f"Measured {res['machine']['date']} as bench_layers measures ({res['images']:,} Fruits-360 frames, "
        f"clean + 2 default views, a linear head, mean of 2 seeds, GroceryStore's {res['photos']} photos; "
        f"{res['feature_seconds']:.0f} s of features). Produce-weighted: each map position of the photo weighted "
        "by ImageNet's probability of its 22 produce classes there. Named classes mixed in: for the classes "
        f"ImageNet has by name ({named}), `lam * q + (1 - lam * sum(q)) * p` with ImageNet's probabilities q "
        "and the head's p. Differences of 2-3 points are noise.",
        "",
        "| features | dims | accuracy on photos | balanced |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['name']} | {r['dims']} | {pct(r['accuracy'])} | {pct(r['balanced'])} |" for r in res["rows"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

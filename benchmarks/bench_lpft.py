"""Fine-tuning the top of the backbone on studio shots after the linear probe (LP-FT), measured on photos (issue 18).

As ``bench_layers.py`` measures: every 6th Fruits-360 training frame, clean view + 2 default augmented views, scored
on GroceryStore's 812 photos of the kinds Fruits-360 has, mean of 2 seeds. MobileNetV2's blocks 0-13 stay frozen (their
outputs are computed once, which makes this affordable on a CPU); blocks 14-17 and the head (on block 17's
standardised features, as fruitlens's default for studio shots) then train together for 4 epochs (Adam, backbone lr
1e-5, head lr 1e-4, BatchNorm statistics kept), starting from the linear probe. After each epoch: the photos scored by
the jointly trained head, and by a new linear probe on the fine-tuned blocks' features."""

from __future__ import annotations

import copy
import json
import sys
import time

import torch
import torch.nn.functional as F

from _measure import SMOKE, machine, save, write_section
from bench_augment import NET, PRE, SEEDS, default_aug, load_data, score_probs
from bench_layers import head

CUT, EPOCHS = 13, 1 if SMOKE else 4  # blocks 0..CUT frozen


@torch.inference_mode()
def low_maps(low, x8, fn=None, y=None, g=None) -> torch.Tensor:
    return torch.cat(
        [
            low(PRE.normalise(fn(x8[i : i + 64], y[i : i + 64], g) if fn else x8[i : i + 64]))
            for i in range(0, len(x8), 64)
        ]
    )


@torch.inference_mode()
def pooled(blocks, maps: torch.Tensor) -> torch.Tensor:
    return torch.cat([blocks(maps[i : i + 256]).mean((2, 3)) for i in range(0, len(maps), 256)])


def probe(d, blocks, X, Y, P, seed) -> tuple[float, float]:
    """A new linear probe on ``blocks``' standardised features, scored on the photos."""
    fx = pooled(blocks, X)
    mu, sd = fx.mean(0), fx.std(0) + 1e-3
    lin = head((fx - mu) / sd, Y, seed)
    with torch.no_grad():
        return score_probs(d, lin((pooled(blocks, P) - mu) / sd))


def run_seed(d, top, X, Y, P, seed) -> list[dict]:
    blocks = copy.deepcopy(top).eval()  # eval: BatchNorm keeps ImageNet's statistics
    fx = pooled(blocks, X)
    mu, sd = fx.mean(0), fx.std(0) + 1e-3
    lin = head((fx - mu) / sd, Y, seed)
    with torch.no_grad():
        lp = score_probs(d, lin((pooled(blocks, P) - mu) / sd))
    rows = [{"epoch": 0, "joint": lp, "reprobe": lp}]
    opt = torch.optim.Adam(
        [{"params": list(blocks.parameters()), "lr": 1e-5}, {"params": list(lin.parameters()), "lr": 1e-4}]
    )
    for ep in range(EPOCHS):
        torch.manual_seed(100 + ep)
        perm = torch.randperm(len(X))
        for i in range(0, len(X), 64):
            b = perm[i : i + 64]
            f = (blocks(X[b]).mean((2, 3)) - mu) / sd
            loss = F.cross_entropy(lin(F.dropout(f, 0.2)), Y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            joint = score_probs(d, lin((pooled(blocks, P) - mu) / sd))
        rows.append({"epoch": ep + 1, "joint": joint, "reprobe": probe(d, blocks, X, Y, P, seed)})
        print(seed, json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    t0 = time.perf_counter()
    d = load_data()
    net = NET.backbone.features.eval()
    low, top = net[: CUT + 1], net[CUT + 1 : 18]
    g = torch.Generator().manual_seed(0)
    X = torch.cat(
        [
            low_maps(low, d["x"]),
            low_maps(low, d["x"], default_aug(), d["y"], g),
            low_maps(low, d["x"], default_aug(), d["y"], g),
        ]
    )
    Y, P = torch.cat([d["y"]] * 3), low_maps(low, d["gx"])
    seeds = [run_seed(d, top, X, Y, P, s) for s in range(SEEDS)]
    mean = lambda vals: [sum(v) / len(v) for v in zip(*vals)]
    rows = [
        {"epoch": e, "joint": mean([s[e]["joint"] for s in seeds]), "reprobe": mean([s[e]["reprobe"] for s in seeds])}
        for e in range(EPOCHS + 1)
    ]
    res = {
        "machine": machine(),
        "images": len(d["x"]),
        "photos": len(d["gx"]),
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    save("lpft", res)
    pct = lambda v: f"{100 * v:.1f}%"
    lines = [
        "## Fine-tuning the top blocks after the linear probe (`python benchmarks/bench_lpft.py`)",
        "",
        f"Measured {res['machine']['date']} ({res['seconds']:.0f} s): every 6th Fruits-360 training frame "
        f"({res['images']:,}), clean + 2 default views; MobileNetV2's blocks 14-17 and the head on block 17's "
        "standardised features trained together from the linear probe (backbone lr 1e-5, head lr 1e-4, "
        f"BatchNorm statistics kept), scored on GroceryStore's {res['photos']} photos (mean of {SEEDS} seeds).",
        "",
        "| epochs of fine-tuning | joint head: accuracy on photos | balanced | a new probe on the blocks: "
        "accuracy | balanced |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['epoch']}{' (the linear probe)' if r['epoch'] == 0 else ''} | {pct(r['joint'][0])} | "
        f"{pct(r['joint'][1])} | {pct(r['reprobe'][0])} | {pct(r['reprobe'][1])} |"
        for r in rows
    ]
    write_section("lpft", "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())

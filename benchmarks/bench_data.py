"""check/split: speed and memory on Fruits-360, leak share of its own split vs fruitlens's grouped split,
and check's scaling from 10k to 100k synthetic images."""

from __future__ import annotations

import csv
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from _measure import FRUITLENS, OUT, SMOKE, data_path, machine, run, save, scratch

SYNTHETIC = (200,) if SMOKE else (10_000, 100_000)  # images of the synthetic trees check runs on


def synthetic_tree(root: Path, n: int, side: int = 48, classes: int = 20, quality: int = 80) -> Path:
    """``n`` distinct JPEGs of ``side`` px in ``classes`` classes (random colour fields), written once and reused."""
    done = root / f".done-{n}"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(arr).resize((side, side), Image.Resampling.BILINEAR).save(
            folder / f"{i:07d}.jpg", quality=quality
        )
    done.write_text("ok")
    return root


def synthetic_shapes(root: Path, n: int, side: int = 96, classes: int = 20, quality: int = 85) -> Path:
    """``n`` distinct, learnable JPEGs of ``side`` px in ``classes`` classes: a random colour field (as
    ``synthetic_tree``: every image distinct, no near copies) with the class's shape (disc, square, triangle, bar) in
    the class's colour (one of five) drawn on it at a random place and size. Written once and reused."""
    from PIL import ImageDraw

    done = root / f".done-{n}"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    hues = ((220, 40, 40), (40, 170, 40), (40, 70, 220), (235, 200, 30), (150, 40, 190))
    for i in range(n):
        c = i % classes
        folder = root / f"class{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        field = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(field).resize((side, side), Image.Resampling.BILINEAR)
        r = side * rng.uniform(0.18, 0.32)
        x, y = rng.uniform(r, side - r, 2)
        colour = tuple(int(v) for v in np.clip(np.array(hues[c // 4 % 5]) + rng.integers(-25, 26, 3), 0, 255))
        draw, shape = ImageDraw.Draw(img), c % 4
        if shape == 0:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif shape == 1:
            draw.rectangle((x - r, y - r, x + r, y + r), fill=colour)
        elif shape == 2:
            draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=colour)
        else:
            draw.rectangle((x - r, y - r / 3, x + r, y + r / 3), fill=colour)
        img.save(folder / f"{i:07d}.jpg", quality=quality)
    done.write_text("ok")
    return root


def main() -> None:
    fruits = data_path("fruits360")
    res: dict = {"machine": machine()}
    r = run(FRUITLENS + ["check", str(fruits), "--json"], OUT / "check_fruits360.log")
    summary = json.loads(r["output"][r["output"].index("{") :])["summary"]
    res["check_fruits360"] = {k: r[k] for k in ("cmd", "seconds", "peak_mib", "rc")} | {"images": summary["images"]}
    res["own_split_leak"] = summary["leaks"].get("test<-train", {})
    with tempfile.TemporaryDirectory() as tmp:
        pooled = Path(tmp) / "pooled.csv"
        with pooled.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["path", "label"])
            for split in ("Training", "Test"):
                for f in sorted((fruits / split).rglob("*.jpg")):
                    w.writerow([str(f), f.parent.name])
        out_csv = Path(tmp) / "manifest.csv"
        r = run(
            FRUITLENS
            + ["split", str(pooled), "--val", "0.15", "--test", "0.15", "--seed", "0", "--out", str(out_csv), "--json"],
            OUT / "split_fruits360.log",
        )
        split = json.loads(r["output"][r["output"].index("{") :])
        res["grouped_split"] = {
            "cmd": r["cmd"].replace(str(pooled), "pooled.csv").replace(str(out_csv), "manifest.csv"),
            "seconds": r["seconds"],
            "totals": split["totals"],
            "leaks": split["leaks"],
            "classes_without_test": sum(1 for v in split["per_class"].values() if not v["test"]),
        }
    synth = scratch("fruitlens-bench-synthetic")
    for n in SYNTHETIC:
        root = synthetic_tree(synth / str(n), n)
        r = run(FRUITLENS + ["check", str(root), "--json"], OUT / f"check_synthetic_{n}.log")
        res[f"check_synthetic_{n}"] = {
            "cmd": r["cmd"].replace(str(root), f"<{n} synthetic 48px JPEGs>"),
            "seconds": r["seconds"],
            "peak_mib": r["peak_mib"],
            "rc": r["rc"],
        }
    save("data", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    sys.exit(main())

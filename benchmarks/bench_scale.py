"""Scaling (issue 21): the feature pass over two DDP processes against one process on Fruits-360 (the time, the
images each process computed, and whether the merged cache equals the single-process one), and the default command
as the data grows (synthetic 96 px images: the whole command's time, the feature pass's throughput, peak memory)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch

from _measure import FRUITLENS, OUT, SMOKE, SMOKE_SIZE, data_path, machine, run, save, scratch, write_section
from bench_data import synthetic_shapes

RUNS = scratch("fruitlens-bench-scale")
SIZES = (200,) if SMOKE else (10_000, 40_000, 100_000, 300_000)  # synthetic images the default command trains on


def train(name: str, data: Path, args: list[str]) -> dict:
    out = RUNS / name
    shutil.rmtree(out, ignore_errors=True)
    cache = RUNS / f"cache-{name}"  # a feature store of its own: every run computes its features
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["FRUITLENS_CACHE"] = str(cache)
    # 300,000 images took 56 min here: a longer limit than the other benchmarks' hour
    r = run(
        FRUITLENS + ["train", str(data), "--out", str(out)] + args + SMOKE_SIZE, OUT / f"scale_{name}.log", 3 * 3600
    )
    if r["rc"] != 0:
        raise SystemExit(f"{name} failed:\n{r['output'][-3000:]}")
    info = json.loads((out / "train_info.json").read_text())
    rep = json.loads((out / "report.json").read_text())
    row = {
        "cmd": r["cmd"].replace(str(out), f"runs/{name}").replace(str(data), "DATA"),
        "seconds": r["seconds"],
        "peak_mib": r["peak_mib"],
        "stages": info.get("stages", {}),
        "stage_peak_mib": info.get("stage_peak_mib", {}),
        "feature_pass": info.get("feature_pass"),
        "accuracy": rep["metrics"]["accuracy"],
        "images": sum(rep["dataset"]["totals"].values()),
        "views": rep["config"]["fit"]["feature_views"],
        "run": str(out),
    }
    print(name, json.dumps({k: v for k, v in row.items() if k != "run"}), flush=True)
    return row


def caches_equal(a: Path, b: Path) -> bool:
    x = torch.load(a / "cache" / "features.pt", weights_only=True)
    y = torch.load(b / "cache" / "features.pt", weights_only=True)
    keys = [k for k in x if not k.startswith("_")]
    return keys == [k for k in y if not k.startswith("_")] and all(
        torch.equal(p, q) for k in keys for p, q in zip(x[k], y[k])
    )


def growth(sizes: list[dict]) -> str:
    """Seconds per image of the largest run over the smallest's."""
    per = [r["seconds"] / r["images"] for r in sizes]
    return f"{per[-1] / per[0]:.2f}"


def markdown(res: dict) -> str:
    s, d = res["ddp"]["single"], res["ddp"]["ddp"]
    fs, fd = s["feature_pass"], d["feature_pass"]
    lines = [
        "## Scaling (`python benchmarks/bench_scale.py`)",
        "",
        f"Measured {res['machine']['date']} on this 2-core machine.",
        "",
        "### The feature pass over DDP processes (Fruits-360, the default recipe)",
        "",
        "| run | command | wall s | feature pass s per process | images per process | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, r, f in (("one process (2 threads)", s, fs), ("2 DDP processes (1 thread each)", d, fd)):
        lines.append(
            f"| {name} | `{r['cmd']}` | {r['seconds']} | {' + '.join(str(x) for x in f['seconds_per_rank'])} | "
            f"{' + '.join(f'{x:,}' for x in f['images_per_rank'])} | {r['peak_mib']} |"
        )
    lines += [
        "",
        f"Merged DDP cache equal to the single-process cache, tensor for tensor (views included): "
        f"**{'yes' if res['ddp']['caches_equal'] else 'NO'}**; cache {fd['cache_bytes'] / 2**20:.0f} MiB. On 2 cores "
        "the two processes share the same cores, so the point is the split (each process decodes and forwards "
        "every other batch), not a speed-up; on more devices the pass divides by their number.",
        "",
        "### The default command as the data grows (synthetic 96 px JPEGs, 20 classes)",
        "",
        "Each image is a random colour field (every image distinct: no near copies to prune) with its class's shape "
        "(disc, square, triangle or bar) in its class's colour (one of five) drawn at a random place and size "
        "(`bench_data.synthetic_shapes`).",
        "",
        "| images | wall s | s per 1,000 images | feature pass s | feature pass images/s (x views) | cache MiB | "
        "peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["sizes"]:
        f = r["feature_pass"]
        rate = sum(f["images_per_rank"]) * (1 + r["views"]) / max(sum(f["seconds_per_rank"]), 1e-9)
        lines.append(
            f"| {r['images']:,} | {r['seconds']} | {1000 * r['seconds'] / r['images']:.2f} | "
            f"{sum(f['seconds_per_rank']):.1f} | {rate:.0f} | {f['cache_bytes'] / 2**20:.0f} | "
            f"{r['peak_mib']} |"
        )
    accuracies = ", ".join(f"{100 * r['accuracy']:.1f}%" for r in res["sizes"])
    lines += [
        "",
        "Stages of the largest run: " + ", ".join(f"{k} {v}s" for k, v in res["sizes"][-1]["stages"].items()) + ".",
        "",
        "The train process's peak resident memory (MiB, its own, without its decoding worker) as each stage ended, "
        "by size (the stage where it jumps is the one that holds the memory):",
        "",
        "| images | " + " | ".join(stages := list(res["sizes"][-1]["stage_peak_mib"])) + " |",
        "|---|" + "---|" * len(stages),
        *(
            f"| {r['images']:,} | " + " | ".join(f"{r['stage_peak_mib'].get(k, '-')}" for k in stages) + " |"
            for r in res["sizes"]
        ),
        "",
        f"Test accuracy {accuracies}. Seconds per 1,000 images from the smallest to the largest: "
        f"{growth(res['sizes'])}x.",
    ]
    return "\n".join(lines)


def main(args: list[str]) -> None:
    """``bench_scale.py``: everything; ``bench_scale.py ddp``: the DDP rows; ``bench_scale.py N ...``: the synthetic
    runs of N images (the other rows of an earlier run stay)."""
    RUNS.mkdir(parents=True, exist_ok=True)
    prev = OUT / "scale.json"
    res: dict = json.loads(prev.read_text()) if args and prev.exists() else {}
    res["machine"] = machine()
    if not args or args == ["ddp"]:
        fruits = data_path("fruits360")
        single = train("f360_single", fruits, ["--accelerator", "cpu"])
        ddp = train("f360_ddp", fruits, ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"])
        res["ddp"] = {"single": single, "ddp": ddp, "caches_equal": caches_equal(Path(single["run"]), Path(ddp["run"]))}
    sizes = SIZES if not args else [int(a) for a in args if a.isdigit()]
    rows = {r["images"]: r for r in res.get("sizes", []) if args and r.get("data") == "shapes"}
    for n in sizes:
        data = synthetic_shapes(scratch("fruitlens-bench-shapes96") / str(n), n)
        row = train(f"synthetic_{n}", data, ["--target-acc", "0"]) | {"data": "shapes"}
        rows[row["images"]] = row
        res["sizes"] = [rows[k] for k in sorted(rows)]
        save("scale", res)  # after each size: a long run stopped part-way keeps what it measured
    if "ddp" in res and res.get("sizes"):
        write_section("scale", markdown(res))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

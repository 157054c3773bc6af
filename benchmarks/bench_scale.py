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
from bench_data import synthetic_tree

RUNS = scratch("fruitlens-bench-scale")
SIZES = (200,) if SMOKE else (10_000, 30_000, 100_000)  # synthetic images the default command trains on


def train(name: str, data: Path, args: list[str]) -> dict:
    out = RUNS / name
    shutil.rmtree(out, ignore_errors=True)
    cache = RUNS / f"cache-{name}"  # a feature store of its own: every run computes its features
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["FRUITLENS_CACHE"] = str(cache)
    r = run(FRUITLENS + ["train", str(data), "--out", str(out)] + args + SMOKE_SIZE, OUT / f"scale_{name}.log")
    if r["rc"] != 0:
        raise SystemExit(f"{name} failed:\n{r['output'][-3000:]}")
    info = json.loads((out / "train_info.json").read_text())
    rep = json.loads((out / "report.json").read_text())
    row = {
        "cmd": r["cmd"].replace(str(out), f"runs/{name}").replace(str(data), "DATA"),
        "seconds": r["seconds"],
        "peak_mib": r["peak_mib"],
        "stages": info.get("stages", {}),
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
    single = res["ddp"]["single"]
    accuracies = ", ".join(f"{100 * r['accuracy']:.1f}%" for r in res["sizes"])
    lines += [
        "",
        "Stages of the largest run: " + ", ".join(f"{k} {v}s" for k, v in res["sizes"][-1]["stages"].items()) + ".",
        "",
        "The synthetic images are random colour fields whose class is their index modulo 20: nothing to learn "
        f"(test accuracy {accuracies}, chance is 5%). That is the worst case for the L-BFGS solver of the "
        "calibration's out-of-fold heads, which runs to its iteration cap on every fold: calibration is most of the "
        f"time here ({single['stages'].get('calibration')} s of the {single['seconds']} s on Fruits-360 above). What "
        "the rows show is the growth: time per image and memory as the data grow.",
    ]
    return "\n".join(lines)


def main() -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    fruits = data_path("fruits360")
    res: dict = {"machine": machine()}
    single = train("f360_single", fruits, ["--accelerator", "cpu"])
    ddp = train("f360_ddp", fruits, ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"])
    res["ddp"] = {"single": single, "ddp": ddp, "caches_equal": caches_equal(Path(single["run"]), Path(ddp["run"]))}
    res["sizes"] = []
    for n in SIZES:
        data = synthetic_tree(scratch("fruitlens-bench-synthetic96") / str(n), n, side=96, quality=85)
        res["sizes"].append(train(f"synthetic_{n}", data, ["--target-acc", "0"]))
    save("scale", res)
    write_section("scale", markdown(res))


if __name__ == "__main__":
    sys.exit(main())

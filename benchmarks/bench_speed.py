"""Speed (issue 19): the default command on Fruits-360 against the plain recipe in one benchmark run, the time split
by stage (train_info.json), the share of the machine's backbone throughput the whole command reaches, and the demo
(``fruitlens demo`` on the local Fruits-360 copy, as ``make demo`` runs it after setup)."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time

from _measure import FRUITLENS, OUT, SMOKE, SMOKE_SIZE, data_path, machine, run, save, scratch, write_section

RUNS = scratch("fruitlens-bench-speed")
THROUGHPUT = (1, 1) if SMOKE else (10, 3)  # seconds of each backbone measurement, and how many (the median is kept)


def fresh_store(name: str) -> None:
    """An empty feature store for the next command: its time is a first run's on the data, not one that reuses the
    features an earlier run (or benchmark) left in ~/.cache/fruitlens."""
    cache = RUNS / f"store-{name}"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["FRUITLENS_CACHE"] = str(cache)


def train(name: str, args: list[str]) -> dict:
    out = RUNS / name
    shutil.rmtree(out, ignore_errors=True)
    fresh_store(name)
    r = run(
        FRUITLENS + ["train", str(data_path("fruits360")), "--out", str(out)] + args + SMOKE_SIZE,
        OUT / f"speed_{name}.log",
    )
    if r["rc"] != 0:
        raise SystemExit(f"{name} failed:\n{r['output'][-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    info = json.loads((out / "train_info.json").read_text())
    cfg = rep["config"]
    row = {
        "cmd": r["cmd"].replace(str(out), f"runs/{name}"),
        "seconds": r["seconds"],
        "peak_mib": r["peak_mib"],
        "accuracy": rep["metrics"]["accuracy"],
        "ci95": rep["metrics"]["accuracy_ci95"],
        "image_size": rep["model"]["preprocessing"]["image_size"],
        "epochs": len(rep["history"]),
        "stages": info.get("stages", {}),
        "views": cfg["fit"]["feature_views"] if cfg["fit"]["feature_cache"] else None,
        "splits": rep["dataset"]["totals"],
        # images through the feature pass (the training images it kept, and val): near copies train by representatives
        "feature_images": sum((info.get("feature_pass") or {}).get("images_per_rank") or [0]),
    }
    print(name, json.dumps(row), flush=True)
    return row


def on_photos(name: str) -> dict:
    """The run's figure on GroceryStore's photos (train + val) through ``grocery-from-fruits360.json``: the
    cross-domain figure a faster recipe must not lose."""
    out, photos = RUNS / name, data_path("grocery")
    r = run(
        FRUITLENS + ["evaluate", str(out), str(photos), "--class-map", str(data_path("grocery-from-fruits360.json"))],
        OUT / f"speed_{name}_photos.log",
    )
    if r["rc"] != 0:
        raise SystemExit(f"{name}: evaluate failed\n{r['output'][-3000:]}")
    m = json.loads((out / "eval" / photos.name / "report.json").read_text())["metrics"]
    return {"photos": m["n"], "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"]}


def backbone_throughput(size: int = 96, batch: int = 32, seconds: float = 10) -> float:
    """Images/s of the MobileNetV2 backbone alone on ONNX Runtime (the feature pass's engine), this machine."""
    import torch

    from fruitlens.models.registry import build_model
    from fruitlens.training.engine import Engine

    net = build_model("mobilenet_v2", 2, weights="imagenet", img_size=size)
    engine = Engine(net.backbone, size)
    x = torch.randn(batch, 3, size, size)
    for _ in range(3):
        engine(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        engine(x)
        n += batch
    return n / (time.perf_counter() - t0)


def demo() -> dict:
    out = RUNS / "demo"
    shutil.rmtree(out, ignore_errors=True)
    fresh_store("demo")
    smoke = ["--no-int8", "model.img_size=64"] if SMOKE else []  # (bench_infer.py's smoke run exports int8)
    r = run(
        FRUITLENS + ["demo", "--data", str(data_path("fruits360")), "--out", str(out)] + smoke, OUT / "speed_demo.log"
    )
    if r["rc"] != 0:
        raise SystemExit(f"demo failed:\n{r['output'][-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    m = rep["metrics"]
    empty = [c for c, v in m["per_class"].items() if not v["support"]]
    info = json.loads((out / "train_info.json").read_text())
    row = {
        "cmd": r["cmd"].replace(str(out), "runs/demo"),
        "seconds": r["seconds"],
        "peak_mib": r["peak_mib"],
        "accuracy": m["accuracy"],
        "ci95": m["accuracy_ci95"],
        "test_images": m["n"],
        "classes": len(rep["classes"]),
        "classes_without_test_images": empty,
        "leak_free": rep["leak"]["leak_free"],
        "min_test_images_per_class": min(int(v["support"]) for v in m["per_class"].values()),
        "phases": sorted({h["phase"] for h in rep["history"]}),
        "stages": info.get("stages", {}),
    }
    print("demo", json.dumps(row), flush=True)
    return row


def _pct(v) -> str:
    return f"{100 * v:.2f}%"


def markdown(res: dict) -> str:
    d, p, dm = res["default"], res["plain"], res["demo"]
    tr = d["splits"]
    kept = d.get("feature_images", 0) - tr.get("val", 0) if d.get("feature_images") else tr.get("train", 0)
    useful = kept * (1 + (d["views"] or 0)) + tr.get("val", 0) + tr.get("test", 0)
    ideal = useful / res["backbone_img_per_s"]
    lines = [
        "## Speed: the default command against the plain recipe, by stage (`python benchmarks/bench_speed.py`)",
        "",
        f"Measured {res['machine']['date']}, both runs in this benchmark run, one after the other, on the same "
        "2 cores; wall time is the whole command (check, split, features, head, calibration, label audit, "
        "export with its parity check, evaluation).",
        "",
        "| recipe | command | wall s | peak MiB | px | epochs | test accuracy (95% CI) | GroceryStore photos "
        "(balanced) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (
        ("fruitlens default", d),
        ("plain recipe (224 px, frozen, augmentation, no cache, every image)", p),
    ):
        ci = r["ci95"] or [float("nan")] * 2
        lines.append(
            f"| {name} | `{r['cmd']}` | {r['seconds']} | {r['peak_mib']} | {r['image_size']} | {r['epochs']} | "
            f"{_pct(r['accuracy'])} ({100 * ci[0]:.1f}-{100 * ci[1]:.1f}%) | "
            + (f"{_pct(ph['accuracy'])} ({_pct(ph['balanced_accuracy'])}) |" if (ph := r.get("on_photos")) else "- |")
        )
    when = (
        "both runs in this benchmark run"
        if "note" not in d
        else f"the default run measured {res['machine']['date']}, the plain recipe {res.get('plain_measured', '?')} on "
        "the same machine"
    )
    lines += [
        "",
        f"**Speed-up: {p['seconds'] / d['seconds']:.1f}x** (plain wall time / default wall time; {when}).",
        "",
        "GroceryStore photos: `fruitlens evaluate RUN ../shared/data/grocery --class-map "
        "../shared/data/grocery-from-fruits360.json` (train + val, the photos of the kinds Fruits-360 has, "
        f"{(d.get('on_photos') or {}).get('photos', '?')} photos): what the studio model gives on real photos.",
        "",
        "Time by stage of the default command (train_info.json `stages`; the rest of the wall time is starting "
        "Python and importing torch):",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in d["stages"].items()]
    lines += [
        "",
        f"The backbone alone runs at {res['backbone_img_per_s']:.0f} images/s here (MobileNetV2, "
        f"{res.get('backbone_px', 96)} px, ONNX Runtime, batch 32). The command pushes {useful:,} images through it "
        f"({kept:,} training images kept of {tr.get('train', 0):,} x {1 + (d['views'] or 0)} "
        f"views, val, test): {ideal:.1f} s of pure backbone work, **{100 * ideal / d['seconds']:.0f}%** of its "
        f"{d['seconds']} s wall time.",
        "",
        "### make demo",
        "",
        f"`{dm['cmd']}` (what `make demo` runs after setup): **{dm['seconds']} s** "
        f"({dm['seconds'] / 60:.1f} min), peak {dm['peak_mib']} MiB; {dm['classes']} classes, "
        f"{'leak-free' if dm['leak_free'] else 'NOT leak-free'} split, {dm['test_images']} test images, "
        f"at least {dm['min_test_images_per_class']} per class"
        + (
            ", classes without test images: " + ", ".join(missing)
            if (missing := dm["classes_without_test_images"])
            else ""
        )
        + "; "
        f"test accuracy {_pct(dm['accuracy'])} (95% CI {100 * dm['ci95'][0]:.1f}-{100 * dm['ci95'][1]:.1f}%); "
        f"phases run: {', '.join(dm['phases'])}.",
        "",
        "| demo stage | seconds |",
        "|---|---|",
    ] + [f"| {k} | {v} |" for k, v in dm["stages"].items()]
    return "\n".join(lines)


def main(which: str = "all") -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    prev = OUT / "speed.json"
    res = json.loads(prev.read_text()) if prev.exists() and which != "all" else {}
    res["machine"] = machine()
    if which == "default":  # the default command again (the plain recipe's ~15 min measured earlier stays)
        res["default"] = train("f360_default", [])
        res["default"]["note"] = f"plain recipe measured earlier, {res.get('plain_measured', '?')}"
    if which in ("all", "train"):
        res["default"] = train("f360_default", [])
    if which in ("all", "train", "plain"):
        res["plain_measured"] = machine()["date"]
        res["plain"] = train(
            "f360_plain",
            [
                "data.keep_share=1",  # every training image, as the original trains (no representatives of near copies)
                "--no-feature-cache",
                "--img-size",
                "224",
                "--target-acc",
                "0.98",
                "--target-monitor",
                "train",
                "--epochs",
                "2",
            ],
        )

    for name, key in (("f360_default", "default"), ("f360_plain", "plain")):
        if which in ("all", "train", "photos") or which == key:
            res[key]["on_photos"] = on_photos(name)
    if which in ("all", "train", "plain", "default"):  # at the default's input size
        res["backbone_px"] = res["default"]["image_size"]
        res["backbone_img_per_s"] = statistics.median(
            [backbone_throughput(size=res["backbone_px"], seconds=THROUGHPUT[0]) for _ in range(THROUGHPUT[1])]
        )
    if which in ("all", "demo", "default"):
        res["demo"] = demo()
    save("speed", res)
    if all(k in res for k in ("default", "plain", "demo")):
        write_section("speed", markdown(res))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "all"))

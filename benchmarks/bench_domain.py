"""Studio shots and photos (issue 18): Fruits-360 models on GroceryStore's supermarket photos of the fruit kinds they
know (``../shared/data/grocery-from-fruits360.json`` says which Fruits-360 classes count as right), in one benchmark
run: the plain recipe (the original's: 224 px, frozen MobileNetV2, augmentation, no feature cache), today's default
(224 px for studio shots), the default's features with the original's head recipe, ``--fast`` (96 px, the earlier
default) and ``--adapt-to grocery/train`` (unlabeled).
Scored on grocery train + val (1,253 photos; the classes Fruits-360 lacks are counted apart), on val alone (the
adaptation saw train's photos, without their labels) and on train alone (what adapting to the photos one wants sorted
gains); with each run's own test accuracy and the time it took.

``--keep``: evaluate the runs trained by an earlier invocation again instead of training them."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

from _measure import (
    FRUITLENS,
    OUT,
    SHARED,
    SMOKE_SIZE,
    check_command,
    data_path,
    machine,
    pick,
    run,
    save,
    scratch,
    write_section,
)

RUNS = scratch("fruitlens-bench-domain")
CLASS_MAP = data_path("grocery-from-fruits360.json")
F360 = data_path("fruits360")
RECIPES = {  # name -> (label, train options)
    "f360_adapt": ("fruitlens default --adapt-to grocery/train", ["--adapt-to", str(data_path("grocery") / "train")]),
    "f360_default": ("fruitlens default", []),
    "f360_last": ("default on the last layer's features (--feature-layer last)", ["--feature-layer", "last"]),
    # the default's features (its feature store: a warm-cache time), the head trained with the original's recipe
    "f360_original_head": (
        "default, the original's head recipe (weight decay 1e-4, 98% stop)",
        ["--target-acc", "0.98", "fit.weight_decay=0.0001"],
    ),
    "f360_fast": ("fruitlens --fast", ["--fast"]),
    "f360_plain": (
        "plain recipe (224 px, no cache)",
        [
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
    ),
}


def manifest(name: str, splits: tuple[str, ...]) -> Path:
    out = RUNS / f"{name}.csv"
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label"])
        for split in splits:
            for p in sorted((data_path("grocery") / split).rglob("*.jpg")):
                w.writerow([str(p.resolve()), p.parent.name])
    return out


def command(name: str, options: list[str]) -> list[str]:
    return FRUITLENS + ["train", str(F360), "--out", str(RUNS / name)] + options


def train(name: str, options: list[str], keep: bool) -> Path:
    run_dir = RUNS / name
    if keep and (run_dir / "report.json").exists():
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)
    # an empty feature store for each run: its time is a first run's, not one that reuses another run's features
    # (but the original head recipe's, whose subject is the head: the default's features)
    cache = RUNS / f"{'f360_default' if name == 'f360_original_head' else name}-cache"
    if name != "f360_original_head":
        shutil.rmtree(cache, ignore_errors=True)
    os.environ["FRUITLENS_CACHE"] = str(cache)
    r = run(command(name, options) + SMOKE_SIZE, OUT / f"domain_train_{name}.log")
    if r["rc"] != 0:
        sys.exit(f"{name}: training failed\n{r['output'][-3000:]}")
    return run_dir


def cross_domain(name: str, run_dir: Path, photos: Path) -> dict:
    r = run(
        FRUITLENS + ["evaluate", str(run_dir), str(photos), "--class-map", str(CLASS_MAP)],
        OUT / f"domain_{name}_{photos.stem}.log",
    )
    if r["rc"] != 0:
        raise SystemExit(f"{name}: evaluate failed\n{r['output'][-3000:]}")
    other = json.loads((run_dir / "eval" / photos.stem / "report.json").read_text())
    m, trust = other["metrics"], other.get("trust") or {}
    return {
        "cmd": r["cmd"].replace(str(run_dir), f"runs/{name}").replace(str(photos), photos.name),
        "photos": m["n"],
        "accuracy": m["accuracy"],
        "ci95": m["accuracy_ci95"],
        "balanced_accuracy": m["balanced_accuracy"],
        "unfamiliar": trust.get("unfamiliar"),
        "not_sure": trust.get("not_sure"),
        "seconds": r["seconds"],
    }


def row(name: str, label: str, run_dir: Path, photos: Path, val: Path, seen: Path) -> dict:
    own = json.loads((run_dir / "report.json").read_text())
    info = json.loads((run_dir / "train_info.json").read_text())
    out = {
        "run": name,
        "label": label,
        "image_size": own["model"]["preprocessing"]["image_size"],
        "test_accuracy": own["metrics"]["accuracy"],
        "studio_share": own["domain"]["white_background"],
        "train_seconds": info.get("command_seconds") or info.get("train_seconds"),
        "adaptation": info.get("adaptation"),
        "config": own["config"],
        "val": cross_domain(name, run_dir, val),
        # grocery/train alone: photos the adapted run saw without labels (a user adapting to the photos they want
        # sorted), photos no other run saw
        "seen": cross_domain(name, run_dir, seen),
    }
    if not info.get("adaptation"):  # the adapted run saw grocery/train's photos: only val is fair to it
        out["all"] = cross_domain(name, run_dir, photos)
    print(name, json.dumps({k: v for k, v in out.items() if k != "config"}), flush=True)
    return out


def markdown(res: dict) -> str:
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    ci = lambda e: f"{100 * e['ci95'][0]:.1f}-{100 * e['ci95'][1]:.1f}%" if e.get("ci95") else "-"
    # the adapted run trains first (the longest to wait for is the plain recipe's)
    order = ["f360_plain", "f360_default", "f360_last", "f360_original_head", "f360_fast", "f360_adapt"]
    rows = sorted(res["rows"], key=lambda r: order.index(r["run"]))
    lines = [
        "## Studio shots and photos (`python benchmarks/bench_domain.py`)",
        "",
        f"Measured {res['machine']['date']}, one benchmark run, one seed. Models trained on Fruits-360 (studio "
        f"shots on white: the check counts {100 * rows[0]['studio_share']:.0f}% of its images on a white "
        "background, so every report of these runs carries the studio-only warning), evaluated on GroceryStore's "
        "supermarket photos of the fruit kinds Fruits-360 has, through `--class-map "
        "../shared/data/grocery-from-fruits360.json`; photos of other kinds (banana, melons, ...) are counted "
        "apart.",
        "",
        "| recipe | px | train s | Fruits-360 test accuracy | grocery train+val: photos | accuracy (95% CI) | "
        "balanced | 'not sure' | 'unfamiliar' | grocery val: photos | accuracy (95% CI) | balanced | 'not sure' | "
        "'unfamiliar' | grocery train: photos | accuracy (95% CI) | balanced |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, v, t = r.get("all") or {}, r["val"], r.get("seen") or {}
        lines.append(
            f"| {r['label']} | {r['image_size']} | {r['train_seconds']} | {pct(r['test_accuracy'])} | "
            f"{a.get('photos', '-')} | {pct(a.get('accuracy'))} ({ci(a)}) | {pct(a.get('balanced_accuracy'))} | "
            f"{pct(a.get('not_sure'))} | {pct(a.get('unfamiliar'))} | {v['photos']} | {pct(v['accuracy'])} "
            f"({ci(v)}) | {pct(v['balanced_accuracy'])} | {pct(v.get('not_sure'))} | {pct(v.get('unfamiliar'))} | "
            f"{t.get('photos', '-')} | {pct(t.get('accuracy'))} ({ci(t)}) | {pct(t.get('balanced_accuracy'))} |"
        )
    lines += [
        "",
        "The original head recipe's run reuses the default run's feature store: the same features, another "
        "head (its time is a warm-cache time). The default's head trains to convergence (no 98% stop, "
        "weight decay 1e-3) on studio shots upscaled for photos (`training/auto.py: auto_head_recipe`), and reads "
        "the features of MobileNetV2's block 17 (320 channels), standardised on the training features "
        "(`auto_feature_layer`); `--feature-layer last` is the same recipe on the last layer's 1280.",
    ]
    adapted = [r for r in rows if r.get("adaptation")]
    for r in adapted:
        a = r["adaptation"]
        lines += [
            "",
            f"Adaptation ({r['label']}): {a['method']} on {a['images']:,} unlabeled grocery/train photos "
            f"(all 28 kinds, labels never read): the surest {100 * a['share'] / len(a['rounds']):.0f}% then "
            f"{100 * a['share']:.0f}% of each class's photos, {' then '.join(map(str, a['rounds']))} photos; "
            "it is scored on grocery/val (photos it never saw) and, as a user adapting to the photos they "
            "want sorted would, on grocery/train's photos (seen without labels); not on train + val.",
        ]
    lines += [
        "",
        "Commands: "
        + "; ".join(
            "`fruitlens train ../shared/data/fruits360 "
            + " ".join(RECIPES[r["run"]][1]).replace(str(SHARED), "../shared/data")
            + "`"
            for r in rows
        )
        + "; then `fruitlens evaluate RUN grocery-photos.csv --class-map "
        "../shared/data/grocery-from-fruits360.json` (and `grocery-val.csv`, `grocery-train.csv`).",
    ]
    return "\n".join(lines)


def main() -> None:
    keep = "--keep" in sys.argv
    RUNS.mkdir(parents=True, exist_ok=True)
    photos, val, seen = (
        manifest(f"grocery-{n}", splits)
        for n, splits in (("photos", ("train", "val")), ("val", ("val",)), ("train", ("train",)))
    )
    rows = [
        row(name, label, train(name, options, keep), photos, val, seen)
        for name, (label, options) in pick(
            RECIPES.items(), check=lambda item: check_command(command(item[0], item[1][1]))
        )
    ]
    res = {"machine": machine(), "rows": rows}
    save("domain", res)
    write_section("domain", markdown(res))


if __name__ == "__main__":
    sys.exit(main())

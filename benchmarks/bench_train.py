"""Training: fruitlens's default recipe vs the plain recipe on Fruits-360 (same run), GroceryStore per model, and the
default recipe over 3 seeds on both (``seeds``: one seed is not a figure on 111 test photos). ``layers``: on
GroceryStore's photos, the last layer's features (the default there) against block 17's (``--feature-layer mid``,
the default for studio shots), 3 seeds each; it writes its own section of RESULTS.md."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from _measure import (
    FRUITLENS,
    OUT,
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

GROCERY = {  # the grocery part's rows: name -> (run folder, train options)
    "mobilenet_v2 default": ("g_mnv2", ["--target-acc", "0"]),
    "mobilenet_v2 + fine-tune 3 blocks": (
        "g_mnv2_ft",
        ["--target-acc", "0", "--fine-tune-blocks", "3", "--fine-tune-epochs", "3"],
    ),
    "plain recipe (224 px, frozen, no cache)": (
        "g_plain",
        ["--no-feature-cache", "--img-size", "224", "--target-acc", "0", "--epochs", "5"],
    ),
    "small_cnn (from scratch)": (
        "g_cnn",
        ["--model", "small_cnn", "--img-size", "128", "--target-acc", "0", "--epochs", "30"],
    ),
    "densenet121 (from scratch: no offline weights)": (
        "g_dn121",
        ["--model", "densenet121", "--weights", "none", "--img-size", "128", "--target-acc", "0", "--epochs", "8"],
    ),
}


def command(name: str, data: Path, args: list[str], runs: Path) -> list[str]:
    return FRUITLENS + ["train", str(data), "--out", str(runs / name)] + args


def train(name: str, data: Path, args: list[str], runs: Path) -> dict:
    out = runs / name
    shutil.rmtree(out, ignore_errors=True)
    r = run(command(name, data, args, runs) + SMOKE_SIZE, OUT / f"train_{name}.log")
    row = {
        "cmd": r["cmd"].replace(str(out), f"runs/{name}"),
        "rc": r["rc"],
        "seconds": r["seconds"],
        "peak_mib": r["peak_mib"],
    }
    if r["rc"] == 0:
        rep = json.loads((out / "report.json").read_text())
        m = rep["metrics"]
        row.update(
            accuracy=m["accuracy"],
            macro_f1=m["macro_f1"],
            ece=m["ece"],
            test_images=m["n"],
            evaluated_on=rep["evaluated_on"],
            image_size=rep["model"]["preprocessing"]["image_size"],
            epochs=len(rep["history"]),
            leak=rep["leak"],
        )
    else:
        row["error"] = r["output"][-2000:]
    print(name, json.dumps({k: v for k, v in row.items() if k != "error"}), flush=True)
    return row


def main(which: str = "all") -> None:
    runs = scratch("fruitlens-bench-runs")
    fruits, grocery = data_path("fruits360"), data_path("grocery")
    res: dict = {"machine": machine()}
    if which == "fruits360_default":  # rerun the fast recipe alone (the plain one takes ~15 min)
        res["fruits360_default"] = train("f360_default", fruits, [], runs)
        _speedup(res)
    if which in ("all", "seeds"):  # the default recipe with 3 seeds: split, augmentation and head all vary
        for key, data in (("fruits360", fruits), ("grocery", grocery)):
            extra = ["--target-acc", "0"] if key == "grocery" else []
            rows = [train(f"{key}_seed{s}", data, extra + ["--seed", str(s)], runs) for s in pick(range(3))]
            accs = [r["accuracy"] for r in rows if "accuracy" in r]
            res[f"{key}_seeds"] = {"runs": rows, "mean_accuracy": sum(accs) / len(accs) if accs else None}
        if which == "seeds":  # seed 0 is the default command: it updates the default row and the speed-up
            res["fruits360_default"] = res["fruits360_seeds"]["runs"][0]
            _speedup(res)
    if which == "layers":  # photos -> photos: does block 17 (the studio default) read them as well as the last layer?
        res["grocery_layers"] = {
            layer: [
                train(
                    f"grocery_{layer}_seed{s}",
                    grocery,
                    ["--target-acc", "0", "--seed", str(s), "--feature-layer", layer],
                    runs,
                )
                for s in pick(range(3))
            ]
            for layer in ("last", "mid")
        }
        save("train_layers", res)  # apart from train.json, which write_results.py reads for the core tables
        write_section("grocery_layers", layers_markdown(res["grocery_layers"], res["machine"]["date"]))
        return
    if which in ("all", "fruits360"):
        res["fruits360_default"] = train("f360_default", fruits, [], runs)
        res["fruits360_plain"] = train(
            "f360_plain",
            fruits,
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
            runs,
        )
        res["fruits360_speedup"] = round(res["fruits360_plain"]["seconds"] / res["fruits360_default"]["seconds"], 1)
    if which in ("all", "grocery"):
        # --smoke: the fine-tuning recipe (the default one is the seeds part's seed 0; eval_finetune.py reuses it)
        res["grocery"] = {
            label: train(name, grocery, args, runs)
            for label, (name, args) in pick(
                GROCERY.items(), [1], check=lambda item: check_command(command(item[1][0], grocery, item[1][1], runs))
            )
        }
    res["started"] = {which: res["machine"]["date"]}
    prev = OUT / "train.json"
    if prev.exists() and which != "all":
        old = json.loads(prev.read_text())
        res = {**old, **res, "started": {**old.get("started", {}), **res["started"]}}
    save("train", res)


def _speedup(res: dict) -> None:
    """The plain recipe's time (from an earlier ``fruits360`` part) over the new default run's."""
    prev = OUT / "train.json"
    plain = json.loads(prev.read_text()).get("fruits360_plain") if prev.exists() else None
    if plain is None:
        print(
            "no plain-recipe run in benchmarks/out/train.json (run 'bench_train.py fruits360'): no speed-up", flush=True
        )
        return
    res["fruits360_speedup"] = round(plain["seconds"] / res["fruits360_default"]["seconds"], 1)


def layers_markdown(rows: dict, date: str) -> str:
    mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)
    lines = [
        "## Which features on photos: GroceryStore (`python benchmarks/bench_train.py layers`)",
        "",
        f"Measured {date}: the default command on GroceryStore (28 classes, 448 px, test = its val folder, 111 "
        "photos) with `--seed 0`, `1`, `2`, reading the last layer's features (`--feature-layer last`, what "
        "`auto` picks for data that is not studio shots) or block 17's (`--feature-layer mid`, what it picks for "
        "studio shots). One photo is 0.9 points.",
        "",
        "| features | command (seed 0) | test accuracy per seed | mean | macro F1 (mean) | ECE (mean) "
        "| wall s per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer, name in (("last", "the last layer (1280)"), ("mid", "block 17 (320), standardised")):
        rs = [r for r in rows[layer] if "accuracy" in r]
        if len(rs) < len(rows[layer]):
            lines.append(
                f"| {name} | `{rows[layer][0]['cmd']}` | {len(rows[layer]) - len(rs)} runs failed "
                "(benchmarks/out/train_*.log) | - | - | - | - |"
            )
            continue
        lines.append(
            f"| {name} | `{rs[0]['cmd']}` | "
            + ", ".join(f"{100 * r['accuracy']:.2f}%" for r in rs)
            + f" | **{100 * mean(rs, 'accuracy'):.2f}%** | {100 * mean(rs, 'macro_f1'):.2f}% | "
            f"{mean(rs, 'ece'):.3f} | " + ", ".join(str(r["seconds"]) for r in rs) + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "all"))

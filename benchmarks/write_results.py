"""Writes benchmarks/RESULTS.md from the JSON files the bench_*.py scripts left in benchmarks/out/.
``--smoke``: from the smoke runs' JSON files into the smoke scratch folder's RESULTS.md (running bench_train.py,
bench_infer.py and bench_data.py in smoke mode first where their files are missing)."""

from __future__ import annotations

import json
import re
import sys

from _measure import OUT, RESULTS, SMOKE, prerequisite


def _load(name: str) -> dict:
    p = OUT / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def main() -> None:
    if SMOKE:
        for name, script in (
            ("train", ("bench_train.py", "all")),
            ("infer", ("bench_infer.py",)),
            ("data", ("bench_data.py",)),
        ):
            if not (OUT / f"{name}.json").exists():
                prerequisite(*script)
    data, train, infer = _load("data"), _load("train"), _load("infer")
    missing = [n for n, d in (("data", data), ("train", train), ("infer", infer)) if not d]
    if missing:  # RESULTS.md keeps the figures it has rather than losing the parts no JSON is left for
        sys.exit(
            f"benchmarks/out/ has no {', '.join(n + '.json' for n in missing)}: RESULTS.md is left as it is "
            "(run 'python benchmarks/run_all.py', which runs those benchmarks first)"
        )
    m = (train or data or infer).get("machine", {})
    lines = [
        "# fruitlens benchmark results",
        "",
        f"Measured {m.get('date', '?')} on {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
        f"Python {m.get('python', '?')}, torch {m.get('torch', '?')} (CPU only). "
        "Each figure names the command that produced it (`python -m fruitlens` = `fruitlens`). "
        "Rerun with `make bench`; memory is the peak proportional set size (PSS: shared pages split fairly) of the "
        "whole process tree, sampled every 0.1 s (less often where a sample would take over 5% of a core).",
        "",
        "Each part's start: "
        + ", ".join(
            [f"training on {k} {v}" for k, v in train.get("started", {}).items()]
            + [f"{k} {v['machine']['date']}" for k, v in (("inference", infer), ("data checks", data)) if v]
        )
        + " (`benchmarks/out/*.json` hold every figure). GPU figures (one lent NVIDIA H200): `GPU.md`.",
        "",
    ]
    if train.get("fruits360_default"):
        d, p = train["fruits360_default"], train.get("fruits360_plain")
        lines += [
            "## Training on Fruits-360 (27 classes, its own Test split, 4,232 images)",
            "",
            (
                "Both runs in one benchmark run on the same machine"
                if "--seed" not in d["cmd"]
                else "On the same machine; the default row is the seeds part's seed-0 run (the default command, run "
                "later than the plain recipe)"
            )
            + "; wall time covers the whole command: "
            "check, split, training, ONNX export and the evaluation that proves the accuracy.",
            "",
            "| recipe | command | wall s | peak MiB | input px | epochs | test accuracy | macro F1 | ECE |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in (
            ("fruitlens default (cached features, 1 augmented view)", d),
            ("plain recipe (seed's: 224 px, frozen, augmentation, Adam, no cache)", p),
        ):
            if r is None:  # no plain-recipe run yet (bench_train.py fruits360 makes one)
                continue
            lines.append(
                f"| {name} | `{r['cmd']}` | {r['seconds']} | {r['peak_mib']} | {r.get('image_size', '-')} | "
                f"{r.get('epochs', '-')} | {_pct(r.get('accuracy'))} | {_pct(r.get('macro_f1'))} | "
                f"{r.get('ece', 0):.4f} |"
            )
        lines += [
            "",
            f"**Speed-up: {train['fruits360_speedup']}x** (plain wall time / fruitlens wall time, each to a "
            f"finished, evaluated model with >= 97% test accuracy)."
            if p
            else "No plain-recipe run to compare.",
            "",
            f"Caveat printed by both runs: {d.get('leak', {}).get('test_images_with_train_duplicate', '?')} of the "
            "4,232 Test images have a near duplicate in Training (Fruits-360's own split), so these accuracies "
            "overstate accuracy on new photos; see the leak-free figures below.",
            "",
        ]
    if train.get("grocery"):
        lines += [
            "## Training on GroceryStore fruit (28 classes; test = the data's own val folder, 111 photos)",
            "",
            "A validation split is carved out of train (grouped by near duplicates); the data's val folder is "
            "never seen in training.",
            "",
            "| model / recipe | command | wall s | peak MiB | input px | test accuracy | macro F1 |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in train["grocery"].items():
            lines.append(
                f"| {name} | `{r['cmd']}` | {r['seconds']} | {r['peak_mib']} | {r.get('image_size', '-')} | "
                f"{_pct(r.get('accuracy'))} | {_pct(r.get('macro_f1'))} |"
            )
        lines.append("")
    if train.get("grocery_seeds"):
        lines += [
            "## The default recipe over 3 seeds",
            "",
            "`python benchmarks/bench_train.py seeds`: the default command with `--seed 0`, `1`, `2` (the seed "
            "changes the carved validation split, the augmentation and the head's initialisation). On 111 "
            "GroceryStore test photos one photo is 0.9 points, so a single run is not a figure. Where this part "
            "started later than the tables above (see each part's start), its seed-0 runs are the current "
            "default recipe's figures.",
            "",
            "| data | command (seed 0) | test accuracy per seed | mean | wall s per seed |",
            "|---|---|---|---|---|",
        ]
        for key, name in (
            ("fruits360_seeds", "Fruits-360 (its Test split)"),
            ("grocery_seeds", "GroceryStore (val folder)"),
        ):
            r = train[key]
            lines.append(
                f"| {name} | `{r['runs'][0]['cmd']}` | "
                + ", ".join(_pct(x.get("accuracy")) for x in r["runs"])
                + f" | **{_pct(r['mean_accuracy'])}** | "
                + ", ".join(str(x["seconds"]) for x in r["runs"])
                + " |"
            )
        lines.append("")
    if data:
        c = data["check_fruits360"]
        g = data["grouped_split"]
        own = data["own_split_leak"]
        lines += [
            "## Data checks and leak-free splits",
            "",
            "| what | command | result |",
            "|---|---|---|",
            f"| check Fruits-360 ({c['images']:,} images) | `{c['cmd']}` | "
            f"{c['seconds']} s, peak {c['peak_mib']} MiB |",
            f"| Fruits-360's own split | (from the check above) | {own.get('images', 0):,} Test images "
            f"({_pct(own.get('share'))}) have a near duplicate in Training |",
            f"| fruitlens grouped split of all 16,861 images | `{g['cmd']}` | leaks: "
            f"{sum(v['images'] for v in g['leaks'].values())} images (0%); split {g['totals']}; "
            f"{g['classes_without_test']} classes got no test images (one near-duplicate group each) |",
        ]
        for n in (10_000, 100_000):
            r = data.get(f"check_synthetic_{n}")
            if r:
                lines.append(
                    f"| check {n:,} synthetic images | `{r['cmd']}` | {r['seconds']} s "
                    f"({1000 * r['seconds'] / n:.2f} ms/image), peak {r['peak_mib']} MiB |"
                )
        lines.append("")
    if infer:
        e, x, pp = infer["evaluate"], infer["export"], infer["predict_path"]
        lines += [
            "## Evaluation, export, prediction and serving (the Fruits-360 run above, 96 px)",
            "",
            f"- Evaluate the 4,232-image test split and write the report: **{e['seconds']} s** (`{e['cmd']}`).",
            f"- Export (`{x['cmd']}`): fp32 top-1 agreement with PyTorch "
            f"{_pct(x['parity']['fp32']['top1_agreement'])} on {x['parity']['fp32']['images']} validation images, "
            f"max logit difference {x['parity']['fp32']['max_abs_logit_diff']:.1e}; int8 agreement "
            f"{_pct(x['parity'].get('int8', {}).get('top1_agreement'))}.",
            "",
            "| engine | img/s at batch 32 | ms at batch 1 |",
            "|---|---|---|",
        ]
        for k, v in x.get("speed", {}).items():
            lines.append(f"| {k} | {v['batch32_img_per_s']} | {v['batch1_ms']} |")
        lines += [
            "",
            "Predict path end to end on decoded images (PIL in memory; resize, crop, normalisation and softmax "
            "included; batch 32; 512 Fruits-360 test images; `Predictor.predict`; the engines take turns for "
            "5 rounds and each figure is the median):",
            "",
            "| engine | img/s (median) | all rounds | top-1 agreement with PyTorch eager |",
            "|---|---|---|---|",
        ]
        for k, v in pp.items():
            if isinstance(v, dict):
                lines.append(
                    f"| {k} | {v['img_per_s']} | {', '.join(map(str, v['all_rounds']))} | "
                    f"{_pct(v['top1_agreement_with_pytorch'])} |"
                )
        lines += [
            "",
            f"ONNX Runtime fp32 / PyTorch eager: **{pp['speedup_fp32_vs_pytorch_eager']}x**; "
            f"/ PyTorch channels_last: **{pp['speedup_fp32_vs_pytorch_channels_last']}x**.",
            "",
            "Web service under load: 8 concurrent loopback clients post Fruits-360 JPEGs for 30 s "
            "(`benchmarks/bench_infer.py`; memory is the RSS of the server and its workers):",
            "",
            "| command | requests/s | p50 ms | p95 ms | p99 ms | errors / requests | memory before -> after MiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for key in ("serve", "serve_workers2"):
            if key in infer:
                s = infer[key]
                lines.append(
                    f"| `fruitlens serve runs/f360_default --workers {s.get('workers', 1)}` | "
                    f"{s['req_per_s']} | {s['p50_ms']} | {s['p95_ms']} | {s['p99_ms']} | "
                    f"{s['errors']} / {s['requests']} | {s['rss_before_mib']} -> {s['rss_after_mib']} |"
                )
        lines.append("")
    path = RESULTS
    kept = _sections(path.read_text()) if path.exists() else []
    path.write_text("\n".join(lines).rstrip() + "\n" + "".join(f"\n{block}\n" for block in kept))
    print("\n".join(lines))


def _sections(text: str) -> list[str]:
    """The ``<!-- name -->`` ... ``<!-- /name -->`` sections that the other benchmarks wrote (``_measure.
    write_section``): this script writes the core parts and keeps those as they were measured."""
    return [m.group(0) for m in re.finditer(r"<!-- ([\w-]+) -->\n.*?\n<!-- /\1 -->", text, re.S)]


if __name__ == "__main__":
    main()

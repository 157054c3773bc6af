"""The trust layer (issue 15), measured with the real pipeline:

- calibration: ECE and log loss of the test images before and after the temperature, the risk-coverage figures and
  the "not sure" / "unfamiliar" shares, for GroceryStore over 3 seeds with the default groups (visual) and with
  near-copy groups, and for Fruits-360;
- OOD: every 4th class is held out of training; its images are the "not one of my classes" cases against the known
  classes' test images: AUROC and FPR at 95% detection of fruitlens's ood_score against max-softmax, and the share
  that the 95th-percentile rule flags;
- cost: the calibration stage's seconds in training; per prediction, the ONNX model with every trust output against
  one with logits only (batch 1 and 32), and the heat-map overlay.
"""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from _measure import (
    FRUITLENS,
    OUT,
    SMOKE,
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

RUNS = scratch("fruitlens-bench-trust")
TIMED = (5, 2, 2) if SMOKE else (200, 30, 50)  # timed runs at batch 1 and batch 32, and of the overlay


def command(name: str, data: Path | str, args: list[str]) -> list[str]:
    return FRUITLENS + ["train", str(data), "--out", str(RUNS / name)] + args


def train(name: str, data: Path | str, args: list[str]) -> dict:
    out = RUNS / name
    shutil.rmtree(out, ignore_errors=True)
    r = run(command(name, data, args) + SMOKE_SIZE, OUT / f"trust_{name}.log")
    if r["rc"] != 0:
        raise SystemExit(f"{name} failed:\n{r['output'][-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    info = json.loads((out / "train_info.json").read_text())
    t = rep["trust"]
    row = {
        "cmd": r["cmd"].replace(str(out), f"runs/{name}"),
        "seconds": r["seconds"],
        "run": str(out),
        "accuracy": rep["metrics"]["accuracy"],
        "test_images": rep["metrics"]["n"],
        "ece": rep["metrics"]["ece"],
        "temperature": t["temperature"],
        "source": t["source"],
        "heldout_images": t["heldout_images"],
        "ece_before": t["ece_before"],
        "ece_after": t["ece_after"],
        "log_loss_before": t["log_loss_before"],
        "log_loss_after": t["log_loss_after"],
        "aurc": t["risk_coverage"]["aurc"],
        "coverage_at": t["risk_coverage"]["coverage_at"],
        "answered": t["answered"],
        "answered_accuracy": t["answered_accuracy"],
        "not_sure": t["not_sure"],
        "unfamiliar": t["unfamiliar"],
        "calibration_seconds": info.get("stages", {}).get("calibration"),
    }
    print(name, json.dumps(row), flush=True)
    return row


def held_out_manifest(root: Path, out: Path, splits: tuple[str, ...]) -> tuple[Path, list[str]]:
    """A manifest of the classes except every 4th (sorted), keeping the data's split folders; returns it and the
    held-out classes."""
    classes = sorted({p.name for s in splits for p in (root / s).iterdir() if p.is_dir()})
    unknown = classes[::4]
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        for s in splits:
            for c in classes:
                if c in unknown or not (root / s / c).is_dir():
                    continue
                for p in sorted((root / s / c).glob("*.jpg")):
                    w.writerow([str(p.resolve()), c, {"Training": "train", "Test": "test", "val": "test"}.get(s, s)])
    return out, unknown


def ood(name: str, root: Path, splits: tuple[str, ...], unknown_from: tuple[str, ...], args: list[str]) -> dict:
    from sklearn.metrics import roc_auc_score

    from fruitlens.data.manifest import Manifest
    from fruitlens.inference.predictor import Predictor, softmax

    manifest, unknown = held_out_manifest(root, RUNS / f"{name}.csv", splits)
    row = train(name, manifest, args)
    pred = Predictor.load(row["run"])
    m = Manifest.from_csv(Path(row["run"]) / "manifest.csv")
    known = [str(m.resolve(r)) for r in m.split("test")]
    novel = [str(p) for s in unknown_from for c in unknown for p in sorted((root / s / c).glob("*.jpg"))]

    def scores(paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
        o, s = [], []
        for batch in pred.outputs_many(paths, 64):
            rows = [r for _, r in batch if isinstance(r, dict)]
            o += [r["ood_score"] for r in rows]
            s += [float(softmax(r["logits"][None])[0].max()) for r in rows]
        return np.array(o, float), np.array(s, float)

    ko, ks = scores(known)
    no, ns = scores(novel)
    y = np.r_[np.zeros(len(ko)), np.ones(len(no))]

    def fpr95(score_in: np.ndarray, score_out: np.ndarray) -> float:  # in-class images flagged at 95% of novel ones
        cut = np.quantile(score_out, 0.05)
        return float((score_in >= cut).mean())

    threshold = pred.ood_threshold
    row.update(
        known_images=len(ko),
        novel_images=len(no),
        unknown_classes=unknown,
        auroc_ood_score=float(roc_auc_score(y, np.r_[ko, no])),
        auroc_max_softmax=float(roc_auc_score(y, np.r_[-ks, -ns])),
        fpr95_ood_score=fpr95(ko, no),
        fpr95_max_softmax=fpr95(-ks, -ns),
        rule_flags_novel=float((no > threshold).mean()) if threshold is not None else None,
        rule_flags_known=float((ko > threshold).mean()) if threshold is not None else None,
    )
    print(
        name, "ood", json.dumps({k: v for k, v in row.items() if "auroc" in k or "fpr" in k or "rule" in k}), flush=True
    )
    return row


def prediction_cost(run_dir: str) -> dict:
    """ms per image of the full ONNX model (logits, features, class maps, ood_score) and of a logits-only export of
    the same checkpoint, at batch 1 and 32; and of the heat-map overlay."""
    import torch
    from PIL import Image

    from fruitlens.inference import onnx as onnx_io
    from fruitlens.inference.explain import overlay
    from fruitlens.inference.predictor import Predictor
    from fruitlens.models.checkpoint import load_model

    ckpt = load_model(Path(run_dir) / "checkpoints" / "best.ckpt")
    size = ckpt.model.preprocessing.image_size
    plain = RUNS / "logits_only.onnx"
    onnx_io.export_module(ckpt.model, plain, size)
    out = {"image_size": size}
    for label, path in (("trust outputs", Path(run_dir) / "export" / "model.onnx"), ("logits only", plain)):
        sess = onnx_io.session(path)
        name = sess.get_inputs()[0].name
        for batch in (1, 32):
            x = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
            for _ in range(5):
                sess.run(None, {name: x})
            times = []
            for _ in range(TIMED[0] if batch == 1 else TIMED[1]):
                t = time.perf_counter()
                sess.run(None, {name: x})
                times.append(time.perf_counter() - t)
            out[f"{label} ms/img batch {batch}"] = round(1000 * statistics.median(times) / batch, 4)
    pred = Predictor.load(run_dir)
    photo = Image.new("RGB", (size, size), (200, 40, 40))
    p = pred.predict([photo], top_k=3)[0]
    times = []
    for _ in range(TIMED[2]):
        t = time.perf_counter()
        overlay(photo, p.class_map, pred.preprocessing, p.text())
        times.append(time.perf_counter() - t)
    out["heat-map overlay ms/img"] = round(1000 * statistics.median(times), 3)
    del torch
    return out


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def markdown(res: dict) -> str:
    lines = [
        "## Trust: calibration, 'not sure', 'unfamiliar' (`python benchmarks/bench_trust.py`)",
        "",
        f"Measured {res['machine']['date']}. Each row is one training run of the default recipe; the figures are "
        "those of its report.json (`trust` section) on the run's test images: ECE before -> after the temperature "
        "(fitted on held-out predictions of the training images, never on the test images), log loss before -> "
        "after, the area under the risk-coverage curve (AURC, lower is better), the share that can be answered "
        "at 95% accuracy, and what the run's own thresholds did.",
        "",
        "| data | groups | seed | test images | accuracy | temperature | ECE before -> after "
        "| log loss before -> after | AURC | coverage at 95% | answered (accuracy) | not sure | unfamiliar "
        "| calibration s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["calibration"]:
        lines.append(
            f"| {r['data']} | {r['groups']} | {r['seed']} | {r['test_images']} | {_pct(r['accuracy'])} | "
            f"{r['temperature']:.2f} | {r['ece_before']:.3f} -> {r['ece_after']:.3f} | "
            f"{r['log_loss_before']:.3f} -> {r['log_loss_after']:.3f} | {r['aurc']:.3f} | "
            f"{_pct(r['coverage_at'].get('0.95'))} | {_pct(r['answered'])} ({_pct(r['answered_accuracy'])}) | "
            f"{_pct(r['not_sure'])} | {_pct(r['unfamiliar'])} | {r['calibration_seconds']} |"
        )
    for key in ("grocery visual", "grocery near-duplicates"):
        rows = [r for r in res["calibration"] if f"{r['data']} {r['groups']}" == key]
        if rows:
            lines.append(
                f"| **{key}, mean of {len(rows)} seeds** | | | | {_pct(np.mean([r['accuracy'] for r in rows]))} "
                f"| | {np.mean([r['ece_before'] for r in rows]):.3f} -> "
                f"{np.mean([r['ece_after'] for r in rows]):.3f} | {np.mean([r['log_loss_before'] for r in rows]):.3f}"
                f" -> {np.mean([r['log_loss_after'] for r in rows]):.3f} | {np.mean([r['aurc'] for r in rows]):.3f} "
                "| | | | | |"
            )
    lines += [
        "",
        "Commands: " + "; ".join(f"`{r['cmd']}`" for r in res["calibration"][:2]) + " (and the same with "
        "`--seed 1`, `--seed 2`, `trust.groups=near-duplicates`).",
        "",
        "### Not one of my classes (OOD)",
        "",
        "Every 4th class (sorted) is left out of training; the test images of the known classes are the "
        "in-distribution cases, every image of the left-out classes the novel ones. AUROC (1 = every novel image "
        "scores above every known one) and FPR@95 (the share of known images flagged when 95% of the novel ones "
        "are) of fruitlens's ood_score against the plain max-softmax score, and what the run's own rule "
        "(ood_score above the 95th percentile of held-out training images) flags.",
        "",
        "| data | known / novel images | left-out classes | AUROC ood_score | AUROC max-softmax | FPR@95 ood_score | "
        "FPR@95 max-softmax | rule flags novel | rule flags known |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["ood"]:
        lines.append(
            f"| {r['data']} | {r['known_images']} / {r['novel_images']} | {', '.join(r['unknown_classes'])} | "
            f"{r['auroc_ood_score']:.3f} | {r['auroc_max_softmax']:.3f} | {_pct(r['fpr95_ood_score'])} | "
            f"{_pct(r['fpr95_max_softmax'])} | {_pct(r['rule_flags_novel'])} | {_pct(r['rule_flags_known'])} |"
        )
    c = res["cost"]
    lines += [
        "",
        f"### What it costs (the Fruits-360 run, {c['image_size']} px, ONNX Runtime, 2 cores)",
        "",
        "| | ms per image, batch 1 | ms per image, batch 32 |",
        "|---|---|---|",
        f"| model with logits, features, class maps, ood_score | {c['trust outputs ms/img batch 1']} | "
        f"{c['trust outputs ms/img batch 32']} |",
        f"| logits-only export of the same checkpoint | {c['logits only ms/img batch 1']} | "
        f"{c['logits only ms/img batch 32']} |",
        "",
        "The OOD score and the class maps add "
        f"**{c['trust outputs ms/img batch 1'] - c['logits only ms/img batch 1']:.3f} ms** "
        f"per image at batch 1 ({c['trust outputs ms/img batch 32'] - c['logits only ms/img batch 32']:.3f} ms at "
        f"batch 32); drawing the heat-map overlay (only with --explain / explain=true) "
        f"{c['heat-map overlay ms/img']} ms. In training, the calibration stage (out-of-fold heads, temperature, "
        "thresholds, OOD bank) takes the seconds in the table above.",
    ]
    return "\n".join(lines)


def main() -> None:
    RUNS.mkdir(parents=True, exist_ok=True)
    grocery, fruits = data_path("grocery"), data_path("fruits360")
    res: dict = {"machine": machine(), "calibration": [], "ood": []}
    options = lambda groups, seed: ["--target-acc", "0", "--seed", str(seed), f"trust.groups={groups}"]
    for groups in pick(
        ("visual", "near-duplicates"), check=lambda g: check_command(command(f"g_{g}_0", grocery, options(g, 0)))
    ):
        for seed in pick(range(3)):
            row = train(f"g_{groups}_{seed}", grocery, options(groups, seed))
            res["calibration"].append({**row, "data": "grocery", "groups": groups, "seed": seed})
    f360 = train("f360", fruits, [])
    res["calibration"].append({**f360, "data": "fruits360", "groups": "visual", "seed": 0})
    cases = (
        ("g_ood", grocery, ("train", "val"), ("train", "val"), ["--target-acc", "0"], "grocery"),
        ("f360_ood", fruits, ("Training", "Test"), ("Test",), [], "fruits360"),
    )
    for name, root, splits, unknown_from, args, data in pick(cases, [1]):  # --smoke: the quicker one
        res["ood"].append({**ood(name, root, splits, unknown_from, args), "data": data})
    res["cost"] = prediction_cost(f360["run"])
    save("trust", res)
    write_section("trust", markdown(res))


if __name__ == "__main__":
    sys.exit(main())

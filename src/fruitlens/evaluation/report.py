"""``evaluate_run``: predictions on a split or another folder -> report.json, report.html, plots/*.png."""
from __future__ import annotations

import base64
import io
import json
import logging
import platform
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fruitlens.data.manifest import Manifest
from fruitlens.data.scan import scan
from fruitlens.errors import DataError
from fruitlens.evaluation import plots
from fruitlens.evaluation.html import render_html
from fruitlens.evaluation.metrics import compute_metrics, group_keys, validation_gap
from fruitlens.inference.predictor import Predictor, softmax
from fruitlens.rundir import RunDir, json_safe

log = logging.getLogger(__name__)


def load_class_map(path: str | Path, model_classes: list[str]) -> dict[str, list[str]]:
    """JSON ``{"Apple": ["Apple Braeburn", "Apple Red 1"], "Kiwi": "Kiwi"}`` -> data class -> model classes."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: class map not found") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: class map is not valid JSON ({exc})",
                        'write it as {"data class": ["model class", ...]}') from None
    out = {}
    for k, v in raw.items():
        targets = [v] if isinstance(v, str) else list(v)
        unknown = [t for t in targets if t not in model_classes]
        if unknown:
            raise DataError(f"{path}: '{k}' maps to {', '.join(unknown)}, which the model does not know",
                            f"model classes: {', '.join(model_classes)}")
        out[k] = targets
    return out


def _eval_manifest(run: RunDir, data: str | None, split: str) -> tuple[Manifest, str]:
    if data is None:
        m = Manifest.from_csv(run.manifest)
        part = m.split(split)
        if not len(part):
            if split == "test" and len(m.split("val")):
                log.warning("the run has no test images: evaluating on the validation split (an optimistic figure)")
                return m.split("val"), "val"
            raise DataError(f"{run.path}: the run's manifest has no '{split}' images", "pass --split val or a DATA folder")
        return part, split
    m = scan(data).manifest
    if m.splits and split in m.splits:
        return _with_groups(m.split(split)), f"{Path(data).name}/{split}"
    return _with_groups(m), Path(data).name


def _with_groups(manifest: Manifest) -> Manifest:
    """The records with the folder's near-duplicate groups (bursts, frames of one fruit), so that the accuracy's
    interval counts each group as the one try it is; a run's own manifest has them from its split."""
    from dataclasses import replace

    from fruitlens.data.check import check, duplicate_groups

    comp = duplicate_groups(check(manifest))
    return Manifest(tuple(replace(r, group=f"g{c}") for r, c in zip(manifest.records, comp)), manifest.root)


def evaluate_run(run: RunDir | str | Path, data: str | None = None, *, split: str = "test",
                 class_map: str | None = None, train_seconds: float | None = None, batch_size: int = 64,
                 gallery: int = 12) -> dict[str, Any]:
    """Evaluates the run's best model and writes report.json, report.html and plots/. Returns the report dict."""
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    run.require("checkpoints/best.ckpt", "labels.json", "manifest.csv")
    t0 = time.perf_counter()
    predictor = Predictor.from_run(run.path)  # its parity-checked ONNX export when there is a fresh one
    model_classes = predictor.classes
    manifest, split_name = _eval_manifest(run, data, split)
    mapping = load_class_map(class_map, model_classes) if class_map else {c: [c] for c in model_classes}
    data_classes = sorted(mapping) if class_map else model_classes
    keep = [r for r in manifest if r.label in mapping]
    unmapped: dict[str, int] = {}
    for r in manifest:
        if r.label not in mapping:
            unmapped[r.label] = unmapped.get(r.label, 0) + 1
    if unmapped:
        log.warning("%d images of classes the model does not know are counted apart: %s", sum(unmapped.values()),
                    ", ".join(sorted(unmapped)))
    if not keep:
        raise DataError(f"no images of the model's classes in {data or run.path}",
                        "pass --class-map FILE to map the data's class names onto the model's")
    size = predictor.preprocessing.image_size
    batch_size = max(4, min(batch_size, int(batch_size * (96 / size) ** 2)))  # keeps activations small at 448 px
    paths, labels, groups, bad = [], [], [], []
    logits = []
    rows = (item for batch in predictor.logits_many([str(manifest.resolve(r)) for r in keep], batch_size)
            for item in batch)
    for r, (path, pred) in zip(keep, rows):
        label = r.label
        if isinstance(pred, DataError):
            bad.append({"path": path, "error": pred.message})
            continue
        paths.append(path)
        labels.append(label)
        groups.append(r.group)
        logits.append(pred)
    probs_model = softmax(np.stack(logits))
    # collapse model classes onto data classes (identity without a class map); the rest is "(other)"
    classes = list(data_classes)
    col = {mc: classes.index(dc) for dc, mcs in mapping.items() for mc in mcs}
    extra = len(classes)
    if class_map and len(col) < len(model_classes):
        classes = classes + ["(other)"]
    probs = np.zeros((len(paths), len(classes)))
    for j, mc in enumerate(model_classes):
        probs[:, col.get(mc, extra if class_map else j)] += probs_model[:, j]
    y = np.array([classes.index(lab) for lab in labels])
    metrics = compute_metrics(y, probs, classes, groups)
    eval_seconds = time.perf_counter() - t0
    report = _assemble(run, metrics, split_name, data, class_map, unmapped, bad, eval_seconds, train_seconds,
                       predictor, classes)
    if split_name != "val":
        n_val = report["dataset"]["totals"].get("val", 0)
        report["validation_gap"] = validation_gap(report["history"], metrics, n_val)
    report["gallery"] = _gallery(paths, y, probs, classes, gallery, groups)
    _write(run, report, metrics, classes)
    log.info("evaluated %d images (%s) in %.1fs: accuracy %.4f, macro F1 %.4f -> %s", len(y), split_name,
             eval_seconds, metrics["accuracy"], metrics["macro_f1"], run.report_html)
    return report


def _assemble(run, metrics, split_name, data, class_map, unmapped, bad, eval_seconds, train_seconds, predictor,
              classes) -> dict[str, Any]:
    import torch

    facts = run.read_json("facts.json") if run.facts.exists() else {}
    info = run.read_json("train_info.json") if (run.path / "train_info.json").exists() else {}
    config = {}
    if run.config.exists():
        import yaml

        config = yaml.safe_load(run.config.read_text())
    ckpt_size = run.best_ckpt.stat().st_size
    split_facts = facts.get("split", {})
    leak = split_facts.get("leaks", {}).get("test<-train", {})
    return {
        "run": str(run.path),
        "evaluated_on": split_name,
        "data": data or facts.get("data"),
        "class_map": class_map,
        "classes": classes,
        "metrics": metrics,
        "unmapped_images": unmapped,
        "bad_images": bad,
        "leak": {"leak_free": facts.get("leak_free"), "test_images_with_train_duplicate": leak.get("images", 0),
                 "share": leak.get("share", 0.0), "applies": data is None},
        "dataset": {"counts": split_facts.get("per_class", {}), "totals": split_facts.get("totals", {}),
                    "split_notes": split_facts.get("notes", []), "split_warnings": split_facts.get("warnings", []),
                    "excluded": split_facts.get("excluded", []), "check_findings": facts.get("check_findings", {}),
                    "check_summary": {k: v for k, v in facts.get("check", {}).items() if k not in ("counts", "class_totals")}},
        "model": {"name": config.get("model", {}).get("name"), "engine": predictor.engine,
                  "preprocessing": predictor.preprocessing.to_dict(),
                  "parameters": _param_count(run), "checkpoint_mb": round(ckpt_size / 2**20, 2)},
        "config": config,
        "history": run.read_history(),
        "timing": {"eval_seconds": round(eval_seconds, 2), "train_seconds": round(train_seconds, 2) if train_seconds
                   else info.get("total_seconds"), "fit_seconds": info.get("fit_seconds")},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
                        "machine": info.get("machine"), "gpu": info.get("gpu"), "libraries": _versions()},
        "seed": config.get("data", {}).get("seed"),
    }


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("fruitlens", "torch", "torchvision", "lightning", "onnxruntime", "scikit-learn", "numpy", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _param_count(run: RunDir) -> int:
    import torch

    sd = torch.load(run.best_ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return int(sum(v.numel() for k, v in sd.items() if v.is_floating_point() and "running" not in k))


def _thumb(path: str, size: int = 96) -> str:
    from fruitlens.data.images import load_image

    img = load_image(path, min_side=size * 2)
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _gallery(paths, y, probs, classes, n, groups) -> dict[str, list[dict]]:
    """The ``n`` most confident mistakes and least confident correct answers, one image per near-duplicate group
    (twelve frames of one misread fruit are one mistake); ``like_it``: the group's other mistakes."""
    pred = probs.argmax(1)
    conf = probs.max(1)
    keys = group_keys(groups, len(paths))

    def pick(idx: np.ndarray, count: bool) -> list[dict]:
        per_group = Counter(keys[i] for i in idx) if count else Counter()
        chosen, seen = [], set()
        for i in idx:
            if keys[i] not in seen and len(chosen) < n:
                seen.add(keys[i])
                chosen.append(i)
        return [{"path": paths[i], "true": classes[y[i]], "predicted": classes[pred[i]], "confidence": float(conf[i]),
                 "like_it": max(0, per_group[keys[i]] - 1), "thumbnail": _thumb(paths[i])} for i in chosen]

    wrong = np.flatnonzero(pred != y)
    right = np.flatnonzero(pred == y)
    return {"worst_mistakes": pick(wrong[np.argsort(-conf[wrong], kind="stable")], True),
            "least_confident_correct": pick(right[np.argsort(conf[right], kind="stable")], False)}


def _write(run: RunDir, report: dict, metrics: dict, classes: list[str]) -> None:
    run.plots.mkdir(parents=True, exist_ok=True)
    cm = np.array(metrics["confusion_matrix"])
    files = {
        "confusion_counts": plots.confusion_heatmap(cm, classes, run.plots / "confusion_matrix.png", False,
                                                    "confusion matrix (counts)"),
        "confusion_normalised": plots.confusion_heatmap(cm, classes, run.plots / "confusion_matrix_normalised.png",
                                                        True, "confusion matrix (row-normalised = recall)"),
        "reliability": plots.reliability_diagram(metrics["calibration"], run.plots / "reliability.png"),
        "curves": plots.training_curves(report["history"], run.plots / "training_curves.png"),
    }
    report["plots"] = {k: str(v.relative_to(run.path)) for k, v in files.items() if v}
    (run.path / "classification_report.txt").write_text(metrics["classification_report"])
    slim = {**report, "gallery": {k: [{kk: vv for kk, vv in g.items() if kk != "thumbnail"} for g in v]
                                  for k, v in report["gallery"].items()}}
    run.report_json.write_text(json.dumps(json_safe(slim), indent=2, default=str))
    images = {k: _b64(run.path / v) for k, v in report["plots"].items()}
    run.report_html.write_text(render_html(json_safe(report), images))


def _b64(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()

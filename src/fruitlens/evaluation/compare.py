"""``fruitlens compare``: one table across runs (and a bar chart)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from fruitlens.evaluation import plots
from fruitlens.rundir import RunDir, load_model


def cpu_latency_ms(run: RunDir, repeats: int = 20) -> float:
    """Median PyTorch latency for one image at the run's input size on this CPU."""
    model, _, _ = load_model(run.best_ckpt)
    size = model.preprocessing.image_size
    x = torch.zeros(1, 3, size, size)
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def compare_runs(paths: list[str | Path], chart: Path | None = None) -> list[dict]:
    """One row per run: model, parameters, size, accuracy and its 95% interval, macro F1, ECE, training time, CPU
    latency."""
    rows = []
    for p in paths:
        run = RunDir(Path(p)).require("report.json", "checkpoints/best.ckpt")
        rep = run.read_json("report.json")
        m = rep["metrics"]
        rows.append({
            "run": str(run.path), "model": rep["model"]["name"], "parameters": rep["model"]["parameters"],
            "size_mb": rep["model"]["checkpoint_mb"], "image_size": rep["model"]["preprocessing"]["image_size"],
            "evaluated_on": rep["evaluated_on"], "accuracy": m["accuracy"],
            "accuracy_ci95": m.get("accuracy_ci95"), "macro_f1": m["macro_f1"],
            "ece": m["ece"], "train_seconds": rep["timing"].get("train_seconds"),
            "latency_ms": round(cpu_latency_ms(run), 2),
        })
    if chart is not None and rows:
        names = [f"{Path(r['run']).name}\n({r['model']})" for r in rows]
        plots.bar_chart(names, [r["accuracy"] for r in rows], chart, "test accuracy by run (95% intervals)",
                        "accuracy", [r["accuracy_ci95"] for r in rows])
    return rows


def ci_cell(row: dict) -> str:
    """``65.7-82.1%``: runs whose intervals overlap are not told apart by this test set; ``-`` for old reports."""
    ci = row.get("accuracy_ci95")
    return "-" if not ci or ci[0] != ci[0] else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}%"


def markdown(rows: list[dict]) -> str:
    head = "| run | model | params | size MB | px | accuracy | 95% CI | macro F1 | ECE | train s | CPU ms/img |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['run']} | {r['model']} | {r['parameters']:,} | {r['size_mb']} | {r['image_size']} | "
                     f"{r['accuracy']:.4f} | {ci_cell(r)} | {r['macro_f1']:.4f} | {r['ece']:.4f} | "
                     f"{r['train_seconds'] if r['train_seconds'] is not None else '-'} | {r['latency_ms']} |")
    return "\n".join(lines)


__all__ = ["compare_runs", "markdown", "ci_cell", "cpu_latency_ms"]

"""``fruitlens compare``: one table across runs (and a bar chart); a run folder or one of its ``eval/<data>/``
reports, so that each row says what it was evaluated on."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fruitlens.errors import ConfigError, RunDirError
from fruitlens.evaluation import plots
from fruitlens.evaluation.metrics import ci_range, ci_text
from fruitlens.evaluation.report import Report
from fruitlens.models.checkpoint import load_model
from fruitlens.rundir import RunDir


@dataclass
class CompareRow:
    run: str
    model: str | None
    parameters: int
    size_mb: float
    image_size: int
    evaluated_on: str
    accuracy: float
    accuracy_ci95: list[float] | None
    macro_f1: float
    ece: float
    train_seconds: float | None
    latency_ms: float

    @property
    def ci(self) -> str:
        """``65.7-82.1%``: runs whose intervals overlap are not told apart by this test set; ``-`` for old reports."""
        return ci_range(self.accuracy_ci95)


def cpu_latency_ms(checkpoint: Path, repeats: int = 20) -> float:
    """Median PyTorch latency for one image at the run's input size on this CPU."""
    model = load_model(checkpoint).model
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


def locate(path: str | Path) -> tuple[RunDir, Path]:
    """(the run, the folder of the report): a run folder, or a report folder ``RUN/eval/<data>/`` inside one."""
    path = Path(path)
    if path.parent.name == "eval" and (path / "report.json").is_file():
        return RunDir(path.parent.parent).require("checkpoints/best.ckpt"), path
    run = RunDir(path).require("report.json", "checkpoints/best.ckpt")
    return run, run.path


def compare_runs(paths: list[str | Path], chart: Path | None = None) -> list[CompareRow]:
    """One row per run (or report folder): model, parameters, size, what it was evaluated on, accuracy and its 95%
    interval, macro F1, ECE, training time, CPU latency."""
    rows = []
    for p in paths:
        run, folder = locate(p)
        try:
            rep = Report.from_json(folder / "report.json")
        except ValueError as exc:
            raise RunDirError(
                f"{folder / 'report.json'}: not a readable report ({exc})",
                f"write it again with: fruitlens evaluate {run.path}",
            ) from None
        m = rep.metrics
        rows.append(
            CompareRow(
                str(folder),
                rep.model.name,
                rep.model.parameters,
                rep.model.checkpoint_mb,
                rep.model.preprocessing.image_size,
                rep.evaluated_on,
                m.accuracy,
                m.accuracy_ci95,
                m.macro_f1,
                m.ece,
                rep.timing.train_seconds,
                round(cpu_latency_ms(run.best_ckpt), 2),
            )
        )
    return _chart(rows, chart)


def _chart(rows: list[CompareRow], chart: Path | None) -> list[CompareRow]:
    if chart is not None and rows:
        names = [f"{Path(r.run).name}\n({r.model}, {r.evaluated_on})" for r in rows]
        plots.bar_chart(
            names,
            [r.accuracy for r in rows],
            chart,
            "accuracy by run (95% intervals)",
            "accuracy",
            [r.accuracy_ci95 for r in rows],
        )
    return rows


def compare_mlflow(experiment: str, uri: str | None = None, chart: Path | None = None) -> list[CompareRow]:
    """The same rows from the finished fruitlens runs of an MLflow experiment (their params and test metrics); the
    CPU latency is measured where the run's folder is on this machine, else NaN."""
    import os

    try:
        from mlflow import MlflowClient
    except ImportError:
        raise ConfigError(
            "--mlflow-experiment needs the mlflow package, which is not installed",
            "install the tracking extra: pip install 'fruitlens[tracking]'",
        ) from None
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ConfigError(
            "no MLflow store given", "pass --mlflow-uri (e.g. sqlite:///runs/mlflow.db) or set MLFLOW_TRACKING_URI"
        )
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = [e.name for e in client.search_experiments()]
        raise ConfigError(
            f"{uri}: no MLflow experiment '{experiment}'", f"experiments there: {', '.join(names) or 'none'}"
        )
    rows = []
    for r in client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"]):
        p, m = r.data.params, r.data.metrics
        if "test_accuracy" not in m:  # unfinished, or logged by something else
            continue
        ci = [m["test_accuracy_ci95_low"], m["test_accuracy_ci95_high"]] if "test_accuracy_ci95_low" in m else None
        folder = RunDir(Path(p.get("run/folder", "")))
        latency = (
            round(cpu_latency_ms(folder.best_ckpt), 2)
            if p.get("run/folder") and folder.best_ckpt.is_file()
            else float("nan")
        )
        rows.append(
            CompareRow(
                r.info.run_name or r.info.run_id,
                p.get("model/name"),
                int(p.get("run/parameters", 0)),
                float(p.get("run/size_mb", 0)),
                int(p.get("model/img_size", 0)),
                p.get("run/evaluated_on", "test"),
                m["test_accuracy"],
                ci,
                m.get("test_macro_f1", float("nan")),
                m.get("test_ece", float("nan")),
                m.get("train_seconds"),
                latency,
            )
        )
    if not rows:
        raise RunDirError(
            f"MLflow experiment '{experiment}' has no finished fruitlens run",
            f"train one with: fruitlens train DATA --logger mlflow --experiment {experiment} --mlflow-uri {uri}",
        )
    return _chart(rows, chart)


def markdown(rows: list[CompareRow]) -> str:
    head = (
        "| run | model | evaluated on | params | size MB | px | accuracy | 95% CI | macro F1 | ECE | train s "
        "| CPU ms/img |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        lines.append(
            f"| {r.run} | {r.model} | {r.evaluated_on} | {r.parameters:,} | {r.size_mb} | {r.image_size} | "
            f"{r.accuracy:.4f} | {r.ci} | {r.macro_f1:.4f} | {r.ece:.4f} | "
            f"{r.train_seconds if r.train_seconds is not None else '-'} | {r.latency_ms} |"
        )
    return "\n".join(lines)


__all__ = ["CompareRow", "compare_runs", "compare_mlflow", "markdown", "cpu_latency_ms", "ci_text"]

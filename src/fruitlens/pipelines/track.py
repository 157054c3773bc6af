"""The end of a tracked run: the resolved config as params, the test figures (with their 95% interval) as metrics,
and report.html, the plots and model.onnx as artifacts, sent to the run's trackers (``--logger``). The per-epoch
figures went to them during training (``training.callbacks.EpochSummary``)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fruitlens.config import TrainConfig
from fruitlens.evaluation.report import Report
from fruitlens.rundir import RunDir
from fruitlens.training.loggers import result_loggers

log = logging.getLogger(__name__)


def result_metrics(report: Report) -> dict[str, float]:
    """``test_accuracy`` with ``test_accuracy_ci95_low/high`` and the other headline figures of the report."""
    m = report.metrics
    out = {
        "test_accuracy": m.accuracy,
        "test_balanced_accuracy": m.balanced_accuracy,
        "test_macro_f1": m.macro_f1,
        "test_ece": m.ece,
        "test_images": float(m.n),
    }
    if m.accuracy_ci95:
        out["test_accuracy_ci95_low"], out["test_accuracy_ci95_high"] = m.accuracy_ci95
    if m.log_loss is not None:
        out["test_log_loss"] = m.log_loss
    if report.timing.train_seconds is not None:
        out["train_seconds"] = report.timing.train_seconds
    return {k: float(v) for k, v in out.items() if v == v}  # NaN (e.g. no test images) is not a figure


def result_params(cfg: TrainConfig, run: RunDir, report: Report) -> dict[str, object]:
    """The resolved config (nested: the loggers flatten it to ``fit/lr`` ...) and what the run is."""
    return {
        **cfg.to_dict(),
        "run": {
            "folder": str(run.path.resolve()),
            "classes": len(report.classes),
            "parameters": report.model.parameters,
            "size_mb": report.model.checkpoint_mb,
            "evaluated_on": report.evaluated_on,
        },
    }


def log_results(cfg: TrainConfig, run: RunDir, report: Report) -> None:
    loggers = result_loggers(cfg, run)
    if not loggers:
        return
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger

    metrics, step = result_metrics(report), len(report.history)
    for logger in loggers:
        logger.log_hyperparams(result_params(cfg, run, report))
        logger.log_metrics(metrics, step=step)
        if isinstance(logger, MLFlowLogger):
            _mlflow_artifacts(logger, run, report)
        if isinstance(logger, TensorBoardLogger):
            _tensorboard_images(logger, run, report, step)
        logger.finalize("success")
    log.info("logged the test figures and files to %s", ", ".join(n for n in cfg.track.names if n != "csv"))


def _files(run: RunDir, report: Report) -> list[tuple[Path, str]]:
    """(file, folder in the tracker) of report.html, report.json, MODEL_CARD.md, the plots and model.onnx."""
    folder = Path(report.folder)
    files = [(folder / "report.html", ""), (folder / "report.json", ""), (run.model_card, ""), (run.onnx, "model")]
    files += [(folder / rel, "plots") for rel in report.plots.values()]
    return [(f, where) for f, where in files if f.is_file()]


def _mlflow_artifacts(logger, run: RunDir, report: Report) -> None:
    for path, where in _files(run, report):
        logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=where or None)


def _tensorboard_images(logger, run: RunDir, report: Report, step: int) -> None:
    """The plots as images (TensorBoard keeps no files)."""
    from PIL import Image

    for name, rel in report.plots.items():
        path = Path(report.folder) / rel
        if path.suffix == ".png" and path.is_file():
            with Image.open(path) as im:
                logger.experiment.add_image(f"report/{name}", np.asarray(im.convert("RGB")), step, dataformats="HWC")

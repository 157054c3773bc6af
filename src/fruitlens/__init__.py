"""fruitlens: train, check, evaluate, export and serve fruit image classifiers.

The Python API is the command line's own pipeline functions, with typed results::

    import fruitlens
    run = fruitlens.train("photos/", out="runs/x")              # same defaults and config keys as the CLI
    pred = fruitlens.Predictor.load("runs/x")                     # run folder or model.onnx
    pred.predict(["apple.jpg"], top_k=3)
    picked = fruitlens.suggest("runs/x", "my-photos/", budget=90)  # which photos to label: picked.csv, picked.page
    mine = fruitlens.train("photos/", out="runs/mine", add=["to-label/to-label.csv"])   # + the labelled photos

Imports are lazy: ``import fruitlens`` loads neither torch nor Lightning.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fruitlens.evaluation.report import Report
    from fruitlens.inference.predictor import Predictor
    from fruitlens.pipelines.check import CheckResult
    from fruitlens.pipelines.export import ExportResult
    from fruitlens.pipelines.suggest import SuggestResult
    from fruitlens.pipelines.train import TrainResult

__all__ = ["train", "resume", "check", "evaluate", "export", "suggest", "Predictor", "TrainConfig", "__version__"]


def train(
    data: str | Path,
    out: str | Path | None = None,
    *,
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    **options: Any,
) -> "TrainResult":
    """``fruitlens train DATA --out OUT``: ``options`` are the command's option names (``epochs=5``,
    ``model="small_cnn"``, ``img_size=160``, ``logger="csv,mlflow"``), ``overrides`` its ``key=value`` config keys
    (``{"fit.label_smoothing": 0.1}``), ``config`` a YAML file to start from; ``add=[CSV, ...]``: labelled photos of
    your setting (``--add``). Returns the TrainResult: ``.report`` (accuracy with its interval and the rest), ``.run``
    (the folder), ``.export``, ``.trust``, ``.audit``, ``.photos`` (the figures on the added photos)."""
    from fruitlens.config import config_from
    from fruitlens.pipelines.train import train as _train

    cfg = config_from(str(data), config, options, overrides)
    return _train(cfg, out or f"runs/{cfg.model.name}")


def suggest(
    run: str | Path,
    photos: str | Path,
    *,
    budget: int = 90,
    out: str | Path = "to-label",
    labelled: list[str | Path] | None = None,
    seed: int = 0,
) -> "SuggestResult":
    """``fruitlens suggest RUN PHOTOS --budget N --out DIR``: the photos worth labelling, written to
    ``DIR/to-label.csv`` and ``DIR/label.html``. Returns the SuggestResult (``.picks``, ``.csv``, ``.page``,
    ``.skipped``)."""
    from fruitlens.pipelines.suggest import suggest as _suggest

    return _suggest(run, photos, budget=budget, out=out, labelled=labelled, seed=seed)


def resume(run: str | Path) -> "TrainResult":
    """``fruitlens train --resume RUN``."""
    from fruitlens.pipelines.train import resume as _resume

    return _resume(run)


def check(data: str | Path, *, labels: bool = False, **kwargs: Any) -> "CheckResult":
    """``fruitlens check DATA [--labels]``: ``.report`` (findings, counts, near duplicates), ``.audit`` (label
    issues, with ``labels=True``), ``.ok`` (no errors). Reads files only."""
    from fruitlens.pipelines.check import check_data

    return check_data(data, labels=labels, **kwargs)


def evaluate(run: str | Path, data: str | Path | None = None, **kwargs: Any) -> "Report":
    """``fruitlens evaluate RUN [DATA]``: the run's test split, or other data (into ``RUN/eval/<name>/``)."""
    from fruitlens.pipelines.evaluate import evaluate as _evaluate

    return _evaluate(run, str(data) if data is not None else None, **kwargs)


def export(run: str | Path, **kwargs: Any) -> "ExportResult":
    """``fruitlens export RUN [--int8]``: a parity-checked ONNX model in ``RUN/export/``."""
    from fruitlens.pipelines.export import export as _export

    return _export(run, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "Predictor":
        from fruitlens.inference.predictor import Predictor

        return Predictor
    if name == "TrainConfig":
        from fruitlens.config import TrainConfig

        return TrainConfig
    raise AttributeError(f"module 'fruitlens' has no attribute '{name}'")

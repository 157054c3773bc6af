"""Experiment tracking through Lightning's own loggers: CSV (always in the run folder), TensorBoard, MLflow.

The tracker packages are optional (``pip install 'fruitlens[tracking]'``); asking for one that is not installed is a
ConfigError that names the extra. MLflow's store is whatever its URI says; by default a SQLite file beside the run
folder, with the artifacts next to it, so that nothing but the URI is needed (no server).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger

from fruitlens.config import TrainConfig
from fruitlens.errors import ConfigError
from fruitlens.rundir import RunDir

log = logging.getLogger(__name__)

EXTRA = "pip install 'fruitlens[tracking]'"


def mlflow_uri(cfg: TrainConfig, run: RunDir) -> str:
    """``track.mlflow_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<folder of the run>/mlflow.db``."""
    return (
        cfg.track.mlflow_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{run.path.resolve().parent / 'mlflow.db'}"
    )


def _require(module: str, what: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"--logger {what} needs the {module} package, which is not installed",
            f"install the tracking extra: {EXTRA}",
        )


def check_available(cfg: TrainConfig) -> None:
    """Fails early (before any training) for a logger whose package is missing."""
    if "tensorboard" in cfg.track.names:
        _require("tensorboard", "tensorboard")
    if "mlflow" in cfg.track.names:
        _require("mlflow", "mlflow")


def mlflow_run(cfg: TrainConfig, run: RunDir) -> str | None:
    """The MLflow run id of this fruitlens run (one for all phases), created once and kept in ``tracking.json`` so
    that a resumed run and every DDP process log into the same MLflow run."""
    if "mlflow" not in cfg.track.names:
        return None
    state = run.path / "tracking.json"
    if state.is_file():
        return json.loads(state.read_text()).get("mlflow_run_id")
    from mlflow import MlflowClient

    uri = mlflow_uri(cfg, run)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(cfg.track.experiment)
    if exp is None:
        artifacts = None
        if uri.startswith("sqlite:///"):  # artifacts beside the database, not in the current folder
            artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").resolve().as_uri()
        exp_id = client.create_experiment(cfg.track.experiment, artifact_location=artifacts)
    else:
        exp_id = exp.experiment_id
    run_id = client.create_run(exp_id, run_name=run.path.name).info.run_id
    state.write_text(json.dumps({"mlflow_run_id": run_id, "mlflow_uri": uri, "experiment": cfg.track.experiment}))
    log.info("MLflow: run %s in experiment '%s' at %s", run_id, cfg.track.experiment, uri)
    return run_id


def phase_loggers(cfg: TrainConfig, run: RunDir, phase: str, mlflow_run_id: str | None) -> list[Logger]:
    """The Lightning loggers of one training phase."""
    loggers: list[Logger] = [CSVLogger(run.path, name="logs", version=phase)]
    if "tensorboard" in cfg.track.names:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(run.path, name="tensorboard", version="", default_hp_metric=False))
    if "mlflow" in cfg.track.names and mlflow_run_id:
        from lightning.pytorch.loggers import MLFlowLogger

        loggers.append(
            MLFlowLogger(experiment_name=cfg.track.experiment, tracking_uri=mlflow_uri(cfg, run), run_id=mlflow_run_id)
        )
    return loggers


def result_loggers(cfg: TrainConfig, run: RunDir) -> list[Logger]:
    """The trackers (no CSV: the run folder has the report) that the final params, test figures and files go to."""
    return [lg for lg in phase_loggers(cfg, run, "final", mlflow_run(cfg, run)) if not isinstance(lg, CSVLogger)]

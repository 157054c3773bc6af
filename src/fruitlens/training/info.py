"""``TrainInfo`` (the run's ``train_info.json``): how long training took and on what."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field

import lightning as L
import torch

from fruitlens.training.adapt import Adaptation
from fruitlens.training.features import FeaturePass


@dataclass
class TrainInfo:
    """Timing and environment of the training run."""

    train_seconds: float | None = None  # the train command up to the saved model: data preparation and fitting
    fit_seconds: float | None = None  # the training phases alone
    phases: list[str] = field(default_factory=list)
    world_size: int = 1  # processes that trained together (DDP)
    torch: str = ""
    lightning: str = ""
    python: str = ""
    machine: str = ""
    gpu: str | None = None
    stages: dict[str, float] = field(default_factory=dict)  # wall seconds per stage, in the order they ran
    stage_peak_mib: dict[str, float] = field(default_factory=dict)  # the process's peak memory when each stage ended
    command_seconds: float | None = None  # the whole train command, evaluation included
    feature_pass: FeaturePass | None = None  # who computed the feature cache (the cached-feature path)
    adaptation: Adaptation | None = None  # what --adapt-to did

    @classmethod
    def here(cls, train_seconds: float, fit_seconds: float, phases: list[str], world_size: int = 1) -> "TrainInfo":
        return cls(
            round(train_seconds, 2),
            round(fit_seconds, 2),
            list(phases),
            world_size,
            torch.__version__,
            L.__version__,
            platform.python_version(),
            f"{platform.machine()}, {os.cpu_count()} CPUs",
            torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        )

"""The ``Report`` of one evaluation (report.json is its JSON) and its galleries; ``writer.py`` writes it."""

from __future__ import annotations

import base64
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fruitlens.config import TrainConfig
from fruitlens.evaluation.domain import DomainNote
from fruitlens.evaluation.metrics import Calibration, Metrics, ValidationGap, group_keys
from fruitlens.evaluation.photos import PhotoNote
from fruitlens.evaluation.selective import RiskCoverage
from fruitlens.jsonio import from_dict
from fruitlens.models.preprocessing import Preprocessing, decode
from fruitlens.training.adapt import Adaptation
from fruitlens.training.history import HistoryRow


@dataclass
class LeakNote:
    """Whether the test figure is inflated by near copies of training images (for the run's own test split)."""

    leak_free: bool | None = None
    test_images_with_train_duplicate: int = 0
    share: float = 0.0
    applies: bool = True  # False for other data: the run's split says nothing about it


@dataclass
class DatasetNote:
    """The data the run was trained on: counts per class and split, split notes, check findings."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    split_notes: list[str] = field(default_factory=list)
    split_warnings: list[str] = field(default_factory=list)
    excluded: list[dict[str, str]] = field(default_factory=list)
    check_findings: dict[str, int] = field(default_factory=dict)
    check_summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelNote:
    name: str | None = None
    engine: str = ""
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    parameters: int = 0
    checkpoint_mb: float = 0.0


@dataclass
class Timing:
    eval_seconds: float | None = None
    train_seconds: float | None = None
    fit_seconds: float | None = None


@dataclass
class Environment:
    python: str = ""
    torch: str = ""
    platform: str = ""
    machine: str | None = None
    gpu: str | None = None
    libraries: dict[str, str] = field(default_factory=dict)


@dataclass
class TrustNote:
    """The trust layer (how it was fitted) and how it does on this evaluation's images."""

    temperature: float = 1.0
    source: str = ""
    heldout_images: int = 0
    target_precision: float = 0.95
    unknown_threshold: float = 0.0
    ood_threshold: float | None = None
    ood_rule: str = ""
    ece_before: float | None = None  # on these images, without the temperature
    ece_after: float | None = None
    log_loss_before: float | None = None
    log_loss_after: float | None = None
    calibration_before: Calibration | None = None  # the reliability bins without the temperature
    risk_coverage: RiskCoverage = field(default_factory=RiskCoverage)
    answered: float | None = None  # share of these images answered ("not sure" and "unfamiliar" excluded)
    answered_accuracy: float | None = None
    not_sure: float | None = None  # share called "not sure"
    unfamiliar: float | None = None  # share called "unfamiliar"
    ood_median: float | None = None


@dataclass
class AuditNote:
    """How many images of the run look mislabelled (the label audit), and which test images: they change what the
    test accuracy means."""

    train: int = 0
    val: int = 0
    audited: int = 0
    html: str = ""
    test: list[dict[str, Any]] = field(default_factory=list)  # path, label, suggested, p_label, p_suggested
    expected_precision: float | None = None  # share of the listed training/validation images expected mislabelled
    lookalike: list[dict[str, Any]] = field(default_factory=list)  # a, b, share: classes the model confuses


@dataclass
class Report:
    """Everything one evaluation found; ``report.json`` holds it (galleries without their thumbnails)."""

    run: str = ""
    folder: str = ""  # where this report is: the run folder, or RUN/eval/<data>/
    evaluated_on: str = ""  # "test", "val", or the other data's name
    data: str | None = None
    class_map: str | None = None
    classes: list[str] = field(default_factory=list)
    metrics: Metrics = field(default_factory=Metrics)
    unmapped_images: dict[str, int] = field(default_factory=dict)  # classes the model does not know -> images
    bad_images: list[dict[str, str]] = field(default_factory=list)  # path, error
    leak: LeakNote = field(default_factory=LeakNote)
    dataset: DatasetNote = field(default_factory=DatasetNote)
    model: ModelNote = field(default_factory=ModelNote)
    config: TrainConfig = field(default_factory=TrainConfig)
    history: list[HistoryRow] = field(default_factory=list)
    timing: Timing = field(default_factory=Timing)
    environment: Environment = field(default_factory=Environment)
    seed: int | None = None
    validation_gap: ValidationGap | None = None
    trust: TrustNote | None = None  # None for models trained before the trust layer
    label_audit: AuditNote | None = None
    domain: DomainNote = field(default_factory=DomainNote)
    adaptation: Adaptation | None = None  # what --adapt-to did
    photos: PhotoNote | None = None  # train --add: the figures on the labelled photos of the user's setting
    gallery: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # worst_mistakes, least_confident_correct
    plots: dict[str, str] = field(default_factory=dict)  # name -> path relative to the report's folder

    @classmethod
    def from_json(cls, path: Path) -> "Report":
        return from_dict(cls, json.loads(Path(path).read_text()))


def thumbnail(
    path: str,
    size: int = 96,
    class_map: np.ndarray | None = None,
    pre: Preprocessing | None = None,
    heat_size: int = 160,
) -> str:
    """A JPEG data URL of the image, at most ``size`` px a side (``heat_size`` with a class-map overlay: where the
    model looked)."""
    if class_map is not None and pre is not None:
        from fruitlens.inference.explain import overlay

        img = overlay(decode(path, min_side=heat_size * 2).image, class_map, pre)
        size = heat_size
    else:
        img = decode(path, min_side=size * 2).image
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def gallery(
    paths: list[str],
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    n: int,
    groups: list[str] | None,
    class_maps: list[np.ndarray] | None = None,
    pre: Preprocessing | None = None,
    pred: np.ndarray | None = None,
) -> dict[str, list[dict]]:
    """The ``n`` most confident mistakes and least confident correct answers, one image per near-duplicate group
    (twelve frames of one misread fruit are one mistake); ``like_it``: the group's other mistakes. With
    ``class_maps`` each picture shows where the model looked for its answer. ``pred``: each image's answer where it
    is not the argmax of ``probs`` (under a class map: the top model class, mapped; ``probs`` summed per column)."""
    pred = probs.argmax(1) if pred is None else np.asarray(pred)
    conf = probs[np.arange(len(pred)), pred]
    keys = group_keys(groups, len(paths))

    def pick(idx: np.ndarray, count: bool) -> list[dict]:
        per_group = Counter(keys[i] for i in idx) if count else Counter()
        chosen, seen = [], set()
        for i in idx:
            if keys[i] not in seen and len(chosen) < n:
                seen.add(keys[i])
                chosen.append(i)
        return [
            {
                "path": paths[i],
                "true": classes[y[i]],
                "predicted": classes[pred[i]],
                "confidence": float(conf[i]),
                "like_it": max(0, per_group[keys[i]] - 1),
                "thumbnail": thumbnail(paths[i], class_map=class_maps[i] if class_maps else None, pre=pre),
            }
            for i in chosen
        ]

    wrong = np.flatnonzero(pred != y)
    right = np.flatnonzero(pred == y)
    return {
        "worst_mistakes": pick(wrong[np.argsort(-conf[wrong], kind="stable")], True),
        "least_confident_correct": pick(right[np.argsort(conf[right], kind="stable")], False),
    }

"""Scoring a model on a manifest and assembling the ``Report``: predictions through the class map, the trust
layer's figures on these images, the label audit's verdict on them, and the run's facts around them."""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass, field

import numpy as np

from fruitlens.config import TrainConfig
from fruitlens.data.facts import DataFacts
from fruitlens.data.manifest import Manifest
from fruitlens.errors import DataError, ImageError
from fruitlens.evaluation.audit import flag_images
from fruitlens.evaluation.classmap import ClassMapping
from fruitlens.evaluation.domain import DomainFigure, DomainNote
from fruitlens.evaluation.label_audit import LabelAudit
from fruitlens.evaluation.metrics import Metrics, calibration, validation_gap
from fruitlens.evaluation.photos import PhotoNote
from fruitlens.evaluation.report import (
    AuditNote,
    DatasetNote,
    Environment,
    LeakNote,
    ModelNote,
    Report,
    Timing,
    TrustNote,
)
from fruitlens.evaluation.selective import nll, risk_coverage
from fruitlens.inference.predictor import Predictor
from fruitlens.models.preprocessing import batch_for
from fruitlens.models.probs import softmax
from fruitlens.training.history import HistoryRow
from fruitlens.training.info import TrainInfo

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What a run knows of itself, for its reports: what ``train`` holds already, or its run folder read once."""

    config: TrainConfig
    facts: DataFacts = field(default_factory=DataFacts)
    info: TrainInfo = field(default_factory=TrainInfo)
    history: list[HistoryRow] = field(default_factory=list)
    audit: LabelAudit | None = None
    photos: PhotoNote | None = None
    parameters: int = 0
    checkpoint_mb: float = 0.0


@dataclass
class Scored:
    """The evaluated images with their labels (as column indices) and collapsed probabilities."""

    paths: list[str] = field(default_factory=list)
    y: np.ndarray = field(default_factory=lambda: np.zeros(0, int))
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    pred: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # the column of each image's top model class
    groups: list[str] = field(default_factory=list)
    bad: list[dict[str, str]] = field(default_factory=list)
    unmapped: dict[str, int] = field(default_factory=dict)
    logits: np.ndarray | None = None  # the model's own (calibrated) logits, before any class map
    ood: np.ndarray | None = None  # ood_score of each image, where the model has the trust layer
    class_maps: list[np.ndarray] | None = None  # the class activation map of each image's top-1 model class


def score(predictor: Predictor, manifest: Manifest, mapping: ClassMapping, batch_size: int = 64) -> Scored:
    """Predicts every image of a mapped class; images that fail to decode are listed, the rest go on."""
    keep = [r for r in manifest if r.label in mapping.mapping]
    out = Scored()
    for r in manifest:
        if r.label not in mapping.mapping:
            out.unmapped[r.label] = out.unmapped.get(r.label, 0) + 1
    if out.unmapped:
        log.warning(
            "%d images of classes the model does not know are counted apart: %s",
            sum(out.unmapped.values()),
            ", ".join(sorted(out.unmapped)),
        )
    if not keep:
        raise DataError(
            f"no images of the model's classes in {manifest.root or 'the data'}",
            "pass --class-map FILE to map the data's class names onto the model's",
        )
    size = predictor.preprocessing.image_size
    batch_size = batch_for(size, batch_size, least=4)  # keeps activations small at 448 px
    logits, labels, ood, maps = [], [], [], []
    rows = (
        item for batch in predictor.outputs_many([str(manifest.resolve(r)) for r in keep], batch_size) for item in batch
    )
    for r, (path, row) in zip(keep, rows):
        if isinstance(row, ImageError):
            out.bad.append({"path": path, "error": row.message})
            continue
        out.paths.append(path)
        labels.append(r.label)
        out.groups.append(r.group)
        logits.append(row["logits"])
        if "ood_score" in row:
            ood.append(float(row["ood_score"]))
        if "class_maps" in row:
            maps.append(row["class_maps"][int(np.argmax(row["logits"]))])
    if not logits:
        raise DataError(
            f"none of the {len(keep)} images to evaluate can be decoded (e.g. {out.bad[0]['error']})",
            "run 'fruitlens check' on the data to list every bad file",
        )
    columns = mapping.columns
    out.logits = np.stack(logits)
    out.y = np.array([columns.index(lab) for lab in labels])
    out.probs = mapping.collapse(softmax(out.logits), out.y)
    out.pred = mapping.predicted(out.logits, out.y)
    out.ood = np.array(ood) if len(ood) == len(logits) else None
    out.class_maps = maps if len(maps) == len(logits) else None
    return out


def trust_note(
    predictor: Predictor, scored: Scored, mapping: ClassMapping, curve_points: int = 300
) -> TrustNote | None:
    """How the trust layer does on the evaluated images: calibration before and after the temperature, the
    risk-coverage curve, and how many answers the run's thresholds turn into "not sure" and "unfamiliar"."""
    t = predictor.trust
    if t is None:
        return None
    temperature = float(t.temperature)
    before = mapping.collapse(softmax(scored.logits * temperature), scored.y)
    conf, correct = scored.probs.max(axis=1), scored.pred == scored.y
    rc = risk_coverage(conf, correct)
    step = max(1, len(rc.coverage) // curve_points)  # a readable curve in report.json, its last point kept
    keep = sorted(set(range(0, len(rc.coverage), step)) | {len(rc.coverage) - 1})
    rc.coverage, rc.accuracy, rc.thresholds = (
        [getattr(rc, a)[i] for i in keep] for a in ("coverage", "accuracy", "thresholds")
    )
    out = {"logits": scored.logits} if scored.ood is None else {"logits": scored.logits, "ood_score": scored.ood}
    decided = predictor.decide(out, 1)
    answered = np.array([not p.unknown for p in decided])
    calib_before = calibration(scored.y, before)
    return TrustNote(
        temperature=temperature,
        source=t.source,
        heldout_images=t.heldout_images,
        target_precision=t.target_precision,
        unknown_threshold=predictor.unknown_threshold,
        ood_threshold=predictor.ood_threshold,
        ood_rule=t.ood_rule,
        ece_before=calib_before.ece,
        ece_after=calibration(scored.y, scored.probs).ece,
        log_loss_before=nll(np.log(np.clip(before, 1e-12, 1)), scored.y),
        log_loss_after=nll(np.log(np.clip(scored.probs, 1e-12, 1)), scored.y),
        calibration_before=calib_before,
        risk_coverage=rc,
        answered=float(answered.mean()),
        answered_accuracy=float(correct[answered].mean()) if answered.any() else None,
        not_sure=float(np.mean([p.reason == "not sure" for p in decided])),
        unfamiliar=float(np.mean([p.reason == "unfamiliar" for p in decided])),
        ood_median=float(np.median(scored.ood)) if scored.ood is not None else None,
    )


def test_audit_note(audit: LabelAudit, scored: Scored, mapping: ClassMapping) -> AuditNote:
    """The run's label audit (both findings), and the evaluated images that look mislabelled by its rule."""
    note = AuditNote(
        audit.count("train"),
        audit.count("val"),
        audit.audited,
        "label_issues.html",
        expected_precision=audit.expected_precision,
        lookalike=[{"a": p.a, "b": p.b, "share": p.share} for p in audit.lookalike[:6]],
    )
    flagged, suggested = flag_images(scored.probs, scored.y)
    columns = mapping.columns
    note.test = [
        {
            "path": scored.paths[i],
            "label": columns[scored.y[i]],
            "suggested": columns[suggested[i]],
            "p_label": float(scored.probs[i, scored.y[i]]),
            "p_suggested": float(scored.probs[i, suggested[i]]),
        }
        for i in np.flatnonzero(flagged)
    ]
    note.test.sort(key=lambda d: d["p_label"] - d["p_suggested"])
    return note


def build_report(
    run: str,
    folder: str,
    name: str,
    data: str | None,
    own_split: bool,
    mapping: ClassMapping,
    scored: Scored,
    metrics: Metrics,
    predictor: Predictor,
    ctx: RunContext,
) -> Report:
    """The Report of one evaluation: its figures, and the run's facts around them (``own_split``: the run's own
    test or validation split, where the split's leak note and the validation gap apply)."""
    import torch

    facts, info, cfg = ctx.facts, ctx.info, ctx.config
    split_facts = facts.split
    leak = split_facts.test_leak
    report = Report(
        run=run,
        folder=folder,
        evaluated_on=name,
        data=data or facts.data,
        class_map=mapping.source,
        classes=mapping.columns,
        metrics=metrics,
        unmapped_images=scored.unmapped,
        bad_images=scored.bad,
        leak=LeakNote(facts.leak_free, int(leak.get("images", 0)), float(leak.get("share", 0.0)), own_split),
        dataset=DatasetNote(
            split_facts.per_class,
            split_facts.totals,
            split_facts.notes,
            split_facts.warnings,
            split_facts.excluded,
            facts.check_findings,
            {k: v for k, v in vars(facts.check).items() if k not in ("counts", "class_totals")},
        ),
        model=ModelNote(cfg.model.name, predictor.engine, predictor.preprocessing, ctx.parameters, ctx.checkpoint_mb),
        config=cfg,
        history=ctx.history,
        timing=Timing(None, info.train_seconds, info.fit_seconds),
        environment=Environment(
            platform.python_version(), torch.__version__, platform.platform(), info.machine, info.gpu, _versions()
        ),
        seed=cfg.data.seed,
    )
    if name != "val":
        report.validation_gap = validation_gap(ctx.history, metrics, split_facts.totals.get("val", 0))
    report.domain = DomainNote(facts.check.white_background, [DomainFigure.of(report)])
    report.adaptation = info.adaptation
    report.photos = ctx.photos if own_split else None
    report.trust = trust_note(predictor, scored, mapping)
    report.label_audit = test_audit_note(ctx.audit, scored, mapping) if own_split and ctx.audit is not None else None
    return report


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("fruitlens", "torch", "torchvision", "lightning", "onnxruntime", "scikit-learn", "numpy", "pillow"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out

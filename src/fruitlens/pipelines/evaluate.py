"""``evaluate``: a run's model on its test split (the run's own report) or on other data (``RUN/eval/<data>/``)."""
from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from fruitlens.data.check import check, duplicate_groups
from fruitlens.data.facts import DataFacts
from fruitlens.data.provenance import licence_note
from fruitlens.data.manifest import Manifest
from fruitlens.data.scan import scan
from fruitlens.errors import DataError, ImageError
from fruitlens.evaluation.classmap import ClassMapping
from fruitlens.evaluation.metrics import calibration, compute_metrics, validation_gap
from fruitlens.evaluation.audit import flag_images
from fruitlens.evaluation.card import write_model_card
from fruitlens.evaluation.domain import DomainFigure, DomainNote
from fruitlens.evaluation.photos import PhotoNote
from fruitlens.evaluation.report import (AuditNote, DatasetNote, Environment, LeakNote, ModelNote, Report, Timing,
                                         TrustNote, gallery, write_report)
from fruitlens.evaluation.selective import nll, risk_coverage
from fruitlens.inference.predictor import Predictor, softmax
from fruitlens.jsonio import read_json
from fruitlens.models.checkpoint import read_checkpoint
from fruitlens.rundir import RunDir
from fruitlens.training.history import read_history
from fruitlens.training.info import TrainInfo

log = logging.getLogger(__name__)


@dataclass
class EvalTarget:
    """What to evaluate on and where the report goes."""

    manifest: Manifest
    name: str  # "test", "val", or the other data's name
    out: Path  # the run folder for its own splits, RUN/eval/<name>/ for other data
    data: str | None = None  # the other data, None for the run's own split


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


def evaluate(run: RunDir | str | Path, data: str | None = None, *, split: str = "test", class_map: str | None = None,
             batch_size: int = 64, gallery_size: int = 12, train_info: TrainInfo | None = None,
             predictor: Predictor | None = None, write: bool = True,
             reference: DomainFigure | None = None) -> Report:
    """Evaluates the run's model and writes report.json, report.html and plots/ (for other data under
    ``RUN/eval/<name>/``, leaving the run's own report as it is; ``write=False``: the caller writes it with
    ``write_run_report``). A report on other data puts its figures next to the test split's (``reference``, else
    the run's report.json). Returns the Report."""
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    run.require("checkpoints/best.ckpt", "labels.json", "manifest.csv")
    t0 = time.perf_counter()
    predictor = predictor or Predictor.load(run.path)  # its parity-checked ONNX export when there is one
    target = eval_target(run, data, split)
    mapping = ClassMapping.load(class_map, predictor.classes)
    scored = score(predictor, target.manifest, mapping, batch_size)
    metrics = compute_metrics(scored.y, scored.probs, mapping.columns, scored.groups, scored.pred)
    report = _assemble(run, target, mapping, scored, metrics, predictor, train_info)
    report.trust = trust_note(predictor, scored, mapping)
    report.label_audit = audit_note(run, target, scored, mapping) if target.data is None else None
    report.timing.eval_seconds = round(time.perf_counter() - t0, 2)
    report.gallery = gallery(scored.paths, scored.y, scored.probs, mapping.columns, gallery_size, scored.groups,
                             scored.class_maps, predictor.preprocessing, scored.pred)
    if target.data is None:  # the run's evaluations on other data so far, next to its own figures
        with_other_data(run, report, _earlier_evaluations(run))
    else:
        reference = reference or (DomainFigure.of(Report.from_json(run.report_json)) if run.report_json.is_file()
                                  else None)
        if reference is not None:
            report.domain.figures.append(replace(reference, folder=os.path.relpath(run.path, target.out)))
    log.info("evaluated %d images (%s) in %.1fs: accuracy %.4f, macro F1 %.4f", metrics.n, target.name,
             report.timing.eval_seconds, metrics.accuracy, metrics.macro_f1)
    if write:
        write_run_report(run, report)
    return report


def write_run_report(run: RunDir, report: Report) -> Path:
    """report.json, report.html and plots/ into the report's folder; for the run's own split also MODEL_CARD.md."""
    page = write_report(report, Path(report.folder))
    if Path(report.folder).resolve() == run.path.resolve():  # the run's own figures: its model card says the same
        write_model_card(report, run.model_card, licence_note(report.data) if report.data else None)
    log.debug("report: %s", page)
    return page


def with_other_data(run: RunDir, report: Report, others: list[Report]) -> Report:
    """The run's report with the figures of its evaluations on other data next to its own (each folder once)."""
    own, *rest = report.domain.figures
    by_folder = {f.folder: f for f in rest}
    for o in others:
        folder = os.path.relpath(o.folder, run.path)
        by_folder[folder] = DomainFigure.of(o, folder)
    report.domain.figures = [own, *by_folder.values()]
    return report


def _earlier_evaluations(run: RunDir) -> list[Report]:
    out = []
    for path in sorted((run.path / "eval").glob("*/report.json")):
        try:
            out.append(Report.from_json(path))
        except (ValueError, TypeError, KeyError) as exc:  # an old or damaged report: the rest still count
            log.warning("%s: not a readable report (%s); left out of the run's report", path, exc)
    return out


_SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}


def eval_target(run: RunDir, data: str | None, split: str) -> EvalTarget:
    """The run's ``split`` (its test split by default), or the folder/manifest ``data`` (its ``split`` folder if it
    has one) with the near-duplicate groups of a check of it."""
    if data is None:
        m = Manifest.from_csv(run.manifest)
        part = m.split(split)
        if not len(part):
            if split == "test" and len(m.split("val")):
                log.warning("the run has no test images: evaluating on the validation split (an optimistic figure)")
                return EvalTarget(m.split("val"), "val", run.path)
            raise DataError(f"{run.path}: the run's manifest has no '{split}' images", "pass --split val or a DATA folder")
        return EvalTarget(part, split, run.path)
    m = scan(data).manifest
    name = Path(data).stem if Path(data).is_file() else Path(data).name
    if name.lower() in _SPLIT_NAMES:  # grocery/val: "grocery-val", not "val" (the run's own split has that name)
        name = f"{Path(data).resolve().parent.name}-{name}"
    if m.splits and split in m.splits:
        m, name = m.split(split), f"{name}/{split}"
    return EvalTarget(_with_groups(m), name, run.eval_dir(name), str(data))


def _with_groups(manifest: Manifest) -> Manifest:
    """The records with the folder's near-duplicate groups (bursts, frames of one fruit), so that the accuracy's
    interval counts each group as the one try it is; a run's own manifest has them from its split."""
    comp = duplicate_groups(check(manifest))
    return Manifest(tuple(replace(r, group=f"g{c}") for r, c in zip(manifest.records, comp)), manifest.root)


def score(predictor: Predictor, manifest: Manifest, mapping: ClassMapping, batch_size: int = 64) -> Scored:
    """Predicts every image of a mapped class; images that fail to decode are listed, the rest go on."""
    keep = [r for r in manifest if r.label in mapping.mapping]
    out = Scored()
    for r in manifest:
        if r.label not in mapping.mapping:
            out.unmapped[r.label] = out.unmapped.get(r.label, 0) + 1
    if out.unmapped:
        log.warning("%d images of classes the model does not know are counted apart: %s", sum(out.unmapped.values()),
                    ", ".join(sorted(out.unmapped)))
    if not keep:
        raise DataError(f"no images of the model's classes in {manifest.root or 'the data'}",
                        "pass --class-map FILE to map the data's class names onto the model's")
    size = predictor.preprocessing.image_size
    batch_size = max(4, min(batch_size, int(batch_size * (96 / size) ** 2)))  # keeps activations small at 448 px
    logits, labels, ood, maps = [], [], [], []
    rows = (item for batch in predictor.outputs_many([str(manifest.resolve(r)) for r in keep], batch_size)
            for item in batch)
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
        raise DataError(f"none of the {len(keep)} images to evaluate can be decoded (e.g. {out.bad[0]['error']})",
                        "run 'fruitlens check' on the data to list every bad file")
    columns = mapping.columns
    out.logits = np.stack(logits)
    out.y = np.array([columns.index(lab) for lab in labels])
    out.probs = mapping.collapse(softmax(out.logits), out.y)
    out.pred = mapping.predicted(out.logits, out.y)
    out.ood = np.array(ood) if len(ood) == len(logits) else None
    out.class_maps = maps if len(maps) == len(logits) else None
    return out


def trust_note(predictor: Predictor, scored: Scored, mapping: ClassMapping, curve_points: int = 300) -> TrustNote | None:
    """How the trust layer does on the evaluated images: calibration before and after the temperature, the
    risk-coverage curve, and how many answers the run's thresholds turn into "not sure" and "unfamiliar"."""
    t = predictor.trust
    if not t:
        return None
    temperature = float(t.get("temperature", 1.0))
    before = mapping.collapse(softmax(scored.logits * temperature), scored.y)
    conf, correct = scored.probs.max(axis=1), scored.pred == scored.y
    rc = risk_coverage(conf, correct)
    step = max(1, len(rc.coverage) // curve_points)  # a readable curve in report.json, its last point kept
    keep = sorted(set(range(0, len(rc.coverage), step)) | {len(rc.coverage) - 1})
    rc.coverage, rc.accuracy, rc.thresholds = ([getattr(rc, a)[i] for i in keep]
                                               for a in ("coverage", "accuracy", "thresholds"))
    out = {"logits": scored.logits} if scored.ood is None else {"logits": scored.logits, "ood_score": scored.ood}
    decided = predictor.decide(out, 1)
    answered = np.array([not p.unknown for p in decided])
    calib_before = calibration(scored.y, before)
    return TrustNote(
        temperature=temperature, source=t.get("source", ""), heldout_images=int(t.get("heldout_images", 0)),
        target_precision=float(t.get("target_precision", 0.95)), unknown_threshold=predictor.unknown_threshold,
        ood_threshold=predictor.ood_threshold, ood_rule=t.get("ood_rule", ""), ece_before=calib_before["ece"],
        ece_after=calibration(scored.y, scored.probs)["ece"], log_loss_before=nll(np.log(np.clip(before, 1e-12, 1)),
                                                                                  scored.y),
        log_loss_after=nll(np.log(np.clip(scored.probs, 1e-12, 1)), scored.y), calibration_before=calib_before,
        risk_coverage=rc, answered=float(answered.mean()),
        answered_accuracy=float(correct[answered].mean()) if answered.any() else None,
        not_sure=float(np.mean([p.reason == "not sure" for p in decided])),
        unfamiliar=float(np.mean([p.reason == "unfamiliar" for p in decided])),
        ood_median=float(np.median(scored.ood)) if scored.ood is not None else None)


def audit_note(run: RunDir, target: EvalTarget, scored: Scored, mapping: ClassMapping) -> AuditNote | None:
    """The run's label audit (both findings), and the evaluated images that look mislabelled by its rule."""
    from fruitlens.pipelines.audit import LabelAudit

    path = run.path / "label_audit.json"
    if not path.is_file():
        return None
    saved = read_json(path, LabelAudit)
    note = AuditNote(saved.count("train"), saved.count("val"), saved.audited, "label_issues.html",
                     expected_precision=saved.expected_precision,
                     lookalike=[{"a": p.a, "b": p.b, "share": p.share} for p in saved.lookalike[:6]])
    flagged, suggested = flag_images(scored.probs, scored.y)
    columns = mapping.columns
    note.test = [{"path": scored.paths[i], "label": columns[scored.y[i]], "suggested": columns[suggested[i]],
                  "p_label": float(scored.probs[i, scored.y[i]]), "p_suggested": float(scored.probs[i, suggested[i]])}
                 for i in np.flatnonzero(flagged)]
    note.test.sort(key=lambda d: d["p_label"] - d["p_suggested"])
    return note


def _assemble(run: RunDir, target: EvalTarget, mapping: ClassMapping, scored: Scored, metrics, predictor: Predictor,
              train_info: TrainInfo | None) -> Report:
    import torch
    import yaml

    facts = read_json(run.facts, DataFacts) if run.facts.exists() else DataFacts()
    info = train_info or (read_json(run.train_info, TrainInfo) if run.train_info.exists() else TrainInfo())
    config = yaml.safe_load(run.config.read_text()) if run.config.exists() else {}
    leak = facts.split.test_leak
    history = read_history(run.history)
    split_facts = facts.split
    report = Report(
        run=str(run.path), folder=str(target.out), evaluated_on=target.name, data=target.data or facts.data, class_map=mapping.source,
        classes=mapping.columns, metrics=metrics, unmapped_images=scored.unmapped, bad_images=scored.bad,
        leak=LeakNote(facts.leak_free, int(leak.get("images", 0)), float(leak.get("share", 0.0)), target.data is None),
        dataset=DatasetNote(split_facts.per_class, split_facts.totals, split_facts.notes, split_facts.warnings,
                            split_facts.excluded, facts.check_findings,
                            {k: v for k, v in vars(facts.check).items() if k not in ("counts", "class_totals")}),
        model=ModelNote(config.get("model", {}).get("name"), predictor.engine, predictor.preprocessing.to_dict(),
                        _param_count(run), round(run.best_ckpt.stat().st_size / 2**20, 2)),
        config=config, history=history,
        timing=Timing(None, info.train_seconds, info.fit_seconds),
        environment=Environment(platform.python_version(), torch.__version__, platform.platform(), info.machine,
                                info.gpu, _versions()),
        seed=config.get("data", {}).get("seed"))
    if target.name != "val":
        report.validation_gap = validation_gap(history, metrics, split_facts.totals.get("val", 0))
    report.domain = DomainNote(facts.check.white_background, [DomainFigure.of(report)])
    report.adaptation = info.adaptation
    report.photos = read_json(run.photos_json, PhotoNote) if run.photos_json.is_file() and target.data is None else None
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


def _param_count(run: RunDir) -> int:
    sd = read_checkpoint(run.best_ckpt)["state_dict"]
    return int(sum(v.numel() for k, v in sd.items() if v.is_floating_point() and "running" not in k))

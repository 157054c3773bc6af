"""``evaluate``: a run's model on its test split (the run's own report) or on other data (``RUN/eval/<data>/``).

Composes: the run's context (what ``train`` holds, or its folder read once), the target images, scoring and the
report (``evaluation/scoring.py``), and writing it (``evaluation/writer.py``, the model card)."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fruitlens.config import TrainConfig
from fruitlens.data.check import check, duplicate_groups
from fruitlens.data.facts import DataFacts
from fruitlens.data.manifest import Manifest
from fruitlens.data.provenance import licence_note
from fruitlens.data.scan import scan
from fruitlens.errors import DataError
from fruitlens.evaluation.card import write_model_card
from fruitlens.evaluation.classmap import ClassMapping
from fruitlens.evaluation.domain import DomainFigure
from fruitlens.evaluation.label_audit import LabelAudit
from fruitlens.evaluation.metrics import compute_metrics
from fruitlens.evaluation.photos import PhotoNote
from fruitlens.evaluation.report import Report, gallery
from fruitlens.evaluation.scoring import RunContext, build_report, score
from fruitlens.evaluation.writer import write_report
from fruitlens.inference.predictor import Predictor
from fruitlens.jsonio import read_json
from fruitlens.models.checkpoint import load_model
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


def run_context(run: RunDir) -> RunContext:
    """A run folder's own account of itself, each file read once through its type."""
    return RunContext(
        config=TrainConfig.from_yaml(run.config) if run.config.exists() else TrainConfig(),
        facts=read_json(run.facts, DataFacts) if run.facts.exists() else DataFacts(),
        info=read_json(run.train_info, TrainInfo) if run.train_info.exists() else TrainInfo(),
        history=read_history(run.history),
        audit=read_json(run.label_audit, LabelAudit) if run.label_audit.is_file() else None,
        photos=read_json(run.photos_json, PhotoNote) if run.photos_json.is_file() else None,
        parameters=load_model(run.best_ckpt).parameters,
        checkpoint_mb=round(run.best_ckpt.stat().st_size / 2**20, 2),
    )


def evaluate(
    run: RunDir | str | Path,
    data: str | None = None,
    *,
    split: str = "test",
    class_map: str | None = None,
    batch_size: int = 64,
    gallery_size: int = 12,
    context: RunContext | None = None,
    predictor: Predictor | None = None,
    write: bool = True,
    reference: DomainFigure | None = None,
) -> Report:
    """Evaluates the run's model and writes report.json, report.html and plots/ (for other data under
    ``RUN/eval/<name>/``, leaving the run's own report as it is; ``write=False``: the caller writes it with
    ``write_run_report``). ``context``: what the caller (``train``) holds of the run; else its folder is read. A
    report on other data puts its figures next to the test split's (``reference``, else the run's report.json)."""
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    run.require("checkpoints/best.ckpt", "labels.json", "manifest.csv")
    t0 = time.perf_counter()
    predictor = predictor or Predictor.load(run.path)  # its parity-checked ONNX export when there is one
    context = context or run_context(run)
    target = eval_target(run, data, split)
    mapping = ClassMapping.load(class_map, predictor.classes)
    scored = score(predictor, target.manifest, mapping, batch_size)
    metrics = compute_metrics(scored.y, scored.probs, mapping.columns, scored.groups, scored.pred)
    report = build_report(
        str(run.path),
        str(target.out),
        target.name,
        target.data,
        target.data is None,
        mapping,
        scored,
        metrics,
        predictor,
        context,
    )
    report.timing.eval_seconds = round(time.perf_counter() - t0, 2)
    report.gallery = gallery(
        scored.paths,
        scored.y,
        scored.probs,
        mapping.columns,
        gallery_size,
        scored.groups,
        scored.class_maps,
        predictor.preprocessing,
        scored.pred,
    )
    if target.data is None:  # the run's evaluations on other data so far, next to its own figures
        with_other_data(run, report, _earlier_evaluations(run))
    else:
        reference = reference or (
            DomainFigure.of(Report.from_json(run.report_json)) if run.report_json.is_file() else None
        )
        if reference is not None:
            report.domain.figures.append(replace(reference, folder=os.path.relpath(run.path, target.out)))
    log.info(
        "evaluated %d images (%s) in %.1fs: accuracy %.4f, macro F1 %.4f",
        metrics.n,
        target.name,
        report.timing.eval_seconds,
        metrics.accuracy,
        metrics.macro_f1,
    )
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
            raise DataError(
                f"{run.path}: the run's manifest has no '{split}' images", "pass --split val or a DATA folder"
            )
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

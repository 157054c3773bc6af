"""``train`` and ``resume``: the whole job from DATA to an exported, evaluated run folder.

prepare data -> resolve the auto settings (logged once) -> write the run's inputs -> build the model -> fit -> save
-> export -> evaluate. Each step is a named function; the orchestrators read top to bottom.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import lightning as L

from fruitlens.config import TrainConfig
from fruitlens.data.facts import AddedFacts, DataFacts
from fruitlens.data.manifest import Manifest
from fruitlens.data.photos import find_photos, near_copy_groups
from fruitlens.errors import ConfigError, DataError, ExportError, FruitlensError, Interrupted, RunDirError
from fruitlens.evaluation.classmap import ClassMapping
from fruitlens.evaluation.audit import neighbours_from_groups
from fruitlens.evaluation.domain import STUDIO_SHARE, DomainFigure
from fruitlens.evaluation.photos import PhotoNote
from fruitlens.evaluation.report import Report
from fruitlens.evaluation.scoring import RunContext
from fruitlens.evaluation.trust import HeldOut, Trust
from fruitlens.models.probs import softmax
from fruitlens.jsonio import json_safe, read_json, write_json
from fruitlens.labelling.labels import read_labels, refuse_copies
from fruitlens.models.checkpoint import save_model
from fruitlens.models.registry import FruitNet, build_model, check_options, has_pretrained_weights, model_parameters
from fruitlens.evaluation.label_audit import LabelAudit, audit_heldout, write_audit
from fruitlens.pipelines.evaluate import evaluate, with_other_data, write_run_report
from fruitlens.pipelines.export import ExportResult, export
from fruitlens.pipelines.prepare import PreparedData, prepare, with_data_path
from fruitlens.rundir import RunDir
from fruitlens.runtime import STAGES, is_ddp_child, limit_heap_growth
from fruitlens.training import auto
from fruitlens.pipelines.calibrate import calibrate
from fruitlens.pipelines.track import log_results
from fruitlens.training.fit import FitResult, fit
from fruitlens.training.history import HistoryRow, read_history, write_history
from fruitlens.training.info import TrainInfo
from fruitlens.training.loggers import check_available

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """A trained run: its folder and config, and (on the process that saves) its report and export."""

    run: RunDir
    config: TrainConfig
    facts: DataFacts
    info: TrainInfo | None = None
    report: Report | None = None  # None on the other processes of a multi-process (DDP) run
    trust: Trust | None = None
    audit: LabelAudit | None = None  # training and validation images that look mislabelled
    export: ExportResult | None = None
    export_error: str | None = None  # why there is no ONNX model, where export failed
    other: list[Report] = field(default_factory=list)  # the evaluations on --eval-data (RUN/eval/<name>/)
    other_error: str | None = None  # why --eval-data could not be evaluated
    photos: PhotoNote | None = None  # --add: the figures on the labelled photos of the user's setting


def train(cfg: TrainConfig, out: str | Path) -> TrainResult:
    """Trains ``cfg`` into the new run folder ``out``, exports and evaluates it on the test split."""
    t0 = time.perf_counter()
    run = RunDir(Path(out))
    check_available(cfg)  # a missing tracker package fails now, not after training
    if is_ddp_child():  # a process that Lightning's DDP launcher started: rank zero prepared the run already
        return _fit_and_ship(
            run,
            TrainConfig.from_yaml(run.config),
            Manifest.from_csv(run.manifest),
            read_json(run.facts, DataFacts),
            [],
            t0,
            photos=_saved_photos(run),
        )
    # a typo in --model or --weights, or a size the model cannot take, fails before the data is read
    check_options(cfg.model.name, cfg.model.weights, cfg.model.img_size)
    _check_out_beside_data(run, cfg)
    STAGES.reset()
    with _new_run(run):
        cfg = with_data_path(cfg)
        with STAGES("check and split"):
            prepared = prepare(cfg)
        _check_other_data(cfg, prepared.manifest.classes)
        photos = _added_photos(cfg, prepared)
        cfg = _resolve_auto(cfg, prepared.facts)
        model = _build(cfg, all_classes(prepared.manifest, photos))  # missing weights, a bad --weights file: first
        _write_inputs(run, cfg, prepared, photos)
        return _fit_and_ship(run, cfg, prepared.manifest, prepared.facts, [], t0, model, photos)


def resume(path: str | Path) -> TrainResult:
    """Continues an interrupted run from its last finished epoch (its config, split and history)."""
    t0 = time.perf_counter()
    run = RunDir(Path(path)).require("config.yaml", "manifest.csv", "facts.json")
    cfg, manifest, facts = (
        TrainConfig.from_yaml(run.config),
        Manifest.from_csv(run.manifest),
        read_json(run.facts, DataFacts),
    )
    photos = _saved_photos(run)
    if is_ddp_child():
        return _fit_and_ship(run, cfg, manifest, facts, [], t0, photos=photos)
    STAGES.reset()
    with run.lock():
        log.info("resuming %s", run.path)
        return _fit_and_ship(run, cfg, manifest, facts, read_history(run.history), t0, photos=photos)


def _check_out_beside_data(run: RunDir, cfg: TrainConfig) -> None:
    """A run folder inside the data folder would become a class of it (its plots are images) on the next scan."""
    data = Path(cfg.data.path) if cfg.data.path else None
    if data is not None and data.is_dir() and run.path.resolve().is_relative_to(data.resolve()):
        raise ConfigError(
            f"--out {run.path} is inside the data folder {data}: its plots and previews would be read as "
            "images of a class the next time the data is scanned",
            f"put the run beside the data, e.g. --out {data.resolve().parent / 'runs' / run.path.name}",
        )


@contextmanager
def _new_run(run: RunDir) -> Iterator[None]:
    """Holds the run folder's lock; a folder this command created and left holding nothing but its lock (bad data,
    a bad option, missing weights: every check runs before the first file) is removed again when the command fails."""
    made = [d for d in (run.path, *run.path.parents) if not d.exists()]  # the folders the lock will create
    try:
        with run.lock():
            if run.best_ckpt.exists():
                raise RunDirError(
                    f"{run.path} already holds a trained run",
                    f"pick another --out, or continue it with 'fruitlens train --resume {run.path}'",
                )
            # an interrupted or failed run's files (its config, cached features, phase checkpoints) would be read
            # back by this run's feature pass and phases as if they were its own
            earlier = [p.name for p in (run.config, run.checkpoints, run.cache) if p.exists()]
            if earlier:
                raise RunDirError(
                    f"{run.path} holds an unfinished run ({', '.join(earlier)})",
                    f"continue it with 'fruitlens train --resume {run.path}', or pick another --out",
                )
            yield
    except BaseException:
        if made and [p.name for p in run.path.iterdir()] == [".lock"]:
            with suppress(OSError):  # another command took a folder meanwhile: it stays
                (run.path / ".lock").unlink()
                for d in made:  # innermost first; each is empty unless something else wrote there
                    d.rmdir()
        raise


def _check_other_data(cfg: TrainConfig, classes: list[str]) -> None:
    """--eval-data, --class-map and --adapt-to are read after the first training phase: a typo fails now, not an
    hour later."""
    d = cfg.data
    if d.adapt_to:
        if not (auto.pretrained(cfg) and cfg.fit.feature_cache):
            raise ConfigError(
                "--adapt-to adapts the head trained on cached features of a pretrained backbone",
                "drop --no-feature-cache / --weights none, or drop --adapt-to",
            )
        find_photos(d.adapt_to)  # raises DataError when there is no such folder or no image in it
    if d.add and not (auto.pretrained(cfg) and cfg.fit.feature_cache and not cfg.fit.fine_tune_blocks):
        raise ConfigError(
            "--add trains the head on cached features of a pretrained backbone with the photos beside the data",
            "drop --no-feature-cache / --weights none / --fine-tune-blocks, or drop --add",
        )
    if d.eval_data and not Path(d.eval_data).exists():
        raise DataError(
            f"--eval-data {d.eval_data}: no such file or folder",
            "pass a folder of class folders (or a manifest CSV) of the photos to measure on",
        )
    if d.eval_class_map:
        if not d.eval_data:
            raise ConfigError("--class-map without --eval-data", "pass the data it maps: --eval-data PHOTOS/")
        ClassMapping.load(d.eval_class_map, classes)  # raises ConfigError naming what does not fit


def _added_photos(cfg: TrainConfig, prepared: PreparedData) -> Manifest | None:
    """The labelled photos of ``--add``: rows that cannot be used are listed (``facts.added``), a photo that copies an
    image of the data is refused (it would leak into the test figure, or count twice); near copies share a group."""
    if not cfg.data.add:
        return None
    with STAGES("labelled photos"):
        labelled = read_labels(list(cfg.data.add), workers=cfg.data.num_workers if cfg.data.num_workers > 0 else 0)
        check = prepared.check
        by_path = {str(check.manifest.resolve(r)): f for r, f in zip(check.manifest.records, check.files)}
        data = prepared.manifest
        files = [by_path.get(str(data.resolve(r))) for r in data.records]
        keep = [i for i, f in enumerate(files) if f is not None]
        labelled = refuse_copies(labelled, data.with_records(data.records[i] for i in keep), [files[i] for i in keep])
    groups = near_copy_groups(labelled.files)
    photos = Manifest(tuple(replace(r, group=f"p{g}") for r, g in zip(labelled.manifest().records, groups)))
    known = set(prepared.manifest.classes)
    prepared.facts.added = AddedFacts(
        [str(s) for s in labelled.sources],
        len(photos),
        dict(sorted(labelled.counts().items())),
        sorted(set(photos.classes) - known),
        [list(s) for s in labelled.skipped],
    )
    log.info(
        "--add: %d labelled photos of your setting (%d classes%s)%s",
        len(photos),
        len(photos.classes),
        f", new: {', '.join(prepared.facts.added.new_classes)}" if prepared.facts.added.new_classes else "",
        f"; {len(labelled.skipped)} row(s) left out: {labelled.skipped_text()}" if labelled.skipped else "",
    )
    return photos


def all_classes(manifest: Manifest, photos: Manifest | None) -> list[str]:
    """The data's classes and the new ones the labelled photos bring."""
    return sorted(set(manifest.classes) | set(photos.classes if photos is not None else []))


def _saved_photos(run: RunDir) -> Manifest | None:
    return Manifest.from_csv(run.photos) if run.photos.is_file() else None


def _resolve_auto(cfg: TrainConfig, facts: DataFacts) -> TrainConfig:
    cfg, notes = auto.resolve(cfg, facts.median_side, facts.check.white_background >= STUDIO_SHARE)
    for note in notes:
        log.info("%s", note)
    return cfg


def _write_inputs(run: RunDir, cfg: TrainConfig, prepared: PreparedData, photos: Manifest | None) -> None:
    """What a resumed run (and every DDP process) reads back: config, split manifest, data facts, the photos."""
    run.path.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(run.config)
    prepared.manifest.to_csv(run.manifest)
    write_json(run.facts, prepared.facts)
    if photos is not None:
        photos.to_csv(run.photos)


def _fit_and_ship(
    run: RunDir,
    cfg: TrainConfig,
    manifest: Manifest,
    facts: DataFacts,
    history: list[HistoryRow],
    t0: float,
    model: FruitNet | None = None,
    photos: Manifest | None = None,
) -> TrainResult:
    """Fits, calibrates, audits, exports and evaluates; ``model``: built by a new run's checks; ``photos``: the
    labelled photos of ``--add``."""
    limit_heap_growth()  # else large image batches fragment glibc's heaps (GiBs at 448 px)
    classes = all_classes(manifest, photos)
    model = _build(cfg, classes) if model is None else model
    run.labels.write_text(json.dumps(classes, indent=2))
    fitted = _fit(model, manifest, classes, cfg, run, history, photos)
    result = TrainResult(run, cfg, facts)
    if not fitted.is_global_zero:
        return result
    with STAGES("calibration"):
        result.trust, heldout, result.photos = calibrate(model, manifest.by_split(), classes, cfg, run, fitted, photos)
    if result.photos is not None:
        result.photos = _with_facts(result.photos, facts.added)
        write_json(run.photos_json, result.photos)
    result.info = _save(run, model, classes, cfg, fitted, time.perf_counter() - t0, result.trust)
    with STAGES("label audit"):
        result.audit = _audit_labels(run, manifest, classes, heldout, result.trust.temperature)
    with STAGES("export"):
        result.export, result.export_error = _export_for_serving(run)
    with STAGES("evaluation"):
        context = RunContext(
            cfg,
            facts,
            result.info,
            fitted.history,
            result.audit,
            result.photos,
            model_parameters(model),
            round(run.best_ckpt.stat().st_size / 2**20, 2),
        )
        result.report = evaluate(run, context=context, write=False)
        if cfg.data.eval_data:  # the figure on the user's other data next to the test split's
            try:
                result.other = [
                    evaluate(
                        run,
                        cfg.data.eval_data,
                        class_map=cfg.data.eval_class_map or None,
                        context=context,
                        reference=DomainFigure.of(result.report),
                    )
                ]
            except FruitlensError as exc:  # the trained run and its own report stay; the user reruns evaluate
                result.other_error = f"{exc.message} ({exc.hint})" if exc.hint else exc.message
                log.error(
                    "--eval-data %s: %s; the run is complete without it (then: fruitlens evaluate %s %s)",
                    cfg.data.eval_data,
                    result.other_error,
                    run.path,
                    cfg.data.eval_data,
                )
            with_other_data(run, result.report, result.other)
        write_run_report(run, result.report)
    with STAGES("tracking"):
        log_results(cfg, run, result.report)
    result.info.stages = dict(STAGES.seconds)
    result.info.stage_peak_mib = dict(STAGES.peak_mib)
    result.info.command_seconds = round(time.perf_counter() - t0, 2)
    write_json(run.train_info, result.info)
    log.info("time: %s (%.1fs in all)", STAGES.text(), result.info.command_seconds)
    return result


def _build(cfg: TrainConfig, classes: list[str]) -> FruitNet:
    """Seeds every generator (the head's initialisation and all that follows draw from it), then builds the model."""
    L.seed_everything(cfg.data.seed, workers=True, verbose=False)
    layer = "last" if cfg.model.feature_layer == "auto" else cfg.model.feature_layer
    model = build_model(
        cfg.model.name,
        len(classes),
        weights=cfg.model.weights,
        img_size=cfg.model.img_size,
        dropout=cfg.model.dropout,
        feature_layer=layer,
    )
    if cfg.model.weights == "none" and has_pretrained_weights(cfg.model.name):
        log.warning(
            "%s trains from scratch (--weights none): expect far lower accuracy than with ImageNet weights", model.name
        )
    return model


def _with_facts(note: PhotoNote, added: AddedFacts | None) -> PhotoNote:
    """The photos' figures with what reading their CSVs found (sources, rows left out, new classes)."""
    if added is not None:
        note.sources, note.new_classes = added.sources, added.new_classes
        note.skipped, note.skipped_examples = len(added.skipped), added.skipped[:20]
    return note


def _fit(
    model: FruitNet,
    manifest: Manifest,
    classes: list[str],
    cfg: TrainConfig,
    run: RunDir,
    history: list[HistoryRow],
    photos: Manifest | None = None,
) -> FitResult:
    """``training.fit``; on Ctrl-C the best model so far is saved and the run can be resumed."""
    t0 = time.perf_counter()
    try:
        return fit(model, manifest.by_split(), classes, cfg, run, history, photos)
    except KeyboardInterrupt:
        _save(run, model, classes, cfg, FitResult(history, time.perf_counter() - t0), None)
        raise Interrupted(
            f"training interrupted: {run.path} keeps the best model so far",
            f"continue with 'fruitlens train --resume {run.path}'",
        ) from None


def _save(
    run: RunDir,
    model: FruitNet,
    classes: list[str],
    cfg: TrainConfig,
    fitted: FitResult,
    train_seconds: float | None,
    trust: Trust | None = None,
) -> TrainInfo:
    info = TrainInfo.here(
        train_seconds if train_seconds is not None else fitted.seconds, fitted.seconds, fitted.phases, fitted.world_size
    )
    info.feature_pass, info.adaptation = fitted.feature_pass, fitted.adaptation
    extra = {"config": cfg.to_dict(), "fit_seconds": round(fitted.seconds, 2)}
    if trust is not None:
        extra["trust"] = json_safe(trust)
    save_model(run.best_ckpt, model, classes, extra)
    write_history(run.history, fitted.history)
    write_json(run.train_info, info)
    return info


def _audit_labels(
    run: RunDir, manifest: Manifest, classes: list[str], heldout: HeldOut, temperature: float
) -> LabelAudit:
    """The label audit on the held-out predictions that calibration made anyway: seconds, no extra forward pass.
    Their probabilities take the model's temperature, so that the audit's thresholds, which ``evaluate`` applies
    to the (calibrated) test predictions, are on the scale of those predictions; each image's near copies are the
    other members of its near-duplicate group."""
    splits = manifest.by_split()
    records = list(splits["train"]) + list(splits["val"])
    paths = [str(manifest.resolve(r)) for r in records]
    audit = audit_heldout(
        paths,
        heldout.labels,
        softmax(heldout.logits / temperature),
        heldout.held,
        classes,
        [r.split for r in records],
        neighbours_from_groups([r.group for r in records]),
    )
    write_audit(audit, run.path, classes)
    if audit.issues or audit.lookalike:
        log.info("label audit: %s -> %s", audit.text(), audit.html)
    return audit


def _export_for_serving(run: RunDir) -> tuple[ExportResult | None, str | None]:
    """Every run ships an ONNX model (parity-checked against PyTorch); evaluation then runs on ONNX Runtime.

    The parity check reads 256 held-out images here (``fruitlens export``: 512): eager PyTorch, its reference, takes
    15 ms an image at 224 px on 2 CPU cores, and the check is of the export's arithmetic (logits equal to 1e-5), which
    256 images show as well as 512."""
    try:
        result = export(run, bench=False, check_images=256)
    except ExportError as exc:
        log.warning("no ONNX export (%s); evaluation runs on PyTorch", exc.message)
        return None, exc.message
    log.info(
        "exported %s (top-1 agreement with PyTorch %.2f%%)", result.onnx, 100 * result.parity["fp32"].top1_agreement
    )
    return result, None

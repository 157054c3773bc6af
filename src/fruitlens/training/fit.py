"""``fit``: phase 1 (the head, on cached backbone features, or on images) then phase 2 (fine-tune the top blocks).

Training only: it fills the history and leaves the best weights in the model. Saving the run, exporting and evaluating
are the pipeline's (``fruitlens.pipelines.train``).
"""

from __future__ import annotations

import logging
import pickle
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from torch.utils.data import ConcatDataset, DataLoader, TensorDataset, WeightedRandomSampler

from fruitlens.config import RRC_MIN_AREA, TrainConfig
from fruitlens.data.dataset import class_weights
from fruitlens.data.manifest import Manifest, Record
from fruitlens.models.checkpoint import refused
from fruitlens.models.preprocessing import batch_for
from fruitlens.models.registry import FruitNet
from fruitlens.rundir import RunDir
from fruitlens.runtime import STAGES
from fruitlens.training import loaders
from fruitlens.data.photos import find_photos, readable
from fruitlens.training.adapt import METHOD, Adaptation, confident, shares
from fruitlens.training.augment import BatchInput
from fruitlens.training.auto import pretrained
from fruitlens.training.callbacks import EpochSummary, FreezeBackbone, TargetAccuracy
from fruitlens.training.features import FeaturePass, Placement, Views, cached_features
from fruitlens.training.store import FeatureStore
from fruitlens.training.history import HistoryRow
from fruitlens.training.loggers import mlflow_run, phase_loggers
from fruitlens.training.module import ClassifierModule
from fruitlens.training.photos import photo_repeats
from fruitlens.training.solver import Rows

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What training did: the epochs of every phase, the time, and whether this process is the one that saves."""

    history: list[HistoryRow] = field(default_factory=list)
    seconds: float = 0.0
    phases: list[str] = field(default_factory=list)
    is_global_zero: bool = True
    world_size: int = 1  # processes that trained together (DDP)
    backbone_frozen: bool = True  # the pretrained backbone kept its weights (its cached features stay valid)
    feature_pass: FeaturePass | None = None  # who computed the feature cache (the cached-feature path)
    adaptation: Adaptation | None = None  # what --adapt-to did
    adapted: torch.Tensor | None = None  # the features of the photos that became pseudo-labels (--adapt-to)
    adapted_labels: torch.Tensor | None = None  # and their pseudo-labels


def fit(
    model: FruitNet,
    splits: dict[str, Manifest],
    classes: list[str],
    cfg: TrainConfig,
    run: RunDir,
    history: list[HistoryRow],
    photos: Manifest | None = None,
) -> FitResult:
    """Trains ``model`` in place on the train split, validating on val; ``history`` gets a row per epoch (a resumed
    run passes the rows so far). ``photos``: labelled photos of the user's setting (``--add``), trained with the
    train split at ``fit.photo_share`` of the weight (the cached-feature path). KeyboardInterrupt (Ctrl-C) leaves the
    best weights so far in ``model``."""
    t0 = time.perf_counter()
    result = FitResult(history, backbone_frozen=pretrained(cfg))
    if pretrained(cfg) and cfg.fit.feature_cache:
        trainer, result.feature_pass, adapted = _fit_head_on_features(model, splits, classes, cfg, run, history, photos)
        result.adaptation, result.adapted, result.adapted_labels = adapted if adapted is not None else (None,) * 3
        result.phases.append("head")
        result.phases += [f"adapt-{r + 1}" for r in range(len(result.adaptation.rounds) if result.adaptation else 0)]
    else:
        phase = "head" if pretrained(cfg) else "full"
        trainer, _ = _fit_images(
            model,
            splits,
            classes,
            cfg,
            run,
            history,
            phase,
            train_blocks=0 if pretrained(cfg) else -1,
            lr=cfg.fit.lr,
            epochs=cfg.fit.epochs,
        )
        result.phases.append(phase)
    if pretrained(cfg) and cfg.fit.fine_tune_blocks and not _target_reached(history, cfg):
        trainer, kept = _fit_images(
            model,
            splits,
            classes,
            cfg,
            run,
            history,
            "fine-tune",
            train_blocks=cfg.fit.fine_tune_blocks,
            lr=cfg.fit.fine_tune_lr,
            epochs=cfg.fit.fine_tune_epochs,
        )
        result.phases.append("fine-tune")
        result.backbone_frozen = not kept
    result.is_global_zero, result.world_size = trainer.is_global_zero, trainer.world_size
    result.seconds = time.perf_counter() - t0
    return result


def use_gpu(cfg: TrainConfig) -> bool:
    return torch.cuda.is_available() and cfg.fit.accelerator in ("auto", "gpu", "cuda")


def devices(cfg: TrainConfig) -> int | str:
    """``fit.devices`` as Lightning takes it: a count, or a word such as "auto"."""
    return int(cfg.fit.devices) if cfg.fit.devices.isdigit() else cfg.fit.devices


def _target_reached(history: list[HistoryRow], cfg: TrainConfig) -> bool:
    key = "val_acc" if cfg.fit.target_monitor == "val" else "train_acc"
    return cfg.fit.target_acc > 0 and any((getattr(r, key) or 0) >= cfg.fit.target_acc for r in history)


def _trainer(
    cfg: TrainConfig,
    run: RunDir,
    phase: str,
    epochs: int,
    history: list[HistoryRow],
    monitor_train: bool,
    progress: bool,
) -> tuple[L.Trainer, ModelCheckpoint]:
    f = cfg.fit
    ckpt = ModelCheckpoint(
        dirpath=run.checkpoints / phase, filename="best", monitor="val/loss", mode="min", enable_version_counter=False
    )
    # every epoch, for --resume (Lightning's save_last=True writes last.ckpt only when the best one improves)
    last = ModelCheckpoint(
        dirpath=run.checkpoints / phase, filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )
    callbacks = [
        ckpt,
        last,
        EarlyStopping("val/loss", patience=f.early_stopping_patience, mode="min"),
        LearningRateMonitor("epoch"),
        EpochSummary(phase, history, run.history),
    ]
    if f.target_acc > 0:
        callbacks.append(TargetAccuracy(f.target_acc, "train/acc" if monitor_train else "val/acc"))
    precision = f.precision if f.precision != "auto" else ("16-mixed" if use_gpu(cfg) else "32-true")
    limit = f.limit_batches if f.limit_batches <= 1 else int(f.limit_batches)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator=f.accelerator,
        devices=devices(cfg),
        num_nodes=f.num_nodes,
        strategy=f.strategy,
        precision=precision,
        deterministic=f.deterministic,
        callbacks=callbacks,
        logger=phase_loggers(cfg, run, phase, mlflow_run(cfg, run)),
        enable_model_summary=False,
        # a bar only on a terminal: in a log file its redraws bury the one summary line per epoch
        enable_progress_bar=progress and sys.stdout.isatty(),
        limit_train_batches=limit,
        limit_val_batches=limit,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
        default_root_dir=run.path,
    )
    return trainer, ckpt


def _load_state(module: ClassifierModule, path: Path) -> None:
    """Weights from a Lightning checkpoint this run wrote, read as tensors only (no pickled objects)."""
    try:
        module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
    except pickle.UnpicklingError as exc:
        raise refused(path, exc) from None


def _run_phase(
    trainer: L.Trainer,
    ckpt: ModelCheckpoint,
    module: ClassifierModule,
    data: tuple[DataLoader, DataLoader] | L.LightningDataModule,
    run: RunDir,
    phase: str,
    history: list[HistoryRow],
) -> L.Trainer:
    """Fits (resuming from the phase's last.ckpt if present) and loads the best weights back into the module."""
    done = run.checkpoints / phase / "done"
    last = run.checkpoints / phase / "last.ckpt"
    if done.exists():
        _load_state(module, run.checkpoints / phase / "best.ckpt")
        log.info("[%s] already done; loaded its best weights", phase)
        return trainer

    def load_best() -> None:
        if ckpt.best_model_path and Path(ckpt.best_model_path).is_file():
            _load_state(module, Path(ckpt.best_model_path))

    _prune_history(history, last, phase)
    try:
        loaders_or_data = (
            {"datamodule": data}
            if isinstance(data, L.LightningDataModule)
            else dict(zip(("train_dataloaders", "val_dataloaders"), data))
        )
        trainer.fit(module, **loaders_or_data, ckpt_path=str(last) if last.exists() else None, weights_only=True)
    except pickle.UnpicklingError as exc:  # resume reads Lightning's checkpoint as tensors and plain data only
        raise refused(last, exc) from None
    except SystemExit:  # Lightning turns Ctrl-C into exit(1) after its graceful shutdown
        if trainer.interrupted:
            load_best()  # so that the run folder keeps the best model so far
            raise KeyboardInterrupt from None
        raise
    if trainer.interrupted:
        load_best()
        raise KeyboardInterrupt
    load_best()
    if trainer.is_global_zero:
        done.parent.mkdir(parents=True, exist_ok=True)
        score = ckpt.best_model_score
        done.write_text(f"best {'none' if score is None else float(score)}\n")
    return trainer


def _phase_best(run: RunDir, phase: str) -> float | None:
    """The best monitored value a finished phase recorded in its ``done`` file (None: none recorded)."""
    try:
        m = re.search(r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?", (run.checkpoints / phase / "done").read_text())
    except OSError:
        return None
    return float(m.group()) if m else None


def _prune_history(history: list[HistoryRow], last: Path, phase: str) -> None:
    """Drops this phase's history rows past the epochs that ``last.ckpt`` holds: a run stopped between an epoch's
    summary and its checkpoint trains that epoch again, and must not list it twice (no ``last.ckpt``: none)."""
    try:
        done = int(torch.load(last, map_location="cpu", weights_only=True)["epoch"]) + 1 if last.exists() else 0
    except pickle.UnpicklingError as exc:
        raise refused(last, exc) from None
    history[:] = [r for r in history if r.phase != phase or r.epoch <= done]


def _module(
    net,
    cfg: TrainConfig,
    targets: list[int],
    n_classes: int,
    lr: float,
    channels_last: bool,
    batch_input: BatchInput | None = None,
) -> ClassifierModule:
    f = cfg.fit
    weights = class_weights(targets, n_classes) if f.balance == "weights" else None
    return ClassifierModule(
        net,
        batch_input=batch_input,
        lr=lr,
        weight_decay=f.weight_decay,
        label_smoothing=f.label_smoothing,
        class_weights=weights,
        plateau_patience=f.plateau_patience,
        plateau_factor=f.plateau_factor,
        channels_last=channels_last,
    )


class FeatureData(L.LightningDataModule):
    """The head's data: cached backbone features (``feats``, memory-mapped), computed before the head trains."""

    def __init__(self, feats: dict, feature_pass: FeaturePass, cfg: TrainConfig, n_classes: int) -> None:
        super().__init__()
        self.feats, self.feature_pass, self.cfg, self.n_classes = feats, feature_pass, cfg, n_classes
        self.extra: tuple[torch.Tensor, torch.Tensor] | None = None  # pseudo-labelled photos (--adapt-to)
        self.photo_share = cfg.fit.photo_share  # of the rows, for the labelled photos (--add)

    def train_dataloader(self) -> DataLoader:
        feats, f = self.feats, self.cfg.fit
        parts = (
            [feats["train"]]
            + ([feats["train_aug"]] if "train_aug" in feats else [])
            + ([self.extra] if self.extra is not None else [])
        )
        photos = [feats[k] for k in ("photos", "photos_aug") if k in feats]
        # the labelled photos of the user's setting carry photo_share of the rows, however few they are
        parts += photos * photo_repeats(sum(len(p[0]) for p in parts), sum(len(p[0]) for p in photos), self.photo_share)
        # no concatenation: the cached features stay memory-mapped
        ds = ConcatDataset([TensorDataset(p[0], p[1]) for p in parts])
        gen = torch.Generator().manual_seed(self.cfg.data.seed)
        if f.balance == "sampler":
            targets = torch.cat([p[1] for p in parts])
            w = class_weights(targets.tolist(), self.n_classes)[targets]
            return DataLoader(
                ds, batch_size=max(f.batch_size, 256), sampler=WeightedRandomSampler(w.double(), len(ds), generator=gen)
            )
        return DataLoader(ds, batch_size=max(f.batch_size, 256), shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.feats["val"]), batch_size=1024)


def _fit_head_on_features(
    model: FruitNet,
    splits: dict[str, Manifest],
    classes: list[str],
    cfg: TrainConfig,
    run: RunDir,
    history: list[HistoryRow],
    photos: Manifest | None = None,
) -> tuple[L.Trainer, FeaturePass | None, tuple[Adaptation, torch.Tensor, torch.Tensor] | None]:
    """Phase 1 fast path: features of a clean view + ``feature_views`` augmented views, then the head alone; with
    ``--add``, the labelled photos' clean view and ``photo_views`` views beside them (``photo_features.pt``); with
    ``--adapt-to``, the rounds of pseudo-labels after it."""
    pre, f = model.preprocessing, cfg.fit
    views = f.feature_views if cfg.augment.enabled else 0
    gpu = use_gpu(cfg)
    # CPU: one decoding process keeps up with the backbone; more would only compete with it for the cores. 32 images
    # a batch at 96 px, fewer at larger sizes so that activations stay small (8 at 448 px). GPU: decoding is the
    # bottleneck (one process: 170 images/s at 448 px on an H200), so all workers, and larger batches
    batch = 64 if gpu else batch_for(pre.image_size)
    datasets = {split: loaders.dataset(splits[split], classes, pre, cfg) for split in ("train", "val")}
    store = (
        FeatureStore(model.name, cfg.model.weights, pre, layer=model.feature_layer)
        if cfg.model.weights == "imagenet"
        else None
    )

    workers = loaders.workers(cfg) if gpu else min(1, loaders.workers(cfg))
    photo_ds = loaders.dataset(photos, classes, pre, cfg) if photos is not None and len(photos) else None

    def compute() -> tuple[dict, FeaturePass]:
        place = Placement(f.accelerator, devices(cfg), f.strategy, f.num_nodes, workers)
        feats, fp = cached_features(
            model.backbone,
            pre,
            datasets,
            Views(views, cfg.augment, cfg.data.seed),
            batch_size=batch,
            cache_file=run.cache / "features.pt",
            store=store,
            place=place,
            # half precision: the cache and the memory that reads it are half the size (300,000 images at 96 px:
            # 1.2 GB instead of 2.4); the features are averages of ReLU6 outputs, 3 significant digits are plenty
            dtype=torch.float16,
        )
        if photo_ds is not None:  # photos get torchvision's crops, whatever the data's crop range
            photo_views = Views(
                f.photo_views if cfg.augment.enabled else 0,
                replace(cfg.augment, crop_scale=RRC_MIN_AREA),
                cfg.data.seed + 1,
                ("photos",),
            )
            more, _ = cached_features(
                model.backbone,
                pre,
                {"photos": photo_ds},
                photo_views,
                batch_size=batch,
                cache_file=run.cache / "photo_features.pt",
                store=store,
                place=place,
            )
            feats = {**feats, **more}
        if model.feature_layer == "mid":  # the head reads them standardised on every training row (views included)
            model.standardise.set(
                Rows(*[feats[k][0] for k in ("train", "train_aug", "photos", "photos_aug") if k in feats]).mean_std()
            )
        return feats, fp

    t0 = time.perf_counter()
    data = FeatureData(*compute(), cfg, len(classes))  # Lightning's Trainer.predict (over DDP processes, sharded)
    STAGES.add("features", time.perf_counter() - t0)
    module = _module(model.head, cfg, datasets["train"].targets, len(classes), f.lr, channels_last=False)
    trainer, ckpt = _trainer(cfg, run, "head", f.epochs, history, f.target_monitor == "train", progress=False)
    log.info(
        "[head] training the classifier head on %d cached feature vectors (%d classes)%s",
        len(datasets["train"]) * (1 + views),
        len(classes),
        f" and {len(photo_ds)} labelled photos x {1 + f.photo_views} views at {100 * f.photo_share:.0f}% of the weight"
        if photo_ds is not None
        else "",
    )
    t0 = time.perf_counter()
    trainer = _run_phase(trainer, ckpt, module, data, run, "head", history)
    STAGES.add("head", time.perf_counter() - t0)
    adaptation = None
    if cfg.data.adapt_to:
        with STAGES("adaptation"):
            trainer, adaptation = _adapt(
                trainer, model, data, datasets["train"].targets, classes, cfg, run, history, batch, gpu, store
            )
    return trainer, data.feature_pass, adaptation


def _adapt(
    trainer: L.Trainer,
    model: FruitNet,
    data: FeatureData,
    targets: list[int],
    classes: list[str],
    cfg: TrainConfig,
    run: RunDir,
    history: list[HistoryRow],
    batch: int,
    gpu: bool,
    store: FeatureStore | None,
) -> tuple[L.Trainer, tuple[Adaptation, torch.Tensor]]:
    """``--adapt-to``: the photos' clean features once, then ``fit.adapt_rounds`` rounds of pseudo-labels, each
    retraining the head from scratch on the training features plus the photos it is sure of (``training/adapt.py``)."""
    f = cfg.fit
    paths, skipped = readable(find_photos(cfg.data.adapt_to), workers=loaders.workers(cfg) or 1)
    manifest = Manifest(tuple(Record(p, classes[0]) for p in paths))  # the label is never read
    ds = loaders.dataset(manifest, classes, model.preprocessing, cfg)
    feats, _ = cached_features(
        model.backbone,
        model.preprocessing,
        {"adapt": ds},
        batch_size=batch,
        cache_file=run.cache / "adapt_features.pt",
        store=store,
        # this process alone (each DDP process pseudo-labels the photos itself), on its own GPU where it has one
        place=Placement(
            *(("gpu", [trainer.strategy.root_device.index or 0]) if gpu else ("cpu", 1)),
            workers=min(1, loaders.workers(cfg)),
        ),
    )
    photos = feats["adapt"][0]
    result = Adaptation(METHOD, cfg.data.adapt_to, len(paths), skipped, f.adapt_share)
    for r, share in enumerate(shares(f.adapt_share, f.adapt_rounds)):
        keep, labels = confident(model.head, photos, share)
        result.rounds.append(len(keep))
        result.per_class = {
            classes[c]: n for c, n in enumerate(torch.bincount(labels, minlength=len(classes)).tolist()) if n
        }
        log.info(
            "[adapt-%d] the surest %.0f%% of each class's photos: %d of %d, retraining the head with them",
            r + 1,
            100 * share,
            len(keep),
            len(photos),
        )
        data.extra = (photos[keep], labels)
        model.linear.reset_parameters()
        module = _module(model.head, cfg, targets, len(classes), f.lr, channels_last=False)
        phase = f"adapt-{r + 1}"
        trainer, ckpt = _trainer(cfg, run, phase, f.epochs, history, f.target_monitor == "train", progress=False)
        trainer = _run_phase(trainer, ckpt, module, data, run, phase, history)
    log.info("%s", result.text())
    return trainer, (result, data.extra[0], data.extra[1])


def _fit_images(
    model: FruitNet,
    splits: dict[str, Manifest],
    classes: list[str],
    cfg: TrainConfig,
    run: RunDir,
    history: list[HistoryRow],
    phase: str,
    *,
    train_blocks: int,
    lr: float,
    epochs: int,
) -> tuple[L.Trainer, bool]:
    """A phase on images with augmentation: the head alone, the top blocks (fine-tune), or everything (-1).
    Returns the trainer and whether the phase's weights were kept (not when validation loss got worse)."""
    pre, f = model.preprocessing, cfg.fit
    train_ds, val_ds = (loaders.dataset(splits[s], classes, pre, cfg) for s in ("train", "val"))
    train_dl = loaders.loader(train_ds, cfg, shuffle=True, balance=f.balance == "sampler")
    val_dl = loaders.loader(val_ds, cfg, shuffle=False)
    model.to(memory_format=torch.channels_last)
    module = _module(
        model,
        cfg,
        train_ds.targets,
        len(classes),
        lr,
        channels_last=True,
        batch_input=BatchInput(pre, cfg.augment, cfg.data.seed),
    )
    trainer, ckpt = _trainer(cfg, run, phase, epochs, history, f.target_monitor == "train", progress=True)
    if train_blocks >= 0:
        trainer.callbacks.append(FreezeBackbone(train_blocks))
    before = _val_loss(history)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    what = {0: "the head", -1: "all layers"}.get(train_blocks, f"the head and the top {train_blocks} blocks")
    log.info(
        "[%s] training %s on %d images (%d px, augmentation %s)",
        phase,
        what,
        len(train_ds),
        pre.image_size,
        "on" if cfg.augment.enabled else "off",
    )
    with STAGES(phase):
        _run_phase(trainer, ckpt, module, (train_dl, val_dl), run, phase, history)
    # a phase finished before a resume is not fitted again: its best value comes from its done file
    after = ckpt.best_model_score if ckpt.best_model_score is not None else _phase_best(run, phase)
    if before is not None and after is not None and float(after) > before:
        log.info(
            "[%s] did not improve the validation loss (%.4f vs %.4f): keeping the earlier weights",
            phase,
            float(after),
            before,
        )
        model.load_state_dict(state)
        return trainer, False
    return trainer, True


def _val_loss(history: list[HistoryRow]) -> float | None:
    losses = [r.val_loss for r in history if r.val_loss is not None]
    return min(losses) if losses else None

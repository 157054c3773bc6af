"""``train(cfg, out)``: data -> model -> phase 1 (head, on cached features) -> phase 2 (fine-tune) -> report."""
from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from fruitlens.config import TrainConfig
from fruitlens.data.dataset import class_weights, make_loader
from fruitlens.data.manifest import Manifest
from fruitlens.errors import FruitlensError, RunDirError
from fruitlens.models.registry import FruitNet, build_model, get_spec
from fruitlens.rundir import RunDir, save_model
from fruitlens.runtime import limit_heap_growth
from fruitlens.training import data as tdata
from fruitlens.training.augment import BatchInput
from fruitlens.training.callbacks import EpochSummary, FreezeBackbone, TargetAccuracy
from fruitlens.training.features import cached_features
from fruitlens.training.module import ClassifierModule

log = logging.getLogger(__name__)


class TrainingInterrupted(FruitlensError):
    """Ctrl-C during training: the run folder keeps the best model so far."""

    exit_code = 130


def train(cfg: TrainConfig, out: str | Path, *, resume: bool = False) -> RunDir:
    """Trains ``cfg`` into the run folder ``out`` and evaluates it on the test split."""
    run = RunDir(Path(out))
    t0 = time.perf_counter()
    limit_heap_growth()  # else large image batches fragment glibc's heaps (GiBs at 448 px)
    L.seed_everything(cfg.data.seed, workers=True, verbose=False)
    if resume:
        run.require("config.yaml", "manifest.csv", "facts.json")
        cfg = TrainConfig.from_yaml(run.config)
        manifest, facts = Manifest.from_csv(run.manifest), run.read_json("facts.json")
        log.info("resuming %s", run.path)
    else:
        if run.best_ckpt.exists():
            raise RunDirError(f"{run.path} already holds a trained run", f"pick another --out, or continue it "
                              f"with 'fruitlens train --resume {run.path}'")
        cfg = replace(cfg, data=replace(cfg.data, path=tdata.resolve_data_path(cfg.data.path))).validated()
        prepared = tdata.prepare(cfg)
        manifest, facts = prepared.manifest, prepared.facts
        if not cfg.model.img_size:
            size = tdata.auto_image_size(prepared.median_side)
            log.info("input size %d px, picked from the data (median shorter side %d px)", size, prepared.median_side)
            cfg = replace(cfg, model=replace(cfg.model, img_size=size))
        if not cfg.augment.crop_scale:
            cfg = replace(cfg, augment=replace(cfg.augment, crop_scale=tdata.auto_crop_scale(prepared.median_side)))
        if not cfg.fit.epochs:
            cfg = replace(cfg, fit=replace(cfg.fit, epochs=auto_epochs(cfg)))
        run.path.mkdir(parents=True, exist_ok=True)
        cfg.to_yaml(run.config)
        manifest.to_csv(run.manifest)
        run.write_json("facts.json", facts)
    classes = manifest.classes
    run.labels.write_text(json.dumps(classes, indent=2))
    model = build_model(cfg.model.name, len(classes), weights=cfg.model.weights, img_size=cfg.model.img_size,
                        dropout=cfg.model.dropout)
    pretrained = _pretrained(cfg)
    if cfg.model.weights == "none" and _has_pretrained_weights(cfg):
        log.warning("%s trains from scratch (--weights none): expect far lower accuracy than with ImageNet weights",
                    model.name)
    history: list[dict] = run.read_history() if resume else []
    splits = manifest.by_split()
    fit_t0 = time.perf_counter()
    try:
        if pretrained and cfg.fit.feature_cache:
            _fit_head_on_features(model, splits, classes, cfg, run, history)
        else:
            _fit_images(model, splits, classes, cfg, run, history, "head" if pretrained else "full",
                        train_blocks=0 if pretrained else -1, lr=cfg.fit.lr, epochs=cfg.fit.epochs)
        if pretrained and cfg.fit.fine_tune_blocks and not _target_reached(history, cfg):
            _fit_images(model, splits, classes, cfg, run, history, "fine-tune", train_blocks=cfg.fit.fine_tune_blocks,
                        lr=cfg.fit.fine_tune_lr, epochs=cfg.fit.fine_tune_epochs)
    except KeyboardInterrupt:
        _finish(run, model, classes, cfg, history, time.perf_counter() - fit_t0)
        raise TrainingInterrupted(f"training interrupted: {run.path} keeps the best model so far",
                                  f"continue with 'fruitlens train --resume {run.path}'") from None
    if not _is_rank_zero():
        return run
    _finish(run, model, classes, cfg, history, time.perf_counter() - fit_t0)
    _export_for_serving(run)
    from fruitlens.evaluation.report import evaluate_run

    evaluate_run(run, train_seconds=time.perf_counter() - t0)
    return run


HEAD_EPOCHS = 200  # a linear head on cached features: about 0.1 s an epoch; early stopping ends it (GroceryStore: 90-120)
IMAGE_EPOCHS = 30  # a phase on images: minutes an epoch on a CPU


def auto_epochs(cfg: TrainConfig) -> int:
    """Max epochs of the first phase where ``fit.epochs`` is 0.

    A head on cached features is cheap to train to convergence, and stopping it early costs accuracy on new photos:
    at 30 epochs GroceryStore's validation loss was still falling (0.21; 0.07 at convergence), and training on to
    early stopping gave 76.3% instead of 75.7% test accuracy (mean of 3 seeds) with better calibration (ECE 0.11
    instead of 0.14). Phases on images are minutes an epoch on a CPU, so they keep the original's 30.
    """
    return HEAD_EPOCHS if _pretrained(cfg) and cfg.fit.feature_cache else IMAGE_EPOCHS


def _has_pretrained_weights(cfg: TrainConfig) -> bool:
    """The model has ImageNet weights in torchvision (small_cnn has none)."""
    return get_spec(cfg.model.name).weights_enum is not None


def _pretrained(cfg: TrainConfig) -> bool:
    """Starts from pretrained weights, so that phase 1 trains the head alone (else the whole network trains)."""
    return cfg.model.weights != "none" and _has_pretrained_weights(cfg)


def _export_for_serving(run: RunDir) -> None:
    """Every run ships an ONNX model (parity-checked against PyTorch); evaluation then runs on ONNX Runtime."""
    from fruitlens.errors import ExportError
    from fruitlens.inference.export import export_run

    try:
        figures = export_run(run.path, bench=False)
        log.info("exported %s (top-1 agreement with PyTorch %.2f%%)", figures["onnx"],
                 100 * figures["parity"]["fp32"]["top1_agreement"])
    except ExportError as exc:
        log.warning("no ONNX export (%s); evaluation runs on PyTorch", exc.message)


def _is_rank_zero() -> bool:
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


def _target_reached(history: list[dict], cfg: TrainConfig) -> bool:
    key = "val_acc" if cfg.fit.target_monitor == "val" else "train_acc"
    return cfg.fit.target_acc > 0 and any((r.get(key) or 0) >= cfg.fit.target_acc for r in history)


def _finish(run: RunDir, model: FruitNet, classes: list[str], cfg: TrainConfig, history: list[dict],
            seconds: float) -> None:
    save_model(run.best_ckpt, model, classes, {"config": cfg.to_dict(), "fit_seconds": seconds})
    run.write_history(history)
    done = {"fit_seconds": round(seconds, 2), "torch": torch.__version__, "lightning": L.__version__,
            "python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    run.write_json("train_info.json", done)


def _trainer(cfg: TrainConfig, run: RunDir, phase: str, epochs: int, history: list[dict], monitor_train: bool,
             progress: bool) -> tuple[L.Trainer, ModelCheckpoint]:
    f = cfg.fit
    ckpt = ModelCheckpoint(dirpath=run.checkpoints / phase, filename="best", monitor="val/loss", mode="min",
                           enable_version_counter=False)
    # every epoch, for --resume (Lightning's save_last=True writes last.ckpt only when the best one improves)
    last = ModelCheckpoint(dirpath=run.checkpoints / phase, filename="last", monitor=None, save_top_k=1,
                           enable_version_counter=False)
    callbacks = [ckpt, last, EarlyStopping("val/loss", patience=f.early_stopping_patience, mode="min"),
                 LearningRateMonitor("epoch"), EpochSummary(phase, history)]
    if f.target_acc > 0:
        callbacks.append(TargetAccuracy(f.target_acc, "train/acc" if monitor_train else "val/acc"))
    precision = f.precision if f.precision != "auto" else ("16-mixed" if _use_gpu(cfg) else "32-true")
    devices: int | str = int(f.devices) if f.devices.isdigit() else f.devices
    limit = f.limit_batches if f.limit_batches <= 1 else int(f.limit_batches)
    trainer = L.Trainer(max_epochs=epochs, accelerator=f.accelerator, devices=devices, num_nodes=f.num_nodes,
                        strategy=f.strategy, precision=precision, deterministic=f.deterministic, callbacks=callbacks,
                        logger=CSVLogger(run.path, name="logs", version=phase), enable_model_summary=False,
                        # a bar only on a terminal: in a log file its redraws bury the one summary line per epoch
                        enable_progress_bar=progress and sys.stdout.isatty(), limit_train_batches=limit,
                        limit_val_batches=limit, num_sanity_val_steps=0, log_every_n_steps=10, default_root_dir=run.path)
    return trainer, ckpt


def _use_gpu(cfg: TrainConfig) -> bool:
    return torch.cuda.is_available() and cfg.fit.accelerator in ("auto", "gpu", "cuda")


def _run_phase(trainer: L.Trainer, ckpt: ModelCheckpoint, module: ClassifierModule, train_dl, val_dl,
               run: RunDir, phase: str) -> None:
    """Fits (resuming from the phase's last.ckpt if present) and loads the best weights back into the module."""
    done = run.checkpoints / phase / "done"
    last = run.checkpoints / phase / "last.ckpt"
    if done.exists():
        best = run.checkpoints / phase / "best.ckpt"
        module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
        log.info("[%s] already done; loaded its best weights", phase)
        return
    def load_best() -> None:
        if ckpt.best_model_path and Path(ckpt.best_model_path).is_file():
            state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=False)["state_dict"]
            module.load_state_dict(state)

    try:
        trainer.fit(module, train_dl, val_dl, ckpt_path=str(last) if last.exists() else None)
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
        done.write_text(f"best {ckpt.best_model_score}\n")


def _module(net, cfg: TrainConfig, targets: list[int], n_classes: int, lr: float, channels_last: bool,
            batch_input: BatchInput | None = None):
    f = cfg.fit
    weights = class_weights(targets, n_classes) if f.balance == "weights" else None
    return ClassifierModule(net, batch_input=batch_input, lr=lr, weight_decay=f.weight_decay,
                            label_smoothing=f.label_smoothing, class_weights=weights, plateau_patience=f.plateau_patience,
                            plateau_factor=f.plateau_factor, channels_last=channels_last)


def _fit_head_on_features(model: FruitNet, splits: dict[str, Manifest], classes: list[str], cfg: TrainConfig,
                          run: RunDir, history: list[dict]) -> None:
    """Phase 1 fast path: features of a clean view + ``feature_views`` augmented views, then the head alone."""
    pre, f = model.preprocessing, cfg.fit
    views = f.feature_views if cfg.augment.enabled else 0
    gpu = _use_gpu(cfg)
    # CPU: one decoding process keeps up with the backbone; more would only compete with it for the cores. 32 images
    # a batch at 96 px, fewer at larger sizes so that activations stay small (8 at 448 px). GPU: decoding is the
    # bottleneck (one process: 170 images/s at 448 px on an H200), so all workers, and larger batches
    batch = 64 if gpu else max(8, min(32, int(32 * (96 / pre.image_size) ** 2)))
    loaders = {split: make_loader(tdata.dataset(splits[split], classes, pre, cfg), batch_size=batch, shuffle=False,
                                  workers=tdata.workers(cfg) if gpu else min(1, tdata.workers(cfg)))
               for split in ("train", "val")}
    feats = cached_features(model.backbone, pre, loaders, views=views, aug=cfg.augment, seed=cfg.data.seed,
                            cache_file=run.path / "cache" / "features.pt", gpu=gpu)
    xs = [feats["train"][0]] + ([feats["train_aug"][0]] if "train_aug" in feats else [])
    ys = [feats["train"][1]] + ([feats["train_aug"][1]] if "train_aug" in feats else [])
    train_ds = TensorDataset(torch.cat(xs), torch.cat(ys))
    val_ds = TensorDataset(*feats["val"])
    gen = torch.Generator().manual_seed(cfg.data.seed)
    if f.balance == "sampler":
        from torch.utils.data import WeightedRandomSampler

        w = class_weights(train_ds.tensors[1].tolist(), len(classes))[train_ds.tensors[1]]
        train_dl = DataLoader(train_ds, batch_size=max(f.batch_size, 256),
                              sampler=WeightedRandomSampler(w.double(), len(train_ds), generator=gen))
    else:
        train_dl = DataLoader(train_ds, batch_size=max(f.batch_size, 256), shuffle=True, generator=gen)
    val_dl = DataLoader(val_ds, batch_size=1024)
    module = _module(model.head, cfg, train_ds.tensors[1].tolist(), len(classes), f.lr, channels_last=False)
    trainer, ckpt = _trainer(cfg, run, "head", f.epochs, history, f.target_monitor == "train", progress=False)
    log.info("[head] training the classifier head on %d cached feature vectors (%d classes)", len(train_ds), len(classes))
    _run_phase(trainer, ckpt, module, train_dl, val_dl, run, "head")


def _fit_images(model: FruitNet, splits: dict[str, Manifest], classes: list[str], cfg: TrainConfig, run: RunDir,
                history: list[dict], phase: str, *, train_blocks: int, lr: float, epochs: int) -> None:
    """A phase on images with augmentation: the head alone, the top blocks (fine-tune), or everything (-1)."""
    pre, f = model.preprocessing, cfg.fit
    train_ds, val_ds = (tdata.dataset(splits[s], classes, pre, cfg) for s in ("train", "val"))
    train_dl = tdata.loader(train_ds, cfg, shuffle=True, balance=f.balance == "sampler")
    val_dl = tdata.loader(val_ds, cfg, shuffle=False)
    model.to(memory_format=torch.channels_last)
    module = _module(model, cfg, train_ds.targets, len(classes), lr, channels_last=True,
                     batch_input=BatchInput(pre, cfg.augment, cfg.data.seed))
    trainer, ckpt = _trainer(cfg, run, phase, epochs, history, f.target_monitor == "train", progress=True)
    if train_blocks >= 0:
        trainer.callbacks.append(FreezeBackbone(train_blocks))
    before = _val_loss(history)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    what = {0: "the head", -1: "all layers"}.get(train_blocks, f"the head and the top {train_blocks} blocks")
    log.info("[%s] training %s on %d images (%d px, augmentation %s)", phase, what, len(train_ds), pre.image_size,
             "on" if cfg.augment.enabled else "off")
    _run_phase(trainer, ckpt, module, train_dl, val_dl, run, phase)
    after = ckpt.best_model_score
    if before is not None and after is not None and float(after) > before:
        log.info("[%s] did not improve the validation loss (%.4f vs %.4f): keeping the earlier weights",
                 phase, float(after), before)
        model.load_state_dict(state)


def _val_loss(history: list[dict]) -> float | None:
    losses = [r["val_loss"] for r in history if r.get("val_loss") is not None]
    return min(losses) if losses else None

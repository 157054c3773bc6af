"""``calibrate``: after fitting, the trust layer (``trust.py``) from the run's own features, folded into the model."""
from __future__ import annotations

import logging

import numpy as np
import torch

from fruitlens.config import TrainConfig
from fruitlens.data.dataset import make_loader
from fruitlens.data.manifest import Manifest
from fruitlens.models.ood import OODScorer
from fruitlens.models.registry import FruitNet
from fruitlens.rundir import RunDir
from fruitlens.training import loaders
from fruitlens.training.features import Engine, load_cache
from fruitlens.training.fit import FitResult, use_gpu
from fruitlens.training.heldout import HeadRecipe, visual_groups
from fruitlens.evaluation.trust import HeldOut, Trust, fit_on_validation, fit_out_of_fold

log = logging.getLogger(__name__)


def calibrate(model: FruitNet, splits: dict[str, Manifest], classes: list[str], cfg: TrainConfig, run: RunDir,
              fitted: FitResult) -> tuple[Trust, HeldOut]:
    """Fits the trust layer and folds it into ``model``: the head's weights divided by the temperature, the OOD
    scorer attached as ``model.ood``. Returns what was decided and how, and the held-out predictions of the train
    and val images (in that order)."""
    train, val = splits["train"], splits["val"]
    if fitted.backbone_frozen:
        x, y, augmented = _frozen_features(model, train, val, classes, cfg, run)
        near = np.array([r.group or f"i{i}" for i, r in enumerate(list(train) + list(val))])
        groupings = [("near copies", near)]
        if cfg.trust.groups == "visual":
            groupings.insert(0, ("similar images", visual_groups(near, x, y.numpy(), cfg.trust.images_per_group,
                                                                 cfg.data.seed)))
        trust, scorer, heldout = fit_out_of_fold(x, y, groupings, len(classes), _recipe(cfg, fitted.history, model),
                                                 cfg.trust.target_precision, augmented, cfg.trust.folds, cfg.data.seed)
    else:
        trust, scorer, heldout = _from_validation(model, train, val, classes, cfg)
    model.fold_temperature(trust.temperature)
    model.ood = scorer if fitted.adapted is None else scorer.extended(fitted.adapted)
    log.info("calibration: temperature %.2f from %d held-out images (%s); 'not sure' below %.2f (%.0f%% of held-out "
             "images answered at %.0f%% accuracy); 'unfamiliar' above ood_score %.3f; %.1fs", trust.temperature,
             trust.heldout_images, trust.source.split(",")[0], trust.unknown_threshold,
             100 * (trust.heldout_coverage or 0), 100 * trust.target_precision, trust.ood_threshold, trust.seconds)
    return trust, heldout


def _recipe(cfg: TrainConfig, history: list[dict], model: FruitNet) -> HeadRecipe:
    """The real head's recipe, for as many epochs as it trained until its best validation loss (and standardising
    the features where it does)."""
    rows = [r for r in history if r.get("phase") == "head" and r.get("val_loss") is not None]
    best = int(min(rows, key=lambda r: r["val_loss"])["epoch"]) if rows else cfg.fit.epochs
    f = cfg.fit
    return HeadRecipe(epochs=max(1, best), lr=f.lr, weight_decay=f.weight_decay, dropout=cfg.model.dropout,
                      label_smoothing=f.label_smoothing, batch_size=max(f.batch_size, 256),
                      balance=f.balance != "none", standardise=model.standardise.active)


def _frozen_features(model: FruitNet, train: Manifest, val: Manifest, classes: list[str], cfg: TrainConfig,
                     run: RunDir) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """Clean features of the train + val images (and the augmented views of train), from the feature cache when the
    head trained on it, else one pass of the frozen backbone."""
    cache = run.cache / "features.pt"
    if cfg.fit.feature_cache and cache.is_file():
        feats = load_cache(cache)[0]
        x = torch.cat([feats["train"][0], feats["val"][0]])
        y = torch.cat([feats["train"][1], feats["val"][1]]).long()
        aug = feats.get("train_aug")
        return x, y, (aug[0], aug[1].long(), aug[2].numpy()) if aug is not None and len(aug) == 3 else None
    (x_train, y_train), (x_val, y_val) = _features(model, [train, val], classes, cfg)
    return torch.cat([x_train, x_val]), torch.cat([y_train, y_val]), None


def _features(model: FruitNet, parts: list[Manifest], classes: list[str],
              cfg: TrainConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Clean features of each manifest in ``parts`` under the model's current backbone."""
    pre = model.preprocessing
    engine = Engine(model.backbone, pre.image_size, gpu=use_gpu(cfg))
    out = []
    for m in parts:
        dl = make_loader(loaders.dataset(m, classes, pre, cfg), shuffle=False, workers=min(1, loaders.workers(cfg)),
                         batch_size=max(8, min(32, int(32 * (96 / pre.image_size) ** 2))))
        xs, ys = [], []
        for x, y in dl:
            xs.append(engine(pre.normalise(x.to(engine.device))))
            ys.append(torch.as_tensor(y))
        out.append((torch.cat(xs), torch.cat(ys).long()))
    return out


def _from_validation(model: FruitNet, train: Manifest, val: Manifest, classes: list[str],
                     cfg: TrainConfig) -> tuple[Trust, OODScorer, HeldOut]:
    model.eval()
    (x_train, y_train), (x_val, y_val) = _features(model, [train, val], classes, cfg)
    with torch.inference_mode():
        logits = model.head(x_val).numpy()
    return fit_on_validation(logits, y_val.numpy(), x_train, y_train.numpy(), x_val, cfg.trust.target_precision,
                             cfg.data.seed)

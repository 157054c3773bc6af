"""``calibrate``: after fitting, the trust layer (``trust.py``) from the run's own features, folded into the model."""

from __future__ import annotations

import logging
import time
from collections import Counter

import numpy as np
import torch

from fruitlens.config import TrainConfig
from fruitlens.data.dataset import make_loader
from fruitlens.data.manifest import Manifest
from fruitlens.models.ood import OODScorer
from fruitlens.models.preprocessing import batch_for
from fruitlens.models.registry import FruitNet
from fruitlens.rundir import RunDir
from fruitlens.training import loaders
from fruitlens.training.engine import Engine
from fruitlens.training.features import load_cache
from fruitlens.training.fit import FitResult, use_gpu
from fruitlens.training.heldout import HeadRecipe, train_head, visual_groups
from fruitlens.evaluation.photos import PhotoNote, photo_note
from fruitlens.evaluation.trust import (
    MIN_PHOTOS,
    HeldOut,
    Trust,
    choose_folds,
    fit_on_photos,
    fit_on_validation,
    fit_out_of_fold,
)
from fruitlens.training.photos import PhotoRows, fit_with_photos, photo_cross_validation, similar_groups
from fruitlens.training.solver import LinearFit, Rows

log = logging.getLogger(__name__)


def calibrate(
    model: FruitNet,
    splits: dict[str, Manifest],
    classes: list[str],
    cfg: TrainConfig,
    run: RunDir,
    fitted: FitResult,
    photos: Manifest | None = None,
) -> tuple[Trust, HeldOut, PhotoNote | None]:
    """Fits the trust layer and folds it into ``model``: the head's weights divided by the temperature, the OOD
    scorer attached as ``model.ood``. Returns what was decided and how, the held-out predictions of the train
    and val images (in that order), and with ``photos`` (``--add``) the figures on them: then the head is refitted
    with them by the solver, and the trust layer comes from their cross-validation (``training/photos.py``)."""
    train, val = splits["train"], splits["val"]
    if fitted.backbone_frozen:
        x, y, augmented = _frozen_features(model, train, val, classes, cfg, run)
        recipe = _recipe(cfg, model)
        x_train = x.parts[0][0] if isinstance(x, Rows) else x[: len(train)]  # the cache's train rows, not a copy
        head = _refit(model, *_training_rows(x_train, y[: len(train)], augmented, fitted), recipe)
        near = np.array([r.group or f"i{i}" for i, r in enumerate(list(train) + list(val))])
        groupings = [("near copies", near)]
        if cfg.trust.groups == "visual":
            groupings.insert(
                0, ("similar images", visual_groups(near, x, y.numpy(), cfg.trust.images_per_group, cfg.data.seed))
            )
        trust, scorer, heldout = fit_out_of_fold(
            x,
            y,
            groupings,
            len(classes),
            recipe,
            cfg.trust.target_precision,
            augmented,
            cfg.trust.folds,
            cfg.data.seed,
            init=head,
        )
    else:
        trust, scorer, heldout = _from_validation(model, train, val, classes, cfg)
    note = None
    if photos is not None and len(photos) and fitted.backbone_frozen:
        trust, scorer, note = _with_photos(model, photos, classes, cfg, run, fitted, trust, scorer)
    model.fold_temperature(trust.temperature)
    model.ood = scorer if fitted.adapted is None else scorer.extended(fitted.adapted)
    log.info(
        "calibration: temperature %.2f from %d held-out images (%s); 'not sure' below %.2f (%.0f%% of held-out "
        "images answered at %.0f%% accuracy); 'unfamiliar' above ood_score %.3f; %.1fs",
        trust.temperature,
        trust.heldout_images,
        trust.source.split(",")[0],
        trust.unknown_threshold,
        100 * (trust.heldout_coverage or 0),
        100 * trust.target_precision,
        trust.ood_threshold,
        trust.seconds,
    )
    return trust, heldout, note


def _with_photos(
    model: FruitNet,
    photos: Manifest,
    classes: list[str],
    cfg: TrainConfig,
    run: RunDir,
    fitted: FitResult,
    trust: Trust,
    scorer: OODScorer,
) -> tuple[Trust, OODScorer, PhotoNote]:
    """The head refitted on the training rows and the labelled photos (the solver, from the head the epochs
    trained), the photos' cross-validation, and the trust layer from their held-out predictions where there are
    enough of them (else the training images' trust, with the photos in the nearest-neighbour bank)."""
    t0 = time.perf_counter()
    feats = load_cache(run.cache / "features.pt")[0]
    pf = load_cache(run.cache / "photo_features.pt")[0]
    studio = _training_rows(*feats["train"][:2], feats.get("train_aug"), fitted)
    aug = pf.get("photos_aug")
    x, y0 = pf["photos"][0], pf["photos"][1].long()
    views = (aug[0], aug[1].long(), aug[2]) if aug is not None else (x[:0], y0[:0], torch.zeros(0, dtype=torch.long))
    rows = PhotoRows(x, y0, *views, groups=np.zeros(len(x), dtype=np.int64))
    near = np.array([r.group or f"p{i}" for i, r in enumerate(photos)])
    y = rows.y.numpy()
    # folds of similar photos (a shelf, a session), else of near copies, else of single photos: whichever keeps most
    # photos' classes in the other folds
    similar = similar_groups(near, rows.x, y, cfg.data.seed)
    name, rows.groups, fold, held = choose_folds(
        y, [("similar photos", similar), ("near copies", near)], cfg.trust.folds, cfg.data.seed, "your photos"
    )
    lin = model.linear
    start = LinearFit(
        lin.weight.detach().clone(),
        lin.bias.detach().clone(),
        model.standardise.mean.clone(),
        model.standardise.std.clone(),
    )
    if not model.standardise.active:  # the solver's penalty needs comparable dimensions: standardised features
        model.standardise.set((studio[0] + Rows(rows.rows()[0])).mean_std())
    stats = (model.standardise.mean.clone(), model.standardise.std.clone())
    l2, share = cfg.fit.weight_decay, cfg.fit.photo_share
    head = fit_with_photos(studio, rows.rows(), len(classes), share, l2, stats, init=start)
    with torch.no_grad():
        lin.weight.copy_(head.weight)
        lin.bias.copy_(head.bias)
    note = PhotoNote(photos=len(y), groups=int(len(np.unique(rows.groups))))
    if held.any() and len(np.unique(fold)) >= 2:
        cv = photo_cross_validation(
            studio, rows, fold, len(classes), share=share, l2=l2, stats=stats, init=head, seed=cfg.data.seed
        )
        note = photo_note(
            y[held],
            rows.groups[held],
            cv.logits[held],
            [(s, n, z[held]) for s, n, z in cv.curve],
            cv.folds,
            grouping=name,
            photos=len(y),
        )
        if held.sum() >= MIN_PHOTOS:
            x_train = Rows(feats["train"][0], feats["val"][0])
            y_train = torch.cat([feats["train"][1], feats["val"][1]]).numpy()
            trust, scorer = fit_on_photos(
                cv.logits[held],
                y[held],
                rows.x[torch.from_numpy(held)],
                fold[held],
                x_train,
                y_train,
                cfg.trust.target_precision,
                cfg.data.seed,
                name,
            )
            note.calibrated_on_photos = True
    if not note.calibrated_on_photos:
        scorer = scorer.extended(rows.x)
        log.info(
            "your photos: %d of %d labelled photos could be held out (a class needs photos in two groups); %d "
            "are needed to set the thresholds on them: the training images set them, and the photos join the "
            "nearest-neighbour bank",
            int(held.sum()),
            len(y),
            MIN_PHOTOS,
        )
    note.per_class = dict(sorted(Counter(classes[i] for i in y.tolist()).items()))
    note.share = share
    note.seconds = round(time.perf_counter() - t0, 2)
    log.info("%s", note.text())
    return trust, scorer, note


def _training_rows(
    x: torch.Tensor, y: torch.Tensor, augmented: tuple | None, fitted: FitResult
) -> tuple[Rows, torch.Tensor]:
    """The rows the head trained on apart from the labelled photos: the train split's clean views (``x``, ``y``) and
    augmented views, and the pseudo-labelled photos of --adapt-to; read where they are (no copy of the cache)."""
    parts, ys = [x], [y.long()]
    if augmented is not None:
        parts.append(augmented[0])
        ys.append(augmented[1].long())
    if fitted.adapted is not None and fitted.adapted_labels is not None:
        parts.append(fitted.adapted)
        ys.append(fitted.adapted_labels.long())
    return Rows(*parts), torch.cat(ys)


def _recipe(cfg: TrainConfig, model: FruitNet) -> HeadRecipe:
    """The real head's objective: its weight decay as the L2 penalty, label smoothing, class weights, and the
    features standardised where the head standardises them."""
    f = cfg.fit
    stats = (model.standardise.mean.clone(), model.standardise.std.clone()) if model.standardise.active else None
    return HeadRecipe(
        weight_decay=f.weight_decay, label_smoothing=f.label_smoothing, balance=f.balance != "none", stats=stats
    )


def _refit(model: FruitNet, x: torch.Tensor, y: torch.Tensor, recipe: HeadRecipe) -> LinearFit:
    """The real head refitted by the solver on its training rows, started from the head the epochs trained (the
    same estimator as the out-of-fold heads, so that their logits are on its scale); written into ``model``."""
    lin = model.linear
    start = LinearFit(
        lin.weight.detach().clone(),
        lin.bias.detach().clone(),
        *(recipe.stats or (torch.zeros(lin.in_features), torch.ones(lin.in_features))),
    )
    head = train_head(x, y, lin.out_features, recipe, init=start)
    with torch.no_grad():
        lin.weight.copy_(head.weight)
        lin.bias.copy_(head.bias)
    return head


def _frozen_features(
    model: FruitNet, train: Manifest, val: Manifest, classes: list[str], cfg: TrainConfig, run: RunDir
) -> tuple[torch.Tensor | Rows, torch.Tensor, tuple | None]:
    """Clean features of the train + val images (and the augmented views of train), from the feature cache when the
    head trained on it, else one pass of the frozen backbone."""
    cache = run.cache / "features.pt"
    if cfg.fit.feature_cache and cache.is_file():
        feats = load_cache(cache)[0]
        x = Rows(feats["train"][0], feats["val"][0])  # read where they are: no copy of the memory-mapped cache
        y = torch.cat([feats["train"][1], feats["val"][1]]).long()
        aug = feats.get("train_aug")
        return x, y, (aug[0], aug[1].long(), aug[2].numpy()) if aug is not None and len(aug) == 3 else None
    (x_train, y_train), (x_val, y_val) = _features(model, [train, val], classes, cfg)
    return torch.cat([x_train, x_val]), torch.cat([y_train, y_val]), None


def _features(
    model: FruitNet, parts: list[Manifest], classes: list[str], cfg: TrainConfig
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Clean features of each manifest in ``parts`` under the model's current backbone."""
    pre = model.preprocessing
    engine = Engine(model.backbone, pre.image_size, gpu=use_gpu(cfg))
    out = []
    for m in parts:
        dl = make_loader(
            loaders.dataset(m, classes, pre, cfg),
            shuffle=False,
            workers=min(1, loaders.workers(cfg)),
            batch_size=batch_for(pre.image_size),
        )
        xs, ys = [], []
        for x, y in dl:
            xs.append(engine(pre.normalise(x.to(engine.device))))
            ys.append(torch.as_tensor(y))
        out.append((torch.cat(xs), torch.cat(ys).long()))
    return out


def _from_validation(
    model: FruitNet, train: Manifest, val: Manifest, classes: list[str], cfg: TrainConfig
) -> tuple[Trust, OODScorer, HeldOut]:
    model.eval()
    (x_train, y_train), (x_val, y_val) = _features(model, [train, val], classes, cfg)
    with torch.inference_mode():
        logits = model.head(x_val).numpy()
    return fit_on_validation(
        logits, y_val.numpy(), x_train, y_train.numpy(), x_val, cfg.trust.target_precision, cfg.data.seed
    )

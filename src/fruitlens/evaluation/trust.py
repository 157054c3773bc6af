"""The trust layer, fitted on held-out predictions that look like new photos: the temperature (folded into the
head), the "not sure" threshold for a target accuracy of the answered images, and the out-of-distribution scorer
with its threshold.

With a frozen pretrained backbone (the default) the held-out predictions are out-of-fold logits of k linear heads
on the cached features (``heldout.py``), with folds of whole groups of similar images. With a backbone that trained
on these images (small_cnn, fine-tuning) features of the training images say too little about new ones, so the
validation split's predictions are used, and the report says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from fruitlens.evaluation.selective import fit_temperature, nll, threshold_for_accuracy
from fruitlens.models.ood import OODScorer, bank_indices
from fruitlens.models.probs import softmax
from fruitlens.models.trust import Trust
from fruitlens.training.heldout import HeadRecipe, group_folds, out_of_fold_logits
from fruitlens.training.solver import LinearFit

log = logging.getLogger(__name__)

OOD_QUANTILE = 0.95  # "unfamiliar": more unusual than 95% of the held-out images of known classes


@dataclass
class HeldOut:
    """The held-out predictions themselves (for the label audit): logits of every image, and which rows count."""

    logits: np.ndarray
    labels: np.ndarray
    held: np.ndarray  # rows whose prediction was made without its image (and whose class the head knew)


def _ece(logits: np.ndarray, y: np.ndarray) -> float:
    from fruitlens.evaluation.metrics import calibration

    return calibration(y, softmax(logits)).ece


MIN_HELDOUT_SHARE = 0.5  # of the images, whose class the other folds have: else the groups are too coarse
MIN_GROUPS_PER_CLASS = 3  # fewer, and each fold holds out a large part of a class: its predictions say too little


def fit_out_of_fold(
    x: torch.Tensor,
    y: torch.Tensor,
    groupings: list[tuple[str, np.ndarray]],
    n_classes: int,
    recipe: HeadRecipe,
    target_precision: float,
    augmented: tuple[torch.Tensor, torch.Tensor, np.ndarray] | None = None,
    folds: int = 5,
    seed: int = 0,
    init: LinearFit | None = None,
) -> tuple[Trust, OODScorer, HeldOut]:
    """Trust from out-of-fold heads on features ``x`` (clean views of the train + val images) with labels ``y``;
    ``augmented`` = (features, labels, index of the image each view came from).

    ``groupings``: (name, group per image), coarsest first. An image counts as held out only where the other folds
    hold its class; when fewer than half the images do (a class of one group is one fold), the next, finer grouping
    is tried (also when there are fewer than ``MIN_GROUPS_PER_CLASS`` groups per class), and images one by one last of
    all (then the figures are optimistic, and ``source`` says so).
    """
    t0 = time.perf_counter()
    yy = y.numpy()
    name, groups, fold, held = choose_folds(yy, groupings, folds, seed)
    extra = None if augmented is None else (augmented[0], augmented[1], fold[augmented[2]])
    logits = out_of_fold_logits(x, y, fold, n_classes, recipe, extra, init)
    source = (
        f"out-of-fold predictions of {len(np.unique(fold))} linear heads (the real head's solver) on the frozen "
        f"backbone's features, "
        f"folds of whole groups of {name} ({len(np.unique(groups))} groups)"
    )
    if name == "single images":
        source += "; too few groups for grouped folds, so near copies may vouch for each other (optimistic)"
    trust, scorer = _fit(logits, yy, x, fold, held, np.arange(len(yy)), source, target_precision, seed)
    trust.heldout_groups = int(len(np.unique(groups)))
    trust.seconds = round(time.perf_counter() - t0, 2)
    return trust, scorer, HeldOut(logits, yy, held)


def choose_folds(
    y: np.ndarray, groupings: list[tuple[str, np.ndarray]], folds: int = 5, seed: int = 0, what: str = "calibration"
) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    """(name, groups, fold per image, held-out mask) of the coarsest of ``groupings`` whose folds hold out most
    images within a class that other folds know (and MIN_GROUPS_PER_CLASS groups per class); single images last."""
    for name, groups in groupings + [("single images", np.arange(len(y)))]:
        fold = group_folds(y, groups, folds, seed)
        held = class_seen_elsewhere(y, fold)
        per_class = len(np.unique(groups)) / max(1, len(np.unique(y)))
        if held.mean() >= MIN_HELDOUT_SHARE and per_class >= MIN_GROUPS_PER_CLASS:
            break
        log.info(
            "%s: %.1f groups of %s per class (%.0f%% of images in a class another fold knows): too coarse, "
            "trying finer groups",
            what,
            per_class,
            name,
            100 * held.mean(),
        )
    return name, groups, fold, held


def class_seen_elsewhere(y: np.ndarray, fold: np.ndarray) -> np.ndarray:
    """Mask of the images whose class appears in the other folds (their head could predict it)."""
    out = np.zeros(len(y), dtype=bool)
    for f in np.unique(fold):
        seen = set(np.unique(y[fold != f]).tolist())
        idx = np.flatnonzero(fold == f)
        out[idx] = np.isin(y[idx], list(seen))
    return out


def fit_on_validation(
    val_logits: np.ndarray,
    val_y: np.ndarray,
    train_x: torch.Tensor,
    train_y: np.ndarray,
    val_x: torch.Tensor,
    target_precision: float,
    seed: int = 0,
) -> tuple[Trust, OODScorer, HeldOut]:
    """Trust from the validation split's predictions (for backbones that trained on the training images); the
    nearest-neighbour bank holds training images."""
    t0 = time.perf_counter()
    x = torch.cat([train_x, val_x])
    fold = np.r_[np.zeros(len(train_x), int), np.ones(len(val_x), int)]
    logits = np.concatenate([np.zeros((len(train_x), val_logits.shape[1]), np.float32), val_logits])
    source = (
        "the validation split's predictions (the backbone trained on the training images: expect new photos "
        "to score lower than these)"
    )
    trust, scorer = _fit(
        logits, np.r_[train_y, val_y], x, fold, fold == 1, np.arange(len(train_x)), source, target_precision, seed
    )
    trust.seconds = round(time.perf_counter() - t0, 2)
    return trust, scorer, HeldOut(logits, np.r_[train_y, val_y], fold == 1)


MIN_PHOTOS = 20  # labelled photos of the setting from which the trust layer is fitted on them alone


def fit_on_photos(
    logits: np.ndarray,
    y: np.ndarray,
    x: torch.Tensor,
    fold: np.ndarray,
    studio_x: torch.Tensor,
    studio_y: np.ndarray,
    target_precision: float,
    seed: int = 0,
    grouping: str = "similar photos",
) -> tuple[Trust, OODScorer]:
    """Trust from the out-of-fold predictions of the user's labelled photos (``logits``, ``y``, features ``x``,
    ``fold``): they look like what the model will meet, and the studio shots do not. The nearest-neighbour bank
    holds a sample of the training images and every photo; a held-out photo's distance leaves out the photos of its
    own fold."""
    t0 = time.perf_counter()
    bank_rows = bank_indices(studio_y, seed=seed)
    all_x = torch.cat([studio_x[torch.from_numpy(bank_rows)].float(), x.float()])
    all_fold = np.r_[np.full(len(bank_rows), -1), fold]
    n_bank = len(bank_rows)
    source = (
        f"out-of-fold predictions of {len(y)} labelled photos of your setting "
        f"({len(np.unique(fold))} folds of {grouping})"
    )
    logits_all = np.concatenate([np.zeros((n_bank, logits.shape[1]), np.float32), logits])
    held = np.r_[np.zeros(n_bank, bool), np.ones(len(y), bool)]
    trust, scorer = _fit(
        logits_all,
        np.r_[np.asarray(studio_y)[bank_rows], y],
        all_x,
        all_fold,
        held,
        np.arange(len(all_x)),
        source,
        target_precision,
        seed,
        bank_all=True,
    )
    trust.heldout_groups = int(len(np.unique(fold)))
    trust.seconds = round(time.perf_counter() - t0, 2)
    return trust, scorer


def _fit(
    logits: np.ndarray,
    y: np.ndarray,
    x: torch.Tensor,
    fold: np.ndarray,
    held: np.ndarray,
    bank_rows: np.ndarray,
    source: str,
    target_precision: float,
    seed: int,
    bank_all: bool = False,
) -> tuple[Trust, OODScorer]:
    """Temperature, "not sure" threshold, OOD scorer and its threshold from the held-out rows of ``logits``;
    ``bank_all``: every one of ``bank_rows`` goes into the nearest-neighbour bank (else a sample per class)."""
    z, yy = logits[held], y[held]
    temperature = fit_temperature(z, yy)
    probs = softmax(z / temperature)
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == yy
    threshold = threshold_for_accuracy(conf, correct, target_precision)
    trust = Trust(
        temperature=temperature,
        source=source,
        heldout_images=int(held.sum()),
        heldout_accuracy=float(correct.mean()),
        heldout_ece_before=_ece(z, yy),
        heldout_ece_after=_ece(z / temperature, yy),
        heldout_nll_before=nll(z, yy),
        heldout_nll_after=nll(z / temperature, yy),
        target_precision=target_precision,
        unknown_threshold=threshold,
        heldout_coverage=float((conf >= threshold).mean()),
    )
    bank = bank_rows if bank_all else bank_rows[bank_indices(y[bank_rows], seed=seed)]
    doubt = 1 - conf
    distance = _heldout_distances(x, fold, bank, np.flatnonzero(held))
    scorer = OODScorer.fit(x[torch.from_numpy(bank)], doubt, distance)
    scores = scorer.combine(torch.from_numpy(doubt).float(), torch.from_numpy(distance)).numpy()
    trust.ood_threshold = float(np.quantile(scores, OOD_QUANTILE))
    trust.heldout_ood_flagged = float((scores > trust.ood_threshold).mean())
    trust.ood_rule = (
        f"ood_score above {trust.ood_threshold:.3f}: the {100 * OOD_QUANTILE:.0f}th percentile of the "
        f"scores of {int(held.sum())} held-out images of known classes"
    )
    return trust, scorer


def _heldout_distances(x: torch.Tensor, fold: np.ndarray, bank: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Cosine distance of each of ``rows`` to the nearest ``bank`` image of another fold: as far as a new photo of a
    known class is from the stored training images (a near copy in its own fold cannot be its neighbour). The rows
    are read a chunk at a time (``x`` may be the memory-mapped cache)."""
    b = torch.nn.functional.normalize(x[torch.from_numpy(bank)].float(), dim=1)
    bank_fold = torch.from_numpy(fold[bank])
    out = np.zeros(len(rows), np.float32)
    for start in range(0, len(rows), 1024):
        idx = rows[start : start + 1024]
        sim = torch.nn.functional.normalize(x[torch.from_numpy(idx)].float(), dim=1) @ b.T
        sim[torch.from_numpy(fold[idx]).unsqueeze(1) == bank_fold.unsqueeze(0)] = -1.0
        out[start : start + len(idx)] = (1 - sim.max(dim=1).values).numpy()
    return out

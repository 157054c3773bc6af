"""``train --add``: a few labelled photos of the user's setting, next to thousands of training images.

A handful of photos must count against thousands of studio shots: the photos' rows (their clean view and
``fit.photo_views`` augmented views) carry ``fit.photo_share`` of the head's training weight (0.3), whatever their
number. Measured on GroceryStore's photos with Fruits-360 (``benchmarks/bench_labels.py``): weighting the photos
gained on weighting them as one image each, and studio shots plus photos read photos of kinds with few labels better
than the photos alone.

The head then is the solution of the weighted, L2-penalised logistic regression (``training/solver.py``), started
from the head the epochs trained; the same solver, started from it, gives the out-of-fold heads of the photos'
cross-validation (``photo_cross_validation``): their held-out predictions are what the model will meet, so they set
the temperature and the thresholds, and estimate the accuracy on the user's photos with its learning curve.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fruitlens.training.heldout import visual_groups
from fruitlens.training.solver import LinearFit, Rows, fit_linear

log = logging.getLogger(__name__)

CURVE = (0.0, 0.25, 0.5, 1.0)  # shares of each fold's training photos for the learning curve (0: the data alone)
CV_STUDIO_ROWS = 20_000  # studio rows each out-of-fold head trains on (a stratified sample): seconds, not minutes


def photo_repeats(studio_rows: int, photo_rows: int, share: float) -> int:
    """How often the photos' rows are repeated in an epoch so that they carry about ``share`` of the rows."""
    if not photo_rows:
        return 0
    return max(1, round(share / (1 - share) * studio_rows / photo_rows))


def row_weights(studio_rows: int, photo_rows: int, share: float) -> torch.Tensor:
    """A weight per row, studio rows first: the photos' rows carry ``share`` of the total (all of it without
    studio rows)."""
    if not studio_rows or not photo_rows:
        return torch.ones(studio_rows + photo_rows)
    per_photo = share / (1 - share) * studio_rows / photo_rows
    return torch.cat([torch.ones(studio_rows), torch.full((photo_rows,), per_photo)])


@dataclass
class PhotoRows:
    """The labelled photos' features: the clean view of each (``x``, ``y``), their augmented views (``aug_x``,
    ``aug_y``, ``aug_img``: the photo each came from) and a group per photo (near copies, similar photos)."""

    x: torch.Tensor
    y: torch.Tensor
    aug_x: torch.Tensor
    aug_y: torch.Tensor
    aug_img: torch.Tensor
    groups: np.ndarray

    def rows(self, photos: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and augmented rows of the photos at ``photos`` (all where None)."""
        if photos is None:
            return torch.cat([self.x, self.aug_x]).float(), torch.cat([self.y, self.aug_y])
        keep = torch.from_numpy(np.isin(self.aug_img.numpy(), photos))
        idx = torch.from_numpy(photos)
        return torch.cat([self.x[idx], self.aug_x[keep]]).float(), torch.cat([self.y[idx], self.aug_y[keep]])


def fit_with_photos(
    studio: tuple[torch.Tensor | Rows, torch.Tensor],
    photos: tuple[torch.Tensor, torch.Tensor],
    n_classes: int,
    share: float,
    l2: float,
    stats: tuple[torch.Tensor, torch.Tensor],
    init: LinearFit | None = None,
) -> LinearFit:
    """The head on the studio rows and the photos' rows, the photos carrying ``share`` of the weight."""
    (xs, ys), (xp, yp) = studio, photos
    rows = (xs if isinstance(xs, Rows) else Rows(xs)) + Rows(xp)
    return fit_linear(
        rows,
        torch.cat([ys.long(), yp.long()]),
        n_classes,
        weight=row_weights(len(ys), len(xp), share),
        l2=l2,
        init=init,
        stats=stats,
    )


@dataclass
class PhotoCV:
    """The photos' out-of-fold predictions: logits of every photo from a head that never saw its group, and the
    learning curve (the same, with a share of each fold's training photos)."""

    logits: np.ndarray  # (photos, classes), with all of each fold's training photos
    folds: int = 0
    groups: int = 0
    curve: list[tuple[float, float, np.ndarray]] = field(default_factory=list)  # (share, photos trained, logits)
    seconds: float = 0.0


def similar_groups(near_copies: np.ndarray, x: torch.Tensor, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """Groups of similar photos (near copies joined with clusters of about eight photos of a class: the same shelf,
    the same session), so that a photo's neighbours cannot vouch for it in cross-validation. Photos of one session
    look alike, and folds of near copies alone overstate: on GroceryStore's photos by about 10 points."""
    return visual_groups(near_copies, x, y, images_per_group=8, seed=seed)


def _sample(y: torch.Tensor, limit: int, seed: int) -> torch.Tensor:
    """Indices of at most ``limit`` rows, spread over the classes as they are."""
    if len(y) <= limit:
        return torch.arange(len(y))
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(len(y), generator=g)[:limit]).values


def photo_cross_validation(
    studio: tuple[torch.Tensor | Rows, torch.Tensor],
    photos: PhotoRows,
    fold: np.ndarray,
    n_classes: int,
    *,
    share: float,
    l2: float,
    stats: tuple[torch.Tensor, torch.Tensor],
    init: LinearFit,
    curve: tuple[float, ...] = CURVE,
    seed: int = 0,
) -> PhotoCV:
    """Out-of-fold logits of every photo (``fold``: a fold per photo, whole groups), each head trained on the studio
    rows and the photos of the other folds (as the real head, started from it). ``curve``: shares of the other
    folds' photos (whole groups, the same draw for every share) for the learning curve; 0 means the studio rows
    alone."""
    t0 = time.perf_counter()
    keep = _sample(studio[1], CV_STUDIO_ROWS, seed)
    xs = studio[0].take(keep) if isinstance(studio[0], Rows) else studio[0][keep].float()
    ys = studio[1][keep].long()
    rng = np.random.default_rng(seed)
    n = len(photos.y)
    logits = {s: np.zeros((n, n_classes), dtype=np.float32) for s in set(curve) | {1.0}}
    trained: dict[float, list[int]] = {s: [] for s in logits}
    base = None
    for f in np.unique(fold):
        held = np.flatnonzero(fold == f)
        others = np.flatnonzero(fold != f)
        order = rng.permutation(np.unique(photos.groups[others]))  # groups in a random order, kept for every share
        for s in sorted(logits):
            if s == 0.0:
                base = base or fit_linear(xs, ys, n_classes, l2=l2, init=init, stats=stats)
                head, part = base, np.zeros(0, dtype=int)
            else:
                chosen = order[: max(1, int(round(s * len(order))))]
                part = others[np.isin(photos.groups[others], chosen)]
                head = fit_with_photos((xs, ys), photos.rows(part), n_classes, share, l2, stats, init)
            with torch.inference_mode():
                logits[s][held] = head(photos.x[torch.from_numpy(held)].float()).numpy()
            trained[s].append(len(part))
    out = PhotoCV(logits[1.0], int(len(np.unique(fold))), int(len(np.unique(photos.groups))))
    out.curve = [(s, float(np.mean(trained[s])), logits[s]) for s in sorted(logits)]
    out.seconds = round(time.perf_counter() - t0, 2)
    log.info(
        "your photos: out-of-fold predictions of %d photos over %d folds (%d groups) in %.1fs",
        n,
        out.folds,
        out.groups,
        out.seconds,
    )
    return out

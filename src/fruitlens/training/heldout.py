"""Held-out predictions that look like new photos: out-of-fold logits of k linear heads on the cached features.

Each head trains on k-1 folds with the recipe of the real head (Adam, weight decay, dropout, label smoothing, the
same number of epochs) and predicts the fold it never saw. Folds are whole groups of similar images, so that a near
copy (or a photo of the same shelf in the same session) cannot vouch for its neighbour. The calibration temperature,
the "not sure" threshold, the out-of-distribution threshold and the label audit are all chosen on these predictions.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fruitlens.models.registry import Standardise

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadRecipe:
    """How the real head trained, so that the fold heads give logits on the same scale."""

    epochs: int = 30
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dropout: float = 0.2
    label_smoothing: float = 0.0
    batch_size: int = 256
    balance: bool = False  # inverse-frequency class weights in the loss
    standardise: bool = False  # the features standardised on the head's training rows first (mid-layer features)


def train_head(x: torch.Tensor, y: torch.Tensor, n_classes: int, recipe: HeadRecipe, seed: int = 0) -> nn.Module:
    """Dropout + Linear trained on features ``x`` (n, d) with labels ``y`` (n,), after a ``Standardise`` fitted on
    ``x`` where the recipe says so (the identity otherwise)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Sequential(Standardise(x.shape[1]), nn.Dropout(recipe.dropout), nn.Linear(x.shape[1], n_classes))
    if recipe.standardise:
        head[0].fit(x)
    opt = torch.optim.Adam(head.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    weight = None
    if recipe.balance:
        counts = torch.bincount(y, minlength=n_classes).float()
        weight = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    loss_fn = nn.CrossEntropyLoss(weight=weight, label_smoothing=recipe.label_smoothing)
    head.train()
    for _ in range(max(1, recipe.epochs)):
        for idx in torch.randperm(len(x), generator=g).split(recipe.batch_size):
            opt.zero_grad(set_to_none=True)
            loss_fn(head(x[idx]), y[idx]).backward()
            opt.step()
    return head.eval()


def group_folds(y: np.ndarray, groups: np.ndarray, k: int = 5, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) of each item: whole groups per fold, classes spread evenly (StratifiedGroupKFold).
    One group (a near copy filed under two classes can join every image into one) gives one fold: no image in it
    has a class that another fold knows, so callers fall back to finer groups."""
    from sklearn.model_selection import StratifiedGroupKFold

    y, groups = np.asarray(y), np.asarray(groups)
    n_groups = len(np.unique(groups))
    folds = np.zeros(len(y), dtype=int)
    if n_groups < 2:
        return folds
    k = max(2, min(k, n_groups))
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():  # "the least populated class has only N members": expected for tiny classes
            warnings.simplefilter("ignore")
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
            for i, (_, test) in enumerate(splitter.split(np.zeros(len(y)), y, groups)):
                folds[test] = i
    return folds


def out_of_fold_logits(x: torch.Tensor, y: torch.Tensor, folds: np.ndarray, n_classes: int, recipe: HeadRecipe,
                       extra: tuple[torch.Tensor, torch.Tensor, np.ndarray] | None = None,
                       seed: int = 0) -> np.ndarray:
    """(n, classes) logits of each of ``x``'s items from the head that did not train on its fold.

    ``extra``: more training rows (augmented views) with the fold of the image each came from; they train the heads
    of the other folds and are never predicted.
    """
    t0 = time.perf_counter()
    out = np.zeros((len(x), n_classes), dtype=np.float32)
    for f in np.unique(folds):
        held = torch.from_numpy(folds == f)
        xs, ys = [x[~held]], [y[~held]]
        if extra is not None:
            keep = torch.from_numpy(extra[2] != f)
            xs.append(extra[0][keep])
            ys.append(extra[1][keep])
        head = train_head(torch.cat(xs), torch.cat(ys), n_classes, recipe, seed + int(f))
        with torch.inference_mode():
            out[held.numpy()] = head(x[held]).numpy()
    log.debug("out-of-fold logits of %d images over %d folds in %.1fs", len(x), len(np.unique(folds)),
              time.perf_counter() - t0)
    return out


KMEANS_DIMS = 64


def visual_groups(near_duplicate_groups: np.ndarray, x: torch.Tensor, y: np.ndarray, images_per_group: int = 8,
                  seed: int = 0) -> np.ndarray:
    """Groups of similar images, coarser than near copies: within each class, k-means clusters of about
    ``images_per_group`` images in feature space (photos of one display, one session), joined with the near-duplicate
    groups (frames of one fruit turning) into connected components. Held-out folds of these groups predict new photos
    better than folds of near copies alone (GroceryStore: the temperature from near-copy folds made its test photos'
    calibration worse; see ``benchmarks/RESULTS.md``)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from sklearn.cluster import KMeans

    y = np.asarray(y)
    z = torch.nn.functional.normalize(x.float(), dim=1).numpy()
    if z.shape[1] > KMEANS_DIMS and len(z) > KMEANS_DIMS:
        # k-means costs images x clusters x dimensions, and the clusters grow with the images: on 64 principal
        # components instead of 1,280 features it stays seconds at 100k images (Fruits-360, 12.6k images: 5.7 s -> 2.1 s)
        from sklearn.decomposition import PCA

        z = PCA(KMEANS_DIMS, svd_solver="randomized", random_state=seed).fit_transform(z)
    cluster = np.zeros(len(y), dtype=np.int64)
    base = 0
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = max(1, min(len(idx), round(len(idx) / images_per_group)))
        cluster[idx] = base + (KMeans(k, n_init=2, random_state=seed).fit_predict(z[idx]) if k > 1 else 0)
        base += k
    _, near = np.unique(np.asarray(near_duplicate_groups).astype(str), return_inverse=True)
    # a bipartite graph: image nodes 0..n-1, near-duplicate group nodes, cluster nodes; components = joined groups
    n, g = len(y), near.max() + 1
    rows = np.r_[np.arange(n), np.arange(n)]
    cols = np.r_[n + near, n + g + cluster]
    graph = coo_matrix((np.ones(len(rows), dtype=np.int8), (rows, cols)), shape=(n + g + base, n + g + base))
    return connected_components(graph, directed=False)[1][:n]

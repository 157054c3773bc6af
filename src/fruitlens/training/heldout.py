"""Held-out predictions that look like new photos: out-of-fold logits of k linear heads on the cached features.

Each head is the real head's estimator on k-1 folds: the weighted, L2-penalised logistic regression that
``training/solver.py`` solves (the real head is refitted by the same solver after its epochs), started from the real
head, so that its logits are on the real head's scale. It predicts the fold it never saw. Folds are whole groups of
similar images, so that a near copy (or a photo of the same shelf in the same session) cannot vouch for its
neighbour. The calibration temperature, the "not sure" threshold, the out-of-distribution threshold and the label
audit are all chosen on these predictions. A solver, not epochs: five heads on Fruits-360's 44,000 cached vectors
take seconds, not a minute.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from fruitlens.data.dataset import class_weights
from fruitlens.training.solver import CHUNK, LinearFit, Rows, fit_linear

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeadRecipe:
    """The linear head's objective: its L2 penalty (the head's weight decay), label smoothing, class weights, and
    the features' standardisation (the real head's, where it standardises: mid-layer features)."""

    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    balance: bool = False  # inverse-frequency class weights in the loss
    stats: tuple[torch.Tensor, torch.Tensor] | None = None  # mean, std; None: the features as they are


def train_head(
    x: torch.Tensor | Rows, y: torch.Tensor, n_classes: int, recipe: HeadRecipe, init: LinearFit | None = None
) -> LinearFit:
    """The recipe's linear head on features ``x`` (n, d; or ``Rows``) with labels ``y`` (n,), started from ``init``."""
    y = y.long()
    dim = x.dim if isinstance(x, Rows) else x.shape[1]
    stats = recipe.stats if recipe.stats is not None else (torch.zeros(dim), torch.ones(dim))
    return fit_linear(
        x,
        y,
        n_classes,
        weight=class_weights(y, n_classes)[y] if recipe.balance else None,
        l2=recipe.weight_decay,
        init=init,
        stats=stats,
        label_smoothing=recipe.label_smoothing,
    )


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


def out_of_fold_logits(
    x: torch.Tensor,
    y: torch.Tensor,
    folds: np.ndarray,
    n_classes: int,
    recipe: HeadRecipe,
    extra: tuple[torch.Tensor, torch.Tensor, np.ndarray] | None = None,
    init: LinearFit | None = None,
) -> np.ndarray:
    """(n, classes) logits of each of ``x``'s items from the head that did not train on its fold.

    ``extra``: more training rows (augmented views) with the fold of the image each came from; they train the heads
    of the other folds and are never predicted. ``init``: the real head, where each fold's head starts.
    """
    t0 = time.perf_counter()
    out = np.zeros((len(x), n_classes), dtype=np.float32)
    for f in np.unique(folds):
        held = np.flatnonzero(folds == f)
        train = torch.from_numpy(np.flatnonzero(folds != f))
        parts, ys = [(x, train)], [y[train]]
        if extra is not None:  # the rows are read where they are (the memory-mapped cache), not copied
            keep = torch.from_numpy(np.flatnonzero(extra[2] != f))
            parts.append((extra[0], keep))
            ys.append(extra[1][keep])
        head = train_head(Rows(*parts), torch.cat(ys), n_classes, recipe, init)
        with torch.inference_mode():
            for s in range(0, len(held), CHUNK):
                rows = torch.from_numpy(held[s : s + CHUNK])
                out[held[s : s + CHUNK]] = head(x[rows].float()).numpy()
    log.debug(
        "out-of-fold logits of %d images over %d folds in %.1fs",
        len(x),
        len(np.unique(folds)),
        time.perf_counter() - t0,
    )
    return out


KMEANS_DIMS = 64
PCA_SAMPLE = 20_000  # rows the principal components are fitted on


def _projected(x: torch.Tensor, seed: int) -> np.ndarray:
    """The L2-normalised features on their ``KMEANS_DIMS`` principal components (fitted on a sample, applied a
    chunk at a time: no full copy of the features). k-means costs images x clusters x dimensions, and the clusters
    grow with the images: on 64 components instead of 1,280 features it stays seconds at 100k images (Fruits-360,
    12.6k images: 5.7 s -> 2.1 s)."""
    norm = lambda rows: torch.nn.functional.normalize(rows.float(), dim=1).numpy()
    if x.shape[1] <= KMEANS_DIMS or len(x) <= KMEANS_DIMS:
        return norm(x[0 : len(x)])
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(len(x), min(len(x), PCA_SAMPLE), replace=False))
    pca = PCA(KMEANS_DIMS, svd_solver="randomized", random_state=seed).fit(norm(x[torch.from_numpy(sample)]))
    return np.concatenate([pca.transform(norm(x[s : s + 16_384])) for s in range(0, len(x), 16_384)])


def visual_groups(
    near_duplicate_groups: np.ndarray, x: torch.Tensor, y: np.ndarray, images_per_group: int = 8, seed: int = 0
) -> np.ndarray:
    """Groups of similar images, coarser than near copies: within each class, k-means clusters of about
    ``images_per_group`` images in feature space (photos of one display, one session), joined with the near-duplicate
    groups (frames of one fruit turning) into connected components. Held-out folds of these groups predict new photos
    better than folds of near copies alone (GroceryStore: the temperature from near-copy folds made its test photos'
    calibration worse; see ``benchmarks/RESULTS.md``)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from sklearn.cluster import KMeans

    y = np.asarray(y)
    z = _projected(x, seed)
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

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


def train_head(x: torch.Tensor, y: torch.Tensor, n_classes: int, recipe: HeadRecipe, seed: int = 0) -> nn.Module:
    """Dropout + Linear trained on features ``x`` (n, d) with labels ``y`` (n,)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Dropout(recipe.dropout), nn.Linear(x.shape[1], n_classes))
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
    """Fold index (0..k-1) of each item: whole groups per fold, classes spread evenly (StratifiedGroupKFold)."""
    from sklearn.model_selection import StratifiedGroupKFold

    y, groups = np.asarray(y), np.asarray(groups)
    n_groups = len(np.unique(groups))
    k = max(2, min(k, n_groups))
    folds = np.zeros(len(y), dtype=int)
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

    The k heads train together, as one (k, d, classes) weight: every minibatch goes through all of them, and head f's
    loss leaves out the rows of fold f. Adam, weight decay and dropout act on each head's own weights as if it trained
    alone (each head's loss is the mean over its own rows), in one pass over the data per epoch instead of k (on a
    Fruits-360 run the calibration stage went from about 23 s to a few).
    """
    t0 = time.perf_counter()
    ids = np.unique(folds)
    k = len(ids)
    xs, ys, fs = [x], [y], [folds]
    if extra is not None:
        xs.append(extra[0])
        ys.append(extra[1])
        fs.append(extra[2])
    xa, ya = torch.cat(xs).float(), torch.cat(ys).long()
    fa = torch.from_numpy(np.searchsorted(ids, np.concatenate(fs)))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    d = xa.shape[1]
    bound = 1 / d ** 0.5  # nn.Linear's initialisation
    weight = nn.Parameter(torch.empty(k, d, n_classes).uniform_(-bound, bound, generator=g))
    bias = nn.Parameter(torch.empty(k, 1, n_classes).uniform_(-bound, bound, generator=g))
    opt = torch.optim.Adam([weight, bias], lr=recipe.lr, weight_decay=recipe.weight_decay)
    heads = torch.arange(k).view(k, 1)
    class_w = torch.ones(k, n_classes)
    if recipe.balance:  # inverse-frequency weights of each head's own training rows
        for f in range(k):
            counts = torch.bincount(ya[fa != f], minlength=n_classes).float()
            class_w[f] = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))
    batch = max(1, round(recipe.batch_size * k / max(1, k - 1)))  # each head sees about recipe.batch_size rows a step
    for _ in range(max(1, recipe.epochs)):
        for idx in torch.randperm(len(xa), generator=g).split(batch):
            xb, yb = xa[idx], ya[idx]
            keep = (fa[idx].view(1, -1) != heads).float()  # (k, b): head f never trains on fold f
            h = nn.functional.dropout(xb.expand(k, -1, -1), recipe.dropout, training=True)
            logits = torch.baddbmm(bias, h, weight)  # (k, b, classes)
            loss = nn.functional.cross_entropy(logits.reshape(-1, n_classes), yb.repeat(k), reduction="none",
                                               label_smoothing=recipe.label_smoothing).view(k, -1)
            w = keep * class_w[:, yb]
            opt.zero_grad(set_to_none=True)
            ((loss * w).sum(1) / w.sum(1).clamp(min=1e-12)).sum().backward()
            opt.step()
    out = np.zeros((len(x), n_classes), dtype=np.float32)
    with torch.inference_mode():
        for f, fold_id in enumerate(ids):
            held = torch.from_numpy(folds == fold_id)
            out[held.numpy()] = (x[held].float() @ weight[f] + bias[f]).numpy()
    log.debug("out-of-fold logits of %d images over %d folds in %.1fs", len(x), k, time.perf_counter() - t0)
    return out


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

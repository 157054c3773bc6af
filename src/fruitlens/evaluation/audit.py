"""Which labels look wrong: confident learning (Northcutt, Jiang & Chuang, JAIR 2021) on out-of-sample probabilities.

Written here, small and tested, because cleanlab (the reference implementation) is AGPL-3.0. The steps:
1. per-class thresholds t_j: the mean predicted probability of class j over the images labelled j (self-confidence);
2. the confident joint C[i, j]: images labelled i whose probability of j reaches t_j, counted under the most probable
   such class j; calibrated so that each row sums to the number of images labelled i;
3. pruning by noise rate: for each off-diagonal cell (i, j), the round(C[i, j]) images labelled i with the largest
   margin p_j - p_i are label issues;
4. ranking by normalised margin: ``score`` = max_{j != i} p_j - p_i, mapped to [0, 1] (higher = more likely wrong).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LabelIssue:
    """One image whose given label looks wrong."""

    index: int  # row of the probabilities
    label: int  # the given label
    suggested: int  # the most probable other class
    p_label: float
    p_suggested: float
    score: float  # in [0, 1]: (1 + max_{j != label} p_j - p_label) / 2, higher = more likely wrong
    rank: int = 0


def thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class self-confidence thresholds t_j (classes without images get 1: nothing reaches them)."""
    k = probs.shape[1]
    return np.array([probs[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(k)])


def confident_joint(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated confident joint C (k, k), the class each image was counted under or -1)."""
    k = probs.shape[1]
    t = thresholds(probs, labels)
    above = probs >= t[None, :] - 1e-12
    masked = np.where(above, probs, -np.inf)
    counted = np.where(above.any(axis=1), masked.argmax(axis=1), -1)
    raw = np.zeros((k, k))
    for i, j in zip(labels[counted >= 0], counted[counted >= 0]):
        raw[i, j] += 1
    sizes = np.bincount(labels, minlength=k).astype(float)
    rows = raw.sum(axis=1, keepdims=True)
    calibrated = np.divide(raw * sizes[:, None], rows, out=np.zeros_like(raw), where=rows > 0)
    return calibrated, counted


def margins(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max_{j != label} p_j - p_label, that j) per image."""
    others = probs.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    best_other = others.argmax(axis=1)
    return probs[np.arange(len(labels)), best_other] - probs[np.arange(len(labels)), labels], best_other


def find_label_issues(probs: np.ndarray, labels: np.ndarray) -> list[LabelIssue]:
    """The label issues found by pruning the confident joint by noise rate, most suspect first."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels, dtype=int)
    if len(labels) == 0:
        return []
    cj, _ = confident_joint(probs, labels)
    k = probs.shape[1]
    flagged = np.zeros(len(labels), dtype=bool)
    for i in range(k):
        members = np.flatnonzero(labels == i)
        for j in range(k):
            n = int(round(cj[i, j]))
            if i == j or n == 0 or len(members) == 0:
                continue
            margin = probs[members, j] - probs[members, i]  # how much more the image looks like j than like i
            flagged[members[np.argsort(-margin, kind="stable")[:n]]] = True
    m, other = margins(probs, labels)
    issues = [LabelIssue(int(x), int(labels[x]), int(other[x]), float(probs[x, labels[x]]), float(probs[x, other[x]]),
                         float((1 + m[x]) / 2)) for x in np.flatnonzero(flagged)]
    issues.sort(key=lambda it: -it.score)
    for r, it in enumerate(issues, start=1):
        it.rank = r
    return issues


def rank_all(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices of every image, most suspect first (by normalised margin): the top-N list beyond the pruned cut."""
    m, _ = margins(np.asarray(probs, dtype=float), np.asarray(labels, dtype=int))
    return np.argsort(-m, kind="stable")


def flag_with_thresholds(probs: np.ndarray, labels: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For images outside the audited set (a test split): (mask of those that look mislabelled, the suggested class).

    The confident joint's rule with thresholds ``t`` from the audited images: counted under another class j (the most
    probable class whose probability reaches t_j) that is also more probable than the given label.
    """
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels, dtype=int)
    above = probs >= np.asarray(t)[None, :] - 1e-12
    counted = np.where(above, probs, -np.inf).argmax(axis=1)
    rows = np.arange(len(labels))
    flagged = above.any(axis=1) & (counted != labels) & (probs[rows, counted] > probs[rows, labels])
    return flagged, counted

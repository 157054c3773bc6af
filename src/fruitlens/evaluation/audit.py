"""Which labels look wrong, told apart from classes that look alike.

Out-of-sample (held-out) probabilities alone cannot tell "this image is mislabelled" from "these two kinds look
alike": on Fruits-360 a held-out fruit of Apple Red 1 is read as a peach in all its frames, and a list of every such
frame (an earlier rule, confident learning after Northcutt et al. 2021) named 9% of a clean data set. So the audit
makes two findings:

- **Images that look mislabelled**: an image whose given label is contradicted by evidence about that image.
  - Its near copies (frames of the same fruit, the same shot saved twice) mostly carry another label; where only one
    or two copies say so, the heads that never saw its group must side with them too.
  - An image without copies: the heads that never saw it give its label a calibrated probability of at most
    ``ALPHA`` (5%), and the class they suggest more than half (``SURE``).
  An image whose copies carry its label is never listed alone: if its whole group reads as another class, that is a
  finding about the classes.
- **Classes that look alike**: class pairs whose held-out images the heads confuse, with the share confused and
  examples. Useful to know, and not a label error.

The listed images' calibrated probabilities also say how many of them are likely right as labelled: the expected
precision (one minus their mean probability of the given label) is printed with the count.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

ALPHA = 0.05  # an image without copies is listed when its given label's held-out probability is at most this
SURE = 0.5  # ... and the class the heads suggest for it has more than this
STRONG_COPIES = 3  # copies under another label that outvote the heads (fewer: the heads must agree)
LOOKALIKE_SHARE = 0.02  # of a pair's held-out images read as the other class, for the pair to count as look-alike
LOOKALIKE_IMAGES = 3  # and at least this many images
LOOKALIKE_EXAMPLES = 4  # examples each way


@dataclass
class LabelIssue:
    """One image whose given label looks wrong, and the evidence."""

    index: int  # row of the probabilities
    label: int  # the given label
    suggested: int
    p_label: float | None
    p_suggested: float | None
    score: float  # in [0, 1], higher = more likely wrong
    kind: str = "label"  # "conflict": its near copies carry another label; "label": the held-out heads alone
    evidence: str = ""
    rank: int = 0


@dataclass
class LookAlike:
    """Two classes the held-out heads confuse: how many images of each were read as the other, with examples."""

    a: int
    b: int
    a_as_b: int
    b_as_a: int
    n_a: int
    n_b: int
    examples: list[int] = field(default_factory=list)  # rows, both ways, most confidently confused first

    @property
    def share(self) -> float:
        return (self.a_as_b + self.b_as_a) / max(1, self.n_a + self.n_b)


def thresholds(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-class self-confidence t_j: the mean probability of class j over the images labelled j (1 for a class
    without images: nothing reaches it)."""
    k = probs.shape[1]
    return np.array([probs[labels == j, j].mean() if (labels == j).any() else 1.0 for j in range(k)])


def margins(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max_{j != label} p_j - p_label, that j) per image."""
    others = probs.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    best_other = others.argmax(axis=1)
    return probs[np.arange(len(labels)), best_other] - probs[np.arange(len(labels)), labels], best_other


def neighbours_from_pairs(n: int, pairs: np.ndarray) -> list[np.ndarray]:
    """The near copies of each of ``n`` images, from index pairs."""
    out: list[list[int]] = [[] for _ in range(n)]
    for a, b in np.asarray(pairs).reshape(-1, 2).tolist():
        out[a].append(b)
        out[b].append(a)
    return [np.array(sorted(set(x)), dtype=np.int64) for x in out]


def neighbours_from_groups(groups: list[str]) -> list[np.ndarray]:
    """The other members of each image's group ('' is a group of one)."""
    by: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        if g:
            by.setdefault(g, []).append(i)
    members = {g: np.array(v, dtype=np.int64) for g, v in by.items()}
    return [members[g][members[g] != i] if g else np.zeros(0, np.int64) for i, g in enumerate(groups)]


def audit_labels(
    probs: np.ndarray, labels: np.ndarray, held: np.ndarray, neighbours: list[np.ndarray], alpha: float | None = None
) -> tuple[list[LabelIssue], list[LookAlike]]:
    """The images that look mislabelled (most suspect first) and the class pairs that look alike.

    ``probs``: calibrated held-out probabilities (rows where ``held`` is False were not predicted without their group
    and only count through their copies); ``neighbours``: each image's near copies among these rows.
    """
    probs, labels, held = np.asarray(probs, dtype=float), np.asarray(labels, dtype=int), np.asarray(held, dtype=bool)
    alpha = ALPHA if alpha is None else alpha
    n = len(labels)
    if n == 0:
        return [], []
    top = probs.argmax(axis=1)
    issues: list[LabelIssue] = []
    for i in range(n):
        own, near = labels[i], neighbours[i]
        p_own = float(probs[i, own]) if held[i] else None
        if len(near):
            votes = Counter(labels[near].tolist())
            other = [(c, v) for c, v in votes.items() if c != own]
            if not other:
                continue  # its copies carry its label: it is not wrong alone
            sug, n_sug = max(other, key=lambda cv: (cv[1], -cv[0]))
            if n_sug < votes.get(own, 0) + 1:  # its copies (and itself) mostly say its label
                continue
            if held[i] and probs[i, sug] < probs[i, own] and n_sug < STRONG_COPIES:  # the heads side with its label
                continue
            issues.append(
                LabelIssue(
                    i,
                    own,
                    sug,
                    p_own,
                    float(probs[i, sug]) if held[i] else None,
                    1.0,
                    "conflict",
                    f"{n_sug} of its {len(near)} near copies are labelled so",
                )
            )
        elif held[i] and top[i] != own and probs[i, own] <= alpha and probs[i, top[i]] > SURE:
            j = int(top[i])
            issues.append(
                LabelIssue(
                    i,
                    own,
                    j,
                    p_own,
                    float(probs[i, j]),
                    float((1 + probs[i, j] - p_own) / 2),
                    "label",
                    f"heads that never saw it: {100 * probs[i, j]:.0f}% this, {100 * p_own:.1f}% its label",
                )
            )
    issues.sort(key=lambda it: (it.kind != "conflict", -it.score))
    for r, it in enumerate(issues, start=1):
        it.rank = r
    rows = np.flatnonzero(held & ~np.isin(np.arange(n), [it.index for it in issues]))  # label errors are no look-alikes
    return issues, look_alike(probs[rows], labels[rows], rows)


def look_alike(probs: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> list[LookAlike]:
    """Class pairs whose held-out images are read as each other, most confused first."""
    k = probs.shape[1]
    pred = probs.argmax(axis=1)
    counts = np.bincount(labels, minlength=k)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (labels, pred), 1)
    out = []
    for a in range(k):
        for b in range(a + 1, k):
            both = confusion[a, b] + confusion[b, a]
            pair = LookAlike(a, b, int(confusion[a, b]), int(confusion[b, a]), int(counts[a]), int(counts[b]))
            if both >= LOOKALIKE_IMAGES and pair.share >= LOOKALIKE_SHARE:
                for x, y in ((a, b), (b, a)):
                    idx = np.flatnonzero((labels == x) & (pred == y))
                    pair.examples += rows[idx[np.argsort(-probs[idx, y])][:LOOKALIKE_EXAMPLES]].tolist()
                out.append(pair)
    return sorted(out, key=lambda p: -p.share)


def expected_precision(issues: list[LabelIssue]) -> float | None:
    """The share of the listed images expected to be mislabelled: one minus their mean calibrated probability of
    the given label (None where none has one)."""
    p = [it.p_label for it in issues if it.p_label is not None]
    return float(1 - np.mean(p)) if p else None


def flag_images(probs: np.ndarray, labels: np.ndarray, alpha: float = ALPHA) -> tuple[np.ndarray, np.ndarray]:
    """For images outside the audited set (a test split): (mask of those that look mislabelled, the suggested class),
    by the audit's rule for an image without copies."""
    probs, labels = np.asarray(probs, dtype=float), np.asarray(labels, dtype=int)
    rows = np.arange(len(labels))
    top = probs.argmax(axis=1)
    flagged = (top != labels) & (probs[rows, labels] <= alpha) & (probs[rows, top] > SURE)
    return flagged, top

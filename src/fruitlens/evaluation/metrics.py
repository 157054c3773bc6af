"""Every figure of the report from true labels and predicted probabilities; figures agree with each other."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
)

from fruitlens.training.history import HistoryRow


@dataclass
class CalibrationBin:
    """One confidence bin of a reliability diagram."""

    lo: float
    hi: float
    count: int
    accuracy: float
    confidence: float


@dataclass
class Calibration:
    """Expected calibration error and the bins it was computed over."""

    ece: float = float("nan")
    bins: list[CalibrationBin] = field(default_factory=list)


def calibration(y_true: np.ndarray, probs: np.ndarray, bins: int = 15) -> Calibration:
    """Expected calibration error over equal-width confidence bins, with the bins for a reliability diagram."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    rows, ece = [], 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        n = int(mask.sum())
        if n:
            acc, mean_conf = float(correct[mask].mean()), float(conf[mask].mean())
            ece += n / len(y_true) * abs(acc - mean_conf)
            rows.append(CalibrationBin(float(lo), float(hi), n, acc, mean_conf))
    return Calibration(float(ece), rows)


def wilson_interval(correct: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of an accuracy measured on ``n`` images: how far the figure may be from the
    accuracy on many more images like these (75% on 111 test photos: about +-8 points)."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def group_keys(groups: Sequence[str] | None, n: int) -> list[str]:
    """One key per image: its near-duplicate group, or its own key where it has none (or ``groups`` is None)."""
    groups = groups if groups is not None else [""] * n
    return [str(g) if g not in ("", None) else f"\0{i}" for i, g in enumerate(groups)]


def grouped_interval(correct: np.ndarray, groups: Sequence[str] | None) -> dict[str, Any]:
    """95% interval of an accuracy over images that come in near-duplicate groups (frames of one fruit turning).

    Ten frames of one fruit are not ten independent tries: they are right or wrong together. The interval is Wilson's
    with the effective number of images, ``p(1-p) / var`` (at most the number of images), where ``var`` is the
    cluster-robust (ratio-estimator) variance of the accuracy over the groups. Without groups (each image its own)
    this is the plain Wilson interval; when every image is right (or every one wrong) the variance tells nothing,
    and each group counts as one image.
    """
    correct = np.asarray(correct, dtype=float)
    n = len(correct)
    ids = np.unique(np.array(group_keys(groups, n)), return_inverse=True)[1] if n else np.zeros(0, int)
    n_groups = int(ids.max()) + 1 if n else 0
    out = {"groups": n_groups, "effective_n": float(n)}
    if n_groups == n:
        out["ci95"] = list(wilson_interval(int(correct.sum()), n))
        return out
    p = correct.mean()
    per_group = np.bincount(ids, weights=correct - p)  # sum over each group of (correct - p)
    var = n_groups / (n_groups - 1) * float((per_group**2).sum()) / n**2 if n_groups > 1 else 0.0
    if p in (0.0, 1.0) or n_groups == 1:  # the variance says nothing (all right, or one group): one image per group
        n_eff = float(n_groups)
    else:  # no spread between groups beyond chance (var 0 included): as many as the images
        n_eff = min(float(n), p * (1 - p) / var) if var > 0 else float(n)
    out["effective_n"] = max(1.0, n_eff)
    out["ci95"] = list(wilson_interval(p * out["effective_n"], out["effective_n"]))
    return out


@dataclass
class Metrics:
    """Every figure of one evaluation; they agree with each other (accuracy = trace / sum of the confusion matrix)."""

    n: int = 0
    accuracy: float = float("nan")
    accuracy_ci95: list[float] | None = None  # 95% interval, counting near-duplicate groups as one try each
    accuracy_groups: int = 0
    accuracy_effective_n: float = 0.0
    balanced_accuracy: float = float("nan")
    top_k_accuracy: dict[str, float] = field(default_factory=dict)  # "3", "5" -> accuracy
    confusion_matrix: list[list[int]] = field(default_factory=list)  # rows true, columns predicted
    classes_absent_from_data: list[str] = field(default_factory=list)
    macro_precision: float = float("nan")
    macro_recall: float = float("nan")
    macro_f1: float = float("nan")
    weighted_precision: float = float("nan")
    weighted_recall: float = float("nan")
    weighted_f1: float = float("nan")
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # precision, recall, f1, support
    classification_report: str = ""
    log_loss: float | None = None
    calibration: Calibration = field(default_factory=Calibration)  # ece and the bins of the reliability diagram
    ece: float = float("nan")
    most_confused: list[dict[str, Any]] = field(default_factory=list)  # true, predicted, count


def ci_range(ci: Sequence[float] | None) -> str:
    """``65.7-82.1%`` for a 95% interval; ``-`` where there is none (old reports, NaN)."""
    return "-" if not ci or ci[0] != ci[0] else f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}%"


def ci_text(metrics: Metrics) -> str:
    """``95% CI 66.0-82.1%`` for a report's accuracy, naming the groups when near duplicates widened it; empty for
    reports written before it was recorded."""
    lo, hi = metrics.accuracy_ci95 or (None, None)
    if lo is None or np.isnan(lo):
        return ""
    groups = metrics.accuracy_groups or metrics.n
    where = f" over {groups} near-duplicate groups" if groups and groups < metrics.n else ""
    return f"95% CI {ci_range((lo, hi))}{where}"


@dataclass
class ValidationGap:
    """The kept model's validation accuracy next to the accuracy of an evaluation."""

    val_accuracy: float
    val_images: int
    accuracy: float
    significant: bool  # the two 95% intervals are apart, validation above


def validation_gap(history: list[HistoryRow], metrics: Metrics, n_val: int) -> ValidationGap | None:
    """The kept model's validation accuracy next to the accuracy measured here; ``significant`` when their 95%
    intervals do not overlap (validation above).

    The validation images are carved from the training images: photos of one shelf or one session land on both
    sides (GroceryStore: 99% validation accuracy, 75% on its own test photos). Such a gap says that new photos
    will score near the test figure, not the validation one. ``None`` without validation figures.
    """
    rows = [r for r in history if r.val_loss is not None and r.val_acc is not None]
    hi = (metrics.accuracy_ci95 or [None, None])[1]
    if not rows or not n_val or hi is None or np.isnan(hi):
        return None
    val_acc = min(rows, key=lambda r: r.val_loss).val_acc  # the kept checkpoint: best validation loss
    val_lo = wilson_interval(round(val_acc * n_val), n_val)[0]
    return ValidationGap(val_acc, n_val, metrics.accuracy, bool(val_lo > hi))


def gap_text(gap: ValidationGap | None, evaluated_on: str) -> str:
    """One warning sentence for a significant validation gap, else empty."""
    if not gap or not gap.significant:
        return ""
    what = "test" if evaluated_on == "test" else "evaluation"
    return (
        f"validation accuracy {100 * gap.val_accuracy:.1f}% is far above this {what} accuracy "
        f"({100 * gap.accuracy:.1f}%): the validation images, carved from the training images, resemble them "
        f"more than these {what} images do (photos of the same shelf or session on both sides). Expect new photos "
        f"to score near the {what} figure, not the validation one."
    )


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    groups: Sequence[str] | None = None,
    y_pred: np.ndarray | None = None,
) -> Metrics:
    """Accuracy (with a 95% interval that counts near-duplicate ``groups`` as such), balanced/top-k accuracy, P/R/F1
    (macro, weighted, per class), log loss, ECE, confusion matrix. ``y_pred``: the answers, where they are not the
    argmax of ``probs`` (a class map: the top model class's column)."""
    with warnings.catch_warnings():  # a prediction of a class absent from the data is an error already counted
        warnings.filterwarnings("ignore", "y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", "A single label was found")  # balanced accuracy on a one-class folder
        return _compute_metrics(y_true, probs, classes, groups, y_pred)


def _compute_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: list[str], groups: Sequence[str] | None, y_pred: np.ndarray | None
) -> Metrics:
    n_cls = len(classes)
    labels = list(range(n_cls))
    y_true = np.asarray(y_true, dtype=int)
    y_pred = probs.argmax(axis=1) if y_pred is None else np.asarray(y_pred, dtype=int)
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = s > 0
    interval = grouped_interval(y_true == y_pred, groups)
    out: dict[str, Any] = {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "accuracy_ci95": interval["ci95"],
        "accuracy_groups": interval["groups"],
        "accuracy_effective_n": interval["effective_n"],
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(y_true) else float("nan"),
        "top_k_accuracy": {},
        "confusion_matrix": cm.tolist(),
        "classes_absent_from_data": [c for c, ok in zip(classes, present) if not ok],
    }
    order = np.argsort(-probs, axis=1)
    for k in (3, 5):
        if k < n_cls:
            out["top_k_accuracy"][str(k)] = float((order[:, :k] == y_true[:, None]).any(axis=1).mean())
    for avg in ("macro", "weighted"):
        # macro over classes present in the data, so that an absent class does not count as a zero
        pp, rr, ff, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=[i for i in labels if present[i]], average=avg, zero_division=0
        )
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(pp), float(rr), float(ff)
    out["per_class"] = {
        c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
        for i, c in enumerate(classes)
    }
    # over the same classes as the headline's macro figures, so that its "macro avg" row says the same
    shown = [i for i in labels if present[i]] or labels
    out["classification_report"] = classification_report(
        y_true, y_pred, labels=shown, target_names=[classes[i] for i in shown], zero_division=0, digits=4
    )
    if len(shown) < n_cls:
        out["classification_report"] += (
            "\nnot in these images (left out of the averages): "
            + ", ".join(c for c, ok in zip(classes, present) if not ok)
            + "\n"
        )
    clipped = np.clip(probs, 1e-12, 1)
    out["log_loss"] = (
        float(log_loss(y_true, clipped / clipped.sum(1, keepdims=True), labels=labels)) if len(y_true) else float("nan")
    )
    out["calibration"] = calibration(y_true, probs)
    out["ece"] = out["calibration"].ece
    pairs = [(int(cm[i, j]), classes[i], classes[j]) for i in range(n_cls) for j in range(n_cls) if i != j and cm[i, j]]
    out["most_confused"] = [{"true": t, "predicted": pr, "count": n} for n, t, pr in sorted(pairs, reverse=True)[:15]]
    return Metrics(**out)

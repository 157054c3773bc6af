"""Scores that mean what they say: temperature scaling, risk-coverage ("answer only when sure"), thresholds.

All of it works on held-out predictions: logits (or probabilities) of images the model did not train on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize_scalar


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log likelihood (log loss) of integer labels ``y`` under softmax(``logits``)."""
    return float(-log_softmax(logits)[np.arange(len(y)), y].mean()) if len(y) else float("nan")


def fit_temperature(logits: np.ndarray, y: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The one scalar T > 0 that minimises the log loss of softmax(logits / T) (Guo et al. 2017); 1.0 without data.

    Searched on log T (the loss is smooth and has one minimum there), so it takes milliseconds.
    """
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y, dtype=int)
    if len(y) == 0:
        return 1.0
    res = minimize_scalar(
        lambda t: nll(logits / np.exp(t), y), bounds=tuple(np.log(bounds)), method="bounded", options={"xatol": 1e-4}
    )
    return float(np.exp(res.x))


@dataclass
class RiskCoverage:
    """Accuracy of the answered images against the share answered, answering the most confident first."""

    coverage: list[float] = field(default_factory=list)  # 1/n .. 1
    accuracy: list[float] = field(default_factory=list)  # of the answered images at each coverage
    thresholds: list[float] = field(default_factory=list)  # the lowest score answered at each coverage
    aurc: float = float("nan")  # area under the risk (1 - accuracy) - coverage curve: lower is better
    coverage_at: dict[str, float] = field(default_factory=dict)  # "0.9" -> largest coverage with accuracy >= 90%


def risk_coverage(confidence: np.ndarray, correct: np.ndarray, targets=(0.90, 0.95, 0.99)) -> RiskCoverage:
    """The risk-coverage curve of answering in order of ``confidence``; ties are answered together."""
    conf, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=float)
    n = len(conf)
    if n == 0:
        return RiskCoverage()
    order = np.argsort(-conf, kind="stable")
    conf, correct = conf[order], correct[order]
    acc = np.cumsum(correct) / np.arange(1, n + 1)
    last_of_tie = np.r_[conf[1:] != conf[:-1], True]  # a threshold answers every image with that score
    cov = np.arange(1, n + 1) / n
    out = RiskCoverage(cov[last_of_tie].tolist(), acc[last_of_tie].tolist(), conf[last_of_tie].tolist())
    out.aurc = float(np.mean(1 - acc))
    for t in targets:
        ok = [c for c, a in zip(out.coverage, out.accuracy) if a >= t - 1e-12]
        out.coverage_at[f"{t:g}"] = float(max(ok)) if ok else 0.0
    return out


def threshold_for_accuracy(confidence: np.ndarray, correct: np.ndarray, target: float) -> float:
    """The lowest score threshold whose answered images (score >= threshold) are at least ``target`` accurate.

    The largest coverage that keeps the target, on held-out predictions. Returns 1.0 (never answer: every answer
    "not sure") when no threshold reaches it, and 0.0 when every image can be answered.
    """
    rc = risk_coverage(confidence, correct, ())
    ok = [t for t, a in zip(rc.thresholds, rc.accuracy) if a >= target - 1e-12]
    if not ok:
        return 1.0
    lowest = min(ok)
    return 0.0 if lowest <= float(np.min(confidence)) and rc.accuracy[-1] >= target else float(lowest)


def never_sure_text(t) -> str | None:
    """A warning when a run's held-out predictions reached its target accuracy at no threshold (``t``: a TrustNote):
    then the threshold is 1 and every answer is "not sure", which a small or hard data set can give."""
    if t is None or t.unknown_threshold < 1.0 - 1e-9:
        return None
    return (
        f"held-out predictions ({t.heldout_images} images) were {100 * t.target_precision:.0f}% accurate at no "
        "confidence threshold, so every answer is 'not sure': add images per class, aim lower "
        "(trust.target_precision=0.8 at train time), or let predict and serve always answer (--unknown-threshold 0)"
    )

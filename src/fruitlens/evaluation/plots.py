"""PNG plots with matplotlib (Agg): confusion matrices, training curves, reliability diagrams, risk-coverage."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np

from fruitlens.evaluation.metrics import Calibration
from fruitlens.training.history import HistoryRow  # noqa: E402


def confusion_heatmap(cm: np.ndarray, classes: list[str], path: Path, normalise: bool, title: str) -> Path:
    """Heatmap readable from 2 to 100+ classes: the figure grows with the class count, numbers only where they fit."""
    n = len(classes)
    data = cm.astype(float)
    if normalise:
        rows = data.sum(axis=1, keepdims=True)
        data = np.divide(data, rows, out=np.zeros_like(data), where=rows > 0)
    side = min(40, max(5, 0.32 * n + 3))
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(data, cmap="Blues", vmin=0, vmax=1 if normalise else max(1, data.max()))
    fs = max(4, min(10, 200 / max(n, 1)))
    ax.set_xticks(range(n), classes, rotation=90, fontsize=fs)
    ax.set_yticks(range(n), classes, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 40:
        thresh = (1 if normalise else data.max()) / 2
        for i in range(n):
            for j in range(n):
                v = data[i, j]
                if v:
                    ax.text(
                        j,
                        i,
                        f"{v:.2f}" if normalise else f"{int(v)}",
                        ha="center",
                        va="center",
                        fontsize=max(4, fs - 2),
                        color="white" if v > thresh else "black",
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=80 if n > 40 else 100)
    plt.close(fig)
    return path


def training_curves(history: list[HistoryRow], path: Path) -> Path | None:
    """Loss, accuracy and learning rate per epoch, train and validation, with the phases marked."""
    if not history:
        return None
    x = np.arange(1, len(history) + 1)
    get = lambda key: np.array([np.nan if getattr(r, key) is None else float(getattr(r, key)) for r in history])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    dots = len(history) <= 40  # a marker per epoch, where they do not merge into a line
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        ax.plot(x, get(f"train_{key}"), "o-" if dots else "-", label="train")
        ax.plot(x, get(f"val_{key}"), "s-" if dots else "-", label="validation")
        ax.set_title(label)
        ax.set_xlabel("epoch (all phases)")
        ax.legend()
        ax.grid(alpha=0.3)
    axes[2].plot(x, get("lr"), "o-" if dots else "-", color="gray")
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    axes[2].set_xlabel("epoch (all phases)")
    phases = [r.phase for r in history]
    for ax in axes:
        start = 0
        for i in range(1, len(phases) + 1):
            if i == len(phases) or phases[i] != phases[start]:
                ax.axvspan(start + 0.5, i + 0.5, alpha=0.07, color="C2" if phases[start] == "fine-tune" else "C0")
                ax.text(start + 0.6, ax.get_ylim()[1], str(phases[start]), va="top", fontsize=8)
                start = i
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def reliability_diagram(calib: Calibration, path: Path, before: Calibration | None = None) -> Path:
    """Accuracy against confidence per bin; with ``before`` (the bins without the temperature) side by side."""
    panels = [("before calibration", before), ("after calibration", calib)] if before else [("", calib)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (name, c) in zip(axes[0], panels):
        centers = [(b.lo + b.hi) / 2 for b in c.bins]
        ax.bar(centers, [b.accuracy for b in c.bins], width=1 / 15 * 0.9, alpha=0.7, label="accuracy")
        ax.plot([0, 1], [0, 1], "k--", label="perfect calibration")
        ax.plot(centers, [b.confidence for b in c.bins], "r.", label="mean confidence")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title(f"reliability {name} (ECE {c.ece:.3f})".replace("  ", " "))
        ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def risk_coverage(rc, path: Path, target: float) -> Path | None:
    """Accuracy of the answered images against the share answered (most confident first)."""
    if not rc.coverage:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(rc.coverage, rc.accuracy, "-", color="C0", label=f"answered images (AURC {rc.aurc:.3f})")
    ax.axhline(target, color="C2", ls="--", lw=1, label=f"target accuracy {100 * target:.0f}%")
    ax.set_xlabel("coverage (share of images answered)")
    ax.set_ylabel("accuracy of the answered images")
    ax.set_xlim(0, 1)
    ax.set_ylim(max(0.0, min(rc.accuracy) - 0.05), 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left")
    ax.set_title("risk-coverage: answer only when sure")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def bar_chart(
    names: list[str],
    values: list[float],
    path: Path,
    title: str,
    ylabel: str,
    intervals: list[tuple[float, float] | None] | None = None,
) -> Path:
    """Bars with their values; ``intervals`` (low, high) per bar draw as error bars (none where ``None``)."""
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(names) + 2), 4))
    ax.bar(names, values, color="C0")
    intervals = intervals or [None] * len(values)
    for i, (v, ci) in enumerate(zip(values, intervals)):
        if ci is not None:
            # max(0, ...): at 100% the interval's upper end is 1 up to rounding
            ax.errorbar(i, v, yerr=[[max(0.0, v - ci[0])], [max(0.0, ci[1] - v)]], color="k", capsize=4, lw=1)
        ax.text(i, ci[1] if ci is not None else v, f"{v:.3f}", ha="center", va="bottom", fontsize=9)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path

"""The report's "your photos" section: how the model does on the photos of the user's setting (``train --add``),
estimated by cross-validation over them, and whether more labels would pay (the learning curve)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fruitlens.evaluation.metrics import grouped_interval

CURVE_PAYS = 0.02  # accuracy gained from the last half of the photos above which more labels look worth it


@dataclass
class CurvePoint:
    """Cross-validated accuracy on the photos with about ``photos`` labelled photos in training (0: the data alone)."""

    photos: float
    accuracy: float
    ci95: list[float] | None = None
    balanced_accuracy: float | None = None


@dataclass
class PhotoNote:
    """What ``--add`` brought: the photos, the figures on them, and what more labels would do."""

    photos: int = 0
    groups: int = 0  # groups of similar photos, each one try in the interval
    folds: int = 0
    held_out: int = 0  # photos predicted by a head that never saw their group (their class had photos elsewhere)
    grouping: str = ""  # what the folds keep together: similar photos, near copies or single photos
    per_class: dict[str, int] = field(default_factory=dict)
    new_classes: list[str] = field(default_factory=list)  # labels the training data did not have
    sources: list[str] = field(default_factory=list)  # the labels CSVs
    skipped: int = 0  # rows of the CSVs left out
    skipped_examples: list[list[str]] = field(default_factory=list)  # [where, why]
    share: float = 0.3  # of the head's training weight
    accuracy: float | None = None
    accuracy_ci95: list[float] | None = None
    balanced_accuracy: float | None = None
    curve: list[CurvePoint] = field(default_factory=list)
    verdict: str = ""
    calibrated_on_photos: bool = False  # the temperature and thresholds come from the photos' held-out predictions
    seconds: float = 0.0

    def text(self) -> str:
        """One line for the command's summary."""
        if self.accuracy is None:
            return f"{self.photos} labelled photos of your setting trained with the data (too few to cross-validate)"
        ci = (
            f" (95% CI {100 * self.accuracy_ci95[0]:.1f}-{100 * self.accuracy_ci95[1]:.1f}%)"
            if self.accuracy_ci95
            else ""
        )
        alone = next((p for p in self.curve if p.photos == 0), None)
        before = f"; the data alone: {100 * alone.accuracy:.1f}%" if alone else ""
        return (
            f"your photos: accuracy {100 * self.accuracy:.1f}%{ci}, balanced {100 * (self.balanced_accuracy or 0):.1f}%"
            f", cross-validated over {self.held_out} of {self.photos} labelled photos ({self.folds} folds of "
            f"{self.grouping}){before}. {self.verdict}"
        )


def _balanced(correct: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean([correct[y == c].mean() for c in np.unique(y)]))


def photo_note(
    y: np.ndarray,
    groups: np.ndarray,
    logits: np.ndarray,
    curve: list[tuple[float, float, np.ndarray]],
    folds: int,
    grouping: str = "similar photos",
    photos: int | None = None,
) -> PhotoNote:
    """The figures from the held-out photos' out-of-fold ``logits`` (labels ``y``, ``groups`` kept together in a fold)
    and the learning curve's (share, photos trained, logits) points; ``photos``: all labelled photos."""
    y = np.asarray(y)
    keys = [str(g) for g in groups]
    correct = logits.argmax(1) == y
    interval = grouped_interval(correct, keys)
    note = PhotoNote(
        photos=photos or len(y),
        groups=int(len(np.unique(groups))),
        folds=folds,
        held_out=len(y),
        grouping=grouping,
        accuracy=float(correct.mean()),
        accuracy_ci95=interval["ci95"],
        balanced_accuracy=_balanced(correct, y),
    )
    for _, trained, z in curve:
        ok = z.argmax(1) == y
        note.curve.append(
            CurvePoint(round(trained, 1), float(ok.mean()), grouped_interval(ok, keys)["ci95"], _balanced(ok, y))
        )
    note.verdict = curve_verdict(note.curve)
    return note


def curve_verdict(curve: list[CurvePoint]) -> str:
    """Whether more labelled photos look worth it, from the last two points with photos."""
    with_photos = [p for p in curve if p.photos > 0]
    if len(with_photos) < 2:
        return ""
    a, b = with_photos[-2], with_photos[-1]
    gain = b.accuracy - a.accuracy
    if gain >= CURVE_PAYS:
        return (
            f"More labels would pay: going from {a.photos:.0f} to {b.photos:.0f} photos gained "
            f"{100 * gain:.1f} points, and the curve is still rising."
        )
    return (
        f"The curve is flat ({100 * gain:+.1f} points from {a.photos:.0f} to {b.photos:.0f} photos): more photos "
        "like these would add little; label the kinds the model still gets wrong, or photos of other settings."
    )

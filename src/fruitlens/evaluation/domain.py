"""Where a model was trained and how it does elsewhere: the share of studio shots in its training data, and its
figures on the test split next to those on other data (``--eval-data``, ``fruitlens evaluate RUN OTHER``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from fruitlens.config import ModelConfig
from fruitlens.evaluation.metrics import Metrics


class Evaluated(Protocol):
    """What a figure is read from: an evaluation's name, metrics and class map (a ``Report``)."""

    evaluated_on: str
    metrics: Metrics
    class_map: str | None


STUDIO_SHARE = 0.8  # training data this much shot on white is "studio shots only"


@dataclass
class DomainFigure:
    """The headline figures of one evaluation, for the table that puts the test split next to other data."""

    name: str  # "test" or the other data's name
    images: int
    accuracy: float
    accuracy_ci95: list[float] | None
    balanced_accuracy: float
    macro_f1: float
    folder: str = ""  # where its own report is (relative to this report's folder)
    class_map: str | None = None

    @classmethod
    def of(cls, report: Evaluated, folder: str = "") -> "DomainFigure":
        m = report.metrics
        return cls(
            report.evaluated_on,
            m.n,
            m.accuracy,
            m.accuracy_ci95,
            m.balanced_accuracy,
            m.macro_f1,
            folder,
            report.class_map,
        )


@dataclass
class DomainNote:
    """Where the model was trained (how much of it studio shots on white) and how it does on other data."""

    white_background: float = 0.0  # share of the training data's images shot on white
    figures: list[DomainFigure] = field(default_factory=list)  # this evaluation first, then the others

    @property
    def studio_only(self) -> bool:
        return self.white_background >= STUDIO_SHARE


def studio_text(note: DomainNote) -> str:
    """The plain warning for a model trained on studio shots only (empty otherwise)."""
    if not note.studio_only:
        return ""
    others = note.figures[1:]
    measured = (
        ("; on the other data given it scores " + ", ".join(f"{100 * f.accuracy:.1f}% on {f.name}" for f in others))
        if others
        else ""
    )
    advice = (
        ""
        if others
        else (
            " Measure it on photos like yours: --eval-data PHOTOS --class-map map.json at train "
            "time, or 'fruitlens evaluate RUN PHOTOS --class-map map.json'."
        )
    )
    return (
        f"trained on studio shots only ({100 * note.white_background:.0f}% of the images are on a white "
        f"background): accuracy on real photos (shelves, hands, other fruit around) will be much lower than "
        f"this test split's{measured}.{advice} A few labelled photos like the ones it will see help most: "
        "'fruitlens suggest RUN PHOTOS/ --budget 90' picks the photos worth labelling and writes a page to label "
        "them on, then 'fruitlens train DATA --add to-label.csv' (benchmarks/RESULTS.md, \"A few labelled photos "
        "of your setting\"); unlabeled photos can adapt it a little (--adapt-to PHOTOS), and --fast's small "
        "input makes it much worse on photos."
    )


def features_text(model: ModelConfig) -> str:
    """Which features the head reads (``model.feature_layer``), in words."""
    if model.feature_layer == "mid":
        return (
            "the features of a mid-level block of the backbone (--feature-layer mid), standardised on the "
            "training features"
        )
    return "the features of the backbone's last layer"

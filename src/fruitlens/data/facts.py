"""``DataFacts``: what data preparation found out about the data (check summary, findings, split), written to the run's
``facts.json`` and shown in the report."""

from __future__ import annotations

from dataclasses import dataclass, field

from fruitlens.data.check import CheckSummary
from fruitlens.data.split import SplitFacts


@dataclass
class AddedFacts:
    """The labelled photos of the user's setting that ``train --add`` read: where from, how many, which rows were left
    out and why, and the classes they brought that the data did not have."""

    sources: list[str] = field(default_factory=list)
    photos: int = 0
    per_class: dict[str, int] = field(default_factory=dict)
    new_classes: list[str] = field(default_factory=list)
    skipped: list[list[str]] = field(default_factory=list)  # [CSV:line path, why]


@dataclass
class DataFacts:
    """The check and split of the data a run was trained on."""

    data: str = ""
    check: CheckSummary = field(default_factory=CheckSummary)
    check_findings: dict[str, int] = field(default_factory=dict)  # "severity:code" -> count
    split: SplitFacts = field(default_factory=SplitFacts)
    leak_free: bool | None = None
    median_side: int = 0  # the median shorter side of the usable images: the input size and crop range follow it
    added: AddedFacts | None = None  # train --add
    keep_share: float = 1.0  # of each near-copy group of training images, trained on (data/prune.py)
    covered: int = 0  # training images a representative of their group stands for (split "covered")

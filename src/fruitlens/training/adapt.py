"""``--adapt-to PHOTOS``: adapting the head to unlabeled photos of the setting the model will be used in.

Class-balanced pseudo-labels (Lee 2013; Zou et al. 2018, "class-balanced self-training"): the trained head scores the
photos, and for each class the photos it gave that class with the highest scores (the top 20% in round one, 40% in
round two: ``fit.adapt_share`` is the last round's share) join the training data with that class; the head then
trains again from scratch. A share per class rather than one score threshold: a head stopped early on studio shots
is unsure of every photo (at a 0.9 threshold it kept 12 of 1,142 GroceryStore photos), and the classes it favours
would take all the places. It runs on the cached features (the photos' clean view goes through the backbone once),
so it costs seconds, and the exported model is the same kind of model: nothing of the photos is needed to predict.

Picked by measurement (``benchmarks/RESULTS.md``, "Photo-like augmentation and adaptation ideas"): on GroceryStore
photos a Fruits-360 head gained from class-balanced pseudo-labels on both the held-out and all photos, re-estimating
the backbone's BatchNorm statistics on the photos (AdaBN) lost badly, and aligning feature statistics (CORAL,
per-dimension mean and spread) gained on 62 held-out photos and lost on all 812.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch


log = logging.getLogger(__name__)

METHOD = "class-balanced pseudo-labels"


@dataclass
class Adaptation:
    """What ``--adapt-to`` did: ``train_info.json``'s ``adaptation``, shown in the report and the model card."""

    method: str = METHOD
    source: str = ""  # the folder (or file list) of unlabeled photos
    images: int = 0  # photos that could be decoded and were scored
    skipped: list[str] = field(default_factory=list)  # files that are not readable images (left out, listed)
    share: float = 0.4  # the last round's share of each class's photos (by score) that became pseudo-labels
    rounds: list[int] = field(default_factory=list)  # pseudo-labelled photos in each round
    per_class: dict[str, int] = field(default_factory=dict)  # the last round's pseudo-labels by class

    @property
    def used(self) -> int:
        return self.rounds[-1] if self.rounds else 0

    def text(self) -> str:
        skipped = f" ({len(self.skipped)} unreadable file(s) left out)" if self.skipped else ""
        return (
            f"adapted to {self.images:,} unlabeled photos from {self.source}{skipped} by {self.method}: "
            f"the {100 * self.share:.0f}% of each class's photos the model was surest of ({self.used:,} photos) "
            f"joined the training data in the last of {len(self.rounds)} round(s)"
        )


def shares(last: float, rounds: int) -> list[float]:
    """Each round's share, rising to ``last``: 0.2 then 0.4 for two rounds."""
    return [last * (r + 1) / rounds for r in range(rounds)]


@torch.no_grad()
def confident(head: torch.nn.Module, features: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, classes) of the pseudo-labelled photos: for each class the head gives, the ``share`` of the photos
    it gave that class with the highest scores (at least one). The head runs in eval mode."""
    was = head.training
    head.eval()
    probs = torch.cat([torch.softmax(head(features[i : i + 4096].float()), 1) for i in range(0, len(features), 4096)])
    head.train(was)
    score, label = probs.max(1)
    keep = []
    for c in label.unique():
        mine = torch.nonzero(label == c).flatten()
        keep.append(mine[score[mine].argsort(descending=True)[: max(1, round(share * len(mine)))]])
    idx = torch.sort(torch.cat(keep)).values if keep else torch.zeros(0, dtype=torch.long)
    return idx, label[idx]

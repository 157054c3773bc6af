""" "Not a class I know": an out-of-distribution score for each image, computed inside the model (and its ONNX export).

The score adds two signals, each scaled by how it varies over held-out images of the known classes (the median and
the 10-90% range: a robust z-score):
- the classifier's own doubt, 1 - top-1 probability (max-softmax, Hendrycks & Gimpel 2017);
- how far the image's features are from every training image: the cosine distance to the nearest one of a stored
  sample of training features (deep nearest neighbours, Sun et al. 2022).
``ood_score`` is about 0 for a typical photo of a known class and grows without bound: a fruit the model never saw is
far from every stored image even when the classifier is sure of a wrong class. Measured with held-out classes
(benchmarks/RESULTS.md), the sum ranks unknown fruit above known fruit more often than either signal alone, and more
often than averaging their percentiles (which saturate at 100%).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MAX_BANK = 4096  # training features kept for the nearest-neighbour distance (4,096 x 1,280 fp16 = 10 MB)


def robust_scale(values: np.ndarray) -> tuple[float, float]:
    """(median, 10-90% range) of held-out values; the range is at least 1e-6."""
    v = np.asarray(values, dtype=np.float64)
    lo, mid, hi = np.quantile(v, [0.1, 0.5, 0.9]) if len(v) else (0.0, 0.0, 1.0)
    return float(mid), float(max(hi - lo, 1e-6))


class OODScorer(nn.Module):
    """``forward(features, probs) -> ood_score`` (N,), higher = more unusual; see the module docstring."""

    def __init__(self, bank: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("bank", F.normalize(bank.float(), dim=1).half())  # half: the export stays small
        self.register_buffer("scale", scale.float())  # doubt median, doubt range, distance median, distance range

    @classmethod
    def fit(cls, bank: torch.Tensor, heldout_doubt: np.ndarray, heldout_distance: np.ndarray) -> "OODScorer":
        return cls(bank, torch.tensor([*robust_scale(heldout_doubt), *robust_scale(heldout_distance)]))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "OODScorer":
        return cls(state["bank"], state["scale"])

    def extended(self, features: torch.Tensor) -> "OODScorer":
        """The same scorer with ``features`` added to its bank (``--adapt-to``'s pseudo-labelled photos: training
        images of the head now, so photos like them are not "unfamiliar" for their distance alone)."""
        return OODScorer(torch.cat([self.bank.float(), F.normalize(features.float(), dim=1)]), self.scale)

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine distance of each row of ``features`` to its nearest stored training feature."""
        return 1 - (F.normalize(features, dim=1) @ self.bank.float().T).max(dim=1).values

    def combine(self, doubt: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        s = self.scale
        return (doubt - s[0]) / s[1] + (distance - s[2]) / s[3]

    def forward(self, features: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return self.combine(1 - probs.max(dim=1).values, self.distance(features))


def bank_indices(labels: np.ndarray, size: int = MAX_BANK, seed: int = 0) -> np.ndarray:
    """At most ``size`` rows, spread evenly over the classes (all of a small data set)."""
    labels = np.asarray(labels)
    if len(labels) <= size:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = max(1, size // len(classes))
    picked = [
        rng.choice(np.flatnonzero(labels == c), min(per, int((labels == c).sum())), replace=False) for c in classes
    ]
    return np.sort(np.concatenate(picked))

"""Probabilities from scores: the one softmax of numpy logits (the model's outputs, held-out heads' logits)."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (n, classes) scores, stable for large values."""
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)

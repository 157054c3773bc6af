"""``Trust``: what a model says about itself and how it was decided (the temperature folded into its head, the
"not sure" and "unfamiliar" thresholds, and the figures they were fitted on). It travels with the model: in the
checkpoint, in the exported ONNX model's metadata, and into every ``Predictor``; ``evaluation/trust.py`` fits it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fruitlens.jsonio import from_dict


@dataclass
class Trust:
    """What the model says about itself, and how it was decided (stored in the checkpoint and the ONNX model)."""

    temperature: float = 1.0
    source: str = ""  # how the held-out predictions were made
    heldout_images: int = 0
    heldout_groups: int = 0
    heldout_accuracy: float | None = None
    heldout_ece_before: float | None = None
    heldout_ece_after: float | None = None
    heldout_nll_before: float | None = None
    heldout_nll_after: float | None = None
    target_precision: float = 0.95  # accuracy wanted of the answered images
    unknown_threshold: float = 0.0  # calibrated top-1 probability below which the answer is "not sure"
    heldout_coverage: float | None = None  # share of held-out images answered at that threshold
    ood_threshold: float = 1.0  # ood_score above which the answer is "unfamiliar"
    ood_rule: str = ""
    heldout_ood_flagged: float | None = None  # share of held-out known images called unfamiliar
    seconds: float = 0.0

    @classmethod
    def from_saved(cls, saved: dict[str, Any] | None) -> "Trust | None":
        """The Trust stored as JSON in a checkpoint or an ONNX model (None for models trained before it)."""
        return from_dict(cls, saved) if saved else None

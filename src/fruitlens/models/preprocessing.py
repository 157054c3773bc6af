"""``Preprocessing``: the one description of how pixels become a tensor, shared by training, export and serving."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize_size``, centre-crop ``image_size``, scale to [0, 1], normalise."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Preprocessing":
        return cls(int(d["image_size"]), int(d["resize_size"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])))

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel float32 ``(scale, shift)`` with ``uint8 * scale - shift == (x / 255 - mean) / std``: the whole
        normalisation as one multiply and one subtract."""
        std = np.asarray(self.std, dtype=np.float32)
        return 1.0 / (255.0 * std), np.asarray(self.mean, dtype=np.float32) / std

    def with_image_size(self, size: int) -> "Preprocessing":
        """Same normalisation at another input size; the resize keeps the whole image (minimal crop)."""
        return Preprocessing(size, size, self.mean, self.std)

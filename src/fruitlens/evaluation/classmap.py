"""Class maps: the data's class names onto the model's (``{"Apple": ["Apple Braeburn", "Apple Red 1"]}``), and the
model's probabilities collapsed onto the data's classes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fruitlens.errors import DataError

OTHER = "(other)"  # the column of the model classes that a class map leaves out


@dataclass(frozen=True)
class ClassMapping:
    """Data class -> model classes that count as right for it; ``columns`` are the evaluation's classes."""

    mapping: dict[str, list[str]]
    model_classes: list[str]
    source: str | None = None  # the class-map file, None for the identity

    @classmethod
    def identity(cls, model_classes: list[str]) -> "ClassMapping":
        return cls({c: [c] for c in model_classes}, list(model_classes))

    @classmethod
    def load(cls, path: str | Path | None, model_classes: list[str]) -> "ClassMapping":
        """JSON ``{"Apple": ["Apple Braeburn", "Apple Red 1"], "Kiwi": "Kiwi"}``; None: the identity."""
        if path is None:
            return cls.identity(model_classes)
        try:
            raw = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: class map not found") from None
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: class map is not valid JSON ({exc})", 'write it as {"data class": ["model class", ...]}'
            ) from None
        if not isinstance(raw, dict) or not raw:
            raise DataError(
                f"{path}: a class map is a non-empty JSON object", 'write it as {"data class": ["model class", ...]}'
            )
        out = {}
        for k, v in raw.items():
            targets = [v] if isinstance(v, str) else list(v) if isinstance(v, list) else None
            if not targets or not all(isinstance(t, str) for t in targets):
                raise DataError(f"{path}: '{k}' must map to a model class name or a list of them, not {v!r}")
            unknown = [t for t in targets if t not in model_classes]
            if unknown:
                raise DataError(
                    f"{path}: '{k}' maps to {', '.join(unknown)}, which the model does not know",
                    f"model classes: {', '.join(model_classes)}",
                )
            out[k] = targets
        return cls(out, list(model_classes), str(path))

    @property
    def columns(self) -> list[str]:
        """The evaluation's classes: the data's (sorted), plus ``(other)`` when a class map leaves model classes out."""
        if self.source is None:
            return list(self.model_classes)
        covered = {mc for mcs in self.mapping.values() for mc in mcs}
        return sorted(self.mapping) + ([OTHER] if len(covered) < len(self.model_classes) else [])

    def collapse(self, probs: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """(n, model classes) probabilities -> (n, columns): each data class gets the sum of its model classes.

        A model class that several data classes list (every Fruits-360 apple counts for every GroceryStore apple
        variety) counts for the image's own class ``y`` (column indices) where that class lists it, else for the first
        data class that does; one listed by none goes to ``(other)``. Each row still sums to 1.
        """
        if self.source is None:
            return probs
        columns = self.columns
        owners: dict[str, list[int]] = {}
        for dc in sorted(self.mapping):
            for mc in self.mapping[dc]:
                owners.setdefault(mc, []).append(columns.index(dc))
        out = np.zeros((len(probs), len(columns)))
        rows = np.arange(len(probs))
        for j, mc in enumerate(self.model_classes):
            cols = owners.get(mc, [len(columns) - 1])
            target = np.full(len(probs), cols[0])
            if y is not None and len(cols) > 1:
                target = np.where(np.isin(y, cols), y, cols[0])
            np.add.at(out, (rows, target), probs[:, j])
        return out

    def predicted(self, probs: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """The column of each image's top model class: what ``predict`` answers, mapped (right when the class map
        lists that class for the image's own class). Summed probabilities (``collapse``) can disagree: ten model
        classes that no data class lists, each a little likely, outweigh the one class the model picked."""
        if self.source is None:
            return probs.argmax(axis=1)
        top = np.zeros_like(probs)
        top[np.arange(len(probs)), probs.argmax(axis=1)] = 1.0
        return self.collapse(top, y).argmax(axis=1)

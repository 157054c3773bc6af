"""fruitlens's own checkpoint: everything needed to rebuild the model (nanoGPT style), as tensors and plain data only.

It is read with ``torch.load(weights_only=True)``: a run folder someone sent you cannot run code on your machine
through it (a pickled object in the file is refused, not executed).
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fruitlens.errors import RunDirError
from fruitlens.models.ood import OODScorer
from fruitlens.models.preprocessing import Preprocessing
from fruitlens.models.registry import FruitNet, build_model

log = logging.getLogger(__name__)

FORMAT = 3  # 2: the head's temperature and the out-of-distribution statistics may be present; 3: the feature layer,
# and the head's standardisation (head.0) before its Dropout (head.1) and Linear (head.2)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (eval mode), its classes and the plain data saved beside it."""

    model: FruitNet
    classes: list[str]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def parameters(self) -> int:
        from fruitlens.models.registry import model_parameters

        return model_parameters(self.model)


def save_model(path: Path, model: FruitNet, classes: list[str], extra: dict[str, Any] | None = None) -> Path:
    """Writes ``model`` with its name, sizes, preprocessing, classes and ``extra`` (plain data or tensors only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "fruitlens_format": FORMAT,
        "model_name": model.name,
        "feature_layer": model.feature_layer,
        "num_classes": model.num_classes,
        "dropout": model.dropout,
        "preprocessing": model.preprocessing.to_dict(),
        "classes": list(classes),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **(extra or {}),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The raw payload, loaded without unpickling code; a file that needs more than tensors and plain data is
    refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RunDirError(
            f"{path}: checkpoint not found", "train a model first: fruitlens train DATA --out RUN"
        ) from None
    except pickle.UnpicklingError as exc:
        raise refused(path, exc) from None
    except Exception as exc:
        raise RunDirError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None


def refused(path: Path, exc: Exception) -> RunDirError:
    """The error for a checkpoint that ``weights_only`` loading refused: it holds more than tensors and plain data."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return RunDirError(
        f"{path}: refused to load: the checkpoint holds Python objects that could run code ({first[:160]})",
        "only open run folders you trust; retrain, or ask the sender for the run's export/model.onnx",
    )


def load_model(path: Path) -> Checkpoint:
    """Rebuilds the FruitNet from ``save_model``'s file, without touching any weights cache."""
    ckpt = read_checkpoint(Path(path))
    if not isinstance(ckpt, dict) or "fruitlens_format" not in ckpt:
        raise RunDirError(f"{path}: not a fruitlens checkpoint")
    pre = Preprocessing.from_dict(ckpt["preprocessing"])
    model = build_model(
        ckpt["model_name"],
        ckpt["num_classes"],
        weights="none",
        img_size=pre.image_size,
        dropout=ckpt.get("dropout", 0.2),
        feature_layer=ckpt.get("feature_layer", "last"),
    )
    model.preprocessing = pre
    state = ckpt["state_dict"]
    if ckpt["fruitlens_format"] < 3:  # Dropout + Linear: the Linear was head.1; no standardisation (the identity)
        state = {("head.2." + k.removeprefix("head.1.") if k.startswith("head.1.") else k): v for k, v in state.items()}
        state.update({f"head.0.{k}": v for k, v in model.standardise.state_dict().items()})
    ood = {k.removeprefix("ood."): v for k, v in state.items() if k.startswith("ood.")}
    if ood:
        model.ood = OODScorer.from_state(ood)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise RunDirError(f"{path}: the weights do not fit {ckpt['model_name']} ({str(exc).splitlines()[0]})") from None
    extra = {k: v for k, v in ckpt.items() if k not in ("state_dict", "preprocessing", "classes")}
    return Checkpoint(model.eval(), list(ckpt["classes"]), extra)

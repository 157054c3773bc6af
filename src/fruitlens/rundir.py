"""``RunDir``: one folder with fixed names that every command after ``train`` reads.

config.yaml, manifest.csv, labels.json, checkpoints/best.ckpt, history.csv, report.json, report.html, plots/, export/
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fruitlens.errors import RunDirError

_MAKES = {
    "config.yaml": "fruitlens train DATA --out {run}",
    "manifest.csv": "fruitlens train DATA --out {run}",
    "labels.json": "fruitlens train DATA --out {run}",
    "checkpoints/best.ckpt": "fruitlens train DATA --out {run}  (or --resume {run} after an interruption)",
    "history.csv": "fruitlens train DATA --out {run}",
    "report.json": "fruitlens evaluate {run}",
    "export/model.onnx": "fruitlens export {run} --format onnx",
}


@dataclass(frozen=True)
class RunDir:
    """Paths of a run folder; ``require`` names a missing file and the command that makes it."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    config = property(lambda self: self.path / "config.yaml")
    manifest = property(lambda self: self.path / "manifest.csv")
    labels = property(lambda self: self.path / "labels.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    best_ckpt = property(lambda self: self.path / "checkpoints" / "best.ckpt")
    history = property(lambda self: self.path / "history.csv")
    report_json = property(lambda self: self.path / "report.json")
    report_html = property(lambda self: self.path / "report.html")
    plots = property(lambda self: self.path / "plots")
    export = property(lambda self: self.path / "export")
    facts = property(lambda self: self.path / "facts.json")

    def require(self, *names: str) -> "RunDir":
        if not self.path.is_dir():
            raise RunDirError(f"{self.path}: no such run folder", f"make one with: fruitlens train DATA --out {self.path}")
        for name in names:
            if not (self.path / name).exists():
                make = _MAKES.get(name, "fruitlens train DATA --out {run}").format(run=self.path)
                raise RunDirError(f"{self.path}: run folder lacks {name}", f"make it with: {make}")
        return self

    def read_labels(self) -> list[str]:
        self.require("labels.json")
        return json.loads(self.labels.read_text())

    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(obj, indent=2, default=str))
        return p

    def read_json(self, name: str) -> Any:
        self.require(name)
        return json.loads((self.path / name).read_text())

    def write_history(self, rows: list[dict]) -> None:
        if not rows:
            return
        keys = list(rows[0])
        with self.history.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)

    def read_history(self) -> list[dict]:
        if not self.history.is_file():
            return []
        with self.history.open(newline="") as fh:
            return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, tuples -> lists, so that JSON stays standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _num(v: str):
    try:
        return float(v) if v not in ("", "None") else None
    except ValueError:
        return v


def save_model(path: Path, model, classes: list[str], extra: dict | None = None) -> None:
    """A checkpoint that carries everything needed to rebuild the model (nanoGPT style)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "fruitlens_format": 1,
        "model_name": model.name,
        "num_classes": model.num_classes,
        "dropout": float(model.head[0].p),
        "preprocessing": model.preprocessing.to_dict(),
        "classes": list(classes),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **(extra or {}),
    }
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_model(path: Path):
    """Rebuilds a FruitNet from ``save_model``'s file, without touching any weights cache."""
    from fruitlens.models.preprocessing import Preprocessing
    from fruitlens.models.registry import build_model

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise RunDirError(f"{path}: checkpoint not found", "train a model first: fruitlens train DATA --out RUN") from None
    except Exception as exc:
        raise RunDirError(f"{path}: cannot read checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or "fruitlens_format" not in ckpt:
        raise RunDirError(f"{path}: not a fruitlens checkpoint")
    pre = Preprocessing.from_dict(ckpt["preprocessing"])
    model = build_model(ckpt["model_name"], ckpt["num_classes"], weights="none", img_size=pre.image_size,
                        dropout=ckpt.get("dropout", 0.2))
    model.preprocessing = pre
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt["classes"], ckpt

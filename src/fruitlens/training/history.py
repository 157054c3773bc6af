"""``history.csv``: one row per epoch of every phase (phase, epoch, train/val loss and accuracy, lr, seconds)."""
from __future__ import annotations

import csv
from pathlib import Path

FIELDS = ("phase", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")


def write_history(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")  # atomic: a kill mid-write leaves the previous file
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def read_history(path: Path) -> list[dict]:
    """The rows of ``write_history`` with numbers as floats (None where empty); [] without a file."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def _num(v: str):
    try:
        return float(v) if v not in ("", "None") else None
    except ValueError:
        return v

"""``history.csv``: one ``HistoryRow`` per epoch of every phase (phase, epoch, train/val loss and accuracy, lr,
seconds)."""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass
class HistoryRow:
    """One epoch: the phase it belongs to, its number within the phase, its figures (None where not measured)."""

    phase: str = ""
    epoch: int = 0
    train_loss: float | None = None
    train_acc: float | None = None
    val_loss: float | None = None
    val_acc: float | None = None
    lr: float | None = None
    seconds: float | None = None


FIELDS = tuple(f.name for f in fields(HistoryRow))


def write_history(path: Path, rows: list[HistoryRow]) -> None:
    if not rows:
        return
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")  # atomic: a kill mid-write leaves the previous file
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(asdict(r) for r in rows)
    tmp.replace(path)


def read_history(path: Path) -> list[HistoryRow]:
    """The rows of ``write_history``; [] without a file."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [
            HistoryRow(
                phase=row.get("phase") or "",
                epoch=int(float(row.get("epoch") or 0)),
                **{k: _num(row.get(k)) for k in FIELDS[2:]},
            )
            for row in csv.DictReader(fh)
        ]


def _num(v: str | None) -> float | None:
    try:
        return float(v) if v not in ("", "None", None) else None
    except ValueError:
        return None

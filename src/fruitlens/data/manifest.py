"""``Record`` and ``Manifest``: the list of images that every command after ``scan`` works on."""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

from fruitlens.errors import DataError

SPLITS = ("train", "val", "test")
CSV_FIELDS = ("path", "label", "split", "group", "hash")


@dataclass(frozen=True)
class Record:
    """One image: where it is, its class, its split ('' before splitting) and its duplicate group."""

    path: str
    label: str
    split: str = ""
    group: str = ""
    hash: str = ""


@dataclass(frozen=True)
class Manifest:
    """An immutable list of records with the class list derived from them."""

    records: tuple[Record, ...]
    root: str = ""  # the folder relative paths are resolved against ('' for absolute paths)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    @property
    def classes(self) -> list[str]:
        return sorted({r.label for r in self.records})

    @property
    def splits(self) -> list[str]:
        present = {r.split for r in self.records}
        return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS) - {""})

    def by_split(self) -> dict[str, "Manifest"]:
        out: dict[str, list[Record]] = {}
        for r in self.records:
            out.setdefault(r.split, []).append(r)
        return {s: Manifest(tuple(rs), self.root) for s, rs in out.items()}

    def split(self, name: str) -> "Manifest":
        return Manifest(tuple(r for r in self.records if r.split == name), self.root)

    def counts(self) -> dict[str, Counter]:
        """``{split: Counter(label -> n)}``."""
        out: dict[str, Counter] = {}
        for r in self.records:
            out.setdefault(r.split, Counter())[r.label] += 1
        return out

    def resolve(self, record: Record) -> Path:
        p = Path(record.path)
        return p if p.is_absolute() or not self.root else Path(self.root) / p

    def paths(self) -> list[Path]:
        return [self.resolve(r) for r in self.records]

    def with_records(self, records: Iterable[Record]) -> "Manifest":
        return replace(self, records=tuple(records))

    def to_csv(self, path: Path) -> None:
        """Writes absolute paths so the manifest works from any folder."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(CSV_FIELDS)
            for r in self.records:
                w.writerow([str(self.resolve(r).resolve()), r.label, r.split, r.group, r.hash])

    @classmethod
    def from_csv(cls, path: Path) -> "Manifest":
        """Reads a manifest CSV (columns path,label[,split,group,hash]); relative paths resolve beside the CSV."""
        path = Path(path)
        try:
            with path.open(newline="") as fh:
                rows = list(csv.DictReader(fh))
        except FileNotFoundError:
            raise DataError(f"{path}: manifest not found") from None
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{path}: not a readable CSV ({exc})") from None
        if not rows:
            raise DataError(
                f"{path}: manifest has no rows", "it needs a header path,label[,split] and one row per image"
            )
        missing = {"path", "label"} - set(rows[0])
        if missing:
            raise DataError(
                f"{path}: manifest lacks column(s) {', '.join(sorted(missing))}; found {', '.join(rows[0])}",
                "the header must be path,label[,split,group,hash]",
            )
        records = []
        for i, row in enumerate(rows, start=2):
            if not row["path"] or not row["label"]:
                raise DataError(f"{path}:{i}: empty path or label")
            split = _normalise_split(row.get("split") or "")
            records.append(Record(row["path"], row["label"], split, row.get("group") or "", row.get("hash") or ""))
        return cls(tuple(records), str(path.parent.resolve()))


_SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


def _normalise_split(name: str) -> str:
    return _SPLIT_ALIASES.get(name.strip().lower(), name.strip().lower())


def split_alias(name: str) -> str | None:
    """'Training' -> 'train', 'VALIDATION' -> 'val'; None for a name that is no split folder."""
    return _SPLIT_ALIASES.get(name.strip().lower())

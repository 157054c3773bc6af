"""Labels CSV files in and out: ``to-label.csv`` (``suggest`` writes it, a person or a script fills in the labels)
and the labelled photos ``train --add`` reads back.

A labels CSV has at least the columns ``path,label``; paths are absolute or relative to the CSV's folder. A label is a
class of the data, a new class name, or ``-`` for "skip this photo". Rows that cannot be used (no such file, not an
image, an empty label, a copy of an image of the data) are left out and listed with the reason; nothing is moved or
changed.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fruitlens.data.check import FileInfo, analyse_files, duplicate_pairs
from fruitlens.data.manifest import Manifest
from fruitlens.errors import DataError

log = logging.getLogger(__name__)

SKIP = "-"
TO_LABEL_FIELDS = ("path", "label", "guess", "score", "top_k", "why", "near_copies")
MAX_LABEL = 100  # characters: a class name, not a sentence


@dataclass(frozen=True)
class ToLabel:
    """One row of ``to-label.csv``: a photo to label, the model's guess (the label until a person changes it)."""

    path: str
    guess: str
    score: float
    top_k: tuple[tuple[str, float], ...]
    why: str
    near_copies: int = 0
    label: str = ""  # empty: the guess

    def row(self) -> dict[str, str]:
        return {
            "path": self.path,
            "label": self.label or self.guess,
            "guess": self.guess,
            "score": f"{self.score:.4f}",
            "top_k": "; ".join(f"{c} {s:.3f}" for c, s in self.top_k),
            "why": self.why,
            "near_copies": str(self.near_copies),
        }


def write_to_label(rows: list[ToLabel], path: Path) -> Path:
    """Writes ``to-label.csv`` (absolute paths, so that it works from any folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=TO_LABEL_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow(r.row())
    tmp.replace(path)
    return path


def read_to_label(path: Path) -> list[ToLabel]:
    """The rows of a to-label.csv (``suggest``'s), its labels as given ('' where a row has none)."""
    out = []
    for _, row in _rows(Path(path)):
        raw = (row.get("path") or "").strip()
        if not raw:
            continue
        p = Path(raw) if Path(raw).is_absolute() else Path(path).resolve().parent / raw
        top = []
        for item in (row.get("top_k") or "").split(";"):
            name, _, score = item.strip().rpartition(" ")
            try:
                top.append((name, float(score)))
            except ValueError:
                continue
        guess = (row.get("guess") or "").strip() or (top[0][0] if top else "")
        score = float(row.get("score") or (top[0][1] if top else 0) or 0)
        label = (row.get("label") or "").strip()
        out.append(
            ToLabel(
                str(p),
                guess,
                score,
                tuple(top) or ((guess, score),),
                (row.get("why") or "").strip(),
                int(row.get("near_copies") or 0),
                "" if label == guess else label,
            )
        )
    return out


@dataclass(frozen=True)
class LabelledPhoto:
    """A photo of the user's setting with the label a person gave it; ``where`` is its CSV file and line."""

    path: str
    label: str
    where: str
    guess: str = ""  # the model's guess, where the CSV has one (to-label.csv)


@dataclass
class LabelledPhotos:
    """The usable labelled photos (with what the check learnt of each file) and the rows left out, with why."""

    photos: list[LabelledPhoto] = field(default_factory=list)
    files: list[FileInfo] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (CSV:line path, why)
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.photos)

    @property
    def classes(self) -> list[str]:
        return sorted({p.label for p in self.photos})

    def counts(self) -> Counter:
        return Counter(p.label for p in self.photos)

    def manifest(self) -> Manifest:
        """The photos as a manifest (split ``photos``), for the datasets that decode them."""
        from fruitlens.data.manifest import Record

        return Manifest(tuple(Record(p.path, p.label, "photos", "", f.sha1) for p, f in zip(self.photos, self.files)))

    def skipped_text(self, limit: int = 5) -> str:
        why = Counter(w.split(":")[0] for _, w in self.skipped)
        return ", ".join(f"{n} {w}" for w, n in why.most_common(limit))

    def without(self, drop: set[int], why: dict[int, str]) -> "LabelledPhotos":
        """A copy without the photos at ``drop``, each listed as skipped with ``why[i]``."""
        keep = [i for i in range(len(self.photos)) if i not in drop]
        skipped = self.skipped + [(f"{self.photos[i].where} {self.photos[i].path}", why[i]) for i in sorted(drop)]
        return LabelledPhotos([self.photos[i] for i in keep], [self.files[i] for i in keep], skipped, self.sources)


def _bad_label(label: str) -> str | None:
    if not label:
        return "empty label: fill in a class, a new class name, or '-' to skip the photo"
    if len(label) > MAX_LABEL:
        return f"label longer than {MAX_LABEL} characters"
    if any(ord(ch) < 32 or ch in "/\\" for ch in label):
        return "label holds a control character or a slash: class names become folder names"
    return None


def read_labels(sources: list[str | Path], workers: int = 0) -> LabelledPhotos:
    """The labelled photos of every CSV in ``sources`` (a later row for the same file wins). Raises ``DataError``
    for a CSV that cannot be read, and when no usable labelled photo is left."""
    rows: dict[str, LabelledPhoto] = {}
    out = LabelledPhotos(sources=[str(Path(s).resolve()) for s in sources])
    total = 0
    for source in sources:
        for line, row in _rows(Path(source)):
            total += 1
            where = f"{Path(source).name}:{line}"
            raw, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            if not raw:
                out.skipped.append((where, "no path"))
                continue
            path = Path(raw) if Path(raw).is_absolute() else Path(source).resolve().parent / raw
            if label == SKIP:
                out.skipped.append((f"{where} {raw}", "skip: marked '-'"))
                continue
            if why := _bad_label(label):
                out.skipped.append((f"{where} {raw}", why))
                continue
            if not path.is_file():
                out.skipped.append((f"{where} {raw}", f"no such file: {path}"))
                continue
            key = str(path.resolve())
            if key in rows and rows[key].label != label:
                out.skipped.append((f"{rows[key].where} {raw}", f"relabelled: {where} says '{label}'"))
            rows[key] = LabelledPhoto(key, label, where, (row.get("guess") or "").strip())
    photos = list(rows.values())
    infos = analyse_files([p.path for p in photos], workers)
    for p, f in zip(photos, infos):
        if f.ok:
            out.photos.append(p)
            out.files.append(f)
        else:
            out.skipped.append((f"{p.where} {p.path}", f"not a readable image: {f.detail or f.error}"))
    if not out.photos:
        why = f" ({out.skipped_text()})" if out.skipped else ""
        raise DataError(
            f"{', '.join(map(str, sources))}: none of its {total} row(s) is a usable labelled photo{why}",
            "fill the label column with a class name (or '-' to skip a photo); paths are absolute or "
            "relative to the CSV's folder",
        )
    for where, why in out.skipped[:10]:
        log.warning("labels: left out %s (%s)", where, why)
    if len(out.skipped) > 10:
        log.warning("labels: ... and %d more rows left out", len(out.skipped) - 10)
    guessed = [p for p in out.photos if p.guess]
    if len(guessed) >= 10 and all(p.label == p.guess for p in guessed):
        log.warning(
            "labels: every one of the %d labels is the model's own guess: were they checked? A wrong guess "
            "kept as a label teaches the model its own mistake (label them on label.html)",
            len(guessed),
        )
    return out


def _rows(path: Path) -> list[tuple[int, dict[str, str]]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            rows = [(i, row) for i, row in enumerate(reader, start=2)]
    except FileNotFoundError:
        raise DataError(
            f"{path}: labels file not found",
            "pass the to-label.csv that 'fruitlens suggest' wrote, or any CSV with the columns path,label",
        ) from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(
            f"{path}: not a readable CSV ({exc})", "save it as UTF-8 CSV with the columns path,label"
        ) from None
    missing = {"path", "label"} - set(fields)
    if missing:
        raise DataError(
            f"{path}: lacks the column(s) {', '.join(sorted(missing))}; found {', '.join(fields) or 'none'}",
            "a labels CSV needs the columns path,label (paths absolute or relative to the CSV)",
        )
    return rows


def refuse_copies(
    photos: LabelledPhotos, data: Manifest, data_files: list[FileInfo], distance: int = 4
) -> LabelledPhotos:
    """The photos without those that are (near) copies of an image of ``data``: one in the test split would
    flatter the test figure, one in train or val is there already. Each is listed with the image it copies."""
    n = len(data_files)
    pairs, _ = duplicate_pairs(list(data_files) + list(photos.files), distance)
    why: dict[int, str] = {}
    for a, b in pairs.tolist():
        if (a < n) == (b < n):
            continue
        d, p = (a, b - n) if a < n else (b, a - n)
        if p in why:
            continue
        record = data.records[d]
        split = record.split or "the data"
        leak = " (it would leak into the test figure)" if split == "test" else ""
        why[p] = f"copy of a {split} image: {data.resolve(record)}{leak}"
    if why:
        log.warning(
            "labels: %d photo(s) are copies of images of the data and are left out, e.g. %s: %s",
            len(why),
            photos.photos[min(why)].path,
            why[min(why)],
        )
    out = photos.without(set(why), why)
    if not out.photos:
        raise DataError(
            "every labelled photo is a copy of an image of the training data",
            "label photos of the setting the model will be used in, not images of DATA",
        )
    return out

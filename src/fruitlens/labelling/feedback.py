"""Labels given on the service: ``serve --feedback DIR`` (a "wrong? pick the right fruit" answer on the upload page)
and ``serve --label PHOTOS`` (the labelling page for a folder of photos, answers saved on the server).

``FeedbackStore`` keeps each photo once, named by its content hash (never a name or path from the client), after it
decodes as an image, within a count and a size in bytes; its ``labels.csv`` (``path,label,...``) is what
``fruitlens train --add DIR/labels.csv`` reads. ``LabelSession`` holds the photos of one folder (or a to-label.csv)
and writes the answers given so far to a to-label.csv that ``--add`` reads too; the photos are never touched.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fruitlens.errors import ConfigError, ImageError
from fruitlens.labelling.labels import SKIP, ToLabel, _bad_label, write_to_label
from fruitlens.models.preprocessing import decode

FEEDBACK_FIELDS = ("path", "label", "predicted", "score", "time")
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


class FeedbackRefused(Exception):
    """An answer the store will not keep; ``status`` is the HTTP status that says why."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message, self.status = message, status


@dataclass(frozen=True)
class Saved:
    path: str  # relative to the store's folder
    label: str
    labelled: int  # rows in labels.csv
    new: bool  # the photo was not in the store before


def check_label(label: str) -> str:
    """The label stripped, or ``FeedbackRefused`` (422) saying what is wrong with it."""
    label = (label or "").strip()
    why = "a label of '-' skips a photo; give a class name" if label == SKIP else _bad_label(label)
    if why:
        raise FeedbackRefused(f"label {label[:40]!r}: {why}", 422)
    return label


class FeedbackStore:
    """Photos and their labels under ``folder``: ``photos/<sha256>.<ext>`` and ``labels.csv``."""

    def __init__(self, folder: str | Path, max_photos: int = 10_000, max_mb: float = 2048.0) -> None:
        self.folder = Path(folder)
        self.photos = self.folder / "photos"
        self.csv = self.folder / "labels.csv"
        self.max_photos, self.max_bytes = max_photos, int(max_mb * 2**20)
        try:
            self.photos.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"--feedback {folder}: cannot create the folder ({exc.strerror})", "pass a folder you can write to"
            ) from None
        self._lock = threading.Lock()

    def _usage(self) -> tuple[int, int]:
        files = [p for p in self.photos.iterdir() if p.is_file()]
        return len(files), sum(p.stat().st_size for p in files)

    def add(self, data: bytes, label: str, predicted: str = "", score: float | None = None) -> Saved:
        """Keeps the photo (once) and appends its label; raises ``FeedbackRefused`` for a bad label, a file that is
        not an image, or a full store."""
        label = check_label(label)
        try:
            with io.BytesIO(data) as fh:
                from PIL import Image

                fmt = Image.open(fh).format or ""
            decode(data)  # the whole file decodes, as training will decode it
        except ImageError as exc:
            raise FeedbackRefused(exc.message, 415 if exc.reason == "not-an-image" else 422) from None
        except Exception:
            raise FeedbackRefused("not an image (expected JPEG, PNG, WebP, BMP, GIF or TIFF)", 415) from None
        name = hashlib.sha256(data).hexdigest() + EXTENSIONS.get(fmt, ".img")
        target = self.photos / name
        with self._lock, open(self.folder / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # other worker processes of the service write here too
            new = not target.exists()
            if new:
                count, used = self._usage()
                if count >= self.max_photos or used + len(data) > self.max_bytes:
                    raise FeedbackRefused(
                        f"the feedback store {self.folder} is full ({count} photos, "
                        f"{used / 2**20:.0f} MB): train with it, then start a new one",
                        507,
                    )
                tmp = target.with_name(f".{name}.{os.getpid()}.tmp")
                tmp.write_bytes(data)
                tmp.replace(target)
            first = not self.csv.exists()
            with self.csv.open("a", newline="") as fh:
                w = csv.writer(fh)
                if first:
                    w.writerow(FEEDBACK_FIELDS)
                w.writerow(
                    [
                        f"photos/{name}",
                        label,
                        predicted,
                        "" if score is None else f"{score:.4f}",
                        time.strftime("%Y-%m-%dT%H:%M:%S"),
                    ]
                )
            with self.csv.open(newline="") as fh:
                labelled = sum(1 for _ in fh) - 1
        return Saved(f"photos/{name}", label, labelled, new)


class LabelSession:
    """The labelling page's photos on the service and the answers given so far, saved to ``out`` on every answer
    (a to-label.csv: unanswered photos are '-')."""

    def __init__(self, rows: list[ToLabel], out: str | Path) -> None:
        self.rows = list(rows)
        self.out = Path(out)
        self._lock = threading.Lock()
        self.answers = [""] * len(self.rows)
        if self.out.is_file():  # answers of an earlier session on the same photos
            with self.out.open(newline="") as fh:
                given = {r.get("path", ""): (r.get("label") or "").strip() for r in csv.DictReader(fh)}
            self.answers = [given.get(r.path, "") for r in self.rows]
            self.answers = ["" if a == SKIP else a for a in self.answers]

    def answer(self, index: int, label: str) -> int:
        """Records ``label`` ('' to undo, '-' to skip) for photo ``index``; returns how many photos are labelled."""
        if not 0 <= index < len(self.rows):
            raise FeedbackRefused(f"no photo number {index} (0 to {len(self.rows) - 1})", 404)
        label = (label or "").strip()
        if label not in ("", SKIP):
            label = check_label(label)
        with self._lock:
            self.answers[index] = label
            given = [
                ToLabel(r.path, r.guess, r.score, r.top_k, r.why, r.near_copies, a or SKIP)
                for r, a in zip(self.rows, self.answers)
            ]
            write_to_label(given, self.out)
            return sum(1 for a in self.answers if a and a != SKIP)

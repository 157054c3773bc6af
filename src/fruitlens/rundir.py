"""``RunDir``: one folder with fixed names that every command after ``train`` reads. Paths, checks and the lock only.

config.yaml, manifest.csv, labels.json, facts.json, checkpoints/best.ckpt, history.csv, train_info.json, report.json,
report.html, plots/, export/model.onnx, eval/<data>/ (reports on other data), cache/ (the feature cache), photos.csv
(the labelled photos of the user's setting, ``train --add``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from fruitlens.errors import RunDirError

_TRAIN = "fruitlens train DATA --out {run}"
_MAKES = {
    "checkpoints/best.ckpt": _TRAIN + "  (or 'fruitlens train --resume {run}' after an interruption)",
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
    facts = property(lambda self: self.path / "facts.json")
    checkpoints = property(lambda self: self.path / "checkpoints")
    best_ckpt = property(lambda self: self.path / "checkpoints" / "best.ckpt")
    history = property(lambda self: self.path / "history.csv")
    train_info = property(lambda self: self.path / "train_info.json")
    report_json = property(lambda self: self.path / "report.json")
    report_html = property(lambda self: self.path / "report.html")
    model_card = property(lambda self: self.path / "MODEL_CARD.md")
    plots = property(lambda self: self.path / "plots")
    export = property(lambda self: self.path / "export")
    onnx = property(lambda self: self.path / "export" / "model.onnx")
    cache = property(lambda self: self.path / "cache")
    photos = property(lambda self: self.path / "photos.csv")  # the labelled photos of the setting (train --add)
    photos_json = property(lambda self: self.path / "photos.json")  # the figures on them (PhotoNote)
    label_audit = property(lambda self: self.path / "label_audit.json")  # the label audit (LabelAudit)

    def eval_dir(self, name: str) -> Path:
        """``eval/<name>/``: where a report on other data goes, so that the run's own report stays as it is."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "data"
        return self.path / "eval" / safe

    def require(self, *names: str) -> "RunDir":
        if not self.path.is_dir():
            raise RunDirError(f"{self.path}: no such run folder", f"make one with: {_TRAIN.format(run=self.path)}")
        for name in names:
            if not (self.path / name).exists():
                make = _MAKES.get(name, _TRAIN).format(run=self.path)
                raise RunDirError(f"{self.path}: run folder lacks {name}", f"make it with: {make}")
        return self

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Holds ``.lock`` in the run folder for as long as a command writes the run; a second command that asks for
        the same folder meanwhile gets a RunDirError instead of mixing its files into the first one's."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
                raise RunDirError(
                    f"{self.path}: another fruitlens command (pid {holder}) is writing this run folder",
                    "wait for it to finish, or pass another --out",
                ) from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield
        finally:
            os.close(fd)  # closing releases the lock; the file stays (removing it would race a waiting process)

"""Photos with no labels (yet): any folder of images, searched to any depth, its folder names never read as labels.

``--adapt-to`` reads such a folder, ``suggest`` picks the photos of one worth labelling, and ``serve --label`` shows
them. Unreadable files are left out and listed, never fatal; near copies (bursts, the same shelf twice) are found
with the check's own rule, so that a person is not asked to label one photo twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fruitlens.data.check import FileInfo, analyse_files, duplicate_pairs
from fruitlens.data.hashing import connected_groups
from fruitlens.data.scan import _hidden, is_image_file
from fruitlens.errors import DataError

log = logging.getLogger(__name__)


def find_photos(source: str | Path, what: str = "--adapt-to") -> list[str]:
    """Every image file under ``source`` (any depth; folder names are not read as labels), or the paths listed in a
    text file, one per line (relative to the file's folder). Raises ``DataError`` when there is none; ``what``
    names the option or argument in the message."""
    src = Path(source)
    if not src.exists():
        raise DataError(
            f"{what} {source}: no such file or folder",
            "pass a folder of photos of the setting the model will be used in",
        )
    if src.is_file():
        lines = [ln.strip() for ln in src.read_text(errors="replace").splitlines() if ln.strip()]
        paths = [str((src.parent / p) if not Path(p).is_absolute() else Path(p)) for p in lines]
    else:
        paths = sorted(
            str(p)
            for p in src.rglob("*")
            if p.is_file() and is_image_file(p) and not any(_hidden(part) for part in p.relative_to(src).parts)
        )
    if not paths:
        raise DataError(
            f"{what} {source}: no image files found",
            "pass a folder with photos (JPEG, PNG, WebP, ...); subfolders are searched too",
        )
    return paths


@dataclass
class Photos:
    """The photos that decode (with what the check learnt of each) and the files left out, with the reason."""

    paths: list[str] = field(default_factory=list)
    files: list[FileInfo] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why)

    def __len__(self) -> int:
        return len(self.paths)


def read_photos(paths: list[str], workers: int = 0, what: str = "--adapt-to") -> Photos:
    """Decodes every file once (the check's decode); bad files are left out and listed. Raises ``DataError`` when
    none decodes."""
    infos = analyse_files(paths, workers)
    out = Photos()
    for p, f in zip(paths, infos):
        if f.ok:
            out.paths.append(p)
            out.files.append(f)
        else:
            out.skipped.append((p, f.detail or f.error or "not a readable image"))
    for p, why in out.skipped[:10]:
        log.warning("%s: skipping %s (%s)", what, p, why)
    if len(out.skipped) > 10:
        log.warning("%s: ... and %d more unreadable files", what, len(out.skipped) - 10)
    if not out.paths:
        raise DataError(
            f"{what}: none of the {len(paths)} files can be decoded as an image",
            "run 'fruitlens check' on the folder to see why",
        )
    return out


def readable(paths: list[str], workers: int = 0) -> tuple[list[str], list[str]]:
    """(paths that decode, paths that do not): bad files are left out and listed, never fatal."""
    photos = read_photos(paths, workers)
    return photos.paths, [p for p, _ in photos.skipped]


def near_copy_groups(files: list[FileInfo], distance: int = 4) -> np.ndarray:
    """A group id per photo: photos linked by exact or near copies (the check's perceptual hash and colour rule)
    share one."""
    pairs, _ = duplicate_pairs(files, distance, np.zeros(len(files), dtype=np.int64))
    return connected_groups(len(files), pairs)

"""``fruitlens relabel``: a person's decisions in ``label_issues.csv`` applied to a copy of the data or to a manifest.

The ``new_label`` column says, per image: empty (keep the label), a class name (relabel), or ``drop`` (leave the
image out). The user's files are never moved, renamed or deleted: ``--out`` copies every image into a new folder
tree, ``--manifest`` writes a CSV that points at the images where they are.
"""

from __future__ import annotations

import csv
import logging
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from fruitlens.data.manifest import Manifest
from fruitlens.errors import DataError

log = logging.getLogger(__name__)

DROP = {"drop", "delete", "remove", "exclude", "-"}


@dataclass
class RelabelResult:
    manifest: Manifest  # the data with the decisions applied (paths of the written copy, or of the originals)
    relabelled: int = 0
    dropped: int = 0
    new_classes: list[str] = field(default_factory=list)
    unknown_paths: list[str] = field(default_factory=list)  # rows of the CSV that name no image of the data
    written: str = ""


def read_decisions(csv_path: Path) -> dict[str, str]:
    """Resolved path -> new label (or ``drop``), for the rows with a ``new_label``."""
    try:
        with Path(csv_path).open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except FileNotFoundError:
        raise DataError(
            f"{csv_path}: not found", "pass the label_issues.csv that 'fruitlens check --labels' wrote"
        ) from None
    if rows and not {"path", "new_label"} <= set(rows[0]):
        raise DataError(
            f"{csv_path}: needs the columns path and new_label; found {', '.join(rows[0])}",
            "fill in the new_label column of label_issues.csv",
        )
    out = {}
    for n, row in enumerate(rows, start=2):
        new = (row.get("new_label") or "").strip()
        if new:
            if "/" in new or "\\" in new or new in (".", ".."):
                raise DataError(f"{csv_path}:{n}: new_label '{new}' is not a class name", "a folder name, or drop")
            out[str(Path(row["path"]).resolve())] = "drop" if new.lower() in DROP else new
    return out


def apply_decisions(manifest: Manifest, decisions: dict[str, str]) -> RelabelResult:
    """The manifest with the decisions applied; paths stay the originals."""
    classes = set(manifest.classes)
    records, result = [], RelabelResult(manifest)
    seen = set()
    for r in manifest:
        key = str(manifest.resolve(r).resolve())
        seen.add(key)
        new = decisions.get(key)
        if new == "drop":
            result.dropped += 1
            continue
        if new and new != r.label:
            result.relabelled += 1
            if new not in classes and new not in result.new_classes:
                result.new_classes.append(new)
            r = replace(r, label=new)
        records.append(replace(r, path=key))
    result.unknown_paths = sorted(set(decisions) - seen)
    result.manifest = Manifest(tuple(records), "")
    return result


def copy_tree(result: RelabelResult, source: Manifest, out: Path, data_root: Path) -> None:
    """Copies every kept image to ``out/[<split>/]<label>/<file>``; refuses an ``out`` inside the data or not empty."""
    out = Path(out).resolve()
    root = Path(data_root).resolve()
    if out == root or root in out.parents:
        raise DataError(f"--out {out} is inside the data folder {root}", "pick a folder outside it, e.g. DATA_FIXED/")
    if out.exists() and any(out.iterdir()):
        raise DataError(f"--out {out} already exists and is not empty", "pick a new folder; nothing was written")
    has_split = source.splits != [] and any(r.split for r in source)
    copied, names = [], set()
    for r in result.manifest:
        folder = out / (r.split if has_split and r.split else "") / r.label
        name = Path(r.path).name
        dest = folder / name
        i = 1
        while str(dest) in names:  # two files of one name from different folders
            i += 1
            dest = folder / f"{Path(name).stem}-{i}{Path(name).suffix}"
        names.add(str(dest))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(r.path, dest)
        copied.append(replace(r, path=str(dest)))
    result.manifest = Manifest(tuple(copied), "")
    result.written = str(out)

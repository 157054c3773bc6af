"""Turn a folder (class folders, or split folders holding class folders) or a manifest CSV into a Manifest."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from fruitlens.data.manifest import Manifest, Record, split_alias
from fruitlens.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


@dataclass
class ScanResult:
    """The manifest plus what was skipped on the way (hidden files, non-images, empty class folders)."""

    manifest: Manifest
    skipped_hidden: list[str] = field(default_factory=list)
    skipped_non_image: list[str] = field(default_factory=list)
    empty_classes: list[str] = field(default_factory=list)  # "split/label" or "label"
    layout: str = "classes"  # classes | splits | csv


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def _scan_class_folders(folder: Path, root: Path, split: str, result: ScanResult) -> list[Record]:
    records: list[Record] = []
    for cls_dir in sorted(p for p in folder.iterdir()):
        if _hidden(cls_dir.name):
            result.skipped_hidden.append(str(cls_dir))
            continue
        if not cls_dir.is_dir():
            result.skipped_non_image.append(str(cls_dir))  # loose files beside the class folders
            continue
        n_before = len(records)
        for path in sorted(cls_dir.rglob("*")):
            rel_parts = path.relative_to(cls_dir).parts
            if any(_hidden(part) for part in rel_parts):
                if path.is_file():
                    result.skipped_hidden.append(str(path))
                continue
            if not path.is_file() and not (path.is_symlink() and is_image_file(path)):
                continue  # a link to nowhere named like an image stays in: check lists it as a file it cannot read
            if not is_image_file(path):
                result.skipped_non_image.append(str(path))
                continue
            records.append(Record(str(path.relative_to(root)), cls_dir.name, split))
        if len(records) == n_before:
            result.empty_classes.append(f"{split}/{cls_dir.name}" if split else cls_dir.name)
    return records


def scan(source: str | Path) -> ScanResult:
    """Scans ``source``: a folder of class folders, a folder of split folders, or a manifest CSV.

    Split folders are recognised by name in any case: train/training, val/valid/validation, test/testing.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(
            f"{source}: no such file or folder", "pass a folder with one sub-folder per class, or a manifest CSV"
        )
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(
                f"{source}: expected a folder or a manifest .csv but received a file",
                "pass the folder that holds one sub-folder per class",
            )
        return ScanResult(Manifest.from_csv(source), layout="csv")
    root = source.resolve()
    result = ScanResult(Manifest(()))
    subdirs = [p for p in sorted(root.iterdir()) if p.is_dir() and not _hidden(p.name)]
    split_dirs = {p: split_alias(p.name) for p in subdirs if split_alias(p.name)}
    records: list[Record] = []
    if split_dirs:
        result.layout = "splits"
        seen: dict[str, Path] = {}
        for folder, split in split_dirs.items():
            if split in seen:
                raise DataError(
                    f"{root}: both '{seen[split].name}' and '{folder.name}' look like the {split} split",
                    "keep one of them, or pass a manifest CSV that says which image goes where",
                )
            seen[split] = folder
            records += _scan_class_folders(folder, root, split, result)
        others = [p.name for p in subdirs if p not in split_dirs]
        if others:
            log.warning("%s: ignoring folder(s) next to the split folders: %s", root, ", ".join(others))
    else:
        records = _scan_class_folders(root, root, "", result)
    if not records:
        raise DataError(
            f"{source}: no images found (looked for {', '.join(sorted(IMAGE_EXTENSIONS))} in class sub-folders)",
            "the layout is DATA/<class>/<image>, or DATA/train|val|test/<class>/<image>",
        )
    result.manifest = Manifest(tuple(records), str(root))
    return result

"""``fruitlens check``: decode every image, find bad files, odd modes, imbalance, duplicates and split leaks.

Nothing is moved, changed or deleted: the check only reads.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fruitlens.data.hashing import connected_groups, near_duplicate_pairs, phash_batch, phash_thumbnail
from fruitlens.data.manifest import Manifest
from fruitlens.data.scan import ScanResult
from fruitlens.errors import ImageError
from fruitlens.models.preprocessing import decode

log = logging.getLogger(__name__)

SEVERITIES = ("error", "warning", "info")
CHECK_DECODE_SIDE = 256  # big photos are decoded at about this shorter side: enough for the hashes


@dataclass(frozen=True)
class Issue:
    """One finding: a machine code, how bad it is, the file or class it is about, and a sentence for a person."""

    code: str
    severity: str
    path: str
    message: str


@dataclass(frozen=True)
class FileInfo:
    """What decoding one image told us."""

    ok: bool
    error: str = ""  # code: empty-file | unreadable | truncated | bad-shape | too-small
    detail: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""
    exif_rotated: bool = False
    sha1: str = ""
    phash: int = 0
    colour: bytes = b""  # COLOUR_SIDE x COLOUR_SIDE RGB thumbnail: tells apart same-shape fruit of different colours
    thumb: bytes = b""  # 32x32 grayscale for the pHash, hashed in one batch by analyse_files


@dataclass
class CheckSummary:
    """The figures behind the findings (also the ``summary`` of ``check --json`` and of the run's facts)."""

    images: int = 0
    usable: int = 0
    bad: int = 0
    classes: int = 0
    layout: str = "classes"
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # split ('all' without splits) -> class -> n
    class_totals: dict[str, int] = field(default_factory=dict)
    imbalance_ratio: float = float("nan")
    exact_duplicate_pairs: int = 0
    within_class_exact_duplicates: int = 0
    label_conflicts: int = 0
    near_duplicate_pairs: int = 0
    near_duplicate_distance: int = 4
    leaks: dict[str, dict[str, float]] = field(default_factory=dict)  # "test<-train" -> images, share
    skipped_hidden: int = 0
    skipped_non_image: int = 0
    errors: int = 0
    warnings: int = 0
    white_background: float = 0.0  # share of the usable images shot on white (studio shots, like Fruits-360)


@dataclass
class CheckReport:
    """Findings plus the figures behind them; ``files`` is indexed like the manifest's records."""

    manifest: Manifest
    issues: list[Issue] = field(default_factory=list)
    files: list[FileInfo] = field(default_factory=list)
    summary: CheckSummary = field(default_factory=CheckSummary)
    near_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def usable(self) -> np.ndarray:
        """Mask of the records whose image can be used (decoded, and large enough)."""
        return np.array([f.ok for f in self.files], dtype=bool)

    def finding_counts(self) -> dict[str, int]:
        """``{"error:truncated": 2, "info:exif-rotated": 1, ...}``"""
        return dict(Counter(f"{i.severity}:{i.code}" for i in self.issues))

    def to_dict(self) -> dict[str, Any]:
        return {"summary": asdict(self.summary), "issues": [asdict(i) for i in self.issues]}


# Modes that the loader converts to RGB; the value says how.
_MODE_NOTES = {
    "L": "grayscale, will be converted to RGB",
    "LA": "grayscale with alpha, alpha composited on white",
    "1": "1-bit, will be converted to RGB",
    "P": "palette, will be converted to RGB",
    "PA": "palette with alpha, alpha composited on white",
    "RGBA": "has an alpha channel, composited on white",
    "CMYK": "CMYK, will be converted to RGB (colours may shift)",
    "I;16": "16-bit, scaled to 8-bit RGB",
    "I;16B": "16-bit, scaled to 8-bit RGB",
    "I;16L": "16-bit, scaled to 8-bit RGB",
    "I": "32-bit integer, scaled to 8-bit RGB",
    "F": "floating point, scaled to 8-bit RGB",
    "YCbCr": "YCbCr, will be converted to RGB",
    "LAB": "Lab, will be converted to RGB",
    "HSV": "HSV, will be converted to RGB",
}
_ERROR_CODES = {
    "empty": "empty-file",
    "missing": "unreadable",
    "not-an-image": "unreadable",
    "too-many-pixels": "unreadable",
    "bad-shape": "bad-shape",
}


def analyse_file(path: str) -> FileInfo:
    """Reads and fully decodes one image (the decode every command uses); never raises for a bad file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return FileInfo(False, "unreadable", f"cannot read file ({exc.strerror or exc})")
    sha1 = hashlib.sha1(data).hexdigest() if data else ""
    try:
        d = decode(data, min_side=CHECK_DECODE_SIDE)
    except ImageError as exc:
        code = _ERROR_CODES.get(exc.reason) or ("truncated" if "truncat" in exc.message.lower() else "unreadable")
        return FileInfo(False, code, exc.message.removeprefix("image bytes: "), sha1=sha1)
    colour = d.image.resize((COLOUR_SIDE, COLOUR_SIDE), Image.Resampling.BOX).tobytes()
    return FileInfo(True, "", "", d.width, d.height, d.mode, d.exif_rotated, sha1, 0, colour, phash_thumbnail(d.image))


# What this process learnt of each file, by (path, size, mtime): a command that checks the same files twice (the
# demo picks classes on a check of the whole data set, then trains on some of them) decodes each once.
_SEEN: dict[tuple[str, int, int], FileInfo] = {}
_SEEN_MAX = 500_000  # about 100 MB of FileInfo


def _file_key(path: str) -> tuple[str, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.abspath(path), st.st_size, st.st_mtime_ns)


def analyse_files(paths: list[str], workers: int = 0) -> list[FileInfo]:
    """Decodes ``paths`` in parallel processes (``workers`` 0 = one per CPU); then hashes them all in one batch.
    Files this process analysed before, unchanged since, are not read again."""
    keys = [_file_key(p) for p in paths]
    todo = [i for i, k in enumerate(keys) if k is None or k not in _SEEN]
    workers = workers or (os.cpu_count() or 1)
    if workers == 1 or len(todo) < 64:
        new = [analyse_file(paths[i]) for i in todo]
    else:
        chunk = max(16, min(512, len(todo) // (workers * 8) or 1))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            new = list(pool.map(analyse_file, [paths[i] for i in todo], chunksize=chunk))
    hashes = iter(phash_batch([f.thumb for f in new if f.thumb]).tolist())
    new = [replace(f, phash=int(next(hashes)), thumb=b"") if f.thumb else f for f in new]
    if len(_SEEN) + len(new) > _SEEN_MAX:
        _SEEN.clear()
    for i, f in zip(todo, new):
        if keys[i] is not None:
            _SEEN[keys[i]] = f
    found = dict(zip(todo, new))
    return [found[i] if i in found else _SEEN[keys[i]] for i in range(len(paths))]


def check(
    scan_result: ScanResult | Manifest,
    *,
    min_size: int = 32,
    near_dup_distance: int = 4,
    imbalance_warn: float = 3.0,
    workers: int = 0,
) -> CheckReport:
    """Checks every image of a scan (or manifest) and returns the findings. Reads files only."""
    if isinstance(scan_result, Manifest):
        scan_result = ScanResult(scan_result, layout="csv")
    manifest = scan_result.manifest
    report = CheckReport(manifest, files=analyse_files([str(p) for p in manifest.paths()], workers))
    _file_findings(report, min_size)
    counts = _class_findings(report, scan_result, imbalance_warn)
    pairs, exact = _duplicate_pairs(report, near_dup_distance)
    report.near_pairs = pairs
    conflicts, within_exact = _duplicate_findings(report, pairs, exact, near_dup_distance)
    leaks = _leak_findings(report, pairs)
    report.summary = _summary(
        report, scan_result, counts, len(exact), within_exact, conflicts, leaks, near_dup_distance
    )
    return report


def _file_findings(report: CheckReport, min_size: int) -> None:
    """Bad and too-small files are errors (and unusable from here on); converted modes and EXIF turns are noted."""
    for i, (r, f) in enumerate(zip(report.manifest.records, report.files)):
        if not f.ok:
            report.issues.append(Issue(f.error, "error", r.path, f.detail))
        elif min(f.width, f.height) < min_size:
            detail = f"{f.width}x{f.height} px is below the minimum of {min_size} px a side"
            report.issues.append(Issue("too-small", "error", r.path, detail))
            report.files[i] = replace(f, ok=False, error="too-small", detail=detail)
        else:
            if f.mode != "RGB" and f.mode in _MODE_NOTES:
                report.issues.append(Issue("mode-converted", "info", r.path, f"mode {f.mode}: {_MODE_NOTES[f.mode]}"))
            if f.exif_rotated:
                report.issues.append(
                    Issue(
                        "exif-rotated", "info", r.path, "EXIF orientation set: the image is rotated upright when loaded"
                    )
                )


def _class_findings(report: CheckReport, scan_result: ScanResult, imbalance_warn: float) -> Counter:
    """Empty, tiny and single classes, and imbalance; returns the usable images per class."""
    usable = report.usable
    counts = Counter(r.label for r, u in zip(report.manifest.records, usable) if u)
    issues = report.issues
    for name in scan_result.empty_classes:
        issues.append(Issue("empty-class", "warning", name, "class folder holds no images"))
    every = Counter(r.label for r in report.manifest.records)
    for name in sorted(set(every) - set(counts)):
        issues.append(
            Issue(
                "no-usable-image",
                "warning",
                name,
                f"none of its {every[name]} image(s) can be used (see the errors above): the class is left out",
            )
        )
    if counts:
        most, least = max(counts.values()), min(counts.values())
        if most / least >= imbalance_warn:
            small = [c for c, n in counts.items() if n == least]
            issues.append(
                Issue(
                    "imbalance",
                    "warning",
                    ", ".join(sorted(small)),
                    f"classes are imbalanced: largest {most} vs smallest {least} images "
                    f"(ratio {most / least:.1f}); consider --balance weights",
                )
            )
    for label, n in sorted(counts.items()):
        if n < 5:
            issues.append(
                Issue("tiny-class", "warning", label, f"only {n} usable image(s): too few to learn and to test")
            )
    if len(counts) == 1:
        label = next(iter(counts))
        issues.append(
            Issue(
                "one-class",
                "error",
                label,
                "only one class: a classifier needs at least two" + _deeper_hint(report.manifest, label),
            )
        )
    return counts


def _deeper_hint(manifest: Manifest, label: str) -> str:
    """For a data set of one class whose images sit in several sub-folders: those may be the classes."""
    folders = [Path(r.path).parts[:-1] for r in manifest.records if r.label == label]
    common = os.path.commonprefix(folders)  # the folders every image of the class sits in
    if any(len(f) == len(common) for f in folders):  # some images sit right there: no deeper class folders
        return ""
    below = sorted({f[len(common)] for f in folders})
    if len(below) < 2:
        return ""
    deeper = Path(manifest.root or ".", *common)
    return (
        f". Its images sit in the sub-folders {', '.join(below[:5])}{' ...' if len(below) > 5 else ''}: if those "
        f"are the classes, pass {deeper}"
    )


def _duplicate_pairs(report: CheckReport, near_dup_distance: int) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """Index pairs of exact (content hash) and near (perceptual hash + colour) duplicates, and the exact ones."""
    records = report.manifest.records
    label_ids = {c: i for i, c in enumerate(sorted({r.label for r in records}))}
    return duplicate_pairs(
        report.files, near_dup_distance, np.array([label_ids[r.label] for r in records], dtype=np.int64)
    )


def duplicate_pairs(
    files: list[FileInfo], near_dup_distance: int = 4, labels: np.ndarray | None = None
) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """(index pairs of exact and near duplicates among ``files``, the exact ones): the same content hash, or
    perceptual hashes within ``near_dup_distance`` bits whose colour thumbnails agree too (within the coarser
    tolerance where ``labels`` are the same, the finer one where they differ or are not given)."""
    usable = np.array([f.ok for f in files], dtype=bool)
    by_sha: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        if f.ok:
            by_sha.setdefault(f.sha1, []).append(i)
    exact = {(g[0], j) for g in by_sha.values() if len(g) > 1 for j in g[1:]}
    near = near_duplicate_pairs(np.array([f.phash for f in files], dtype=np.uint64), near_dup_distance, usable)
    labels = np.arange(len(files), dtype=np.int64) if labels is None else labels
    near = near[_colour_close(files, near, labels)]
    if exact:
        near = np.unique(np.concatenate([near, np.array(sorted(exact), dtype=np.int64).reshape(-1, 2)]), axis=0)
    return near, exact


def _duplicate_findings(
    report: CheckReport, pairs: np.ndarray, exact: set[tuple[int, int]], near_dup_distance: int
) -> tuple[int, int]:
    """Label conflicts, exact duplicates within a split, a note on near duplicates; vectorised over the pairs
    (Fruits-360 has ~180k). Returns (label conflicts, exact duplicates within a class and split)."""
    records = report.manifest.records
    labels = np.array([r.label for r in records], dtype=object)
    splits = np.array([r.split for r in records], dtype=object)
    a, b = (pairs[:, 0], pairs[:, 1]) if len(pairs) else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    n = len(records)
    is_exact = np.isin(a * n + b, np.array([x * n + y for x, y in exact], dtype=np.int64))
    differ = labels[a] != labels[b]
    same_split = splits[a] == splits[b]
    for i, j, ex in zip(a[differ].tolist(), b[differ].tolist(), is_exact[differ].tolist()):
        kind = "identical" if ex else "near-duplicate"
        report.issues.append(
            Issue(
                "label-conflict",
                "warning",
                records[j].path,
                f"{kind} of {records[i].path} but labelled '{records[j].label}' vs '{records[i].label}'",
            )
        )
    dup = ~differ & is_exact & same_split
    for i, j in zip(a[dup].tolist(), b[dup].tolist()):
        report.issues.append(Issue("duplicate", "warning", records[j].path, f"identical to {records[i].path}"))
    near_mask = ~differ & ~is_exact & same_split
    near_within = np.unique(np.concatenate([a[near_mask], b[near_mask]]))
    if len(near_within):
        report.issues.append(
            Issue(
                "near-duplicates",
                "info",
                "",
                f"{len(near_within)} images have a near duplicate in the same class and split "
                f"(perceptual-hash distance <= {near_dup_distance}); the split keeps such groups "
                "together",
            )
        )
    return int(differ.sum()), int(dup.sum())


def _leak_findings(report: CheckReport, pairs: np.ndarray) -> dict[str, dict[str, float]]:
    records = report.manifest.records
    split_sizes = Counter(r.split for r, u in zip(records, report.usable) if u)
    leaks = find_leaks([r.split for r in records], pairs, split_sizes)
    for key, v in leaks.items():
        split, other = key.split("<-")
        report.issues.append(
            Issue(
                "split-leak",
                "warning",
                split,
                f"{v['images']} of {split_sizes[split]} {split} images ({v['share']:.1%}) have an "
                f"identical or near-duplicate image in {other}: accuracy on {split} overstates "
                "accuracy on new photos. Run 'fruitlens split' for a leak-free split",
            )
        )
    return leaks


def _summary(
    report: CheckReport,
    scan_result: ScanResult,
    counts: Counter,
    exact_pairs: int,
    within_exact: int,
    conflicts: int,
    leaks: dict,
    near_dup_distance: int,
) -> CheckSummary:
    usable = report.usable
    split_counts: dict[str, Counter] = {}
    for r, u in zip(report.manifest.records, usable):
        if u:
            split_counts.setdefault(r.split or "all", Counter())[r.label] += 1
    return CheckSummary(
        images=len(usable),
        usable=int(usable.sum()),
        bad=int((~usable).sum()),
        classes=len(counts),
        layout=scan_result.layout,
        counts={s: dict(sorted(c.items())) for s, c in split_counts.items()},
        class_totals=dict(sorted(counts.items())),
        imbalance_ratio=max(counts.values()) / min(counts.values()) if counts else float("nan"),
        exact_duplicate_pairs=exact_pairs,
        within_class_exact_duplicates=within_exact,
        label_conflicts=conflicts,
        near_duplicate_pairs=int(len(report.near_pairs)),
        near_duplicate_distance=near_dup_distance,
        leaks=leaks,
        skipped_hidden=len(scan_result.skipped_hidden),
        skipped_non_image=len(scan_result.skipped_non_image),
        errors=sum(i.severity == "error" for i in report.issues),
        warnings=sum(i.severity == "warning" for i in report.issues),
        white_background=round(float(np.mean([white_background(f) for f in report.files if f.ok])), 4)
        if usable.any()
        else 0.0,
    )


def white_background(f: FileInfo) -> bool:
    """Shot on white, like a studio or Fruits-360: at least a quarter of the 28 border cells of the 8x8 colour
    thumbnail near white (every channel >= 225). Measured on 150 images each: Fruits-360 median 46% of the border
    (5th percentile 29%), GroceryStore's supermarket photos 0% (95th percentile 0%)."""
    if len(f.colour) != COLOUR_SIDE * COLOUR_SIDE * 3:
        return False
    t = np.frombuffer(f.colour, np.uint8).reshape(COLOUR_SIDE, COLOUR_SIDE, 3)
    border = np.concatenate([t[0], t[-1], t[1:-1, 0], t[1:-1, -1]])
    return bool((border.min(axis=1) >= 225).mean() >= 0.25)


_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
# Second test for pHash candidates: the mean absolute difference (0-255) of RGB thumbnails. Within a label, 4x4
# thumbnails within 16 (frames of one fruit turning: grouping them generously keeps splits leak-free). Across labels,
# 8x8 thumbnails within 12: measured on Fruits-360 (181,684 pairs within pHash distance 4), the 980 pairs across
# classes (grapefruit/golden apple, orange/peach: different fruit, round on white) pass the 4x4 test but all differ
# by more than 13.7 at 8x8, while copies of GroceryStore photos re-encoded at JPEG quality 70, halved, or 8% brighter
# differ by at most 9.1 (95th percentile), so a mislabelled copy is still reported.
COLOUR_SIDE = 8
SAME_LABEL_TOLERANCE = 16.0  # 4x4
OTHER_LABEL_TOLERANCE = 12.0  # 8x8


def _colour_close(files: list[FileInfo], pairs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mask of pairs whose colour thumbnails agree too: perceptual hashes alone confuse round fruit on white."""
    if len(pairs) == 0:
        return np.zeros(0, dtype=bool)
    size = COLOUR_SIDE * COLOUR_SIDE * 3
    thumbs = np.zeros((len(files), size), dtype=np.float32)
    for i, f in enumerate(files):
        if len(f.colour) == size:
            thumbs[i] = np.frombuffer(f.colour, dtype=np.uint8)
    half = COLOUR_SIDE // 2  # 2x2 blocks of the 8x8 thumbnail: the 4x4 one
    out = np.zeros(len(pairs), dtype=bool)
    for start in range(0, len(pairs), 16384):  # chunks keep the float buffers small (Fruits-360 has ~180k pairs)
        p = pairs[start : start + 16384]
        diff = thumbs[p[:, 0]] - thumbs[p[:, 1]]
        fine = np.abs(diff).mean(axis=1)
        coarse = np.abs(diff.reshape(-1, half, 2, half, 2, 3).mean(axis=(2, 4))).mean(axis=(1, 2, 3))
        same = labels[p[:, 0]] == labels[p[:, 1]]
        out[start : start + len(p)] = np.where(same, coarse <= SAME_LABEL_TOLERANCE, fine <= OTHER_LABEL_TOLERANCE)
    return out


def find_leaks(splits: list[str], pairs: np.ndarray, split_sizes: dict[str, int]) -> dict[str, dict[str, float]]:
    """``{"test<-train": {"images": n, "share": f}, ...}``: images of a later split with a duplicate in an earlier
    one."""
    out: dict[str, dict[str, float]] = {}
    if len(pairs) == 0:
        return out
    names = sorted(set(splits))
    code = {n: i for i, n in enumerate(names)}
    sp = np.array([code[x] for x in splits], dtype=np.int64)
    order = np.array([_SPLIT_ORDER.get(n, 9) if n else -1 for n in names])
    sa, sb = sp[pairs[:, 0]], sp[pairs[:, 1]]
    keep = (sa != sb) & (order[sa] >= 0) & (order[sb] >= 0)
    a, b, sa, sb = pairs[keep, 0], pairs[keep, 1], sa[keep], sb[keep]
    b_later = order[sa] < order[sb]  # the image of the later split is the leaked one
    later_img, later, earlier = np.where(b_later, b, a), np.where(b_later, sb, sa), np.where(b_later, sa, sb)
    for key in sorted({(int(x), int(y)) for x, y in zip(later.tolist(), earlier.tolist())}):
        name = f"{names[key[0]]}<-{names[key[1]]}"
        n = len(np.unique(later_img[(later == key[0]) & (earlier == key[1])]))
        out[name] = {"images": n, "share": n / max(1, split_sizes.get(names[key[0]], 0))}
    return dict(sorted(out.items()))


def duplicate_groups(report: CheckReport) -> np.ndarray:
    """Connected components of the near/exact duplicate graph, one id per manifest record."""
    return connected_groups(len(report.manifest), report.near_pairs)

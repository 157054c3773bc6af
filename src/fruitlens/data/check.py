"""``fruitlens check``: decode every image, find bad files, odd modes, imbalance, duplicates and split leaks.

Nothing is moved, changed or deleted: the check only reads.
"""
from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from fruitlens.data.hashing import connected_groups, near_duplicate_pairs, phash_batch, phash_thumbnail
from fruitlens.data.manifest import Manifest
from fruitlens.data.scan import ScanResult

log = logging.getLogger(__name__)

SEVERITIES = ("error", "warning", "info")


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
    error: str = ""  # code: empty-file | unreadable | truncated
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
class CheckReport:
    """Findings plus the figures behind them; ``files`` is indexed like the manifest's records."""

    manifest: Manifest
    issues: list[Issue] = field(default_factory=list)
    files: list[FileInfo] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    near_pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def bad_paths(self) -> set[str]:
        """Paths (as in the manifest) of images that cannot be used."""
        return {r.path for r, f in zip(self.manifest.records, self.files) if not f.ok}

    def to_dict(self) -> dict[str, Any]:
        return {"summary": self.summary, "issues": [asdict(i) for i in self.issues]}


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


def analyse_file(path: str) -> FileInfo:
    """Reads and fully decodes one image; never raises for a bad file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return FileInfo(False, "unreadable", f"cannot read file ({exc.strerror or exc})")
    if not data:
        return FileInfo(False, "empty-file", "file is empty (0 bytes)")
    sha1 = hashlib.sha1(data).hexdigest()
    import io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as img:
                mode, (width, height) = img.mode, img.size
                orientation = img.getexif().get(0x0112, 1)
                img.draft("RGB", (256, 256))  # big JPEGs decode at a reduced scale; the whole stream is still read
                img.load()
                rgb = img.convert("RGB")
                thumb = phash_thumbnail(rgb)
                colour = rgb.resize((COLOUR_SIDE, COLOUR_SIDE), Image.Resampling.BOX).tobytes()
    except UnidentifiedImageError:
        return FileInfo(False, "unreadable", "not an image Pillow can identify", sha1=sha1)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        text = str(exc)
        code = "truncated" if "truncat" in text.lower() else "unreadable"
        return FileInfo(False, code, f"cannot decode image ({text})", sha1=sha1)
    return FileInfo(True, "", "", width, height, mode, orientation not in (None, 0, 1), sha1, 0, colour, thumb)


def analyse_files(paths: list[str], workers: int = 0) -> list[FileInfo]:
    """Decodes ``paths`` in parallel processes (``workers`` 0 = one per CPU); then hashes them all in one batch."""
    workers = workers or (os.cpu_count() or 1)
    if workers == 1 or len(paths) < 64:
        files = [analyse_file(p) for p in paths]
    else:
        chunk = max(16, min(512, len(paths) // (workers * 8) or 1))
        with ProcessPoolExecutor(max_workers=workers) as pool:
            files = list(pool.map(analyse_file, paths, chunksize=chunk))
    hashes = iter(phash_batch([f.thumb for f in files if f.thumb]).tolist())
    return [replace(f, phash=int(next(hashes)), thumb=b"") if f.thumb else f for f in files]


def check(scan_result: ScanResult | Manifest, *, min_size: int = 32, near_dup_distance: int = 4,
          imbalance_warn: float = 3.0, workers: int = 0) -> CheckReport:
    """Checks every image of a scan (or manifest) and returns the findings. Reads files only."""
    if isinstance(scan_result, Manifest):
        scan_result = ScanResult(scan_result, layout="csv")
    manifest = scan_result.manifest
    paths = [str(p) for p in manifest.paths()]
    files = analyse_files(paths, workers)
    report = CheckReport(manifest, files=files)
    issues = report.issues
    records = manifest.records

    for r, f in zip(records, files):
        if not f.ok:
            issues.append(Issue(f.error, "error", r.path, f.detail))
        elif min(f.width, f.height) < min_size:
            issues.append(Issue("too-small", "error", r.path,
                                f"{f.width}x{f.height} px is below the minimum of {min_size} px a side"))
        else:
            if f.mode != "RGB" and f.mode in _MODE_NOTES:
                issues.append(Issue("mode-converted", "info", r.path, f"mode {f.mode}: {_MODE_NOTES[f.mode]}"))
            if f.exif_rotated:
                issues.append(Issue("exif-rotated", "info", r.path, "EXIF orientation set: the image is rotated upright when loaded"))
    # too-small images are unusable for training as well
    usable = np.array([f.ok and min(f.width, f.height) >= min_size for f in files], dtype=bool)
    report.files = [f if u or not f.ok else FileInfo(False, "too-small", "image too small", f.width, f.height, f.mode,
                                                     f.exif_rotated, f.sha1, f.phash) for f, u in zip(files, usable)]

    for name in scan_result.empty_classes:
        issues.append(Issue("empty-class", "warning", name, "class folder holds no images"))

    counts = Counter(r.label for r, u in zip(records, usable) if u)
    split_counts: dict[str, dict[str, int]] = {}
    for r, u in zip(records, usable):
        if u:
            split_counts.setdefault(r.split or "all", Counter())[r.label] += 1
    if counts:
        most, least = max(counts.values()), min(counts.values())
        ratio = most / least
        if ratio >= imbalance_warn:
            small = [c for c, n in counts.items() if n == least]
            issues.append(Issue("imbalance", "warning", ", ".join(sorted(small)),
                                f"classes are imbalanced: largest {most} vs smallest {least} images (ratio {ratio:.1f}); "
                                "consider --balance weights"))
    else:
        ratio = float("nan")
    for label, n in sorted(counts.items()):
        if n < 5:
            issues.append(Issue("tiny-class", "warning", label, f"only {n} usable image(s): too few to learn and to test"))
    if len(counts) == 1:
        issues.append(Issue("one-class", "error", next(iter(counts)), "only one class: a classifier needs at least two"))

    # exact duplicates by content hash, near duplicates by perceptual hash
    by_sha: dict[str, list[int]] = {}
    for i, f in enumerate(report.files):
        if f.ok:
            by_sha.setdefault(f.sha1, []).append(i)
    exact_pairs = [(g[0], j) for g in by_sha.values() if len(g) > 1 for j in g[1:]]
    hashes = np.array([f.phash for f in report.files], dtype=np.uint64)
    near = near_duplicate_pairs(hashes, near_dup_distance, usable)
    label_ids = {c: i for i, c in enumerate(sorted({r.label for r in records}))}
    lab = np.array([label_ids[r.label] for r in records], dtype=np.int64)
    near = near[_colour_close(report.files, near, lab)]
    if exact_pairs:
        near = np.unique(np.concatenate([near, np.array(exact_pairs, dtype=np.int64).reshape(-1, 2)]), axis=0)
    report.near_pairs = near
    exact_set = {(min(a, b), max(a, b)) for a, b in exact_pairs}

    # vectorised over the pairs (Fruits-360 has ~180k); only label conflicts and exact duplicates become issues
    split_ids = {c: i for i, c in enumerate(sorted({r.split for r in records}))}
    spl = np.array([split_ids[r.split] for r in records], dtype=np.int64)
    a_idx, b_idx = (near[:, 0], near[:, 1]) if len(near) else (np.zeros(0, np.int64), np.zeros(0, np.int64))
    n = len(records)
    is_exact = np.isin(a_idx * n + b_idx, np.array([a * n + b for a, b in exact_set], dtype=np.int64))
    differ = lab[a_idx] != lab[b_idx]
    same_split = spl[a_idx] == spl[b_idx]
    conflict = int(differ.sum())
    for a, b, exact in zip(a_idx[differ].tolist(), b_idx[differ].tolist(), is_exact[differ].tolist()):
        ra, rb = records[a], records[b]
        kind = "identical" if exact else "near-duplicate"
        issues.append(Issue("label-conflict", "warning", rb.path, f"{kind} of {ra.path} but labelled '{rb.label}' vs '{ra.label}'"))
    dup = ~differ & is_exact & same_split
    within_exact = int(dup.sum())
    for a, b in zip(a_idx[dup].tolist(), b_idx[dup].tolist()):
        issues.append(Issue("duplicate", "warning", records[b].path, f"identical to {records[a].path}"))
    near_mask = ~differ & ~is_exact & same_split
    near_within = np.unique(np.concatenate([a_idx[near_mask], b_idx[near_mask]]))

    split_sizes = Counter(r.split for r, u in zip(records, usable) if u)
    leaks = find_leaks([r.split for r in records], near, split_sizes)
    for key, v in leaks.items():
        split, other = key.split("<-")
        issues.append(Issue("split-leak", "warning", split,
                            f"{v['images']} of {split_sizes[split]} {split} images ({v['share']:.1%}) have an identical or "
                            f"near-duplicate image in {other}: accuracy on {split} overstates accuracy on new photos. "
                            f"Run 'fruitlens split' for a leak-free split"))
    if len(near_within):
        issues.append(Issue("near-duplicates", "info", "",
                            f"{len(near_within)} images have a near duplicate in the same class and split "
                            f"(perceptual-hash distance <= {near_dup_distance}); the split keeps such groups together"))

    report.summary = {
        "images": len(records),
        "usable": int(usable.sum()),
        "bad": int((~usable).sum()),
        "classes": len(counts),
        "layout": scan_result.layout,
        "counts": {s: dict(sorted(c.items())) for s, c in split_counts.items()},
        "class_totals": dict(sorted(counts.items())),
        "imbalance_ratio": ratio,
        "exact_duplicate_pairs": len(exact_pairs),
        "within_class_exact_duplicates": within_exact,
        "label_conflicts": conflict,
        "near_duplicate_pairs": int(len(near)),
        "near_duplicate_distance": near_dup_distance,
        "leaks": leaks,
        "skipped_hidden": len(scan_result.skipped_hidden),
        "skipped_non_image": len(scan_result.skipped_non_image),
        "errors": sum(i.severity == "error" for i in issues),
        "warnings": sum(i.severity == "warning" for i in issues),
    }
    return report


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
        p = pairs[start:start + 16384]
        diff = thumbs[p[:, 0]] - thumbs[p[:, 1]]
        fine = np.abs(diff).mean(axis=1)
        coarse = np.abs(diff.reshape(-1, half, 2, half, 2, 3).mean(axis=(2, 4))).mean(axis=(1, 2, 3))
        same = labels[p[:, 0]] == labels[p[:, 1]]
        out[start:start + len(p)] = np.where(same, coarse <= SAME_LABEL_TOLERANCE, fine <= OTHER_LABEL_TOLERANCE)
    return out


def find_leaks(splits: list[str], pairs: np.ndarray, split_sizes: dict[str, int]) -> dict[str, dict[str, float]]:
    """``{"test<-train": {"images": n, "share": f}, ...}``: images of a later split with a duplicate in an earlier one."""
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

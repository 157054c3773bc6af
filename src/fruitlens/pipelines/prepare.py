"""From DATA to a checked, split manifest ready for training: scan -> check -> split -> what the run must know."""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

from fruitlens.config import TrainConfig
from collections import Counter

from fruitlens.data.check import CheckReport, check
from fruitlens.data.facts import DataFacts
from fruitlens.data.manifest import CSV_FIELDS, Manifest
from fruitlens.data.prune import auto_keep_share, representatives
from fruitlens.data.scan import scan
from fruitlens.data.split import SplitResult, split
from fruitlens.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """The split manifest and the facts the report shows (check summary, split notes, leaks, image size)."""

    manifest: Manifest
    facts: DataFacts
    check: CheckReport


def resolve_data_path(path: str) -> str:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file or folder", "pass a folder with one sub-folder per class")
    return str(p.resolve())


def prepare(cfg: TrainConfig) -> PreparedData:
    """scan -> check -> split (keeping a split the data has); stops on data that cannot train a classifier."""
    d = cfg.data
    report = check(scan(d.path), min_size=d.min_size, near_dup_distance=d.near_dup_distance)
    if report.summary.usable == 0:
        raise DataError(
            f"{d.path}: none of the {report.summary.images} images can be used",
            f"run 'fruitlens check {d.path}' to see why",
        )
    result = split(report, val=d.val, test=d.test, seed=d.seed, group=d.group, group_pattern=d.group_pattern)
    _refuse_unusable_split(result, d.path)
    _log_split(result)
    sides = [min(f.width, f.height) for f in report.files if f.ok]
    facts = DataFacts(
        data=str(d.path),
        check=report.summary,
        check_findings=report.finding_counts(),
        split=result.facts(),
        leak_free=not any(v["images"] for v in result.leaks.values()),
        median_side=int(statistics.median(sides)) if sides else 224,
    )
    manifest = _prune(result.manifest, report, d.keep_share, facts)
    return PreparedData(manifest, facts, report)


def _prune(manifest: Manifest, report: CheckReport, keep_share: float, facts: DataFacts) -> Manifest:
    """The training images that representatives of their near-copy group stand for move to split ``covered``
    (``data/prune.py``); the share kept is ``keep_share``, or picked from the groups' sizes."""
    train = [r for r in manifest if r.split == "train"]
    sizes = Counter(r.group for r in train if r.group)
    typical = statistics.median([sizes[r.group] if r.group else 1 for r in train]) if train else 1
    share = keep_share if keep_share > 0 else auto_keep_share(typical)
    facts.keep_share = share
    if share >= 1:
        return manifest
    files = {str(report.manifest.resolve(r)): f for r, f in zip(report.manifest.records, report.files) if f.ok}
    pruned, moved = representatives(manifest, files, share)
    facts.covered = moved
    if moved:
        note = (
            f"{moved:,} of {len(train):,} training images are near copies (frames of one fruit turning) that "
            f"{len(train) - moved:,} representatives stand for: trained on the representatives "
            f"({100 * share:.0f}% of each near-copy group, picked to cover it; data.keep_share)"
        )
        facts.split.notes.append(note)
        log.info("%s", note)
    return pruned


def _refuse_unusable_split(result: SplitResult, path: str) -> None:
    classes = result.manifest.classes
    if len(classes) < 2:
        raise DataError(
            f"{path}: found only the class '{classes[0]}'; a classifier needs at least two",
            "add a folder per class: DATA/<class>/<images>",
        )
    counts = result.manifest.counts()
    missing_train = [c for c in classes if not counts.get("train", {}).get(c)]
    if missing_train:
        raise DataError(
            f"class(es) {', '.join(missing_train)} have no training images after the split",
            "add images to those classes or remove their folders",
        )
    if not counts.get("val"):
        raise DataError("the validation split is empty", "use --val 0.15 (or more images per class)")


def _log_split(result: SplitResult) -> None:
    for w in result.warnings:
        log.warning("split: %s", w)
    if result.excluded:
        log.warning("left out %d unusable image(s), e.g. %s: %s", len(result.excluded), *result.excluded[0])
    leak = result.leaks.get("test<-train", {})
    if leak.get("images"):
        log.warning(
            "LEAK: %d of the test images (%.1f%%) have a near duplicate in train (%s). Test accuracy will "
            "overstate accuracy on new photos.",
            leak["images"],
            100 * leak["share"],
            "the data's own split" if result.kept_existing else "linked groups",
        )


def with_data_path(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with ``data.path`` (and the --eval-data paths) made absolute: the run's config.yaml then works from any
    folder."""
    d = cfg.data
    absolute = lambda p: str(Path(p).resolve()) if p else p
    return replace(
        cfg,
        data=replace(
            d,
            path=resolve_data_path(d.path),
            eval_data=absolute(d.eval_data),
            eval_class_map=absolute(d.eval_class_map),
            adapt_to=absolute(d.adapt_to),
            add=tuple(absolute(p) for p in d.add),
        ),
    ).validated()


def split_data(
    data: str | Path,
    out: str | Path,
    *,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    group: str = "near-duplicates",
    group_pattern: str = "",
    near_dup_distance: int = 4,
) -> SplitResult:
    """``fruitlens split``: scan -> check -> leak-free split -> the manifest CSV at ``out``. A file at ``out`` that is
    not a manifest (another program's CSV, a user's notes) is never overwritten."""
    out = Path(out)
    if out.exists() and not _is_manifest(out):
        raise ConfigError(
            f"--out {out} exists and is not a fruitlens manifest: it would be overwritten",
            "pick another --out (an earlier manifest of fruitlens split is replaced)",
        )
    result = split(
        check(scan(data), near_dup_distance=near_dup_distance),
        val=val,
        test=test,
        seed=seed,
        group="pattern" if group_pattern else group,
        group_pattern=group_pattern,
    )
    result.manifest.to_csv(out)
    return result


def _is_manifest(path: Path) -> bool:
    try:
        with path.open(newline="") as fh:
            return fh.readline().strip().split(",") == list(CSV_FIELDS)
    except (OSError, UnicodeDecodeError):
        return False

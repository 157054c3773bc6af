"""``fruitlens split``: stratified, seeded, group-aware splits that keep near duplicates on one side.

Groups (connected components of the duplicate graph, or a file-name pattern) are assigned whole, so a frame of a
turning fruit in test never has its neighbour frame in train. Groups can be large, so proportions are approximate;
``SplitResult.table`` says what was achieved per class and split.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

from fruitlens.data.check import CheckReport, duplicate_groups, find_leaks
from fruitlens.data.manifest import SPLITS, Manifest
from fruitlens.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class SplitFacts:
    """What a split achieved, as the run's facts and the report show it."""

    totals: dict[str, int] = field(default_factory=dict)
    per_class: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> split -> images
    warnings: list[str] = field(default_factory=list)
    excluded: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    leaks: dict[str, dict[str, float]] = field(default_factory=dict)  # "test<-train" -> {"images", "share"}
    kept_existing_split: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def test_leak(self) -> dict[str, float]:
        """``{"images": n, "share": f}`` of test images with a near duplicate in train (empty when none)."""
        return self.leaks.get("test<-train", {})


@dataclass
class SplitResult:
    """The split manifest and what the split achieved, warned about and left out."""

    manifest: Manifest
    table: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> split -> images
    warnings: list[str] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    leaks: dict[str, dict[str, float]] = field(default_factory=dict)
    kept_existing: bool = False
    notes: list[str] = field(default_factory=list)

    def facts(self) -> SplitFacts:
        return SplitFacts(
            dict(Counter(r.split for r in self.manifest)),
            self.table,
            self.warnings,
            [{"path": p, "reason": r} for p, r in self.excluded],
            self.leaks,
            self.kept_existing,
            self.notes,
        )


def _group_ids(report: CheckReport, usable: list[int], group: str, pattern: str) -> dict[int, str]:
    records = report.manifest.records
    if group == "none":
        return {i: f"i{i}" for i in usable}
    if group == "pattern":
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"--group-pattern '{pattern}' is not a valid regular expression ({exc})") from None
        out, matched = {}, 0
        for i in usable:
            name = Path(records[i].path).name
            m = rx.search(name)
            matched += m is not None
            key = (m.group(1) if m and m.groups() else m.group(0)) if m else f"i{i}"
            out[i] = f"{records[i].label}/{key}"
        if usable and not matched:  # every image its own group: the split would ignore the frames the user meant
            example = Path(records[usable[0]].path).name
            raise ConfigError(
                f"--group-pattern '{pattern}' matches none of the {len(usable)} file names (e.g. '{example}')",
                "the pattern is searched in the file name; e.g. '^(.*)_\\d+\\.jpg$' groups kiwi12_003.jpg as kiwi12",
            )
        return out
    comp = duplicate_groups(report)
    return {i: f"g{comp[i]}" for i in usable}


def _assign(
    groups: dict[str, list[int]], label_of, fractions: dict[str, float], seed: int, warnings: list[str]
) -> dict[int, str]:
    """Greedy stratified assignment of whole groups: each group goes to the split furthest below its target."""
    rng = random.Random(seed)
    by_class: dict[str, list[list[int]]] = defaultdict(list)
    for key in sorted(groups):
        members = groups[key]
        by_class[Counter(label_of(i) for i in members).most_common(1)[0][0]].append(members)
    wanted = [s for s in SPLITS if fractions.get(s, 0) > 0]
    out: dict[int, str] = {}
    for label in sorted(by_class):
        class_groups = by_class[label]
        rng.shuffle(class_groups)
        class_groups.sort(key=len, reverse=True)
        n = sum(len(g) for g in class_groups)
        if len(class_groups) < len(wanted):
            # too few images (or groups) to give every split one: train first, then test, then val
            order = [s for s in ("train", "test", "val") if s in wanted]
            for g, split in zip(class_groups, order):
                out.update({i: split for i in g})
            missing = order[len(class_groups) :]
            if n == len(class_groups):
                warnings.append(
                    f"class '{label}' has only {n} image(s): no {' or '.join(missing)} images for it "
                    f"(add images, or expect no per-class figure for it)"
                )
            else:
                warnings.append(
                    f"class '{label}' cannot be split without a leak: its {n} images form only "
                    f"{len(class_groups)} near-duplicate group(s), so it gets no {' or '.join(missing)} images"
                )
            continue
        target = {s: fractions[s] * n for s in wanted}
        have = {s: 0 for s in wanted}
        # every split gets one group before the greedy fill, smallest groups to the held-out splits
        seeds = {s: None for s in wanted}
        for s in [s for s in ("test", "val") if s in wanted]:
            g = class_groups.pop()  # smallest remaining
            seeds[s] = g
        for s, g in seeds.items():
            if g is not None:
                out.update({i: s for i in g})
                have[s] += len(g)
        for g in class_groups:
            split = max(wanted, key=lambda s: (target[s] - have[s], s == "train"))
            out.update({i: split for i in g})
            have[split] += len(g)
        if "train" in wanted and have["train"] == 0:
            warnings.append(f"class '{label}': all images went to held-out splits")
        largest = len(class_groups[0]) if class_groups else 0
        for s in wanted:
            if s != "train" and target[s] >= 1 and have[s] > 2 * target[s] + 1:
                warnings.append(
                    f"class '{label}': {s} got {have[s]} images for a target of {target[s]:.0f} "
                    f"(duplicate groups up to {largest} images are kept whole to avoid a leak)"
                )
    return out


def split(
    report: CheckReport,
    *,
    val: float = 0.15,
    test: float = 0.15,
    seed: int = 0,
    group: str = "near-duplicates",
    group_pattern: str = "",
) -> SplitResult:
    """Splits the checked images. Keeps a split the data already has; bad images are left out and listed."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ConfigError(f"--val {val} and --test {test} must be fractions that add up to less than 1")
    records = report.manifest.records
    result = SplitResult(report.manifest)
    usable = [i for i, f in enumerate(report.files) if f.ok]
    result.excluded = [
        (records[i].path, f"{report.files[i].error}: {report.files[i].detail}")
        for i, f in enumerate(report.files)
        if not f.ok
    ]
    if not usable:
        raise DataError("no usable images to split", "run 'fruitlens check' to see why every image was rejected")
    gid = _group_ids(report, usable, group, group_pattern)
    existing = {records[i].split for i in usable} - {""}
    if existing:
        splits = _keep_existing(records, usable, existing, gid, val, test, seed, result)
    else:
        groups: dict[str, list[int]] = defaultdict(list)
        for i in usable:
            groups[gid[i]].append(i)
        splits = _assign(
            groups,
            lambda i: records[i].label,
            {"train": 1 - val - test, "val": val, "test": test},
            seed,
            result.warnings,
        )
    new_records = [replace(records[i], split=splits[i], group=gid[i], hash=report.files[i].sha1) for i in usable]
    result.manifest = report.manifest.with_records(new_records)
    for r in new_records:
        result.table.setdefault(r.label, {s: 0 for s in SPLITS})[r.split] += 1
    _report_leaks(report, splits, existing, result)
    return result


def _keep_existing(
    records,
    usable: list[int],
    existing: set[str],
    gid: dict[int, str],
    val: float,
    test: float,
    seed: int,
    result: SplitResult,
) -> dict[int, str]:
    """The data's own split, with the missing held-out splits carved out of its train split."""
    result.kept_existing = True
    unknown = existing - set(SPLITS)
    if unknown:
        raise DataError(
            f"unknown split name(s) {', '.join(sorted(unknown))} in the data",
            "use train, val and test (or training, validation, testing)",
        )
    if "train" not in existing:
        raise DataError("the data has split folders but no train split", "add a train/ (or Training/) folder")
    splits = {i: records[i].split for i in usable}
    if "test" not in existing and "val" in existing:
        splits = {i: "test" if s == "val" else s for i, s in splits.items()}
        result.notes.append(
            "the data's own validation split is held out as the test split; a validation split is carved out of train"
        )
        existing.discard("val")
        existing.add("test")
    fractions = {s: f for s, f in (("val", val), ("test", test)) if s not in existing and f > 0}
    if not fractions:
        result.notes.append(f"kept the data's own {', '.join(sorted(existing))} split")
        return splits
    fractions["train"] = 1.0 - sum(fractions.values())
    groups: dict[str, list[int]] = defaultdict(list)
    for i in usable:
        if splits[i] == "train":
            groups[gid[i]].append(i)
    carved = ", ".join(s for s in ("val", "test") if s in fractions)
    result.notes.append(f"kept the data's own {', '.join(sorted(existing))} split; carved {carved} out of train")
    splits.update(_assign(groups, lambda i: records[i].label, fractions, seed, result.warnings))
    return splits


def _report_leaks(report: CheckReport, splits: dict[int, str], existing: set[str], result: SplitResult) -> None:
    """Leaks after splitting, on the same duplicate graph the check found."""
    split_of = [""] * len(report.manifest.records)
    for i, s in splits.items():
        split_of[i] = s
    result.leaks = find_leaks(split_of, report.near_pairs, Counter(splits.values()))
    for key, v in result.leaks.items():
        s, other = key.split("<-")
        if v["images"]:
            why = "the data's own split" if result.kept_existing and s in existing else "groups linked across classes"
            result.warnings.append(
                f"{v['images']} {s} images ({v['share']:.1%}) have a near duplicate in {other} "
                f"({why}); {s} accuracy overstates accuracy on new photos"
            )

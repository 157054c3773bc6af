"""``fruitlens demo``: the whole job on the default data set — fetch, check, split leak-free, train, report, export."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fruitlens.config import TrainConfig, apply_overrides
from fruitlens.data.download import FRUITS360, Progress, fetch_dataset
from fruitlens.data.check import check
from fruitlens.data.manifest import Manifest
from fruitlens.data.scan import scan
from fruitlens.data.split import split
from fruitlens.errors import ConfigError, DataError, did_you_mean
from fruitlens.evaluation.report import Report
from fruitlens.pipelines.export import ExportResult, export
from fruitlens.pipelines.train import train
from fruitlens.rundir import RunDir

log = logging.getLogger(__name__)

DEFAULT_CLASSES = 20  # a spread of Fruits-360's 155 classes that trains in minutes on two CPU cores


@dataclass(frozen=True)
class DemoResult:
    run: RunDir
    data_root: Path
    classes: list[str]
    report: Report
    export: ExportResult
    seconds: float


MIN_TEST_IMAGES = 5  # a class the leak-free split gives fewer test images would be an empty or noisy report row


def splittable_classes(pooled: Manifest, seed: int = 0) -> tuple[list[str], dict[str, int]]:
    """The classes that a leak-free split of ``pooled`` gives at least MIN_TEST_IMAGES test images and some
    validation images, and each class's test images. Fruits-360 films each fruit turning: some classes are one
    chain of near duplicates (one group) that no leak-free split can share between train and test."""
    result = split(check(pooled), seed=seed)
    counts = result.manifest.counts()
    test, val = counts.get("test", {}), counts.get("val", {})
    enough = [c for c in pooled.classes if test.get(c, 0) >= MIN_TEST_IMAGES and val.get(c, 0)]
    if len(enough) < 2:  # a small data set: every class with a test image
        enough = [c for c in pooled.classes if test.get(c, 0) and val.get(c, 0)]
    return enough, dict(test)


def pick_classes(available: list[str], spec: str) -> list[str]:
    """``all``, a number N (an even spread over the sorted classes) or a comma-separated list of names."""
    spec = spec.strip()
    if spec.lower() == "all":
        return sorted(available)
    if spec.isdigit():
        n = int(spec)
        if n < 2:
            raise ConfigError(f"--classes {n}: a classifier needs at least 2 classes")
        names = sorted(available)
        if n >= len(names):
            return names
        step = len(names) / n
        return [names[int(i * step)] for i in range(n)]
    wanted = [c.strip() for c in spec.split(",") if c.strip()]
    for c in wanted:
        if c not in available:
            raise ConfigError(f"--classes: {did_you_mean(c, available, 'class')}")
    if len(wanted) < 2:
        raise ConfigError("--classes needs at least 2 class names")
    return wanted


def demo_config(data: str, overrides: dict[str, str] | None = None) -> TrainConfig:
    """The default recipe (ImageNet MobileNetV2, a head on cached features). No fine-tune: on Fruits-360 its epoch
    never lowered the validation loss, so its weights were thrown away on every run (``fit.fine_tune_blocks=2``
    turns it on)."""
    cfg = TrainConfig()
    cfg = apply_overrides(cfg, {"data.path": data, "fit.target_acc": 0, **(overrides or {})}, "demo")
    return cfg.validated()


def demo(
    out: str | Path = "runs/demo",
    *,
    data: str | None = None,
    data_url: str | None = None,
    sha256: str = "",
    classes: str = str(DEFAULT_CLASSES),
    overrides: dict[str, str] | None = None,
    progress: Progress | None = None,
    int8: bool = True,
) -> DemoResult:
    """Runs the whole job and returns where everything is plus the headline figures."""
    t0 = time.perf_counter()
    out = Path(out)
    if RunDir(out).best_ckpt.exists():
        raise ConfigError(f"{out} already holds a demo run", f"pass --out runs/demo2, or delete {out} yourself")
    if data:
        root = Path(data)
        if not root.exists():
            raise DataError(f"--data {data}: no such folder")
    else:
        url = data_url or os.environ.get("FRUITLENS_DATA_URL") or FRUITS360.url
        source = replace(FRUITS360, url=url, sha256=sha256 or FRUITS360.sha256)
        log.info("step 1/5: getting %s %s from %s", source.name, source.version, url)
        root = fetch_dataset(source, progress=progress)
    scanned = scan(root).manifest
    # the data's own split (Fruits-360 Training/Test) leaks near duplicates: pool it and split by duplicate groups
    pooled = scanned.with_records(replace(r, split="") for r in scanned)
    chosen = _choose(pooled, classes)
    log.info(
        "step 2/5: %d of %d classes (%s): %s",
        len(chosen),
        len(scanned.classes),
        "all" if len(chosen) == len(scanned.classes) else f"--classes {classes}",
        ", ".join(chosen),
    )
    subset = pooled.with_records(r for r in pooled if r.label in set(chosen))
    out.mkdir(parents=True, exist_ok=True)
    source_csv = out / "source-manifest.csv"
    subset.to_csv(source_csv)
    log.info("step 3/5: check, leak-free split and training (pretrained MobileNetV2, a head on cached features)")
    trained = train(demo_config(str(source_csv), overrides), out)
    log.info("step 4/5: int8 export and speed (the fp32 export was made and checked by train)")
    exported = export(trained.run, int8=int8)
    log.info("step 5/5: done")
    return DemoResult(trained.run, root, chosen, trained.report, exported, time.perf_counter() - t0)


def _choose(pooled: Manifest, spec: str) -> list[str]:
    """The classes of ``--classes``: a number or ``all`` picks among the classes that the leak-free split gives
    test images (the others are named); names are taken as given, with a warning for those it cannot."""
    splittable, test = splittable_classes(pooled)
    left_out = [c for c in pooled.classes if c not in splittable]
    named = spec.strip().lower() != "all" and not spec.strip().isdigit()
    if named:
        chosen = pick_classes(pooled.classes, spec)
        for c in chosen:
            if c in left_out:
                log.warning(
                    "%s: a leak-free split gives it %d test images (its images are near duplicates of each "
                    "other); its row of the report will be empty or noisy",
                    c,
                    test.get(c, 0),
                )
        return chosen
    if left_out:
        log.info(
            "left out %d class(es) that a leak-free split gives too few test images (their images are near "
            "duplicates of each other): %s",
            len(left_out),
            ", ".join(left_out),
        )
    if len(splittable) < 2:
        raise DataError(
            f"only {len(splittable)} class(es) of the data can be split leak-free with test images",
            "pass --classes with names, or use other data",
        )
    return pick_classes(splittable, spec)

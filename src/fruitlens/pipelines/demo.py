"""``fruitlens demo``: the whole job on the default data set — fetch, check, split leak-free, train, report, export."""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fruitlens.config import TrainConfig, apply_overrides
from fruitlens.data.download import FRUITS360, Progress, fetch_dataset
from fruitlens.data.scan import scan
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
    """The default recipe: ImageNet MobileNetV2, cached features with augmented views, a short fine-tune."""
    cfg = TrainConfig()
    cfg = apply_overrides(cfg, {"data.path": data, "fit.fine_tune_blocks": 2, "fit.fine_tune_epochs": 1,
                                "fit.target_acc": 0, **(overrides or {})}, "demo")
    return cfg.validated()


def demo(out: str | Path = "runs/demo", *, data: str | None = None, data_url: str | None = None,
             sha256: str = "", classes: str = str(DEFAULT_CLASSES), overrides: dict[str, str] | None = None,
             progress: Progress | None = None, int8: bool = True) -> DemoResult:
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
    chosen = pick_classes(scanned.classes, classes)
    log.info("step 2/5: %d of %d classes (%s): %s", len(chosen), len(scanned.classes),
             "all" if len(chosen) == len(scanned.classes) else f"--classes {classes}", ", ".join(chosen))
    # the data's own split (Fruits-360 Training/Test) leaks near duplicates: pool it and split by duplicate groups
    subset = scanned.with_records(replace(r, split="") for r in scanned if r.label in set(chosen))
    out.mkdir(parents=True, exist_ok=True)
    source_csv = out / "source-manifest.csv"
    subset.to_csv(source_csv)
    log.info("step 3/5: check, leak-free split and training (pretrained MobileNetV2, cached features, short fine-tune)")
    trained = train(demo_config(str(source_csv), overrides), out)
    log.info("step 4/5: export to ONNX with a parity check")
    exported = export(trained.run, int8=int8)
    log.info("step 5/5: done")
    return DemoResult(trained.run, root, chosen, trained.report, exported, time.perf_counter() - t0)


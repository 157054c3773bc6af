"""The fast path's feature cache: run the frozen backbone once per image (and per augmented view) and keep the features.

Each image is decoded once (in DataLoader workers) into a uint8 tensor at the model's input size; the clean view
and the augmented views (batched warps, see ``augment.py``) then go through the backbone (``engine.py``). Over DDP
processes each takes every N-th batch and the shards are merged into the single-process result. The cache
(``RUN/cache/features.pt``) is read back memory-mapped; the head trains on it in about a second per epoch.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fruitlens.config import AugmentConfig
from fruitlens.jsonio import json_safe
from fruitlens.models.preprocessing import Preprocessing
from fruitlens.runtime import STAGES
from fruitlens.training.augment import augment_batch
from fruitlens.training.engine import Engine
from fruitlens.training.store import FeatureStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Views:
    """The augmented views a feature pass adds: ``count`` per image of the datasets named in ``of``, drawn with
    ``aug`` from ``seed``."""

    count: int = 0
    aug: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    of: tuple[str, ...] = ("train",)


@dataclass(frozen=True)
class Placement:
    """Where a feature pass runs: process ``rank`` of ``world`` (DDP; ``barrier`` waits for all), on the GPU or not,
    with ``workers`` decoding processes; ``prefer_onnx``: ONNX Runtime on a CPU."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] | None = None
    gpu: bool = False
    workers: int = 0
    prefer_onnx: bool = True


@dataclass
class FeaturePass:
    """Who computed the feature cache: ``train_info.json``'s ``feature_pass``."""

    world_size: int = 1
    images_per_rank: list[int] = field(default_factory=list)  # images decoded and forwarded by each process
    seconds_per_rank: list[float] = field(default_factory=list)
    cache_bytes: int = 0
    reused: bool = False  # the run's cache was there already (--resume)

    def text(self) -> str:
        plus = lambda xs, f: " + ".join(f.format(x) for x in xs)
        return (
            f"features: {self.world_size} process(es), {plus(self.images_per_rank, '{:,}')} images, "
            f"{plus(self.seconds_per_rank, '{:.1f}')} s, cache {self.cache_bytes / 2**20:.1f} MiB"
        )


def shard_batches(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """The batches (index lists) of ``n`` items in order that process ``rank`` of ``world`` computes: every
    ``world``-th batch of the same batching a single process uses, so that the shards together are that pass."""
    return [list(range(s, min(s + batch_size, n))) for b, s in enumerate(range(0, n, batch_size)) if b % world == rank]


def _progress(loader: DataLoader, name: str, passes: int):
    """A bar on a terminal (the feature pass is the longest step of a default run), nothing in a log file."""
    if not sys.stderr.isatty():
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=f"features: {name} x{passes}", unit="batch", leave=False, dynamic_ncols=True)


def _batch_generator(seed: int, name: str, batch: int) -> torch.Generator:
    """The augmentation draws of a batch depend on the seed, the split and the batch's place, not on the process."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + batch) % 2**63)


def extract(
    engine: Engine,
    ds: Dataset,
    batches: list[list[int]],
    batch_size: int,
    pre: Preprocessing,
    name: str,
    views: int = 0,
    aug: AugmentConfig | None = None,
    seed: int = 0,
    known_clean: torch.Tensor | None = None,
    workers: int = 0,
) -> dict[str, torch.Tensor]:
    """This process's rows of split ``name``: ``idx`` and ``clean`` (the clean view of each image in ``batches``), and
    with ``views``, ``aug`` (the augmented views) with ``aug_idx`` (their image) and ``aug_key`` (their place in the
    single-process order: batch, view, position). ``known_clean``: every image's clean features already (only the
    views run)."""
    loader = DataLoader(ds, batch_sampler=batches, num_workers=workers)
    n = sum(len(r) for r in batches)
    # written in place into tensors of the final size: a list of batches and its concatenation would hold the
    # features twice (gigabytes at 100,000 images)
    out: dict[str, torch.Tensor] = {"idx": torch.zeros(n, dtype=torch.long)}
    if views:
        out.update(aug_idx=torch.zeros(n * views, dtype=torch.long), aug_key=torch.zeros(n * views, dtype=torch.long))
    at = 0
    t0 = time.perf_counter()
    for rows, (x, _) in zip(batches, _progress(loader, name, views + (known_clean is None))):
        rows_t = torch.tensor(rows)
        x = x.to(engine.device, non_blocking=True)
        f = engine(pre.normalise(x)) if known_clean is None else known_clean[rows_t]
        if "clean" not in out:
            out["clean"] = torch.empty(n, f.shape[1])
            if views:
                out["aug"] = torch.empty(n * views, f.shape[1])
        out["clean"][at : at + len(rows)] = f
        out["idx"][at : at + len(rows)] = rows_t
        b = rows[0] // batch_size
        g = _batch_generator(seed, name, b)
        for v in range(views):
            place = slice(views * at + v * len(rows), views * at + (v + 1) * len(rows))
            out["aug"][place] = engine(pre.normalise(augment_batch(x, aug, g)))
            out["aug_idx"][place] = rows_t
            out["aug_key"][place] = (b * (views + 1) + v) * batch_size + torch.arange(len(rows))
        at += len(rows)
    passes = views + (known_clean is None)
    dt = time.perf_counter() - t0
    log.info(
        "features: %s, %d images x %d view(s) in %.1fs (%.0f img/s, %s)%s",
        name,
        n,
        passes,
        dt,
        n * passes / max(dt, 1e-9),
        engine.name,
        "; clean view from the feature store" if passes == views else "",
    )
    if "clean" not in out:  # no batch for this process
        out["clean"] = torch.zeros((0, 1))
        if views:
            out["aug"] = torch.zeros((0, 1))
    return out


def _merge(
    parts: list[dict[str, dict[str, torch.Tensor]]], name: str, targets: torch.Tensor, known: torch.Tensor | None
) -> dict[str, tuple[torch.Tensor, ...]]:
    """The shards of split ``name`` in the single-process order: ``{name: (features, targets)}`` and, with views,
    ``{name_aug: (features, targets, image index)}``."""
    rows = [p[name] for p in parts if p.get(name) is not None and len(p[name]["idx"])]  # a process may get no batch
    if not rows:  # every clean feature came from the feature store and there are no views
        return {name: (known, targets)}
    ordered = lambda t, order: t if order is None else t[order]
    cat = lambda key: rows[0][key] if len(rows) == 1 else torch.cat([r[key] for r in rows])
    idx = cat("idx")
    # one process computed every batch in order: its rows are the result as they are (no copy)
    order = None if len(rows) == 1 and bool((idx[1:] > idx[:-1]).all()) else torch.argsort(idx)
    out = {name: (ordered(cat("clean"), order), targets[ordered(idx, order)])}
    if "aug" in rows[0]:
        key = cat("aug_key")
        order = None if len(rows) == 1 and bool((key[1:] > key[:-1]).all()) else torch.argsort(key)
        img = ordered(cat("aug_idx"), order)
        out[f"{name}_aug"] = (ordered(cat("aug"), order), targets[img], img)
    return out


def cached_features(
    backbone: nn.Module,
    pre: Preprocessing,
    datasets: dict[str, Dataset],
    views: Views = Views(),
    *,
    batch_size: int = 32,
    cache_file: Path | None = None,
    store: FeatureStore | None = None,
    place: Placement = Placement(),
) -> tuple[dict[str, tuple[torch.Tensor, ...]], FeaturePass]:
    """Features for ``datasets`` (uint8 images, ``ImageDataset``); those ``views.of`` names also get ``views.count``
    augmented views (``<name>_aug``).

    Process ``place.rank`` of ``place.world`` (DDP) decodes and forwards every ``world``-th batch and writes its shard
    beside ``cache_file``; after ``place.barrier`` every process merges the shards into the single-process result (the
    same tensors, views included). ``place.gpu``: run on the GPU (if there is one). With ``cache_file`` the result is
    saved, and reused when present (so ``--resume`` skips the pass). ``store``: clean features already computed for
    these files (``check --labels``) are taken from it, and new ones added to it.
    """
    if cache_file is not None and cache_file.is_file():
        log.info("features: reusing %s", cache_file)
        saved, meta = load_cache(cache_file)
        return saved, FeaturePass(**{**meta, "reused": True})
    rank, world, barrier = place.rank, place.world, place.barrier
    if world > 1 and (cache_file is None or barrier is None):
        raise ValueError("a feature pass over several processes needs a cache file and a barrier")
    engine = None
    mine: dict[str, dict | None] = {}
    known_of: dict[str, torch.Tensor | None] = {}
    t0, images = time.perf_counter(), 0
    for name, ds in datasets.items():
        n_views = views.count if name in views.of else 0
        known = store.lookup(ds.paths)[0] if store is not None else None
        known_of[name] = known
        if known is not None and not n_views:  # nothing to decode
            log.info("features: %s, %d images from the feature store %s", name, len(ds), store.path)
            mine[name] = None
            continue
        batches = shard_batches(len(ds), batch_size, rank, world)
        engine = engine or Engine(
            backbone,
            pre.image_size,
            place.prefer_onnx,
            place.gpu,
            threads=max(1, (os.cpu_count() or 1) // world) if world > 1 else 0,
        )
        mine[name] = extract(
            engine, ds, batches, batch_size, pre, name, n_views, views.aug, views.seed, known, place.workers
        )
        images += sum(len(b) for b in batches)
    part = {"rows": mine, "images": images, "seconds": round(time.perf_counter() - t0, 2)}
    if engine is not None:
        STAGES.add("features: backbone", engine.seconds)
    parts = [part]
    if world > 1:
        shard = lambda r: cache_file.with_name(f"{cache_file.stem}.rank{r}.pt")
        shard(rank).parent.mkdir(parents=True, exist_ok=True)
        torch.save(part, shard(rank))
        barrier()
        parts = [part if r == rank else torch.load(shard(r), weights_only=True) for r in range(world)]
    out: dict[str, tuple[torch.Tensor, ...]] = {}
    for name, ds in datasets.items():
        out.update(_merge([p["rows"] for p in parts], name, torch.tensor(ds.targets), known_of[name]))
    fp = FeaturePass(
        world,
        [p["images"] for p in parts],
        [p["seconds"] for p in parts],
        sum(t.numel() * t.element_size() for v in out.values() for t in v),
    )
    if rank == 0:
        if store is not None:
            for name, ds in datasets.items():
                if known_of[name] is None:
                    store.add(ds.paths, out[name][0])
        if cache_file is not None:  # atomic: a run killed while saving leaves no half-written cache
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
            torch.save({**out, "_feature_pass": json_safe(fp)}, tmp)
            tmp.replace(cache_file)
    if world > 1:
        barrier()  # every process has read every shard, and the merged cache is written
        if rank == 0:
            for r in range(world):
                shard(r).unlink(missing_ok=True)
    log.info("%s", fp.text())
    if cache_file is not None:  # from here on the features are pages of the file, not the process's memory
        out = load_cache(cache_file)[0]
    return out, fp


def load_cache(path: Path) -> tuple[dict[str, tuple[torch.Tensor, ...]], dict]:
    """The feature cache memory-mapped (the head's DataLoader reads pages of the file; the process's memory does
    not grow with the data set), and what made it."""
    saved = torch.load(path, weights_only=True, mmap=True)
    return saved, saved.pop("_feature_pass", None) or {}

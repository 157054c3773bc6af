"""The fast path's feature cache: run the frozen backbone once per image (and per augmented view) and keep the features.

Each image is decoded once (in DataLoader workers) into a uint8 tensor at the model's input size; the clean view
and the augmented views (batched warps, see ``augment.py``) then go through the backbone (``engine.py``). The pass is
Lightning's ``Trainer.predict``: under DDP its distributed sampler deals out whole batches (every N-th to each process),
a ``BasePredictionWriter`` writes each process's shard, and the shards merge into the single-process result. The cache
(``RUN/cache/features.pt``) is read back memory-mapped; the head trains on it in about a second per epoch.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import sys
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
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
    """Where a feature pass runs, in Lightning's terms: ``accelerator``, ``devices``, ``strategy`` and ``num_nodes``
    (a DDP strategy deals the batches out over its processes), with ``workers`` decoding processes each;
    ``prefer_onnx``: ONNX Runtime on a CPU."""

    accelerator: str = "cpu"
    devices: int | str | list[int] = 1
    strategy: str = "auto"
    num_nodes: int = 1
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


def _batch_generator(seed: int, name: str, batch: int) -> torch.Generator:
    """The augmentation draws of a batch depend on the seed, the split and the batch's place, not on the process."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 7919 + batch) % 2**63)


@dataclass(frozen=True)
class _Job:
    """One dataset of a feature pass: its ``name``, ``views`` per image, and ``known`` clean features (only the views
    run)."""

    name: str
    size: int
    views: int
    known: torch.Tensor | None


class _Batches(Dataset):
    """Item ``b`` is batch ``b`` of the single-process batching of ``ds``: ``(uint8 images, their indices, b)``.

    Lightning's distributed sampler deals these items out (process r of N: batches r, r + N, ...), so every process
    computes whole batches of the single-process pass, with the same augmentation draws, and the shards merge into
    that pass exactly. (The augmented views are made by the process that runs the backbone: made here, in the
    decoding process, they slowed the backbone down more than they saved on 2 CPU cores.)"""

    def __init__(self, ds: Dataset, batch_size: int, least: int = 1) -> None:
        self.ds, self.batch_size, self.least = ds, batch_size, least

    def __len__(self) -> int:  # at least one item per process (Lightning's sampler asks it): the last ones empty
        return max(self.least, -(-len(self.ds) // self.batch_size))

    def __getitem__(self, b: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        rows = range(b * self.batch_size, min((b + 1) * self.batch_size, len(self.ds)))
        if not rows:
            return torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.long), b
        return torch.stack([self.ds[i][0] for i in rows]), torch.tensor(rows), b


class _FeatureModule(L.LightningModule):
    """``predict_step``: a batch's clean features (or the known ones) and its augmented views, through the ``Engine``
    made for this process when the pass starts."""

    def __init__(
        self, backbone: nn.Module, pre: Preprocessing, jobs: list[_Job], views: Views, prefer_onnx: bool
    ) -> None:
        super().__init__()
        self.frozen, self.pre, self.jobs, self.views, self.prefer_onnx = [backbone], pre, jobs, views, prefer_onnx
        self.engine: Engine | None = None

    def on_predict_start(self) -> None:
        world, device = self.trainer.world_size, self.trainer.strategy.root_device
        self.engine = Engine(
            self.frozen[0],
            self.pre.image_size,
            self.prefer_onnx,
            threads=max(1, (os.cpu_count() or 1) // world) if world > 1 else 0,
            device=device,  # the GPU Lightning gave this process (its batches arrive there)
        )

    def predict_step(self, batch: tuple, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor] | None:
        x, rows, b = batch
        if not len(rows):  # a process with no batch of this dataset
            return None
        job, engine = self.jobs[dataloader_idx], self.engine
        x = x.to(engine.device, non_blocking=True)
        out = {"rows": rows.cpu(), "batch": torch.tensor(int(b))}
        out["clean"] = engine(self.pre.normalise(x)) if job.known is None else job.known[rows.cpu()]
        if job.views:
            g = _batch_generator(self.views.seed, job.name, int(b))
            out["aug"] = torch.cat(
                [engine(self.pre.normalise(augment_batch(x, self.views.aug, g))) for _ in range(job.views)]
            )
        return out


class _ShardWriter(BasePredictionWriter):
    """Writes each batch's features into this process's shard, tensors of their final size allocated at the first
    batch (a list of batches and its concatenation would hold the features twice: gigabytes at 100,000 images).
    A shard holds, per dataset, ``idx`` and ``clean`` (the clean view of each image) and with views ``aug`` with
    ``aug_idx`` (their image) and ``aug_key`` (their place in the single-process order: batch, view, position)."""

    def __init__(
        self, jobs: list[_Job], batch_size: int, shard: Callable[[int], Path] | None, dtype: torch.dtype
    ) -> None:
        super().__init__("batch")
        self.jobs, self.batch_size, self.shard, self.dtype = jobs, batch_size, shard, dtype
        self.rows: dict[str, dict[str, torch.Tensor] | None] = {}
        self.at: dict[str, int] = {}
        self.seconds: dict[str, float] = {}  # of each dataset: the time up to each of its batches' end
        self.images = 0
        self.t0 = self.last = 0.0

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.t0 = self.last = time.perf_counter()

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.last = time.perf_counter()  # the engine is built (its ONNX export is not a dataset's time)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        if prediction is None:
            return
        job = self.jobs[dataloader_idx]
        rows, clean, views = prediction["rows"], prediction["clean"], job.views
        now = time.perf_counter()
        self.seconds[job.name] = self.seconds.get(job.name, 0.0) + now - self.last
        self.last = now
        if self.rows.get(job.name) is None:
            n = sum(len(r) for r in shard_batches(job.size, self.batch_size, trainer.global_rank, trainer.world_size))
            dim, dtype = clean.shape[1], self.dtype
            out = {"idx": torch.zeros(n, dtype=torch.long), "clean": torch.empty(n, dim, dtype=dtype)}
            if views:
                out |= {
                    "aug": torch.empty(n * views, dim, dtype=dtype),
                    "aug_idx": torch.zeros(n * views, dtype=torch.long),
                    "aug_key": torch.zeros(n * views, dtype=torch.long),
                }
            self.rows[job.name], self.at[job.name] = out, 0
        out, at, k = self.rows[job.name], self.at[job.name], len(rows)
        out["clean"][at : at + k] = clean
        out["idx"][at : at + k] = rows
        if views:
            b = int(prediction["batch"])
            place = slice(views * at, views * (at + k))
            out["aug"][place] = prediction["aug"]
            out["aug_idx"][place] = rows.repeat(views)
            out["aug_key"][place] = torch.cat(
                [(b * (views + 1) + v) * self.batch_size + torch.arange(k) for v in range(views)]
            )
        self.at[job.name] = at + k
        self.images += k

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for job in self.jobs:
            if job.name in self.seconds:
                dt, passes = self.seconds[job.name], job.views + (job.known is None)
                n = self.at[job.name]
                log.info(
                    "features: %s, %d images x %d view(s) in %.1fs (%.0f img/s, %s)%s",
                    job.name,
                    n,
                    passes,
                    dt,
                    n * passes / max(dt, 1e-9),
                    pl_module.engine.name,
                    "; clean view from the feature store" if passes == job.views else "",
                )
            else:  # no batch for this process
                self.rows[job.name] = None
        STAGES.add("features: backbone", pl_module.engine.seconds)
        if trainer.world_size > 1:
            if self.shard is None:
                raise ValueError("a feature pass over several processes needs a cache file")
            path = self.shard(trainer.global_rank)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.part(), path)
            trainer.strategy.barrier()

    def part(self) -> dict:
        return {"rows": self.rows, "images": self.images, "seconds": round(time.perf_counter() - self.t0, 2)}


def _run_pass(
    backbone: nn.Module,
    pre: Preprocessing,
    jobs: list[_Job],
    sets: list[Dataset],
    views: Views,
    batch_size: int,
    place: Placement,
    shard: Callable[[int], Path] | None,
    dtype: torch.dtype,
) -> tuple[int, int, dict]:
    """Lightning's ``Trainer.predict`` over ``sets`` (one per job, batched as one process would): this process's rank,
    the number of processes, and its shard (``rows`` of every job, the ``images`` it decoded and the ``seconds`` it
    took); over several processes each saves its shard to ``shard(rank)`` and waits for the others. The trainer is
    not returned: it (and the module's jobs, the features taken from the feature store) goes when this returns."""
    writer = _ShardWriter(jobs, batch_size, shard, dtype)
    trainer = L.Trainer(
        accelerator=place.accelerator,
        devices=place.devices,
        strategy=place.strategy,
        num_nodes=place.num_nodes,
        callbacks=[writer],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=sys.stderr.isatty(),  # a bar on a terminal, nothing in a log file
    )
    loaders = [
        DataLoader(_Batches(ds, batch_size, trainer.world_size), batch_size=None, num_workers=place.workers)
        for ds in sets
    ]
    with warnings.catch_warnings():  # each item carries its images' indices; Lightning's are not needed
        warnings.filterwarnings("ignore", message=".*infer the batch indices.*")
        trainer.predict(
            _FeatureModule(backbone, pre, jobs, views, place.prefer_onnx), loaders, return_predictions=False
        )
    return trainer.global_rank, trainer.world_size, writer.part()


def _shard_file(cache_file: Path, rank: int) -> Path:
    return cache_file.with_name(f"{cache_file.stem}.rank{rank}.pt")


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
    dtype: torch.dtype = torch.float32,
) -> tuple[dict[str, tuple[torch.Tensor, ...]], FeaturePass]:
    """Features for ``datasets`` (uint8 images, ``ImageDataset``); those ``views.of`` names also get ``views.count``
    augmented views (``<name>_aug``).

    The pass is Lightning's ``Trainer.predict`` on ``place``: under a DDP strategy each process decodes and forwards
    every N-th batch (Lightning's distributed sampler deals out whole batches) and writes its shard beside
    ``cache_file``; every process then merges the shards into the single-process result (the same tensors, views
    included). With ``cache_file`` the result is saved, and reused when present (so ``--resume`` skips the pass).
    ``store``: clean features already computed for these files (``check --labels``) are taken from it, and new ones
    added to it. ``dtype``: the cached features' (float16 halves the cache, and the memory that reads it).
    """
    if cache_file is not None and cache_file.is_file():
        log.info("features: reusing %s", cache_file)
        saved, meta = load_cache(cache_file)
        return saved, FeaturePass(**{**meta, "reused": True})
    jobs, sets = [], []
    known_of: dict[str, torch.Tensor | None] = {}
    for name, ds in datasets.items():
        n_views = views.count if name in views.of else 0
        known_of[name] = known = store.lookup(ds.paths)[0] if store is not None else None
        if known is not None and not n_views:  # nothing to decode
            log.info("features: %s, %d images from the feature store %s", name, len(ds), store.path)
            continue
        jobs.append(_Job(name, len(ds), n_views, known))
        sets.append(ds)
    # no pass (every feature known): no shards and no barrier; each process writes the cache (atomically), since
    # one that finds the file written before it looks returns early and would never reach a barrier
    rank, world = 0, 1
    shard = None if cache_file is None else functools.partial(_shard_file, cache_file)
    part = {"rows": {}, "images": 0, "seconds": 0.0}  # this process's (its rows are the writer's buffers)
    parts = [part]
    if jobs:
        rank, world, part = _run_pass(backbone, pre, jobs, sets, views, batch_size, place, shard, dtype)
        if world > 1:  # every process wrote its shard and waited for the others (ddp_spawn: in its own process)
            parts = [torch.load(shard(r), weights_only=True, mmap=True) for r in range(world)]
        else:
            parts = [part]
    out: dict[str, tuple[torch.Tensor, ...]] = {}
    for name, ds in datasets.items():
        out.update(_merge([p["rows"] for p in parts], name, torch.tensor(ds.targets), known_of[name]))
    stored = {name: known is not None for name, known in known_of.items()}  # (the features themselves go)
    del known_of
    fp = FeaturePass(
        world,
        [p["images"] for p in parts],
        [p["seconds"] for p in parts],
        sum(t.numel() * t.element_size() for v in out.values() for t in v),
    )
    if rank == 0 and cache_file is not None:  # atomic: a run killed while saving leaves no half-written cache
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        torch.save({**out, "_feature_pass": json_safe(fp)}, tmp)
        tmp.replace(cache_file)
    if world > 1:
        if dist.is_available() and dist.is_initialized():  # (ddp_spawn: the main process, after its children)
            dist.barrier()  # every process has read every shard, and the merged cache is written
        if rank == 0:
            for r in range(world):
                shard(r).unlink(missing_ok=True)
    log.info("%s", fp.text())
    if cache_file is not None:
        # from here on the features are pages of the file, not the process's memory: the pass's buffers (the
        # writer's, which ``parts`` holds too) are let go before anything else reads them
        for p in (*parts, part):
            p["rows"].clear()
        del jobs, sets
        gc.collect()  # Lightning's trainer and module refer to each other: they (and what they hold) go here
        out = load_cache(cache_file)[0]
    if rank == 0 and store is not None:
        for name, ds in datasets.items():
            if not stored[name]:
                # the values the run trains on (half precision), kept as float32: a later run reading them from the
                # store trains on exactly what this one did
                store.add(ds.paths, out[name][0])
    return out, fp


def load_cache(path: Path) -> tuple[dict[str, tuple[torch.Tensor, ...]], dict]:
    """The feature cache memory-mapped (the head's DataLoader reads pages of the file; the process's memory does
    not grow with the data set), and what made it."""
    saved = torch.load(path, weights_only=True, mmap=True)
    return saved, saved.pop("_feature_pass", None) or {}

"""The fast path: run the frozen backbone once per image (and per augmented view) and cache the features.

Each image is decoded once (in DataLoader workers) into a uint8 tensor at the model's input size; the clean view
and ``views`` augmented views (batched warps, see ``augment.py``) then go through the backbone. The backbone runs
on the GPU when training does, else through ONNX Runtime when available (several times faster than PyTorch eager on
a CPU), else PyTorch channels_last.
The head then trains on the cached tensors in about a second per epoch.
"""
from __future__ import annotations

import copy
import logging
import os
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fruitlens.config import AugmentConfig
from fruitlens.inference import onnx as onnx_io
from fruitlens.jsonio import json_safe
from fruitlens.models.preprocessing import Preprocessing
from fruitlens.runtime import STAGES
from fruitlens.training.augment import augment_batch

log = logging.getLogger(__name__)


class Engine:
    """Runs a frozen backbone on batches: on the GPU if asked and present, else ONNX Runtime if it works, else PyTorch.

    ``device`` is where the input batches should be (augmentation runs there too).
    """

    def __init__(self, backbone: nn.Module, image_size: int, prefer_onnx: bool = True, gpu: bool = False,
                 threads: int = 0) -> None:
        self.device = torch.device("cpu")
        if gpu and torch.cuda.is_available():  # under DDP each process takes its own GPU
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        self.backbone = backbone.eval()
        self.session = None
        if self.device.type == "cuda":  # a copy: the model itself stays on the CPU for the training phases
            self.backbone = copy.deepcopy(backbone).to(self.device)
        elif prefer_onnx:
            try:
                self.session = _onnx_session(backbone, image_size, threads)
            except Exception as exc:  # any exporter/runtime problem: PyTorch still works
                log.info("feature pass falls back to PyTorch (%s)", exc)
        self.name = "onnxruntime" if self.session is not None else f"pytorch {self.device.type}"
        self.seconds = 0.0  # spent in the backbone (the rest of a feature pass is decoding and augmentation)
        if self.session is None:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            if self.session is not None:
                return torch.from_numpy(self.session.run(None, {"input": x.contiguous().numpy()})[0])
            return self.backbone(x.contiguous(memory_format=torch.channels_last)).float().cpu()
        finally:
            self.seconds += time.perf_counter() - t0


def _onnx_session(backbone: nn.Module, image_size: int, threads: int = 0):
    with tempfile.TemporaryDirectory(prefix="fruitlens-feat-") as tmp:  # the session holds the model in memory
        path = Path(tmp) / "backbone.onnx"
        onnx_io.export_module(backbone, path, image_size)
        return onnx_io.session(path, threads)


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
        return (f"features: {self.world_size} process(es), {plus(self.images_per_rank, '{:,}')} images, "
                f"{plus(self.seconds_per_rank, '{:.1f}')} s, cache {self.cache_bytes / 2**20:.1f} MiB")


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


def extract(engine: Engine, ds: Dataset, batches: list[list[int]], batch_size: int, pre: Preprocessing, name: str,
            views: int = 0, aug: AugmentConfig | None = None, seed: int = 0, known_clean: torch.Tensor | None = None,
            workers: int = 0) -> dict[str, torch.Tensor]:
    """This process's rows of split ``name``: ``idx`` and ``clean`` (the clean view of each image in ``batches``), and
    with ``views``, ``aug`` (the augmented views) with ``aug_idx`` (their image) and ``aug_key`` (their place in the
    single-process order: batch, view, position). ``known_clean``: every image's clean features already (only the
    views run)."""
    loader = DataLoader(ds, batch_sampler=batches, num_workers=workers)
    clean, aug_feats, idx, aug_idx, aug_key = [], [], [], [], []
    t0 = time.perf_counter()
    for rows, (x, _) in zip(batches, _progress(loader, name, views + (known_clean is None))):
        rows_t = torch.tensor(rows)
        x = x.to(engine.device, non_blocking=True)
        clean.append(engine(pre.normalise(x)) if known_clean is None else known_clean[rows_t])
        idx.append(rows_t)
        b = rows[0] // batch_size
        g = _batch_generator(seed, name, b)
        for v in range(views):
            aug_feats.append(engine(pre.normalise(augment_batch(x, aug, g))))
            aug_idx.append(rows_t)
            aug_key.append((b * (views + 1) + v) * batch_size + torch.arange(len(rows)))
    n = sum(len(r) for r in batches)
    passes = views + (known_clean is None)
    dt = time.perf_counter() - t0
    log.info("features: %s, %d images x %d view(s) in %.1fs (%.0f img/s, %s)%s", name, n, passes, dt,
             n * passes / max(dt, 1e-9), engine.name, "; clean view from the feature store" if passes == views else "")
    cat = lambda xs, width=0: torch.cat(xs) if xs else torch.zeros((0, width) if width else 0)
    out = {"idx": cat(idx).long(), "clean": cat(clean, 1)}
    if views:
        out.update(aug=cat(aug_feats, 1), aug_idx=cat(aug_idx).long(), aug_key=cat(aug_key).long())
    return out


def _merge(parts: list[dict[str, dict[str, torch.Tensor]]], name: str, targets: torch.Tensor,
           known: torch.Tensor | None) -> dict[str, tuple[torch.Tensor, ...]]:
    """The shards of split ``name`` in the single-process order: ``{name: (features, targets)}`` and, with views,
    ``{name_aug: (features, targets, image index)}``."""
    rows = [p[name] for p in parts if p.get(name) is not None and len(p[name]["idx"])]  # a process may get no batch
    if not rows:  # every clean feature came from the feature store and there are no views
        return {name: (known, targets)}
    idx = torch.cat([r["idx"] for r in rows])
    order = torch.argsort(idx)
    out = {name: (torch.cat([r["clean"] for r in rows])[order], targets[idx[order]])}
    if "aug" in rows[0]:
        key = torch.cat([r["aug_key"] for r in rows])
        order = torch.argsort(key)
        img = torch.cat([r["aug_idx"] for r in rows])[order]
        out[f"{name}_aug"] = (torch.cat([r["aug"] for r in rows])[order], targets[img], img)
    return out


def cached_features(backbone: nn.Module, pre: Preprocessing, datasets: dict[str, Dataset], *, batch_size: int,
                    views: int, aug: AugmentConfig, seed: int = 0, cache_file: Path | None = None,
                    prefer_onnx: bool = True, gpu: bool = False, store: "FeatureStore | None" = None, workers: int = 0,
                    rank: int = 0, world: int = 1, barrier: Callable[[], None] | None = None,
                    augmented: tuple[str, ...] = ("train",)) -> tuple[dict[str, tuple[torch.Tensor, ...]], FeaturePass]:
    """Features for ``datasets`` (uint8 images, ``ImageDataset``); those named in ``augmented`` also get ``views``
    augmented views (``<name>_aug``).

    Process ``rank`` of ``world`` (DDP) decodes and forwards every ``world``-th batch and writes its shard beside
    ``cache_file``; after ``barrier`` every process merges the shards into the single-process result (the same
    tensors, views included). ``gpu``: run on the GPU (if there is one). With ``cache_file`` the result is saved, and
    reused when present (so ``--resume`` skips the pass). ``store``: clean features already computed for these files
    (``check --labels``) are taken from it, and new ones added to it.
    """
    if cache_file is not None and cache_file.is_file():
        log.info("features: reusing %s", cache_file)
        saved, meta = load_cache(cache_file)
        return saved, FeaturePass(**{**meta, "reused": True})
    if world > 1 and (cache_file is None or barrier is None):
        raise ValueError("a feature pass over several processes needs a cache file and a barrier")
    engine = None
    mine: dict[str, dict | None] = {}
    known_of: dict[str, torch.Tensor | None] = {}
    t0, images = time.perf_counter(), 0
    for name, ds in datasets.items():
        n_views = views if name in augmented else 0
        known = store.lookup(ds.paths)[0] if store is not None else None
        known_of[name] = known
        if known is not None and not n_views:  # nothing to decode
            log.info("features: %s, %d images from the feature store %s", name, len(ds), store.path)
            mine[name] = None
            continue
        batches = shard_batches(len(ds), batch_size, rank, world)
        engine = engine or Engine(backbone, pre.image_size, prefer_onnx, gpu,
                                  threads=max(1, (os.cpu_count() or 1) // world) if world > 1 else 0)
        mine[name] = extract(engine, ds, batches, batch_size, pre, name, n_views, aug, seed, known, workers)
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
    fp = FeaturePass(world, [p["images"] for p in parts], [p["seconds"] for p in parts],
                     sum(t.numel() * t.element_size() for v in out.values() for t in v))
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


def _weights_key(model: str, weights: str) -> str:
    """What the backbone's weights are, for the store's file name: "imagenet" names the torchvision entry it loads
    (importing IMAGENET1K_V2 beside V1 switches to it), a file its path, size and modification time."""
    from fruitlens.models.registry import get_spec, imagenet_weights

    spec = get_spec(model)
    enum = spec.weights_enum
    if weights == "imagenet" and enum is not None:
        chosen = imagenet_weights(spec)  # V1 keeps the store's name from before the entry was in it
        return "imagenet" if chosen == getattr(enum, "IMAGENET1K_V1", None) else f"imagenet:{chosen.name}"
    path = Path(weights)
    if path.is_file():
        st = path.stat()
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return weights


class FeatureStore:
    """Clean-view backbone features per image file, cached under ``~/.cache/fruitlens/features`` (never beside the
    user's images), so that ``check --labels`` and a following ``train`` compute them once.

    One file per (model, feature layer, weights, input size, preprocessing); an entry is keyed by the image's absolute
    path, size and modification time, so a changed file is computed again, and a manifest of the same files finds
    them too.
    """

    def __init__(self, model: str, weights: str, pre: Preprocessing, cache: Path | None = None,
                 layer: str = "last") -> None:
        import hashlib
        import json

        from fruitlens.data.download import cache_root

        key = f"{model}|{_weights_key(model, weights)}|{json.dumps(pre.to_dict())}"
        tag = hashlib.sha1(key.encode()).hexdigest()[:12]
        layer = "" if layer == "last" else f"-{layer}"  # the last layer's files keep their names
        self.path = (cache or cache_root() / "features") / f"{model}{layer}-{pre.image_size}px-{tag}.pt"
        self.index: dict[tuple, int] = {}
        self.x: torch.Tensor | None = None
        if self.path.is_file():
            try:
                saved = torch.load(self.path, weights_only=True)
                self.index = {tuple(k): i for i, k in enumerate(saved["keys"])}
                self.x = saved["x"]
            except Exception as exc:  # a broken cache is recomputed, never trusted
                log.info("feature store %s unreadable (%s): starting again", self.path, exc)

    @staticmethod
    def key(path: str | Path) -> tuple:
        st = Path(path).stat()
        return (str(Path(path).resolve()), int(st.st_size), int(st.st_mtime_ns))

    def lookup(self, paths: list[str]) -> tuple[torch.Tensor | None, list[int]]:
        """(features of the known paths in order, or None if any is missing; indices of the missing ones)."""
        rows, missing = [], []
        for i, p in enumerate(paths):
            try:
                row = self.index.get(self.key(p))
            except OSError:
                row = None
            (missing.append(i) if row is None else rows.append(row))
        if missing or self.x is None:
            return None, missing if self.x is not None else list(range(len(paths)))
        return self.x[torch.tensor(rows, dtype=torch.long)], []

    def add(self, paths: list[str], features: torch.Tensor) -> None:
        keys, new = [], []
        for p, f in zip(paths, features):
            try:
                k = self.key(p)
            except OSError:
                continue
            if k not in self.index:
                keys.append(k)
                new.append(f)
        if not new:
            return
        start = 0 if self.x is None else len(self.x)
        self.x = torch.stack(new) if self.x is None else torch.cat([self.x, torch.stack(new)])
        self.index.update({k: start + i for i, k in enumerate(keys)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        ordered = sorted(self.index, key=self.index.get)
        torch.save({"keys": [list(k) for k in ordered], "x": self.x}, tmp)
        tmp.replace(self.path)

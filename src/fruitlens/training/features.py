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
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from fruitlens.config import AugmentConfig
from fruitlens.inference import onnx as onnx_io
from fruitlens.models.preprocessing import Preprocessing
from fruitlens.runtime import STAGES
from fruitlens.training.augment import augment_batch

log = logging.getLogger(__name__)


class Engine:
    """Runs a frozen backbone on batches: on the GPU if asked and present, else ONNX Runtime if it works, else PyTorch.

    ``device`` is where the input batches should be (augmentation runs there too).
    """

    def __init__(self, backbone: nn.Module, image_size: int, prefer_onnx: bool = True, gpu: bool = False) -> None:
        self.device = torch.device("cpu")
        if gpu and torch.cuda.is_available():  # under DDP each process takes its own GPU
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        self.backbone = backbone.eval()
        self.session = None
        if self.device.type == "cuda":  # a copy: the model itself stays on the CPU for the training phases
            self.backbone = copy.deepcopy(backbone).to(self.device)
        elif prefer_onnx:
            try:
                self.session = _onnx_session(backbone, image_size)
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


def _onnx_session(backbone: nn.Module, image_size: int):
    with tempfile.TemporaryDirectory(prefix="fruitlens-feat-") as tmp:  # the session holds the model in memory
        path = Path(tmp) / "backbone.onnx"
        onnx_io.export_module(backbone, path, image_size)
        return onnx_io.session(path)


def extract(engine: Engine, loader: DataLoader, pre: Preprocessing, name: str, views: int = 0,
            aug: AugmentConfig | None = None, seed: int = 0,
            known_clean: torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, ...]]:
    """``{name: (features, targets)}`` of the clean view, plus ``{name}_aug: (features, targets, image index)`` with
    ``views`` augmented views of each image. ``known_clean``: the clean features already (only the views run)."""
    g = torch.Generator().manual_seed(seed)
    clean, aug_feats, ys, aug_idx = [], [], [], []
    t0, n = time.perf_counter(), 0
    for x, y in _progress(loader, name, views + (known_clean is None)):
        x = x.to(engine.device, non_blocking=True)
        clean.append(engine(pre.normalise(x)) if known_clean is None else known_clean[n:n + len(y)])
        for _ in range(views):
            aug_feats.append(engine(pre.normalise(augment_batch(x, aug, g))))
            aug_idx.append(torch.arange(n, n + len(y)))
        ys.append(torch.as_tensor(y))
        n += len(y)
    dt = time.perf_counter() - t0
    passes = views + (known_clean is None)
    log.info("features: %s, %d images x %d view(s) in %.1fs (%.0f img/s, %s)%s", name, n, passes, dt,
             n * passes / max(dt, 1e-9), engine.name, "; clean view from the feature store" if passes == views else "")
    out = {name: (torch.cat(clean), torch.cat(ys))}
    if views:
        # views of one batch were appended batch by batch: targets repeat per view within each batch
        out[f"{name}_aug"] = (torch.cat(aug_feats), torch.cat([t for t in ys for _ in range(views)]), torch.cat(aug_idx))
    return out


def _progress(loader: DataLoader, name: str, passes: int):
    """A bar on a terminal (the feature pass is the longest step of a default run), nothing in a log file."""
    if not sys.stderr.isatty():
        return loader
    from tqdm import tqdm

    return tqdm(loader, desc=f"features: {name} x{passes}", unit="batch", leave=False, dynamic_ncols=True)


def cached_features(backbone: nn.Module, pre: Preprocessing, loaders: dict[str, DataLoader], *, views: int,
                    aug: AugmentConfig, seed: int = 0, cache_file: Path | None = None,
                    prefer_onnx: bool = True, gpu: bool = False,
                    store: "FeatureStore | None" = None) -> dict[str, tuple[torch.Tensor, ...]]:
    """Features for ``loaders`` (uint8 batches of ``ImageDataset``); the ``train`` loader also gets ``views``
    augmented views.

    ``gpu``: run on the GPU (if there is one). With ``cache_file`` the result is saved, and reused when present (so
    ``--resume`` skips the pass). ``store``: clean features already computed for these files (``check --labels``)
    are taken from it, and new ones added to it.
    """
    if cache_file is not None and cache_file.is_file():
        log.info("features: reusing %s", cache_file)
        return torch.load(cache_file, weights_only=True)
    engine = None
    out: dict[str, tuple[torch.Tensor, ...]] = {}
    for name, loader in loaders.items():
        n_views = views if name == "train" else 0
        paths = loader.dataset.paths
        known = store.lookup(paths)[0] if store is not None else None
        if known is not None and not n_views:  # nothing to decode
            log.info("features: %s, %d images from the feature store %s", name, len(paths), store.path)
            out[name] = (known, torch.tensor(loader.dataset.targets))
            continue
        engine = engine or Engine(backbone, pre.image_size, prefer_onnx, gpu)
        out.update(extract(engine, loader, pre, name, n_views, aug, seed, known))
        if store is not None and known is None:
            store.add(paths, out[name][0])
    if engine is not None:
        STAGES.add("features: backbone", engine.seconds)
    if cache_file is not None:  # atomic: several DDP ranks may write the same (identical) file
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        torch.save(out, tmp)
        tmp.replace(cache_file)
    return out


class FeatureStore:
    """Clean-view backbone features per image file, cached under ``~/.cache/fruitlens/features`` (never beside the
    user's images), so that ``check --labels`` and a following ``train`` compute them once.

    One file per (model, weights, input size, preprocessing); an entry is keyed by the image's absolute path, size
    and modification time, so a changed file is computed again, and a manifest of the same files finds them too.
    """

    def __init__(self, model: str, weights: str, pre: Preprocessing, cache: Path | None = None) -> None:
        import hashlib
        import json

        from fruitlens.data.download import cache_root

        tag = hashlib.sha1(f"{model}|{weights}|{json.dumps(pre.to_dict())}".encode()).hexdigest()[:12]
        self.path = (cache or cache_root() / "features") / f"{model}-{pre.image_size}px-{tag}.pt"
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

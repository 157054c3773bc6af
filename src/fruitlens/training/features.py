"""The CPU fast path: run the frozen backbone once per image (and per augmented view) and cache the features.

The head then trains on the cached tensors in seconds per epoch. The backbone pass itself runs through ONNX Runtime
when it is installed (about 3-4x faster than PyTorch eager on a CPU), else through PyTorch with channels_last.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


class _Engine:
    """Runs a frozen backbone on batches: ONNX Runtime where possible, else PyTorch."""

    def __init__(self, backbone: nn.Module, image_size: int, prefer_onnx: bool = True) -> None:
        self.backbone = backbone.eval()
        self.session = None
        if prefer_onnx and not torch.cuda.is_available():
            try:
                self.session = _onnx_session(backbone, image_size)
            except Exception as exc:  # any exporter/runtime problem: PyTorch still works
                log.info("feature pass falls back to PyTorch (%s)", exc)
        self.name = "onnxruntime" if self.session is not None else "pytorch"
        if self.session is None:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.session is not None:
            out = self.session.run(None, {"input": x.numpy()})[0]
            return torch.from_numpy(out)
        return self.backbone(x.contiguous(memory_format=torch.channels_last)).float()


def _onnx_session(backbone: nn.Module, image_size: int):
    import onnxruntime as ort

    from fruitlens.inference.export import export_onnx_module

    path = Path(tempfile.mkdtemp(prefix="fruitlens-feat-")) / "backbone.onnx"
    export_onnx_module(backbone, path, image_size)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, os.cpu_count() or 1)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def extract(engine: _Engine, loader: DataLoader, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and targets for every batch of ``loader``."""
    feats, targets = [], []
    t0, n = time.perf_counter(), 0
    for x, y in loader:
        feats.append(engine(x))
        targets.append(torch.as_tensor(y))
        n += len(y)
    dt = time.perf_counter() - t0
    log.info("features: %s, %d images in %.1fs (%.0f img/s, %s)", what, n, dt, n / max(dt, 1e-9), engine.name)
    return torch.cat(feats), torch.cat(targets)


def cached_features(backbone: nn.Module, image_size: int, loaders: dict[str, tuple[DataLoader, int]],
                    cache_file: Path | None = None, prefer_onnx: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (features, targets)}`` for ``loaders = {name: (loader, repeats)}``; repeats > 1 = augmented views.

    With ``cache_file`` the result is saved, and reused when present (so ``--resume`` skips the pass).
    """
    if cache_file is not None and cache_file.is_file():
        log.info("features: reusing %s", cache_file)
        return torch.load(cache_file, weights_only=True)
    engine = _Engine(backbone, image_size, prefer_onnx)
    out = {}
    for name, (loader, repeats) in loaders.items():
        parts = [extract(engine, loader, f"{name} view {r + 1}/{repeats}" if repeats > 1 else name) for r in range(repeats)]
        out[name] = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        torch.save(out, cache_file)
    return out


def feature_dtype_ok(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and bool(np.isfinite(t.numpy()).all())

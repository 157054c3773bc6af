"""``Engine``: a frozen backbone run on batches of images: on the GPU if asked and present, else through ONNX Runtime
(several times faster than PyTorch eager on a CPU), else PyTorch channels_last."""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from fruitlens.inference import onnx as onnx_io

log = logging.getLogger(__name__)


class Engine:
    """Runs a frozen backbone on batches: on the GPU if asked and present, else ONNX Runtime if it works, else PyTorch.

    ``device`` is where the input batches should be (augmentation runs there too).
    """

    def __init__(
        self,
        backbone: nn.Module,
        image_size: int,
        prefer_onnx: bool = True,
        gpu: bool = False,
        threads: int = 0,
        device: torch.device | None = None,
    ) -> None:
        """``device``: the GPU to run on (Lightning's, for its process); else with ``gpu`` this process's own."""
        self.device = torch.device("cpu")
        if device is not None and device.type == "cuda":
            self.device = device
        elif gpu and torch.cuda.is_available():  # under DDP each process takes its own GPU
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

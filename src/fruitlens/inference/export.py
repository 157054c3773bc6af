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


def export_run(run_path: str | Path, *, int8: bool = False, opset: int = 17, check_images: int = 512,
               min_agreement: float = 0.995, bench: bool = True) -> dict:
    """Exports the run's best model to ``export/model.onnx`` (+ ``model.int8.onnx``), checks parity, benchmarks.

    Returns the figures (also written to ``export/export.json``). Raises ExportError when top-1 agreement with
    PyTorch on validation images is below ``min_agreement`` (fp32) or 0.99 (int8).
    """
    import json

    import onnx

    from fruitlens.data.manifest import Manifest
    from fruitlens.rundir import RunDir, load_model

    run = RunDir(Path(run_path)).require("checkpoints/best.ckpt", "manifest.csv")
    model, classes, _ = load_model(run.best_ckpt)
    pre = model.preprocessing
    out_dir = run.export
    path = export_onnx_module(model, out_dir / "model.onnx", pre.image_size, opset)
    proto = onnx.load(str(path))
    meta = {"fruitlens_classes": json.dumps(classes), "fruitlens_preprocessing": json.dumps(pre.to_dict()),
            "fruitlens_model": model.name}
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    (out_dir / "labels.txt").write_text("\n".join(classes) + "\n")
    manifest = Manifest.from_csv(run.manifest)
    val = manifest.split("val") if len(manifest.split("val")) else manifest.split("train")
    # at most ~256 MB of preprocessed images (512 at 96 px, about 100 at 448 px)
    check_images = int(min(check_images, max(32, 256 * 2**20 // (3 * 4 * pre.image_size ** 2))))
    batch = _preprocessed(val, pre, check_images)
    figures = {"onnx": str(path), "opset": opset, "classes": len(classes), "image_size": pre.image_size,
               "parity": {"fp32": _parity(model, path, batch)}}
    if figures["parity"]["fp32"]["top1_agreement"] < min_agreement:
        raise ExportError(f"ONNX export disagrees with PyTorch: top-1 agreement "
                          f"{figures['parity']['fp32']['top1_agreement']:.2%} < {min_agreement:.1%}",
                          "try another --opset, and report the model and versions")
    if int8:
        train = manifest.split("train")
        qpath = quantize_int8(path, _preprocessed(train, pre, 256), out_dir / "model.int8.onnx")
        figures["int8"] = str(qpath)
        figures["parity"]["int8"] = _parity(model, qpath, batch)
        if figures["parity"]["int8"]["top1_agreement"] < 0.99:
            log.warning("int8 model agrees with PyTorch on only %.2f%% of top-1 answers; keep using the fp32 model",
                        100 * figures["parity"]["int8"]["top1_agreement"])
    if bench:
        figures["speed"] = benchmark(model, [path] + ([out_dir / "model.int8.onnx"] if int8 else []), pre.image_size)
    (out_dir / "export.json").write_text(json.dumps(figures, indent=2))
    return figures


def _preprocessed(manifest, pre, limit: int):
    import numpy as np

    from fruitlens.data.images import load_image
    from fruitlens.data.transforms import eval_transforms

    tf = eval_transforms(pre)
    records = list(manifest)[:: max(1, len(manifest) // limit)][:limit]
    if not records:
        raise ExportError("no images in the run's manifest to check the export with")
    arrays = []
    for r in records:
        try:
            arrays.append(tf(load_image(manifest.resolve(r), int(pre.resize_size * 1.25))).numpy())
        except Exception as exc:  # a file that vanished since training: check on the rest
            log.warning("parity check skips %s (%s)", r.path, exc)
    return np.stack(arrays)


def _session(path: Path):
    import os

    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, os.cpu_count() or 1)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave the cores to the decoders
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _parity(model: nn.Module, path: Path, batch) -> dict:
    import numpy as np

    step = max(4, min(64, int(64 * (96 / batch.shape[-1]) ** 2)))  # small chunks for large inputs
    with torch.inference_mode():
        ref = torch.cat([model(torch.from_numpy(batch[i:i + step])) for i in range(0, len(batch), step)]).numpy()
    sess = _session(path)
    got = np.concatenate([sess.run(None, {"input": batch[i:i + step]})[0] for i in range(0, len(batch), step)])
    return {"images": int(len(batch)), "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(ref - got).max())}


def quantize_int8(path: Path, calibration, out: Path) -> Path:
    """Static int8 quantisation (QDQ, per-channel) with ONNX Runtime, calibrated on training images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": calibration[i:i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self):
            return next(self.it, None)

    prep = out.with_name("model.prep.onnx")
    try:
        quant_pre_process(str(path), str(prep))
    except Exception as exc:  # pre-processing is an optimisation; quantise the plain model without it
        log.info("int8 pre-processing skipped (%s)", exc)
        prep = path
    quantize_static(str(prep), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    if prep != path:
        prep.unlink(missing_ok=True)
    import onnx

    src, dst = onnx.load(str(path)), onnx.load(str(out))
    for p in src.metadata_props:
        e = dst.metadata_props.add()
        e.key, e.value = p.key, p.value
    onnx.save(dst, str(out))
    return out


def benchmark(model: nn.Module, onnx_paths: list[Path], image_size: int, seconds: float = 3.0) -> dict:
    """Images/s at batch 32 and median latency at batch 1: PyTorch eager vs each ONNX model, on this CPU."""
    import statistics
    import time

    import numpy as np

    def measure(fn, batch):
        fn(batch)
        times, t_end = [], time.perf_counter() + seconds / 2
        while time.perf_counter() < t_end or len(times) < 3:
            t = time.perf_counter()
            fn(batch)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    b32 = np.random.default_rng(0).standard_normal((32, 3, image_size, image_size)).astype(np.float32)
    b1 = b32[:1]
    out = {}

    @torch.inference_mode()
    def torch_fn(x):
        return model(torch.from_numpy(x))

    out["pytorch"] = {"batch32_img_per_s": round(32 / measure(torch_fn, b32), 1),
                      "batch1_ms": round(1000 * measure(torch_fn, b1), 2)}
    for p in onnx_paths:
        sess = _session(p)
        fn = lambda x: sess.run(None, {"input": x})
        out[p.name] = {"batch32_img_per_s": round(32 / measure(fn, b32), 1), "batch1_ms": round(1000 * measure(fn, b1), 2)}
    return out

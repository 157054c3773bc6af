"""``export``: the run's best checkpoint -> ``export/model.onnx`` (+ int8), proven by a parity check first.

The model is written to a temporary file and moved into place only after its top-1 answers agree with PyTorch on
the run's validation images, preprocessed by the predictor's own path (decode, geometry, normalisation). A failed
export leaves no ``model.onnx`` that predict, evaluate or serve would pick.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fruitlens.data.manifest import Manifest
from fruitlens.errors import ExportError, ImageError
from fruitlens.filehash import sha256_file
from fruitlens.inference import onnx as onnx_io
from fruitlens.inference.onnx import Parity
from fruitlens.jsonio import read_json, write_json
from fruitlens.models.checkpoint import load_model
from fruitlens.models.preprocessing import Preprocessing
from fruitlens.models.serving import OUTPUTS, ServingModel
from fruitlens.rundir import RunDir

log = logging.getLogger(__name__)

MIN_AGREEMENT_FP32 = 0.995
MIN_AGREEMENT_INT8 = 0.99
MAX_OOD_DIFF_FP32 = 0.01  # robust z-units (models/ood.py); float32 differences are about 1e-5


@dataclass
class ExportResult:
    """Where the exported models are and what proves them (``export/export.json``)."""

    onnx: str = ""
    opset: int = 17
    classes: int = 0
    image_size: int = 0
    checkpoint_sha256: str = ""
    parity: dict[str, Parity] = field(default_factory=dict)  # fp32 / int8
    int8: str | None = None
    speed: dict[str, dict[str, float]] = field(default_factory=dict)  # engine -> img/s at batch 32, ms at batch 1


def export(
    run: RunDir | str | Path, *, int8: bool = False, opset: int = 17, check_images: int = 512, bench: bool = True
) -> ExportResult:
    """Exports, checks parity (ExportError below 99.5% top-1 agreement, nothing written), optionally quantises to
    int8 (kept with a warning below 99%), measures speed; writes ``export/export.json``."""
    run = run if isinstance(run, RunDir) else RunDir(Path(run))
    run.require("checkpoints/best.ckpt", "manifest.csv")
    ckpt = load_model(run.best_ckpt)
    model, pre = ckpt.model, ckpt.model.preprocessing
    manifest = Manifest.from_csv(run.manifest)
    held_out = manifest.split("val") if len(manifest.split("val")) else manifest.split("train")
    # at most ~256 MB of preprocessed images (512 at 96 px, about 100 at 448 px)
    check_images = int(min(check_images, max(32, 256 * 2**20 // (3 * 4 * pre.image_size**2))))
    batch = model_inputs(held_out, pre, check_images)
    result = ExportResult(str(run.onnx), opset, len(ckpt.classes), pre.image_size, sha256_file(run.best_ckpt))
    earlier = _current_export(run, result)
    if earlier is not None:  # made from this checkpoint with this opset, and its parity held: not made again
        log.info(
            "%s is the export of this checkpoint (top-1 agreement %.2f%%): kept",
            run.onnx,
            100 * earlier.parity["fp32"].top1_agreement,
        )
        result.parity["fp32"] = earlier.parity["fp32"]
    else:
        meta = {
            "fruitlens_classes": ckpt.classes,
            "fruitlens_preprocessing": pre.to_dict(),
            "fruitlens_model": model.name,
            "fruitlens_checkpoint_sha256": result.checkpoint_sha256,
            "fruitlens_trust": ckpt.extra.get("trust") or {},
        }
        result.parity["fp32"] = _export_checked(model, run.onnx, pre.image_size, opset, meta, batch)
    (run.export / "labels.txt").write_text("\n".join(ckpt.classes) + "\n")
    qpath = run.export / "model.int8.onnx"
    if (
        not int8
        and qpath.is_file()
        and onnx_io.file_metadata(qpath).get("fruitlens_checkpoint_sha256") != result.checkpoint_sha256
    ):
        qpath.unlink()  # an int8 model of an earlier checkpoint (a resumed run) would answer for the old model
        log.info("removed %s: made from an earlier checkpoint (export --int8 makes a new one)", qpath)
    if int8:
        tmp = qpath.with_name("model.int8.partial.onnx")
        onnx_io.quantize_int8(run.onnx, model_inputs(manifest.split("train"), pre, 256), tmp)
        # against the fp32 model, whose parity with PyTorch holds on this batch: the same answer, seconds sooner
        result.parity["int8"] = onnx_io.parity(model, tmp, batch, reference=run.onnx)
        tmp.replace(qpath)
        result.int8 = str(qpath)
        if result.parity["int8"].top1_agreement < MIN_AGREEMENT_INT8:
            log.warning(
                "int8 model agrees with PyTorch on only %.2f%% of top-1 answers; keep using the fp32 model",
                100 * result.parity["int8"].top1_agreement,
            )
    if bench:
        result.speed = onnx_io.benchmark(
            model, [run.onnx] + ([Path(result.int8)] if result.int8 else []), pre.image_size
        )
    write_json(run.export / "export.json", result)
    return result


def _current_export(run: RunDir, wanted: ExportResult) -> ExportResult | None:
    """The export that ``export/export.json`` describes, when it is of this checkpoint and opset and its file is
    there; else None."""
    path = run.export / "export.json"
    if not (path.is_file() and run.onnx.is_file()):
        return None
    try:
        earlier = read_json(path, ExportResult)
    except (ValueError, TypeError, KeyError):
        return None
    same = (
        earlier.checkpoint_sha256 == wanted.checkpoint_sha256
        and earlier.opset == wanted.opset
        and "fp32" in earlier.parity
        and onnx_io.file_metadata(run.onnx).get("fruitlens_checkpoint_sha256") == wanted.checkpoint_sha256
    )
    return earlier if same else None


def _export_checked(
    model: torch.nn.Module, dest: Path, image_size: int, opset: int, meta: dict, batch: np.ndarray
) -> Parity:
    """Exports to a temporary file beside ``dest``; moves it into place only when parity holds."""
    tmp = dest.with_name(dest.stem + ".partial.onnx")
    try:
        onnx_io.export_module(ServingModel(model), tmp, image_size, output_names=OUTPUTS, opset=opset)
        onnx_io.write_metadata(tmp, meta)
        figures = onnx_io.parity(model, tmp, batch)
        if figures.top1_agreement < MIN_AGREEMENT_FP32:
            raise ExportError(
                f"ONNX export disagrees with PyTorch: top-1 agreement {figures.top1_agreement:.2%} "
                f"< {MIN_AGREEMENT_FP32:.1%} on {figures.images} images; no model.onnx was written",
                "try another --opset, and report the model and versions",
            )
        if (figures.max_abs_ood_diff or 0.0) > MAX_OOD_DIFF_FP32:  # serve decides "unfamiliar" on it
            raise ExportError(
                f"ONNX export's ood_score differs from PyTorch's by up to "
                f"{figures.max_abs_ood_diff:.3g} (> {MAX_OOD_DIFF_FP32}) on {figures.images} "
                "images; no model.onnx was written",
                "try another --opset, and report the model and versions",
            )
        tmp.replace(dest)
        return figures
    finally:
        tmp.unlink(missing_ok=True)


def model_inputs(manifest: Manifest, pre: Preprocessing, limit: int) -> np.ndarray:
    """Normalised model input of up to ``limit`` images spread over ``manifest``, by the predictor's own path."""
    records = list(manifest)[:: max(1, len(manifest) // max(1, limit))][:limit]
    arrays = []
    for r in records:
        try:
            arrays.append(pre.pixels(manifest.resolve(r)))
        except ImageError as exc:  # a file that vanished since training: check on the rest
            log.warning("parity check skips %s (%s)", r.path, exc.message)
    if not arrays:
        raise ExportError(
            "no images in the run's manifest to check the export with",
            "the run's training images must still be where manifest.csv says",
        )
    return pre.inputs(np.stack(arrays))

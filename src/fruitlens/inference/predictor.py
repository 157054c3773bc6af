"""``Predictor``: one object for predict, evaluate and serve; PyTorch or ONNX Runtime behind it.

The preprocessing is read from the run (or the ONNX metadata), so serving matches training exactly.
"""
from __future__ import annotations

import json
import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from fruitlens.data.images import load_image, resize_crop, shrink, to_rgb
from fruitlens.errors import DataError, RunDirError
from fruitlens.models.preprocessing import Preprocessing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """Top-1 label and probability, plus the top-k list of (label, probability). Also the API's answer."""

    label: str
    score: float
    top_k: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"label": self.label, "score": round(self.score, 6),
                "top_k": [{"label": lab, "score": round(s, 6)} for lab, s in self.top_k]}


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class Predictor:
    """Turns images (paths, PIL images or HxWx3 uint8 arrays) into Predictions."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], classes: list[str], preprocessing: Preprocessing,
                 engine: str, source: str = "") -> None:
        self._forward = forward
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.engine = engine
        self.source = source
        # eval_transforms' geometry runs on PIL images (resize_crop); scaling and normalisation once per batch in numpy
        scale, shift = preprocessing.scale_shift()
        self._scale, self._shift = scale.reshape(1, 3, 1, 1), shift.reshape(1, 3, 1, 1)

    @classmethod
    def from_run(cls, path: str | Path, engine: str = "auto", threads: int = 0) -> "Predictor":
        """From a run folder: ``engine='torch'`` its best checkpoint, ``'onnx'`` its exported model, ``'auto'`` the
        export when it is at least as new as the checkpoint (it was parity-checked; several times faster on a CPU).
        ``threads``: inference threads (0: all cores)."""
        from fruitlens.rundir import RunDir, load_model

        run = RunDir(Path(path)).require("checkpoints/best.ckpt")
        onnx_path = run.export / "model.onnx"
        if engine == "onnx" or (engine == "auto" and onnx_path.is_file()
                                and onnx_path.stat().st_mtime >= run.best_ckpt.stat().st_mtime):
            return cls.from_onnx(onnx_path, threads=threads)
        if threads:
            torch.set_num_threads(threads)
        model, classes, _ = load_model(run.best_ckpt)
        model = model.to(memory_format=torch.channels_last)

        @torch.inference_mode()
        def forward(x: np.ndarray) -> np.ndarray:
            t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            return model(t).float().numpy()

        return cls(forward, classes, model.preprocessing, "pytorch", str(run.path))

    @classmethod
    def from_onnx(cls, path: str | Path, threads: int = 0) -> "Predictor":
        """From an exported ``model.onnx``; classes and preprocessing come from its metadata."""
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise RunDirError(f"{path}: ONNX model not found",
                              f"export it with: fruitlens export {path.parent.parent} --format onnx")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # leave the cores to the decoders
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        meta = session.get_modelmeta().custom_metadata_map
        try:
            classes = json.loads(meta["fruitlens_classes"])
            pre = Preprocessing.from_dict(json.loads(meta["fruitlens_preprocessing"]))
        except KeyError:
            raise RunDirError(f"{path}: ONNX model lacks fruitlens metadata (classes, preprocessing)",
                              "export it with 'fruitlens export RUN --format onnx'") from None
        name = session.get_inputs()[0].name
        return cls(lambda x: session.run(None, {name: x})[0], classes, pre, "onnxruntime", str(path))

    def pixels(self, image) -> np.ndarray:
        """One image (path, PIL image or HxWx3 uint8 array) -> resized and cropped HxWx3 uint8 array."""
        min_side = int(self.preprocessing.resize_size * 1.25)  # as the training loader does
        if isinstance(image, (str, Path)):
            img = load_image(image, min_side)
        elif isinstance(image, Image.Image):
            img = shrink(to_rgb(image), min_side)
        elif isinstance(image, np.ndarray):
            if image.ndim == 2:
                image = np.stack([image] * 3, axis=-1)
            if image.ndim != 3 or image.shape[2] not in (3, 4):
                raise DataError(f"expected an HxWx3 image array but received shape {image.shape}")
            img = shrink(to_rgb(Image.fromarray(image.astype(np.uint8))), min_side)
        else:
            raise DataError(f"expected a path, PIL image or array but received {type(image).__name__}")
        pre = self.preprocessing
        return np.asarray(resize_crop(img, pre.resize_size, pre.image_size), dtype=np.uint8)

    def inputs(self, pixels: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) uint8 -> the model's normalised (n, 3, H, W) float32 input."""
        n, h, w, _ = pixels.shape
        x = np.empty((n, 3, h, w), dtype=np.float32)  # one pass, no temporaries: 8x faster than astype + ops
        np.multiply(pixels.transpose(0, 3, 1, 2), self._scale, out=x)
        x -= self._shift
        return x

    def logits_batch(self, pixels: np.ndarray) -> np.ndarray:
        """Raw scores (n, classes) for a stack of ``pixels()`` results."""
        return self._forward(self.inputs(pixels))

    def logits_many(self, images: Iterable, batch_size: int = 32, workers: int = 2) -> Iterator[list[tuple]]:
        """Batches of ``(image, logits row | DataError)`` in input order; a file that does not decode gets its
        DataError and the rest go on. The next batch is decoded by ``workers`` threads while the current one runs
        through the model (Pillow and ONNX Runtime release the GIL), so decoding hides behind inference."""
        def prep(image):
            try:
                return self.pixels(image)
            except DataError as exc:
                return exc

        source = iter(images)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            ahead: deque = deque()

            def fill() -> None:
                for image in source:
                    ahead.append((image, pool.submit(prep, image)))
                    if len(ahead) >= 2 * batch_size:
                        break

            fill()
            while ahead:
                batch = [ahead.popleft() for _ in range(min(batch_size, len(ahead)))]
                fill()  # the next batch starts decoding now
                items = [(image, future.result()) for image, future in batch]
                ok = [t for _, t in items if not isinstance(t, DataError)]
                rows = iter(self.logits_batch(np.stack(ok))) if ok else iter(())
                yield [(image, t if isinstance(t, DataError) else next(rows)) for image, t in items]

    def logits(self, images: Sequence, batch_size: int = 32) -> np.ndarray:
        """Raw scores, (n, classes); all images must decode (see ``predict_many`` for per-image errors)."""
        rows = []
        for batch in self.logits_many(images, batch_size):
            for _, row in batch:
                if isinstance(row, DataError):
                    raise row
                rows.append(row)
        return np.stack(rows) if rows else np.zeros((0, len(self.classes)), dtype=np.float32)

    def to_predictions(self, probs: np.ndarray, top_k: int = 3) -> list[Prediction]:
        k = max(1, min(top_k, len(self.classes)))
        order = np.argsort(-probs, axis=1)[:, :k]
        return [Prediction(self.classes[o[0]], float(p[o[0]]), [(self.classes[j], float(p[j])) for j in o])
                for p, o in zip(probs, order)]

    def predict(self, images: Sequence, top_k: int = 3, batch_size: int = 32) -> list[Prediction]:
        """Predictions for images that all decode; raises DataError naming a bad file."""
        return self.to_predictions(softmax(self.logits(list(images), batch_size)), top_k)

    def predict_many(self, images: Iterable, top_k: int = 3, batch_size: int = 32):
        """Yields ``(image, Prediction | DataError)`` so that one bad file does not stop the rest."""
        for batch in self.logits_many(images, batch_size):
            ok = [row for _, row in batch if not isinstance(row, DataError)]
            preds = iter(self.to_predictions(softmax(np.stack(ok)), top_k)) if ok else iter(())
            for image, row in batch:
                yield image, row if isinstance(row, DataError) else next(preds)

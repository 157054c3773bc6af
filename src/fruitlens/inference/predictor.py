"""``Predictor``: one object for predict, evaluate and serve; PyTorch or ONNX Runtime behind it.

The preprocessing is read from the run (or the ONNX metadata) and applied by ``Preprocessing.pixels`` and
``Preprocessing.normalise``, the functions training used, so serving matches training exactly.
"""
from __future__ import annotations

import json
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from fruitlens.errors import ImageError, RunDirError
from fruitlens.filehash import sha256_file
from fruitlens.inference import onnx as onnx_io
from fruitlens.models.preprocessing import DEFAULT_MAX_PIXELS, ImageSource, Preprocessing

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
    """Turns images (paths, bytes, PIL images or HxWx3 uint8 arrays) into Predictions."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], classes: list[str], preprocessing: Preprocessing,
                 engine: str, source: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self._forward = forward
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.engine = engine
        self.source = source
        self.max_pixels = max_pixels

    @classmethod
    def load(cls, path: str | Path, engine: str = "auto", threads: int = 0) -> "Predictor":
        """From a run folder or an exported ``model.onnx``. For a run folder, ``engine='torch'`` takes its checkpoint,
        ``'onnx'`` its export, ``'auto'`` the export when it was made from the current checkpoint (it passed the
        parity check and is several times faster on a CPU). ``threads``: inference threads (0: all cores)."""
        path = Path(path)
        if path.suffix.lower() == ".onnx":
            return cls.from_onnx(path, threads=threads)
        return cls.from_run(path, engine=engine, threads=threads)

    @classmethod
    def from_run(cls, path: str | Path, engine: str = "auto", threads: int = 0) -> "Predictor":
        from fruitlens.models.checkpoint import load_model
        from fruitlens.rundir import RunDir

        run = RunDir(Path(path)).require("checkpoints/best.ckpt")
        if engine == "onnx" or (engine == "auto" and run.onnx.is_file()):
            predictor = cls.from_onnx(run.onnx, threads=threads)
            if engine == "onnx" or predictor.checkpoint_sha256 == sha256_file(run.best_ckpt):
                return predictor
            log.info("%s was exported from another checkpoint: predicting with PyTorch (re-export with "
                     "'fruitlens export %s')", run.onnx, run.path)
        if threads:
            torch.set_num_threads(threads)
        ckpt = load_model(run.best_ckpt)
        model = ckpt.model.to(memory_format=torch.channels_last)

        @torch.inference_mode()
        def forward(x: np.ndarray) -> np.ndarray:
            return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last)).float().numpy()

        return cls(forward, ckpt.classes, model.preprocessing, "pytorch", str(run.path))

    @classmethod
    def from_onnx(cls, path: str | Path, threads: int = 0) -> "Predictor":
        """From an exported ``model.onnx``; classes and preprocessing come from its metadata."""
        path = Path(path)
        if not path.is_file():
            raise RunDirError(f"{path}: ONNX model not found",
                              f"export it with: fruitlens export {path.parent.parent} --format onnx")
        try:
            sess = onnx_io.session(path, threads)
        except Exception as exc:
            raise RunDirError(f"{path}: not a usable ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
        meta = onnx_io.read_metadata(sess)
        try:
            classes = json.loads(meta["fruitlens_classes"])
            pre = Preprocessing.from_dict(json.loads(meta["fruitlens_preprocessing"]))
        except (KeyError, ValueError):
            raise RunDirError(f"{path}: ONNX model lacks fruitlens metadata (classes, preprocessing)",
                              "export it with 'fruitlens export RUN --format onnx'") from None
        name = sess.get_inputs()[0].name
        predictor = cls(lambda x: sess.run(None, {name: x})[0], classes, pre, "onnxruntime", str(path))
        predictor.checkpoint_sha256 = meta.get("fruitlens_checkpoint_sha256", "")
        return predictor

    checkpoint_sha256 = ""  # for an ONNX model: the checkpoint it was exported from

    def pixels(self, image: ImageSource) -> np.ndarray:
        """One image -> decoded, resized and cropped HxWx3 uint8 array (``Preprocessing.pixels``)."""
        return self.preprocessing.pixels(image, self.max_pixels)

    def inputs(self, pixels: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) uint8 -> the model's normalised (n, 3, H, W) float32 input (``Preprocessing.normalise``)."""
        return self.preprocessing.inputs(pixels)

    def logits_batch(self, pixels: np.ndarray) -> np.ndarray:
        """Raw scores (n, classes) for a stack of ``pixels()`` results."""
        return self._forward(self.inputs(pixels))

    def logits_many(self, images: Iterable, batch_size: int = 32, workers: int = 2) -> Iterator[list[tuple]]:
        """Batches of ``(image, logits row | ImageError)`` in input order; a file that does not decode gets its
        ImageError and the rest go on. The next batch is decoded by ``workers`` threads while the current one runs
        through the model (Pillow and ONNX Runtime release the GIL), so decoding hides behind inference."""
        def prep(image):
            try:
                return self.pixels(image)
            except ImageError as exc:
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
                ok = [t for _, t in items if not isinstance(t, ImageError)]
                rows = iter(self.logits_batch(np.stack(ok))) if ok else iter(())
                yield [(image, t if isinstance(t, ImageError) else next(rows)) for image, t in items]

    def logits(self, images: Sequence, batch_size: int = 32) -> np.ndarray:
        """Raw scores, (n, classes); all images must decode (see ``predict_many`` for per-image errors)."""
        rows = []
        for batch in self.logits_many(images, batch_size):
            for _, row in batch:
                if isinstance(row, ImageError):
                    raise row
                rows.append(row)
        return np.stack(rows) if rows else np.zeros((0, len(self.classes)), dtype=np.float32)

    def to_predictions(self, probs: np.ndarray, top_k: int = 3) -> list[Prediction]:
        k = max(1, min(top_k, len(self.classes)))
        order = np.argsort(-probs, axis=1)[:, :k]
        return [Prediction(self.classes[o[0]], float(p[o[0]]), [(self.classes[j], float(p[j])) for j in o])
                for p, o in zip(probs, order)]

    def predict(self, images: Sequence, top_k: int = 3, batch_size: int = 32) -> list[Prediction]:
        """Predictions for images that all decode; raises ImageError naming a bad file."""
        return self.to_predictions(softmax(self.logits(list(images), batch_size)), top_k)

    def predict_many(self, images: Iterable, top_k: int = 3, batch_size: int = 32):
        """Yields ``(image, Prediction | ImageError)`` so that one bad file does not stop the rest."""
        for batch in self.logits_many(images, batch_size):
            ok = [row for _, row in batch if not isinstance(row, ImageError)]
            preds = iter(self.to_predictions(softmax(np.stack(ok)), top_k)) if ok else iter(())
            for image, row in batch:
                yield image, row if isinstance(row, ImageError) else next(preds)

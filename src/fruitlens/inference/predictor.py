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

from fruitlens.errors import ConfigError, ImageError, RunDirError
from fruitlens.filehash import sha256_file
from fruitlens.inference import onnx as onnx_io
from fruitlens.models.preprocessing import DEFAULT_MAX_PIXELS, ImageSource, Preprocessing
from fruitlens.models.probs import softmax
from fruitlens.models.trust import Trust

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """The model's answer for one image; ``to_dict`` is also the shape of the API's answer.

    ``label`` and ``score`` are the top-1 class and its calibrated probability; ``unknown`` is true when the model
    abstains, with ``reason`` "not sure" (top-1 probability below the run's threshold) or "unfamiliar" (the image is
    unlike the training images: ``ood_score`` above the run's threshold). ``class_map`` is the class activation map
    of ``label`` over the model's input (not serialised).
    """

    label: str
    score: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    unknown: bool = False
    reason: str | None = None
    ood_score: float | None = None
    class_map: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "score": round(self.score, 6),
            "top_k": [{"label": lab, "score": round(s, 6)} for lab, s in self.top_k],
            "unknown": self.unknown,
            "reason": self.reason,
            "ood_score": None if self.ood_score is None else round(self.ood_score, 6),
        }

    def text(self) -> str:
        """``Kiwi 97%``, or ``not sure: Granny-Smith 41%, Golden 33%, Lime 12%``."""
        top = ", ".join(f"{lab} {100 * s:.0f}%" for lab, s in self.top_k)
        return f"{self.reason}: {top}" if self.unknown else f"{self.label} {100 * self.score:.0f}%"


Outputs = dict  # "logits" (n, classes), and where the model has them "features", "class_maps", "ood_score"


class Predictor:
    """Turns images (paths, bytes, PIL images or HxWx3 uint8 arrays) into Predictions.

    ``unknown_threshold``: the calibrated top-1 probability below which the answer is "not sure" (the run's, chosen
    on held-out predictions for its target accuracy; 0 switches it off, 1 never answers). ``ood_threshold``: the
    ood_score above which the answer is "unfamiliar" (None: off).
    """

    def __init__(
        self,
        forward: Callable[[np.ndarray], Outputs],
        classes: list[str],
        preprocessing: Preprocessing,
        engine: str,
        source: str = "",
        trust: Trust | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self._forward = forward
        self.classes = list(classes)
        self.preprocessing = preprocessing
        self.engine = engine
        self.source = source
        self.trust = trust
        self.unknown_threshold = float(trust.unknown_threshold) if trust is not None else 0.0
        self.ood_threshold = trust.ood_threshold if trust is not None else None
        self.max_pixels = max_pixels

    @classmethod
    def load(cls, path: str | Path, engine: str = "auto", threads: int = 0) -> "Predictor":
        """From a run folder or an exported ``model.onnx``. For a run folder, ``engine='torch'`` takes its checkpoint,
        ``'onnx'`` its export, ``'auto'`` the export when it was made from the current checkpoint (it passed the
        parity check and is several times faster on a CPU). ``threads``: inference threads (0: all cores)."""
        path = Path(path)
        if path.suffix.lower() == ".onnx":
            return cls.from_onnx(path, threads=threads)
        if path.is_file():  # an image or a checkpoint where the model goes: say what is expected instead
            raise RunDirError(
                f"{path}: expected a run folder or an exported .onnx model but received a file",
                "pass the folder 'fruitlens train --out' made (or its export/model.onnx); the images "
                "to classify come after it",
            )
        return cls.from_run(path, engine=engine, threads=threads)

    @classmethod
    def from_run(cls, path: str | Path, engine: str = "auto", threads: int = 0) -> "Predictor":
        from fruitlens.models.checkpoint import load_model
        from fruitlens.models.serving import OUTPUTS, ServingModel
        from fruitlens.rundir import RunDir

        run = RunDir(Path(path)).require("checkpoints/best.ckpt")
        if engine == "onnx" or (engine == "auto" and run.onnx.is_file()):
            predictor = cls.from_onnx(run.onnx, threads=threads)
            if engine == "onnx" or predictor.checkpoint_sha256 == sha256_file(run.best_ckpt):
                return predictor
            log.info(
                "%s was exported from another checkpoint: predicting with PyTorch (re-export with "
                "'fruitlens export %s')",
                run.onnx,
                run.path,
            )
        if threads:
            torch.set_num_threads(threads)
        ckpt = load_model(run.best_ckpt)
        serving = ServingModel(ckpt.model.to(memory_format=torch.channels_last)).eval()

        @torch.inference_mode()
        def forward(x: np.ndarray) -> Outputs:
            out = serving(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))
            return {name: t.float().numpy() for name, t in zip(OUTPUTS, out)}

        return cls(
            forward,
            ckpt.classes,
            ckpt.model.preprocessing,
            "pytorch",
            str(run.path),
            Trust.from_saved(ckpt.extra.get("trust")),
        )

    @classmethod
    def from_onnx(cls, path: str | Path, threads: int = 0) -> "Predictor":
        """From an exported ``model.onnx``; classes, preprocessing and the trust layer come from its metadata."""
        path = Path(path)
        if not path.is_file():
            raise RunDirError(
                f"{path}: ONNX model not found", f"export it with: fruitlens export {path.parent.parent} --format onnx"
            )
        try:
            sess = onnx_io.session(path, threads)
        except Exception as exc:
            raise RunDirError(f"{path}: not a usable ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
        meta = onnx_io.read_metadata(sess)
        try:
            classes = json.loads(meta["fruitlens_classes"])
            pre = Preprocessing.from_dict(json.loads(meta["fruitlens_preprocessing"]))
            trust = Trust.from_saved(json.loads(meta.get("fruitlens_trust") or "{}"))
        except (KeyError, ValueError):
            raise RunDirError(
                f"{path}: ONNX model lacks fruitlens metadata (classes, preprocessing)",
                "export it with 'fruitlens export RUN --format onnx'",
            ) from None
        name = sess.get_inputs()[0].name
        names = onnx_io.output_names(sess)
        names = ["logits"] + names[1:] if names[0] == "output" else names  # exports before the trust layer

        def forward(x: np.ndarray) -> Outputs:
            return dict(zip(names, sess.run(None, {name: x})))

        predictor = cls(forward, classes, pre, "onnxruntime", str(path), trust)
        predictor.checkpoint_sha256 = meta.get("fruitlens_checkpoint_sha256", "")
        return predictor

    checkpoint_sha256 = ""  # for an ONNX model: the checkpoint it was exported from

    def pixels(self, image: ImageSource) -> np.ndarray:
        """One image -> decoded, resized and cropped HxWx3 uint8 array (``Preprocessing.pixels``)."""
        return self.preprocessing.pixels(image, self.max_pixels)

    def inputs(self, pixels: np.ndarray) -> np.ndarray:
        """(n, H, W, 3) uint8 -> the model's normalised (n, 3, H, W) float32 input (``Preprocessing.inputs``)."""
        return self.preprocessing.inputs(pixels)

    def outputs_batch(self, pixels: np.ndarray) -> Outputs:
        """Every output of the model for a stack of ``pixels()`` results."""
        return self._forward(self.inputs(pixels))

    def logits_batch(self, pixels: np.ndarray) -> np.ndarray:
        """Raw scores (n, classes) for a stack of ``pixels()`` results."""
        return self.outputs_batch(pixels)["logits"]

    def outputs_many(self, images: Iterable, batch_size: int = 32, workers: int = 2) -> Iterator[list[tuple]]:
        """Batches of ``(image, outputs row | ImageError)`` in input order; a file that does not decode gets its
        ImageError and the rest go on. The next batch is decoded by ``workers`` threads while the current one runs
        through the model (Pillow, PyTorch and ONNX Runtime release the GIL), so decoding and normalising hide behind
        inference."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1 but received {batch_size}")

        def prep(image):  # the model's input for one image: the threads take this work off the model's turn
            try:
                return self.inputs(self.pixels(image)[None])[0]
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
                out = self._forward(np.stack(ok)) if ok else {}
                rows = iter([{k: v[i] for k, v in out.items()} for i in range(len(ok))])
                yield [(image, t if isinstance(t, ImageError) else next(rows)) for image, t in items]

    def logits(self, images: Sequence, batch_size: int = 32) -> np.ndarray:
        """Raw scores, (n, classes); all images must decode (see ``predict_many`` for per-image errors)."""
        rows = []
        for batch in self.outputs_many(images, batch_size):
            for _, row in batch:
                if isinstance(row, ImageError):
                    raise row
                rows.append(row["logits"])
        return np.stack(rows) if rows else np.zeros((0, len(self.classes)), dtype=np.float32)

    def decide(self, out: Outputs, top_k: int = 3) -> list[Prediction]:
        """Predictions from a batch of outputs: calibrated top-k, and the run's "not sure" / "unfamiliar" rules."""
        probs = softmax(out["logits"])
        k = max(1, min(top_k, len(self.classes)))
        order = np.argsort(-probs, axis=1)[:, :k]
        ood = out.get("ood_score")
        maps = out.get("class_maps")
        preds = []
        for i, (p, o) in enumerate(zip(probs, order)):
            score = float(p[o[0]])
            ood_i = None if ood is None or self.ood_threshold is None else float(ood[i])
            reason = (
                "unfamiliar"
                if ood_i is not None and ood_i > self.ood_threshold
                else "not sure"
                if score < self.unknown_threshold or self.unknown_threshold >= 1
                else None
            )
            preds.append(
                Prediction(
                    self.classes[o[0]],
                    score,
                    [(self.classes[j], float(p[j])) for j in o],
                    reason is not None,
                    reason,
                    ood_i,
                    None if maps is None else np.asarray(maps[i][o[0]]),
                )
            )
        return preds

    def predict(self, images: Sequence, top_k: int = 3, batch_size: int = 32) -> list[Prediction]:
        """Predictions for images that all decode; raises ImageError naming a bad file."""
        out = []
        for image, pred in self.predict_many(list(images), top_k, batch_size):
            if isinstance(pred, ImageError):
                raise pred
            out.append(pred)
        return out

    def predict_many(self, images: Iterable, top_k: int = 3, batch_size: int = 32):
        """Yields ``(image, Prediction | ImageError)`` so that one bad file does not stop the rest."""
        for batch in self.outputs_many(images, batch_size):
            ok = [row for _, row in batch if not isinstance(row, ImageError)]
            stacked = {k: np.stack([r[k] for r in ok]) for k in ok[0]} if ok else {}
            preds = iter(self.decide(stacked, top_k)) if ok else iter(())
            for image, row in batch:
                yield image, row if isinstance(row, ImageError) else next(preds)

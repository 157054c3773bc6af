"""FastAPI app factory: the model is loaded once in the lifespan; decoding and inference run off the event loop.

Routes: ``GET /`` upload page, ``POST /predict``, ``GET /labels``, ``GET /health``, ``/docs`` (OpenAPI).
Nothing from a request is written to disk: bodies are read into memory up to the upload limit.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import os
import warnings
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel

from fruitlens import __version__
from fruitlens.data.images import to_rgb
from fruitlens.inference.predictor import Predictor, softmax
from fruitlens.serve.batcher import Batcher
from fruitlens.serve.multipart import parse_multipart

log = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000  # decompression-bomb guard: about a 6,300 x 6,300 image


class TopK(BaseModel):
    label: str
    score: float


class PredictionOut(BaseModel):
    label: str
    score: float
    top_k: list[TopK]
    filename: str | None = None


class PredictionsOut(BaseModel):
    predictions: list[PredictionOut]


class Base64In(BaseModel):
    image: str | None = None
    images: list[str] | None = None
    top_k: int | None = None


def create_app(model: str | Path | None = None, *, predictor: Predictor | None = None, top_k: int = 3,
               max_upload_mb: float = 10.0, max_batch: int = 32, threads: int = 0) -> FastAPI:
    """The service for a run folder or model.onnx (or an already built ``predictor``, e.g. in tests);
    ``threads``: inference threads of this process (0: all cores)."""
    max_bytes = int(max_upload_mb * 2**20)
    default_top_k = top_k

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pred = predictor
        if pred is None:
            from fruitlens.cli.infer_cmds import load_predictor

            pred = await asyncio.to_thread(load_predictor, str(model), "auto", threads)
        app.state.predictor = pred
        app.state.batcher = Batcher(pred.logits_batch, max_batch=max_batch)
        await app.state.batcher.start()
        log.info("model loaded: %s (%s, %d classes)", pred.source, pred.engine, len(pred.classes))
        yield
        await app.state.batcher.stop()

    app = FastAPI(title="fruitlens", version=__version__, lifespan=lifespan,
                  description="Classify fruit photos. POST an image to /predict; the upload page is at /.")

    def get_predictor(request: Request) -> Predictor:
        return request.app.state.predictor

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
            raise HTTPException(413, f"upload of {int(declared) / 2**20:.1f} MB exceeds the limit of {max_upload_mb:g} MB")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_bytes + 64 * 1024:
                raise HTTPException(413, f"upload exceeds the limit of {max_upload_mb:g} MB")
        return bytes(body)

    def decode(data: bytes, name: str, pred: Predictor) -> np.ndarray:
        if len(data) > max_bytes:
            raise HTTPException(413, f"{name}: {len(data) / 2**20:.1f} MB exceeds the limit of {max_upload_mb:g} MB")
        if not data:
            raise HTTPException(422, f"{name}: empty file")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:
                    if img.width * img.height > MAX_PIXELS:
                        raise HTTPException(413, f"{name}: {img.width}x{img.height} pixels exceeds the limit of "
                                                 f"{MAX_PIXELS:,} pixels")
                    img.draft("RGB", (int(pred.preprocessing.resize_size * 1.25),) * 2)  # as load_image
                    img.load()
                    from PIL import ImageOps

                    rgb = to_rgb(ImageOps.exif_transpose(img))
        except UnidentifiedImageError:
            raise HTTPException(415, f"{name}: not an image (expected JPEG, PNG, WebP, BMP, GIF or TIFF)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise HTTPException(413, f"{name}: too many pixels (decompression bomb guard)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise HTTPException(422, f"{name}: cannot decode image ({exc})") from None
        return pred.pixels(rgb)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return resources.files("fruitlens.serve").joinpath("static/index.html").read_text()

    @app.get("/health")
    def health(pred: Predictor = Depends(get_predictor)) -> dict:
        return {"status": "ok", "model_loaded": pred is not None, "version": __version__, "engine": pred.engine,
                "classes": len(pred.classes), "image_size": pred.preprocessing.image_size, "worker_pid": os.getpid()}

    @app.get("/labels")
    def labels(pred: Predictor = Depends(get_predictor)) -> dict:
        return {"labels": pred.classes}

    @app.post("/predict", response_model=PredictionOut | PredictionsOut,
              openapi_extra={"requestBody": {"content": {
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "file": {"type": "string", "format": "binary"},
                      "files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
                  "application/json": {"schema": Base64In.model_json_schema()}}}})
    async def predict(request: Request, top_k: int | None = None, pred: Predictor = Depends(get_predictor)):
        """One image as multipart ``file`` (or several as ``files``), or JSON ``{"image": base64}`` /
        ``{"images": [base64, ...]}``. Answers the top-k labels with probabilities."""
        ctype = request.headers.get("content-type", "")
        body = await read_body(request)
        k = top_k
        if ctype.startswith("multipart/form-data"):
            try:
                parts = parse_multipart(body, ctype)
            except ValueError as exc:
                raise HTTPException(422, f"malformed multipart body ({exc})") from None
            files = [(p.filename or p.name, p.data) for p in parts if p.filename is not None or p.name in ("file", "files")]
            single = len(files) == 1 and all(p.name == "file" for p in parts if p.filename is not None)
        elif ctype.startswith("application/json"):
            try:
                payload = Base64In.model_validate_json(body)
            except Exception as exc:
                raise HTTPException(422, f"expected JSON {{\"image\": base64}} or {{\"images\": [...]}} ({exc})") from None
            k = k or payload.top_k
            items = ([payload.image] if payload.image else []) + (payload.images or [])
            single = payload.image is not None and not payload.images
            files = []
            for i, item in enumerate(items):
                try:
                    files.append((f"image {i}", base64.b64decode(item.split(",", 1)[-1], validate=True)))
                except (binascii.Error, ValueError):
                    raise HTTPException(422, f"image {i}: not valid base64") from None
        else:
            raise HTTPException(415, "send multipart/form-data with a 'file' field, or JSON with base64 'image'")
        if not files:
            raise HTTPException(422, "no image in the request: use the form field 'file' (or 'files')")
        tensors = await asyncio.gather(*[asyncio.to_thread(decode, data, name, pred) for name, data in files])
        logits = await request.app.state.batcher.submit(np.stack(tensors))
        preds = pred.to_predictions(softmax(logits), k or default_top_k)
        out = [{**p.to_dict(), "filename": name} for p, (name, _) in zip(preds, files)]
        return out[0] if single else {"predictions": out}

    app.state.get_predictor = get_predictor
    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory`` with several workers: the settings come from FRUITLENS_* variables."""
    return create_app(os.environ["FRUITLENS_MODEL"], top_k=int(os.environ.get("FRUITLENS_TOP_K", 3)),
                      max_upload_mb=float(os.environ.get("FRUITLENS_MAX_UPLOAD_MB", 10)),
                      threads=int(os.environ.get("FRUITLENS_THREADS", 0)))

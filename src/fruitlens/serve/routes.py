"""The service's routes: ``GET /`` upload page, ``POST /predict``, ``GET /labels``, ``GET /health``."""

from __future__ import annotations

import asyncio
import os
import threading
from importlib import resources

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel

from fruitlens import __version__
from fruitlens.errors import ImageError
from fruitlens.inference.explain import explain as explain_image
from fruitlens.inference.explain import png_data_url
from fruitlens.inference.predictor import Predictor
from fruitlens.serve.batcher import Batcher
from fruitlens.serve.deps import get_batcher, get_predictor, get_settings
from fruitlens.serve.settings import ServeSettings
from fruitlens.serve.uploads import Base64In, Upload, read_uploads

router = APIRouter()

# ImageError.reason -> HTTP status: what cannot be an image is 415, what is too big 413, what fails to decode 422
_STATUS = {"not-an-image": 415, "too-many-pixels": 413}
# images decoded at once in this worker: a 100 KB PNG can decode to --max-pixels (120 MB at 40 MP), and a request of
# 64 of them on every thread of the default executor would take gigabytes
DECODE_SLOTS = threading.BoundedSemaphore(max(2, min(8, os.cpu_count() or 2)))


class TopK(BaseModel):
    label: str
    score: float


class PredictionOut(BaseModel):
    label: str
    score: float
    top_k: list[TopK]
    unknown: bool = False
    reason: str | None = None
    ood_score: float | None = None
    heatmap: str | None = None
    filename: str | None = None


class PredictionsOut(BaseModel):
    predictions: list[PredictionOut]


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
def index() -> str:
    return resources.files("fruitlens.serve").joinpath("static/index.html").read_text()


@router.get("/health")
def health(request: Request, pred: Predictor = Depends(get_predictor)) -> dict:
    return {
        "status": "ok",
        "model_loaded": pred is not None,
        "version": __version__,
        "engine": pred.engine,
        "classes": len(pred.classes),
        "image_size": pred.preprocessing.image_size,
        "worker_pid": os.getpid(),
        "feedback": request.app.state.feedback is not None,
        "label": request.app.state.labelling is not None,
    }


@router.get("/labels")
def labels(pred: Predictor = Depends(get_predictor)) -> dict:
    return {"labels": pred.classes}


_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    },
                }
            },
            "application/json": {"schema": Base64In.model_json_schema()},
        }
    }
}


@router.post("/predict", response_model=PredictionOut | PredictionsOut, openapi_extra=_BODY)
async def predict(
    request: Request,
    top_k: int | None = Query(None, ge=1),
    explain: bool = False,
    pred: Predictor = Depends(get_predictor),
    batcher: Batcher = Depends(get_batcher),
    settings: ServeSettings = Depends(get_settings),
):
    """One image as multipart ``file`` (or several as ``files``), or JSON ``{"image": base64}`` /
    ``{"images": [base64, ...]}``. Answers the top-k labels with calibrated probabilities, whether the model abstains
    (``unknown``, ``reason``: "not sure" or "unfamiliar") and the ``ood_score``; ``explain=true`` adds ``heatmap``,
    a PNG data URL of where the model looked."""
    uploads = await read_uploads(request, settings)
    pixels = await asyncio.gather(*[asyncio.to_thread(_decode, u, pred) for u in uploads.items])
    outputs = await batcher.submit(np.stack(pixels))
    preds = pred.decide(outputs, top_k or uploads.top_k or settings.top_k)
    out = [{**p.to_dict(), "filename": u.name} for p, u in zip(preds, uploads.items)]
    if explain:
        maps = await asyncio.gather(*[asyncio.to_thread(_heatmap, u, p, pred) for u, p in zip(uploads.items, preds)])
        for item, heatmap in zip(out, maps):
            item["heatmap"] = heatmap
    return out[0] if uploads.single else {"predictions": out}


def _heatmap(upload: Upload, prediction, pred: Predictor) -> str | None:
    if prediction.class_map is None:
        return None
    with DECODE_SLOTS:
        return png_data_url(explain_image(upload.data, prediction, pred.preprocessing, pred.max_pixels))


def _decode(upload: Upload, pred: Predictor) -> np.ndarray:
    """The predictor's own decode and geometry; a bad image is the client's error, with its name."""
    try:
        with DECODE_SLOTS:
            return pred.pixels(upload.data)
    except ImageError as exc:
        raise HTTPException(_STATUS.get(exc.reason, 422), exc.message.replace("image bytes", upload.name, 1)) from None

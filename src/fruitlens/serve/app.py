"""FastAPI app factory: the model is loaded once in the lifespan; decoding and inference run off the event loop.

Routes (``routes.py``): ``GET /`` upload page, ``POST /predict``, ``GET /labels``, ``GET /health``, ``/docs``;
(``labelling.py``) ``POST /feedback`` with ``--feedback DIR``, ``GET /label`` and its photos and answers with
``--label PHOTOS``. Nothing from a /predict request is written to disk: bodies are read into memory up to the upload
limit; /feedback keeps the photo a user labelled, named by its content hash, in DIR.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

from fruitlens import __version__
from fruitlens.inference.predictor import Predictor
from fruitlens.labelling.feedback import FeedbackStore, LabelSession
from fruitlens.pipelines.suggest import rows_for_labelling
from fruitlens.serve.labelling import router as labelling_router
from fruitlens.serve.routes import router
from fruitlens.serve.settings import ServeSettings

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: ServeSettings = app.state.settings
    if app.state.predictor is None:
        app.state.predictor = await asyncio.to_thread(Predictor.load, settings.model, "auto", settings.threads)
    pred = app.state.predictor
    pred.max_pixels = settings.max_pixels
    if settings.unknown_threshold != "auto":
        pred.unknown_threshold = float(settings.unknown_threshold)
    log.info("model loaded: %s (%s, %d classes)", pred.source, pred.engine, len(pred.classes))
    if settings.feedback:
        app.state.feedback = FeedbackStore(settings.feedback, settings.feedback_max_photos, settings.feedback_max_mb)
    if settings.label:
        rows = await asyncio.to_thread(rows_for_labelling, pred, settings.label)
        app.state.labelling = LabelSession(rows, settings.label_out)
        log.info("labelling %d photos of %s on /label; answers go to %s", len(rows), settings.label, settings.label_out)
    yield
    for batcher in app.state.batchers.values():
        await batcher.stop()


def create_app(settings: ServeSettings, predictor: Predictor | None = None) -> FastAPI:
    """The service for ``settings.model`` (or an already loaded ``predictor``)."""
    # the API docs' scripts come with the package (fastapi-offline): a CDN is out of reach on an offline machine
    app = FastAPIOffline(
        title="fruitlens",
        version=__version__,
        lifespan=lifespan,
        description="Classify fruit photos. POST an image to /predict; the upload page is at /.",
    )
    app.state.settings = settings.validated()
    app.state.predictor = predictor
    app.state.batchers = {}
    app.state.feedback = None
    app.state.labelling = None
    app.include_router(router)
    app.include_router(labelling_router)
    return app


def app_from_env() -> FastAPI:
    """For ``uvicorn --factory`` with several workers: the settings come from the environment."""
    return create_app(ServeSettings.from_env())


__all__ = ["create_app", "app_from_env", "lifespan"]

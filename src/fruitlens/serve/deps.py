"""The service's dependencies: the predictor (loaded once in the lifespan), its batcher and the settings.

Tests replace them with ``app.dependency_overrides[get_predictor] = ...``; the batcher follows the predictor.
"""

from __future__ import annotations

from fastapi import Depends, Request

from fruitlens.inference.predictor import Predictor
from fruitlens.labelling.feedback import FeedbackStore, LabelSession
from fruitlens.serve.batcher import Batcher
from fruitlens.serve.settings import ServeSettings


def get_settings(request: Request) -> ServeSettings:
    return request.app.state.settings


def get_predictor(request: Request) -> Predictor:
    return request.app.state.predictor


def get_batcher(
    request: Request, predictor: Predictor = Depends(get_predictor), settings: ServeSettings = Depends(get_settings)
) -> Batcher:
    """The batcher of ``predictor`` (one per predictor, so that an overridden predictor gets its own)."""
    batchers: dict[int, Batcher] = request.app.state.batchers
    if id(predictor) not in batchers:
        batchers[id(predictor)] = Batcher(predictor.outputs_batch, max_batch=settings.max_batch)
    return batchers[id(predictor)]


def get_feedback(request: Request) -> FeedbackStore | None:
    return request.app.state.feedback


def get_label_session(request: Request) -> LabelSession | None:
    return request.app.state.labelling

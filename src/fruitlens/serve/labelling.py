"""Routes that collect labels: ``POST /feedback`` (``serve --feedback DIR``: the upload page's "wrong? pick the
right fruit") and ``GET /label``, ``GET /label/photo/{i}``, ``POST /label/answer`` (``serve --label PHOTOS``: the
labelling page for a folder of photos). A photo is only ever named by its number or its content hash, never by a
path from the client."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel

from fruitlens.inference.predictor import Predictor
from fruitlens.labelling.feedback import FeedbackRefused, FeedbackStore, LabelSession
from fruitlens.labelling.page import label_page, thumbnail_url
from fruitlens.serve.deps import get_feedback, get_label_session, get_predictor, get_settings
from fruitlens.serve.multipart import parse_multipart
from fruitlens.serve.settings import ServeSettings
from fruitlens.serve.uploads import read_body

router = APIRouter()


class FeedbackOut(BaseModel):
    path: str
    label: str
    labelled: int
    new: bool
    file: str


class AnswerIn(BaseModel):
    id: int
    label: str = ""


class AnswerOut(BaseModel):
    labelled: int
    file: str


def _refused(exc: FeedbackRefused) -> HTTPException:
    return HTTPException(exc.status, exc.message)


@router.post("/feedback", response_model=FeedbackOut)
async def feedback(
    request: Request,
    store: FeedbackStore | None = Depends(get_feedback),
    settings: ServeSettings = Depends(get_settings),
):
    """The right label for a photo (multipart: ``file`` and ``label``, optionally ``predicted`` and ``score``): the
    photo is kept once, named by its content hash, and the label appended to the store's labels.csv, which
    ``fruitlens train --add DIR/labels.csv`` reads. Off unless the service was started with ``--feedback DIR``."""
    if store is None:
        raise HTTPException(404, "feedback is off: start the service with 'fruitlens serve RUN --feedback DIR'")
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise HTTPException(415, "send multipart/form-data with the fields 'file' and 'label'")
    try:
        parts = parse_multipart(await read_body(request, settings), ctype)
    except ValueError as exc:
        raise HTTPException(422, f"malformed multipart body ({exc})") from None
    fields = {p.name: p for p in parts}
    if "file" not in fields or "label" not in fields:
        raise HTTPException(422, "send the photo as 'file' and its right label as 'label'")
    text = lambda name: fields[name].data.decode("utf-8", "replace") if name in fields else ""
    try:
        score = float(text("score")) if text("score") else None
    except ValueError:
        score = None
    try:
        saved = await asyncio.to_thread(store.add, fields["file"].data, text("label"), text("predicted")[:100], score)
    except FeedbackRefused as exc:
        raise _refused(exc) from None
    return FeedbackOut(path=saved.path, label=saved.label, labelled=saved.labelled, new=saved.new, file=str(store.csv))


def _session(session: LabelSession | None) -> LabelSession:
    if session is None:
        raise HTTPException(404, "labelling is off: start the service with 'fruitlens serve RUN --label PHOTOS/'")
    return session


@router.get("/label", response_class=HTMLResponse, include_in_schema=False)
def label(session: LabelSession | None = Depends(get_label_session), pred: Predictor = Depends(get_predictor)) -> str:
    s = _session(session)
    rows = [r.__class__(r.path, r.guess, r.score, r.top_k, r.why, r.near_copies, a) for r, a in zip(s.rows, s.answers)]
    classes = sorted(set(pred.classes) | {a for a in s.answers if a and a != "-"})
    return label_page(
        rows,
        classes,
        sources=[f"label/photo/{i}" for i in range(len(rows))],
        mode="server",
        endpoint="label/answer",
        saved_to=str(s.out),
        intro=f"{len(rows)} photos to label for the model this service runs.",
    )


@router.get("/label/photo/{index}", include_in_schema=False)
async def label_photo(index: int, session: LabelSession | None = Depends(get_label_session)) -> Response:
    s = _session(session)
    if not 0 <= index < len(s.rows):
        raise HTTPException(404, f"no photo number {index}")
    url = await asyncio.to_thread(thumbnail_url, s.rows[index].path)
    if not url:
        raise HTTPException(410, f"photo number {index} can no longer be read")
    import base64

    return Response(
        base64.b64decode(url.split(",", 1)[1]),
        media_type="image/jpeg",
        headers={"Cache-Control": "private, max-age=3600"},
    )


@router.post("/label/answer", response_model=AnswerOut)
def label_answer(answer: AnswerIn, session: LabelSession | None = Depends(get_label_session)) -> AnswerOut:
    """The label for photo ``id`` of the labelling page ('' undoes it, '-' skips the photo); saved at once."""
    s = _session(session)
    try:
        labelled = s.answer(answer.id, answer.label)
    except FeedbackRefused as exc:
        raise _refused(exc) from None
    return AnswerOut(labelled=labelled, file=str(s.out))

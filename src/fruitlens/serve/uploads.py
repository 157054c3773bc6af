"""A /predict request -> the images it carries, as (name, bytes): multipart ``file``/``files`` or JSON base64.

The body is read into memory (never to disk) and refused past the upload limit, whether or not it declares its
length (a chunked upload is counted as it arrives); a request with more images than allowed is refused too.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from fastapi import HTTPException, Request
from pydantic import BaseModel, ValidationError

from fruitlens.serve.multipart import parse_multipart
from fruitlens.serve.settings import ServeSettings

_SLACK = 64 * 1024  # multipart boundaries and headers on top of the images themselves


class Base64In(BaseModel):
    image: str | None = None
    images: list[str] | None = None
    top_k: int | None = None


@dataclass(frozen=True)
class Upload:
    name: str
    data: bytes


@dataclass(frozen=True)
class Uploads:
    """The images of one request; ``single``: one image sent as ``file`` / ``image`` (answered unwrapped)."""

    items: list[Upload]
    single: bool
    top_k: int | None = None


async def read_uploads(request: Request, settings: ServeSettings) -> Uploads:
    ctype = request.headers.get("content-type", "")
    body = await read_body(request, settings)
    if ctype.startswith("multipart/form-data"):
        uploads = _from_multipart(body, ctype)
    elif ctype.startswith("application/json"):
        uploads = _from_json(body)
    else:
        raise HTTPException(415, "send multipart/form-data with a 'file' field, or JSON with base64 'image'")
    if not uploads.items:
        raise HTTPException(
            422,
            "no image in the request: "
            + (
                "give base64 in 'image' (or a list in 'images')"
                if ctype.startswith("application/json")
                else "use the form field 'file' (or 'files')"
            ),
        )
    if uploads.top_k is not None and uploads.top_k < 1:
        raise HTTPException(422, f"top_k must be at least 1 but received {uploads.top_k}")
    if len(uploads.items) > settings.max_images:
        raise HTTPException(
            413,
            f"{len(uploads.items)} images in one request exceeds the limit of "
            f"{settings.max_images} (fruitlens serve --max-images)",
        )
    for u in uploads.items:
        if len(u.data) > settings.max_bytes:
            raise HTTPException(
                413, f"{u.name}: {len(u.data) / 2**20:.1f} MB exceeds the limit of {settings.max_upload_mb:g} MB"
            )
    return uploads


async def read_body(request: Request, settings: ServeSettings) -> bytes:
    limit = settings.max_bytes + _SLACK
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(
            413,
            f"upload of {int(declared) / 2**20:.1f} MB exceeds the limit of "
            f"{settings.max_upload_mb:g} MB (fruitlens serve --max-upload-mb)",
        )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(
                413, f"upload exceeds the limit of {settings.max_upload_mb:g} MB (fruitlens serve --max-upload-mb)"
            )
    return bytes(body)


def _from_multipart(body: bytes, ctype: str) -> Uploads:
    try:
        parts = parse_multipart(body, ctype)
    except ValueError as exc:
        raise HTTPException(422, f"malformed multipart body ({exc})") from None
    items = [
        Upload(p.filename or p.name, p.data) for p in parts if p.filename is not None or p.name in ("file", "files")
    ]
    single = len(items) == 1 and all(p.name == "file" for p in parts if p.filename is not None)
    return Uploads(items, single)


def _from_json(body: bytes) -> Uploads:
    try:
        payload = Base64In.model_validate_json(body)
    except ValidationError as exc:  # pydantic's own text carries links and internals: say what is wrong, briefly
        where = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors()[:3])
        raise HTTPException(
            422, f'expected JSON {{"image": base64}} or {{"images": [base64, ...]}} ({where})'
        ) from None
    raw = ([payload.image] if payload.image else []) + (payload.images or [])
    items = []
    for i, item in enumerate(raw):
        try:
            items.append(Upload(f"image {i}", base64.b64decode(item.split(",", 1)[-1], validate=True)))
        except (binascii.Error, ValueError):
            raise HTTPException(422, f"image {i}: not valid base64") from None
    return Uploads(items, payload.image is not None and not payload.images, payload.top_k)

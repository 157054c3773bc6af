"""The labelling page (``templates/label.html``): one self-contained HTML file that works from the file system with
no server (thumbnails embedded, the answers kept in the browser and saved as a CSV), or the same page served by
``fruitlens serve --label`` (photos fetched by number, each answer saved on the server)."""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path
from typing import Any

from fruitlens.errors import ImageError
from fruitlens.labelling.labels import TO_LABEL_FIELDS, ToLabel
from fruitlens.models.preprocessing import decode
from fruitlens.templating import render

THUMB_SIDE = 384  # px: big enough to tell a nectarine from a peach, small enough for 200 photos in one file


def thumbnail_url(path: str, side: int = THUMB_SIDE) -> str:
    """A JPEG data URL of the photo, at most ``side`` px a side ("" when it cannot be read any more)."""
    try:
        img = decode(path, min_side=side).image
    except ImageError:
        return ""
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def page_items(rows: list[ToLabel], sources: list[str]) -> list[dict[str, Any]]:
    """The page's items: each photo with its source (a data URL or a URL), the model's top guesses and the label
    given so far ("" for none)."""
    items = []
    for i, (r, src) in enumerate(zip(rows, sources)):
        items.append(
            {
                "id": i,
                "path": r.path,
                "name": Path(r.path).name,
                "src": src,
                "guess": r.guess,
                "score": r.score,
                "top": [[c, s] for c, s in r.top_k],
                "why": r.why,
                "near_copies": r.near_copies,
                "label": r.label,
            }
        )
    return items


def label_page(
    rows: list[ToLabel],
    classes: list[str],
    *,
    sources: list[str] | None = None,
    mode: str = "file",
    endpoint: str = "",
    saved_to: str = "",
    csv_name: str = "to-label.csv",
    intro: str = "",
) -> str:
    """The page's HTML. ``mode`` "file": thumbnails embedded, a CSV to save; "server": photos from ``sources`` (URLs)
    and each answer POSTed to ``endpoint``."""
    if sources is None:
        sources = [thumbnail_url(r.path) for r in rows]
    items = page_items(rows, sources)
    page_id = hashlib.sha1("|".join(r.path for r in rows).encode()).hexdigest()[:16]
    data = {
        "id": page_id,
        "mode": mode,
        "endpoint": endpoint,
        "classes": sorted(classes),
        "items": items,
        "csv_name": csv_name,
        "fields": list(TO_LABEL_FIELDS),
    }
    return render("label.html", data=data, items=items, mode=mode, csv_name=csv_name, saved_to=saved_to, intro=intro)


def write_label_page(
    rows: list[ToLabel], classes: list[str], out: Path, *, csv_name: str = "to-label.csv", intro: str = ""
) -> Path:
    """``label.html`` beside ``to-label.csv``; opens from the file system."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(label_page(rows, classes, csv_name=csv_name, intro=intro), encoding="utf-8")
    tmp.replace(out)
    return out

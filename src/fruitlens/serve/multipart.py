"""Parses a multipart/form-data body that is already in memory, so that no upload is spooled to disk."""

from __future__ import annotations

from dataclasses import dataclass

from python_multipart.multipart import MultipartParser, parse_options_header


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str
    data: bytes


def parse_multipart(body: bytes, content_type: str) -> list[Part]:
    """All parts of ``body``; raises ValueError for a missing boundary or a malformed body."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise ValueError("no boundary in the Content-Type header")
    parts: list[Part] = []
    state: dict = {}

    def on_part_begin():
        state.update(headers={}, data=bytearray(), field=b"", value=b"")

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].decode("latin-1").lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_part_data(data, start, end):
        state["data"] += data[start:end]

    def on_part_end():
        disp, opts = parse_options_header(state["headers"].get("content-disposition", b""))
        name = opts.get(b"name", b"").decode("utf-8", "replace")
        filename = opts.get(b"filename")
        parts.append(
            Part(
                name,
                filename.decode("utf-8", "replace") if filename is not None else None,
                state["headers"].get("content-type", b"").decode("latin-1"),
                bytes(state["data"]),
            )
        )

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    parser.write(body)
    parser.finalize()
    return parts

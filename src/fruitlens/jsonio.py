"""Typed results in and out of JSON: dataclasses become plain dicts, and come back as the same dataclasses.

The run folder's JSON files (report.json, facts.json, train_info.json, export.json) are written from dataclasses and
read back into them, so that commands read attributes, never nested string keys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def json_safe(obj: Any) -> Any:
    """Dataclasses -> dicts, NaN/inf -> None, tuples -> lists, numpy scalars -> Python numbers: standard JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: json_safe(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return json_safe(obj.item())
    return obj


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """``cls(**data)`` with nested dataclass fields rebuilt; keys the class does not know are ignored and missing
    ones take their defaults (reports written by older versions still load)."""
    data = data or {}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _value(hints[f.name], data[f.name])
    return cls(**kwargs)


def _value(typ: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):  # Optional[X]: the first dataclass member, else as is
        for arg in typing.get_args(typ):
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return from_dict(arg, value)
        return value
    if dataclasses.is_dataclass(typ) and isinstance(value, dict):
        return from_dict(typ, value)
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(typ) or (Any,)
        return [_value(item, v) for v in value]
    if origin is dict and isinstance(value, dict):
        _, item = typing.get_args(typ) or (Any, Any)
        return {k: _value(item, v) for k, v in value.items()}
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def write_json(path: Path, obj: Any) -> Path:
    """Writes ``obj`` (dataclass, dict, ...) as indented standard JSON, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False))
    tmp.replace(path)
    return path


def read_json(path: Path, cls: type[T]) -> T:
    """The dataclass ``cls`` from a JSON file written by ``write_json``."""
    return from_dict(cls, json.loads(Path(path).read_text()))

"""Terminal output helpers: tables and JSON."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Iterable, Sequence


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], out=None) -> None:
    """Prints a left-aligned text table (numbers right-aligned)."""
    out = out or sys.stdout
    rows = [[_fmt(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    numeric = [all(_isnum(r[i]) for r in rows) and rows for i in range(len(headers))]
    line = lambda cells: "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(cells, widths, numeric)).rstrip()
    print(line(list(headers)), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for r in rows:
        print(line(r), file=out)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        return "-" if math.isnan(c) else f"{c:.4g}" if abs(c) < 1000 else f"{c:,.0f}"
    return str(c)


def _isnum(s: str) -> bool:
    try:
        float(s.replace(",", "").rstrip("%"))
        return True
    except ValueError:
        return s == "-"


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=_default, allow_nan=False))


def _default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)

"""Where a data set comes from and under which licence, where the folder says so (a LICENSE file in it, or a README
beside it with an entry naming it and a licence). Nothing is guessed: unknown is None."""

from __future__ import annotations

import re
from pathlib import Path

_LICENCE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md", "LICENCE", "LICENCE.txt", "COPYING")
_READMES = ("README.md", "README.txt", "README")


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _entries(text: str) -> list[str]:
    """A README's paragraphs and list items, each joined onto one line."""
    out: list[str] = []
    for line in text.splitlines():
        s = line.strip()
        if not s:
            out.append("")
        elif re.match(r"^([-*+]|\d+\.)\s", s) or not out or not out[-1]:
            out.append(re.sub(r"^([-*+]|\d+\.)\s+", "", s))
        else:
            out[-1] += " " + s
    return [e for e in out if e]


def licence_note(data: str | Path) -> str | None:
    """``LICENSE (first line)`` of the data folder, or the README entry beside it that names the folder and a
    licence; None when the folder does not say."""
    root = Path(data)
    root = root.parent if root.is_file() else root
    for folder in (root, root.parent):
        for name in _LICENCE_FILES:
            f = folder / name
            if f.is_file():
                first = next((ln.strip() for ln in f.read_text(errors="replace").splitlines() if ln.strip()), "")
                return f"{first} (from {f})"
    key = _key(root.name)
    if len(key) < 3:
        return None
    for folder in (root, root.parent):
        for name in _READMES:
            f = folder / name
            if not f.is_file():
                continue
            for entry in _entries(f.read_text(errors="replace")):
                k = _key(entry.split(":")[0] if ":" in entry else entry[:80])
                if (key in k or k and k in key) and re.search(r"licen[cs]e", entry, re.I):
                    return f"{entry} (from {f})"
    return None

"""``FeatureStore``: clean-view backbone features per image file under ``~/.cache/fruitlens/features``, shared by
the commands that read the same files (``check --labels`` and a following ``train``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from fruitlens.models.preprocessing import Preprocessing

log = logging.getLogger(__name__)

CHUNK = 65_536  # rows copied at a time when the store grows


def _weights_key(model: str, weights: str) -> str:
    """What the backbone's weights are, for the store's file name: "imagenet" names the torchvision entry it loads
    (importing IMAGENET1K_V2 beside V1 switches to it), a file its path, size and modification time."""
    from fruitlens.models.registry import get_spec, imagenet_weights

    spec = get_spec(model)
    enum = spec.weights_enum
    if weights == "imagenet" and enum is not None:
        chosen = imagenet_weights(spec)  # V1 keeps the store's name from before the entry was in it
        return "imagenet" if chosen == getattr(enum, "IMAGENET1K_V1", None) else f"imagenet:{chosen.name}"
    path = Path(weights)
    if path.is_file():
        st = path.stat()
        return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return weights


class FeatureStore:
    """Clean-view backbone features per image file, cached under ``~/.cache/fruitlens/features`` (never beside the
    user's images), so that ``check --labels`` and a following ``train`` compute them once.

    One file per (model, feature layer, weights, input size, preprocessing); an entry is keyed by the image's absolute
    path, size and modification time, so a changed file is computed again, and a manifest of the same files finds
    them too.
    """

    def __init__(
        self, model: str, weights: str, pre: Preprocessing, cache: Path | None = None, layer: str = "last"
    ) -> None:
        import hashlib
        import json

        from fruitlens.data.download import cache_root

        key = f"{model}|{_weights_key(model, weights)}|{json.dumps(pre.to_dict())}"
        tag = hashlib.sha1(key.encode()).hexdigest()[:12]
        layer = "" if layer == "last" else f"-{layer}"  # the last layer's files keep their names
        self.path = (cache or cache_root() / "features") / f"{model}{layer}-{pre.image_size}px-{tag}.pt"
        self.index: dict[tuple, int] = {}
        self.x: torch.Tensor | None = None
        if self.path.is_file():
            try:  # memory-mapped: lookups copy the rows they need, the rest stays pages of the file
                saved = torch.load(self.path, weights_only=True, mmap=True)
                self.index = {tuple(k): i for i, k in enumerate(saved["keys"])}
                self.x = saved["x"]
            except Exception as exc:  # a broken cache is recomputed, never trusted
                log.info("feature store %s unreadable (%s): starting again", self.path, exc)

    @staticmethod
    def key(path: str | Path) -> tuple:
        st = Path(path).stat()
        return (str(Path(path).resolve()), int(st.st_size), int(st.st_mtime_ns))

    def lookup(self, paths: list[str]) -> tuple[torch.Tensor | None, list[int]]:
        """(features of the known paths in order, or None if any is missing; indices of the missing ones)."""
        rows, missing = [], []
        for i, p in enumerate(paths):
            try:
                row = self.index.get(self.key(p))
            except OSError:
                row = None
            (missing.append(i) if row is None else rows.append(row))
        if missing or self.x is None:
            return None, missing if self.x is not None else list(range(len(paths)))
        return self.x[torch.tensor(rows, dtype=torch.long)], []

    def add(self, paths: list[str], features: torch.Tensor) -> None:
        """Stores the rows of ``features`` (any float dtype, memory-mapped or not) for the ``paths`` not stored yet,
        as float32. One copy of the new rows in memory, written in chunks (no list of rows, no second copy); the
        store is then read back memory-mapped."""
        keys, rows, seen = [], [], set()
        for i, p in enumerate(paths):
            try:
                k = self.key(p)
            except OSError:
                continue
            # a file listed twice is stored once: else the saved keys and rows would no longer line up
            if k not in self.index and k not in seen:
                seen.add(k)
                keys.append(k)
                rows.append(i)
        if not rows:
            return
        start = 0 if self.x is None else len(self.x)
        new = torch.empty(start + len(rows), features.shape[1])
        for a in range(0, start, CHUNK):  # the stored rows first (pages of the old file)
            b = min(a + CHUNK, start)
            new[a:b] = self.x[a:b]
        where = torch.tensor(rows, dtype=torch.long)
        for a in range(0, len(rows), CHUNK):
            new[start + a : start + a + CHUNK] = features[where[a : a + CHUNK]]
        self.index.update({k: start + i for i, k in enumerate(keys)})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        ordered = sorted(self.index, key=self.index.get)
        torch.save({"keys": [list(k) for k in ordered], "x": new}, tmp)
        del new
        self.x = None  # the old file's mapping closed before the new file takes its name (Windows refuses otherwise)
        tmp.replace(self.path)
        self.x = torch.load(self.path, weights_only=True, mmap=True)["x"]

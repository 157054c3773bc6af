"""``FeatureStore``: clean-view backbone features per image file under ``~/.cache/fruitlens/features``, shared by
the commands that read the same files (``check --labels`` and a following ``train``)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

import torch

from fruitlens.models.preprocessing import Preprocessing

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 2**20  # of float32 rows written at a time when the store grows


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

    One store per (model, feature layer, weights, input size, preprocessing); an entry is keyed by the image's absolute
    path, size and modification time, so a changed file is computed again, and a manifest of the same files finds
    them too. On disk a store is two files: ``<name>.f32``, its rows (raw float32, appended to, read memory-mapped)
    and ``<name>.keys.json``, the key of each row in order (replaced whole, after the rows it names are written:
    rows past the last key are a write that did not finish, and are cut off by the next one).
    """

    def __init__(
        self, model: str, weights: str, pre: Preprocessing, cache: Path | None = None, layer: str = "last"
    ) -> None:
        import hashlib

        from fruitlens.data.download import cache_root

        key = f"{model}|{_weights_key(model, weights)}|{json.dumps(pre.to_dict())}"
        tag = hashlib.sha1(key.encode()).hexdigest()[:12]
        layer = "" if layer == "last" else f"-{layer}"  # the last layer's files keep their names
        self.path = (cache or cache_root() / "features") / f"{model}{layer}-{pre.image_size}px-{tag}.f32"
        self.keys_path = self.path.with_suffix(".keys.json")
        self.index: dict[tuple, int] = {}
        self.x: torch.Tensor | None = None
        self._read()

    def _read(self) -> None:
        """The saved keys, and the rows they name memory-mapped (lookups copy the rows they need; the rest stays
        pages of the file). A broken store is recomputed, never trusted."""
        self.index, self.x = {}, None
        if not self.keys_path.is_file():
            return
        try:
            saved = json.loads(self.keys_path.read_text())
            n, dim = len(saved["keys"]), int(saved["dim"])
            if n and self.path.stat().st_size < n * dim * 4:
                raise ValueError(f"{self.path.name} holds fewer rows than its {n:,} keys")
            self.index = {tuple(k): i for i, k in enumerate(saved["keys"])}
            if n:
                self.x = torch.from_file(str(self.path), shared=False, size=n * dim, dtype=torch.float32)
                self.x = self.x.view(n, dim)
        except Exception as exc:
            log.info("feature store %s unreadable (%s): starting again", self.path, exc)
            self.index, self.x = {}, None

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
        as float32, appended to the rows file ``CHUNK_BYTES`` at a time: the process holds one chunk, not a copy of
        the store or of the new rows. Other processes adding to the same store wait for this one (a lock file, as
        the run folder's); what they added meanwhile is read first."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file closes)
            self._read()  # another process may have added rows since this store was opened
            dim = features.shape[1]
            if self.x is not None and self.x.shape[1] != dim:
                raise ValueError(f"feature store {self.path}: rows of {self.x.shape[1]} values, given {dim}")
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
            start = len(self.index)
            self.x = None  # the mapping closed before the file changes (Windows refuses otherwise)
            if start == 0:  # nothing saved, or a store that could not be read
                # a new file, not the old one cut short: a process still reading the old one keeps its pages; a
                # store of an earlier fruitlens (one .pt file) goes too
                self.path.unlink(missing_ok=True)
                self.path.with_suffix(".pt").unlink(missing_ok=True)
            where, step = torch.tensor(rows, dtype=torch.long), max(1, CHUNK_BYTES // (4 * dim))
            with open(self.path, "ab") as fh:
                fh.truncate(start * dim * 4)  # rows past the saved keys: an add that did not finish
                fh.seek(0, os.SEEK_END)
                for a in range(0, len(rows), step):
                    fh.write(features[where[a : a + step]].to(torch.float32).contiguous().numpy())
                fh.flush()
                os.fsync(fh.fileno())
            self.index.update({k: start + i for i, k in enumerate(keys)})
            ordered = sorted(self.index, key=self.index.get)
            tmp = self.keys_path.with_name(f"{self.keys_path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"dim": dim, "keys": [list(k) for k in ordered]}))
            tmp.replace(self.keys_path)
            self._read()

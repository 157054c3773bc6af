"""Pretrained weights through torchvision's own enums and cache, usable offline.

On a connected machine torchvision downloads a weights file into ``$TORCH_HOME/hub/checkpoints`` on first use.
On an offline machine ``fruitlens weights import FILE`` verifies a file against the hash that torchvision's file
name carries and copies it into that cache, so the normal loader finds it.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable
from urllib.parse import urlparse

import torch
from torchvision.models import WeightsEnum

from fruitlens.errors import WeightsError
from fruitlens.filehash import sha256_file

log = logging.getLogger(__name__)

_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")  # torch.hub's convention: name-<sha256 prefix>.pth


def cache_dir() -> Path:
    """torchvision's weights cache: ``$TORCH_HOME/hub/checkpoints`` (``~/.cache/torch/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def file_name(weights: WeightsEnum) -> str:
    return Path(urlparse(weights.url).path).name


def cached_path(weights: WeightsEnum) -> Path:
    return cache_dir() / file_name(weights)


def is_cached(weights: WeightsEnum) -> bool:
    return cached_path(weights).is_file()


@dataclass(frozen=True)
class WeightsRow:
    model: str
    weights: str
    file: str
    cached: bool
    url: str


def list_weights(models: dict[str, type[WeightsEnum] | None]) -> list[WeightsRow]:
    """One row per (model, weights entry) of ``models`` (name -> weights enum, None: no pretrained weights) with
    whether its file is in the cache."""
    rows = []
    for name, enum in sorted(models.items()):
        if enum is None:
            rows.append(WeightsRow(name, "-", "-", False, "(trains from scratch)"))
            continue
        for w in enum:
            rows.append(WeightsRow(name, f"{enum.__name__}.{w.name}", file_name(w), is_cached(w), w.url))
    return rows


def import_weights(path: str | Path, enums: Iterable[type[WeightsEnum]]) -> Path:
    """Verifies ``path`` against the hash of every weights file of ``enums`` and copies it into the cache.

    The file's own name does not matter: its SHA-256 decides which torchvision file it is.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file", "pass the .pth file you downloaded")
    digest = sha256_file(path)
    known = []
    for enum in enums:
        for w in enum:
            name = file_name(w)
            m = _HASH_IN_NAME.search(name)
            known.append(name)
            if m and digest.startswith(m.group(1)):
                dest = cache_dir() / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                tmp = dest.with_suffix(".partial")
                shutil.copyfile(path, tmp)
                tmp.replace(dest)
                log.debug("imported %s as %s", path, dest)
                return dest
    raise WeightsError(
        f"{path}: SHA-256 {digest[:12]}... matches none of the known weights files ({', '.join(sorted(set(known)))})",
        "download the file named in 'fruitlens weights list' for your model",
    )


def pick(enum: type[WeightsEnum], skip: Collection[str] = ()) -> WeightsEnum:
    """The weights entry to use for 'imagenet': the default when cached, else any cached entry, else the default.
    ``skip``: names of entries the model cannot load (ViT-B/16's 384 px SWAG weights for a 224 px model).

    (MobileNetV2's default is IMAGENET1K_V2, but the file available offline is IMAGENET1K_V1.)
    """
    usable = [w for w in enum if w.name not in skip]
    default = enum.DEFAULT if enum.DEFAULT in usable else usable[0]
    if is_cached(default):
        return default
    cached = [w for w in usable if is_cached(w)]
    return cached[0] if cached else default


def load_state_dict(weights: WeightsEnum) -> dict:
    """The weights' state dict from the cache, downloading it when the cache lacks it (torchvision's loader)."""
    dest = cached_path(weights)
    if not dest.is_file():
        log.info("downloading %s into %s", weights.url, dest.parent)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # urllib, SSL, socket and hash errors all mean: the file is not usable here
        if dest.is_file():
            raise WeightsError(
                f"{dest}: cannot load weights ({exc})",
                f"delete it and run 'fruitlens weights import {dest.name}' with a good copy",
            ) from None
        raise WeightsError(
            f"pretrained weights file {dest.name} is not in the cache {dest.parent} and cannot be downloaded "
            f"from {weights.url} ({type(exc).__name__}: {exc})",
            f"on an offline machine, copy {dest.name} here and run 'fruitlens weights import {dest.name}', "
            "or train from scratch with --weights none",
        ) from None

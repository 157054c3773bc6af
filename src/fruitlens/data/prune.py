"""Near copies carry little new: train on representatives of each group of near-identical images.

Fruits-360 films each fruit turning on a motor: hundreds of frames per fruit, each a near copy of the next. A group
needs its distinct views, not every frame (data pruning: Sorscher et al., NeurIPS 2022; SemDeDup, Abbas et al.
2023). Within each near-copy group, the representatives are picked greedily to cover it (k-center on the
perceptual hashes: the next pick is the frame farthest from every pick so far), as many as ``share`` of the group,
at least one. The others stay in the run's manifest as split ``covered``: checked, never trained on, and counted
in the report.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from fruitlens.data.check import FileInfo
from fruitlens.data.hashing import popcount64
from fruitlens.data.manifest import Manifest

COVERED = "covered"  # the split name of the training images a representative stands for
LARGE_GROUPS = 10  # a median near-copy group of this many training images or more: frames of one thing turning
GROUP_SHARE = 0.2  # of such groups, trained on (benchmarks/RESULTS.md, "Near copies")


def auto_keep_share(median_group: float) -> float:
    """The share of each near-copy group to train on: ``GROUP_SHARE`` where the typical training image is one of
    ``LARGE_GROUPS`` or more near copies (Fruits-360's turning fruit), all of them otherwise."""
    return GROUP_SHARE if median_group >= LARGE_GROUPS else 1.0


def cover(hashes: np.ndarray, k: int) -> np.ndarray:
    """Indices of ``k`` of ``hashes`` (64-bit perceptual hashes) that cover them: k-center greedy on Hamming
    distance, starting from the hash nearest all others (the medoid of a sample)."""
    h = np.asarray(hashes, dtype=np.uint64)
    n = len(h)
    if k >= n:
        return np.arange(n)
    probe = h[np.linspace(0, n - 1, min(n, 64)).astype(int)]
    start = int(np.argmin([popcount64(probe ^ x).sum() for x in h]))
    chosen = [start]
    dist = popcount64(h ^ h[start])
    while len(chosen) < k:
        j = int(np.argmax(dist))
        chosen.append(j)
        dist = np.minimum(dist, popcount64(h ^ h[j]))
    return np.array(sorted(chosen))


def representatives(
    manifest: Manifest, files: dict[str, FileInfo], share: float, split: str = "train"
) -> tuple[Manifest, int]:
    """``manifest`` with the ``split`` images that representatives of their near-copy group stand for moved to
    split ``covered``; and how many were. ``files``: what the check learnt of each image, by resolved path. Groups of
    one, and images the check has no hash for, are kept."""
    if share >= 1:
        return manifest, 0
    records = list(manifest.records)
    by_group: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        if r.split == split and r.group and str(manifest.resolve(r)) in files:
            by_group.setdefault(f"{r.label}\0{r.group}", []).append(i)
    moved = 0
    for members in by_group.values():
        k = max(1, math.ceil(share * len(members)))
        if k >= len(members):
            continue
        hashes = np.array([files[str(manifest.resolve(records[i]))].phash for i in members], dtype=np.uint64)
        keep = set(np.asarray(members)[cover(hashes, k)].tolist())
        for i in members:
            if i not in keep:
                records[i] = replace(records[i], split=COVERED)
                moved += 1
    return manifest.with_records(records), moved

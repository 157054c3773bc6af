"""Content and perceptual hashes, and a near-duplicate search that is not all-pairs.

Near duplicates are found by multi-index hashing: a 64-bit hash is cut into ``d + 1`` bit chunks; two hashes within
Hamming distance ``d`` agree exactly on at least one chunk (pigeonhole), so only images sharing a chunk value are
compared. Cost grows with the number of images times the bucket sizes, not with the number of pairs.
"""

from __future__ import annotations

import numpy as np

_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
PHASH_SIDE = 32  # pHash works on a 32x32 grayscale thumbnail (imagehash's hash_size 8 x highfreq_factor 4)


def phash_thumbnail(img) -> bytes:
    """The 32x32 grayscale (Lanczos) thumbnail pHash starts from, as raw bytes (cheap to send between processes)."""
    from PIL import Image

    return img.convert("L").resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS).tobytes()


def phash_batch(thumbnails: list[bytes]) -> np.ndarray:
    """64-bit perceptual hashes of many thumbnails at once; bit for bit ``imagehash.phash`` (a test holds them
    equal), but one vectorised DCT for all images instead of one call per image."""
    import scipy.fftpack

    out = np.zeros(len(thumbnails), dtype=np.uint64)
    for start in range(0, len(thumbnails), 4096):  # chunks keep the float64 DCT buffers at ~100 MB
        chunk = thumbnails[start : start + 4096]
        px = np.frombuffer(b"".join(chunk), dtype=np.uint8).reshape(-1, PHASH_SIDE, PHASH_SIDE).astype(np.float64)
        dct = scipy.fftpack.dct(scipy.fftpack.dct(px, axis=1), axis=2)[:, :8, :8].reshape(len(px), 64)
        bits = dct > np.median(dct, axis=1, keepdims=True)
        out[start : start + len(chunk)] = np.packbits(bits, axis=1, bitorder="big").view(">u8").ravel()
    return out


def popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each uint64."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x).astype(np.int64)
    return _POPCOUNT8[x.view(np.uint8).reshape(-1, 8)].sum(axis=1).astype(np.int64)


def _chunks(bits: int, parts: int) -> list[tuple[int, int]]:
    """(shift, width) of ``parts`` near-equal bit chunks covering ``bits`` bits."""
    base, extra = divmod(bits, parts)
    out, shift = [], 0
    for i in range(parts):
        width = base + (1 if i < extra else 0)
        out.append((shift, width))
        shift += width
    return out


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int, valid: np.ndarray | None = None) -> np.ndarray:
    """All index pairs ``(i, j)``, ``i < j``, whose 64-bit hashes differ in at most ``max_distance`` bits.

    ``valid`` masks out entries (e.g. undecodable images). Returns an ``(n_pairs, 2)`` int64 array.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    idx_all = np.arange(len(hashes)) if valid is None else np.flatnonzero(valid)
    if len(idx_all) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    h = hashes[idx_all]
    found: list[np.ndarray] = []
    for shift, width in _chunks(64, max_distance + 1):
        keys = (h >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        sk = keys[order]
        # compare each element with the ones 1, 2, ... places further on while any key still repeats
        d = 1
        while d < len(sk):
            same = np.flatnonzero(sk[:-d] == sk[d:])
            if len(same) == 0:
                break
            a, b = order[same], order[same + d]
            close = popcount64(h[a] ^ h[b]) <= max_distance
            if close.any():
                found.append(np.stack([np.minimum(a, b)[close], np.maximum(a, b)[close]], axis=1))
            d += 1
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.unique(np.concatenate(found), axis=0)
    return idx_all[pairs].astype(np.int64)


def connected_groups(n: int, pairs: np.ndarray) -> np.ndarray:
    """Component id for each of ``n`` items linked by ``pairs`` (union-find through scipy)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(pairs) == 0:
        return np.arange(n)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels

"""Process-wide settings that keep a long CPU job lean."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import time
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
_done = False


def limit_heap_growth(threshold: int = 1 << 20) -> bool:
    """Fixes glibc's mmap threshold at ``threshold`` bytes (1 MiB).

    glibc raises the threshold each time a large block is freed, so the many 5-20 MB image batches of a feature pass
    then come from per-thread heaps that fragment and never shrink: a GroceryStore run at 448 px grew to 7 GiB.
    A fixed threshold keeps such buffers in mmap'd memory that goes back to the system on free (measured: 7.1 -> 1.8
    GiB peak, same speed). No-op off glibc; returns whether it applied.
    """
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _done = bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):  # musl and others have no mallopt
        _done = False
    log.debug("glibc mmap threshold fixed at %d bytes: %s", threshold, _done)
    return _done


def is_ddp_child() -> bool:
    """This process was started by Lightning's DDP launcher for a local rank above zero (its environment says so
    from the start; the process the user started gets ``LOCAL_RANK`` only once it launches the others)."""
    return int(os.environ.get("LOCAL_RANK", 0) or 0) > 0


def peak_mib() -> float:
    """The largest resident memory this process has had so far, in MiB (0 where the platform does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(kib / (2**20 if sys.platform == "darwin" else 2**10), 1)  # bytes on macOS, KiB on Linux


class Stages:
    """Wall time per stage of a command (check, features, head, export, evaluation ...), in the order they ran, and
    the process's peak resident memory when each ended (``peak_mib``: the stage whose figure jumps holds the memory).
    ``STAGES`` is the process's one instance: the train pipeline starts it afresh and writes it to train_info.json."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.peak_mib: dict[str, float] = {}

    def reset(self) -> None:
        self.seconds, self.peak_mib = {}, {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 2)
        self.peak_mib[name] = peak_mib()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def text(self) -> str:
        """``features 25.1s (backbone 20.3s), head 4.0s``: a stage ``a: b`` is a part of stage ``a``."""
        parts = {
            k: [f"{p.split(': ', 1)[1]} {s:.1f}s" for p, s in self.seconds.items() if p.startswith(k + ": ")]
            for k in self.seconds
            if ": " not in k
        }
        return ", ".join(f"{k} {self.seconds[k]:.1f}s" + (f" ({', '.join(p)})" if p else "") for k, p in parts.items())


STAGES = Stages()

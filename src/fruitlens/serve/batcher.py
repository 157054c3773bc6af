"""Groups concurrent requests into one model call when several are waiting; never delays a lone request much."""

from __future__ import annotations

import asyncio
from typing import Callable

import numpy as np

Outputs = dict  # output name -> (n, ...) array


def _rows(out: Outputs, start: int, stop: int) -> Outputs:
    return {k: v[start:stop] for k, v in out.items()}


class Batcher:
    """``await batcher.submit(x)`` -> the model's outputs for the rows of ``x``. Runs ``forward`` (blocking; it
    returns a dict of arrays) in a worker thread, one batch at a time, at most ``max_batch`` images per call (a larger
    request runs in several), so that memory stays bounded."""

    def __init__(self, forward: Callable[[np.ndarray], Outputs], max_batch: int = 32, wait_ms: float = 2.0) -> None:
        self.forward, self.max_batch, self.wait = forward, max_batch, wait_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0  # model calls
        self.items = 0  # images

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def submit(self, x: np.ndarray) -> Outputs:
        """``x``: (n, H, W, 3) uint8 pixels of one request; returns their outputs."""
        if self.task is None:  # started on first use, inside the running event loop
            self.queue = asyncio.Queue()
            self.task = asyncio.create_task(self._loop())
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((x, fut))
        return await fut

    def _run(self, batch: np.ndarray) -> Outputs:
        parts = [self.forward(batch[i : i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        self.batches += len(parts)
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            items = [first]
            n = len(first[0])
            deadline = loop.time() + self.wait
            while n < self.max_batch:
                timeout = deadline - loop.time()
                try:
                    item = (
                        self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
                    )
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                items.append(item)
                n += len(item[0])
            batch = np.concatenate([x for x, _ in items])
            try:
                out = await asyncio.to_thread(self._run, batch)
            except Exception as exc:  # hand the failure to every waiting request
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.items += len(batch)
            i = 0
            for x, fut in items:
                if not fut.done():
                    fut.set_result(_rows(out, i, i + len(x)))
                i += len(x)

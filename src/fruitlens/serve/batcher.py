"""Groups concurrent requests into one model call when several are waiting; never delays a lone request much."""
from __future__ import annotations

import asyncio
from typing import Callable

import numpy as np


class Batcher:
    """``await batcher.submit(x)`` -> logits row. Runs ``forward`` (blocking) in a worker thread, one batch at a time."""

    def __init__(self, forward: Callable[[np.ndarray], np.ndarray], max_batch: int = 32, wait_ms: float = 2.0) -> None:
        self.forward, self.max_batch, self.wait = forward, max_batch, wait_ms / 1000
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.items = 0

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """``x``: (n, 3, H, W) preprocessed images of one request; returns their (n, classes) logits."""
        if self.queue is None:  # not started (e.g. used outside the lifespan): run directly
            return await asyncio.to_thread(self.forward, x)
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((x, fut))
        return await fut

    async def _loop(self) -> None:
        while True:
            first = await self.queue.get()
            items = [first]
            n = len(first[0])
            deadline = asyncio.get_running_loop().time() + self.wait
            while n < self.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                try:
                    item = self.queue.get_nowait() if timeout <= 0 else await asyncio.wait_for(self.queue.get(), timeout)
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
                items.append(item)
                n += len(item[0])
            batch = np.concatenate([x for x, _ in items])
            try:
                out = await asyncio.to_thread(self.forward, batch)
            except Exception as exc:  # hand the failure to every waiting request
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            self.items += len(batch)
            i = 0
            for x, fut in items:
                if not fut.done():
                    fut.set_result(out[i:i + len(x)])
                i += len(x)

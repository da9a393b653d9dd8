"""Dynamic batching behind a bounded queue.

Requests wait in a queue of at most `max_queue` sentences (beyond it: QueueFull, which the server
answers with 429 and Retry-After, so memory never grows without bound). One worker takes up to
`max_batch` sentences of similar length, waiting at most `max_wait_ms` for company, and runs them
through the pipeline in one padded batch. A CUDA out-of-memory error splits the batch and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from voxscale import metrics_contract as mc
from voxscale.inference.pipeline import Item
from voxscale.inference.server_metrics import ServerMetrics


class QueueFull(RuntimeError):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the request queue is full; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class Draining(RuntimeError):
    pass


@dataclass
class _Job:
    item: Item
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(
        self,
        synthesize: Callable[[list[Item]], list[np.ndarray]],
        metrics: ServerMetrics,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        max_queue: int = 64,
    ) -> None:
        self.synthesize = synthesize
        self.metrics = metrics
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.inflight = 0
        self.draining = False
        self.batch_seconds = 0.5  # running estimate, for Retry-After
        self._task: asyncio.Task[None] | None = None
        metrics.gauge(mc.QUEUE_CAPACITY).set(max_queue)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def depth(self) -> int:
        return self.queue.qsize()

    def submit(self, items: list[Item]) -> list[asyncio.Future[np.ndarray]]:
        """Queue a request's sentences, all or none."""
        if self.draining:
            raise Draining("the server is shutting down")
        if self.queue.qsize() + len(items) > self.max_queue:
            waits = (self.queue.qsize() / max(self.max_batch, 1) + 1) * self.batch_seconds
            raise QueueFull(retry_after=max(1.0, waits))
        loop = asyncio.get_running_loop()
        futures = []
        for item in items:
            job = _Job(item, loop.create_future())
            self.queue.put_nowait(job)
            futures.append(job.future)
        self.metrics.gauge(mc.QUEUE_DEPTH).set(self.queue.qsize())
        return futures

    async def idle(self) -> None:
        """Until everything accepted has been synthesised (used while draining)."""
        while self.queue.qsize() or self.inflight:
            await asyncio.sleep(0.05)

    async def _next_batch(self) -> list[_Job]:
        first = await self.queue.get()
        batch = [first]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            timeout = deadline - time.monotonic()
            if timeout <= 0 and self.queue.empty():
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), max(timeout, 0.0)))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            self.metrics.gauge(mc.QUEUE_DEPTH).set(self.queue.qsize())
            now = time.monotonic()
            for job in batch:
                self.metrics.histogram(mc.QUEUE_WAIT).observe(now - job.enqueued)
            # Similar lengths together waste less padding; requests with a seed run alone (reproducible).
            seeded = [j for j in batch if j.item.seed is not None]
            rest = sorted((j for j in batch if j.item.seed is None), key=lambda j: len(j.item.ids))
            groups = [[j] for j in seeded] + ([rest] if rest else [])
            self.inflight = len(batch)
            self.metrics.gauge(mc.INFLIGHT).set(self.inflight)
            for group in groups:
                await self._run_group(group)
            self.inflight = 0
            self.metrics.gauge(mc.INFLIGHT).set(0)

    async def _run_group(self, group: list[_Job]) -> None:
        started = time.monotonic()
        try:
            results = await asyncio.to_thread(self._synthesize_splitting, [j.item for j in group])
        except Exception as exc:
            for job in group:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * (time.monotonic() - started)
        self.metrics.histogram(mc.BATCH_SIZE).observe(len(group))
        for job, wav in zip(group, results, strict=True):
            if not job.future.done():
                job.future.set_result(wav)

    def _synthesize_splitting(self, items: list[Item]) -> list[np.ndarray]:
        try:
            return self.synthesize(items)
        except torch.cuda.OutOfMemoryError:
            if len(items) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(items) // 2
            return self._synthesize_splitting(items[:half]) + self._synthesize_splitting(items[half:])

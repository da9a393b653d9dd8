"""Dynamic batching behind a bounded queue of requests.

Admission counts requests, the unit a client sends and the autoscaler sizes the fleet in: at most
`max_queue` requests wait for their first batch slot (beyond it: QueueFull, which the server answers
with 429 and Retry-After, so memory never grows without bound). A request of any length is admitted
on an empty queue. Synthesis itself works on sentences: one worker takes up to `max_batch` sentences
of similar length, waiting at most `max_wait_ms` for company, and runs them through the pipeline in
one padded batch. A CUDA out-of-memory error splits the batch and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from voxscale import metrics_contract as mc
from voxscale.inference.pipeline import Item
from voxscale.inference.server_metrics import BusyClock, ServerMetrics

Priority = Literal["realtime", "batch"]
PRIORITIES: tuple[Priority, ...] = ("realtime", "batch")


class QueueFull(RuntimeError):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the request queue is full; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class Draining(RuntimeError):
    pass


@dataclass
class _Request:
    """One admitted request: queued until a first sentence enters a batch, in flight until the last is done."""

    unfinished: int
    enqueued: float = field(default_factory=time.monotonic)
    started: bool = False
    failed: bool = False


@dataclass
class _Job:
    """One sentence of a request."""

    item: Item
    future: asyncio.Future[np.ndarray]
    request: _Request


class Batcher:
    def __init__(
        self,
        synthesize: Callable[[list[Item]], list[np.ndarray]],
        metrics: ServerMetrics,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        max_queue: int = 64,
        gpu_product: str = "cpu",
    ) -> None:
        self.synthesize = synthesize
        self.metrics = metrics
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()  # sentences, in arrival order
        self.waiting = 0  # requests admitted, none of whose sentences has reached a batch yet
        self.inflight = 0  # requests started, not finished
        self.draining = False
        self.batch_seconds = 0.5  # running estimate, for Retry-After
        self._task: asyncio.Task[None] | None = None
        # Children created now, so the series exist (at 0) before the first request and rate() sees it.
        self.busy = BusyClock(metrics.counter(mc.BUSY_SECONDS).labels(gpu_product))
        self.completed = metrics.counter(mc.COMPLETED_REQUESTS).labels(gpu_product)
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
        """Requests waiting for a batch slot (what the queue bound and voxscale_queue_depth count)."""
        return self.waiting

    def submit(
        self, items: list[Item], priority: Priority = "realtime", request_id: str = ""
    ) -> list[asyncio.Future[np.ndarray]]:
        """Admit a request (all its sentences) or refuse it whole; one future per sentence.

        `priority`: realtime requests are served before batch ones (interactive speech ahead of
        offline book/course generation); `request_id` follows the request into the batch logs."""
        if not items:
            raise ValueError("a request needs at least one sentence")
        if self.draining:
            raise Draining("the server is shutting down")
        if self.waiting >= self.max_queue:
            raise QueueFull(retry_after=self._retry_after())
        loop = asyncio.get_running_loop()
        request = _Request(unfinished=len(items))
        futures = []
        for item in items:
            job = _Job(item, loop.create_future(), request)
            self.queue.put_nowait(job)
            futures.append(job.future)
        self.waiting += 1
        self._publish()
        return futures

    def _retry_after(self) -> float:
        """Seconds until the sentences queued now have gone through, at the measured batch time."""
        return max(1.0, (self.queue.qsize() / max(self.max_batch, 1) + 1) * self.batch_seconds)

    def _publish(self) -> None:
        self.metrics.gauge(mc.QUEUE_DEPTH).set(self.waiting)
        self.metrics.gauge(mc.INFLIGHT).set(self.inflight)

    async def idle(self) -> None:
        """Until everything accepted has been synthesised (used while draining)."""
        while self.waiting or self.inflight:
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

    def _start(self, batch: list[_Job]) -> None:
        """A request leaves the queue (and its wait ends) when its first sentence enters a batch."""
        now = time.monotonic()
        for job in batch:
            request = job.request
            if not request.started:
                request.started = True
                self.waiting -= 1
                self.inflight += 1
                self.metrics.histogram(mc.QUEUE_WAIT).observe(now - request.enqueued)
        self._publish()

    def _finish(self, job: _Job) -> None:
        """A request is done when its last sentence is; it counts as completed only if all succeeded."""
        request = job.request
        request.unfinished -= 1
        if request.unfinished:
            return
        self.inflight -= 1
        if not request.failed:
            self.completed.inc()
        self._publish()

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            self._start(batch)
            # Similar lengths together waste less padding; requests with a seed run alone (reproducible).
            seeded = [j for j in batch if j.item.seed is not None]
            rest = sorted((j for j in batch if j.item.seed is None), key=lambda j: len(j.item.ids))
            groups = [[j] for j in seeded] + ([rest] if rest else [])
            for group in groups:
                await self._run_group(group)

    async def _run_group(self, group: list[_Job]) -> None:
        started = time.monotonic()
        try:
            with self.busy.running():
                results = await asyncio.to_thread(self._synthesize_splitting, [j.item for j in group])
        except Exception as exc:
            for job in group:
                job.request.failed = True
                if not job.future.done():
                    job.future.set_exception(exc)
                self._finish(job)
            return
        self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * (time.monotonic() - started)
        self.metrics.histogram(mc.BATCH_SIZE).observe(len(group))
        for job, wav in zip(group, results, strict=True):
            if not job.future.done():
                job.future.set_result(wav)
            self._finish(job)

    def _synthesize_splitting(self, items: list[Item]) -> list[np.ndarray]:
        try:
            return self.synthesize(items)
        except torch.cuda.OutOfMemoryError:
            if len(items) == 1:
                raise
            torch.cuda.empty_cache()
            half = len(items) // 2
            return self._synthesize_splitting(items[:half]) + self._synthesize_splitting(items[half:])

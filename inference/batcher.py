"""Dynamic batching behind a bounded queue of requests.

Admission counts requests, the unit a client sends and the autoscaler sizes the fleet in: at most
`max_queue` requests wait for their first batch slot (beyond it: QueueFull, which the server answers
with 429 and Retry-After, so memory never grows without bound). A request of any length is admitted
on an empty queue. Synthesis itself works on sentences: one worker waits at most `max_wait_ms` for
company, then takes up to `max_batch` sentences of similar length whose padded size (longest ids x
count) fits `token_budget`, and runs them through the pipeline in one padded batch (`plan_batch`).
Realtime sentences go before batch ones; a batch sentence that has waited `promote_after_s` counts
as realtime (age-based promotion), so a stream of realtime traffic cannot starve it. A CUDA
out-of-memory error splits the batch and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from voxscale import metrics_contract as mc
from voxscale.inference.pipeline import Item
from voxscale.inference.server_metrics import BusyClock, ServerMetrics

Priority = Literal["realtime", "batch"]
PRIORITIES: tuple[Priority, ...] = ("realtime", "batch")

log = logging.getLogger("voxscale.inference.batcher")


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
    priority: Priority = "realtime"
    request_id: str = ""
    enqueued: float = field(default_factory=time.monotonic)
    started: bool = False
    failed: bool = False


@dataclass
class _Job:
    """One sentence of a request."""

    item: Item
    future: asyncio.Future[np.ndarray]
    request: _Request
    seq: int = 0  # arrival order across all requests

    def rank(self, promote_before: float) -> int:
        """0: realtime, or a batch request enqueued before `promote_before` (promoted); 1: batch."""
        request = self.request
        return 0 if request.priority == "realtime" or request.enqueued <= promote_before else 1


def plan_batch(pending: Sequence[_Job], max_batch: int, token_budget: int, promote_before: float) -> list[_Job]:
    """The next batch out of `pending` (not empty), shortest first.

    It starts from the oldest sentence of the highest rank (so every sentence of a rank is served
    in arrival order at worst), then adds the others of that rank closest in length to it, then
    those of lower rank, while the padded size stays within `token_budget` and the count within
    `max_batch`. A sentence longer than the budget still goes, alone. A seeded sentence goes
    alone: the pipeline honours a seed only for a batch of one."""
    ranked = sorted(pending, key=lambda j: (j.rank(promote_before), j.seq))
    head = ranked[0]
    batch, width = [head], len(head.item.ids)
    if head.item.seed is not None:
        return batch
    others = sorted(
        (j for j in ranked[1:] if j.item.seed is None),
        key=lambda j: (j.rank(promote_before), abs(len(j.item.ids) - width), j.seq),
    )
    for job in others:
        if len(batch) >= max_batch:
            break
        wider = max(width, len(job.item.ids))
        if wider * (len(batch) + 1) <= token_budget:
            batch.append(job)
            width = wider
    return sorted(batch, key=lambda j: len(j.item.ids))


def _request_ids(jobs: Sequence[_Job]) -> str:
    """The distinct request ids of a batch, for its log lines."""
    return ",".join(dict.fromkeys(j.request.request_id or "-" for j in jobs))


class Batcher:
    def __init__(
        self,
        synthesize: Callable[[list[Item]], list[np.ndarray]],
        metrics: ServerMetrics,
        max_batch: int = 8,
        max_wait_ms: float = 10.0,
        max_queue: int = 64,
        gpu_product: str = "cpu",
        token_budget: int = 4096,
        promote_after_s: float = 5.0,
    ) -> None:
        self.synthesize = synthesize
        self.metrics = metrics
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self.token_budget, self.promote_after = token_budget, promote_after_s
        self.pending: list[_Job] = []  # sentences not yet in a batch
        self._arrived = asyncio.Event()
        self._seq = itertools.count()
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
        offline book/course generation); a batch request waiting longer than `promote_after_s` is
        promoted to realtime rank, oldest first, so it is served eventually. `request_id` follows
        the request into the batch logs."""
        if not items:
            raise ValueError("a request needs at least one sentence")
        if priority not in PRIORITIES:
            raise ValueError(f"priority: {priority!r} is not one of {', '.join(PRIORITIES)}")
        if self.draining:
            raise Draining("the server is shutting down")
        if self.waiting >= self.max_queue:
            raise QueueFull(retry_after=self._retry_after())
        loop = asyncio.get_running_loop()
        request = _Request(unfinished=len(items), priority=priority, request_id=request_id)
        jobs = [_Job(item, loop.create_future(), request, next(self._seq)) for item in items]
        self.pending += jobs
        self._arrived.set()
        self.waiting += 1
        futures = [job.future for job in jobs]
        self._publish()
        return futures

    def _retry_after(self) -> float:
        """Seconds until the sentences queued now have gone through, at the measured batch time."""
        return max(1.0, (len(self.pending) / max(self.max_batch, 1) + 1) * self.batch_seconds)

    def _publish(self) -> None:
        self.metrics.gauge(mc.QUEUE_DEPTH).set(self.waiting)
        self.metrics.gauge(mc.INFLIGHT).set(self.inflight)

    async def idle(self) -> None:
        """Until everything accepted has been synthesised (used while draining)."""
        while self.waiting or self.inflight:
            await asyncio.sleep(0.05)

    async def _next_batch(self) -> list[_Job]:
        """Wait for a sentence, then up to `max_wait_ms` for a full batch's worth, then plan one."""
        while not self.pending:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = time.monotonic() + self.max_wait
        while len(self.pending) < self.max_batch and (timeout := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                break
        batch = plan_batch(self.pending, self.max_batch, self.token_budget, time.monotonic() - self.promote_after)
        taken = {id(j) for j in batch}
        self.pending = [j for j in self.pending if id(j) not in taken]
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
            await self._run_group(batch)

    async def _run_group(self, group: list[_Job]) -> None:
        started = time.monotonic()
        requests = _request_ids(group)
        log.debug(
            "batch of %d sentences, padded to %d ids, requests %s",
            len(group),
            max(len(j.item.ids) for j in group),
            requests,
        )
        try:
            with self.busy.running():
                results = await asyncio.to_thread(self._synthesize_splitting, [j.item for j in group], requests)
        except Exception as exc:
            log.error("synthesis of %d sentences failed for requests %s: %r", len(group), requests, exc)
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

    def _synthesize_splitting(self, items: list[Item], requests: str = "") -> list[np.ndarray]:
        """Synthesise, halving the batch on CUDA out-of-memory until it fits (one item that does
        not fit is an error for its request)."""
        try:
            return self.synthesize(items)
        except torch.cuda.OutOfMemoryError:
            if len(items) == 1:
                raise
            log.warning("CUDA out of memory on %d sentences (requests %s); splitting", len(items), requests)
            torch.cuda.empty_cache()
            half = len(items) // 2
            return self._synthesize_splitting(items[:half], requests) + self._synthesize_splitting(
                items[half:], requests
            )

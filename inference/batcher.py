"""Dynamic batching behind a bounded queue of requests.

Admission counts requests, the unit a client sends and the autoscaler sizes the fleet in. A request is
queued while any of its sentences waits for a batch, and in flight while its last ones are being
synthesised. At most `max_queue` requests are queued (beyond it: QueueFull, which the server answers
with 429 and Retry-After); a request of any length is admitted when the queue has room. So what a
replica holds is bounded: the sentences of `max_queue` requests wait, and at most `max_batch` requests
per worker are in flight (a request is in flight only once its last sentence is in a running batch).

Synthesis itself works on sentences: a worker takes up to `max_batch` sentences of similar length
whose padded size (longest ids x count) fits `token_budget`, and runs them through the pipeline in one
padded batch (`plan_batch`). Realtime sentences go before batch ones; a batch sentence that has waited
`promote_after_s` counts as realtime (age-based promotion), so a stream of realtime traffic cannot
starve it. A worker waits up to `max_wait_ms` for company only when requests arrive close together
(the last two less than `max_wait_ms` apart) and the batch is not full: a lone request never waits
for nobody.

Each of the `workers` runs its batches on a thread of its own (torch's intra-op pool and glibc's
malloc arena are per thread: rotating through a thread pool paid ~10^4 page faults per synthesis),
with `threads` intra-op threads, or (`cpus` given: the adaptive layout) a width that follows the load:
a batch that is the only work gets every CPU (one client's latency is the pipeline's on all cores),
and runs alone - the other workers take nothing until it ends, since a second synthesis beside a
wide one oversubscribes the cores and stalls both; otherwise each batch gets cpus // workers
(throughput: one synthesis per core). A GPU has one worker (its batches are the parallelism); a CPU
replica has as many as its CPUs hold (settings_contract.CPU_THREADS).

Nobody's work is done for nobody: a request whose caller stopped waiting (a sentence's future
cancelled: the timeout passed or the client went away) or whose synthesis failed leaves the queue at
once, its waiting sentences dropped before they cost anything. A CUDA out-of-memory error splits the
batch and retries; a sticky CUDA error (the device is wedged until the process restarts) is kept in
`wedged`, which the health probes answer with.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
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
# What CUDA says once a context is unusable: every later call fails the same way until the process
# restarts (a kernel's device-side assert, an Xid such as an illegal address or an ECC error).
STICKY_CUDA_ERRORS = ("CUDA error", "device-side assert triggered", "CUBLAS_STATUS_EXECUTION_FAILED")

log = logging.getLogger("voxscale.inference.batcher")


class QueueFull(RuntimeError):
    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the request queue is full; retry in {retry_after:.0f} s")
        self.retry_after = retry_after


class Draining(RuntimeError):
    pass


def sticky_cuda_error(exc: BaseException) -> str | None:
    """Why the GPU is wedged, when `exc` says it is; None for anything a retry may cure (out of memory
    included: it frees what it took) and for errors that are not CUDA's."""
    if not isinstance(exc, RuntimeError) or isinstance(exc, torch.cuda.OutOfMemoryError):
        return None
    message = str(exc).strip()
    if "out of memory" in message or not any(marker in message for marker in STICKY_CUDA_ERRORS):
        return None
    return message.splitlines()[0]


@dataclass(eq=False)
class _Request:
    """One admitted request: queued while a sentence waits for a batch, in flight while the last run."""

    pending: int  # sentences not yet in a batch
    priority: Priority = "realtime"
    request_id: str = ""
    enqueued: float = field(default_factory=time.monotonic)
    running: int = 0  # sentences in the batch being synthesised
    started: bool = False  # a sentence has entered a batch: its queue wait is over
    intact: bool = True  # no sentence failed or dropped: it counts as completed once the last is done

    @property
    def queued(self) -> bool:
        return self.pending > 0

    @property
    def finished(self) -> bool:
        return not self.pending and not self.running


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
        workers: int = 1,
        threads: int | None = None,
        cpus: int | None = None,
    ) -> None:
        self.synthesize = synthesize
        self.metrics = metrics
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000, max_queue
        self.workers, self.threads, self.cpus = max(1, workers), threads, cpus
        self.running = 0  # batches being synthesised now (by as many workers)
        self.wide = False  # a batch given every CPU is running: no other batch starts until it ends
        self._idle: set[int] = set()  # workers waiting for a batch
        self.token_budget, self.promote_after = token_budget, promote_after_s
        self.pending: list[_Job] = []  # sentences not yet in a batch
        self.requests: set[_Request] = set()  # admitted and not finished
        self._arrived = asyncio.Event()
        self._seq = itertools.count()
        self.draining = False
        self.wedged: str | None = None  # a sticky CUDA error: the device fails everything until a restart
        self.batch_seconds = 0.5  # running estimate, for Retry-After
        self._tasks: list[asyncio.Task[None]] = []
        self._executors: list[concurrent.futures.ThreadPoolExecutor] = []
        self._last_arrival = -float("inf")
        self._dense = False  # the last two requests arrived less than max_wait apart: company is likely
        # Children created now, so the series exist (at 0) before the first request and rate() sees it.
        self.busy = BusyClock(metrics.counter(mc.BUSY_SECONDS).labels(gpu_product))
        self.completed = metrics.counter(mc.COMPLETED_REQUESTS).labels(gpu_product)
        metrics.gauge(mc.QUEUE_CAPACITY).set(max_queue)

    def start(self) -> None:
        for n in range(self.workers):
            executor = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"voxscale-synth-{n}", initializer=self._init_thread
            )
            self._executors.append(executor)
            self._tasks.append(asyncio.create_task(self._run(executor, n)))

    def _init_thread(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)

    def _width(self) -> int | None:
        """Intra-op threads for the batch just taken (adaptive layout; None: the worker's own). Every
        CPU when nothing else runs or waits; else the CPUs divided among the workers."""
        if self.cpus is None:
            return None
        if self.running == 0 and not self.pending:
            return self.cpus
        return max(1, self.cpus // self.workers)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for executor in self._executors:
            executor.shutdown(wait=False)
        self._tasks, self._executors = [], []

    @property
    def depth(self) -> int:
        """Requests with a sentence waiting for a batch (what the queue bound and voxscale_queue_depth count)."""
        return sum(r.queued for r in self.requests)

    @property
    def inflight(self) -> int:
        """Requests none of whose sentences waits any more, the last ones being synthesised."""
        return len(self.requests) - self.depth

    def submit(
        self, items: list[Item], priority: Priority = "realtime", request_id: str = ""
    ) -> list[asyncio.Future[np.ndarray]]:
        """Admit a request (all its sentences) or refuse it whole; one future per sentence.

        `priority`: realtime requests are served before batch ones (interactive speech ahead of
        offline book/course generation); a batch request waiting longer than `promote_after_s` is
        promoted to realtime rank, oldest first, so it is served eventually. `request_id` follows
        the request into the batch logs. Cancelling any of the futures withdraws the request."""
        if not items:
            raise ValueError("a request needs at least one sentence")
        if priority not in PRIORITIES:
            raise ValueError(f"priority: {priority!r} is not one of {', '.join(PRIORITIES)}")
        if self.draining:
            raise Draining("the server is shutting down")
        if self.depth >= self.max_queue:
            raise QueueFull(retry_after=self._retry_after())
        loop = asyncio.get_running_loop()
        request = _Request(len(items), priority=priority, request_id=request_id)
        jobs = [_Job(item, loop.create_future(), request, next(self._seq)) for item in items]
        withdraw = functools.partial(self._withdraw_if_cancelled, request)
        for job in jobs:
            job.future.add_done_callback(withdraw)
        self.pending += jobs
        self.requests.add(request)
        self._dense = request.enqueued - self._last_arrival < self.max_wait
        self._last_arrival = request.enqueued
        self._arrived.set()
        self._publish()
        return [job.future for job in jobs]

    def _retry_after(self) -> float:
        """Seconds until the sentences queued now have gone through, at the measured batch time."""
        batches = len(self.pending) / max(self.max_batch, 1) + 1
        return max(1.0, batches * self.batch_seconds / self.workers)

    def _publish(self) -> None:
        self.metrics.gauge(mc.QUEUE_DEPTH).set(self.depth)
        self.metrics.gauge(mc.INFLIGHT).set(self.inflight)

    async def idle(self) -> None:
        """Until everything accepted has been synthesised (used while draining)."""
        while self.requests:
            await asyncio.sleep(0.05)

    def _withdraw_if_cancelled(self, request: _Request, future: asyncio.Future[np.ndarray]) -> None:
        """A cancelled sentence means nobody waits for its request (timed out, or the client left)."""
        if future.cancelled():
            self._drop(request, None)

    def _drop(self, request: _Request, error: BaseException | None) -> None:
        """Take the request's waiting sentences out of the queue before they cost anything; their
        futures are cancelled, or fail with `error` when the request failed."""
        dropped = [j for j in self.pending if j.request is request]
        if dropped:
            self.pending = [j for j in self.pending if j.request is not request]
            request.pending, request.intact = 0, False
            for job in dropped:
                if job.future.done():
                    continue
                if error is None:
                    job.future.cancel()
                else:
                    job.future.set_exception(error)
        self._settle(request)

    def _settle(self, request: _Request) -> None:
        """A request leaves once nothing of it waits or runs; completed only if every sentence was synthesised."""
        if request.finished and request in self.requests:
            self.requests.remove(request)
            if request.intact:
                self.completed.inc()
        self._publish()

    async def _next_batch(self, worker: int = 0) -> list[_Job]:
        """Wait for a sentence, then up to `max_wait_ms` for a full batch's worth, then plan one.

        The idle worker with the lowest number takes it: at low load one thread does all the work,
        its malloc arena and intra-op pool warm for the shapes it sees (two threads taking turns
        on one synthesis after another ran it ~10 % slower, measured in isolation)."""
        self._idle.add(worker)
        try:
            while True:
                while not self.pending or self.wide or min(self._idle) < worker:
                    self._arrived.clear()
                    await self._arrived.wait()
                await self._wait_for_company()
                if self.pending and not self.wide:  # withdrawals may have emptied the queue meanwhile
                    break
        finally:
            self._idle.discard(worker)
        batch = plan_batch(self.pending, self.max_batch, self.token_budget, time.monotonic() - self.promote_after)
        taken = {id(j) for j in batch}
        self.pending = [j for j in self.pending if id(j) not in taken]
        if self.pending:
            self._arrived.set()  # more is waiting: the next idle worker takes it
        return batch

    async def _wait_for_company(self) -> None:
        """Up to `max_wait_ms` for a full batch, when traffic is dense enough for company to come."""
        if not self._dense:
            return
        deadline = time.monotonic() + self.max_wait
        while len(self.pending) < self.max_batch and (timeout := deadline - time.monotonic()) > 0:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), timeout)
            except TimeoutError:
                break

    def _start(self, batch: list[_Job]) -> None:
        """A request's queue wait ends when its first sentence enters a batch."""
        now = time.monotonic()
        for job in batch:
            request = job.request
            request.pending -= 1
            request.running += 1
            if not request.started:
                request.started = True
                self.metrics.histogram(mc.QUEUE_WAIT).observe(now - request.enqueued)
        self._publish()

    def _finish(self, job: _Job) -> None:
        job.request.running -= 1
        self._settle(job.request)

    async def _run(self, executor: concurrent.futures.Executor, worker: int = 0) -> None:
        while True:
            batch = await self._next_batch(worker)
            width = self._width()  # decided before anything else can start: no await in between
            self._start(batch)
            await self._run_group(batch, executor, width)

    async def _run_group(
        self, group: list[_Job], executor: concurrent.futures.Executor | None = None, width: int | None = None
    ) -> None:
        started = time.monotonic()
        requests = _request_ids(group)
        loop = asyncio.get_running_loop()
        self.running += 1
        self.wide = self.workers > 1 and width is not None and width > 1 and width == self.cpus
        try:
            with self.busy.running():
                items = [j.item for j in group]
                results = await loop.run_in_executor(executor, self._synthesize_in, width, items, requests)
        except Exception as exc:
            self._failed(group, exc, requests)
            return
        finally:
            self.running -= 1
            if self.wide:
                self.wide = False
                self._arrived.set()  # the other workers may start again
        elapsed = time.monotonic() - started
        self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * elapsed
        self.metrics.histogram(mc.BATCH_SIZE).observe(len(group))
        width = max(len(j.item.ids) for j in group)
        log.info("batch of %d sentences x %d ids in %.2f s, requests %s", len(group), width, elapsed, requests)
        for job, wav in zip(group, results, strict=True):
            if not job.future.done():
                job.future.set_result(wav)
            self._finish(job)

    def _failed(self, group: list[_Job], exc: Exception, requests: str) -> None:
        """Every request of the batch fails with `exc`, its sentences not yet synthesised with it."""
        log.error("synthesis of %d sentences failed for requests %s: %r", len(group), requests, exc)
        if (reason := sticky_cuda_error(exc)) is not None and self.wedged is None:
            self.wedged = reason
            log.critical("the GPU is wedged (%s): liveness and readiness now fail, so the pod restarts", reason)
        for job in group:
            job.request.intact = False
            if not job.future.done():
                job.future.set_exception(exc)
        for job in group:
            self._drop(job.request, exc)
            self._finish(job)

    def _synthesize_in(self, width: int | None, items: list[Item], requests: str) -> list[np.ndarray]:
        if width is not None:
            torch.set_num_threads(width)
        return self._synthesize_splitting(items, requests)

    def _synthesize_splitting(self, items: list[Item], requests: str = "") -> list[np.ndarray]:
        """Synthesise, halving the batch on CUDA out-of-memory until it fits (one item that does
        not fit is an error for its request).

        The halves run after the handler is left: inside it, the traceback would keep the failed
        attempt's frames, and so its tensors, allocated while the halves need the memory."""
        try:
            return self.synthesize(items)
        except torch.cuda.OutOfMemoryError:
            if len(items) == 1:
                raise
            log.warning("CUDA out of memory on %d sentences (requests %s); splitting", len(items), requests)
        torch.cuda.empty_cache()
        half = len(items) // 2
        return self._synthesize_splitting(items[:half], requests) + self._synthesize_splitting(items[half:], requests)

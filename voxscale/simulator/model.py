"""A queueing model of the inference replicas, stepped on simulated time.

Each ready replica has `slots` parallel service slots (its dynamic batch) and a request holds a slot
for `service_seconds`. Requests wait in one FIFO queue in front of all ready replicas (the Service
balances load); beyond `max_queue` per ready replica they are rejected, as the server answers 429.
Deterministic (fluid) mode is fast enough for a week of 1-second steps; stochastic mode (Poisson
arrivals, memoryless service in sub-steps of an eighth of a service time) approximates an M/M/c
queue at any step size and is checked against Erlang C in the tests, at 50 ms and at 1 s steps.
"""

from __future__ import annotations

import bisect
import collections
import functools
import math
from dataclasses import dataclass, field

import numpy as np

LATENCY_BINS = np.concatenate([np.arange(0, 2, 0.01), np.arange(2, 30, 0.1), np.arange(30, 600, 1.0)])
_BIN_EDGES = LATENCY_BINS.tolist()  # bisect on a list beats numpy for one value at a time
# Stochastic mode's time resolution: sub-steps per mean service time. The geometric service time it
# gives has a squared coefficient of variation of 1 - 1/SUBSTEPS_PER_SERVICE (the exponential's is 1).
SUBSTEPS_PER_SERVICE = 8


@dataclass(frozen=True)
class CapacityModel:
    """What one replica can do. Defaults are labelled assumptions until the inference benchmark
    replaces them (see README): a VITS voice on one GPU, dynamic batch of 8, ~0.5 s per request at
    full batch, so ~16 requests/s per replica, and a 45 s cold start (image pull excluded)."""

    slots: int = 8
    service_seconds: float = 0.5
    max_queue: int = 64
    cold_start_seconds: float = 45.0
    gpus_per_replica: int = 1

    @property
    def rps_per_replica(self) -> float:
        return self.slots / self.service_seconds


@dataclass(frozen=True)
class Substeps:
    """The stochastic mode's sub-steps for a step of `dt` and a mean service time S."""

    k: int  # sub-steps per step
    h: float  # seconds per sub-step
    p_done: float  # chance a busy slot finishes in a sub-step (h / S)
    survive_step: float  # a request in service at the start still is at the end: (1 - p)^k
    survive_arrival: float  # an arrival (uniform sub-step) still in service at the end of the step
    busy_per_running: float  # mean busy slots over the step per request running at its start
    busy_per_arrival: float  # mean busy slots over the step per arrival (no one waiting)
    spread: np.ndarray  # each sub-step's share of the arrivals (uniform; an array: multinomial reads it faster)
    zeros: tuple[int, ...]  # no arrival in any sub-step


@functools.cache
def _substeps(dt: float, service_seconds: float) -> Substeps:
    k = max(1, math.ceil(dt * SUBSTEPS_PER_SERVICE / service_seconds))
    p = min(1.0, dt / k / service_seconds)
    q = 1.0 - p
    # Completions come first in a sub-step, then arrivals; a request counts as busy after both.
    running = sum(q ** (j + 1) for j in range(k)) / k
    arriving = sum((k - m) * q**m for m in range(k)) / k**2
    spread = np.full(k, 1 / k)
    return Substeps(k, dt / k, p, q**k, sum(q**m for m in range(k)) / k, running, arriving, spread, (0,) * k)


# Mix multipliers are rounded to this grid so the sub-step tables stay a handful (they are cached).
COST_GRID = 32


@dataclass
class StepStats:
    arrivals: float = 0.0
    rejected: float = 0.0
    busy_slots: float = 0.0
    queue: float = 0.0


@dataclass
class ReplicaQueue:
    capacity: CapacityModel
    stochastic: bool = False
    seed: int = 0
    queue: collections.deque[list[float]] = field(default_factory=collections.deque)  # [arrival time, count]
    queued: float = 0.0
    in_service: float = 0.0
    latency_counts: list[float] = field(default_factory=lambda: [0.0] * len(_BIN_EDGES))
    recent: collections.deque[tuple[float, int, float]] = field(default_factory=collections.deque)  # time, bin, count
    recent_counts: np.ndarray = field(default_factory=lambda: np.zeros(len(_BIN_EDGES)))  # histogram of `recent`
    served: float = 0.0
    rejected: float = 0.0
    wait_sum: float = 0.0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)
        self.service_seconds = self.capacity.service_seconds  # this step's, with the request mix
        self.service_sum = 0.0  # service seconds of every request served, for the mean latency
        self._pending: dict[int, float] = {}  # this step's latency bins, flushed into `recent` once
        self._bins: dict[float, int] = {}  # latency -> its LATENCY_BINS index

    def set_cost(self, cost: float) -> None:
        """The request mix of the coming steps: service time `cost` x the capacity model's (1 = it),
        rounded to 1/COST_GRID so the stochastic sub-step tables stay few."""
        cost = max(1, round(cost * COST_GRID)) / COST_GRID
        self.service_seconds = self.capacity.service_seconds * cost

    def step(self, now: float, dt: float, rps: float, ready: int, arrivals: float | None = None) -> StepStats:
        """Advance one step of `dt` seconds with `ready` replicas. `arrivals` (requests this step) may be
        drawn beforehand for the whole trace, which is much faster than one Poisson draw per step;
        without it they are drawn here (stochastic) or taken as `rps * dt` (fluid)."""
        if self.stochastic:
            drawn = float(self.rng.poisson(rps * dt)) if arrivals is None else arrivals
            stats = self._step_stochastic(now, dt, int(drawn), ready)
        else:
            stats = self._step_fluid(now, dt, rps * dt if arrivals is None else arrivals, ready)
        self._flush(now)
        return stats

    def _step_fluid(self, now: float, dt: float, arrivals: float, ready: int) -> StepStats:
        """Fluid: a slot starts dt/S requests per step (several when S < dt); none carry over."""
        slots = ready * self.capacity.slots
        self.in_service = 0.0
        free = slots * dt / self.service_seconds
        stats = StepStats(arrivals=arrivals)
        admitted = self._admit(now, arrivals, ready, free)
        stats.rejected = arrivals - admitted
        started = self._start_queued(now, free)
        stats.busy_slots = min(float(slots), started * self.service_seconds / dt)
        stats.queue = self.queued
        return stats

    def _admit(self, at: float, arrivals: float, ready: int, free: float) -> float:
        """Queue what fits (beyond max_queue per ready replica, 429); return how many were admitted."""
        room = ready * self.capacity.max_queue + free - self.queued
        admitted = min(arrivals, max(0.0, room)) if ready > 0 else 0.0
        self.rejected += arrivals - admitted
        if admitted > 0:
            self.queue.append([at, admitted])
            self.queued += admitted
        return admitted

    def _start_queued(self, now: float, free: float) -> float:
        """Start up to `free` queued requests, oldest first, recording their latency; return how many."""
        started = 0.0
        while free > 1e-9 and self.queue:
            head = self.queue[0]
            take = min(free, head[1])
            self._record(now, max(0.0, now - head[0]), take)
            head[1] -= take
            free -= take
            started += take
            self.queued -= take
            if head[1] <= 1e-9:
                self.queue.popleft()
        return started

    def _step_stochastic(self, now: float, dt: float, arrivals: int, ready: int) -> StepStats:
        """Poisson arrivals, memoryless service, in sub-steps of at most S / SUBSTEPS_PER_SERVICE.

        Each busy slot finishes in a sub-step with probability h/S (h the sub-step), a geometric
        service time whose mean is exactly S and whose variance is close to the exponential's; a
        slot freed in a sub-step takes the next request in the same sub-step. Arrivals fall in
        sub-steps uniformly at random, as a Poisson stream's do. When nothing waits and even no
        departure would leave every arrival a free slot, the step is drawn in one go (same law).
        """
        slots = ready * self.capacity.slots
        n = round(self.in_service)
        if not self.queued and n + arrivals <= slots:
            return self._step_unqueued(now, dt, arrivals, n)
        sub = _substeps(dt, self.service_seconds)
        # Where in the step each arrival falls: uniform, as Poisson arrivals are given their count.
        if arrivals and sub.k > 1:
            spread: list[int] | tuple[int, ...] = self.rng.multinomial(arrivals, sub.spread).tolist()
        else:
            spread = (arrivals, *sub.zeros[1:])
        rejected_before = self.rejected
        binomial, p_done, h = self.rng.binomial, sub.p_done, sub.h
        immediate = busy_sum = 0
        for j, a in enumerate(spread):
            if n:
                n -= binomial(n, p_done)
            free = slots - n if n < slots else 0
            if not self.queued:  # nobody waits: the common case, kept cheap
                if a <= free:
                    immediate += a
                    n += a
                else:  # the free slots start at once (wait 0), the rest queue or are refused
                    immediate += free
                    n += free
                    self._admit(now + j * h, float(a - free), ready, 0.0)
            else:
                at = now + j * h
                self._admit(at, float(a), ready, float(free))
                n += round(self._start_queued(at, float(free)))
            busy_sum += n if n < slots else slots
        if immediate:
            self._record(now, 0.0, float(immediate))
        self.in_service = float(n)
        return StepStats(float(arrivals), self.rejected - rejected_before, busy_sum / sub.k, self.queued)

    def _step_unqueued(self, now: float, dt: float, arrivals: int, n: int) -> StepStats:
        """A step in which every arrival finds a free slot: the requests in service at its end are
        the survivors of those at its start and of the arrivals, each drawn in one binomial; the
        busy slots are their expectation over the sub-steps."""
        sub = _substeps(dt, self.service_seconds)
        left = self.rng.binomial(n, sub.survive_step) if n else 0
        if arrivals:
            left += self.rng.binomial(arrivals, sub.survive_arrival)
            self._record(now, 0.0, float(arrivals))
        self.in_service = float(left)
        return StepStats(float(arrivals), 0.0, n * sub.busy_per_running + arrivals * sub.busy_per_arrival, 0.0)

    @property
    def latency_hist(self) -> np.ndarray:
        return np.asarray(self.latency_counts)

    def _record(self, now: float, wait: float, count: float) -> None:
        """Count `count` requests starting service now after `wait`; the window of recent latencies
        gets them when the step ends (`_flush`), one entry per bin and step."""
        latency = wait + self.service_seconds
        idx = self._bins.get(latency)
        if idx is None:  # a handful of distinct latencies recur step after step: look each up once
            idx = self._bins[latency] = min(bisect.bisect_left(_BIN_EDGES, latency), len(_BIN_EDGES) - 1)
        self.latency_counts[idx] += count
        self.served += count
        self.wait_sum += wait * count
        self.service_sum += self.service_seconds * count
        self._pending[idx] = self._pending.get(idx, 0.0) + count

    def _flush(self, now: float) -> None:
        """This step's latencies into the recent window, stamped with the step's start."""
        if not self._pending:
            return
        for idx, count in self._pending.items():
            self.recent.append((now, idx, count))
            self.recent_counts[idx] += count
        self._pending = {}

    def p95_recent(self, now: float, window: float = 60.0) -> float | None:
        """p95 latency of requests that started service in the last `window` seconds (None: none did),
        read from a histogram of the window (the LATENCY_BINS value, as Prometheus reads buckets), kept
        up to date entry by entry so a tick costs one cumulative sum, not a sort of the window."""
        recent, counts = self.recent, self.recent_counts
        while recent and recent[0][0] < now - window:
            _, idx, count = recent.popleft()
            counts[idx] -= count
        if not recent:
            counts[:] = 0.0  # no drift from float subtraction survives an empty window
            return None
        cum = np.cumsum(counts)
        return float(LATENCY_BINS[min(int(np.searchsorted(cum, 0.95 * cum[-1])), len(LATENCY_BINS) - 1)])

    def percentile(self, q: float) -> float:
        total = self.latency_hist.sum()
        if total == 0:
            return 0.0
        idx = int(np.searchsorted(np.cumsum(self.latency_hist), q * total))
        return float(LATENCY_BINS[min(idx, len(LATENCY_BINS) - 1)])

    def served_within(self, seconds: float) -> float:
        """Requests served so far with a latency of at most `seconds`."""
        return float(self.latency_hist[seconds >= LATENCY_BINS].sum())

    def fraction_within(self, seconds: float) -> float:
        total = self.latency_hist.sum()
        if total == 0:
            return 1.0
        return float(self.latency_hist[seconds >= LATENCY_BINS].sum() / total)


def erlang_c_wait(arrival_rps: float, service_seconds: float, servers: int) -> float:
    """Mean time in queue of an M/M/c queue (Erlang C)."""
    a = arrival_rps * service_seconds  # offered load in erlangs
    if a >= servers:
        return math.inf
    rho = a / servers
    terms = sum(a**k / math.factorial(k) for k in range(servers))
    last = a**servers / (math.factorial(servers) * (1 - rho))
    p_wait = last / (terms + last)
    return p_wait / (servers / service_seconds - arrival_rps)


class Fleet:
    """The replicas asked for and when each turns Ready, a cold start after it was asked for; on a
    scale-down the newest (possibly still starting) pods go first. The one fleet model the simulator
    and the engine's tests step; `ready` is recounted only when a pod's time comes or the count changes."""

    def __init__(self, replicas: int, cold_start_seconds: float) -> None:
        self.cold_start = cold_start_seconds
        self.ready_at: list[float] = [0.0] * replicas
        self.replicas = self.ready = replicas
        self.next_ready = math.inf  # when the next starting pod turns Ready

    def tick(self, now: float) -> int:
        if now >= self.next_ready:
            self._recount(now)
        return self.ready

    def scale(self, now: float, want: int) -> None:
        if want > self.replicas:
            self.ready_at += [now + self.cold_start] * (want - self.replicas)
        else:
            self.ready_at = sorted(self.ready_at)[:want]  # the newest (possibly still starting) pods go first
        self.replicas = want
        self._recount(now)

    def _recount(self, now: float) -> None:
        self.ready = sum(1 for t in self.ready_at if t <= now)
        self.next_ready = min((t for t in self.ready_at if t > now), default=math.inf)

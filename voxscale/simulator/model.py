"""A queueing model of the inference replicas, stepped on simulated time.

Each ready replica has `slots` parallel service slots (its dynamic batch) and a request holds a slot
for `service_seconds`. Requests wait in one FIFO queue in front of all ready replicas (the Service
balances load); beyond `max_queue` per ready replica they are rejected, as the server answers 429.
Deterministic (fluid) mode is fast enough for a week of 1-second steps; stochastic mode (Poisson
arrivals, exponential service) is an M/M/c queue and is checked against Erlang C in the tests.
"""

from __future__ import annotations

import bisect
import collections
import math
from dataclasses import dataclass, field

import numpy as np

LATENCY_BINS = np.concatenate([np.arange(0, 2, 0.01), np.arange(2, 30, 0.1), np.arange(30, 600, 1.0)])
_BIN_EDGES = LATENCY_BINS.tolist()  # bisect on a list beats numpy for one value at a time


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
    recent: collections.deque[tuple[float, float, float]] = field(default_factory=collections.deque)
    served: float = 0.0
    rejected: float = 0.0
    wait_sum: float = 0.0

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def step(self, now: float, dt: float, rps: float, ready: int) -> StepStats:
        cap = self.capacity
        slots = ready * cap.slots
        if self.stochastic:
            # Memoryless service in discrete time: each busy slot finishes in a step with probability
            # dt/S, a geometric service time whose mean is exactly S (needs dt well below S).
            if self.in_service > 0:
                p_done = min(1.0, dt / cap.service_seconds)
                self.in_service -= float(self.rng.binomial(round(self.in_service), p_done))
            arrivals = float(self.rng.poisson(rps * dt))
            free = max(0.0, slots - self.in_service)  # after a scale-down, running requests drain
        else:
            # Fluid: a slot starts dt/S requests per step (several when S < dt); none carry over.
            arrivals = rps * dt
            self.in_service = 0.0
            free = slots * dt / cap.service_seconds
        stats = StepStats(arrivals=arrivals)
        limit = ready * cap.max_queue
        admitted = min(arrivals, max(0.0, limit + free - self.queued)) if ready > 0 else 0.0
        stats.rejected = arrivals - admitted
        self.rejected += stats.rejected
        if admitted > 0:
            self.queue.append([now, admitted])
            self.queued += admitted
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
        if self.stochastic:
            self.in_service += started
            stats.busy_slots = self.in_service
        else:
            stats.busy_slots = min(float(slots), started * cap.service_seconds / dt)
        stats.queue = self.queued
        return stats

    @property
    def latency_hist(self) -> np.ndarray:
        return np.asarray(self.latency_counts)

    def _record(self, now: float, wait: float, count: float) -> None:
        latency = wait + self.capacity.service_seconds
        self.latency_counts[min(bisect.bisect_left(_BIN_EDGES, latency), len(_BIN_EDGES) - 1)] += count
        self.served += count
        self.wait_sum += wait * count
        self.recent.append((now, latency, count))

    def p95_recent(self, now: float, window: float = 60.0) -> float | None:
        """p95 latency of requests that started service in the last `window` seconds (None: none did)."""
        while self.recent and self.recent[0][0] < now - window:
            self.recent.popleft()
        if not self.recent:
            return None
        lat = np.fromiter((r[1] for r in self.recent), float)
        w = np.fromiter((r[2] for r in self.recent), float)
        order = np.argsort(lat)
        cum = np.cumsum(w[order])
        return float(lat[order][np.searchsorted(cum, 0.95 * cum[-1])])

    def percentile(self, q: float) -> float:
        total = self.latency_hist.sum()
        if total == 0:
            return 0.0
        idx = int(np.searchsorted(np.cumsum(self.latency_hist), q * total))
        return float(LATENCY_BINS[min(idx, len(LATENCY_BINS) - 1)])

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

"""A model of Knative's Pod Autoscaler (KPA) with its defaults: the second peer voxscale is measured
against, the autoscaler built for bursts.

What carries over from Knative (config-autoscaler defaults and pkg/autoscaler/scaling/autoscaler.go):
- the metric is concurrency (requests in flight, served or waiting), averaged over a 60 s stable
  window and a 6 s panic window (10 % of it), read every 2 s tick;
- the target per pod is containerConcurrency x 70 % (container-concurrency-target-percentage); here
  containerConcurrency is the replica's batch slots, the same per-pod capacity every contender uses;
- desired = ceil(window average / target) for each window, kept within [floor(ready / 2),
  ceil(1000 x ready)] (max-scale-down-rate 2, max-scale-up-rate 1000; ready counted as at least 1);
- panic starts when the panic window's count reaches 200 % of the ready pods; while panicking the
  count is max(stable, panic) and never goes down; each tick over the threshold renews the panic
  clock, and panic ends only after a full stable window below it;
- scale-down-delay 0 (the default): no delay window.

Where it is a model, not Knative:
- the queue-proxy's per-second scrapes are the simulator's signal at each 2 s tick (busy slots of
  the last step plus the queue), averaged over the samples in each window;
- the activator does not buffer: requests beyond a replica's queue are refused as for every other
  contender (target-burst-capacity is not modelled);
- the KPA scrapes the pods, not Prometheus, so a Prometheus outage does not touch it;
- minScale / maxScale are the manifest's min / max, and the manifest's schedule floors raise minScale
  as a user would by patching the annotation from a CronJob (Knative has no schedules of its own).
"""

from __future__ import annotations

import collections
import datetime as dt
import math
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from voxscale.operator.policy import ScalingPolicy
from voxscale.simulator.model import CapacityModel
from voxscale.simulator.policies import Signals

STABLE_WINDOW_S = 60.0
PANIC_WINDOW_PERCENT = 10.0
PANIC_THRESHOLD = 2.0  # 200 %
MAX_SCALE_UP_RATE = 1000.0
MAX_SCALE_DOWN_RATE = 2.0
TARGET_UTILIZATION = 0.7
TICK_S = 2.0


@dataclass
class _Averager:
    """The mean of the samples taken in the last `seconds` (Knative's windowed average)."""

    seconds: float
    samples: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)
    total: float = 0.0

    def add(self, t: float, value: float) -> float:
        self.samples.append((t, value))
        self.total += value
        while self.samples and self.samples[0][0] <= t - self.seconds:
            self.total -= self.samples.popleft()[1]
        return self.total / len(self.samples)


@dataclass
class KpaModel:
    """Knative's KPA with its defaults (see the module docstring for where it is a model)."""

    policy: ScalingPolicy
    capacity: CapacityModel
    floors: np.ndarray | None = None  # the manifest's schedule floor at each step of the trace
    start_ts: float = 0.0
    step_seconds: float = 1.0
    name: str = "kpa (model)"
    interval_seconds: float = TICK_S
    reads_latency: ClassVar[bool] = False  # concurrency only: the simulator skips its p95
    panic_since: float | None = None  # last tick over the panic threshold (None: stable mode)
    max_panic_pods: int = 0
    _stable: _Averager = field(default_factory=lambda: _Averager(STABLE_WINDOW_S))
    _panic: _Averager = field(default_factory=lambda: _Averager(STABLE_WINDOW_S * PANIC_WINDOW_PERCENT / 100))

    @property
    def target(self) -> float:
        """Concurrency per pod the KPA aims at: the batch slots at 70 %."""
        return self.capacity.slots * TARGET_UTILIZATION

    def desired(self, now: dt.datetime, replicas: int, ready: int, signals: Signals) -> int:
        t = now.timestamp()
        busy = (signals.gpu_percent or 0.0) / 100 * ready * self.capacity.slots
        concurrency = busy + signals.queue
        stable, panic = self._stable.add(t, concurrency), self._panic.add(t, concurrency)
        want = self.decide(t, ready, stable, panic)
        return min(max(want, self._floor(t)), self.policy.max_replicas)

    def decide(self, t: float, ready: int, stable: float, panic: float) -> int:
        """One tick of the KPA's Scale(): stable and panic counts, rate limits, panic mode."""
        pods = max(1.0, float(ready))
        up, down = math.ceil(MAX_SCALE_UP_RATE * pods), math.floor(pods / MAX_SCALE_DOWN_RATE)
        stable_pods, panic_pods = math.ceil(stable / self.target), math.ceil(panic / self.target)
        stable_want = int(min(max(stable_pods, down), up))
        panic_want = int(min(max(panic_pods, down), up))
        over = panic_pods / pods >= PANIC_THRESHOLD
        if over:
            self.panic_since = t
        elif self.panic_since is not None and t - self.panic_since > STABLE_WINDOW_S:
            self.panic_since, self.max_panic_pods = None, 0
        if self.panic_since is None:
            return stable_want
        self.max_panic_pods = max(self.max_panic_pods, stable_want, panic_want)  # never down in panic
        return self.max_panic_pods

    def _floor(self, t: float) -> int:
        floor = self.policy.min_replicas
        if self.floors is not None and len(self.floors):
            i = min(max(round((t - self.start_ts) / self.step_seconds), 0), len(self.floors) - 1)
            floor = max(floor, int(self.floors[i]))
        return floor

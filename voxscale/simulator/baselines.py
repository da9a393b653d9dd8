"""The baselines voxscale is measured against: a static fleet, a model of KEDA + HPA given every signal
in the manifest, and a clairvoyant oracle that bounds GPU-hours from below.

Each follows the `Autoscaler` protocol of policies.py: it sees the simulated signals at its own
cadence and returns a replica count.
"""

from __future__ import annotations

import collections
import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

import numpy as np

from voxscale.operator.engine import schedule_floor_at
from voxscale.operator.policy import ScalingPolicy, Schedule, Trigger
from voxscale.operator.queueing import replicas_for_slo
from voxscale.simulator.model import CapacityModel
from voxscale.simulator.policies import Signals
from voxscale.simulator.traces import Trace


@dataclass
class StaticAutoscaler:
    """A fixed fleet: what a team runs when it does not autoscale (sized for the peak, usually)."""

    replicas: int
    name: str = "static"
    interval_seconds: float = 60.0
    reads_latency: ClassVar[bool] = False  # the simulator skips its p95

    def desired(self, now: dt.datetime, replicas: int, ready: int, signals: Signals) -> int:
        return self.replicas


# --- KEDA + HPA ------------------------------------------------------------------------------------


Reader = Callable[[dt.datetime, Signals, int], float | None]


class TargetType(StrEnum):
    AVERAGE_VALUE = "AverageValue"  # the metric is a total; the target is per replica
    VALUE = "Value"  # the metric is compared as is; the ratio scales the ready pods


@dataclass(frozen=True)
class HpaMetric:
    """One external metric of the HPA that KEDA creates, as a KEDA user would write it.

    `read(now, signals, ready)` returns the query's value, or None for an empty result (KEDA's
    ignoreNullValues: true, the default, turns that into 0). `prometheus` is False for the cron
    scaler, which a metrics outage does not touch.
    """

    name: str
    target_type: TargetType
    threshold: float
    read: Reader
    prometheus: bool = True

    def value(self, now: dt.datetime, s: Signals, ready: int) -> float | None:
        """The metric's value, or None when it cannot be had: Prometheus unreachable makes KEDA's
        scaler fail (an error, not an empty result), and the HPA marks the metric invalid."""
        if self.prometheus and not s.metrics_up:
            return None
        v = self.read(now, s, ready)
        return 0.0 if v is None else v  # ignoreNullValues: an empty result reads 0


def hpa_replicas(metric_type: TargetType, value: float, threshold: float, current: int, tolerance: float) -> int:
    """The HPA's replica count for one external metric (kube-controller-manager's replica calculator).

    AverageValue: ratio = value / (threshold * current); outside the tolerance, ceil(value / threshold).
    Value: ratio = value / threshold; outside the tolerance, ceil(ratio * current). Within the
    tolerance (|ratio - 1| <= tolerance) the current count stands. From 0 replicas there is no
    tolerance (scale from zero).
    """
    if metric_type is TargetType.AVERAGE_VALUE:
        if current == 0:
            return math.ceil(value / threshold)
        ratio = value / (threshold * current)
        return current if abs(ratio - 1) <= tolerance else math.ceil(value / threshold)
    ratio = value / threshold
    if current == 0:
        return math.ceil(ratio)
    return current if abs(ratio - 1) <= tolerance else math.ceil(ratio * current)


def _gpu_total(now: dt.datetime, s: Signals, ready: int) -> float | None:
    return None if s.gpu_percent is None else s.gpu_percent * ready  # sum over ready pods


def _queue(now: dt.datetime, s: Signals, ready: int) -> float | None:
    return s.queue


def _p95(now: dt.datetime, s: Signals, ready: int) -> float | None:
    return s.p95_seconds


def _arrivals(now: dt.datetime, s: Signals, ready: int) -> float | None:
    return s.arrival_rps


def _threshold(t: Trigger) -> float | None:
    return t.target or t.scale_up_above


def _slo_metrics(t: Trigger) -> list[HpaMetric]:
    """A KEDA user's translation of an slo trigger: request rate against 80 % of one replica's
    capacity (AverageValue), plus p95 latency against the objective (Value)."""
    capacity = getattr(t, "capacity_rps", None)
    latency = getattr(t, "latency_seconds", None)
    if capacity is None or latency is None:
        raise ValueError(f"trigger {t.name!r} of type slo carries no capacity_rps / latency_seconds")
    return [
        HpaMetric(f"{t.name}:rate", TargetType.AVERAGE_VALUE, 0.8 * float(capacity), _arrivals),
        HpaMetric(f"{t.name}:p95", TargetType.VALUE, float(latency), _p95),
    ]


def keda_metrics(policy: ScalingPolicy) -> list[HpaMetric]:
    """One HPA metric per voxscale trigger KEDA can express (promql triggers query series the
    simulator does not model and are left out), each at its `target`, else its `scaleUpAbove`."""
    readers: dict[str, tuple[TargetType, Reader]] = {
        "gpuUtilization": (TargetType.AVERAGE_VALUE, _gpu_total),
        "queueLength": (TargetType.AVERAGE_VALUE, _queue),
        "latencyP95": (TargetType.VALUE, _p95),
    }
    out: list[HpaMetric] = []
    for t in policy.triggers:
        kind = t.type.value
        threshold = _threshold(t)
        if kind == "slo":
            out += _slo_metrics(t)
        elif kind in readers and threshold:
            target_type, read = readers[kind]
            out.append(HpaMetric(t.name, target_type, float(threshold), read))
    return out


def cron_metrics(policy: ScalingPolicy) -> list[HpaMetric]:
    """KEDA's cron scaler per schedule: the metric reads desiredReplicas inside the window (opened at
    the pre-warm, as a user would shift the cron start) and 1 outside, against AverageValue 1. It is
    a metric like any other, max-combined, subject to tolerance and behavior: not a floor."""
    return [
        HpaMetric(f"cron:{sched.name}", TargetType.AVERAGE_VALUE, 1.0, _cron_reader(sched), prometheus=False)
        for sched in policy.schedules
    ]


def _cron_reader(sched: Schedule) -> Reader:
    def read(now: dt.datetime, s: Signals, ready: int) -> float:
        return float(sched.min_replicas if sched.active_window(now) else 1)

    return read


@dataclass
class KedaHpaModel:
    """A model of KEDA + HPA (autoscaling/v2) configured with every signal in the manifest, following
    their documented algorithms with default settings; a model, not the real controllers.

    - The HPA syncs every 15 s; KEDA queries Prometheus at each sync (useCachedMetrics: false, the
      default), so every value is fresh.
    - One external metric per trigger (`keda_metrics`): GPU as the sum of per-pod percent with an
      AverageValue target (desired = ceil(avg * ready / threshold)); the queue summed, AverageValue
      (ceil(queue / threshold)); p95 latency as a Value target (ceil(current * p95 / threshold)); an slo
      trigger as a request-rate trigger at 80 % of one replica's capacity plus a p95 Value trigger.
      Each schedule is a cron scaler metric (`cron_metrics`).
    - Tolerance 0.1 per metric; the highest count over metrics wins; clamped to [min, max].
    - Behavior defaults: scale-up without stabilisation, at most max(4 pods, 100 %) per 15 s; scale-down
      to the highest recommendation of the last 300 s, at most 100 % per 15 s.
    - ignoreNullValues: true (KEDA's default): an empty result reads 0; with no ready pod GPU and p95
      read 0. An unreachable Prometheus is different: KEDA's Prometheus scaler returns an error, the
      HPA marks that metric invalid and, as its replica calculator does, keeps the current count when
      every metric is invalid or when the valid ones would scale down (the cron scaler stays valid and
      may still scale up). KEDA's `fallback` is off by default and not modelled.
    """

    policy: ScalingPolicy
    name: str = "keda+hpa (model)"
    interval_seconds: float = 15.0
    tolerance: float = 0.1
    up_pods: int = 4
    up_percent: float = 100.0
    down_percent: float = 100.0
    period_seconds: float = 15.0
    down_window_seconds: float = 300.0
    metrics: list[HpaMetric] = field(default_factory=list)
    _recs: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    _events: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)

    def __post_init__(self) -> None:
        if not self.metrics:
            self.metrics = keda_metrics(self.policy) + cron_metrics(self.policy)

    def desired(self, now: dt.datetime, replicas: int, ready: int, signals: Signals) -> int:
        t = now.timestamp()
        rec = self.recommend(now, replicas, ready, signals)
        if rec is None:
            return replicas  # the HPA's reconcile stops at the metrics error: nothing recorded, no change
        stable = self._stabilise(t, rec, replicas)
        final = self._rate_limit(t, stable, replicas)
        if final != replicas:
            self._events.append((t, final - replicas))
        return final

    def recommend(self, now: dt.datetime, replicas: int, ready: int, signals: Signals) -> int | None:
        """The metrics' count before behavior: the highest over valid metrics (current with none),
        clamped; None where the HPA gives up on invalid metrics (all invalid, or some invalid while
        the valid ones would scale down)."""
        values = [(m, m.value(now, signals, ready)) for m in self.metrics]
        counts = [
            hpa_replicas(m.target_type, v, m.threshold, replicas, self.tolerance) for m, v in values if v is not None
        ]
        invalid = len(values) - len(counts)
        rec = max(counts, default=replicas)
        if values and (invalid == len(values) or (invalid and rec < replicas)):
            return None
        return min(max(rec, self.policy.min_replicas), self.policy.max_replicas)

    def _stabilise(self, t: float, rec: int, current: int) -> int:
        """Scale-up takes the recommendation at once; scale-down the highest of the last 300 s."""
        self._recs.append((t, rec))
        while self._recs and self._recs[0][0] <= t - self.down_window_seconds:
            self._recs.popleft()
        highest = max(r for _, r in self._recs)
        return rec if rec >= current else min(current, highest)

    def _rate_limit(self, t: float, desired: int, current: int) -> int:
        """HPA behavior policies over the last period, counted from the replicas at its start."""
        while self._events and self._events[0][0] <= t - self.period_seconds:
            self._events.popleft()
        lo, hi = self.policy.min_replicas, self.policy.max_replicas
        if desired > current:
            start = current - sum(d for _, d in self._events if d > 0)
            limit = max(start + self.up_pods, math.ceil(start * (1 + self.up_percent / 100)), current)
            return max(lo, min(desired, limit, hi))
        if desired < current:
            start = current - sum(d for _, d in self._events if d < 0)
            limit = math.floor(start * (1 - self.down_percent / 100))
            return min(hi, max(desired, limit, lo))
        return min(max(desired, lo), hi)


# --- the oracle ------------------------------------------------------------------------------------


def slo_sizing(rates: np.ndarray, capacity_rps: float, slots: int, slo_seconds: float) -> np.ndarray:
    """`replicas_for_slo` for every rate, never below it and at most one above.

    Sizing grows with the rate, so it is found once per replica count (the highest rate n replicas
    still serve, by bisection) and looked up for all rates at once, instead of one call per step.
    """
    if rates.size == 0:
        return np.zeros(0, dtype=np.int64)
    top = replicas_for_slo(float(rates.max()), capacity_rps, slots, slo_seconds)
    bounds = [_highest_rate_served(n, capacity_rps, slots, slo_seconds) for n in range(1, top)]
    counts = np.searchsorted(np.asarray(bounds, dtype=float), rates, side="left") + 1
    return np.where(rates > 0, counts, 0).astype(np.int64)


def _highest_rate_served(n: int, capacity_rps: float, slots: int, slo_seconds: float) -> float:
    """A rate n replicas serve within the SLO, within 1e-9 relative of the highest such rate."""
    lo, hi = 0.0, n * capacity_rps  # at n x capacity the fleet is unstable: it needs more than n
    while hi - lo > 1e-9 * hi:
        mid = (lo + hi) / 2
        if replicas_for_slo(mid, capacity_rps, slots, slo_seconds) <= n:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class OracleAutoscaler:
    """A clairvoyant lower bound for GPU-hours: it knows the trace's true rate ahead of time, pays the
    cold start, and sizes exactly to the SLO (on a trace with a request mix, for the rate of
    model-sized requests, rps x cost: optimistic when requests are longer, as a bound should be).
    At each evaluation (every 5 s) it asks for the largest
    M/M/c sizing over the rates until its next pods could be Ready (now to now + cold start + 5 s), and
    it scales down at once. It keeps to what the manifest's owner fixed - min, max and the schedules'
    floors, which every contender honours - so the gap to it is the autoscaler's own. No real
    autoscaler can do better on cost at the same SLO under the same floors."""

    plan: np.ndarray  # replicas wanted at each step of the trace
    start_ts: float
    step_seconds: float
    name: str = "oracle"
    interval_seconds: float = 5.0
    reads_latency: ClassVar[bool] = False  # the simulator skips its p95

    @classmethod
    def for_trace(
        cls,
        trace: Trace,
        capacity: CapacityModel,
        slo_seconds: float,
        min_replicas: int,
        max_replicas: int,
        floors: np.ndarray | None = None,
        interval_seconds: float = 5.0,
    ) -> OracleAutoscaler:
        """`floors`: the manifest's schedule floor at each step of the trace (see `schedule_floors`)."""
        need = slo_sizing(trace.work, capacity.rps_per_replica, capacity.slots, slo_seconds)
        ahead = math.ceil((capacity.cold_start_seconds + interval_seconds) / trace.step_seconds)
        wanted = forward_max(need, ahead)
        if floors is not None:
            wanted = np.maximum(wanted, floors)
        plan = np.clip(wanted, min_replicas, max_replicas)
        return cls(plan, trace.start.timestamp(), trace.step_seconds, interval_seconds=interval_seconds)

    def desired(self, now: dt.datetime, replicas: int, ready: int, signals: Signals) -> int:
        i = round((now.timestamp() - self.start_ts) / self.step_seconds)
        return int(self.plan[min(max(i, 0), len(self.plan) - 1)])


def schedule_floors(trace: Trace, policy: ScalingPolicy, every_seconds: float = 5.0) -> np.ndarray:
    """The engine's schedule floor (pre-warm included) at each step of the trace, read every
    `every_seconds` of trace time - the cadence the engine and the oracle decide at."""
    floors = np.zeros(len(trace.rps), dtype=np.int64)
    if not policy.schedules:
        return floors
    stride = max(1, round(every_seconds / trace.step_seconds))
    for i in range(0, len(floors), stride):
        now = trace.start + dt.timedelta(seconds=i * trace.step_seconds)
        floors[i : i + stride] = schedule_floor_at(policy, now)[0]
    return floors


def forward_max(values: np.ndarray, ahead: int) -> np.ndarray:
    """out[i] = max(values[i : i + ahead + 1]) (the window shortens at the end)."""
    if values.size == 0:
        return values.copy()
    padded = np.concatenate([values, np.full(ahead, values.min())])
    result: np.ndarray = np.lib.stride_tricks.sliding_window_view(padded, ahead + 1).max(axis=1)
    return result

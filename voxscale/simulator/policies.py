"""The autoscalers a simulation compares: voxscale's own engine, static fleets, and a model of
KEDA + HPA. Each sees the same simulated metrics at its own cadence and returns a replica count."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from voxscale.operator.engine import Decision, History, Metrics, Observed, decide
from voxscale.operator.forecast import RateHistory
from voxscale.operator.policy import ScalingPolicy, TriggerType


@dataclass(frozen=True)
class Signals:
    """What Prometheus would report at one instant."""

    gpu_percent: float | None  # average over ready pods; None with no ready pod
    queue: float
    p95_seconds: float | None
    # Requests arriving per second at the pods' door, refused ones (429) included, averaged over the
    # operator's rate window (queries.DEMAND_WINDOW); None when no pod is Ready to count them.
    arrival_rps: float | None = None
    # The same over the last quarter of that window: a burst shows here first.
    arrival_recent_rps: float | None = None
    # One replica's capacity (requests/s) as the pods measure it (served / busy time), only when they
    # were busy enough for the figure to mean something this tick; None otherwise.
    capacity_rps: float | None = None
    # Input characters per second arriving, over the rate window (the unit of work); None as arrival_rps.
    arrival_chars_rps: float | None = None
    # False during a metrics outage: a real autoscaler's queries come back empty.
    metrics_up: bool = True
    # Seconds a new pod takes to turn Ready, as the operator observes on the pods.
    pod_start_seconds: float | None = None


class Autoscaler(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def interval_seconds(self) -> float: ...

    def desired(self, now: dt.datetime, replicas: int, ready: int, signals: Signals) -> int: ...


def signals_to_metrics(policy: ScalingPolicy, s: Signals, history: RateHistory | None = None) -> Metrics:
    """The engine's input from simulated signals, trigger by trigger (None stays missing, never zero).

    During a metrics outage every query fails, as when Prometheus is unreachable. The SLO model's
    inputs are filled in for the implicit objective too (`policy.queried`), as the operator queries
    the door counters for every TTSDeployment.
    """
    if not s.metrics_up:
        return Metrics(error="Prometheus unreachable (simulated outage)", history=history)
    values: dict[str, float] = {}
    for t in policy.queried:
        if t.type is TriggerType.GPU_UTILIZATION and s.gpu_percent is not None:
            values[t.name] = s.gpu_percent
        elif t.type is TriggerType.QUEUE_LENGTH:
            values[t.name] = s.queue
        elif t.type is TriggerType.LATENCY_P95:
            values[t.name] = s.p95_seconds if s.p95_seconds is not None else 0.0
        elif t.type is TriggerType.SLO and s.arrival_rps is not None:
            values[t.name] = s.arrival_rps
            values[f"{t.name}.backlog"] = s.queue
            if s.arrival_recent_rps is not None:
                values[f"{t.name}.recent"] = s.arrival_recent_rps
            if s.capacity_rps is not None:
                values[f"{t.name}.capacity"] = s.capacity_rps
            if s.arrival_chars_rps is not None:
                values[f"{t.name}.characters"] = s.arrival_chars_rps
            if s.p95_seconds is not None:
                values[f"{t.name}.p95"] = s.p95_seconds
    return Metrics(values, history=history)


@dataclass
class ArrivalRecorder:
    """The arrival-rate history the operator would read back from Prometheus: one sample a minute
    (the mean of what the autoscaler saw in it), NaN for minutes without data."""

    start: dt.datetime | None = None
    step_seconds: float = 60.0
    _rps: np.ndarray = field(default_factory=lambda: np.full(1024, np.nan))
    _n: int = 0
    _bucket: list[float] = field(default_factory=list)

    def add(self, now: dt.datetime, rps: float | None) -> None:
        if self.start is None:
            self.start = now
        index = int((now - self.start).total_seconds() // self.step_seconds)
        while self._n < index:  # close the minutes that have passed
            self._store(float(np.mean(self._bucket)) if self._bucket else math.nan)
            self._bucket = []
        if rps is not None:
            self._bucket.append(rps)

    def _store(self, value: float) -> None:
        if self._n == len(self._rps):
            self._rps = np.concatenate([self._rps, np.full(len(self._rps), np.nan)])
        self._rps[self._n] = value
        self._n += 1

    def history(self) -> RateHistory | None:
        if self.start is None:
            return None
        return RateHistory(self.start, self.step_seconds, self._rps[: self._n])


@dataclass
class VoxscaleAutoscaler:
    """The operator's engine itself, the very `decide()` the operator runs.

    It sees what the operator would: the signals (pod start times included) and, for the forecast
    floor, the arrival history recorded so far (a trace's first day is history for the second).
    """

    policy: ScalingPolicy
    name: str = "voxscale"
    history: History = field(default_factory=History)
    arrivals: ArrivalRecorder = field(default_factory=ArrivalRecorder)
    last: Decision | None = None

    @property
    def interval_seconds(self) -> float:
        return self.policy.interval.total_seconds()

    def desired(self, now: dt.datetime, replicas: int, ready: int, signals: Signals) -> int:
        self.arrivals.add(now, signals.arrival_rps if signals.metrics_up else None)
        metrics = signals_to_metrics(self.policy, signals, self.arrivals.history())
        starts = (signals.pod_start_seconds,) * ready if signals.pod_start_seconds is not None else ()
        observed = Observed(replicas, ready, starts)
        d = decide(self.policy, observed, metrics, now, self.history)
        self.history, self.last = d.history, d
        return d.desired

"""The autoscalers a simulation compares: voxscale's own engine, static fleets, and a model of
KEDA + HPA. Each sees the same simulated metrics at its own cadence and returns a replica count."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Protocol

from voxscale.operator.engine import History, Metrics, Observed, decide
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
    # One replica's capacity (requests/s) as the pods measure it (served / busy time), only when they
    # were busy enough for the figure to mean something this tick; None otherwise.
    capacity_rps: float | None = None
    # False during a metrics outage: a real autoscaler's queries come back empty.
    metrics_up: bool = True


class Autoscaler(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def interval_seconds(self) -> float: ...

    def desired(self, now: dt.datetime, replicas: int, ready: int, signals: Signals) -> int: ...


def signals_to_metrics(policy: ScalingPolicy, s: Signals) -> Metrics:
    """The engine's input from simulated signals, trigger by trigger (None stays missing, never zero)."""
    values: dict[str, float] = {}
    for t in policy.triggers:
        if t.type is TriggerType.GPU_UTILIZATION and s.gpu_percent is not None:
            values[t.name] = s.gpu_percent
        elif t.type is TriggerType.QUEUE_LENGTH:
            values[t.name] = s.queue
        elif t.type is TriggerType.LATENCY_P95:
            values[t.name] = s.p95_seconds if s.p95_seconds is not None else 0.0
    return Metrics(values)


@dataclass
class VoxscaleAutoscaler:
    """The operator's engine itself, the very `decide()` the operator runs."""

    policy: ScalingPolicy
    name: str = "voxscale"
    history: History = field(default_factory=History)
    events: int = 0

    @property
    def interval_seconds(self) -> float:
        return self.policy.interval.total_seconds()

    def desired(self, now: dt.datetime, replicas: int, ready: int, signals: Signals) -> int:
        d = decide(self.policy, Observed(replicas, ready), signals_to_metrics(self.policy, signals), now, self.history)
        self.history = d.history
        return d.desired


@dataclass
class StaticAutoscaler:
    replicas: int
    name: str = "static"
    interval_seconds: float = 60.0

    def desired(self, now: dt.datetime, replicas: int, ready: int, signals: Signals) -> int:
        return self.replicas


@dataclass
class HpaKedaModel:
    """A model of KEDA + HPA with their documented defaults, on GPU utilisation.

    KEDA polls the metric every 30 s (pollingInterval) and the HPA acts on the latest poll every
    15 s (--horizontal-pod-autoscaler-sync-period): desired = ceil(ready * value / target), ignored
    within a 0.1 tolerance; scale-up at most max(4 pods, 100 %) per 15 s; scale-down to the highest
    recommendation of the last 300 s (stabilisation window), up to 100 % per 15 s. A model of the
    algorithms, not the real controllers.
    """

    target_percent: float
    min_replicas: int
    max_replicas: int
    name: str = "keda+hpa (model)"
    interval_seconds: float = 15.0
    poll_seconds: float = 30.0
    tolerance: float = 0.1
    stabilization_seconds: float = 300.0
    _last_poll: float = -math.inf
    _polled: float | None = None
    _recs: list[tuple[float, int]] = field(default_factory=list)

    def desired(self, now: dt.datetime, replicas: int, ready: int, signals: Signals) -> int:
        t = now.timestamp()
        if t - self._last_poll >= self.poll_seconds:
            self._last_poll, self._polled = t, signals.gpu_percent
        rec = replicas
        if self._polled is not None and ready > 0:
            ratio = self._polled / self.target_percent
            if abs(ratio - 1) > self.tolerance:
                rec = math.ceil(ready * ratio)
        rec = min(max(rec, self.min_replicas), self.max_replicas)
        self._recs = [(ts, n) for ts, n in self._recs if t - ts <= self.stabilization_seconds] + [(t, rec)]
        if rec > replicas:
            return min(rec, replicas + max(4, replicas))
        return max(n for _, n in self._recs) if rec < replicas else replicas

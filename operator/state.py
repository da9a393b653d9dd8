"""What the scaling engine reads, remembers and answers: its inputs (Observed, Metrics), its memory
between ticks (History) and its result (Decision). Plain data, no decisions: engine.py decides,
status.py and the operator's history store serialise, and every name here is re-exported by engine.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from voxscale.operator import forecast as fc
from voxscale.operator.capacity import Learnt, Unit
from voxscale.operator.policy import ScalingPolicy, Trigger


class Reason(StrEnum):
    """Why the count is what it is: identifiers for code and metrics; the message is the prose."""

    TRIGGER = "Trigger"
    SCHEDULE = "Schedule"
    FORECAST = "Forecast"
    BOUNDS = "Bounds"
    PAUSED = "Paused"
    FALLBACK = "Fallback"
    STEADY = "Steady"
    STABILIZING = "Stabilizing"
    COOLDOWN = "Cooldown"
    STEP_LIMIT = "StepLimit"
    SCALE_DOWN = "ScaleDown"
    SLO_GUARD = "SloGuard"
    OVERLOAD = "Overload"  # demand beyond what the fleet serves within the SLO: no scale-down
    WOULD_FLAP = "WouldFlap"  # a scale-down some trigger would answer with a scale-up


@dataclass(frozen=True)
class Observed:
    """The workload as the API server reports it."""

    replicas: int  # the Deployment's current spec.replicas
    ready: int  # pods passing readiness
    # Seconds from creation to Ready of the pods that are Ready now: the fleet's measured cold start.
    ready_seconds: tuple[float, ...] = ()
    # Pods not Ready for longer than the cold start (ImagePullBackOff...): not capacity on its way.
    stuck: int = 0

    @property
    def starting(self) -> int:
        return max(0, self.replicas - self.ready - self.stuck)


@dataclass(frozen=True)
class Metrics:
    """One tick's metric values. A name missing from `values` has no data.

    `values` holds each trigger's main value under its name, and its secondary inputs under
    "<name>.<role>" (an slo trigger's "<name>.capacity" and "<name>.backlog"). `history` is the
    arrival-rate history the forecast floor learns from (None: none could be read).
    """

    values: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # why the query round failed (Prometheus down, timeout...), if it did
    history: fc.RateHistory | None = None
    invalid: dict[str, str] = field(default_factory=dict)  # slot -> why its sample is no data (NaN, garbage)

    def finite(self) -> Metrics:
        """These metrics with NaN, +-Inf and non-numbers moved from `values` to `invalid`: a value
        that is not a number is missing data (PromQL's 0/0 at idle is NaN), never a load."""
        bad = {k: v for k, v in self.values.items() if not _is_finite_number(v)}
        if not bad:
            return self
        values = {k: v for k, v in self.values.items() if k not in bad}
        invalid = {**self.invalid, **{k: f"returned {v!r}, which is not a number (no data)" for k, v in bad.items()}}
        return replace(self, values=values, invalid=invalid)

    def missing(self, policy: ScalingPolicy) -> list[str]:
        return [t.name for t in policy.triggers if t.name not in self.values]

    def inputs(self, trigger: Trigger) -> dict[str, float]:
        prefix = f"{trigger.name}."
        return {k.removeprefix(prefix): v for k, v in self.values.items() if k.startswith(prefix)}


@dataclass(frozen=True)
class ScaleEvent:
    time: dt.datetime
    old: int
    new: int


@dataclass(frozen=True)
class PendingForecast:
    """A forecast waiting for its window to pass, so it can be compared with what arrived."""

    made: dt.datetime
    until: dt.datetime
    predicted_rps: float
    actual_peak_rps: float = 0.0


# Memory older than this many intervals (and STALE_MIN) was not kept by consecutive ticks.
STALE_TICKS = 3
STALE_MIN = dt.timedelta(minutes=1)


@dataclass(frozen=True)
class Loads:
    """One trigger's load (reading x ready pods) over two buckets: the one begun at `start` and the
    one before it, as sums and counts, so their mean is read without keeping every sample."""

    start: dt.datetime
    total: float = 0.0
    count: int = 0
    previous_total: float = 0.0
    previous_count: int = 0

    def mean(self) -> float | None:
        n = self.count + self.previous_count
        return (self.total + self.previous_total) / n if n else None

    def to_list(self) -> list[Any]:
        return [self.start.isoformat(), self.total, self.count, self.previous_total, self.previous_count]

    @classmethod
    def from_list(cls, v: list[Any]) -> Loads:
        return cls(dt.datetime.fromisoformat(v[0]), float(v[1]), int(v[2]), float(v[3]), int(v[4]))


@dataclass(frozen=True)
class History:
    """The engine's own small memory between ticks (serialisable, so a restart loses nothing)."""

    above_since: dict[str, dt.datetime] = field(default_factory=dict)
    below_since: dict[str, dt.datetime] = field(default_factory=dict)
    data_since: dt.datetime | None = None
    recommendations: tuple[tuple[dt.datetime, int], ...] = ()
    events: tuple[ScaleEvent, ...] = ()
    capacity: Learnt = field(default_factory=Learnt)  # one replica's capacity, learnt under load (capacity.py)
    cold_start_seconds: float | None = None  # P90 of observed pod starts
    pending_forecast: PendingForecast | None = None
    last_forecast: tuple[float, float] | None = None  # (predicted, actual) peak of the last closed window
    observed_at: dt.datetime | None = None  # the tick that wrote this memory
    # The last scale-up and the load (arrivals over the rate window) then: a scale-down that would undo
    # it while the load is about the same is a reversal (operator/reversals.py), refused (antiflap.py).
    last_up: tuple[dt.datetime, float] | None = None
    # Per averaged ratio trigger (GPU, latency, PromQL averages), the load it read lately (engine.py's
    # _track_loads). WouldFlap predicts from its mean, not from one sample.
    loads: dict[str, Loads] = field(default_factory=dict)

    def resumed(self, now: dt.datetime, interval: dt.timedelta) -> History:
        """This memory as a tick at `now` may trust it. "Below 40 % since 10:00" claims every tick
        since 10:00 saw it below; after a gap with no ticks (an operator restart, a lost leader,
        a stale status read back) nobody saw it, so the clocks and the data streak start again —
        which only ever delays a scale step, never causes one."""
        if self.observed_at is None or now - self.observed_at <= max(STALE_TICKS * interval, STALE_MIN):
            return self
        return replace(self, above_since={}, below_since={}, data_since=None)

    def taken_over(self) -> History:
        """This memory as read back from status by a process that did not keep it (a new leader, a
        restart). The ticks between the last write and now went unobserved - a spike there left no
        trace - so nothing may be removed until a full window has been seen again: the scale-down
        clocks and the data streak start now. Scale-up clocks are kept: a missed dip can only make
        them late, and a needed scale-up should not wait a sustain period per fail-over."""
        return replace(self, below_since={}, data_since=None)

    def last_event(self) -> ScaleEvent | None:
        return self.events[-1] if self.events else None

    def to_dict(self) -> dict[str, Any]:
        pf = self.pending_forecast
        return {
            "aboveSince": {k: v.isoformat() for k, v in self.above_since.items()},
            "belowSince": {k: v.isoformat() for k, v in self.below_since.items()},
            "dataSince": self.data_since.isoformat() if self.data_since else None,
            "recommendations": [[t.isoformat(), n] for t, n in self.recommendations],
            "events": [[e.time.isoformat(), e.old, e.new] for e in self.events],
            "capacityRps": self.capacity.rps,
            "capacityCharsPerSecond": self.capacity.chars,
            "capacityErrors": {
                Unit.REQUESTS.value: self.capacity.error_rps,
                Unit.CHARACTERS.value: self.capacity.error_chars,
            },
            "coldStartSeconds": self.cold_start_seconds,
            "pendingForecast": [pf.made.isoformat(), pf.until.isoformat(), pf.predicted_rps, pf.actual_peak_rps]
            if pf
            else None,
            "lastForecast": list(self.last_forecast) if self.last_forecast else None,
            "observedAt": self.observed_at.isoformat() if self.observed_at else None,
            "lastUp": [self.last_up[0].isoformat(), self.last_up[1]] if self.last_up else None,
            "loads": {k: v.to_list() for k, v in self.loads.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> History:
        if not d:
            return cls()
        ts = dt.datetime.fromisoformat
        pf = d.get("pendingForecast")
        last = d.get("lastForecast")
        up = d.get("lastUp")
        return cls(
            above_since={k: ts(v) for k, v in (d.get("aboveSince") or {}).items()},
            below_since={k: ts(v) for k, v in (d.get("belowSince") or {}).items()},
            data_since=ts(d["dataSince"]) if d.get("dataSince") else None,
            recommendations=tuple((ts(t), int(n)) for t, n in d.get("recommendations") or []),
            events=tuple(ScaleEvent(ts(t), int(o), int(n)) for t, o, n in d.get("events") or []),
            capacity=_learnt(d),
            cold_start_seconds=_opt_float(d.get("coldStartSeconds")),
            pending_forecast=PendingForecast(ts(pf[0]), ts(pf[1]), float(pf[2]), float(pf[3])) if pf else None,
            last_forecast=(float(last[0]), float(last[1])) if last else None,
            observed_at=ts(d["observedAt"]) if d.get("observedAt") else None,
            last_up=(ts(up[0]), float(up[1])) if up else None,
            loads={k: Loads.from_list(v) for k, v in (d.get("loads") or {}).items()},
        )


def _is_finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _learnt(d: dict[str, Any]) -> Learnt:
    errors = d.get("capacityErrors") or {}
    return Learnt(
        rps=_opt_float(d.get("capacityRps")),
        chars=_opt_float(d.get("capacityCharsPerSecond")),
        error_rps=_opt_float(errors.get(Unit.REQUESTS)),
        error_chars=_opt_float(errors.get(Unit.CHARACTERS)),
    )


@dataclass(frozen=True)
class TriggerReading:
    """What one trigger saw and recommended this tick."""

    name: str
    value: float | None
    recommendation: int | None
    note: str
    sized: bool = False


@dataclass(frozen=True)
class Demand:
    """What the slo trigger's model saw: for status, metrics and the live table."""

    arrival_rps: float | None
    capacity_rps: float
    capacity_measured: bool
    capacity_unit: Unit | None  # the unit the measured capacity was read in (None: assumed)
    needed: int | None  # replicas the SLO needs at the current demand
    forecast_rps: float | None
    forecast_needed: int | None
    forecast_note: str
    lookahead: dt.timedelta
    last_forecast: tuple[float, float] | None  # (predicted, actual) of the last closed window
    # Why the fleet is overloaded now (p95 beyond the objective, requests refused, demand at twice the
    # ready capacity), None when it is not: the count is then sized from demand at once, never lowered.
    overload: str | None = None


@dataclass(frozen=True)
class Decision:
    desired: int
    current: int
    reason: Reason
    rule: str  # who decided: a trigger name, schedule:<name>, forecast, or hold/cooldown/bounds/...
    message: str  # one sentence a person can read
    readings: tuple[TriggerReading, ...]
    active_schedule: str | None
    schedule_floor: int
    metrics_available: bool
    metrics_message: str
    history: History
    demand: Demand | None = None
    forecast_floor: int = 0

    @property
    def changed(self) -> bool:
        return self.desired != self.current

    @property
    def metric_values(self) -> dict[str, float]:
        return {r.name: r.value for r in self.readings if r.value is not None}

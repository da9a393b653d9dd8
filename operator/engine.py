"""The scaling engine: a pure function of (policy, observed state, metrics, time, history) -> decision.

No I/O and no clock of its own: the operator, the simulator and the tests all call `decide()` with
the time they choose, and carry the returned history into the next call. Like the HPA's replica
calculator, everything that talks to the API server or Prometheus lives outside this module.

Rules, in order:
1. Reactive triggers each recommend a count (proportional: the HPA formula; threshold: a step after
   the value stayed above for `sustainFor`); the largest wins. Pods still starting count as capacity
   on its way, so the same load does not scale up twice during a cold start.
2. Active schedule windows (pre-warm included) set a floor, reached at once.
3. Scale-up: stabilisation window (lowest recommendation over it), cooldown, step limit per period.
4. Scale-down only with complete data for the whole window, every trigger below its scaleDownBelow
   for the whole window, the highest recommendation over the window still lower, outside the
   cooldown; then step by step, never below max(min, schedule floor).
5. Missing data is never zero: hold (or the fallback count), never scale down.
6. The result is always within [min, max]; `paused` freezes the count.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field, replace
from typing import Any

from voxscale.operator.policy import (
    FallbackMode,
    ScalingPolicy,
    StepPolicy,
    Trigger,
    TriggerType,
    format_duration,
)


@dataclass(frozen=True)
class Observed:
    """The workload as the API server reports it."""

    replicas: int  # the Deployment's current spec.replicas
    ready: int  # pods passing readiness

    @property
    def starting(self) -> int:
        return max(0, self.replicas - self.ready)


@dataclass(frozen=True)
class Metrics:
    """One tick's metric values by trigger name. A name missing from `values` has no data."""

    values: dict[str, float] = field(default_factory=dict)
    error: str | None = None  # why the query round failed (Prometheus down, timeout...), if it did

    def missing(self, policy: ScalingPolicy) -> list[str]:
        return [t.name for t in policy.triggers if t.name not in self.values]


@dataclass(frozen=True)
class ScaleEvent:
    time: dt.datetime
    old: int
    new: int


@dataclass(frozen=True)
class History:
    """The engine's own small memory between ticks (serialisable, so a restart loses nothing)."""

    above_since: dict[str, dt.datetime] = field(default_factory=dict)
    below_since: dict[str, dt.datetime] = field(default_factory=dict)
    data_since: dt.datetime | None = None
    recommendations: tuple[tuple[dt.datetime, int], ...] = ()
    events: tuple[ScaleEvent, ...] = ()

    def last_event(self) -> ScaleEvent | None:
        return self.events[-1] if self.events else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "aboveSince": {k: v.isoformat() for k, v in self.above_since.items()},
            "belowSince": {k: v.isoformat() for k, v in self.below_since.items()},
            "dataSince": self.data_since.isoformat() if self.data_since else None,
            "recommendations": [[t.isoformat(), n] for t, n in self.recommendations],
            "events": [[e.time.isoformat(), e.old, e.new] for e in self.events],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> History:
        if not d:
            return cls()
        ts = dt.datetime.fromisoformat
        return cls(
            above_since={k: ts(v) for k, v in d.get("aboveSince", {}).items()},
            below_since={k: ts(v) for k, v in d.get("belowSince", {}).items()},
            data_since=ts(d["dataSince"]) if d.get("dataSince") else None,
            recommendations=tuple((ts(t), int(n)) for t, n in d.get("recommendations", [])),
            events=tuple(ScaleEvent(ts(t), int(o), int(n)) for t, o, n in d.get("events", [])),
        )


@dataclass(frozen=True)
class TriggerReading:
    """What one trigger saw and recommended this tick."""

    name: str
    value: float | None
    recommendation: int | None
    note: str


@dataclass(frozen=True)
class Decision:
    desired: int
    current: int
    rule: str  # the rule that decided: a trigger name, schedule:<name>, or hold/cooldown/bounds/...
    message: str  # one sentence a person can read
    readings: tuple[TriggerReading, ...]
    active_schedule: str | None
    schedule_floor: int
    metrics_available: bool
    metrics_message: str
    history: History

    @property
    def changed(self) -> bool:
        return self.desired != self.current

    @property
    def metric_values(self) -> dict[str, float]:
        return {r.name: r.value for r in self.readings if r.value is not None}


def _fmt(trigger: Trigger, value: float) -> str:
    return f"{value:.3g}{trigger.unit}"


def _named(trigger: Trigger, value: float) -> str:
    return f"{trigger.name} {_fmt(trigger, value)}"


def _step_limit(policy: StepPolicy, base: int, up: bool) -> int:
    by_percent = base * policy.max_step_percent / 100
    return max(policy.max_step_pods, math.ceil(by_percent) if up else math.floor(by_percent))


def _period_base(history: History, now: dt.datetime, period: dt.timedelta, current: int) -> int:
    """The replica count at the start of the step period (HPA measures step limits from there)."""
    in_period = [e for e in history.events if now - e.time < period]
    return in_period[0].old if in_period else current


def _recommend(
    trigger: Trigger, value: float, obs: Observed, step_up: int, above_for: dt.timedelta | None
) -> tuple[int | None, str]:
    """One trigger's replica recommendation (None: no opinion) and the words that explain it.

    `above_for` is how long the value has been above scaleUpAbove (None when it is not).
    """
    recs: list[tuple[int, str]] = []
    pending = ""
    if trigger.target is not None:
        ratio = value / trigger.target
        if trigger.type is TriggerType.QUEUE_LENGTH:
            # A sum across pods with a per-replica target: the count that brings it to target.
            rec = math.ceil(value / trigger.target - 1e-9)
            per_pod = value / obs.replicas if obs.replicas else math.inf
            within = abs(per_pod / trigger.target - 1) <= trigger.tolerance
        else:
            # An average over ready pods: scale the ready count by the ratio; pods still starting
            # are capacity on its way, so they are not counted twice.
            rec = math.ceil(obs.ready * ratio - 1e-9)
            within = abs(ratio - 1) <= trigger.tolerance
        target = _fmt(trigger, trigger.target)
        if within:
            recs.append((obs.replicas, f"{_named(trigger, value)} within {trigger.tolerance:.0%} of target {target}"))
        else:
            recs.append((rec, f"{_named(trigger, value)} vs target {target}"))
    if trigger.scale_up_above is not None and above_for is not None:
        above = f"{_named(trigger, value)} > {_fmt(trigger, trigger.scale_up_above)} for {format_duration(above_for)}"
        if above_for < trigger.sustain_for:
            pending = f"{above} of {format_duration(trigger.sustain_for)}"
        elif obs.starting > 0:
            recs.append((obs.replicas, f"{above}, {obs.starting} pod(s) still starting"))
        else:
            recs.append((obs.replicas + step_up, above))
    if not recs:
        return None, pending or f"{_named(trigger, value)}, no threshold crossed"
    rec, note = max(recs, key=lambda r: r[0])
    return rec, f"{note}; {pending}" if pending else note


@dataclass(frozen=True)
class _Tick:
    """The facts of one evaluation, shared by the rule functions below."""

    policy: ScalingPolicy
    now: dt.datetime
    current: int
    readings: tuple[TriggerReading, ...]
    active: str | None
    floor: int
    complete: bool
    metrics_message: str
    history: History
    next_history: History  # bookkeeping for this tick, before the scale event (if any) is added

    def decide(self, desired: int, rule: str, message: str) -> Decision:
        events = self.history.events
        if desired != self.current:
            events = (*events, ScaleEvent(self.now, self.current, desired))
        p = self.policy
        keep = max(p.scale_up.period, p.scale_down.period, p.scale_up.cooldown, p.scale_down.cooldown)
        hist = replace(self.next_history, events=tuple(e for e in events if self.now - e.time <= keep)[-20:])
        return Decision(
            desired=desired,
            current=self.current,
            rule=rule,
            message=message,
            readings=self.readings,
            active_schedule=self.active,
            schedule_floor=self.floor,
            metrics_available=self.complete,
            metrics_message=self.metrics_message,
            history=hist,
        )


def decide(
    policy: ScalingPolicy,
    observed: Observed,
    metrics: Metrics,
    now: dt.datetime,
    history: History | None = None,
) -> Decision:
    """Choose the replica count for one tick. Pure: same inputs, same decision."""
    hist = history or History()
    current = observed.replicas
    lo, hi = policy.min_replicas, policy.max_replicas

    # --- schedules: the highest floor among active windows (pre-warm included)
    floor, active = 0, None
    for sched in policy.schedules:
        if sched.min_replicas > floor and sched.active_window(now) is not None:
            floor, active = min(sched.min_replicas, hi), sched.name

    # --- how long each trigger has been above its scale-up / below its scale-down threshold
    missing = metrics.missing(policy)
    complete = metrics.error is None and not missing
    above_since, below_since = dict(hist.above_since), dict(hist.below_since)
    last = hist.last_event()
    for trig in policy.triggers:
        value = metrics.values.get(trig.name)
        if value is None:
            above_since.pop(trig.name, None)
            below_since.pop(trig.name, None)
            continue
        if trig.scale_up_above is not None and value > trig.scale_up_above:
            since = above_since.get(trig.name, now)
            # After a scale-up the load is measured against the new capacity: re-arm the clock.
            if last is not None and last.new > last.old and since < last.time:
                since = last.time
            above_since[trig.name] = since
        else:
            above_since.pop(trig.name, None)
        if trig.scale_down_below is None or value < trig.scale_down_below:
            below_since.setdefault(trig.name, now)
        else:
            below_since.pop(trig.name, None)

    # --- reactive recommendations; the largest wins
    step_up = _step_limit(policy.scale_up, max(current, 1), up=True)
    readings: list[TriggerReading] = []
    for trig in policy.triggers:
        value = metrics.values.get(trig.name)
        if value is None:
            readings.append(TriggerReading(trig.name, None, None, metrics.error or "no data (empty result)"))
            continue
        above_for = now - above_since[trig.name] if trig.name in above_since else None
        rec, note = _recommend(trig, value, observed, step_up, above_for)
        readings.append(TriggerReading(trig.name, value, rec, note))
    opinions = [r for r in readings if r.recommendation is not None]
    best = max(opinions, key=lambda r: r.recommendation or 0) if opinions else None
    # Nobody asking for capacity means "as few as allowed"; the scale-down rules make that gradual.
    reactive = best.recommendation if best is not None and best.recommendation is not None else lo
    raw = min(max(reactive, floor, lo), hi)

    # Stabilisation looks at what the load asked for; schedule floors are applied on top, so the end of
    # a window is not mistaken for a load that might come back.
    window = max(policy.scale_up.stabilization_window, policy.scale_down.stabilization_window)
    recs = (*((t, n) for t, n in hist.recommendations if now - t <= window), (now, min(max(reactive, lo), hi)))
    if not policy.triggers:
        metrics_message = "no triggers configured"
    elif metrics.error:
        metrics_message = f"metrics unavailable: {metrics.error}"
    elif missing:
        metrics_message = f"no data for {', '.join(missing)} (an empty result is not read as zero)"
    else:
        metrics_message = "every trigger has data"
    tick = _Tick(
        policy=policy,
        now=now,
        current=current,
        readings=tuple(readings),
        active=active,
        floor=floor,
        complete=complete,
        metrics_message=metrics_message,
        history=hist,
        next_history=History(
            above_since=above_since,
            below_since=below_since,
            data_since=(hist.data_since or now) if complete else None,
            recommendations=recs,
            events=hist.events,
        ),
    )

    if policy.paused:
        held = min(max(current, lo), hi)
        return tick.decide(held, "paused", f"paused: holding {held} (would aim for {raw})")

    # --- bounds and schedule floors are commitments: applied at once, past cooldowns and step limits
    if current > hi:
        return tick.decide(hi, "bounds", f"above max {hi}: {current} -> {hi}")
    must = max(lo, floor)
    if current < must:
        target = max(must, min(raw, current + step_up))
        if active is not None and floor > lo:
            return tick.decide(target, f"schedule:{active}", f"schedule {active} floor {floor}: {current} -> {target}")
        return tick.decide(target, "bounds", f"below min {lo}: {current} -> {target}")

    # --- missing data: never read as zero, never a reason to scale down
    if not complete:
        fb = policy.fallback
        hold = current
        if fb.mode is FallbackMode.FIXED and fb.replicas is not None:
            hold = fb.replicas if fb.allow_below_current else max(fb.replicas, current)
            hold = min(max(hold, must), hi)
        if raw <= hold:  # partial data may still add capacity (below); it never removes any
            verb = f"fallback {fb.replicas}" if fb.mode is FallbackMode.FIXED else "holding"
            return tick.decide(
                hold,
                "fallback",
                f"{metrics_message}; {verb}: {current} -> {hold}"
                if hold != current
                else f"{metrics_message}; holding {current}",
            )

    if raw > current:
        return _scale_up(tick, raw, best)
    if raw < current:
        return _scale_down(tick, must, below_since)
    return tick.decide(current, "steady", f"steady at {current}: {best.note if best else 'nothing asks for more'}")


def _scale_up(tick: _Tick, raw: int, best: TriggerReading | None) -> Decision:
    up, now, current = tick.policy.scale_up, tick.now, tick.current
    recs = tick.next_history.recommendations
    stabilised = min(n for t, n in recs if now - t <= up.stabilization_window)
    who, why = (best.name, best.note) if best is not None else ("bounds", "bounds")
    if stabilised <= current:
        window = format_duration(up.stabilization_window)
        return tick.decide(current, "stabilizing", f"{why}: wants {raw}, waiting out the {window} scale-up window")
    last = tick.history.last_event()
    if last is not None and now - last.time < up.cooldown:
        left = format_duration(up.cooldown - (now - last.time))
        return tick.decide(current, "cooldown", f"{why}: wants {stabilised}, scale-up cooldown {left} left")
    base = _period_base(tick.history, now, up.period, current)
    target = min(stabilised, max(base + _step_limit(up, max(base, 1), up=True), current))
    if target <= current:
        period = format_duration(up.period)
        return tick.decide(current, "step-limit", f"{why}: wants {stabilised}, step limit reached for this {period}")
    limited = " (step limit)" if target < stabilised else ""
    return tick.decide(target, who, f"{why}: {current} -> {target}{limited}")


def _scale_down(tick: _Tick, must: int, below_since: dict[str, dt.datetime]) -> Decision:
    down, now, current = tick.policy.scale_down, tick.now, tick.current
    window = down.stabilization_window
    span = format_duration(window)
    above_since = tick.next_history.above_since
    for t, r in zip(tick.policy.triggers, tick.readings, strict=True):
        # Above its scale-up threshold (even if not for long enough yet), or not below its scale-down one.
        if t.name in above_since or t.name not in below_since:
            return tick.decide(current, "steady", f"steady at {current}: {r.note}")
    for t in tick.policy.triggers:
        if t.scale_down_below is not None and now - below_since[t.name] < window:
            calm = format_duration(now - below_since[t.name])
            limit = f"{t.scale_down_below:g}{t.unit}"
            message = f"{t.name} below {limit} for {calm} of {span}: holding {current}"
            return tick.decide(current, "stabilizing", message)
    data_since = tick.next_history.data_since
    if data_since is None or now - data_since < window:
        return tick.decide(
            current, "stabilizing", f"metrics complete for less than the {span} window: holding {current}"
        )
    stabilised = max(n for t, n in tick.next_history.recommendations if now - t <= window)
    if stabilised >= current:
        return tick.decide(
            current, "stabilizing", f"a recommendation of {stabilised} in the last {span} holds {current}"
        )
    last = tick.history.last_event()
    if last is not None and now - last.time < down.cooldown:
        left = format_duration(down.cooldown - (now - last.time))
        return tick.decide(current, "cooldown", f"scale-down cooldown {left} left")
    base = _period_base(tick.history, now, down.period, current)
    target = max(stabilised, must, base - _step_limit(down, base, up=False))
    if target >= current:
        return tick.decide(
            current, "step-limit", f"scale-down step limit reached for this {format_duration(down.period)}"
        )
    quiet = ", ".join(
        f"{r.name} {r.value:.3g} < {t.scale_down_below:g}{t.unit}"
        for t, r in zip(tick.policy.triggers, tick.readings, strict=True)
        if t.scale_down_below is not None and r.value is not None
    )
    return tick.decide(target, "scale-down", f"{quiet or 'load low'} for {span}: {current} -> {target}")

"""The scaling engine: a pure function of (policy, observed state, metrics, time, history) -> decision.

No I/O and no clock of its own: the operator, the simulator and the tests all call `decide()` with
the time they choose, and carry the returned history into the next call. Like the HPA's replica
calculator, everything that talks to the API server or Prometheus lives outside this module.

`decide()` runs these phases in order (each a function below). Its backbone is the SLO model - the
user's slo trigger, or else the implicit objective of spec.scaling.slo that every TTSDeployment gets:
demand counted at the pods' door -> the replicas it needs within the objective -> the guard no
scale-down passes. Triggers are modifiers on it: they may ask for more, never hold the fleet below
what demand needs.
1. floors: active schedule windows, and the forecast floor (demand learnt from history over the
   look-ahead of a pod start, sized with the SLO model); both only ever raise the count;
2. clocks: how long each trigger has been above its scale-up / below its scale-down threshold;
3. learning: a replica's capacity measured under load, and the P90 pod start time;
4. recommendations: the SLO model's first (and whether the fleet is overloaded: p95 beyond the
   objective, requests refused, or demand at twice the ready capacity), then each trigger kind's
   (operator/triggers/), a threshold that fires stepping at least to what demand needs; the
   largest wins. Pods still starting count as capacity on its way;
5. commitments: bounds, schedule and forecast floors are reached at once;
6. missing data: never read as zero, never a reason to scale down (hold, or the fallback count);
7. scale-up: stabilisation window, cooldown, and step limits for ratio-based triggers; a count sized
   from demand has no feedback on itself and is reached in one step, under overload past the window
   and the cooldown too;
8. scale-down: complete data for the whole window, every trigger below its scaleDownBelow, the
   highest recommendation over the window lower (schedule floors included, so a window's end is a
   scale-down like any other), no overload, outside the cooldown, step by step, never below the
   floors nor what carries the current and forecast demand within the SLO (N-1), and never to a
   count at which some trigger would ask to scale up again (its reading predicted there: WouldFlap;
   the SLO model's, once demand swings up as it has over the last reversal window), nor undoing a
   scale-up of the last reversal window while the load is about what it was then. A rule between
   its thresholds abstains where the SLO model sizes the fleet.
`paused` freezes the count; the result is always within [min, max].

`decide()` reads as that list: `_evaluate` (phases 1-4) builds the tick's facts (tick.py's Tick),
`_normalize` (phases 5-8) passes them through one phase after another until one settles the count,
as the HPA's normalizeDesiredReplicasWithBehaviors does. What overload changes lives in overload.py,
the N-1 guard and WouldFlap in antiflap.py; the engine's inputs, memory and result in state.py.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import replace

from voxscale.operator import antiflap, overload
from voxscale.operator import capacity as cap
from voxscale.operator import forecast as fc
from voxscale.operator.policy import FallbackMode, ScalingPolicy, Trigger, format_duration
from voxscale.operator.reversals import REVERSAL_TOLERANCE, REVERSAL_WINDOW_S
from voxscale.operator.state import (
    STALE_MIN,
    STALE_TICKS,
    Decision,
    Demand,
    History,
    Loads,
    Metrics,
    Observed,
    PendingForecast,
    Reason,
    ScaleEvent,
    TriggerReading,
)
from voxscale.operator.tick import Tick, period_base, step_limit
from voxscale.operator.triggers import Context, kind
from voxscale.operator.triggers import slo as slo_kind
from voxscale.operator.triggers.slo import demand as demand_now
from voxscale.operator.triggers.slo import size

__all__ = [  # the engine's public face; the data types live in state.py
    "STALE_MIN",
    "STALE_TICKS",
    "Decision",
    "Demand",
    "History",
    "Metrics",
    "Observed",
    "PendingForecast",
    "Reason",
    "ScaleEvent",
    "TriggerReading",
    "decide",
    "schedule_floor_at",
]

MIN_COLD_STARTS = 3  # pod starts observed before their P90 replaces the spec's coldStart
REVERSAL_WINDOW = dt.timedelta(seconds=REVERSAL_WINDOW_S)
# The swings of demand a scale-down must survive are those of any reversal window this recent.
WOBBLE_MEMORY = dt.timedelta(hours=1)


# ------------------------------------------------------------------------------------ phase 1: floors
def schedule_floor_at(policy: ScalingPolicy, now: dt.datetime) -> tuple[int, str | None]:
    """The highest floor among active schedule windows (pre-warm included), and its name."""
    floor, active = 0, None
    for sched in policy.schedules:
        if sched.min_replicas > floor and sched.active_window(now) is not None:
            floor, active = min(sched.min_replicas, policy.max_replicas), sched.name
    return floor, active


# ------------------------------------------------------------------------------------ phase 2: clocks
def _threshold_clocks(
    policy: ScalingPolicy, metrics: Metrics, now: dt.datetime, hist: History
) -> tuple[dict[str, dt.datetime], dict[str, dt.datetime]]:
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
    return above_since, below_since


# ---------------------------------------------------------------------------------- phase 3: learning
def _learn_capacity(slo: Trigger | None, metrics: Metrics, hist: History) -> tuple[cap.Learnt, cap.Capacity | None]:
    """A replica's capacity in requests and in characters (capacity.py), updated by this tick's
    measurement under load; and what it serves now in the unit that predicts it better (None until
    there is a measurement)."""
    if slo is None:
        return hist.capacity, cap.now(hist.capacity, None)
    inputs = metrics.inputs(slo)
    per_request = cap.chars_per_request(metrics.values.get(slo.name), inputs.get("characters"))
    learnt = cap.learn(hist.capacity, inputs.get("capacity"), per_request)
    return learnt, cap.now(learnt, per_request)


def _learn_cold_start(observed: Observed, hist: History) -> float | None:
    """P90 of the observed pod start times, once enough pods have started."""
    starts = [s for s in observed.ready_seconds if math.isfinite(s) and s >= 0]
    if len(starts) < MIN_COLD_STARTS:
        return hist.cold_start_seconds
    return p90(starts)


def p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile of a non-empty list: with ten pods, the second slowest (no
    interpolation, so one outlier among few does not set the look-ahead)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def _growth(slo: Trigger | None, metrics: Metrics, now: dt.datetime, lookahead: dt.timedelta) -> tuple[float, float]:
    """How much demand will have grown by the time a pod ordered now is Ready: (the usual rise,
    learnt from the last hours of history; the rise under way now, extrapolated from the rate window)."""
    if slo is None:
        return 1.0, 1.0
    learnt = fc.growth(metrics.history, now, lookahead) if metrics.history is not None else None
    under_way = slo_kind.trend(slo, metrics.values.get(slo.name), metrics.inputs(slo), lookahead.total_seconds())
    return learnt or 1.0, under_way


def _burst(slo: Trigger | None, metrics: Metrics, now: dt.datetime, lookahead: dt.timedelta) -> float:
    """Requests/s the largest recent burst rose by within a pod start (0: none lately, or no model)."""
    if slo is None or metrics.history is None:
        return 0.0
    return fc.burst(metrics.history, now, lookahead) or 0.0


# --------------------------------------------------------------------------- phase 4: recommendations
def _readings(
    policy: ScalingPolicy,
    observed: Observed,
    metrics: Metrics,
    now: dt.datetime,
    above_since: dict[str, dt.datetime],
    capacity: cap.Capacity | None,
    headroom: float,
    trend: float,
    burst: float,
) -> tuple[list[TriggerReading], TriggerReading | None]:
    """Each user trigger's reading, and the SLO model's (the slo trigger's, or the implicit objective's).
    The model is read first: a threshold trigger that fires then steps at least to what demand needs."""
    step_up = step_limit(policy.scale_up, max(observed.replicas, 1), up=True)

    def read(trig: Trigger, needed: int | None) -> TriggerReading:
        value = metrics.values.get(trig.name)
        if value is None:
            idle = "no pods to measure (scaled to zero)" if observed.replicas == 0 and kind(trig).reads_pods else None
            why = metrics.error or metrics.invalid.get(trig.name) or idle or "no data (empty result)"
            return TriggerReading(trig.name, None, None, why)
        ctx = Context(
            replicas=observed.replicas,
            ready=observed.ready,
            step_up=step_up,
            above_for=now - above_since[trig.name] if trig.name in above_since else None,
            inputs=metrics.inputs(trig),
            capacity_rps=capacity.rps if capacity is not None else None,
            capacity_measured=capacity is not None,
            capacity_unit=capacity.unit if capacity is not None else "",
            headroom=headroom,
            burst=burst,
            trend=trend,
            needed=needed,
            stuck=observed.stuck,
        )
        rec = kind(trig).recommend(trig, value, ctx)
        return TriggerReading(trig.name, value, rec.replicas, rec.note, rec.sized)

    model = read(policy.slo, None) if policy.slo is not None else None
    needed = model.recommendation if model is not None else None
    readings = [model if t.sized and model is not None else read(t, needed) for t in policy.triggers]
    return readings, model


def _forecast(
    policy: ScalingPolicy, metrics: Metrics, now: dt.datetime, lookahead: dt.timedelta
) -> fc.Forecast | fc.NoForecast | None:
    pred = policy.predictive
    if not pred.enabled or policy.slo is None:
        return None
    if metrics.history is None:
        return fc.NoForecast(
            "no arrival history read yet (it is read in the background; a failed read is retried with back-off)",
            dt.timedelta(0),
        )
    return fc.forecast(metrics.history, now, lookahead, pred.timezone, pred.min_history)


def _track_forecast(
    hist: History, now: dt.datetime, lookahead: dt.timedelta, arrivals: float | None, predicted: float | None
) -> tuple[PendingForecast | None, tuple[float, float] | None]:
    """Compare each forecast with the peak that actually arrived in its window, one window at a time."""
    pending, last = hist.pending_forecast, hist.last_forecast
    if pending is not None and arrivals is not None:
        pending = replace(pending, actual_peak_rps=max(pending.actual_peak_rps, arrivals))
    if pending is not None and now >= pending.until:
        last, pending = (pending.predicted_rps, pending.actual_peak_rps), None
    if pending is None and predicted is not None:
        pending = PendingForecast(now, now + lookahead, predicted, arrivals or 0.0)
    return pending, last


def decide(
    policy: ScalingPolicy,
    observed: Observed,
    metrics: Metrics,
    now: dt.datetime,
    history: History | None = None,
) -> Decision:
    """Choose the replica count for one tick. Pure: same inputs, same decision."""
    hist = (history or History()).resumed(now, policy.interval)
    tick, raw, best = _evaluate(policy, observed, metrics.finite(), now, hist)
    return _normalize(tick, raw, best)


def _evaluate(
    policy: ScalingPolicy, observed: Observed, metrics: Metrics, now: dt.datetime, hist: History
) -> tuple[Tick, int, TriggerReading | None]:
    """Phases 1-4: floors, clocks, learning and recommendations, as the tick's facts; with the raw
    recommendation (the largest, within the floors and bounds) and the reading that made it."""
    current = observed.replicas
    lo, hi = policy.min_replicas, policy.max_replicas
    slo = policy.slo

    schedule_floor, active = schedule_floor_at(policy, now)
    missing = [n for n in metrics.missing(policy) if not (current == 0 and _reads_pods(policy, n))]
    complete = metrics.error is None and not missing
    above_since, below_since = _threshold_clocks(policy, metrics, now, hist)
    learnt, measured = _learn_capacity(slo, metrics, hist)
    cold_start = _learn_cold_start(observed, hist)
    lookahead = dt.timedelta(seconds=cold_start) if cold_start is not None else policy.predictive.cold_start
    lookahead += policy.interval

    headroom, trend = _growth(slo, metrics, now, lookahead)
    burst = _burst(slo, metrics, now, lookahead)
    readings, model = _readings(policy, observed, metrics, now, above_since, measured, headroom, trend, burst)
    prediction = _forecast(policy, metrics, now, lookahead)
    demand, forecast_floor, guard, rebound, pending, last_fc = _demand(
        policy, observed, metrics, hist, now, lookahead, measured, prediction, headroom, burst
    )
    best, reactive, sized = _strongest(policy, readings, model)
    raw = min(max(reactive, schedule_floor, forecast_floor, lo), hi)

    # Stabilisation looks at what the load and the schedules asked for, so the end of a window lowers
    # the count no faster than the scale-down rules allow (the HPA's cron metric does the same).
    window = max(policy.scale_up.stabilization_window, policy.scale_down.stabilization_window)
    asked = min(max(reactive, schedule_floor, lo), hi)
    recs = (*((t, n) for t, n in hist.recommendations if now - t <= window), (now, asked))
    tick = Tick(
        policy=policy,
        now=now,
        current=current,
        ready=observed.ready,
        readings=tuple(readings),
        model=model,
        active=active,
        schedule_floor=schedule_floor,
        forecast_floor=forecast_floor,
        complete=complete,
        metrics_message=_metrics_message(policy, metrics, missing),
        history=hist,
        next_history=History(
            above_since=above_since,
            below_since=below_since,
            data_since=(hist.data_since or now) if complete else None,
            recommendations=recs,
            events=hist.events,
            capacity=learnt,
            cold_start_seconds=cold_start,
            pending_forecast=pending,
            last_forecast=last_fc,
            observed_at=now,
            last_up=hist.last_up,
            loads=_track_loads(policy, readings, observed.ready, now, hist.loads),
        ),
        demand=demand,
        guard=guard,
        sized=min(sized, hi),
        rebound=min(rebound, hi),
        load=metrics.values.get(slo.name) if slo is not None else None,
        bands=tuple(_band(t, metrics, now) for t in policy.triggers),
    )
    return tick, raw, best


def _strongest(
    policy: ScalingPolicy, readings: list[TriggerReading], model: TriggerReading | None
) -> tuple[TriggerReading | None, int, int]:
    """(the reading asking for the most, the count it asks for, the highest count sized from
    demand): the user's triggers and the implicit objective all bid, the largest wins."""
    extra = (model,) if model is not None and policy.objective is not None else ()  # the implicit objective
    opinions = [r for r in (*readings, *extra) if r.recommendation is not None]
    best = max(opinions, key=lambda r: r.recommendation or 0) if opinions else None
    # Nobody asking for capacity means "as few as allowed"; the scale-down rules make that gradual.
    reactive = best.recommendation if best is not None and best.recommendation is not None else policy.min_replicas
    sized = max((r.recommendation or 0 for r in opinions if r.sized), default=0)
    return best, reactive, sized


def _demand(
    policy: ScalingPolicy,
    observed: Observed,
    metrics: Metrics,
    hist: History,
    now: dt.datetime,
    lookahead: dt.timedelta,
    capacity: cap.Capacity | None,
    prediction: fc.Forecast | fc.NoForecast | None,
    headroom: float,
    burst: float,
) -> tuple[Demand | None, int, int, int, PendingForecast | None, tuple[float, float] | None]:
    """The SLO model's view: demand, forecast floor, scale-down guard, rebound (what the model asks
    for at demand risen by the swing seen lately, at least its tolerance: a band, as the HPA's) and
    forecast bookkeeping."""
    slo = policy.slo
    if slo is None:
        return None, 0, 0, 0, hist.pending_forecast, hist.last_forecast
    per_replica = capacity.rps if capacity is not None else slo.capacity_rps
    measured = metrics.values.get(slo.name)
    arrivals, carried, swung = None, None, None
    inputs = metrics.inputs(slo)
    if measured is not None:
        arrivals, carried = demand_now(measured, inputs, headroom, burst)
        # The rebound band swings the demand without the burst headroom, which holds for a swing already.
        swing = 1 + max(REVERSAL_TOLERANCE, _band(slo, metrics, now))
        swung = max(carried, demand_now(measured, inputs, headroom)[1] * swing)
    needed = size(slo, carried, per_replica) if carried is not None else None
    predicted = prediction.peak_rps if isinstance(prediction, fc.Forecast) else None
    forecast_needed = min(size(slo, predicted, per_replica), policy.max_replicas) if predicted is not None else None
    pending, last = _track_forecast(hist, now, lookahead, arrivals, predicted)
    guard = 0 if carried is None else size(slo, max(carried, predicted or 0.0), per_replica)
    rebound = 0 if swung is None else size(slo, swung, per_replica)
    if prediction is None:
        note = "forecast off (spec.scaling.predictive.enabled: false)"
    else:
        note = prediction.note if isinstance(prediction, fc.Forecast) else f"no forecast: {prediction.reason}"
    demand = Demand(
        arrival_rps=arrivals,
        capacity_rps=per_replica,
        capacity_measured=capacity is not None,
        capacity_unit=capacity.unit if capacity is not None else None,
        needed=needed,
        forecast_rps=predicted,
        forecast_needed=forecast_needed,
        forecast_note=note,
        lookahead=lookahead,
        last_forecast=last,
        overload=overload.detect(slo, inputs, observed.ready * per_replica, arrivals),
    )
    return demand, forecast_needed or 0, guard, rebound, pending, last


LOAD_BUCKET = dt.timedelta(seconds=REVERSAL_WINDOW_S / 4)


def _track_loads(
    policy: ScalingPolicy, readings: list[TriggerReading], ready: int, now: dt.datetime, loads: dict[str, Loads]
) -> dict[str, Loads]:
    """Each averaged ratio trigger's load over the last quarter to half reversal window, as sums and
    counts of two buckets (a few numbers in status, not every sample). One reading is one noisy
    sample, and right after a scale-down it may not show the new count yet: a scale-down checked
    against it alone stepped on down until the rule fired again. Load is the reading times the ready
    pods (the HPA's ratio: what the fleet carries); a total such as a queue is a backlog that adding
    pods drains, so its past says nothing of the total at a smaller fleet, and keeps none."""
    out: dict[str, Loads] = {}
    for t, r in zip(policy.triggers, readings, strict=True):
        if t.sized or kind(t).summed:
            continue
        seen = loads.get(t.name) or Loads(now)
        if now - seen.start >= 2 * LOAD_BUCKET:
            seen = Loads(now)
        elif now - seen.start >= LOAD_BUCKET:
            seen = Loads(seen.start + LOAD_BUCKET, 0.0, 0, seen.total, seen.count)
        if r.value is not None:
            seen = replace(seen, total=seen.total + r.value * max(ready, 1), count=seen.count + 1)
        out[t.name] = seen
    return out


def _band(trigger: Trigger, metrics: Metrics, now: dt.datetime) -> float:
    """The rise of the load a scale-down must survive (antiflap.py): the largest swing of demand
    within a reversal window over the last WOBBLE_MEMORY (forecast.wobble), at least the trigger's
    tolerance."""
    history = metrics.history
    seen = fc.wobble(history, now, REVERSAL_WINDOW, WOBBLE_MEMORY) if history is not None else None
    return max(trigger.tolerance, seen or 0.0)


def _reads_pods(policy: ScalingPolicy, name: str) -> bool:
    return any(kind(t).reads_pods for t in policy.triggers if t.name == name)


def _metrics_message(policy: ScalingPolicy, metrics: Metrics, missing: list[str]) -> str:
    if not policy.triggers:
        return "no triggers configured"
    if metrics.error:
        return f"metrics unavailable: {metrics.error}"
    if missing:
        why = [f"{name} {metrics.invalid[name]}" for name in missing if name in metrics.invalid]
        because = f"; {'; '.join(why)}" if why else ""
        return f"no data for {', '.join(missing)} (an empty result is not read as zero){because}"
    return "every trigger has data"


# -------------------------------------------------------------- phases 5-8: from recommendation to count
def _normalize(tick: Tick, raw: int, best: TriggerReading | None) -> Decision:
    """Phases 5-8, in order; the first that settles the count decides: pause, bounds, commitments
    (floors), missing data, then the scale-up or scale-down behaviour; else the count holds."""
    must = max(tick.policy.min_replicas, tick.floor)
    return (
        _paused(tick, raw)
        or _above_max(tick)
        or _commit(tick, must, raw)
        or _without_data(tick, must, raw)
        or _scale_up(tick, raw, best)
        or _scale_down(tick, raw, must)
        or tick.decide(tick.current, Reason.STEADY, "steady", f"steady at {tick.current}: {_said(best)}")
    )


def _paused(tick: Tick, raw: int) -> Decision | None:
    """`paused` freezes the count (within the bounds), saying what it would aim for."""
    if not tick.policy.paused:
        return None
    held = min(max(tick.current, tick.policy.min_replicas), tick.policy.max_replicas)
    return tick.decide(held, Reason.PAUSED, "paused", f"paused: holding {held} (would aim for {raw})")


def _above_max(tick: Tick) -> Decision | None:
    """Above max (the bound was lowered): back within it at once."""
    hi, current = tick.policy.max_replicas, tick.current
    if current <= hi:
        return None
    return tick.decide(hi, Reason.BOUNDS, "bounds", f"above max {hi}: {current} -> {hi}")


def _said(best: TriggerReading | None) -> str:
    return best.note if best is not None else "nothing asks for more"


def _commit(tick: Tick, must: int, raw: int) -> Decision | None:
    """Bounds and floors are commitments: reached at once, past cooldowns and step limits; a sized
    recommendation above them is reached at once too, a ratio-based one within the step limit.
    None: the count is not below them."""
    current = tick.current
    if current >= must:
        return None
    step_up = step_limit(tick.policy.scale_up, max(current, 1), up=True)
    target = max(must, min(raw, max(tick.sized, current + step_up)))
    lo = tick.policy.min_replicas
    if tick.forecast_floor >= tick.schedule_floor and tick.forecast_floor > lo and tick.demand is not None:
        note = tick.demand.forecast_note
        return tick.decide(
            target, Reason.FORECAST, "forecast", f"forecast floor {tick.forecast_floor} ({note}): {current} -> {target}"
        )
    if tick.active is not None and tick.schedule_floor > lo:
        return tick.decide(
            target,
            Reason.SCHEDULE,
            f"schedule:{tick.active}",
            f"schedule {tick.active} floor {tick.schedule_floor}: {current} -> {target}",
        )
    return tick.decide(target, Reason.BOUNDS, "bounds", f"below min {lo}: {current} -> {target}")


def _without_data(tick: Tick, must: int, raw: int) -> Decision | None:
    """Missing data: hold (or the fallback count); partial data may still add capacity, never remove
    it. None: the data is complete, or what it asks for is above the count held."""
    if tick.complete:
        return None
    fb, current = tick.policy.fallback, tick.current
    hold = current
    if fb.mode is FallbackMode.FIXED and fb.replicas is not None:
        hold = fb.replicas if fb.allow_below_current else max(fb.replicas, current)
        hold = min(max(hold, must), tick.policy.max_replicas)
    if raw > hold:
        return None
    verb = f"fallback {fb.replicas}" if fb.mode is FallbackMode.FIXED else "holding"
    message = (
        f"{tick.metrics_message}; {verb}: {current} -> {hold}"
        if hold != current
        else f"{tick.metrics_message}; holding {current}"
    )
    return tick.decide(hold, Reason.FALLBACK, "fallback", message)


def _won(tick: Tick, best: TriggerReading | None) -> tuple[str, str]:
    """(who decided, why) for a scale-up: the winning trigger's note, or - where the implicit SLO
    model outbids the user's rules - what each rule asks beside what demand needs."""
    model, slo, d = tick.model, tick.policy.objective, tick.demand
    if best is None or slo is None or d is None or model is None or best is not model:
        return (best.name, best.note) if best is not None else ("bounds", "bounds")
    asks = [f"rule {r.name} asks {'nothing' if r.recommendation is None else r.recommendation}" for r in tick.readings]
    need = (
        f"demand {d.arrival_rps or 0:.3g} rps needs {model.recommendation} for "
        f"p{slo.quantile * 100:g} {slo.latency_seconds:g}s"
    )
    return "slo", "; ".join((*asks, need + overload.aside(tick)))


def _scale_up(tick: Tick, raw: int, best: TriggerReading | None) -> Decision | None:
    """Stabilisation window, cooldown, step limits. A count sized from demand has no feedback on
    itself and is reached in one step; under overload it is reached past the window and the cooldown
    too (overload.py), so no clock delays the answer to requests being refused or served late.
    None: nothing asks for more than the current count."""
    up, now, current = tick.policy.scale_up, tick.now, tick.current
    if raw <= current:
        return None
    recs = tick.next_history.recommendations
    stabilised = min(n for t, n in recs if now - t <= up.stabilization_window)
    who, why = _won(tick, best)
    if overload.rushes(tick):
        stabilised = overload.rushed_to(tick, stabilised)
    else:
        held = _scale_up_clocks(tick, raw, stabilised, why)
        if held is not None:
            return held
    base = period_base(tick.history, now, up.period, current)
    target = min(stabilised, max(base + step_limit(up, max(base, 1), up=True), current, tick.sized))
    if target <= current:
        period = format_duration(up.period)
        message = f"{why}: wants {stabilised}, step limit reached for this {period}"
        return tick.decide(current, Reason.STEP_LIMIT, "step-limit", message)
    limited = " (step limit)" if target < stabilised else ""
    return tick.decide(target, Reason.TRIGGER, who, f"{why}: {current} -> {target}{limited}")


def _scale_up_clocks(tick: Tick, raw: int, stabilised: int, why: str) -> Decision | None:
    """A hold while the scale-up window has not seen the higher recommendation throughout, or the
    last scale event is within the cooldown; None: the clocks allow the step."""
    up, now, current = tick.policy.scale_up, tick.now, tick.current
    if stabilised <= current:
        window = format_duration(up.stabilization_window)
        message = f"{why}: wants {raw}, waiting out the {window} scale-up window"
        return tick.decide(current, Reason.STABILIZING, "stabilizing", message)
    last = tick.history.last_event()
    if last is not None and now - last.time < up.cooldown:
        left = format_duration(up.cooldown - (now - last.time))
        message = f"{why}: wants {stabilised}, scale-up cooldown {left} left"
        return tick.decide(current, Reason.COOLDOWN, "cooldown", message)
    return None


def _scale_down(tick: Tick, raw: int, must: int) -> Decision | None:
    """Every trigger calm for the whole window, complete data, the window's highest recommendation
    lower, no overload, outside the cooldown, within the step limit; then never below what demand
    needs (N-1) nor to a count some trigger would answer with a scale-up (antiflap.py).
    None: nothing asks for fewer than the current count."""
    if raw >= tick.current:
        return None
    held = _calm(tick)
    if held is not None:
        return held
    down, now, current = tick.policy.scale_down, tick.now, tick.current
    span = format_duration(down.stabilization_window)
    stabilised = max(n for t, n in tick.next_history.recommendations if now - t <= down.stabilization_window)
    if stabilised >= current:
        message = f"a recommendation of {stabilised} in the last {span} holds {current}"
        return tick.decide(current, Reason.STABILIZING, "stabilizing", message)
    refused = overload.holds_scale_down(tick)
    if refused is not None:
        return refused
    last = tick.history.last_event()
    if last is not None and now - last.time < down.cooldown:
        left = format_duration(down.cooldown - (now - last.time))
        return tick.decide(current, Reason.COOLDOWN, "cooldown", f"scale-down cooldown {left} left")
    undoing = antiflap.undoes(tick)
    if undoing is not None:
        return undoing
    base = period_base(tick.history, now, down.period, current)
    target = max(stabilised, must, base - step_limit(down, base, up=False))
    if target >= current:
        message = f"scale-down step limit reached for this {format_duration(down.period)}"
        return tick.decide(current, Reason.STEP_LIMIT, "step-limit", message)
    if tick.guard > target:
        return antiflap.guarded(tick, target)
    return antiflap.unfought(tick, target, span)


def _calm(tick: Tick) -> Decision | None:
    """A hold while a trigger is not calm (above its scale-up threshold, or not below its scale-down
    one for the whole window) or the data has not been complete that long; None: calm enough."""
    now, current = tick.now, tick.current
    window = tick.policy.scale_down.stabilization_window
    span = format_duration(window)
    above_since, below_since = tick.next_history.above_since, tick.next_history.below_since
    sizes = tick.demand is not None and tick.demand.needed is not None
    for t, r in zip(tick.policy.triggers, tick.readings, strict=True):
        # Above its scale-up threshold (even if not for long enough yet): hold. Between its thresholds a
        # rule abstains where the SLO model sizes the fleet (WouldFlap then keeps its reading below the
        # scale-up threshold at the new count); without the model, not below scaleDownBelow holds.
        if t.name in above_since or (t.name not in below_since and not (sizes and r.value is not None)):
            return tick.decide(current, Reason.STEADY, "steady", f"steady at {current}: {r.note}")
    for t in tick.policy.triggers:
        if t.scale_down_below is not None and t.name in below_since and now - below_since[t.name] < window:
            calm = format_duration(now - below_since[t.name])
            limit = f"{t.scale_down_below:g}{t.unit}"
            message = f"{t.name} below {limit} for {calm} of {span}: holding {current}"
            return tick.decide(current, Reason.STABILIZING, "stabilizing", message)
    data_since = tick.next_history.data_since
    if data_since is None or now - data_since < window:
        message = f"metrics complete for less than the {span} window: holding {current}"
        return tick.decide(current, Reason.STABILIZING, "stabilizing", message)
    return None

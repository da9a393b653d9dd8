"""The safe scale-down: never below what carries demand within the SLO (N-1), and never to a count
at which some trigger would ask to scale up again (WouldFlap).

The HPA removes pods when its stabilisation window allows and finds out on the next ticks whether
that was too many: a threshold rule then fires again, and the fleet flaps. Both questions can be
answered before the pods go. The SLO model sizes current and forecast demand (the guard: the fewest
replicas that carry it), and each ratio-based trigger's reading can be predicted at a smaller fleet
(triggers/base.py's `fights`). engine.py has already decided that a scale-down is due and how far
the window, step limit and floors allow (`target`); these functions pick the count actually taken.
"""

from __future__ import annotations

import datetime as dt

from voxscale.operator.policy import format_duration
from voxscale.operator.reversals import REVERSAL_TOLERANCE, REVERSAL_WINDOW_S
from voxscale.operator.state import Decision, Reason
from voxscale.operator.tick import Tick
from voxscale.operator.triggers import kind
from voxscale.operator.triggers.base import fights


def fighters(tick: Tick, to: int) -> list[str]:
    """What the triggers that would ask to scale up again at `to` replicas would read there (empty:
    none would). A sized trigger's reading does not depend on the count, so its fight is the SLO
    model's rebound: the count it asks for once demand swings up as it has lately (`rebound`)."""
    out = [fight] if (fight := rebounds(tick, to)) is not None else []
    below = tick.next_history.below_since
    bands = tick.bands or (0.0,) * len(tick.policy.triggers)
    for t, r, band in zip(tick.policy.triggers, tick.readings, bands, strict=True):
        if r.value is None or t.sized:
            continue
        # A rule between its thresholds abstains (engine.py's _calm) only while its reading, grown by
        # the swing seen lately (at least its tolerance), stays below its scale-up threshold there.
        reading = _lately(tick, t.name, r.value)
        value = reading if t.scale_down_below is None or t.name in below else reading * (1 + band)
        fight = fights(t, value, kind(t).summed, tick.current, tick.ready, tick.current - to)
        if fight is not None:
            out.append(fight)
    return out


def _lately(tick: Tick, name: str, value: float) -> float:
    """The reading to predict from: the current one, or the mean load an average read over the last
    few minutes, as a reading at today's ready count, if that is higher (engine.py's _track_loads;
    totals keep no such memory)."""
    seen = tick.next_history.loads.get(name)
    mean = seen.mean() if seen is not None else None
    return value if mean is None else max(value, mean / max(tick.ready, 1))


def rebounds(tick: Tick, to: int) -> str | None:
    """Whether the SLO model would ask for more than `to` replicas once demand rises by the swing
    seen over the last reversal window, at least its tolerance (None: it would not). Sizing from
    demand has a step at every replica: demand that wobbles around one flips the count up and down,
    as a ratio without the HPA's tolerance would. A scale-down leaves that band first, so the next
    swing of the size already seen does not undo it."""
    slo, d = tick.policy.slo, tick.demand
    if slo is None or d is None or d.arrival_rps is None or tick.rebound <= to:
        return None
    who = "the slo objective" if slo is tick.policy.objective else f"{slo.name}"
    return f"{who} would ask for {tick.rebound} again once demand {d.arrival_rps:.3g} rps swings up as it has lately"


def unfought(tick: Tick, target: int, span: str) -> Decision:
    """Scale down to the lowest count from `target` up that no trigger would answer with a
    scale-up; hold, naming the rules that would fight, when even one pod fewer would be answered."""
    current = tick.current
    to = next((n for n in range(target, current) if not fighters(tick, n)), current)
    if to == current:
        fighting = "; ".join(fighters(tick, current - 1))
        message = f"at {current - 1} {fighting}, a scale-up again: holding {current}"
        return tick.decide(current, Reason.WOULD_FLAP, "would-flap", message)
    fought = f" (not {target}: {'; '.join(fighters(tick, to - 1))})" if to > target else ""
    return tick.decide(
        to, Reason.SCALE_DOWN, "scale-down", f"{_quiet(tick) or 'load low'} for {span}: {current} -> {to}{fought}"
    )


def _quiet(tick: Tick) -> str:
    """Why the load reads low: each trigger under its scaleDownBelow, else what demand needs."""
    quiet = ", ".join(
        f"{r.name} {r.value:.3g} < {t.scale_down_below:g}{t.unit}"
        for t, r in zip(tick.policy.triggers, tick.readings, strict=True)
        if t.scale_down_below is not None and r.value is not None and r.value < t.scale_down_below
    )
    if not quiet and tick.demand is not None and tick.demand.needed is not None:
        quiet = f"demand {tick.demand.arrival_rps:.3g} rps needs {tick.demand.needed}"
    return quiet


def guarded(tick: Tick, target: int) -> Decision:
    """A scale-down to `target` would leave fewer than the guard: remove pods only while the rest
    still carry current and forecast demand within the SLO (N-1), and then only to a count no
    trigger would answer with a scale-up."""
    current, guard = tick.current, tick.guard
    d = tick.demand
    assert d is not None
    what = f"demand {d.arrival_rps or 0:.3g} rps" + (
        f" (forecast {d.forecast_rps:.3g} rps)" if d.forecast_rps is not None else ""
    )
    if guard >= current:
        message = f"{current - 1} replica(s) would miss the SLO at {what}: holding {current}"
        return tick.decide(current, Reason.SLO_GUARD, "slo-guard", message)
    if fighters(tick, guard):
        return unfought(tick, guard, format_duration(tick.policy.scale_down.stabilization_window))
    message = f"{what} needs {guard}: {current} -> {guard} (not {target})"
    return tick.decide(guard, Reason.SCALE_DOWN, "scale-down", message)


def undoes(tick: Tick) -> Decision | None:
    """A scale-down refused because it would undo the last scale-up while the load is about what it
    was then (None: it would not). That pair is exactly a reversal (reversals.py): the scale-up was
    answered to a wobble the scale-down window outlasted, not to traffic that turned. So within
    REVERSAL_WINDOW_S of a scale-up, pods go only once the load has fallen by REVERSAL_TOLERANCE
    from it - a burst that ends is given back at once, a plateau's noise holds the count. Ray Serve
    likewise restarts its delays when the direction flips."""
    last, load = tick.history.last_up, tick.load
    if last is None or load is None:
        return None
    since, then = tick.now - last[0], last[1]
    window = dt.timedelta(seconds=REVERSAL_WINDOW_S)
    if since > window or load < (1 - REVERSAL_TOLERANCE) * then:
        return None
    left = format_duration(window - since)
    message = (
        f"a scale-down would undo the scale-up of {format_duration(since)} ago: load {load:.3g} rps, "
        f"{then:.3g} then (not {REVERSAL_TOLERANCE:.0%} lower): holding {tick.current} for {left} more"
    )
    return tick.decide(tick.current, Reason.WOULD_FLAP, "would-flap", message)

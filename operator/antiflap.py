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

from voxscale.operator.policy import format_duration
from voxscale.operator.state import Decision, Reason
from voxscale.operator.tick import Tick
from voxscale.operator.triggers import kind
from voxscale.operator.triggers.base import fights


def fighters(tick: Tick, to: int) -> list[str]:
    """What the triggers that would ask to scale up again at `to` replicas would read there (empty:
    none would). Sized triggers are left out: they recommend a count, not a ratio, and the guard
    already keeps the fleet at what demand needs."""
    out = []
    for t, r in zip(tick.policy.triggers, tick.readings, strict=True):
        if r.value is None or t.sized:
            continue
        fight = fights(t, r.value, kind(t).summed, tick.current, tick.ready, tick.current - to)
        if fight is not None:
            out.append(fight)
    return out


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
        if t.scale_down_below is not None and r.value is not None
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

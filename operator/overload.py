"""Overload: demand beyond what the fleet serves within the SLO, and what it changes in a decision.

The fleet is overloaded when the pods report p95 beyond the objective, requests refused (429), or
demand at twice the ready capacity or more (operator/triggers/slo.py's `overload`, Knative's panic
mode is the model). Requests are being served late or refused right now, so no clock may delay the
answer: the count sized from demand is reached in one step past the scale-up stabilisation window
and cooldown, and no scale-down happens until the overload is over. Every other rule (bounds,
floors, the scale-down window) is untouched; engine.py calls these at the points where they apply.
"""

from __future__ import annotations

from collections.abc import Mapping

from voxscale.operator.policy import Trigger
from voxscale.operator.state import Decision, Reason
from voxscale.operator.tick import Tick
from voxscale.operator.triggers import slo as slo_kind


def detect(slo: Trigger, inputs: Mapping[str, float], ready_capacity: float, arrivals: float | None) -> str | None:
    """Why the fleet is overloaded now (for status and the explanation), None when it is not."""
    return slo_kind.overload(slo, inputs, ready_capacity, arrivals)


def rushes(tick: Tick) -> bool:
    """Whether this scale-up skips the stabilisation window and the cooldown: the fleet is
    overloaded and a count sized from demand is above the current one. A ratio-based trigger alone
    never rushes (its answer feeds back on itself; the window is what keeps it from oscillating)."""
    return tick.overload is not None and tick.sized > tick.current


def rushed_to(tick: Tick, stabilised: int) -> int:
    """The count a rushed scale-up aims for: at least what demand needs, whatever the window says."""
    return max(stabilised, tick.sized)


def holds_scale_down(tick: Tick) -> Decision | None:
    """A scale-down refused because the fleet is overloaded (None: it is not). Removing capacity
    while requests are refused or late would only make it worse, whatever the window recommends."""
    if tick.overload is None:
        return None
    return tick.decide(tick.current, Reason.OVERLOAD, "overload", f"{tick.overload}: holding {tick.current}")


def aside(tick: Tick) -> str:
    """The overload, as a parenthesis to the SLO model's explanation ("" when there is none)."""
    return f" ({tick.overload})" if tick.overload else ""

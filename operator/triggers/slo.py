"""slo: the fewest replicas that keep p95 latency within the SLO at the demand arriving now.

Demand is every request counted at the pods' door, refused ones included, so it stays visible when
queues are full (a full queue reads the same at 2x and at 10x overload; demand does not). Capacity is
what one replica serves per second, measured on the pods as completed requests / busy seconds while
they are busy enough for that to mean something, and read now in requests or in input characters,
whichever predicts it better as the request mix shifts (`capacity.py`); until then it is the
`replicaCapacity` figure from the spec, and the explanation says so. The sizing is the M/M/c model in `queueing.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from voxscale.operator import queries
from voxscale.operator.policy import Trigger
from voxscale.operator.queueing import replicas_for_slo
from voxscale.operator.triggers.base import Context, Recommendation

# A backlog already queued is worked off within this long, on top of the arrivals.
BACKLOG_DRAIN_SECONDS = 30.0
# Arrivals are also read over the last 1/RECENT_FRACTION of the rate window: a burst shows there
# first, while the full window keeps a steady load's estimate smooth; demand is the higher of the two.
RECENT_FRACTION = 4
# A rise of the recent rate over the window's counts as a trend beyond this many standard deviations
# of Poisson noise (chosen on the simulator's traces: 3 bought 4 % more GPU-hours on day/night ramps
# for nothing, 6 keeps the first-morning and burst gains); its extrapolation is capped at TREND_CAP.
TREND_Z = 6.0
TREND_CAP = 1.5
TREND_MAX_EXTRA = 1
# Demand at this multiple of the ready capacity is overload (Knative's KPA panics at 200 %).
PANIC_RATIO = 2.0
# A replica busier than this is near saturation: its completed/busy ratio is its capacity.
CAPACITY_MIN_BUSY = 0.6


def size(trigger: Trigger, demand_rps: float, capacity_rps: float) -> int:
    """Replicas that meet the trigger's latency SLO at `demand_rps` (0 with no demand)."""
    return replicas_for_slo(demand_rps, capacity_rps, trigger.slots, trigger.latency_seconds, trigger.quantile)


def trend(trigger: Trigger, arrivals: float | None, inputs: Mapping[str, float], lookahead_seconds: float) -> float:
    """Demand's rise over the look-ahead, extrapolated from the last rate window: the growth factor
    to size for, 1 unless arrivals over the recent part of the window exceed the whole window's rate
    by more than Poisson noise could (TREND_Z standard deviations).

    The forecaster's growth needs hours of busy history; a ramp on a fresh service, or one the history
    never saw, would otherwise be chased one pod start behind. The slope is (recent - window) over
    the distance between the two windows' midpoints.
    """
    recent = inputs.get("recent")
    window_s = trigger.rate_window.total_seconds()
    recent_s = math.ceil(window_s / RECENT_FRACTION)
    if arrivals is None or recent is None or arrivals <= 0 or window_s <= recent_s:
        return 1.0
    if recent - arrivals <= TREND_Z * math.sqrt(arrivals / recent_s):
        return 1.0
    slope = (recent - arrivals) / ((window_s - recent_s) / 2)
    return min(1.0 + slope * lookahead_seconds / recent, TREND_CAP)


def overload(
    trigger: Trigger, inputs: Mapping[str, float], ready_capacity: float, arrivals: float | None
) -> str | None:
    """Why the fleet is overloaded now, from what the pods report at their door (None: it is not).
    Overload is answered from demand at once and forbids a scale-down until it is over."""
    p95, refused = inputs.get("p95"), inputs.get("refused")
    if p95 is not None and p95 > trigger.latency_seconds:
        return f"p95 {p95:.3g}s beyond the {trigger.latency_seconds:g}s objective"
    if refused is not None and refused > 0:
        return f"{refused:.3g} requests/s refused (429)"
    if arrivals and arrivals >= PANIC_RATIO * ready_capacity:
        return f"demand {arrivals:.3g} rps at {PANIC_RATIO:g}x or more of the ready capacity ({ready_capacity:.3g} rps)"
    return None


def demand(
    arrivals: float, inputs: Mapping[str, float], headroom: float = 1.0, burst: float = 0.0
) -> tuple[float, float]:
    """(requests/s arriving, what the fleet must carry by the time a pod it orders now is Ready):
    arrivals grown by the headroom, or by the burst recent traffic showed within a pod start if that
    is more (forecast.burst), plus the backlog to work off."""
    arriving = max(arrivals, inputs.get("recent", arrivals))
    grown = max(arriving * headroom, arriving + burst)
    return arriving, grown + inputs.get("backlog", 0.0) / BACKLOG_DRAIN_SECONDS


class Slo:
    prefixes: tuple[str, ...] = ("arrivals:", "capacity:", "refused:", "characters:")
    reads_pods = True
    summed = False

    def validate(self, trigger: Trigger, field: str) -> None:
        return None

    def inputs(self, trigger: Trigger) -> dict[str, str | None]:
        seconds = trigger.rate_window.total_seconds()
        window, recent = f"{seconds:g}", f"{math.ceil(seconds / RECENT_FRACTION)}"
        return {
            "value": f"arrivals:{window}",
            "recent": f"arrivals:{recent}",
            "capacity": f"capacity:{window}",
            "characters": f"characters:{window}",  # the unit of work: capacity.py
            "backlog": "queue",
            "p95": "latency",  # overload: p95 beyond the objective
            "refused": f"refused:{window}",  # overload: requests answered 429
        }

    def query(self, key: str, namespaces: Iterable[str]) -> str:
        kind, _, window = key.partition(":")
        seconds = float(window)
        if kind == "arrivals":
            return queries.arrival_rate(namespaces, seconds)
        if kind == "refused":
            return queries.refused_rate(namespaces, seconds)
        if kind == "characters":
            return queries.character_rate(namespaces, seconds)
        return queries.capacity(namespaces, seconds, CAPACITY_MIN_BUSY)

    def recommend(self, trigger: Trigger, value: float, ctx: Context) -> Recommendation:
        capacity = ctx.capacity_rps or trigger.capacity_rps
        backlog = ctx.inputs.get("backlog", 0.0)
        arriving, carried = demand(value, ctx.inputs, ctx.headroom, ctx.burst)
        need = size(trigger, carried, capacity)
        grown = f" +{ctx.headroom - 1:.0%} rise" if ctx.headroom > 1.005 else ""
        if arriving + ctx.burst > arriving * ctx.headroom:
            grown = f" +{ctx.burst:.3g} rps for bursts seen lately"
        source = "assumed: not yet measured under load"
        if ctx.capacity_measured:
            source = f"measured, in {ctx.capacity_unit}"
        queued = f" + {backlog:.0f} queued" if backlog >= 1 else ""
        note = (
            f"demand {arriving:.3g} rps{grown}{queued} = {carried / capacity:.1f} replicas at {capacity:.3g} rps each "
            f"({source}); p{trigger.quantile * 100:g} {trigger.latency_seconds:g}s needs {need}"
        )
        ahead = self._ahead_of_rise(trigger, value, ctx, capacity, need)
        if ahead > need:
            note += f", {ahead} ahead of a rise under way (+{ctx.trend - 1:.0%} over a pod start)"
        return Recommendation(ahead, note, sized=True)

    @staticmethod
    def _ahead_of_rise(trigger: Trigger, value: float, ctx: Context, capacity: float, need: int) -> int:
        """A rise under way steeper than the usual one adds at most TREND_MAX_EXTRA replicas per
        decision: a steady ramp keeps the fleet that far ahead of it, while a step (which two rate
        windows cannot tell from a ramp) overshoots by no more than that."""
        if ctx.trend <= ctx.headroom:
            return need
        rising = size(trigger, demand(value, ctx.inputs, ctx.trend, ctx.burst)[1], capacity)
        return min(rising, need + TREND_MAX_EXTRA)

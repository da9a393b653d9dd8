"""The interface every trigger kind implements, and the shared proportional/threshold arithmetic.

A trigger kind is one small module (like a KEDA scaler): which Prometheus series it reads, how it
checks its own settings, and how it turns one tick's value into a replica recommendation. The
registry in `__init__.py` maps a manifest's `type` to the kind; nothing else branches on the type.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from voxscale.operator.policy import Trigger, format_duration


@dataclass(frozen=True)
class Context:
    """What a trigger may know about the fleet and the tick besides its own value."""

    replicas: int  # the Deployment's spec.replicas (pods ready or starting)
    ready: int
    step_up: int  # pods a threshold trigger may add in one step
    above_for: dt.timedelta | None  # how long the value has been above scaleUpAbove (None: it is not)
    inputs: Mapping[str, float]  # the trigger's secondary inputs this tick (role -> value), when present
    capacity_rps: float | None = None  # one replica's capacity, measured or assumed (SLO kinds)
    capacity_measured: bool = False
    capacity_unit: str = ""  # the unit a measured capacity was read in ("requests", "characters")
    headroom: float = 1.0  # demand's usual rise over a pod start (slo kinds size for demand x this)
    burst: float = 0.0  # requests/s a recent burst rose by within a pod start (slo kinds hold room for it)
    trend: float = 1.0  # the rise under way now, extrapolated over a pod start (slo kinds lean on it a little)
    needed: int | None = None  # what the SLO model sizes for the demand now (None: no model or no data)
    stuck: int = 0  # pods not Ready for longer than a cold start (ImagePullBackOff...): not on their way

    @property
    def starting(self) -> int:
        """Pods on their way to Ready; stuck ones (not Ready for longer than a cold start) are not."""
        return max(0, self.replicas - self.ready - self.stuck)


@dataclass(frozen=True)
class Recommendation:
    replicas: int | None  # None: no opinion this tick
    note: str  # prose for status and Events
    # A count sized from demand and capacity, not a ratio of the current count: it has no feedback on
    # itself, so it is reached in one step (up to max) instead of through the step limits.
    sized: bool = False


class TriggerKind(Protocol):
    prefixes: tuple[str, ...]  # the batch keys it answers start with one of these
    # Reads series the inference pods publish: at zero pods it has no data by construction, which is
    # no news (only a trigger on something outside the pods, like a gateway's counter, can wake them).
    reads_pods: bool
    # The value is a total over the pods (a queue), not an average: what removing pods does to it.
    summed: bool

    def validate(self, trigger: Trigger, field: str) -> None:
        """Raise SpecError naming the field for settings the CRD schema cannot judge."""

    def inputs(self, trigger: Trigger) -> dict[str, str | None]:
        """Role -> batch key of the series it reads ("value" is the main one; None: a per-object query)."""

    def query(self, key: str, namespaces: Iterable[str]) -> str:
        """The batched PromQL for one of its batch keys (every TTSDeployment at once)."""

    def recommend(self, trigger: Trigger, value: float, ctx: Context) -> Recommendation:
        """One tick's replica recommendation and the words that explain it."""


@runtime_checkable
class ExplainsMissing(Protocol):
    """A kind whose empty result can be explained by the labels its series do carry (a mismatched join)."""

    def probe(self, key: str) -> str:
        """A series selector whose label names explain an empty result for this batch key."""

    def explain_missing(self, key: str, trigger: str, namespace: str, name: str, seen: Sequence[str] | None) -> str:
        """The condition message naming what was seen and the fix (`seen` None: the names could not be read)."""


def fmt(trigger: Trigger, value: float) -> str:
    return f"{value:.3g}{trigger.unit}"


def named(trigger: Trigger, value: float) -> str:
    return f"{trigger.name} {fmt(trigger, value)}"


def proportional_and_threshold(trigger: Trigger, value: float, ctx: Context, summed: bool) -> Recommendation:
    """The HPA formula (target) and/or a sustained threshold (scaleUpAbove for sustainFor).

    `summed`: the value is a sum over pods with a per-replica target (a queue), so the count that
    brings it to target is value/target; otherwise an average over ready pods scales the ready count
    (pods still starting are capacity on its way, not counted twice).
    """
    recs: list[tuple[int, str]] = []
    pending = ""
    if trigger.target is not None:
        ratio = value / trigger.target
        if summed:
            rec = math.ceil(value / trigger.target - 1e-9)
            per_pod = value / ctx.replicas if ctx.replicas else math.inf
            within = abs(per_pod / trigger.target - 1) <= trigger.tolerance
        else:
            rec = math.ceil(ctx.ready * ratio - 1e-9)
            within = abs(ratio - 1) <= trigger.tolerance
            if ctx.replicas == 0 and value > 0:
                rec, within = 1, False  # activation, as KEDA's: any load wakes one replica, then the ratio applies
        target = fmt(trigger, trigger.target)
        if within:
            recs.append((ctx.replicas, f"{named(trigger, value)} within {trigger.tolerance:.0%} of target {target}"))
        else:
            recs.append((rec, f"{named(trigger, value)} vs target {target}"))
    if trigger.scale_up_above is not None and ctx.above_for is not None:
        above = f"{named(trigger, value)} > {fmt(trigger, trigger.scale_up_above)} for {format_duration(ctx.above_for)}"
        if ctx.above_for < trigger.sustain_for:
            pending = f"{above} of {format_duration(trigger.sustain_for)}"
        elif ctx.starting > 0:
            recs.append((ctx.replicas, f"{above}, {ctx.starting} pod(s) still starting"))
        elif ctx.needed is not None and ctx.needed > ctx.replicas + ctx.step_up:
            # A step sized by the step limit alone would take several sustain periods to catch up.
            recs.append((ctx.needed, f"{above}; demand needs {ctx.needed}"))
        else:
            recs.append((ctx.replicas + ctx.step_up, above))
    if not recs:
        return Recommendation(None, pending or f"{named(trigger, value)}, no threshold crossed")
    rec, note = max(recs, key=lambda r: r[0])
    return Recommendation(rec, f"{note}; {pending}" if pending else note)


def fights(trigger: Trigger, value: float, summed: bool, replicas: int, ready: int, removed: int) -> str | None:
    """What `trigger` would read after `removed` pods go, if that reading asks for a scale-up again
    (None: it would not). Pods not Ready go first (as a ReplicaSet removes them), then the load stays
    and spreads over the Ready pods left - the HPA's ratio in reverse: an average over the pods grows
    by ready/left, a total stays as it is. A scale-down this refuses is one flapping would undo."""
    left, count = ready - max(0, removed - (replicas - ready)), replicas - removed
    if left <= 0 or count <= 0:
        return f"{trigger.name} would have no pod to read" if value > 0 else None
    at = value if summed else value * ready / left
    if trigger.scale_up_above is not None and at > trigger.scale_up_above:
        return f"{trigger.name} would read {fmt(trigger, at)} > {fmt(trigger, trigger.scale_up_above)}"
    if trigger.target is not None:
        per_pod = at / count if summed else at
        if per_pod / trigger.target > 1 + trigger.tolerance:
            return f"{trigger.name} would read {fmt(trigger, at)} against target {fmt(trigger, trigger.target)}"
    return None

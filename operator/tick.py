"""One evaluation of the engine, as the phases after the recommendations see it, and the step-limit
arithmetic they share (the HPA's behaviour rules: a step per period, measured from the count at the
period's start)."""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, replace

from voxscale.operator.policy import ScalingMode, ScalingPolicy, StepPolicy
from voxscale.operator.state import Decision, Demand, History, Reason, ScaleEvent, TriggerReading


def step_limit(policy: StepPolicy, base: int, up: bool) -> int:
    """Pods one step may add (up) or remove from `base`: the larger of maxStepPods and maxStepPercent."""
    by_percent = base * policy.max_step_percent / 100
    return max(policy.max_step_pods, math.ceil(by_percent) if up else math.floor(by_percent))


def period_base(history: History, now: dt.datetime, period: dt.timedelta, current: int) -> int:
    """The replica count at the start of the step period (HPA measures step limits from there)."""
    in_period = [e for e in history.events if now - e.time < period]
    return in_period[0].old if in_period else current


@dataclass(frozen=True)
class Tick:
    """The facts of one evaluation, shared by the phase functions of engine.py, overload.py and
    antiflap.py; `decide()` turns a count and its reason into the Decision and the memory to keep."""

    policy: ScalingPolicy
    now: dt.datetime
    current: int
    ready: int
    readings: tuple[TriggerReading, ...]  # the user's triggers
    model: TriggerReading | None  # the SLO model's (the slo trigger's or the implicit objective's)
    active: str | None
    schedule_floor: int
    forecast_floor: int
    complete: bool
    metrics_message: str
    history: History
    next_history: History  # bookkeeping for this tick, before the scale event (if any) is added
    demand: Demand | None
    guard: int  # the fewest replicas that carry current and forecast demand within the SLO (0: no model)
    sized: int  # the highest count sized from demand (reached at once, past step limits), 0 with none
    # What the SLO model would ask for again at demand risen by its tolerance (0: no model or no data):
    # a scale-down below it is one the next ordinary wobble of the load would undo.
    rebound: int = 0
    load: float | None = None  # arrivals over the SLO model's rate window (None: no model or no data)
    # Per user trigger: the rise of its reading a scale-down must survive while it sits between its
    # thresholds (the swing of demand seen lately, at least its tolerance); empty: none.
    bands: tuple[float, ...] = ()

    @property
    def overload(self) -> str | None:
        return self.demand.overload if self.demand is not None else None

    @property
    def floor(self) -> int:
        return max(self.schedule_floor, self.forecast_floor)

    def decide(self, desired: int, reason: Reason, rule: str, message: str) -> Decision:
        events = self.history.events
        # Advice is not a scale event: the count it would change stays where it is.
        if desired != self.current and self.policy.mode is not ScalingMode.ADVISORY:
            events = (*events, ScaleEvent(self.now, self.current, desired))
        p = self.policy
        keep = max(p.scale_up.period, p.scale_down.period, p.scale_up.cooldown, p.scale_down.cooldown)
        hist = replace(self.next_history, events=tuple(e for e in events if self.now - e.time <= keep)[-20:])
        if desired > self.current and self.load is not None and self.policy.mode is not ScalingMode.ADVISORY:
            hist = replace(hist, last_up=(self.now, self.load))
        return Decision(
            desired=desired,
            current=self.current,
            reason=reason,
            rule=rule,
            message=message,
            readings=self.readings,
            active_schedule=self.active,
            schedule_floor=self.schedule_floor,
            metrics_available=self.complete,
            metrics_message=self.metrics_message,
            history=hist,
            demand=self.demand,
            forecast_floor=self.forecast_floor,
        )

"""Helpers to drive the pure scaling engine on an injected clock (shared by scenario and property tests)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from voxscale.operator import crd
from voxscale.operator.engine import Decision, History, Metrics, Observed, decide
from voxscale.operator.policy import ScalingPolicy
from voxscale.simulator.model import Fleet

T0 = dt.datetime(2026, 3, 2, 0, 0, 0, tzinfo=dt.UTC)


def policy(scaling: dict[str, Any], replicas: dict[str, Any] | None = None) -> ScalingPolicy:
    """A policy from a manifest fragment, defaulted by the CRD file exactly as the API server would."""
    obj = {"spec": {"model": {"image": "tts:1"}, "replicas": replicas or {"min": 1, "max": 10}, "scaling": scaling}}
    return ScalingPolicy.from_spec(crd.apply_defaults(obj)["spec"])


@dataclass
class Run:
    """Steps the engine tick by tick on the simulator's fleet model: pods become Ready `cold_start`
    after they are requested."""

    policy: ScalingPolicy
    replicas: int
    now: dt.datetime = T0
    cold_start: dt.timedelta = dt.timedelta(0)
    history: History = field(default_factory=History)
    decisions: list[tuple[dt.datetime, Decision]] = field(default_factory=list)
    fleet: Fleet = field(init=False)
    origin: dt.datetime = field(init=False)  # the fleet's clock counts seconds from the first tick

    def __post_init__(self) -> None:
        self.fleet = Fleet(self.replicas, self.cold_start.total_seconds())
        self.origin = self.now

    def _seconds(self) -> float:
        return (self.now - self.origin).total_seconds()

    @property
    def ready(self) -> int:
        return self.fleet.tick(self._seconds())

    def tick(self, metrics: Metrics) -> Decision:
        d = decide(self.policy, Observed(self.replicas, self.ready), metrics, self.now, self.history)
        self.history = d.history
        if d.desired != self.replicas:
            self.fleet.scale(self._seconds(), d.desired)
        self.replicas = d.desired
        self.decisions.append((self.now, d))
        return d

    def run(self, seconds: float, step: float, metrics: Callable[[dt.datetime], Metrics]) -> list[Decision]:
        """Tick every `step` seconds for `seconds`, starting now; returns the decisions."""
        out = []
        end = self.now + dt.timedelta(seconds=seconds)
        while self.now < end:
            out.append(self.tick(metrics(self.now)))
            self.now += dt.timedelta(seconds=step)
        return out

    def changes(self) -> list[tuple[float, int, int, str]]:
        """(seconds since T0, from, to, rule) for every scale event."""
        return [((t - T0).total_seconds(), d.current, d.desired, d.rule) for t, d in self.decisions if d.changed]


def const(**values: float) -> Callable[[dt.datetime], Metrics]:
    return lambda _now: Metrics(dict(values))

"""Typed view of a TTSDeployment's scaling settings, parsed from its (defaulted) spec.

The CRD's schema and CEL rules refuse most bad manifests at admission; what they cannot judge
(a cron expression, a timezone name) is checked here, and every error names the field and the fix.
"""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from croniter import croniter

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class SpecError(ValueError):
    """A setting the operator cannot use; `field` is the JSON path a user has to fix."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def parse_duration(text: str, field: str) -> dt.timedelta:
    """Go-style duration ('90s', '1m30s', '2h') as used by Kubernetes APIs."""
    if not isinstance(text, str) or not text:
        raise SpecError(field, f"expected a duration such as 30s, 2m or 1h30m, got {text!r}")
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(text):
        raise SpecError(field, f"expected a duration such as 30s, 2m or 1h30m, got {text!r}")
    return dt.timedelta(seconds=total)


def format_duration(td: dt.timedelta) -> str:
    """'2m10s'-style text for explanations."""
    secs = round(td.total_seconds())
    h, rem = divmod(secs, 3600)
    m, s = divmod(rem, 60)
    out = (f"{h}h" if h else "") + (f"{m}m" if m else "") + (f"{s}s" if s or not (h or m) else "")
    return out


class TriggerType(StrEnum):
    GPU_UTILIZATION = "gpuUtilization"
    QUEUE_LENGTH = "queueLength"
    LATENCY_P95 = "latencyP95"
    PROMQL = "promql"
    SLO = "slo"


@dataclass(frozen=True)
class Trigger:
    name: str
    type: TriggerType
    target: float | None = None
    tolerance: float = 0.1
    scale_up_above: float | None = None
    sustain_for: dt.timedelta = dt.timedelta(0)
    scale_down_below: float | None = None
    gpu_metric: str = "DCGM_FI_DEV_GPU_UTIL"
    query: str | None = None
    # type slo: the latency objective, the capacity assumed until measured, and the rate window.
    latency_seconds: float = 2.0
    quantile: float = 0.95
    capacity_rps: float = 16.0
    slots: int = 1  # service slots per replica: the batch on a GPU, 1 on a CPU
    rate_window: dt.timedelta = dt.timedelta(minutes=1)

    @property
    def unit(self) -> str:
        return {"gpuUtilization": "%", "latencyP95": "s", "slo": " rps"}.get(self.type.value, "")

    @property
    def sized(self) -> bool:
        """Sized from demand and capacity (slo) rather than proportional/threshold."""
        return self.type is TriggerType.SLO


@dataclass(frozen=True)
class Schedule:
    name: str
    cron: str
    timezone: zoneinfo.ZoneInfo
    duration: dt.timedelta
    min_replicas: int
    prewarm: dt.timedelta = dt.timedelta(0)
    # The last (start, next start) cron interval found: reused until the probe leaves it, so a
    # simulated week costs a handful of cron computations rather than one per tick.
    _fires: list[dt.datetime] = field(default_factory=list, compare=False, repr=False)

    def _start_at_or_before(self, probe: dt.datetime) -> dt.datetime:
        if self._fires and self._fires[0] <= probe < self._fires[1]:
            return self._fires[0]
        # croniter's get_prev is strict; nudge forward so a start exactly at `probe` counts.
        it = croniter(self.cron, probe + dt.timedelta(seconds=1))
        start: dt.datetime = it.get_prev(dt.datetime)
        if start > probe:
            start = it.get_prev(dt.datetime)
        following: dt.datetime = croniter(self.cron, start).get_next(dt.datetime)
        self._fires[:] = [start, following]
        return start

    def active_window(self, now: dt.datetime) -> tuple[dt.datetime, dt.datetime] | None:
        """The (start, end) of the window in force at `now` (pre-warm included), or None.

        The window opens `prewarm` before each cron start and closes `duration` after it. Cron is read
        in the schedule's own timezone, so 08:00 stays 08:00 local across DST changes.
        """
        probe = (now + self.prewarm).astimezone(self.timezone)
        start = self._start_at_or_before(probe)
        if now < start + self.duration:
            return start - self.prewarm, start + self.duration
        return None


@dataclass(frozen=True)
class StepPolicy:
    stabilization_window: dt.timedelta
    max_step_pods: int
    max_step_percent: int
    period: dt.timedelta
    cooldown: dt.timedelta


class ScalingMode(StrEnum):
    ACTIVE = "active"
    ADVISORY = "advisory"  # decide and report, never write the scale


@dataclass(frozen=True)
class Predictive:
    """The forecast floor: demand learnt from Prometheus history, sized with the slo trigger."""

    enabled: bool
    cold_start: dt.timedelta  # assumed until pod starts are observed
    min_history: dt.timedelta
    lookback: dt.timedelta
    timezone: zoneinfo.ZoneInfo


class FallbackMode(StrEnum):
    HOLD = "hold"
    FIXED = "fixed"


@dataclass(frozen=True)
class Fallback:
    mode: FallbackMode = FallbackMode.HOLD
    replicas: int | None = None
    allow_below_current: bool = False


@dataclass(frozen=True)
class ScalingPolicy:
    """Everything the engine needs from a TTSDeployment's spec."""

    min_replicas: int
    max_replicas: int
    interval: dt.timedelta
    paused: bool
    triggers: tuple[Trigger, ...]
    schedules: tuple[Schedule, ...]
    scale_up: StepPolicy
    scale_down: StepPolicy
    fallback: Fallback
    mode: ScalingMode
    predictive: Predictive

    # The SLO model for a policy without an slo trigger (spec.scaling.slo); None when it has one, or
    # when spec.scaling.slo.enabled is false.
    objective: Trigger | None = None

    @property
    def slo(self) -> Trigger | None:
        """The SLO model every decision keeps: the slo trigger if the user wrote one (at most one), else
        the implicit objective. The demand floor, the forecast floor and the safe scale-down use it."""
        return next((t for t in self.triggers if t.sized), self.objective)

    @property
    def queried(self) -> tuple[Trigger, ...]:
        """Every trigger whose inputs are read from Prometheus: the user's, and the implicit objective."""
        return (*self.triggers, self.objective) if self.objective is not None else self.triggers

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ScalingPolicy:
        """Parse a `spec`, first defaulted from the CRD's own schema (the one table of defaults), so a
        spec the API server stored and a partial one from a file or a test read the same way."""
        from voxscale.operator import crd  # crd reads package data; kept out of this module's import

        spec = crd.default_spec(spec)
        replicas = spec["replicas"]
        scaling = spec["scaling"]
        lo, hi = int(replicas["min"]), int(replicas["max"])
        if lo > hi:
            raise SpecError("spec.replicas.min", f"min ({lo}) must be <= max ({hi})")
        if lo == 0 and not replicas.get("allowScaleToZero", False):
            raise SpecError("spec.replicas.min", "0 requires spec.replicas.allowScaleToZero: true")
        slots = replica_slots(spec)
        objective = scaling["slo"]
        triggers = tuple(
            _parse_trigger(t, f"spec.scaling.triggers[{i}]", slots, objective)
            for i, t in enumerate(scaling.get("triggers", []))
        )
        names = [t.name for t in triggers]
        if len(set(names)) != len(names):
            raise SpecError("spec.scaling.triggers", f"trigger names must be unique, got {names}")
        if sum(t.sized for t in triggers) > 1:
            raise SpecError("spec.scaling.triggers", "at most one trigger of type slo")
        schedules = tuple(
            _parse_schedule(s, f"spec.scaling.schedules[{i}]", hi) for i, s in enumerate(scaling.get("schedules", []))
        )
        if lo == 0 and not schedules and all(t.type is not TriggerType.PROMQL for t in triggers):
            raise SpecError(
                "spec.replicas.min",
                "0 needs a signal that exists while no pod runs: a promql trigger (e.g. on your gateway's "
                "request counter) or a schedule; slo, gpu, queue and latency triggers read the pods themselves",
            )
        fb = scaling["fallback"]
        fallback = Fallback(FallbackMode(fb["mode"]), fb.get("replicas"), bool(fb["allowBelowCurrent"]))
        if fallback.mode is FallbackMode.FIXED and fallback.replicas is None:
            raise SpecError("spec.scaling.fallback.replicas", "required when mode is fixed")
        return cls(
            min_replicas=lo,
            max_replicas=hi,
            interval=parse_duration(scaling["interval"], "spec.scaling.interval"),
            paused=bool(scaling["paused"]),
            triggers=triggers,
            schedules=schedules,
            scale_up=_parse_step(scaling["scaleUp"], "spec.scaling.scaleUp"),
            scale_down=_parse_step(scaling["scaleDown"], "spec.scaling.scaleDown"),
            fallback=fallback,
            mode=ScalingMode(scaling["mode"]),
            predictive=_parse_predictive(scaling["predictive"], "spec.scaling.predictive"),
            objective=None if any(t.sized for t in triggers) else _implicit_objective(objective, slots),
        )


# The key the implicit objective's inputs are read under in Metrics.values ("(slo)", "(slo).capacity",
# ...): outside the trigger name pattern, so no user trigger can take it.
IMPLICIT_SLO = "(slo)"


def replica_slots(spec: dict[str, Any]) -> int:
    """Requests one replica works on at once (the M/M/c model's slots per replica), for a defaulted spec:
    spec.scaling.slo.concurrency; else the door's concurrency behind the door sidecar; 1 for an attached
    workload (nothing is known of it: one queue per replica is the conservative reading); else the batch
    on a GPU and 1 on the CPU for voxscale's own server."""
    from voxscale.proxy.settings import CONCURRENCY  # pure data: the door's own default, not a copy

    explicit = spec["scaling"]["slo"].get("concurrency")
    if explicit is not None:
        return int(explicit)
    if spec.get("targetRef"):
        return 1
    door = spec.get("proxy") or {}
    if door.get("enabled"):
        return int(door.get("concurrency", CONCURRENCY.default))
    return int(spec["model"]["maxBatchSize"]) if int(spec["resources"]["gpus"]) > 0 else 1


def _implicit_objective(raw: dict[str, Any], slots: int) -> Trigger | None:
    """spec.scaling.slo as an slo trigger of its own, unless opted out (enabled: false)."""
    if not raw.get("enabled", True):
        return None
    settings = _slo_settings({}, "spec.scaling.slo", slots, raw)
    return Trigger(name=IMPLICIT_SLO, type=TriggerType.SLO, **settings)


def _parse_predictive(raw: dict[str, Any], field: str) -> Predictive:
    return Predictive(
        enabled=bool(raw["enabled"]),
        cold_start=parse_duration(raw["coldStart"], f"{field}.coldStart"),
        min_history=parse_duration(raw["minHistory"], f"{field}.minHistory"),
        lookback=parse_duration(raw["lookback"], f"{field}.lookback"),
        timezone=_zone(raw["timezone"], f"{field}.timezone"),
    )


def _zone(name: str, field: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise SpecError(field, f"unknown IANA timezone {name!r} (e.g. Europe/Berlin, UTC)") from None


def _parse_step(v: dict[str, Any], field: str) -> StepPolicy:
    return StepPolicy(
        stabilization_window=parse_duration(v["stabilizationWindow"], f"{field}.stabilizationWindow"),
        max_step_pods=int(v["maxStepPods"]),
        max_step_percent=int(v["maxStepPercent"]),
        period=parse_duration(v["period"], f"{field}.period"),
        cooldown=parse_duration(v["cooldown"], f"{field}.cooldown"),
    )


def _parse_trigger(raw: dict[str, Any], field: str, slots: int, objective: dict[str, Any]) -> Trigger:
    try:
        kind = TriggerType(str(raw.get("type")))
    except ValueError:
        allowed = ", ".join(t.value for t in TriggerType)
        raise SpecError(f"{field}.type", f"unknown trigger type {raw.get('type')!r}; use one of {allowed}") from None
    trig = Trigger(
        name=str(raw.get("name") or kind.value),
        type=kind,
        target=_opt_float(raw.get("target")),
        tolerance=float(raw["tolerance"]),
        scale_up_above=_opt_float(raw.get("scaleUpAbove")),
        sustain_for=parse_duration(raw["sustainFor"], f"{field}.sustainFor"),
        scale_down_below=_opt_float(raw.get("scaleDownBelow")),
        gpu_metric=str(raw.get("gpuMetric", "DCGM_FI_DEV_GPU_UTIL")),
        query=raw.get("query"),
        **(_slo_settings(raw.get("slo"), f"{field}.slo", slots, objective) if kind is TriggerType.SLO else {}),
    )
    if not trig.sized and trig.target is None and trig.scale_up_above is None:
        raise SpecError(field, "a trigger needs target (proportional) or scaleUpAbove (threshold)")
    if trig.target is not None and trig.target <= 0:
        raise SpecError(f"{field}.target", "must be > 0")
    from voxscale.operator.triggers import kind as trigger_kind  # the kinds import this module

    trigger_kind(trig).validate(trig, field)
    return trig


def _slo_settings(raw: Any, field: str, slots: int, objective: dict[str, Any]) -> dict[str, Any]:
    """An slo trigger's settings: each one it leaves out is spec.scaling.slo's (the one table of
    defaults, filled in from the CRD), so the objective is stated once."""
    if not isinstance(raw, dict):
        raise SpecError(field, "a slo trigger needs slo settings, e.g. slo: {latencyP95: 2s}")
    slo = {**objective, **raw}
    latency = parse_duration(slo.get("latencyP95", ""), f"{field}.latencyP95").total_seconds()
    if latency <= 0:
        raise SpecError(f"{field}.latencyP95", "must be longer than 0s")
    capacity = float(slo.get("replicaCapacity", 0))
    if capacity <= 0:
        raise SpecError(f"{field}.replicaCapacity", "requests/s one replica serves; must be > 0")
    window = parse_duration(slo.get("rateWindow", ""), f"{field}.rateWindow")
    return {"latency_seconds": latency, "capacity_rps": capacity, "slots": slots, "rate_window": window}


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _parse_schedule(raw: dict[str, Any], field: str, max_replicas: int) -> Schedule:
    tz = _zone(raw.get("timezone", "UTC"), f"{field}.timezone")
    cron = str(raw.get("cron", ""))
    if len(cron.split()) != 5 or not croniter.is_valid(cron):
        raise SpecError(f"{field}.cron", f"cannot parse cron expression {cron!r}; use 5 fields, e.g. '0 8 * * *'")
    sched = Schedule(
        name=str(raw.get("name", "")),
        cron=cron,
        timezone=tz,
        duration=parse_duration(raw.get("duration", ""), f"{field}.duration"),
        min_replicas=int(raw.get("minReplicas", 0)),
        prewarm=parse_duration(raw.get("prewarm", "0s"), f"{field}.prewarm"),
    )
    if sched.min_replicas > max_replicas:
        raise SpecError(f"{field}.minReplicas", f"{sched.min_replicas} exceeds spec.replicas.max ({max_replicas})")
    if sched.prewarm >= sched.duration:
        raise SpecError(f"{field}.prewarm", "must be shorter than duration")
    return sched

"""Pure construction of a TTSDeployment's status: conditions per Kubernetes conventions and the
last decision, from what the scaler observed. Transition times only move when a status flips.

`build()` returns the WHOLE status and the scaler replaces status with it: a key this round has no
value for is absent, not left over from an earlier round (a merge patch never deletes keys, and a
new leader would read stale clocks, schedules and metric values back from them).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from voxscale.operator.engine import Decision, History, p90
from voxscale.operator.reversals import Flapping


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def merge_conditions(
    previous: list[dict[str, Any]], new: list[Condition], now: dt.datetime, generation: int
) -> list[dict[str, Any]]:
    """New conditions, keeping each one's lastTransitionTime unless its status changed."""
    before = {c.get("type"): c for c in previous or []}
    out = []
    for c in new:
        old = before.get(c.type)
        changed = old is None or old.get("status") != c.status
        out.append(
            {
                "type": c.type,
                "status": c.status,
                "reason": c.reason,
                "message": c.message,
                "lastTransitionTime": iso(now) if changed or old is None else old.get("lastTransitionTime"),
                "observedGeneration": generation,
            }
        )
    return out


def ready_condition(
    ready: int,
    replicas: int,
    min_replicas: int,
    deployment_found: bool,
    target: str | None = None,
    target_problem: str | None = None,
) -> Condition:
    """`target`: the workload spec.targetRef attaches to (None: the TTSDeployment's own Deployment);
    `target_problem`: why it could not be read (RBAC, no scale subresource)."""
    if target is not None and target_problem is not None:
        return Condition(
            "Ready", "False", "TargetUnavailable", f"cannot read {target} (spec.targetRef): {target_problem}"
        )
    if not deployment_found and target is not None:
        message = (
            f"{target} (spec.targetRef) does not exist: create it, or point spec.targetRef at a workload in "
            "this namespace (voxscale creates nothing for an attached TTSDeployment)"
        )
        return Condition("Ready", "False", "TargetMissing", message)
    if not deployment_found:
        return Condition("Ready", "False", "DeploymentMissing", "the inference Deployment does not exist yet")
    needed = max(1, min(min_replicas, replicas)) if replicas else max(0, min_replicas)
    if needed == 0:
        return Condition("Ready", "True", "ScaledToZero", "scaled to zero, as allowed")
    if ready >= needed:
        return Condition("Ready", "True", "MinimumReplicasReady", f"{ready}/{replicas} pods ready")
    return Condition("Ready", "False", "PodsStarting", f"{ready}/{replicas} pods ready, {needed} needed")


def scaling_conditions(
    decision: Decision | None,
    spec_error: str | None,
    paused: bool,
    conflict: str | None = None,
    pending: tuple[str, str] | None = None,
    target: str | None = None,
    shadowing: str | None = None,
) -> list[Condition]:
    """`pending` (reason, message): no answer this round, so `decision` is the one kept from before.
    `conflict`: another autoscaler that scales the workload, so voxscale writes nothing (refused);
    `shadowing`: the same in advisory mode, which writes nothing anyway and so shadows it."""
    conditions = _scaling_conditions(decision, spec_error, paused, conflict, target, shadowing)
    if pending is None or spec_error is not None:
        return conditions
    unknown = Condition("MetricsAvailable", "Unknown", *pending)
    return [unknown if c.type == unknown.type else c for c in conditions]


def _scaling_conditions(
    decision: Decision | None,
    spec_error: str | None,
    paused: bool,
    conflict: str | None,
    target: str | None = None,
    shadowing: str | None = None,
) -> list[Condition]:
    if spec_error is not None:
        return [
            Condition("ScalingActive", "False", "InvalidSpec", spec_error),
            Condition("MetricsAvailable", "Unknown", "InvalidSpec", "not queried: the scaling spec is invalid"),
        ]
    if decision is None:
        return [
            Condition("ScalingActive", "Unknown", "Pending", "waiting for the first evaluation"),
            Condition("MetricsAvailable", "Unknown", "Pending", "not queried yet"),
        ]
    workload = target or "the Deployment"
    if conflict is not None:
        why = (
            f"{conflict} also scales {workload}: not writing replicas (would set {decision.desired}); remove that "
            "autoscaler (or this TTSDeployment), or set spec.scaling.mode: advisory to shadow it"
        )
        active = Condition("ScalingActive", "False", "ConflictingAutoscaler", why)
    elif shadowing is not None:
        why = (
            f"advisory, shadowing {shadowing}, which scales {workload}: voxscale advises {decision.desired} "
            f"replicas and writes nothing; {decision.message}"
        )
        active = Condition("ScalingActive", "True", "ShadowingAutoscaler", why)
    elif paused:
        active = Condition("ScalingActive", "False", "Paused", decision.message)
    else:
        active = Condition("ScalingActive", "True", "Evaluating", decision.message)
    if not decision.readings:
        metrics = Condition("MetricsAvailable", "Unknown", "NoTriggers", decision.metrics_message)
    elif decision.metrics_available:
        metrics = Condition("MetricsAvailable", "True", "QueriesSucceeded", decision.metrics_message)
    else:
        metrics = Condition("MetricsAvailable", "False", "MetricsUnavailable", decision.metrics_message)
    return [active, metrics]


def last_decision(decision: Decision, now: dt.datetime) -> dict[str, Any]:
    out: dict[str, Any] = {
        "time": iso(now),
        "rule": decision.rule,
        "from": decision.current,
        "to": decision.desired,
        "message": decision.message,
        "metrics": decision.metric_values,
    }
    if decision.active_schedule:
        out["activeSchedule"] = decision.active_schedule
    return out


def demand(decision: Decision) -> dict[str, Any] | None:
    """The slo model's view, for status (None without an slo trigger: the key is removed)."""
    d = decision.demand
    if d is None:
        return None
    return {
        "arrivalRps": _round(d.arrival_rps),
        "replicaCapacityRps": _round(d.capacity_rps),
        "capacitySource": "measured" if d.capacity_measured else "assumed",
        "capacityUnit": d.capacity_unit.value if d.capacity_unit is not None else None,
        "neededReplicas": d.needed,
    }


def forecast(decision: Decision) -> dict[str, Any] | None:
    """The predictive floor: forecast, the replicas it asks for, and the last forecast against what came."""
    d = decision.demand
    if d is None:
        return None
    last = d.last_forecast
    return {
        "peakRps": _round(d.forecast_rps),
        "replicas": d.forecast_needed,
        "lookaheadSeconds": round(d.lookahead.total_seconds()),
        "message": d.forecast_note,
        "lastPredictedRps": _round(last[0]) if last else None,
        "lastActualRps": _round(last[1]) if last else None,
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


@dataclass(frozen=True)
class Observation:
    """What the scaler saw of one TTSDeployment this round, for `build()`."""

    generation: int
    replicas: int  # the Deployment's spec.replicas (what advisory mode leaves alone)
    ready: int
    min_replicas: int
    deployment_found: bool
    spec_error: str | None = None
    paused: bool = False
    advisory: bool = False  # the policy runs but does not write replicas (advisory mode, or a conflict)
    conflict: str | None = None  # another autoscaler on the same workload, which voxscale leaves it to
    # the workload spec.targetRef attaches to, for a person ("Deployment ns/name"); None: its own Deployment
    target: str | None = None
    target_problem: str | None = None  # why the attached workload could not be read
    shadowing: str | None = None  # another autoscaler on the workload that advisory mode shadows
    # (reason, message) when this round had no answer for the object: the decision is the last one kept
    pending: tuple[str, str] | None = None
    flapping: Flapping | None = None  # the reversals of the last hour (None before the first decision)
    # (scheduling, pull and start, loading) seconds of each Ready pod's start (operator/kube.py start_phases)
    start_phases: tuple[tuple[float, float, float], ...] = ()
    prepull: Condition | None = None  # ImagePrePulled (operator/prepull.py); None: spec.prePull is off


def build(
    previous: dict[str, Any], seen: Observation, decision: Decision | None, history: History, now: dt.datetime
) -> dict[str, Any]:
    """The complete status document: no None values, nothing carried over but lastScaleTime and the
    conditions' transition times."""
    conditions = conditions_of(seen, decision)
    out: dict[str, Any] = {
        "observedGeneration": seen.generation,
        "replicas": seen.replicas,
        "readyReplicas": seen.ready,
        "conditions": merge_conditions(previous.get("conditions", []), conditions, now, seen.generation),
        "lastScaleTime": previous.get("lastScaleTime"),
        "engine": history.to_dict(),
    }
    if seen.spec_error is not None:
        out["reason"] = "InvalidSpec"
    elif decision is not None:
        out |= {
            "desiredReplicas": decision.current if seen.advisory else decision.desired,
            "advisedReplicas": decision.desired if seen.advisory else None,
            "reason": decision.rule,
            # A kept decision keeps its own time: nothing was decided this round.
            "lastDecision": previous.get("lastDecision") if seen.pending else last_decision(decision, now),
            "demand": demand(decision),
            "forecast": forecast(decision),
            "reversals": reversals(seen.flapping),
            "coldStart": cold_start(seen.start_phases),
        }
        if decision.changed and not seen.advisory and not seen.pending:
            out["lastScaleTime"] = iso(now)
    document: dict[str, Any] = without_nulls(out)
    return document


def conditions_of(seen: Observation, decision: Decision | None) -> list[Condition]:
    """Every condition of the status, in order (`build` stamps their transition times)."""
    return [
        ready_condition(
            seen.ready, seen.replicas, seen.min_replicas, seen.deployment_found, seen.target, seen.target_problem
        ),
        *scaling_conditions(
            decision, seen.spec_error, seen.paused, seen.conflict, seen.pending, seen.target, seen.shadowing
        ),
        *flapping_condition(seen.flapping),
        *([seen.prepull] if seen.prepull is not None else []),
    ]


def significant_of(
    previous: dict[str, Any], seen: Observation, decision: Decision | None, history: History, now: dt.datetime
) -> dict[str, Any]:
    """`significant(build(...))` without building the document (issue 24: most evaluations of a steady
    fleet write nothing, and the whole document - sentences, last decision, forecast, cold start - cost
    a third of an evaluation). tests/test_status_lazy.py holds the two equal over generated inputs."""
    decided = seen.spec_error is None and decision is not None
    scaled = decided and decision is not None and decision.changed and not seen.advisory and not seen.pending
    engine = history.to_dict()
    return {
        "observedGeneration": seen.generation,
        "replicas": seen.replicas,
        "readyReplicas": seen.ready,
        "desiredReplicas": (decision.current if seen.advisory else decision.desired) if decided and decision else None,
        "advisedReplicas": decision.desired if decided and decision and seen.advisory else None,
        "reason": "InvalidSpec" if seen.spec_error is not None else decision.rule if decision is not None else None,
        "lastScaleTime": iso(now) if scaled else previous.get("lastScaleTime"),
        "conditions": [(c.type, c.status, c.reason) for c in conditions_of(seen, decision)],
        "engine": {k: without_nulls(engine.get(k)) for k in SIGNIFICANT_ENGINE},
    }


def cold_start(phases: tuple[tuple[float, float, float], ...]) -> dict[str, Any] | None:
    """status.coldStart: the P90 of each phase of the Ready pods' starts - waiting for a node, pulling the
    image and starting the containers, loading until Ready - so a team sees which one to shorten (a
    pre-pulled image, a smaller model, a node pool kept warm). Absent without a sample."""
    if not phases:
        return None
    names = ("schedulingP90Seconds", "pullAndStartP90Seconds", "loadingP90Seconds")
    out: dict[str, Any] = {name: _round(p90([p[i] for p in phases])) for i, name in enumerate(names)}
    out["totalP90Seconds"] = _round(p90([sum(p) for p in phases]))
    out["pods"] = len(phases)
    return out


def flapping_condition(state: Flapping | None) -> list[Condition]:
    """Flapping=True while the last hour holds FLAPPING_REVERSALS reversals, naming the rules that fight."""
    if state is None:
        return []
    if state.flapping:
        return [Condition("Flapping", "True", "RulesFight", state.message())]
    return [Condition("Flapping", "False", "Steady", state.message())]


def reversals(state: Flapping | None) -> dict[str, Any] | None:
    """status.reversals: how many moves the last hour undid, and whose (absent while there are none)."""
    if state is None or not state.recent:
        return None
    return {"lastHour": state.recent, "rules": list(state.rules)}


def without_nulls(doc: Any) -> Any:
    """`doc` with every None map value dropped, recursively (absent, not null, in a replaced status)."""
    if isinstance(doc, dict):
        return {k: without_nulls(v) for k, v in doc.items() if v is not None}
    if isinstance(doc, list):
        return [without_nulls(v) for v in doc]
    return doc


SIGNIFICANT = ("observedGeneration", "replicas", "readyReplicas", "desiredReplicas", "advisedReplicas", "reason")
# The engine's memory that a new leader acts on: a clock or an event it misses or reads stale changes
# what it does. The rest (recommendations, learnt capacity) moves every round and is rewritten with
# the periodic refresh.
SIGNIFICANT_ENGINE = ("aboveSince", "belowSince", "dataSince", "events", "pendingForecast", "lastForecast", "lastUp")


def significant(status: dict[str, Any]) -> dict[str, Any]:
    """The part of a status whose change is written at once (the rest refreshes periodically)."""
    engine = status.get("engine", {})
    return {
        **{k: status.get(k) for k in (*SIGNIFICANT, "lastScaleTime")},
        "conditions": [(c["type"], c["status"], c["reason"]) for c in status.get("conditions", [])],
        "engine": {k: engine.get(k) for k in SIGNIFICANT_ENGINE},
    }

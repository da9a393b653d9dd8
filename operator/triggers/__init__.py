"""Trigger kinds by `type`: one module each behind `TriggerKind`, like KEDA's scalers registry."""

from __future__ import annotations

from collections.abc import Iterable

from voxscale.operator.policy import Trigger, TriggerType
from voxscale.operator.triggers.base import Context, ExplainsMissing, Recommendation, TriggerKind
from voxscale.operator.triggers.gpu import GpuUtilization
from voxscale.operator.triggers.latency import LatencyP95
from voxscale.operator.triggers.promql import PromQL
from voxscale.operator.triggers.queue import QueueLength
from voxscale.operator.triggers.slo import Slo

REGISTRY: dict[TriggerType, TriggerKind] = {
    TriggerType.GPU_UTILIZATION: GpuUtilization(),
    TriggerType.QUEUE_LENGTH: QueueLength(),
    TriggerType.LATENCY_P95: LatencyP95(),
    TriggerType.PROMQL: PromQL(),
    TriggerType.SLO: Slo(),
}


def kind(trigger: Trigger) -> TriggerKind:
    return REGISTRY[trigger.type]


def _owner(key: str) -> TriggerKind:
    for k in REGISTRY.values():
        if any(key.startswith(p) for p in k.prefixes):
            return k
    raise ValueError(f"unknown batch key {key!r}")


def batch_query(key: str, namespaces: Iterable[str]) -> str:
    """The PromQL of a batch key, asked of the kind that declared it."""
    return _owner(key).query(key, namespaces)


def explainer(key: str) -> ExplainsMissing | None:
    """The kind of a batch key if it can say why a result was empty (None: "no data" is all there is)."""
    k = _owner(key)
    return k if isinstance(k, ExplainsMissing) else None


__all__ = [
    "REGISTRY",
    "Context",
    "ExplainsMissing",
    "Recommendation",
    "TriggerKind",
    "batch_query",
    "explainer",
    "kind",
]

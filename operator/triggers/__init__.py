"""Trigger kinds by `type`: one module each behind `TriggerKind`, like KEDA's scalers registry."""

from __future__ import annotations

from collections.abc import Iterable

from voxscale.operator.policy import Trigger, TriggerType
from voxscale.operator.triggers.base import Context, Recommendation, TriggerKind
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


def batch_query(key: str, namespaces: Iterable[str]) -> str:
    """The PromQL of a batch key, asked of the kind that declared it."""
    for k in REGISTRY.values():
        if any(key.startswith(p) for p in k.prefixes):
            return k.query(key, namespaces)
    raise ValueError(f"unknown batch key {key!r}")


__all__ = ["REGISTRY", "Context", "Recommendation", "TriggerKind", "batch_query", "kind"]

"""gpuUtilization: the pods' average GPU busy percent, from dcgm-exporter."""

from __future__ import annotations

from collections.abc import Iterable

from voxscale.operator import queries
from voxscale.operator.policy import Trigger
from voxscale.operator.triggers.base import Context, Recommendation, proportional_and_threshold

_PREFIX = "gpu:"


class GpuUtilization:
    prefixes: tuple[str, ...] = ("gpu:",)
    reads_pods = True

    def validate(self, trigger: Trigger, field: str) -> None:
        return None

    def inputs(self, trigger: Trigger) -> dict[str, str | None]:
        return {"value": _PREFIX + trigger.gpu_metric}

    def query(self, key: str, namespaces: Iterable[str]) -> str:
        return queries.gpu_utilization(key.removeprefix(_PREFIX), namespaces)

    def recommend(self, trigger: Trigger, value: float, ctx: Context) -> Recommendation:
        return proportional_and_threshold(trigger, value, ctx, summed=False)

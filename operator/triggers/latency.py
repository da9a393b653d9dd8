"""latencyP95: p95 request latency in seconds over the last minute, from the server's histogram."""

from __future__ import annotations

from collections.abc import Iterable

from voxscale.operator import queries
from voxscale.operator.policy import Trigger
from voxscale.operator.triggers.base import Context, Recommendation, proportional_and_threshold


class LatencyP95:
    prefixes: tuple[str, ...] = ("latency",)
    reads_pods = True
    summed = False  # an average over the pods: it scales with N/(N-k) when k go

    def validate(self, trigger: Trigger, field: str) -> None:
        return None

    def inputs(self, trigger: Trigger) -> dict[str, str | None]:
        return {"value": "latency"}

    def query(self, key: str, namespaces: Iterable[str]) -> str:
        return queries.latency_p95(namespaces)

    def recommend(self, trigger: Trigger, value: float, ctx: Context) -> Recommendation:
        return proportional_and_threshold(trigger, value, ctx, summed=self.summed)

"""queueLength: requests waiting, summed over the pods; a target is per replica."""

from __future__ import annotations

from collections.abc import Iterable

from voxscale.operator import queries
from voxscale.operator.policy import Trigger
from voxscale.operator.triggers.base import Context, Recommendation, proportional_and_threshold


class QueueLength:
    prefixes: tuple[str, ...] = ("queue",)
    reads_pods = True
    summed = True  # a total over the pods: removing pods leaves it as it is

    def validate(self, trigger: Trigger, field: str) -> None:
        return None

    def inputs(self, trigger: Trigger) -> dict[str, str | None]:
        return {"value": "queue"}

    def query(self, key: str, namespaces: Iterable[str]) -> str:
        return queries.queue_length(namespaces)

    def recommend(self, trigger: Trigger, value: float, ctx: Context) -> Recommendation:
        return proportional_and_threshold(trigger, value, ctx, summed=self.summed)

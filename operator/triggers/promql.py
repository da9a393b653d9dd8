"""promql: the user's own query, one number per TTSDeployment, run per object (not batched)."""

from __future__ import annotations

from collections.abc import Iterable

from voxscale.operator.policy import SpecError, Trigger
from voxscale.operator.triggers.base import Context, Recommendation, proportional_and_threshold


class PromQL:
    prefixes: tuple[str, ...] = ()
    reads_pods = False
    summed = False  # read as an average over the pods, as the HPA reads a Value metric

    def validate(self, trigger: Trigger, field: str) -> None:
        if not trigger.query:
            raise SpecError(f"{field}.query", "a promql trigger needs query")

    def inputs(self, trigger: Trigger) -> dict[str, str | None]:
        return {"value": None}

    def query(self, key: str, namespaces: Iterable[str]) -> str:
        raise ValueError("promql triggers are queried per object, not batched")

    def recommend(self, trigger: Trigger, value: float, ctx: Context) -> Recommendation:
        return proportional_and_threshold(trigger, value, ctx, summed=self.summed)

"""voxscale: the metrics contract's door signals (voxscale's own server, or any server behind the
door sidecar `voxscale proxy`). Today's queries, unchanged: the trigger kinds' own batched PromQL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from voxscale.operator import queries, triggers
from voxscale.operator.profiles.base import Approximation, Pods, Query, SignalKey, Unavailable


@dataclass(frozen=True)
class Voxscale:
    name: str = "voxscale"

    def signal(self, key: SignalKey, pods: Pods, namespaces: Sequence[str]) -> Query | Unavailable:
        return Query(triggers.batch_query(key.key, namespaces))

    def freshness(self, pods: Pods, namespaces: Sequence[str], windows: Sequence[int], tag: str) -> Query | None:
        return Query(queries.sample_freshness(namespaces, windows, tag))

    def pod_work(self, pods: Pods) -> Query | None:
        return Query(queries.pod_work(pods.namespace, pods.workload or pods.name))

    def approximations(self) -> tuple[Approximation, ...]:
        return ()

"""promql: the user's own queries for arrivals, completions, busy seconds and the queue.

For a server that publishes its own counters under names voxscale cannot know (vLLM-Omni's, whose
prefix changed between releases; a team's own FastAPI middleware). Each query is the object's own
(one series, like a promql trigger's), with $namespace, $name and $pods filled in, and `$window`
with the rate window the SLO model asks for (so the recent rate can differ from the window's and a
rise under way is seen). Under the operator's tenancy scoping they must pin every selector to
$namespace, as custom queries must.

Capacity is completions / busy seconds, measured only while the pods are busy at least
CAPACITY_MIN_BUSY of the window (the door's rule), the pods being those `up` reports for $pods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from voxscale.operator import queries
from voxscale.operator.profiles.base import (
    NO_CHARACTERS,
    Approximation,
    Pods,
    Query,
    Signal,
    SignalKey,
    Unavailable,
)
from voxscale.operator.triggers.slo import CAPACITY_MIN_BUSY

WINDOW = "$window"
# The pods Prometheus scrapes: its own `up` series, pinned to the object's namespace.
SCRAPED_PODS = 'count(up{namespace="$namespace", pod=~"$pods"} == 1)'


@dataclass(frozen=True)
class PromQLProfile:
    arrivals: str
    completions: str | None = None
    busy_seconds: str | None = None
    queue: str | None = None
    name: str = "promql"

    def _fill(self, query: str, pods: Pods, window: float | None) -> str:
        """A query with $window (a PromQL duration) and then $namespace, $name, $pods substituted."""
        query = query.replace(WINDOW, f"{window or 60:g}s")
        return queries.custom(query, pods.namespace, pods.name, pods.workload or None, pods.ordinal_pods)

    def capacity(self) -> str | None:
        """Completions per busy second, gated on the busy fraction of the scraped pods (unfilled)."""
        if self.completions is None or self.busy_seconds is None:
            return None
        done, busy = f"({self.completions})", f"({self.busy_seconds})"
        return f"({done} / on () {busy}) and on () (({busy} / on () {SCRAPED_PODS}) >= {CAPACITY_MIN_BUSY:g})"

    def signal(self, key: SignalKey, pods: Pods, namespaces: Sequence[str]) -> Query | Unavailable:
        query = {
            Signal.ARRIVALS: self.arrivals,
            Signal.CAPACITY: self.capacity(),
            Signal.QUEUE: self.queue,
        }.get(key.signal)
        if query is None:
            return Unavailable(_MISSING[key.signal])
        return Query(self._fill(query, pods, key.window), batched=False)

    def freshness(self, pods: Pods, namespaces: Sequence[str], windows: Sequence[int], tag: str) -> Query | None:
        return None

    def pod_work(self, pods: Pods) -> Query | None:
        return None

    def approximations(self) -> tuple[Approximation, ...]:
        found = [Approximation.NO_LATENCY_HISTOGRAM, Approximation.NO_REFUSAL_COUNTER, Approximation.NO_SAMPLE_AGE]
        found.append(Approximation.NO_POD_WORK)
        if WINDOW not in self.arrivals:
            found.append(Approximation.RECENT_IS_WINDOW)
        if self.capacity() is None:
            found.append(Approximation.CAPACITY_ASSUMED)
        return tuple(found)


_MISSING = {
    Signal.CAPACITY: (
        "not measured: spec.metrics.promql has no completions and busySeconds queries; the slo trigger uses "
        "replicaCapacity - add both queries to measure it"
    ),
    Signal.QUEUE: "no queue: spec.metrics.promql.queue is not set - add a query for the requests waiting",
    Signal.REFUSED: "not read under spec.metrics.profile promql (no refusal query): no 429 overload check",
    Signal.LATENCY: (
        "not read under spec.metrics.profile promql: no p95; use a promql trigger on your own latency series"
    ),
    Signal.ARRIVALS: "spec.metrics.promql.arrivals is required",
    Signal.CHARACTERS: NO_CHARACTERS,
}

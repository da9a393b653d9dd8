"""The interface every metric profile implements: "the pods and their signals".

The SLO model, the forecast and the N-1 guard need the same few signals whatever server runs in the
pods: requests arriving (refused ones included), one replica's capacity, requests refused, the
queue, a p95 latency, and per pod the work a scale-down would cut. Where they come from differs: the
metrics contract's door counters (`voxscale`), NVIDIA Triton's per-model series (`triton`), or a
user's own PromQL (`promql`). A profile is one small module (like a trigger kind, or a KEDA scaler)
that says which PromQL answers each signal for its pods and what that answer only approximates; the
registry in `__init__.py` maps `spec.metrics.profile` to it, and nothing else branches on the name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


class Signal(StrEnum):
    """A signal the engine's triggers read from the pods, by the batch key's kind (`kind:window`)."""

    ARRIVALS = "arrivals"  # requests/s arriving, refused ones included
    CAPACITY = "capacity"  # requests/s one replica serves, measured while busy
    REFUSED = "refused"  # requests/s refused for want of room
    QUEUE = "queue"  # requests waiting, summed over the pods
    LATENCY = "latency"  # p95 seconds over the last minute
    CHARACTERS = "characters"  # input characters/s arriving (the unit of work; optional)


@dataclass(frozen=True)
class SignalKey:
    """A trigger's batch key read as a signal: its kind and rate window (seconds; None for a gauge)."""

    key: str  # as the trigger kind declared it ("arrivals:60")
    signal: Signal
    window: float | None = None

    @classmethod
    def parse(cls, key: str) -> SignalKey | None:
        """The signal a batch key names; None for a key that is no pod signal (a GPU exporter's)."""
        kind, _, window = key.partition(":")
        try:
            signal = Signal(kind)
        except ValueError:
            return None
        return cls(key, signal, float(window) if window else None)


@dataclass(frozen=True)
class Pods:
    """Whose pods a per-object query reads: the object, and the workload whose pods are its."""

    namespace: str
    name: str
    workload: str = ""  # "" : its own Deployment (named as the object)
    ordinal_pods: bool = False  # a StatefulSet's pods (<workload>-<n>)


@dataclass(frozen=True)
class Query:
    """The PromQL that answers a signal. `batched`: one query answers every object of an endpoint, one
    series per (namespace, ttsdeployment) owner; otherwise it is this object's own and must return one
    series (a user's query, as a custom trigger's)."""

    promql: str
    batched: bool = True


@dataclass(frozen=True)
class Unavailable:
    """A signal this profile's server does not publish: missing data with the words why."""

    message: str


class Approximation(StrEnum):
    """What a profile's signals only approximate, as identifiers for status (prose in APPROXIMATED)."""

    ARRIVALS_FROM_COMPLETIONS = "ArrivalsFromCompletionsAndPending"
    BUSY_FROM_EXECUTIONS = "BusyFromExecutions"
    ONE_INSTANCE_PER_POD = "OneModelInstancePerPod"
    NO_LATENCY_HISTOGRAM = "NoLatencyHistogram"
    NO_REFUSAL_COUNTER = "NoRefusalCounter"
    NO_SAMPLE_AGE = "NoSampleAge"
    NO_POD_WORK = "NoPerPodWork"
    RECENT_IS_WINDOW = "RecentRateIsTheWindowRate"
    CAPACITY_ASSUMED = "CapacityAssumed"


APPROXIMATED: dict[Approximation, str] = {
    Approximation.ARRIVALS_FROM_COMPLETIONS: (
        "arrivals are completions + failures + the pending gauge's change over the window (the server counts no "
        "requests received; requests between the queue and the end of their execution are not seen arriving)"
    ),
    Approximation.BUSY_FROM_EXECUTIONS: (
        "busy time is the summed per-request compute time divided by the mean batch size "
        "(inference count / execution count): compute time overlaps under batching"
    ),
    Approximation.ONE_INSTANCE_PER_POD: (
        "capacity is per model instance: with several instances in a pod they overlap, and the capacity is low "
        "by that factor"
    ),
    Approximation.NO_LATENCY_HISTOGRAM: "no latency histogram: p95 cannot be read (no latency overload check)",
    Approximation.NO_REFUSAL_COUNTER: "no refusal counter: refused requests are not seen (no 429 overload check)",
    Approximation.NO_SAMPLE_AGE: "the samples' age is not checked: stale answers after a Prometheus outage count",
    Approximation.NO_POD_WORK: "no per-pod work: a scale-down does not rank the pods by the requests they hold",
    Approximation.RECENT_IS_WINDOW: (
        "the arrivals query has no $window: the recent rate is the window's, so no rise under way is seen"
    ),
    Approximation.CAPACITY_ASSUMED: (
        "no completions and busy-seconds queries: capacity is the spec's replicaCapacity, never measured"
    ),
}


# A server that publishes no input-character counter: the capacity is learnt in requests only.
NO_CHARACTERS = (
    "no input-character counter under this profile: capacity is learnt in requests per second only, so a shift "
    "to longer or shorter texts is seen once the pods are measured under load again"
)


class Profile(Protocol):
    """Where one object's pod signals come from. Implementations are frozen dataclasses holding their
    settings (hashable: objects with equal settings share batched queries)."""

    @property
    def name(self) -> str:
        """The profile's name in spec.metrics.profile."""

    def signal(self, key: SignalKey, pods: Pods, namespaces: Sequence[str]) -> Query | Unavailable:
        """The PromQL answering `key` for `pods` (batched over `namespaces` where it can be)."""

    def freshness(self, pods: Pods, namespaces: Sequence[str], windows: Sequence[int], tag: str) -> Query | None:
        """The sample-age query (queries.sample_freshness's shape), None where the age cannot be read."""

    def pod_work(self, pods: Pods) -> Query | None:
        """Requests each pod holds, by pod (None: unknown)."""

    def approximations(self) -> tuple[Approximation, ...]:
        """What its signals approximate, for the decision to say."""

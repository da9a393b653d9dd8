"""triton: NVIDIA Triton Inference Server's own per-model series, read for one model.

What Triton publishes on :8002/metrics (recorded from the tritonserver 2.51 inside nvidia-pytriton
0.7.0, a Python model on the CPU): per model and version, counters of requests that succeeded and
failed (`reason` OTHER, BACKEND, CANCELED, REJECTED), inferences and executions, and summed
microseconds of queueing and compute; one gauge, the requests pending execution. No counter of
requests received, no busy time, no latency histogram. So:

- arrivals = (successes + failures) per second + the pending gauge's change over the window / window:
  what ended plus what piled up (clamped at 0);
- refused = failures with reason REJECTED (a full queue, the rate limiter);
- capacity = inferences per busy second, busy time being the summed compute time divided by the mean
  batch size (inferences / executions): compute time is added once per request, so under batching it
  overlaps. Gated, as the door's, on the pods being busy at least CAPACITY_MIN_BUSY of the window;
- queue = the pending gauge; p95: none (Triton's durations are counters).

Series are joined to their TTSDeployment by the `namespace` and `pod` labels a Kubernetes pod scrape
sets, as every batched query's.
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

SUCCESS = "nv_inference_request_success"
FAILURE = "nv_inference_request_failure"
INFERENCES = "nv_inference_count"
EXECUTIONS = "nv_inference_exec_count"
COMPUTE = (
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
)
PENDING = "nv_inference_pending_request_count"
REJECTED = 'reason="REJECTED"'
MICROSECONDS = 1e6


def _names(*names: str) -> str:
    return f'__name__=~"{"|".join(names)}"'


@dataclass(frozen=True)
class Triton:
    model: str
    name: str = "triton"

    def _model(self) -> str:
        return f'model="{queries.escape_label_value(self.model)}"'

    def _sel(self, namespaces: Sequence[str], *matchers: str) -> str:
        """This model's series of the pods in `namespaces` (the name given as a matcher)."""
        return queries.selector("", namespaces, *matchers, self._model())

    def _rate(self, namespaces: Sequence[str], window: float, *matchers: str) -> str:
        return queries.per_owner(f"rate({self._sel(namespaces, *matchers)}[{window:g}s])")

    def arrivals(self, namespaces: Sequence[str], window: float) -> str:
        ended = self._rate(namespaces, window, _names(SUCCESS, FAILURE))
        piled = queries.per_owner(f"delta({self._sel(namespaces, _names(PENDING))}[{window:g}s])")
        return f"clamp_min({ended} + {piled} / {window:g}, 0)"

    def capacity(self, namespaces: Sequence[str], window: float) -> str:
        done = self._rate(namespaces, window, _names(INFERENCES))
        execs = self._rate(namespaces, window, _names(EXECUTIONS))
        # One rate each: after rate() drops the names, the three series would share one label set.
        compute = "(" + " + ".join(self._rate(namespaces, window, _names(c)) for c in COMPUTE) + ")"
        busy = f"({compute} / {MICROSECONDS:g} * {execs} / {done})"
        distinct = f"count by (namespace, pod) ({self._sel(namespaces, _names(EXECUTIONS))})"
        pods = f"count by (namespace, {queries.OWNER_LABEL}) ({queries.with_owner(distinct)})"
        on = f"on (namespace, {queries.OWNER_LABEL})"
        return f"({done} / {busy}) and {on} (({busy} / {pods}) >= {CAPACITY_MIN_BUSY:g})"

    def signal(self, key: SignalKey, pods: Pods, namespaces: Sequence[str]) -> Query | Unavailable:
        window = key.window or 60.0
        if key.signal is Signal.ARRIVALS:
            return Query(self.arrivals(namespaces, window))
        if key.signal is Signal.CAPACITY:
            return Query(self.capacity(namespaces, window))
        if key.signal is Signal.REFUSED:
            return Query(self._rate(namespaces, window, _names(FAILURE), REJECTED))
        if key.signal is Signal.QUEUE:
            return Query(queries.per_owner(self._sel(namespaces, _names(PENDING))))
        if key.signal is Signal.CHARACTERS:
            return Unavailable(NO_CHARACTERS)
        return Unavailable(
            "not published by Triton (its request durations are counters, not a histogram): no p95 under "
            "spec.metrics.profile triton; use an slo trigger, or a promql trigger on your own latency series"
        )

    def freshness(self, pods: Pods, namespaces: Sequence[str], windows: Sequence[int], tag: str) -> Query | None:
        return Query(queries.sample_freshness(namespaces, windows, tag, PENDING, self._model()))

    def pod_work(self, pods: Pods) -> Query | None:
        return Query(queries.pod_work(pods.namespace, pods.workload or pods.name, (PENDING,), self._model()))

    def approximations(self) -> tuple[Approximation, ...]:
        return (
            Approximation.ARRIVALS_FROM_COMPLETIONS,
            Approximation.BUSY_FROM_EXECUTIONS,
            Approximation.ONE_INSTANCE_PER_POD,
            Approximation.NO_LATENCY_HISTOGRAM,
        )

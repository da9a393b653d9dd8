"""gpuUtilization: the pods' average GPU busy percent, from dcgm-exporter.

dcgm-exporter labels each series with the pod using the GPU, but how Prometheus scrapes it decides
whether that label arrives as `pod` (honorLabels: true) or `exported_pod` (a ServiceMonitor's
default). The query reads both; when neither matches this TTSDeployment's pods, `explain_missing`
says which labels the series do carry, so "no data" is never a silent dead end.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from voxscale.operator import queries
from voxscale.operator.policy import SpecError, Trigger
from voxscale.operator.triggers.base import Context, Recommendation, proportional_and_threshold

_PREFIX = "gpu:"
_POD_LABELS = ("pod", queries.EXPORTED_POD)


class GpuUtilization:
    prefixes: tuple[str, ...] = ("gpu:",)
    reads_pods = True
    summed = False  # an average over the pods: it scales with N/(N-k) when k go

    def validate(self, trigger: Trigger, field: str) -> None:
        """Objects stored before the CRD narrowed its enum can still carry a series nobody publishes."""
        if trigger.gpu_metric not in queries.GPU_METRICS:
            allowed = ", ".join(queries.GPU_METRICS)
            raise SpecError(
                f"{field}.gpuMetric",
                f"{trigger.gpu_metric!r} is not published by anything the operator reads; use one of {allowed}",
            )

    def inputs(self, trigger: Trigger) -> dict[str, str | None]:
        return {"value": _PREFIX + trigger.gpu_metric}

    def query(self, key: str, namespaces: Iterable[str]) -> str:
        return queries.gpu_utilization(key.removeprefix(_PREFIX), namespaces)

    def recommend(self, trigger: Trigger, value: float, ctx: Context) -> Recommendation:
        return proportional_and_threshold(trigger, value, ctx, summed=self.summed)

    def probe(self, key: str) -> str:
        """The series whose label names explain an empty result (asked once per endpoint and round)."""
        return key.removeprefix(_PREFIX)

    def explain_missing(self, key: str, trigger: str, namespace: str, name: str, seen: Sequence[str] | None) -> str:
        """Why `trigger` of namespace/name has no data, from the label names its series carry (a
        predicate: the condition's message reads "<trigger> <this>")."""
        metric = key.removeprefix(_PREFIX)
        head = f"has no {metric} sample for this TTSDeployment"
        if seen is None:
            return f"{head}; its label names could not be listed either"
        if not seen:
            return f"{head}: Prometheus has no {metric} series at all; scrape dcgm-exporter (e.g. a ServiceMonitor)"
        labels = ", ".join(sorted(seen))
        if not set(_POD_LABELS) & set(seen):
            return (
                f"{head}: {metric} series found but none carries pod or exported_pod; labels seen: {labels}. "
                "Enable dcgm-exporter's Kubernetes pod mapping (DCGM_EXPORTER_KUBERNETES=true)"
            )
        return (
            f"{head}: {metric} series found but none carries pod/exported_pod of this TTSDeployment's pods "
            f"({name}-<hash>-<id>, running) with namespace/exported_namespace {namespace}; labels seen: {labels}"
        )

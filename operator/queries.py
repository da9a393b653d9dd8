"""PromQL for every trigger kind, batched: one query per kind answers for ALL TTSDeployments.

Series are joined to their TTSDeployment by the labels dcgm-exporter and a Prometheus pod scrape
really carry: `namespace` and `pod`. dcgm-exporter speaks for other pods, so how it is scraped
matters: with `honorLabels: true` its `pod`/`namespace` survive; with a ServiceMonitor's default they
arrive as `exported_pod`/`exported_namespace` (and `pod`/`namespace` name the exporter itself). The
GPU query accepts both forms in one query. A Deployment's pods are named `<deployment>-<template hash>-<5
chars>`, and a TTSDeployment's Deployment has its name, so `label_replace` recovers the owner from
the pod name inside Prometheus and `by (namespace, ttsdeployment)` returns one sample per object.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from voxscale import metrics_contract as mc

OWNER_LABEL = "ttsdeployment"
# kube's pod-template-hash alphabet (no vowels, no 0/1/3) and the 5-character random suffix.
_POD_NAME = "(.+)-[bcdfghjklmnpqrstvwxz2456789]{6,10}-[bcdfghjklmnpqrstvwxz2456789]{5}"
LATENCY_WINDOW = "1m"

# What each GPU series means, normalised to percent.
_GPU_SCALE = {
    mc.DCGM_GPU_UTIL.name: 1.0,
    mc.DCGM_ENGINE_ACTIVE.name: 100.0,
}
GPU_METRICS = tuple(_GPU_SCALE)
# dcgm-exporter's workload labels as a scrape without honorLabels renames them.
EXPORTED_POD, EXPORTED_NAMESPACE = "exported_pod", "exported_namespace"


def escape_label_value(value: str) -> str:
    """Escape a string for use inside a PromQL double-quoted label matcher."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _namespace_matcher(namespaces: Iterable[str]) -> str:
    ns = sorted(set(namespaces))
    if not ns:
        return ""
    alternatives = "|".join(re.escape(n) for n in ns)
    return f'namespace=~"{escape_label_value(alternatives)}"'


def with_owner(expr: str) -> str:
    """`expr` with the `ttsdeployment` label recovered from each series' pod name."""
    return f'label_replace({expr}, "{OWNER_LABEL}", "$1", "pod", "{_POD_NAME}")'


def selector(series: str, namespaces: Iterable[str], *extra: str) -> str:
    """`series` of pods (pod label set) in `namespaces`, with `extra` matchers."""
    matchers = ", ".join(m for m in (_namespace_matcher(namespaces), 'pod!=""', *extra) if m)
    return f"{series}{{{matchers}}}"


def _exported_selector(series: str, namespaces: Iterable[str]) -> str:
    """The exported_* form, renamed back to pod/namespace (the exporter's own pod and namespace dropped)."""
    ns = _namespace_matcher(namespaces).replace("namespace=~", f"{EXPORTED_NAMESPACE}=~", 1)
    matchers = ", ".join(m for m in (ns, f'{EXPORTED_POD}!=""') if m)
    moved = f'label_replace({series}{{{matchers}}}, "pod", "$1", "{EXPORTED_POD}", "(.+)")'
    return f'label_replace({moved}, "namespace", "$1", "{EXPORTED_NAMESPACE}", "(.+)")'


def _workload_series(series: str, namespaces: Iterable[str]) -> str:
    """An exporter's per-pod series under either scrape config: its own labels kept, or renamed exported_*."""
    own = selector(series, namespaces, f'{EXPORTED_POD}=""')
    return f"({own} or {_exported_selector(series, namespaces)})"


def gpu_utilization(metric: str, namespaces: Iterable[str]) -> str:
    """Average GPU busy percent over each TTSDeployment's pods (dcgm-exporter, scraped either way)."""
    scale = _GPU_SCALE[metric]
    inner = f"avg by (namespace, {OWNER_LABEL}) ({with_owner(_workload_series(metric, namespaces))})"
    return inner if scale == 1.0 else f"{scale:g} * {inner}"


def queue_length(namespaces: Iterable[str]) -> str:
    """Requests waiting, summed over each TTSDeployment's pods."""
    return f"sum by (namespace, {OWNER_LABEL}) ({with_owner(selector(mc.QUEUE_DEPTH.series, namespaces))})"


def pods_pattern(workload: str, ordinal_pods: bool = False) -> str:
    """A regex matching the names of `workload`'s pods: <workload>-<hash>-<suffix> for a Deployment's,
    <workload>-<n> for a StatefulSet's."""
    owner = re.escape(workload)
    return f"{owner}-[0-9]+" if ordinal_pods else f"{owner}-[a-z0-9]+-[a-z0-9]+"


def pod_work(namespace: str, name: str, series: Iterable[str] = (), *extra: str) -> str:
    """Requests each pod of one TTSDeployment holds (waiting + being synthesised), by pod: what a
    scale-down would cut if it removed that pod. `series` (default: the contract's queue depth and in
    flight) and `extra` matchers let a metric profile name its own."""
    names = "|".join(series or (mc.QUEUE_DEPTH.name, mc.INFLIGHT.name))
    pods = _POD_NAME.replace("(.+)", re.escape(name), 1)
    matchers = ", ".join(
        (
            f'__name__=~"{names}"',
            f'namespace="{escape_label_value(namespace)}"',
            f'pod=~"{escape_label_value(pods)}"',
            *extra,
        )
    )
    return f"sum by (pod) ({{{matchers}}})"


def latency_p95(namespaces: Iterable[str]) -> str:
    """p95 request latency (seconds) per TTSDeployment over the last minute."""
    rate = f"rate({selector(mc.REQUEST_LATENCY.series, namespaces)}[{LATENCY_WINDOW}])"
    return f"histogram_quantile(0.95, sum by (namespace, {OWNER_LABEL}, le) ({with_owner(rate)}))"


def custom(query: str, namespace: str, name: str, workload: str | None = None, ordinal_pods: bool = False) -> str:
    """A user's PromQL with $namespace, $name and $pods substituted (escaped as label values). $pods
    matches the names of the pods of `workload` (the TTSDeployment's own Deployment when None; an
    attached one's, spec.targetRef): <workload>-<hash>-<suffix>, or <workload>-<n> for a StatefulSet."""
    pods = pods_pattern(workload or name, ordinal_pods)
    return (
        query.replace("$namespace", escape_label_value(namespace))
        .replace("$name", escape_label_value(name))
        .replace("$pods", escape_label_value(pods))
    )


def per_owner(expr: str, by: str = "") -> str:
    """`expr` summed per TTSDeployment (and `by`, e.g. ", gpu_product"), its owner read from the pod name."""
    return f"sum by (namespace, {OWNER_LABEL}{by}) ({with_owner(expr)})"


def _rate(series: str, namespaces: Iterable[str], seconds: float, by: str = "") -> str:
    return per_owner(f"rate({selector(series, namespaces)}[{seconds:g}s])", by)


def arrival_rate(namespaces: Iterable[str], seconds: float) -> str:
    """Requests per second arriving at each TTSDeployment's pods, refused ones included."""
    return _rate(mc.REQUESTS_RECEIVED.name, namespaces, seconds)


def character_rate(namespaces: Iterable[str], seconds: float) -> str:
    """Input characters per second arriving at each TTSDeployment's pods (the unit of work: a
    request's cost follows the length of its text)."""
    return _rate(mc.INPUT_CHARACTERS.name, namespaces, seconds)


def capacity(namespaces: Iterable[str], seconds: float, min_busy: float) -> str:
    """One replica's capacity (completed requests per busy second) per TTSDeployment and GPU product,
    only where the pods were busy at least `min_busy` of the window: a lightly loaded replica's batches
    are small, so its completed/busy ratio says little about what it can do."""
    by = f", {mc.GPU_PRODUCT_LABEL}"
    done = _rate(mc.COMPLETED_REQUESTS.name, namespaces, seconds, by)
    busy = _rate(mc.BUSY_SECONDS.name, namespaces, seconds, by)
    busy_pods = f"count by (namespace, {OWNER_LABEL}{by}) ({with_owner(selector(mc.BUSY_SECONDS.name, namespaces))})"
    on = f"on (namespace, {OWNER_LABEL}{by})"
    return f"({done} / {busy}) and {on} (({busy} / {busy_pods}) >= {min_busy:g})"


def refused_rate(namespaces: Iterable[str], seconds: float) -> str:
    """Requests per second each TTSDeployment's pods refused for want of room (429, queue full): the
    door counters' plainest sign of overload, which a full queue hides from the queue length."""
    refused = selector(mc.REQUESTS.name, namespaces, 'code="429"')
    rate = f"rate({refused}[{seconds:g}s])"
    return f"sum by (namespace, {OWNER_LABEL}) ({with_owner(rate)})"


def sample_freshness(
    namespaces: Iterable[str], windows: Iterable[int], tag_label: str, gauge: str = mc.QUEUE_DEPTH.name, *extra: str
) -> str:
    """Per pod of every object: the timestamp of its newest sample of `gauge` (one every scrape of
    every server pod carries - the contract's queue depth unless a metric profile names its own;
    staleness markers honoured, so a deleted pod is not in it), and how many samples it sent over each
    window in seconds (its scrape interval). Each series says which half it answers in `tag_label`:
    "newest", or the window."""
    series = selector(gauge, namespaces, *extra)
    parts = [(with_owner(f"timestamp({series})"), "newest")]
    parts += [(with_owner(f"count_over_time({series}[{w}s])"), str(w)) for w in windows]
    return " or ".join(f'label_replace({expr}, "{tag_label}", "{tag}", "", "")' for expr, tag in parts)

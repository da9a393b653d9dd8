"""The metrics contract: the one place that names what the inference server exports and the operator queries.

Both sides import these definitions (the server to register its collectors, the operator to build
PromQL), so a rename cannot silently break autoscaling. Pure data: no prometheus_client import here,
so the operator image does not need the server's dependencies to read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    GAUGE = "gauge"
    COUNTER = "counter"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class Metric:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()

    @property
    def series(self) -> str:
        """The name a PromQL query uses: histograms are queried through their _bucket series."""
        return f"{self.name}_bucket" if self.kind is Kind.HISTOGRAM else self.name


# Latency buckets cover a TTS request: from a short cached phrase to a long paragraph under load.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0)

QUEUE_DEPTH = Metric("voxscale_queue_depth", Kind.GAUGE, "Requests accepted and waiting for a batch slot.")
INFLIGHT = Metric("voxscale_inflight_requests", Kind.GAUGE, "Requests being synthesised right now.")
QUEUE_CAPACITY = Metric("voxscale_queue_capacity", Kind.GAUGE, "The bounded queue's size (requests beyond it get 429).")
REQUEST_LATENCY = Metric(
    "voxscale_request_duration_seconds",
    Kind.HISTOGRAM,
    "End-to-end time of an admitted synthesis request, from acceptance to its end: the last audio byte, "
    "or the failure, the timeout or the client leaving (each timed like a success, never left out).",
    buckets=_LATENCY_BUCKETS,
)
QUEUE_WAIT = Metric(
    "voxscale_queue_wait_seconds", Kind.HISTOGRAM, "Time a request waited in the queue.", buckets=_LATENCY_BUCKETS
)
BATCH_SIZE = Metric(
    "voxscale_batch_size", Kind.HISTOGRAM, "Requests per executed batch.", buckets=(1, 2, 4, 8, 16, 32, 64)
)
AUDIO_SECONDS = Metric("voxscale_audio_seconds_total", Kind.COUNTER, "Seconds of audio produced.")
# Demand and capacity: what the SLO trigger sizes the fleet from.
REQUESTS_RECEIVED = Metric(
    "voxscale_requests_received_total",
    Kind.COUNTER,
    "Speech requests that could be served, counted at the door before admission: those then refused for "
    "want of room (429) or by a replica not ready (503) included, so demand stays visible when the queue is "
    "full; malformed ones (400, 404, 422), unauthenticated calls (401) and a key's own quota (429) are not "
    "demand and are not counted.",
)
INPUT_CHARACTERS = Metric(
    "voxscale_input_characters_total", Kind.COUNTER, "Characters of input text in received speech requests."
)
# The GPU product label has the form of the node label nvidia.com/gpu.product (spaces as dashes,
# e.g. NVIDIA-H100-80GB-HBM3; "cpu" without a GPU), so capacity is learnt per kind of GPU.
GPU_PRODUCT_LABEL = "gpu_product"
BUSY_SECONDS = Metric(
    "voxscale_busy_seconds_total",
    Kind.COUNTER,
    "Wall-clock seconds the pipeline spent executing batches (the replica's busy time).",
    labels=(GPU_PRODUCT_LABEL,),
)
COMPLETED_REQUESTS = Metric(
    "voxscale_completed_requests_total",
    Kind.COUNTER,
    "Speech requests whose synthesis finished; with busy seconds this gives a replica's measured capacity.",
    labels=(GPU_PRODUCT_LABEL,),
)
REQUESTS = Metric(
    "voxscale_requests_total",
    Kind.COUNTER,
    "Speech requests by how they ended: 200, 429 (queue full), 503 (not ready, draining), 504 (timeout), "
    "499 (client gone), 500 (synthesis failed).",
    labels=("code",),
)
ERRORS = Metric("voxscale_errors_total", Kind.COUNTER, "Failed or refused requests by kind.", labels=("kind",))
# Published by the server from NVML when it runs on CUDA (inference/server_metrics.py NvmlGauges; absent
# elsewhere). Never seen on a real GPU yet (no GPU lent to the project), so the CRD does not offer it
# as a gpuMetric and the operator does not read it; dcgm-exporter stays the GPU signal.
GPU_UTILIZATION = Metric(
    "voxscale_gpu_utilization_ratio", Kind.GAUGE, "GPU busy ratio 0-1 seen by this server (NVML).", labels=("gpu",)
)
GPU_MEMORY_USED = Metric("voxscale_gpu_memory_used_bytes", Kind.GAUGE, "GPU memory used (NVML).", labels=("gpu",))

SERVER_METRICS: tuple[Metric, ...] = (
    QUEUE_DEPTH,
    INFLIGHT,
    QUEUE_CAPACITY,
    REQUEST_LATENCY,
    QUEUE_WAIT,
    BATCH_SIZE,
    AUDIO_SECONDS,
    REQUESTS_RECEIVED,
    INPUT_CHARACTERS,
    BUSY_SECONDS,
    COMPLETED_REQUESTS,
    REQUESTS,
    ERRORS,
    GPU_UTILIZATION,
    GPU_MEMORY_USED,
)

# Per API key (inference/tenants.py), labelled by the key's id, never the key; created by request_context.py.
KEY_LABEL = "key"
KEY_REQUESTS = Metric(
    "voxscale_key_requests_total",
    Kind.COUNTER,
    "API requests by key id and status code (probes and /metrics excluded; `anonymous` without keys).",
    labels=(KEY_LABEL, "code"),
)
KEY_INPUT_CHARACTERS = Metric(
    "voxscale_key_input_characters_total",
    Kind.COUNTER,
    "Characters of speech input admitted, by key id (what charactersPerDay counts, on this replica).",
    labels=(KEY_LABEL,),
)
QUOTA_REFUSALS = Metric(
    "voxscale_quota_refusals_total",
    Kind.COUNTER,
    "Requests refused with 429 by a key's own quota (requestsPerMinute, charactersPerDay), by key id.",
    labels=(KEY_LABEL, "quota"),
)
TENANT_METRICS: tuple[Metric, ...] = (KEY_REQUESTS, KEY_INPUT_CHARACTERS, QUOTA_REFUSALS)

# NVIDIA dcgm-exporter's series. It labels each with the pod/namespace/container using the GPU
# (its Kubernetes pod-resources mapping), which is how GPU load is joined to a TTSDeployment.
DCGM_GPU_UTIL = Metric("DCGM_FI_DEV_GPU_UTIL", Kind.GAUGE, "GPU utilisation in percent (0-100).", ("pod", "namespace"))
DCGM_ENGINE_ACTIVE = Metric(
    "DCGM_FI_PROF_GR_ENGINE_ACTIVE", Kind.GAUGE, "Graphics engine active ratio (0-1).", ("pod", "namespace")
)

# Labels the operator puts on every inference pod, so any series carrying `pod` can be joined back.
POD_LABEL_TTSDEPLOYMENT = "voxscale.io/ttsdeployment"

# --- The door sidecar (`voxscale proxy`, voxscale/proxy/) -------------------------------------------------
# In front of a server that publishes no door signals, the sidecar publishes them under the server's own
# names where the meaning is the same (arrivals incl. refused, input characters, busy seconds, completions,
# in flight, waiting, queue size, latency, queue wait), so the operator's queries read either alike; a pod
# runs one or the other, never both. "In flight" there means "at the server", and "waiting" the door's queue.
# One difference: the door cannot tell a malformed request before the server answers it, so its arrivals
# include those the server then rejects (their share: DOOR_RESPONSES{class="4xx",by="server"}).
DOOR_RESPONSES = Metric(
    "voxscale_door_responses_total",
    Kind.COUNTER,
    "Requests the door sidecar answered, by status class (1xx-5xx, `aborted` when the client or the server "
    "broke off mid-answer) and by who answered (`server`, or `door` for its own 429, 502, 503 and 504).",
    labels=("class", "by"),
)
DOOR_CONCURRENCY_SECONDS = Metric(
    "voxscale_door_concurrency_seconds_total",
    Kind.COUNTER,
    "Seconds the door sidecar had exactly `concurrency` requests at the server: summed over the label it is "
    "the busy seconds; sum(concurrency * seconds) / busy seconds is the concurrency the busy time ran at.",
    labels=("concurrency",),
)
DOOR_CONCURRENCY_LIMIT = Metric(
    "voxscale_door_concurrency_limit", Kind.GAUGE, "Requests the door sidecar sends the server at once (--concurrency)."
)
DOOR_SERVER_READY = Metric(
    "voxscale_door_server_ready",
    Kind.GAUGE,
    "1 while the door sidecar reports ready (the server answers its health path and the pod is not draining).",
)
DOOR_METRICS: tuple[Metric, ...] = (
    REQUESTS_RECEIVED,
    INPUT_CHARACTERS,
    BUSY_SECONDS,
    COMPLETED_REQUESTS,
    INFLIGHT,
    QUEUE_DEPTH,
    QUEUE_CAPACITY,
    REQUEST_LATENCY,
    QUEUE_WAIT,
    DOOR_RESPONSES,
    DOOR_CONCURRENCY_SECONDS,
    DOOR_CONCURRENCY_LIMIT,
    DOOR_SERVER_READY,
)

# --- The operator's own /metrics: advice beside what the workload runs ---------------------------------------
# Advisory mode (spec.scaling.mode: advisory) shadows another autoscaler (an HPA, KEDA) and writes nothing.
# Both sides of the comparison come from one scrape of the operator, at the same instant: what voxscale
# would set, and the replicas the workload has (in advisory mode: what the shadowed autoscaler set), so a
# day of both is two series in Prometheus, without kube-state-metrics. Labels: namespace, ttsdeployment.
OPERATOR_OBJECT_LABELS = ("namespace", "ttsdeployment")
OPERATOR_ADVISED_REPLICAS = Metric(
    "voxscale_operator_advised_replicas",
    Kind.GAUGE,
    "What advisory mode would set (not written).",
    labels=OPERATOR_OBJECT_LABELS,
)
OPERATOR_WORKLOAD_REPLICAS = Metric(
    "voxscale_operator_workload_replicas",
    Kind.GAUGE,
    "spec.replicas of the scaled workload as read this round (in advisory mode: what the shadowed autoscaler set).",
    labels=OPERATOR_OBJECT_LABELS,
)

"""A test exporter that publishes DCGM-format GPU, inference-queue and demand/capacity series per pod.

It labels every series with `pod` and `namespace`, as dcgm-exporter and a pod scrape do, for the
real pods of a TTSDeployment (listed from the API server as they come and go). The test chooses the
values; the real Prometheus scrapes them; the real operator queries Prometheus. Demand is given as a
total arrival rate that the Service spreads over the Ready pods; each pod's counters (requests
received, completed, busy seconds) advance as the server's would at that rate and a capacity.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from voxscale import metrics_contract as mc
from voxscale.localcluster.cluster import GPU_PRODUCT, ClusterState, LocalCluster
from voxscale.localcluster.harness import free_port


@dataclass
class Load:
    gpu_percent: float | None = None  # on Ready pods
    queue_per_pod: float | None = None  # on Ready pods
    # What a pod still loading its model reports (it holds its GPU but serves nothing); None: as Ready.
    loading_gpu_percent: float | None = None
    arrivals_rps: float | None = None  # requests/s arriving at the Service, spread over Ready pods
    capacity_rps: float = 16.0  # what one pod completes per busy second
    characters_per_request: float = 200.0  # input characters each arriving request carries


@dataclass
class PodCounters:
    received: float = 0.0
    completed: float = 0.0
    busy_seconds: float = 0.0
    refused: float = 0.0  # 429: what arrives beyond the pod's capacity (its queue is full)
    characters: float = 0.0  # input characters of the requests received

    def advance(self, rps: float, capacity: float, seconds: float, characters_per_request: float = 200.0) -> None:
        served = min(rps, capacity)
        self.received += rps * seconds
        self.characters += rps * seconds * characters_per_request
        self.completed += served * seconds
        self.busy_seconds += served / capacity * seconds
        self.refused += (rps - served) * seconds


@dataclass(eq=False)  # a registered collector must stay hashable
class PodMetricsExporter(Collector):
    cluster: LocalCluster
    state: ClusterState
    loads: dict[tuple[str, str], Load] = field(default_factory=dict)
    _pods: dict[tuple[str, str], list[tuple[str, bool]]] = field(default_factory=dict)  # (pod, ready)
    _counters: dict[tuple[str, str], PodCounters] = field(default_factory=dict)  # (namespace, pod)
    _stop: threading.Event = field(default_factory=threading.Event)
    # A queue length for one pod, over its TTSDeployment's queue_per_pod: (namespace, pod) -> requests.
    pod_queue: dict[tuple[str, str], float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        api = k8s_config.new_client_from_config(config_file=str(self.state.kubeconfig))  # type: ignore[no-untyped-call]
        self.core = k8s.CoreV1Api(api)

    def set(
        self,
        namespace: str,
        name: str,
        gpu: float | None = None,
        queue_per_pod: float | None = None,
        loading_gpu: float | None = None,
        arrivals_rps: float | None = None,
        capacity_rps: float = 16.0,
    ) -> None:
        self.loads[(namespace, name)] = Load(gpu, queue_per_pod, loading_gpu, arrivals_rps, capacity_rps)

    def pods(self, namespace: str, name: str) -> list[tuple[str, bool]]:
        """The TTSDeployment's running pods as last listed, each with whether it is Ready."""
        return list(self._pods.get((namespace, name), []))

    def collect(self) -> Iterable[Any]:
        gpu = GaugeMetricFamily(mc.DCGM_GPU_UTIL.name, mc.DCGM_GPU_UTIL.help, labels=["gpu", "pod", "namespace"])
        queue = GaugeMetricFamily(mc.QUEUE_DEPTH.name, mc.QUEUE_DEPTH.help, labels=["pod", "namespace"])
        for (ns, name), load in list(self.loads.items()):
            for pod, ready in self._pods.get((ns, name), []):
                value = load.gpu_percent if ready or load.loading_gpu_percent is None else load.loading_gpu_percent
                if value is not None:
                    gpu.add_metric(["0", pod, ns], value)
                held = self.pod_queue.get((ns, pod), load.queue_per_pod)
                if held is not None:
                    queue.add_metric([pod, ns], held if ready else 0.0)
        yield gpu
        yield queue
        yield from self._demand_families()

    def _demand_families(self) -> Iterable[Any]:
        received = CounterMetricFamily(
            mc.REQUESTS_RECEIVED.name, mc.REQUESTS_RECEIVED.help, labels=["pod", "namespace"]
        )
        product = [mc.GPU_PRODUCT_LABEL, "pod", "namespace"]
        completed = CounterMetricFamily(mc.COMPLETED_REQUESTS.name, mc.COMPLETED_REQUESTS.help, labels=product)
        busy = CounterMetricFamily(mc.BUSY_SECONDS.name, mc.BUSY_SECONDS.help, labels=product)
        requests = CounterMetricFamily(mc.REQUESTS.name, mc.REQUESTS.help, labels=["code", "pod", "namespace"])
        chars = CounterMetricFamily(mc.INPUT_CHARACTERS.name, mc.INPUT_CHARACTERS.help, labels=["pod", "namespace"])
        for (ns, pod), c in list(self._counters.items()):
            received.add_metric([pod, ns], c.received)
            chars.add_metric([pod, ns], c.characters)
            completed.add_metric([GPU_PRODUCT, pod, ns], c.completed)
            busy.add_metric([GPU_PRODUCT, pod, ns], c.busy_seconds)
            requests.add_metric(["200", pod, ns], c.completed)
            requests.add_metric(["429", pod, ns], c.refused)
        yield received
        yield chars
        yield completed
        yield busy
        yield requests

    def _advance_counters(self, seconds: float) -> None:
        for (ns, name), load in list(self.loads.items()):
            if load.arrivals_rps is None:
                continue
            ready = [pod for pod, r in self._pods.get((ns, name), []) if r]
            for pod in ready:
                per_pod = load.arrivals_rps / len(ready)
                self._counters.setdefault((ns, pod), PodCounters()).advance(
                    per_pod, load.capacity_rps, seconds, load.characters_per_request
                )

    def _refresh(self) -> None:
        while not self._stop.wait(0.5):
            self._advance_counters(0.5)
            for ns, name in list(self.loads):
                try:
                    pods: Any = self.core.list_namespaced_pod(ns, label_selector=f"{mc.POD_LABEL_TTSDEPLOYMENT}={name}")
                except Exception:
                    continue
                # Like dcgm-exporter, only pods that are running hold a GPU and report on it.
                running = [p for p in pods.items if p.status.phase == "Running" and not p.metadata.deletion_timestamp]
                self._pods[(ns, name)] = [(str(p.metadata.name), _is_ready(p)) for p in running]

    def start(self, job: str = "pod-exporter") -> PodMetricsExporter:
        registry = CollectorRegistry()
        registry.register(self)
        port = free_port()
        self._server, self._thread = start_http_server(port, addr="127.0.0.1", registry=registry)
        threading.Thread(target=self._refresh, daemon=True).start()
        self.cluster.set_scrape_targets(job, [f"127.0.0.1:{port}"])
        self._job = job
        return self

    def stop(self) -> None:
        self._stop.set()
        self.cluster.remove_scrape_targets(self._job)
        self._server.shutdown()


def _is_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))

"""The inference server's Prometheus collectors, built from the shared metrics contract (never retyped)."""

from __future__ import annotations

import contextlib
import importlib
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from voxscale import metrics_contract as mc

log = logging.getLogger("voxscale.inference")
Collector = Gauge | Counter | Histogram


def _make(metric: mc.Metric, registry: CollectorRegistry) -> Collector:
    if metric.kind is mc.Kind.GAUGE:
        return Gauge(metric.name, metric.help, metric.labels, registry=registry)
    if metric.kind is mc.Kind.COUNTER:
        # prometheus_client appends _total itself.
        return Counter(metric.name.removesuffix("_total"), metric.help, metric.labels, registry=registry)
    return Histogram(metric.name, metric.help, metric.labels, buckets=metric.buckets, registry=registry)


@dataclass
class ServerMetrics:
    """All of the server's collectors in one registry (one per server, so tests can run several)."""

    registry: CollectorRegistry
    collectors: dict[str, Collector]

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> ServerMetrics:
        reg = registry or CollectorRegistry()
        return cls(reg, {m.name: _make(m, reg) for m in mc.SERVER_METRICS})

    def gauge(self, metric: mc.Metric) -> Gauge:
        c = self.collectors[metric.name]
        assert isinstance(c, Gauge), metric.name
        return c

    def counter(self, metric: mc.Metric) -> Counter:
        c = self.collectors[metric.name]
        assert isinstance(c, Counter), metric.name
        return c

    def histogram(self, metric: mc.Metric) -> Histogram:
        c = self.collectors[metric.name]
        assert isinstance(c, Histogram), metric.name
        return c


def gpu_product(device: torch.device, device_name: Callable[[torch.device], str] = torch.cuda.get_device_name) -> str:
    """The `gpu_product` label: the device's name in the form of the node label nvidia.com/gpu.product.

    The operator learns capacity per kind of GPU and matches it against node labels, so the name is
    written as GPU feature discovery writes it (spaces as dashes, e.g. NVIDIA-H100-80GB-HBM3); "cpu"
    without a GPU.
    """
    if device.type != "cuda":
        return "cpu"
    return device_name(device).strip().replace(" ", "-")


class BusyClock:
    """Adds to a counter the wall-clock time during which at least one batch executes.

    Overlapping batches count once: busy time is the replica's, set against the requests it completed
    to measure its capacity, so a sum over concurrent workers would overstate how loaded it is.
    """

    def __init__(self, counter: Counter, clock: Callable[[], float] = time.monotonic) -> None:
        self.counter, self.clock = counter, clock
        self.active = 0
        self._mark = 0.0

    def _advance(self) -> None:
        now = self.clock()
        if self.active:
            self.counter.inc(now - self._mark)
        self._mark = now

    @contextmanager
    def running(self) -> Iterator[None]:
        self._advance()
        self.active += 1
        try:
            yield
        finally:
            self._advance()
            self.active -= 1


class NvmlGauges:
    """The contract's GPU utilisation and memory gauges, read from NVML at each scrape, one series per GPU.

    For clusters without dcgm-exporter. Published only where NVML answers (the maintained binding,
    nvidia-ml-py, imported as `pynvml`); without the binding or a driver the series are absent, never
    zero, so a dashboard cannot mistake "unknown" for "idle".
    """

    def __init__(self, nvml: Any, handles: list[tuple[str, Any]], metrics: ServerMetrics) -> None:
        self.nvml, self.handles = nvml, handles
        self.utilization = metrics.gauge(mc.GPU_UTILIZATION)
        self.memory = metrics.gauge(mc.GPU_MEMORY_USED)

    @classmethod
    def start(cls, metrics: ServerMetrics, nvml: Any = None) -> NvmlGauges | None:
        """NVML initialised with a handle per GPU it sees (a pod's own GPUs), or None where it cannot be."""
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError:
                log.info("GPU gauges not published: install nvidia-ml-py for NVML")
                return None
        try:
            nvml.nvmlInit()
            handles = [(str(i), nvml.nvmlDeviceGetHandleByIndex(i)) for i in range(nvml.nvmlDeviceGetCount())]
        except nvml.NVMLError as exc:
            log.warning("GPU gauges not published: NVML unavailable (%s)", exc)
            return None
        return cls(nvml, handles, metrics)

    def refresh(self) -> None:
        """Read every GPU now; one NVML cannot read loses its series until it can again (no stale values)."""
        for gpu, handle in self.handles:
            try:
                busy = self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
                used = self.nvml.nvmlDeviceGetMemoryInfo(handle).used
            except self.nvml.NVMLError:
                for gauge in (self.utilization, self.memory):
                    with contextlib.suppress(KeyError):
                        gauge.remove(gpu)
                continue
            self.utilization.labels(gpu).set(busy)
            self.memory.labels(gpu).set(used)

    def close(self) -> None:
        with contextlib.suppress(self.nvml.NVMLError):
            self.nvml.nvmlShutdown()

"""The inference server's Prometheus collectors, built from the shared metrics contract (never retyped)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from voxscale import metrics_contract as mc

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

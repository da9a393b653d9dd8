"""The inference server's Prometheus collectors, built from the shared metrics contract (never retyped)."""

from __future__ import annotations

from dataclasses import dataclass

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

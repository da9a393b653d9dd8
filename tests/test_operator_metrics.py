"""The operator's own /metrics, read over HTTP from a running operator: a per-object series that no
longer holds is removed, never left at its last value (advice after advisory mode ends, demand after
its data goes, every decision series while the spec is invalid)."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import OperatorProcess, wait_for
from voxscale.localcluster.pod_exporter import PodMetricsExporter

pytestmark = pytest.mark.cluster

Labels = tuple[tuple[str, str], ...]


class OperatorMetrics:
    """An operator started with a known metrics port, and what its /metrics says."""

    def __init__(self, process: OperatorProcess, port: int) -> None:
        self.process, self.port = process, port

    def series(self, namespace: str, name: str) -> dict[str, float]:
        """The object's per-object series: metric name -> value."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels == {"namespace": namespace, "ttsdeployment": name}:
                    out[sample.name] = sample.value
        return out


@pytest.fixture(scope="module")
def operator_metrics(operator: OperatorProcess) -> OperatorMetrics:
    """The module's operator (conftest's `operator`: the chart's RBAC, its own Lease), read over HTTP."""
    return OperatorMetrics(operator, operator.metrics_port)


ADVISED = "voxscale_operator_advised_replicas"
DEMAND = "voxscale_operator_demand_rps"
DESIRED = "voxscale_operator_desired_replicas"
READY = "voxscale_operator_ready_replicas"
SPEC_INVALID = "voxscale_operator_spec_invalid"


def slo_ttsd(mode: str, **scaling: Any) -> dict[str, Any]:
    return {
        "apiVersion": "voxscale.io/v1alpha1",
        "kind": "TTSDeployment",
        "metadata": {"name": "app"},
        "spec": {
            "model": {"image": "ghcr.io/voxscale/inference:0.1.0"},
            "replicas": {"min": 1, "max": 4},
            "scaling": {
                "interval": "2s",
                "mode": mode,
                "predictive": {"enabled": False},
                # The test Prometheus scrapes every second: 5 s holds five samples, and data gone is gone soon.
                "triggers": [{"name": "slo", "type": "slo", "slo": {"latencyP95": "2s", "rateWindow": "5s"}}],
                **scaling,
            },
        },
    }


def apply(cluster: LocalCluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def test_the_advised_series_goes_when_advisory_mode_ends(
    cluster: LocalCluster, operator_metrics: OperatorMetrics, exporter: PodMetricsExporter, namespace: str
) -> None:
    apply(cluster, namespace, slo_ttsd("advisory"))
    exporter.set(namespace, "app", arrivals_rps=4.0)
    wait_for("advice on /metrics", lambda: ADVISED in operator_metrics.series(namespace, "app"), timeout=60)
    apply(cluster, namespace, slo_ttsd("active"))
    wait_for("the advised series gone", lambda: ADVISED not in operator_metrics.series(namespace, "app"), timeout=30)
    assert DESIRED in operator_metrics.series(namespace, "app")


def test_the_demand_series_goes_when_its_data_goes(
    cluster: LocalCluster, operator_metrics: OperatorMetrics, exporter: PodMetricsExporter, namespace: str
) -> None:
    apply(cluster, namespace, slo_ttsd("active"))
    exporter.set(namespace, "app", arrivals_rps=4.0)
    wait_for("demand on /metrics", lambda: DEMAND in operator_metrics.series(namespace, "app"), timeout=60)
    # The pods' counters are no longer exported: Prometheus has no arrival rate once the window passes.
    exporter.loads.pop((namespace, "app"))
    for key in [k for k in exporter._counters if k[0] == namespace]:
        del exporter._counters[key]
    wait_for("the demand series gone", lambda: DEMAND not in operator_metrics.series(namespace, "app"), timeout=60)
    assert DESIRED in operator_metrics.series(namespace, "app")


def test_an_invalid_spec_removes_the_decision_series_and_marks_the_object(
    cluster: LocalCluster, operator_metrics: OperatorMetrics, exporter: PodMetricsExporter, namespace: str
) -> None:
    """Decided: while the spec cannot be parsed no decision holds, so desired/max/metrics-available/
    advised/demand/capacity/forecast are removed; ready replicas still hold and stay; and
    voxscale_operator_spec_invalid is 1 (0 once it parses), for an alert."""
    apply(cluster, namespace, slo_ttsd("advisory"))
    exporter.set(namespace, "app", arrivals_rps=4.0)
    wait_for("the decision series", lambda: {DESIRED, ADVISED} <= set(operator_metrics.series(namespace, "app")))
    # Admitted (the schema does not parse cron), refused by the operator's parser.
    cron = [{"name": "peak", "cron": "61 25 * * *", "duration": "1h", "minReplicas": 2}]
    apply(cluster, namespace, slo_ttsd("advisory", schedules=cron))
    wait_for("the decision series removed", lambda: DESIRED not in operator_metrics.series(namespace, "app"))
    got = operator_metrics.series(namespace, "app")
    assert got.get(SPEC_INVALID) == 1.0 and READY in got, got
    assert not {ADVISED, DEMAND, "voxscale_operator_max_replicas", "voxscale_operator_metrics_available"} & set(got)
    apply(cluster, namespace, slo_ttsd("advisory"))  # fixed: decided again, the mark cleared
    wait_for("the decision series back", lambda: operator_metrics.series(namespace, "app").get(SPEC_INVALID) == 0.0)
    assert DESIRED in operator_metrics.series(namespace, "app")

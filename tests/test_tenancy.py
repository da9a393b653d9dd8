"""Tenants sharing one operator: custom PromQL scoped to its object's namespace (issue 12, item 8),
the pure check table-driven; and one tenant's hung Prometheus not delaying another's round."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest
from kubernetes import config as k8s_config

from voxscale.localcluster.cluster import ClusterState, LocalCluster
from voxscale.localcluster.harness import REPO
from voxscale.operator.crd import GROUP, PLURAL, VERSION
from voxscale.operator.kube import Kube
from voxscale.operator.queries import custom
from voxscale.operator.scaler import Scaler
from voxscale.operator.tenancy import scope_problem, unscoped_selectors


@pytest.mark.parametrize(
    ("query", "loose"),
    [
        ('sum(rate(x{namespace="$namespace",pod=~"$pods"}[1m]))', []),
        ('sum(x{namespace="$namespace"}) / sum(y{namespace="$namespace"}) > bool 2', []),
        ('max_over_time(x{namespace="$namespace"}[10m:1m]) or vector(0)', []),  # a literal reads no series
        ('label_replace(x{namespace="$namespace"}, "a", "$1", "b", "(.*)")', []),
        ("sum(rate(gateway_requests_total[1m]))", ["gateway_requests_total"]),
        ('x{namespace="other"}', ['x{namespace="other"}']),
        ('x{namespace=~"team-a|team-b"}', ['x{namespace=~"team-a|team-b"}']),
        ('x{namespace!="team-a"}', ['x{namespace!="team-a"}']),
        ('x{namespace="team-a"} + on() group_left y', ["y"]),
        ('count(count_over_time(z[5m:1m])) * x{namespace="team-a"}', ["z"]),
        ('{__name__=~"x.*"}', ['{__name__=~"x.*"}']),
    ],
)
def test_every_selector_must_be_pinned_to_the_objects_namespace(query: str, loose: list[str]) -> None:
    assert unscoped_selectors(custom(query, "team-a", "app"), "team-a") == loose


def test_the_refusal_names_the_loose_selectors_and_the_fix() -> None:
    why = scope_problem("sum(rate(a[1m])) + b + c + d", "team-a")
    assert why is not None
    assert "outside namespace team-a: a, b, c (+1 more)" in why and 'namespace="$namespace"' in why
    assert scope_problem("sum(", "team-a") == "is not valid PromQL (unclosed left parenthesis)"
    assert scope_problem('x{namespace="team-a"}', "team-a") is None


def test_a_namespace_value_that_needs_escaping_cannot_widen_the_scope() -> None:
    """Substitution escapes the value, so a namespace named like a regex still pins exactly."""
    q = custom('x{namespace="$namespace"}', 'a".*', "app")
    assert unscoped_selectors(q, 'a".*') == []


# ------------------------------------------------------------------------------ one tenant's slow Prometheus
@pytest.mark.cluster
def test_a_hung_prometheus_with_a_long_timeout_and_history_does_not_delay_another_tenants_round(
    cluster: LocalCluster, cluster_state: ClusterState, prometheus_url: str, namespace: str
) -> None:
    """Team b names a Prometheus that accepts and never answers, with a 30 s timeout and an slo trigger
    (whose forecast floor reads a 7-day history). Team a's object, on the real Prometheus, is decided
    in the same round, which ends within the operator's budget; team b's keeps its last decision and
    says why. Before: the round waited 2 x 30 s for the metrics, then the history's range query."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)  # accepts, never answers
    hung_url = f"http://127.0.0.1:{server.getsockname()[1]}"
    slo = {"name": "slo", "type": "slo", "slo": {"latencyP95": "2s", "rateWindow": "10s"}}
    stuck = ttsd("stuck", {"prometheus": {"url": hung_url, "timeout": "30s"}, "triggers": [slo]})
    served = ttsd("served", {"triggers": [{"name": "c", "type": "promql", "query": "vector(5)", "target": 10}]})
    kube = Kube(k8s_config.new_client_from_config(config_file=str(cluster_state.kubeconfig)))
    scaler = Scaler(kube, default_prometheus_url=prometheus_url)
    scaler.round_budget = 2.0  # as --round-budget sets it
    try:
        for obj in (stuck, served):
            body = create(cluster, kube, namespace, obj)
            kube.apply_children(body)
            scaler.upsert(body)
        for n in (1, 2):  # the second round finds the first one's queries still hanging
            before = scaler.tracked[(namespace, "served")].decision
            took = timed_round(scaler, limit=scaler.round_budget + 15)
            assert took is not None, f"round {n} was still waiting for the hung Prometheus after {15 + 2}s"
            decision = scaler.tracked[(namespace, "served")].decision
            assert decision is not None and decision is not before, f"round {n} made no decision for team a"
            assert decision.metric_values == {"c": 5.0}, decision.metrics_message
            assert ttsd_status(kube, namespace, "served")["lastDecision"]["metrics"] == {"c": 5.0}
            conditions = ttsd_status(kube, namespace, "stuck")["conditions"]
            held = next(c for c in conditions if c["type"] == "MetricsAvailable")
            assert (held["status"], held["reason"]) == ("Unknown", "QueryOverBudget"), held
            assert hung_url in held["message"]
            for key in list(scaler.tracked):
                scaler.mark_due(key)
        assert scaler.history.get((namespace, "stuck")) is None  # its history read is still hanging, elsewhere
    finally:
        server.close()


def ttsd(name: str, scaling: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TTSDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"image": "tts:1"}, "replicas": {"min": 1, "max": 3}, "scaling": scaling},
    }


def create(cluster: LocalCluster, kube: Kube, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    """Create through the API server and read back with the CRD's defaults, as the watch delivers it."""
    cluster.kubectl("apply", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/ttsdeployments.voxscale.io", "--timeout=60s")
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, obj)
    name = obj["metadata"]["name"]
    body: dict[str, Any] = kube.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)  # type: ignore[assignment]
    return body


def ttsd_status(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    got: Any = kube.custom.get_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name)
    return dict(got.get("status") or {})


def timed_round(scaler: Scaler, limit: float) -> float | None:
    """Run one round in a thread: its duration, or None if it was still running after `limit` seconds."""
    done = threading.Event()
    started = time.monotonic()

    def run() -> None:
        scaler.tick()
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return time.monotonic() - started if done.wait(limit) else None

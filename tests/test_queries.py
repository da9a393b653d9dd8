"""PromQL built by the operator: one query per metric kind for every TTSDeployment, owner by pod name."""

from __future__ import annotations

import math
import re
import uuid
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.engine_helpers import policy
from voxscale import metrics_contract as mc
from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import free_port, wait_for
from voxscale.operator import queries, triggers
from voxscale.operator.policy import SpecError, TriggerType
from voxscale.operator.prometheus import Endpoint, PrometheusSource, QueryError, Target
from voxscale.operator.triggers.gpu import GpuUtilization

POD_RE = re.compile(queries._POD_NAME)


def test_owner_is_recovered_from_real_deployment_pod_names() -> None:
    for pod, owner in (
        ("edu-tts-7d9f8c6b5b-x2k4z", "edu-tts"),
        ("a-b-c-5f6d7c8b9-bc2d4", "a-b-c"),
        ("tts-0001-6c9b7d5f4d-q8w2n", "tts-0001"),
    ):
        m = POD_RE.fullmatch(pod)
        assert m is not None and m.group(1) == owner
    assert POD_RE.fullmatch("edu-tts-0") is None  # a StatefulSet-style name is not ours


def test_one_batched_query_per_kind_scoped_to_namespaces() -> None:
    q = triggers.batch_query("queue", ["team-a", "team-b"])
    assert q.startswith("sum by (namespace, ttsdeployment) (label_replace(voxscale_queue_depth{")
    assert 'namespace=~"team\\\\-a|team\\\\-b"' in q or 'namespace=~"team-a|team-b"' in q
    gpu = triggers.batch_query("gpu:DCGM_FI_PROF_GR_ENGINE_ACTIVE", ["ns"])
    assert gpu.startswith("100 * avg by (namespace, ttsdeployment)")  # a ratio, normalised to percent
    lat = triggers.batch_query("latency", ["ns"])
    assert "histogram_quantile(0.95" in lat and "voxscale_request_duration_seconds_bucket" in lat


def test_triggers_share_batches_and_custom_promql_is_substituted_and_escaped() -> None:
    pol = policy(
        {
            "triggers": [
                {"name": "g1", "type": "gpuUtilization", "target": 60},
                {"name": "q", "type": "queueLength", "target": 4},
                {
                    "name": "c",
                    "type": "promql",
                    "target": 1,
                    "query": 'sum(rate(x{namespace="$namespace",pod=~"$pods"}[1m]))',
                },
            ]
        }
    )
    keys = [triggers.kind(t).inputs(t)["value"] for t in pol.triggers]
    assert keys == ["gpu:DCGM_FI_DEV_GPU_UTIL", "queue", None]
    custom = next(t for t in pol.triggers if t.type is TriggerType.PROMQL)
    q = queries.custom(custom.query or "", 'we"ird', "app")
    assert 'namespace="we\\"ird"' in q and "app-[a-z0-9]+-[a-z0-9]+" in q


def test_slo_trigger_reads_arrivals_capacity_and_backlog_in_batches() -> None:
    pol = policy({"triggers": [{"name": "slo", "type": "slo", "slo": {"rateWindow": "30s"}}]})
    slo = pol.triggers[0]
    assert triggers.kind(slo).inputs(slo) == {
        "value": "arrivals:30",
        "recent": "arrivals:8",  # a quarter of the window: a burst shows there first
        "capacity": "capacity:30",
        "backlog": "queue",
        "p95": "latency",  # overload: p95 beyond the objective
        "refused": "refused:30",  # overload: requests answered 429
        "characters": "characters:30",  # the unit of work (operator/capacity.py)
    }
    refused = triggers.batch_query("refused:30", ["ns"])
    assert "voxscale_requests_total{" in refused and 'code="429"' in refused and "[30s]" in refused
    arrivals = triggers.batch_query("arrivals:30", ["ns"])
    assert "rate(voxscale_requests_received_total{" in arrivals and "[30s]" in arrivals
    cap = triggers.batch_query("capacity:30", ["ns"])
    # completed / busy per GPU product, only where the pods were busy enough for it to mean capacity
    assert "voxscale_completed_requests_total" in cap and "voxscale_busy_seconds_total" in cap
    assert "gpu_product" in cap and ">= 0.6" in cap
    chars = triggers.batch_query("characters:30", ["ns"])
    assert "rate(voxscale_input_characters_total{" in chars and "[30s]" in chars


def test_a_trigger_without_settings_gets_the_defaults_from_the_crd() -> None:
    slo = policy({"triggers": [{"name": "s", "type": "slo"}]}).triggers[0]
    assert (slo.latency_seconds, slo.capacity_rps, slo.rate_window.total_seconds()) == (2.0, 16.0, 60.0)
    assert policy({}).triggers[0].type.value == "slo"  # no triggers: the slo trigger


# --------------------------------------------------------------------------- dcgm-exporter scraped either way
def test_a_gpu_metric_nothing_publishes_is_refused_naming_the_field() -> None:
    """Objects stored before the CRD narrowed its enum must not reach the query builder (a KeyError)."""
    with pytest.raises(SpecError) as err:
        policy(
            {"triggers": [{"name": "g", "type": "gpuUtilization", "target": 60, "gpuMetric": mc.GPU_UTILIZATION.name}]}
        )
    assert err.value.field == "spec.scaling.triggers[0].gpuMetric"
    assert "DCGM_FI_DEV_GPU_UTIL" in err.value.message  # the fix: a series that is published
    assert mc.GPU_UTILIZATION.name not in queries.GPU_METRICS


@pytest.mark.parametrize(
    ("seen", "says"),
    [
        (None, "could not be listed"),
        ([], "no DCGM_FI_DEV_GPU_UTIL series at all"),
        (["gpu", "Hostname", "instance"], "none carries pod or exported_pod; labels seen: Hostname, gpu, instance"),
        (["pod", "namespace", "gpu"], "none carries pod/exported_pod of this TTSDeployment's pods (app-<hash>-<id>"),
    ],
)
def test_an_empty_gpu_result_says_which_labels_were_seen(seen: list[str] | None, says: str) -> None:
    msg = GpuUtilization().explain_missing("gpu:DCGM_FI_DEV_GPU_UTIL", "g", "team", "app", seen)
    assert msg.startswith("has no DCGM_FI_DEV_GPU_UTIL sample for this TTSDeployment")
    assert says in msg


def _dcgm_exporter(pods: dict[str, str], value: float) -> tuple[Any, int]:
    """A dcgm-exporter stand-in: one GPU series per (pod -> namespace) it maps, as its pod mapping labels them."""
    registry = CollectorRegistry()
    gauge = Gauge(mc.DCGM_GPU_UTIL.name, "GPU util", ["gpu", "pod", "namespace"], registry=registry)
    for i, (pod, ns) in enumerate(pods.items()):
        gauge.labels(gpu=str(i), pod=pod, namespace=ns).set(value)
    port = free_port()
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    return server, port


def test_gpu_query_joins_dcgm_series_with_or_without_honor_labels(cluster: LocalCluster, prometheus_url: str) -> None:
    """One batched query reads both forms; an object matching neither is told which labels were seen."""
    ns = f"gpu-{uuid.uuid4().hex[:6]}"
    honored, honored_port = _dcgm_exporter({"kept-7d9f8c6b5b-x2k4z": ns}, 70)
    renamed, renamed_port = _dcgm_exporter({"renamed-5f6d7c8b9-bc2d4": ns}, 30)
    job = f"dcgm-{ns}"
    cluster.set_scrape_targets(f"{job}-honor", [f"127.0.0.1:{honored_port}"])
    # As a ServiceMonitor without honorLabels scrapes it: the exporter pod's own pod/namespace are target labels.
    exporter_pod = {"pod": "dcgm-exporter-k2x4z", "namespace": "gpu-operator"}
    cluster.set_scrape_targets(f"{job}-default", [f"127.0.0.1:{renamed_port}"], exporter_pod, honor_labels=False)
    # The GPU query alone: without the SLO model's door queries, which these exporters do not feed.
    gpu = policy({"triggers": [{"name": "g", "type": "gpuUtilization", "target": 60}], "slo": {"enabled": False}})
    ep = Endpoint(prometheus_url)
    targets = [Target(ns, name, gpu, ep) for name in ("kept", "renamed", "absent")]
    try:
        wait_for("both exporters scraped", lambda: _scraped(prometheus_url, ns) == {"kept", "renamed"}, timeout=30)
        source = PrometheusSource()
        got = source.fetch(targets)
        assert got[(ns, "kept")].values == {"g": 70.0}
        assert got[(ns, "renamed")].values == {"g": 30.0}
        absent = got[(ns, "absent")]
        # Not a query failure: the trigger's data is missing, and why is said with it.
        assert absent.values == {} and absent.error is None
        why = absent.invalid["g"]
        assert "none carries pod/exported_pod of this TTSDeployment's pods (absent-<hash>-<id>" in why
        assert "exported_namespace" in why and "exported_pod" in why  # the labels seen
        # One request for every object (the batched query and the samples' age joined, see
        # PrometheusSource._query_all), one look-up of label names.
        assert source.stats.queries == 2
    finally:
        for suffix in ("honor", "default"):
            cluster.remove_scrape_targets(f"{job}-{suffix}")
        honored.shutdown()
        renamed.shutdown()


def _scraped(prometheus_url: str, ns: str) -> set[str]:
    source = PrometheusSource()
    result = source._query(Endpoint(prometheus_url), queries.gpu_utilization(mc.DCGM_GPU_UTIL.name, [ns]))
    return {r["metric"]["ttsdeployment"] for r in result}


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_gpu_exporter_sending_nan_or_inf_is_named_not_taken_for_a_label_mismatch(
    cluster: LocalCluster, prometheus_url: str, value: float
) -> None:
    ns = f"gpu-{uuid.uuid4().hex[:6]}"
    server, port = _dcgm_exporter({"broken-5f6d7c8b9-bc2d4": ns}, value)
    job = f"dcgm-{ns}"
    cluster.set_scrape_targets(job, [f"127.0.0.1:{port}"])
    gpu = policy({"triggers": [{"name": "g", "type": "gpuUtilization", "target": 60}]})
    target = Target(ns, "broken", gpu, Endpoint(prometheus_url))
    try:
        wait_for("the exporter scraped", lambda: _scraped(prometheus_url, ns) == {"broken"}, timeout=30)
        got = PrometheusSource().fetch([target])[target.key]
        assert got.values == {} and got.error is None
        assert got.invalid["g"].startswith(f"returned '{'NaN' if math.isnan(value) else '+Inf'}'"), got.invalid
    finally:
        cluster.remove_scrape_targets(job)
        server.shutdown()


def test_a_rounds_queries_travel_as_one_request_and_a_bad_one_fails_alone(prometheus_url: str) -> None:
    """PrometheusSource._query_all on the real Prometheus: the joined request's answer splits back into
    each query's own series (label sets that collide across queries included); a query Prometheus
    refuses fails only itself, the others are asked alone; an unreachable Prometheus fails all at once."""
    source = PrometheusSource()
    ep = Endpoint(prometheus_url)
    one = 'label_replace(vector(1), "owner", "a", "", "")'
    two = 'label_replace(vector(2), "owner", "a", "", "") or label_replace(vector(3), "owner", "b", "", "")'
    answers = source._query_all(ep, [one, two, one])
    assert source.stats.queries == 1
    assert answers[one] == [{"metric": {"owner": "a"}, "value": answers[one][0]["value"]}]
    assert answers[one][0]["value"][1] == "1"
    assert sorted((s["metric"]["owner"], s["value"][1]) for s in answers[two]) == [("a", "2"), ("b", "3")]

    bad = "sum(rate(oops[1m]"  # does not parse
    answers = source._query_all(ep, [one, bad])
    assert source.stats.queries == 1 + 3  # the joined request, refused; then each alone
    assert isinstance(answers[bad], QueryError) and answers[bad].refused
    assert answers[one][0]["value"][1] == "1"

    down = source._query_all(Endpoint(f"http://127.0.0.1:{free_port()}"), [one, two])
    assert all(isinstance(a, QueryError) and not a.refused for a in down.values())

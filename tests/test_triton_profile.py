"""The triton profile's PromQL on the local cluster's real Prometheus: what the operator reads from
series shaped as Triton publishes them.

The exporter here serves the series names and labels recorded from the real tritonserver 2.51 inside
nvidia-pytriton 0.7.0 (a Python Piper model on the CPU; `curl :8002/metrics`): per model and version,
nv_inference_request_success, nv_inference_request_failure{reason}, nv_inference_count,
nv_inference_exec_count, nv_inference_compute_{input,infer,output}_duration_us and the
nv_inference_pending_request_count gauge. Prometheus adds `namespace` and `pod` as target labels, as
a Kubernetes pod scrape relabels them. Its counters advance at known rates, so each signal has a
known answer: this checks the queries' arithmetic, batching and joins, not Triton itself.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.engine_helpers import policy
from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import REPO, free_port, instant_query, wait_for
from voxscale.operator.policy import IMPLICIT_SLO
from voxscale.operator.profiles import triton as tp
from voxscale.operator.prometheus import Endpoint, PrometheusSource, Target

# Per pod and second, for model "piper": 10 successes, 0.5 rejected, 10 inferences in 5 executions
# (batches of 2), each execution 0.16 s of compute, added once per request (0.32 s): 0.8 s busy a second.
PER_SECOND = {
    tp.SUCCESS: 10.0,
    tp.INFERENCES: 10.0,
    tp.EXECUTIONS: 5.0,
    "nv_inference_compute_infer_duration_us": 5 * 2 * 0.16e6,
}
REJECTED_PER_SECOND = 0.5
PENDING = 3.0
PODS = ("tts-7d9f8c6b5b-x2k4z", "tts-7d9f8c6b5b-q8w2n")
WINDOW = 10  # seconds: the slo trigger's rate window here (young series: a long window would under-read)


@dataclass
class TritonShaped:
    """One pod's /metrics as Triton names and labels them, its counters advancing at PER_SECOND."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    gauges: dict[str, Gauge] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        for name in dict.fromkeys((*PER_SECOND, *tp.COMPUTE, tp.PENDING)):
            self.gauges[name] = Gauge(name, name, ["model", "version"], registry=self.registry)
        self.gauges[tp.FAILURE] = Gauge(tp.FAILURE, tp.FAILURE, ["model", "version", "reason"], registry=self.registry)
        for model in ("piper", "other"):
            for reason in ("OTHER", "BACKEND", "CANCELED", "REJECTED"):
                self.gauges[tp.FAILURE].labels(model, "1", reason).set(0)
            for name in dict.fromkeys((*PER_SECOND, *tp.COMPUTE)):
                self.gauges[name].labels(model, "1").set(0)
        self.gauges[tp.PENDING].labels("piper", "1").set(PENDING)
        self.gauges[tp.PENDING].labels("other", "1").set(100)  # another model's queue: never read

    def advance(self) -> None:
        step = 0.1
        while not self.stop.wait(step):
            for name, rate in PER_SECOND.items():
                self.gauges[name].labels("piper", "1").inc(rate * step)
                self.gauges[name].labels("other", "1").inc(1000 * step)
            self.gauges[tp.FAILURE].labels("piper", "1", "REJECTED").inc(REJECTED_PER_SECOND * step)


@pytest.fixture
def triton_pods(cluster: LocalCluster, prometheus_url: str) -> Iterator[str]:
    """Two pods of Deployment `tts` in a fresh namespace, scraped with pod/namespace target labels."""
    ns = f"triton-{uuid.uuid4().hex[:6]}"
    servers: list[Any] = []
    exporters = [TritonShaped() for _ in PODS]
    for pod, exp in zip(PODS, exporters, strict=True):
        port = free_port()
        server, _ = start_http_server(port, addr="127.0.0.1", registry=exp.registry)
        servers.append(server)
        threading.Thread(target=exp.advance, daemon=True).start()
        cluster.set_scrape_targets(f"{ns}-{pod}", [f"127.0.0.1:{port}"], {"namespace": ns, "pod": pod})
    try:
        seen = f'count(nv_inference_pending_request_count{{namespace="{ns}", model="piper"}})'
        wait_for("both pods scraped", lambda: _value(instant_query(prometheus_url, seen)) == 2.0, timeout=30)
        time.sleep(WINDOW + 3)  # a full rate window of samples
        yield ns
    finally:
        for pod, exp, server in zip(PODS, exporters, servers, strict=True):
            cluster.remove_scrape_targets(f"{ns}-{pod}")
            exp.stop.set()
            server.shutdown()


def _value(result: list[dict[str, Any]]) -> float | None:
    return float(result[0]["value"][1]) if result else None


def test_the_triton_profile_reads_arrivals_capacity_queue_and_refusals(triton_pods: str, prometheus_url: str) -> None:
    ns = triton_pods
    slo = policy({"slo": {"rateWindow": f"{WINDOW}s"}, "triggers": [{"name": "q", "type": "queueLength", "target": 4}]})
    ep = Endpoint(prometheus_url)
    source = PrometheusSource()
    got = source.fetch([Target(ns, "tts", slo, ep, profile=tp.Triton("piper"))])[(ns, "tts")]
    assert got.error is None and IMPLICIT_SLO in got.values, got
    v = got.values
    pods = len(PODS)
    arrivals = pods * (PER_SECOND[tp.SUCCESS] + REJECTED_PER_SECOND)  # 21 rps: what ended, the queue steady
    assert v[IMPLICIT_SLO] == pytest.approx(arrivals, rel=0.15)
    assert v[f"{IMPLICIT_SLO}.recent"] == pytest.approx(arrivals, rel=0.25)
    assert v[f"{IMPLICIT_SLO}.refused"] == pytest.approx(pods * REJECTED_PER_SECOND, rel=0.25)
    assert v[f"{IMPLICIT_SLO}.backlog"] == v["q"] == pods * PENDING  # model "other"'s queue of 100 is not read
    # 10 inferences / (0.32 s compute per execution x 5 executions / 10 inferences per second...) = 12.5 rps
    busy = (
        PER_SECOND["nv_inference_compute_infer_duration_us"]
        / 1e6
        * PER_SECOND[tp.EXECUTIONS]
        / PER_SECOND[tp.INFERENCES]
    )
    assert v[f"{IMPLICIT_SLO}.capacity"] == pytest.approx(PER_SECOND[tp.INFERENCES] / busy, rel=0.1)
    assert f"{IMPLICIT_SLO}.p95" not in v  # Triton has no latency histogram: the overload check goes without it
    # The forecast's history reads the same arrivals, over a range (the series are seconds old: some rate).
    now = dt.datetime.now(dt.UTC)
    history = source.arrival_history(ep, [ns], WINDOW, dt.timedelta(minutes=2), now)[(ns, "tts")]
    assert np.nanmax(history.rps) > 0
    # The operator ranks pods for a scale-down by the requests pending on each.
    assert source.pod_work(ep, ns, "tts", tp.Triton("piper")) == dict.fromkeys(PODS, PENDING)


def test_a_model_the_pods_do_not_serve_has_no_data_not_zero(triton_pods: str, prometheus_url: str) -> None:
    slo = policy({"slo": {"rateWindow": f"{WINDOW}s"}})
    got = PrometheusSource().fetch(
        [Target(triton_pods, "tts", slo, Endpoint(prometheus_url), profile=tp.Triton("kokoro"))]
    )
    assert got[(triton_pods, "tts")].values == {}


@pytest.mark.parametrize(
    ("metrics", "says"),
    [
        ({"profile": "triton"}, "spec.metrics.triton.model: profile triton needs the model's name"),
        ({"triton": {"model": "piper"}}, "spec.metrics.triton is only for profile triton"),
        (
            {"profile": "promql", "promql": {"arrivals": "a", "completions": "c"}},
            "set both completions and busySeconds",
        ),
    ],
)
def test_the_api_server_refuses_a_profile_without_its_settings_naming_the_field(
    cluster: LocalCluster, metrics: dict[str, Any], says: str
) -> None:
    cluster.kubectl("apply", "-f", str(REPO / "crds"))  # this tree's CRD, whichever test ran first
    cluster.kubectl("wait", "--for=condition=Established", "crd/ttsdeployments.voxscale.io", "--timeout=60s")
    obj = {
        "apiVersion": "voxscale.io/v1alpha1",
        "kind": "TTSDeployment",
        "metadata": {"name": "profiled", "namespace": "default"},
        "spec": {"targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"}, "metrics": metrics},
    }
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(obj), check=False)
    assert result.returncode != 0 and says in result.stderr, result.stderr
    obj["spec"]["metrics"] = {"profile": "triton", "triton": {"model": "piper"}}
    ok = cluster.kubectl("apply", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(obj))
    assert json.loads(ok.stdout)["spec"]["metrics"] == {"profile": "triton", "triton": {"model": "piper"}}
    assert "nv_inference_request_success" in cluster.kubectl("explain", "ttsd.spec.metrics.triton.model").stdout

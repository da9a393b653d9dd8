"""Advisory mode beside an HPA that really scales (issue 23), on the local cluster's real node.

Piper's own HTTP server (examples/servers/piper/deployment.yaml: a plain Deployment and Service
applied with kubectl, the door sidecar beside it) is scaled by a real autoscaling/v2
HorizontalPodAutoscaler on CPU utilisation, from the resource metrics API: metrics-server (built
from its Go module, metricsserver.py) reading the real node's kubelet, served through the API
server's aggregation layer. A TTSDeployment attached to the same Deployment in advisory mode shadows
it. Under a bounded load through the Service the HPA scales 1 -> 2 by itself; meanwhile voxscale's
status names the HPA (ShadowingAutoscaler) and carries advisedReplicas, the operator exports its
advice beside the replicas the HPA set (voxscale/metrics_contract.py), Prometheus records both, and
voxscale never writes the Deployment: no voxscale field manager, replicas always the HPA's.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import yaml
from cryptography import x509
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from voxscale import metrics_contract as mc
from voxscale.localcluster import metricsserver, pki, realnode, realpods
from voxscale.localcluster.cluster import ClusterContext, LocalCluster, _aggregation_flags
from voxscale.localcluster.harness import (
    REPO,
    OperatorProcess,
    get_json,
    install_operator_rbac,
    instant_query,
    wait_for,
)
from voxscale.operator import scaler
from voxscale.operator.engine import History, Metrics, Observed, decide
from voxscale.operator.policy import ScalingPolicy
from voxscale.operator.scaler import Scaler

CLUSTER = f"{os.environ.get('VOXSCALE_TEST_CLUSTER', 'pytest')}-hpa-advisory"
NAMESPACE = "hpa"
EXAMPLES = REPO / "examples" / "servers" / "piper"
HPA_NAME = "piper"
HPA = f"HorizontalPodAutoscaler {NAMESPACE}/{HPA_NAME}"
TEXT = "The autoscaler you have scales this server; voxscale watches and says what it would do instead."
ADVISED, WORKLOAD = mc.OPERATOR_ADVISED_REPLICAS.name, mc.OPERATOR_WORKLOAD_REPLICAS.name
# The comparison over a day as /tmp/readme-hpa.md (the README) gives it; the test evaluates each over
# the few minutes it ran against the real Prometheus that scraped the operator: [1d] -> [WINDOW], and
# subquery steps of STEP instead of 1m (a series minutes old may not yet span a whole minute's step).
SEL = '{namespace="hpa", ttsdeployment="piper"}'
DAY_QUERIES = {
    "advised replica-hours": f"avg_over_time({ADVISED}{SEL}[1d]) * 24",
    "running replica-hours": f"avg_over_time({WORKLOAD}{SEL}[1d]) * 24",
    "hours under voxscale's advice": f"avg_over_time(({WORKLOAD}{SEL} < bool {ADVISED})[1d:1m]) * 24",
    "hours over voxscale's advice": f"avg_over_time(({WORKLOAD}{SEL} > bool {ADVISED})[1d:1m]) * 24",
    "largest shortfall": f"max_over_time(({ADVISED}{SEL} - {WORKLOAD})[1d:1m])",
    "hours over the SLO's p95": (
        "avg_over_time((histogram_quantile(0.95, sum by (le) (rate("
        f'{mc.REQUEST_LATENCY.series}{{namespace="hpa"}}[5m]))) > bool 2)[1d:1m]) * 24'
    ),
}
WINDOW, STEP = "15m", "5s"


def manifests(path: Path, images: dict[str, str]) -> list[dict[str, Any]]:
    """The example as a team has it, with this machine's images, on the real node, and CPU requests that
    fit its two cores (100m a container: the HPA's utilisation is usage over the pod's summed requests)."""
    text = path.read_text()
    for placeholder, built in images.items():
        text = text.replace(placeholder, built)
    docs = [d for d in yaml.safe_load_all(text) if d]
    for doc in docs:
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            pod["nodeSelector"] = {realnode.NODE_LABEL: "true"}
            for container in pod["containers"]:
                container["imagePullPolicy"] = "Never"
                container.setdefault("resources", {}).setdefault("requests", {})["cpu"] = "100m"
    return docs


def hpa() -> dict[str, Any]:
    """The team's HPA: CPU utilisation 50 %, 1..2 replicas, scale-up without a stabilisation window."""
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": HPA_NAME},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "piper"},
            "minReplicas": 1,
            "maxReplicas": 2,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}},
                }
            ],
            "behavior": {"scaleUp": {"stabilizationWindowSeconds": 0}},
        },
    }


def advisory_ttsd() -> dict[str, Any]:
    """examples/servers/piper/ttsdeployment.yaml in advisory mode, deciding every 2 s."""
    doc = yaml.safe_load((EXAMPLES / "ttsdeployment.yaml").read_text())
    doc["spec"]["scaling"].update(mode="advisory", interval="2s")
    return dict(doc)


def apply(cluster: LocalCluster, docs: list[dict[str, Any]]) -> None:
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump_all(docs))


def ready_pods(cluster: LocalCluster) -> int:
    items = get_json(cluster, "pods", "-n", NAMESPACE, "-l", "app=piper")["items"]
    return sum(
        any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))
        for p in items
    )


def replicas_owners(deployment: dict[str, Any]) -> dict[str, str]:
    """Field manager -> the subresource it wrote spec.replicas through ("" for the object itself)."""
    return {
        e["manager"]: e.get("subresource", "")
        for e in deployment["metadata"].get("managedFields", [])
        if "f:replicas" in e.get("fieldsV1", {}).get("f:spec", {})
    }


def operator_series(port: int) -> dict[str, float]:
    """The piper TTSDeployment's per-object series on the operator's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels == {"namespace": NAMESPACE, "ttsdeployment": "piper"}
    }


def query(cluster: LocalCluster, promql: str) -> list[dict[str, Any]]:
    assert cluster.state is not None
    return instant_query(cluster.state.prometheus_url, promql)


@pytest.fixture(scope="module")
def metrics_server_binary() -> Path:
    """Built before any cluster is up when the cache lacks it (minutes, cold); cached afterwards."""
    return metricsserver.build()


@pytest.fixture(scope="module")
def real_cluster(metrics_server_binary: Path, operator_image: str, piper_image: str) -> Iterator[LocalCluster]:
    with realpods.real_node_cluster(CLUSTER, [operator_image, piper_image], namespace=NAMESPACE) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def metrics_server(real_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    ms = metricsserver.MetricsServerProcess(real_cluster, tmp_path_factory.mktemp("ms") / "metrics-server.log")
    ms.start()
    try:
        wait_for(
            f"APIService {metricsserver.API_SERVICE} Available",
            lambda: metricsserver.api_service_available(real_cluster) or not ms.alive(),
            timeout=90,
        )
        assert ms.alive(), ms.log()[-3000:]
        yield
    finally:
        ms.stop()


@pytest.fixture(scope="module")
def operator(real_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The operator as the chart's RBAC lets it run (a host process here: its /metrics on loopback),
    scraped by the cluster's Prometheus as a ServiceMonitor would."""
    st = real_cluster.state
    assert st is not None
    op = OperatorProcess(install_operator_rbac(real_cluster, "voxscale"), st.prometheus_url, lease_name="voxscale")
    op.start(tmp_path_factory.mktemp("operator"))
    op.wait_leader()
    real_cluster.set_scrape_targets("voxscale-operator", [f"127.0.0.1:{op.metrics_port}"])
    try:
        yield op
    finally:
        op.stop()


@pytest.mark.timeout(900)
def test_advisory_mode_shadows_an_hpa_that_scales_on_metrics_server_and_writes_nothing(
    real_cluster: LocalCluster, metrics_server: None, operator: OperatorProcess, operator_image: str, piper_image: str
) -> None:
    cluster = real_cluster
    images = {"REG/piper-http:1.8.0": piper_image, "REG/voxscale/operator:0.1.0": operator_image}
    apply(cluster, manifests(EXAMPLES / "deployment.yaml", images))
    wait_for("the Piper pod Ready", lambda: ready_pods(cluster) >= 1, timeout=180, interval=1.0)
    # The resource metrics API answers for the pod through the aggregation layer (kubectl top's source).
    path = f"/apis/metrics.k8s.io/v1beta1/namespaces/{NAMESPACE}/pods"
    wait_for(
        "pod metrics from metrics-server", lambda: json.loads(cluster.kubectl("get", "--raw", path).stdout)["items"]
    )
    apply(cluster, [hpa(), advisory_ttsd()])

    def ttsd() -> dict[str, Any]:
        return dict(get_json(cluster, "ttsd", "piper", "-n", NAMESPACE))

    def active() -> dict[str, Any]:
        conditions = ttsd().get("status", {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "ScalingActive"), {})

    shadow = wait_for("ShadowingAutoscaler", lambda: active().get("reason") == "ShadowingAutoscaler" and active())
    assert shadow["status"] == "True" and HPA in shadow["message"] and "writes nothing" in shadow["message"]
    wait_for(
        "the HPA reading CPU from metrics-server",
        lambda: get_json(cluster, "hpa", HPA_NAME, "-n", NAMESPACE).get("status", {}).get("currentMetrics"),
        timeout=90,
    )

    # Every replica count the Deployment had while the load ran, beside what the HPA had decided then.
    seen: list[tuple[int, int]] = []
    advice: set[int] = set()

    def scaled_by_the_hpa() -> bool:
        dep = get_json(cluster, "deployment", "piper", "-n", NAMESPACE)
        auto = get_json(cluster, "hpa", HPA_NAME, "-n", NAMESPACE).get("status", {})
        seen.append((dep["spec"]["replicas"], auto.get("desiredReplicas", 0)))
        advised = ttsd().get("status", {}).get("advisedReplicas")
        if advised is not None:
            advice.add(advised)
        return bool(dep["spec"]["replicas"] == 2 and auto.get("desiredReplicas") == 2)

    assert not scaled_by_the_hpa() and seen == [(1, 1)], seen  # idle: the HPA keeps its minimum
    url = realpods.service_url(cluster, NAMESPACE, "piper")
    calls = realpods.SpeechLoad(url, clients=2, path="/synthesize", payload={"text": TEXT}).start()
    t0 = time.monotonic()
    try:
        wait_for("the HPA to scale 1 -> 2 on CPU", scaled_by_the_hpa, timeout=240, interval=2.0)
        scaled_after = time.monotonic() - t0
        wait_for("the second pod Ready", lambda: ready_pods(cluster) >= 2, timeout=180, interval=1.0)
        both_ready = time.monotonic() - t0
        print(f"under load: the HPA scaled 1 -> 2 after {scaled_after:.0f} s, 2 pods Ready after {both_ready:.0f} s")
        wait_for(
            "the operator to see the HPA's 2 replicas",
            lambda: operator_series(operator.metrics_port).get(WORKLOAD) == 2,
            timeout=60,
        )
    finally:
        answers = calls.stop()

    assert sum(a.ok for a in answers) > 0, answers[:5]
    print(f"{sum(a.ok for a in answers)} of {len(answers)} requests answered 200; voxscale advised {sorted(advice)}")
    assert {r for r, _ in seen} <= {1, 2} and seen[-1] == (2, 2), seen
    events = get_json(cluster, "events", "-n", NAMESPACE, "--field-selector", f"involvedObject.name={HPA_NAME}")
    rescaled = [e["message"] for e in events["items"] if e["reason"] == "SuccessfulRescale"]
    assert any("cpu resource utilization" in m for m in rescaled), rescaled

    # voxscale wrote nothing: spec.replicas is the HPA's alone (through the scale subresource), and the
    # operator counted no scale of its own.
    dep = get_json(cluster, "deployment", "piper", "-n", NAMESPACE, "--show-managed-fields")
    owners = replicas_owners(dep)
    assert list(owners.values()) == ["scale"] and "controller-manager" in next(iter(owners)), owners
    assert not any(e["manager"].startswith("voxscale") for e in dep["metadata"]["managedFields"])
    status = wait_for("status with the HPA's 2 replicas", lambda: (s := ttsd()["status"])["replicas"] == 2 and s)
    assert HPA in active()["message"] and 1 <= status["advisedReplicas"] <= 3 and advice, (status, advice)
    said = get_json(cluster, "events", "-n", NAMESPACE, "--field-selector", "involvedObject.name=piper")["items"]
    assert not [e for e in said if e["reason"].startswith("Scaled")], said

    series = operator_series(operator.metrics_port)
    assert series[WORKLOAD] == 2 and 1 <= series[ADVISED] <= 3, series
    # Prometheus recorded both sides; the day's comparison evaluates over the minutes this ran.
    wait_for("both series in Prometheus", lambda: query(cluster, f"{WORKLOAD}{SEL} == 2") and query(cluster, ADVISED))
    assert query(cluster, f"max_over_time({WORKLOAD}{SEL}[{WINDOW}])")[0]["value"][1] == "2"
    assert query(cluster, f"min_over_time({WORKLOAD}{SEL}[{WINDOW}])")[0]["value"][1] == "1"
    day: dict[str, float] = {}
    for what, promql in DAY_QUERIES.items():
        result = query(cluster, promql.replace("[1d", f"[{WINDOW}").replace(":1m]", f":{STEP}]"))
        assert len(result) == 1 and result[0]["value"][1] not in ("NaN", "+Inf", "-Inf"), (what, result)
        day[what] = float(result[0]["value"][1])
    print(f"the day's comparison over the last {WINDOW} (x24: as if the day looked like it):", day)
    assert 24 < day["running replica-hours"] < 48  # 1 replica, then 2: the average lies between
    assert 1 <= day["advised replica-hours"] / 24 <= 3
    assert 0 <= day["hours under voxscale's advice"] <= 24 and 0 <= day["hours over voxscale's advice"] <= 24


# ------------------------------------------------------------------------------------------ pure parts
def test_metrics_server_listens_on_the_bridge_only_and_its_apiservice_resolves_to_it() -> None:
    """What the aggregator follows (APIService -> Service port -> Endpoints port of the same name) ends
    at the address metrics-server binds, the real node's bridge; nothing listens elsewhere."""
    cmd = metricsserver.command(Path("/bin/ms"), 4443, Path("/k"), pki.KeyPair(Path("/c"), Path("/k")))
    assert f"--bind-address={realnode.NODE_IP}" in cmd and "--secure-port=4443" in cmd
    assert f"--node-selector={realnode.NODE_LABEL}=true" in cmd  # kwok's nodes have no kubelet
    docs = {d["kind"]: d for d in metricsserver.manifests(4443, b"PEM")}
    api, svc, eps = docs["APIService"], docs["Service"], docs["Endpoints"]
    assert api["metadata"]["name"] == metricsserver.API_SERVICE and base64.b64decode(api["spec"]["caBundle"]) == b"PEM"
    ref = api["spec"]["service"]
    assert (ref["name"], ref["namespace"]) == (svc["metadata"]["name"], svc["metadata"]["namespace"])
    port = next(p for p in svc["spec"]["ports"] if p["port"] == ref["port"])
    assert "selector" not in svc["spec"] and eps["metadata"]["name"] == svc["metadata"]["name"]
    [subset] = eps["subsets"]
    assert [a["ip"] for a in subset["addresses"]] == [realnode.NODE_IP]
    assert [p["port"] for p in subset["ports"] if p["name"] == port["name"]] == [4443]
    # The aggregator checks the serving certificate against <service>.<namespace>.svc.
    assert f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc" in metricsserver.serving_names()


def test_the_front_proxy_has_a_ca_of_its_own_and_the_api_server_trusts_only_its_client(tmp_path: Path) -> None:
    """A client cert from the cluster CA (every component has one) must not be able to assert a user
    through X-Remote-User: the request-header CA is a different one, and only its named client counts."""
    folder = tmp_path / "pki"  # as `up` lays out a cluster's state folder
    cluster_ca = pki.LocalCA(folder)
    before = cluster_ca.pair.cert.read_bytes()
    fp = pki.front_proxy(folder)
    assert fp == pki.front_proxy_files(folder) and fp.ca != cluster_ca.pair.cert
    ca = x509.load_pem_x509_certificate(fp.ca.read_bytes())
    client = x509.load_pem_x509_certificate(fp.client.cert.read_bytes())
    cluster = x509.load_pem_x509_certificate(before)
    assert client.issuer == ca.subject != cluster.subject
    client.verify_directly_issued_by(ca)
    assert client.subject.rfc4514_string() == f"CN={pki.FRONT_PROXY_CLIENT}"
    assert pki.LocalCA(folder).pair.cert.read_bytes() == before  # the cluster CA is left as it was
    flags = _aggregation_flags(cast(ClusterContext, SimpleNamespace(state=SimpleNamespace(dir=tmp_path))))
    assert f"--requestheader-client-ca-file={fp.ca}" in flags
    assert f"--requestheader-allowed-names={pki.FRONT_PROXY_CLIENT}" in flags
    assert "--requestheader-username-headers=X-Remote-User" in flags
    assert f"--proxy-client-cert-file={fp.client.cert}" in flags and "--enable-aggregator-routing=true" in flags


def test_the_operator_exports_its_advice_beside_the_replicas_the_shadowed_autoscaler_set() -> None:
    """Both sides of the day's comparison, from one scrape: in advisory mode the advice and the
    workload's own count; in any mode the workload's count; both gone with the object."""
    spec = {"targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "t"}, "replicas": {"min": 3, "max": 4}}
    decision = decide(ScalingPolicy.from_spec(spec), Observed(2, 2), Metrics(), dt.datetime.now(dt.UTC), History())
    assert (decision.current, decision.desired) == (2, 3)  # the HPA runs 2; voxscale's floor says 3
    key, labels = ("export-ns", "export"), {"namespace": "export-ns", "ttsdeployment": "export"}

    def value(metric: mc.Metric) -> float | None:
        return REGISTRY.get_sample_value(metric.name, labels)

    Scaler._export(key, decision, ready=2, max_replicas=4, advisory=True)
    assert (value(mc.OPERATOR_ADVISED_REPLICAS), value(mc.OPERATOR_WORKLOAD_REPLICAS)) == (3, 2)
    Scaler._export(key, decision, ready=2, max_replicas=4, advisory=False)
    assert (value(mc.OPERATOR_ADVISED_REPLICAS), value(mc.OPERATOR_WORKLOAD_REPLICAS)) == (None, 2)
    scaler._remove_series(key, scaler._PER_OBJECT_GAUGES)  # what Scaler.remove does with the object's series
    assert value(mc.OPERATOR_WORKLOAD_REPLICAS) is None

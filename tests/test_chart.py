"""The Helm chart: lint, template, values schema, and install/upgrade/uninstall on the real control plane."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from voxscale import metrics_contract as mc
from voxscale.localcluster.cluster import ClusterState, LocalCluster
from voxscale.localcluster.harness import CHART, REPO, get_json, helm, wait_for
from voxscale.operator import scaler

ALL_MONITORING = [
    "--set",
    "monitoring.serviceMonitor.enabled=true",
    "--set",
    "monitoring.podMonitor.enabled=true",
    "--set",
    "monitoring.prometheusRule.enabled=true",
    "--set",
    "monitoring.grafanaDashboard.enabled=true",
]


def render(*args: str) -> list[dict[str, Any]]:
    out = helm("template", "vx", str(CHART), "-n", "vx-system", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def test_lint_is_clean_with_every_option() -> None:
    for extra in ([], ALL_MONITORING, ["--set", "watchNamespaces={a,b}"]):
        res = helm("lint", str(CHART), *extra)
        assert "[ERROR]" not in res.stdout and "[WARNING]" not in res.stdout, res.stdout


def test_chart_ships_the_repository_crd_not_a_copy() -> None:
    link = CHART / "crds"
    assert link.is_symlink() and link.resolve() == (REPO / "crds").resolve()


def test_monitoring_extras_are_off_by_default_and_render_when_enabled() -> None:
    kinds = {d["kind"] for d in render()}
    assert {"Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "Service"} <= kinds
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"}
    docs = render(*ALL_MONITORING)
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"} <= {d["kind"] for d in docs}
    dashboard = next(d for d in docs if d["kind"] == "ConfigMap")
    panels = json.loads(dashboard["data"]["voxscale.json"])["panels"]
    assert {
        "Replicas: desired vs ready vs max",
        "GPU utilisation (dcgm-exporter)",
        "Queue depth",
        "p95 latency",
        "Scale events and decisions",
    } <= {p["title"] for p in panels}
    rules = next(d for d in docs if d["kind"] == "PrometheusRule")["spec"]["groups"][0]["rules"]
    assert {"VoxscalePrometheusUnreachable", "VoxscaleAtMaxReplicas", "VoxscaleP95AboveSLO"} <= {
        r["alert"] for r in rules
    }


def test_service_monitor_keeps_the_operators_namespace_label() -> None:
    """Without honorLabels Prometheus renames the per-object `namespace` to exported_namespace, and the
    chart's own alerts and dashboard (by namespace, ttsdeployment) would name the operator's namespace."""
    monitor = next(d for d in render(*ALL_MONITORING) if d["kind"] == "ServiceMonitor")
    assert [e.get("honorLabels") for e in monitor["spec"]["endpoints"]] == [True]


def test_every_metric_the_chart_queries_exists() -> None:
    """The alerts and dashboard use names from the metrics contract and the operator's own registry."""
    text = "\n".join(yaml.safe_dump(d) for d in render(*ALL_MONITORING))
    used = set(re.findall(r"\b(voxscale_[a-z_]+|DCGM_FI_[A-Z_]+)", text))
    known = {m.name for m in (*mc.SERVER_METRICS, mc.DCGM_GPU_UTIL, mc.DCGM_ENGINE_ACTIVE)}
    known |= {m.series for m in mc.SERVER_METRICS}
    for collector in (
        scaler.DECISIONS,
        scaler.SCALE_EVENTS,
        scaler.PROM_ERRORS,
        scaler.TICK_SECONDS,
        scaler.TRACKED,
        scaler.DESIRED,
        scaler.READY,
        scaler.MAX,
        scaler.METRICS_OK,
        scaler.ADVISED,
        scaler.DEMAND,
        scaler.CAPACITY,
        scaler.FORECAST,
        scaler.FORECAST_ACTUAL,
    ):
        for metric in collector.collect():
            known |= {s.name for s in metric.samples} | {metric.name}
            if metric.type == "counter":
                known.add(f"{metric.name}_total")
    assert used - known == set(), f"the chart queries metrics nobody exports: {used - known}"


def test_operator_pod_is_locked_down() -> None:
    dep = next(d for d in render() if d["kind"] == "Deployment")
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    sc = pod["containers"][0]["securityContext"]
    assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["containers"][0]["resources"]["requests"]
    assert pod["containers"][0]["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_operator_pod_has_a_readiness_probe_on_its_health_port() -> None:
    """Every replica answers /healthz on the health port (kopf's endpoint on the leader, operator/standby.py
    on the others), so a rollout waits for each new replica to be up (checkov CKV_K8S_9)."""
    container = next(d for d in render() if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    probe = container["readinessProbe"]
    assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8081} in container["ports"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 10  # outlasts the leader's port hand-over


def test_operator_image_can_be_pinned_by_digest() -> None:
    digest = "sha256:" + "ab" * 32
    dep = next(d for d in render("--set", f"image.digest={digest}") if d["kind"] == "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == f"ghcr.io/voxscale/operator@{digest}"
    res = helm("template", "vx", str(CHART), "--set", "image.digest=latest", check=False)
    assert res.returncode != 0 and "/image/digest" in res.stderr, res.stderr


def test_operator_network_policy_is_off_by_default_and_allows_only_what_the_operator_uses() -> None:
    assert "NetworkPolicy" not in {d["kind"] for d in render()}
    docs = render("--set", "networkPolicy.enabled=true")
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")["spec"]
    pod_labels = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert [sorted(p["port"] for p in rule["ports"]) for rule in policy["ingress"]] == [[8080, 8081]]
    # DNS, the API server, Prometheus; each rule open to any destination on its ports until narrowed.
    assert [sorted(p["port"] for p in rule["ports"]) for rule in policy["egress"]] == [[53, 53], [443, 6443], [9090]]
    assert all("to" not in rule for rule in policy["egress"])
    narrowed = render(
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        "networkPolicy.apiServer.cidrs={10.0.0.5/32}",
        "--set-json",
        'networkPolicy.prometheus.to=[{"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"monitoring"}}}]',
    )
    egress = next(d for d in narrowed if d["kind"] == "NetworkPolicy")["spec"]["egress"]
    assert egress[1]["to"] == [{"ipBlock": {"cidr": "10.0.0.5/32"}}]
    assert egress[2]["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    res = helm("template", "vx", str(CHART), "--set", "networkPolicy.apiServer.cidrs={10.0.0.5}", check=False)
    assert res.returncode != 0 and "/networkPolicy/apiServer/cidrs/0" in res.stderr, res.stderr


def test_operator_may_manage_the_inference_network_policy() -> None:
    """spec.networkPolicy.enabled: the operator applies, watches (to restore) and deletes (when turned off) it."""
    rules = next(d for d in render() if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "vx-voxscale")["rules"]
    rule = next(r for r in rules if r["resources"] == ["networkpolicies"])
    assert rule["apiGroups"] == ["networking.k8s.io"]
    assert set(rule["verbs"]) == {"get", "list", "watch", "create", "patch", "delete"}


def test_namespaced_install_grants_roles_only_in_those_namespaces() -> None:
    docs = render("--set", "watchNamespaces={team-a,team-b}")
    roles = [d for d in docs if d["kind"] == "Role" and not d["metadata"]["name"].endswith("leader-election")]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    cluster_roles = [d for d in docs if d["kind"] == "ClusterRole"]
    assert [r["metadata"]["name"] for r in cluster_roles] == ["vx-voxscale-discovery"]  # read-only discovery
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args


def test_the_prometheus_allowlist_reaches_the_operator() -> None:
    docs = render("--set", "allowedPrometheusUrls={http://prom.monitoring:9090,https://thanos.example}")
    args = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--allowed-prometheus-url=http://prom.monitoring:9090" in args
    assert "--allowed-prometheus-url=https://thanos.example" in args


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("replicaCount=0", "/replicaCount"),
        ("allowedPrometheusUrls={prom:9090}", "/allowedPrometheusUrls/0"),
        ("prometheusUrl=prometheus:9090", "/prometheusUrl"),
        ("replicaCont=2", "additional properties 'replicaCont' not allowed"),
        ("monitoring.prometheusRule.atMaxFor=half an hour", "/monitoring/prometheusRule/atMaxFor"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
    ],
)
def test_a_bad_value_is_refused_by_the_schema_with_a_clear_message(value: str, message: str) -> None:
    res = helm("template", "vx", str(CHART), "--set", value, check=False)
    assert res.returncode != 0
    assert message in res.stderr, res.stderr


def test_install_upgrade_uninstall_on_the_local_control_plane(
    cluster: LocalCluster, cluster_state: ClusterState
) -> None:
    ns = "vx-system"
    install = helm(
        "install",
        "vx",
        str(CHART),
        "-n",
        ns,
        "--create-namespace",
        "--wait=false",
        "--set",
        f"prometheusUrl={cluster_state.prometheus_url}",
        state=cluster_state,
    )
    assert "kubectl get ttsd" in install.stdout  # NOTES.txt tells the next command
    try:
        dep = wait_for("operator Deployment", lambda: get_json(cluster, "deployment", "vx-voxscale", "-n", ns))
        assert dep["spec"]["replicas"] == 2
        wait_for(
            "2 operator pods running",
            lambda: (
                len(
                    [
                        p
                        for p in get_json(cluster, "pods", "-n", ns, "-l", "app.kubernetes.io/instance=vx")["items"]
                        if p["status"].get("phase") == "Running"
                    ]
                )
                == 2
            ),
            timeout=60,
        )
        assert get_json(cluster, "clusterrole", "vx-voxscale")["rules"]
        assert get_json(cluster, "service", "vx-voxscale-metrics", "-n", ns)["spec"]["ports"][0]["port"] == 8080
        assert get_json(cluster, "crd", "ttsdeployments.voxscale.io")

        helm(
            "upgrade",
            "vx",
            str(CHART),
            "-n",
            ns,
            "--wait=false",
            "--set",
            "leaseSeconds=30",
            "--set",
            f"prometheusUrl={cluster_state.prometheus_url}",
            state=cluster_state,
        )
        args = get_json(cluster, "deployment", "vx-voxscale", "-n", ns)["spec"]["template"]["spec"]["containers"][0][
            "args"
        ]
        assert "--lease-seconds=30" in args
        history = json.loads(helm("history", "vx", "-n", ns, "-o", "json", state=cluster_state).stdout)
        assert [h["revision"] for h in history] == [1, 2]
    finally:
        helm("uninstall", "vx", "-n", ns, state=cluster_state, check=False)
    wait_for(
        "uninstalled",
        lambda: cluster.kubectl("get", "deployment", "vx-voxscale", "-n", ns, check=False).returncode != 0,
    )
    assert cluster.kubectl("get", "clusterrole", "vx-voxscale", check=False).returncode != 0
    assert get_json(cluster, "crd", "ttsdeployments.voxscale.io")  # Helm never deletes CRDs it installed

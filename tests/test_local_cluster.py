"""Smoke tests of the local control plane and Prometheus: real processes, real API calls."""

from __future__ import annotations

import datetime as dt
import json
import urllib.parse
import urllib.request
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from voxscale.localcluster import cluster as cluster_module
from voxscale.localcluster.cluster import (
    COMPONENTS,
    GPU_PRODUCT,
    ClusterState,
    Component,
    LocalCluster,
    always,
    enabled_components,
)
from voxscale.localcluster.harness import free_port, wait_for

COLD_START_SECONDS = 6


def api_client(st: ClusterState) -> k8s.ApiClient:
    return k8s_config.new_client_from_config(config_file=str(st.kubeconfig))


def _state(directory: Path, **changes: Any) -> ClusterState:
    st = ClusterState(
        "unit", str(directory), etcd_port=1, apiserver_port=2, kwok_port=3, prometheus_port=4, gpu_nodes=0
    )
    return replace(st, **changes)


def _real_node_only(st: ClusterState) -> bool:
    return st.real_node


def test_component_table_starts_the_control_plane_in_order_and_skips_disabled_entries(tmp_path: Path) -> None:
    names = [c.name for c in COMPONENTS]
    assert len(set(names)) == len(names)
    control_plane = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok", "prometheus"]
    real_node = ["containerd", "kubelet", "kube-proxy"]
    assert names == control_plane + real_node
    assert [c.name for c in enabled_components(_state(tmp_path))] == control_plane
    assert [c.name for c in enabled_components(_state(tmp_path, real_node=True))] == names
    optional = Component("extra", lambda ctx: ["extra"], enabled=_real_node_only)
    table = (*COMPONENTS, optional)
    assert enabled_components(_state(tmp_path, real_node=True), table)[-1] == optional


def test_down_cleans_up_enabled_components_newest_first_even_when_their_process_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOXSCALE_STATE_DIR", str(tmp_path))
    cleaned: list[str] = []

    def entry(name: str, enabled: Any = always) -> Component:
        return Component(name, lambda ctx: [name], cleanup=lambda st: cleaned.append(name), enabled=enabled)

    table = (entry("first"), entry("optional", _real_node_only), entry("last"))
    monkeypatch.setattr(cluster_module, "COMPONENTS", table)
    local = LocalCluster("unit")
    local.directory.mkdir()
    no_such_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # "first" died long ago
    saved = asdict(_state(local.directory, pids={"first": no_such_pid}))
    del saved["real_node"]  # a state.json written before the field existed still loads
    (local.directory / "state.json").write_text(json.dumps(saved))
    assert local.down(quiet=True) == []
    assert cleaned == ["last", "first"]
    assert not local.directory.exists()


def test_fake_gpu_nodes_carry_gpu_capacity_and_labels(cluster: LocalCluster, cluster_state: ClusterState) -> None:
    nodes = k8s.CoreV1Api(api_client(cluster_state)).list_node().items
    gpu_nodes = [n for n in nodes if n.metadata.labels.get("nvidia.com/gpu.product") == GPU_PRODUCT]
    assert len(gpu_nodes) == cluster_state.gpu_nodes
    for node in gpu_nodes:
        assert node.status.capacity["nvidia.com/gpu"] == "8"
        assert node.status.allocatable["nvidia.com/gpu"] == "8"
        ready = {c.type: c.status for c in node.status.conditions}["Ready"]
        assert ready == "True"


def test_apiserver_reports_pinned_version_and_enforces_rbac(cluster_state: ClusterState) -> None:
    from voxscale.localcluster.binaries import pinned_versions

    version = k8s.VersionApi(api_client(cluster_state)).get_code()
    assert version.git_version == pinned_versions()["kubernetes"]
    # No credentials: the real API server refuses (RBAC + authentication are on).
    anonymous = k8s.Configuration()
    anonymous.host = cluster_state.apiserver_url
    anonymous.ssl_ca_cert = str(cluster_state.dir / "pki" / "ca.crt")
    with pytest.raises(k8s.ApiException) as err:
        k8s.CoreV1Api(k8s.ApiClient(anonymous)).list_namespaced_pod("default")
    assert err.value.status in (401, 403)


def test_gpu_deployment_scaled_to_three_runs_on_gpu_nodes_and_turns_ready_after_cold_start(
    cluster: LocalCluster, cluster_state: ClusterState
) -> None:
    api = api_client(cluster_state)
    apps, core = k8s.AppsV1Api(api), k8s.CoreV1Api(api)
    name = "smoke-gpu"
    manifest = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {
                    "labels": {"app": name},
                    "annotations": {"voxscale.io/cold-start": f"{COLD_START_SECONDS}s"},
                },
                "spec": {
                    "containers": [
                        {
                            "name": "tts",
                            "image": "example.invalid/tts:1",
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        }
                    ]
                },
            },
        },
    }
    cluster.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    try:
        cluster.kubectl("scale", f"deployment/{name}", "--replicas=3")
        seen_running_not_ready: set[str] = set()

        def pods_state() -> list[Any]:
            pods = core.list_namespaced_pod("default", label_selector=f"app={name}").items
            for p in pods:
                conds = {c.type: c.status for c in (p.status.conditions or [])}
                if p.status.phase == "Running" and conds.get("Ready") == "False":
                    seen_running_not_ready.add(p.metadata.name)
            return pods

        def all_ready() -> bool:
            pods = pods_state()
            return len(pods) == 3 and all(
                {c.type: c.status for c in (p.status.conditions or [])}.get("Ready") == "True" for p in pods
            )

        wait_for("3 Ready pods", all_ready, timeout=90)
        pods = pods_state()
        # Every pod was observed Running but not yet Ready: the cold start is modelled, not skipped.
        assert {p.metadata.name for p in pods} <= seen_running_not_ready
        nodes = {n.metadata.name: n for n in core.list_node().items}
        for pod in pods:
            assert pod.status.phase == "Running"
            assert pod.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
            assert nodes[pod.spec.node_name].metadata.labels["nvidia.com/gpu.product"] == GPU_PRODUCT
            started: dt.datetime = pod.status.start_time
            ready_at = next(c.last_transition_time for c in pod.status.conditions if c.type == "Ready")
            # Timestamps have one-second resolution.
            assert (ready_at - started).total_seconds() >= COLD_START_SECONDS - 1, (
                pod.metadata.name,
                started,
                ready_at,
            )
        deployment = apps.read_namespaced_deployment(name, "default")
        assert deployment.status.ready_replicas == 3
    finally:
        cluster.kubectl("delete", "deployment", name, "--wait=false", check=False)


CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.smoke.voxscale.io"},
    "spec": {
        "group": "smoke.voxscale.io",
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "properties": {"size": {"type": "integer", "minimum": 1}},
                                "required": ["size"],
                            }
                        },
                    }
                },
            }
        ],
    },
}


def test_crd_and_object_applied_with_kubectl_read_back_with_python_client(
    cluster: LocalCluster, cluster_state: ClusterState
) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(CRD))
    cluster.kubectl("wait", "--for=condition=Established", "crd/widgets.smoke.voxscale.io", "--timeout=60s")
    obj = {"apiVersion": "smoke.voxscale.io/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {"size": 3}}
    wait_for(
        "widget accepted",
        lambda: cluster.kubectl("apply", "-f", "-", input=json.dumps(obj), check=False).returncode == 0,
    )
    try:
        custom = k8s.CustomObjectsApi(api_client(cluster_state))
        got = custom.get_namespaced_custom_object("smoke.voxscale.io", "v1", "default", "widgets", "w1")
        assert got["spec"] == {"size": 3}
        # The schema is enforced by the real API server.
        bad = {**obj, "metadata": {"name": "w2"}, "spec": {"size": 0}}
        refused = cluster.kubectl("apply", "-f", "-", input=json.dumps(bad), check=False)
        assert refused.returncode != 0 and "spec.size" in refused.stderr
    finally:
        cluster.kubectl("delete", "crd", "widgets.smoke.voxscale.io", "--wait=false", check=False)


def test_prometheus_scrapes_a_test_exporter(cluster: LocalCluster, prometheus_url: str) -> None:
    registry = CollectorRegistry()
    gauge = Gauge("voxscale_smoke_value", "a value the test sets", ["pod"], registry=registry)
    gauge.labels(pod="tts-0").set(42.5)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    cluster.set_scrape_targets("smoke", [f"127.0.0.1:{port}"])
    try:

        def query() -> list[Any]:
            q = urllib.parse.urlencode({"query": 'voxscale_smoke_value{pod="tts-0"}'})
            with urllib.request.urlopen(f"{prometheus_url}/api/v1/query?{q}", timeout=5) as resp:
                result: list[Any] = json.load(resp)["data"]["result"]
            return result

        result = wait_for("Prometheus to scrape the exporter", query, timeout=30)
        assert float(result[0]["value"][1]) == 42.5
        assert result[0]["metric"]["pod"] == "tts-0"  # honor_labels keeps the exporter's pod label
        gauge.labels(pod="tts-0").set(7)
        wait_for("the new value", lambda: float(query()[0]["value"][1]) == 7.0, timeout=30)
    finally:
        cluster.remove_scrape_targets("smoke")
        server.shutdown()
        thread.join(timeout=5)

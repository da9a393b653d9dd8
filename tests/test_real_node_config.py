"""The real worker node's configuration, checked on plain data (no processes): what containerd,
the CNI bridge, Prometheus' Kubernetes discovery and the demo's ramp are given."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from voxscale.demo_real import RAMP, clients_at
from voxscale.localcluster import binaries, realnode
from voxscale.localcluster.cluster import ClusterState


def state(tmp_path: Path) -> ClusterState:
    return ClusterState(
        name="unit",
        directory=str(tmp_path),
        etcd_port=1,
        apiserver_port=2,
        kwok_port=3,
        prometheus_port=4,
        gpu_nodes=0,
        real_node=True,
    )


def test_containerd_config_is_valid_toml_with_what_this_host_needs(tmp_path: Path) -> None:
    config = tomllib.loads(realnode._containerd_config(state(tmp_path)))
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert config["version"] == 2
    assert config["root"] == str(realnode.containerd_root())  # images kept across clusters
    assert config["state"].startswith(str(tmp_path)) and config["grpc"]["address"].startswith(str(tmp_path))
    assert cri["restrict_oom_score_adj"] is True  # no CAP_SYS_RESOURCE here
    assert cri["netns_mounts_under_state_dir"] is True  # so `down` finds them
    assert cri["sandbox_image"] == realnode.PAUSE_IMAGE
    assert cri["containerd"]["runtimes"]["runc"]["options"]["SystemdCgroup"] is False


def test_cni_bridge_keeps_its_state_in_the_cluster_folder_and_adds_no_masquerade_rules(tmp_path: Path) -> None:
    bridge = realnode._cni_config(state(tmp_path))["plugins"][0]
    assert bridge["bridge"] == realnode.BRIDGE and bridge["ipMasq"] is False
    assert bridge["ipam"]["dataDir"].startswith(str(tmp_path))
    assert bridge["ipam"]["ranges"] == [[{"subnet": realnode.POD_CIDR}]]


def test_prometheus_discovers_only_the_real_nodes_annotated_pods_and_labels_them_as_the_operator_reads(
    tmp_path: Path,
) -> None:
    job = realnode.scrape_config(state(tmp_path))
    sd = job["kubernetes_sd_configs"][0]
    assert sd["role"] == "pod" and sd["api_server"] == "https://127.0.0.1:2"
    assert sd["selectors"] == [{"role": "pod", "field": f"spec.nodeName={realnode.NODE_NAME}"}]
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"namespace", "pod", "__address__", "__metrics_path__"} <= targets


def test_a_hostnetwork_pod_is_pointed_at_the_loopback_api_server(tmp_path: Path) -> None:
    assert realnode.api_server_env(state(tmp_path)) == {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": "2",
    }


def test_the_real_node_adds_its_binaries_and_a_kubernetes_sd_prometheus_only_when_asked() -> None:
    assert set(binaries.needed(real_node=True)) - set(binaries.needed()) == {"kubernetes-node", "pause", "prometheus"}
    assert set(binaries.needed(real_node=True)) == set(binaries.components()) - binaries.ON_DEMAND
    assert binaries._prometheus_release("v0.316.0") == "3.16.0"
    assert binaries._prometheus_release("v0.54.1") == "2.54.1"


def test_the_demo_ramp_goes_quiet_burst_tail_and_stops() -> None:
    assert [clients_at(t, 1.0) for t in (0, 19, 20, 89, 90, 169, 170)] == [1, 1, 6, 6, 2, 2, 0]
    assert clients_at(RAMP[1][0] * 0.6, 0.6) == RAMP[1][1]


def test_a_cluster_refused_the_real_node_cleans_up_nothing_of_the_one_that_runs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its down() runs the real-node cleanups; without the owner mark they must not touch the
    machine-wide bridge, iptables rules, containers or cgroups."""
    calls: list[object] = []
    monkeypatch.setattr("subprocess.run", lambda *a, **kw: calls.append(a))
    monkeypatch.setattr("os.kill", lambda *a: calls.append(a))
    st = state(tmp_path)
    for cleanup in (realnode.cleanup_kube_proxy, realnode.cleanup_kubelet, realnode.cleanup_containerd):
        cleanup(st)
    assert calls == []
    assert not realnode.owns_the_node(st)


def test_an_image_store_that_was_not_stopped_cleanly_starts_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """containerd killed mid-import can leave its two metadata databases disagreeing; the next run
    must not inherit that (it failed every import with 'parent snapshot ... does not exist')."""
    monkeypatch.setenv("VOXSCALE_CACHE_DIR", str(tmp_path / "cache"))
    root = realnode.containerd_root()
    (root / "io.containerd.snapshotter.v1.overlayfs").mkdir(parents=True)
    realnode._open_image_store()
    assert not any(root.iterdir())  # no mark: the last containerd was killed, or never stopped

    (root / "io.containerd.content.v1.content").mkdir()
    (root / realnode.CLEAN_STOP_MARK).touch()
    realnode._open_image_store()
    assert (root / "io.containerd.content.v1.content").exists()  # stopped cleanly: kept
    assert not (root / realnode.CLEAN_STOP_MARK).exists()  # in use again until the next clean stop


def test_only_a_containerd_stopped_by_sigterm_marks_its_store_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOXSCALE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(realnode, "owns_the_node", lambda st: True)
    monkeypatch.setattr(realnode, "_kill_where", lambda match: None)
    monkeypatch.setattr(realnode, "_remove_kubepods_cgroups", lambda: None)
    monkeypatch.setattr(realnode, "_restore_sysctls", lambda st: None)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: None)  # `ip link delete` of the real bridge
    realnode.containerd_root().mkdir(parents=True)
    st = state(tmp_path / "node")
    realnode.cleanup_containerd(st)
    assert not (realnode.containerd_root() / realnode.CLEAN_STOP_MARK).exists()
    st.stopped_cleanly.append("containerd")
    realnode.cleanup_containerd(st)
    assert (realnode.containerd_root() / realnode.CLEAN_STOP_MARK).exists()


def test_a_pod_network_pod_is_pointed_at_the_nodes_bridge_address(tmp_path: Path) -> None:
    st = state(tmp_path)
    assert realnode.api_server_env(st, pod_network=True) == {
        "KUBERNETES_SERVICE_HOST": realnode.NODE_IP,
        "KUBERNETES_SERVICE_PORT": "2",
    }
    assert realnode.prometheus_url(st, pod_network=True) == f"http://{realnode.NODE_IP}:4"
    assert realnode.prometheus_url(st) == "http://127.0.0.1:4"


def test_only_pod_traffic_to_the_bridge_address_is_forwarded_to_the_api_server_and_prometheus_on_loopback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing listens on another interface: the DNAT takes only pod-CIDR sources entering on the
    bridge for NODE_IP, and only the API server's and Prometheus' ports; route_localnet is set on
    the bridge alone (it goes with it), not machine-wide."""
    calls: list[list[str]] = []
    written: dict[str, str] = {}
    monkeypatch.setattr(realnode, "delete_chains", lambda chains: calls.append(["delete", *chains]))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(list(cmd)))
    monkeypatch.setattr(Path, "write_text", lambda self, text: written.__setitem__(str(self), text))
    realnode._forward_to_loopback(state(tmp_path))
    assert written == {f"/proc/sys/net/ipv4/conf/{realnode.BRIDGE}/route_localnet": "1"}
    assert calls[0] == ["delete", realnode.FORWARD_CHAIN]  # a stale chain first
    rules = [" ".join(c) for c in calls[1:]]
    assert all(r.startswith("iptables -w -t nat ") for r in rules)
    jump = [r for r in rules if "PREROUTING" in r]
    assert jump == [
        f"iptables -w -t nat -I PREROUTING -i {realnode.BRIDGE} -s {realnode.POD_CIDR} -d {realnode.NODE_IP} "
        f"-p tcp -j {realnode.FORWARD_CHAIN}"
    ]
    dnats = sorted(r.split("--to-destination ")[1] for r in rules if "DNAT" in r)
    assert dnats == ["127.0.0.1:2", "127.0.0.1:4"]


def test_the_api_servers_certificate_names_the_bridge_address_only_with_a_real_node(tmp_path: Path) -> None:
    from cryptography import x509

    from voxscale.localcluster.cluster import LocalCluster

    for real_node in (True, False):
        st = state(tmp_path / str(real_node))
        st.real_node = real_node
        st.dir.mkdir(parents=True)
        ctx = LocalCluster("unit")._setup_pki(st, "prometheus", 1.0)
        cert = x509.load_pem_x509_certificate(ctx.serving.cert.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
        assert ips == ({"127.0.0.1", realnode.NODE_IP} if real_node else {"127.0.0.1"})

"""The chart's default HA install on real pods (issue 22, item 1): `helm install` with the chart's
defaults (two replicas, the pod network, leaseSeconds 15) on a local cluster's real node.

- Both operator pods stay Running and Ready with 0 restarts for 3 minutes. The crash-loop this
  guards against (a standby that served no liveness endpoint while it waited for the Lease) had the
  kubelet kill the standby every ~30 s (livenessProbe: 3 failures x 10 s), so 3 minutes would have
  shown about six restarts; a standby that survives it is past anything periodic the probe does.
- The leader's container is killed (SIGKILL, no chance to release the Lease): leadership is back
  within the lease. The kubelet restarts a killed container at once under the same pod name, which
  is the Lease identity, so that replica takes its own Lease straight back (~3 s here).
- The leader's container is killed and its pod is gone with it (force-deleted in the same breath,
  as when a node dies): the standby leads within leaseSeconds plus a small margin, by the Lease's
  expiry (the holder goes from the dead pod to the standby, never through a release), and the
  Deployment's replacement pod stands by, Ready.

The API server and Prometheus listen on 127.0.0.1 only; the real node forwards its bridge address
to them for pods (realnode._forward_to_loopback), which is what lets the operator use the pod network.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from voxscale.localcluster import realnode
from voxscale.localcluster.cluster import ClusterState, LocalCluster
from voxscale.localcluster.harness import CHART, OPERATOR_NAMESPACE, get_json, helm, wait_for

RELEASE = "voxscale"
DEFAULTS = yaml.safe_load((CHART / "values.yaml").read_text())
LEASE_SECONDS = int(DEFAULTS["leaseSeconds"])
STEADY_SECONDS = 180
# The standby starts its clock when it first sees the dead leader's last renewal (it polls every
# 1 s, so up to 1 s late) and writes at its first 1 s poll after leaseSeconds on that clock: at most
# leaseSeconds + 2 s after that renewal, which came before the kill. 3 s more for the API round
# trips and the CPU of this shared 2-core machine.
FAILOVER_MARGIN = 5.0


@pytest.fixture(scope="module")
def ha_cluster(operator_image: str) -> Iterator[LocalCluster]:
    cluster = LocalCluster("operator-ha")
    st = cluster.up(gpu_nodes=1, real_node=True, timeout=300)
    try:
        cluster.load_images([operator_image])
        yield cluster
    finally:
        cluster.down(quiet=True)
        assert realnode.leftovers(st) == [], "cluster down left these behind"


def install_with_defaults(st: ClusterState, operator_image: str) -> None:
    """The chart's defaults; set only what this machine needs: the image (copied into containerd,
    no registry), the real node, and where a pod finds the API server and Prometheus."""
    repository, tag = operator_image.rsplit(":", 1)
    env = [{"name": k, "value": v} for k, v in realnode.api_server_env(st, pod_network=True).items()]
    res = helm(
        "install", RELEASE, str(CHART),
        "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
        "--set", f"image.repository={repository}",
        "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never",
        "--set-json", f"nodeSelector={json.dumps({realnode.NODE_LABEL: 'true'})}",
        "--set-json", f"extraEnv={json.dumps(env)}",
        "--set", f"prometheusUrl={realnode.prometheus_url(st, pod_network=True)}",
        "--wait", "--timeout", "180s",
        state=st, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr


def operator_pods(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    items = get_json(cluster, "pods", "-n", OPERATOR_NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]
    return {p["metadata"]["name"]: p for p in items if not p["metadata"].get("deletionTimestamp")}


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return pod["status"].get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conditions
    )


def restarts(pod: dict[str, Any]) -> int:
    return sum(c.get("restartCount", 0) for c in pod["status"].get("containerStatuses", []))


def holder(cluster: LocalCluster) -> str | None:
    spec = get_json(cluster, "lease", RELEASE, "-n", OPERATOR_NAMESPACE)["spec"]
    return spec.get("holderIdentity")


def kill_container(st: ClusterState, pod: dict[str, Any]) -> float:
    """SIGKILL the pod's operator container through containerd, as a crash would; returns when."""
    container_id = pod["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    killed = time.monotonic()
    realnode.ctr(st, "tasks", "kill", "--signal", "SIGKILL", container_id)
    return killed


@pytest.mark.timeout(600)
def test_the_charts_default_ha_install_stays_up_and_the_standby_takes_over_from_a_dead_leader(
    ha_cluster: LocalCluster, operator_image: str
) -> None:
    cluster = ha_cluster
    st = cluster.state
    assert st is not None
    assert DEFAULTS["replicaCount"] == 2 and DEFAULTS["hostNetwork"] is False

    install_with_defaults(st, operator_image)
    pods = wait_for(
        "two Ready operator pods", lambda: len([p for p in operator_pods(cluster).values() if ready(p)]) == 2
    )
    pods = operator_pods(cluster)
    for pod in pods.values():
        assert not pod["spec"].get("hostNetwork"), "the chart's default is the pod network"
        assert pod["status"]["podIP"].startswith(realnode.POD_CIDR.rsplit(".", 1)[0])
    leader = wait_for("a replica to hold the Lease", lambda: holder(cluster), timeout=60)
    assert leader in pods

    # Both stay Running and Ready, with no restart, for 3 minutes (checked every 5 s: fail early).
    steady_until = time.monotonic() + STEADY_SECONDS
    while time.monotonic() < steady_until:
        now = operator_pods(cluster)
        assert set(now) == set(pods), f"pods changed: {sorted(pods)} -> {sorted(now)}"
        assert all(ready(p) and restarts(p) == 0 for p in now.values()), {
            name: (p["status"].get("phase"), ready(p), restarts(p)) for name, p in now.items()
        }
        time.sleep(5)
    assert holder(cluster) == leader, "the Lease moved while both replicas were up"

    # The leader's container alone is killed: the kubelet restarts it under the same pod name (the
    # Lease identity) and the Lease is renewed again within the lease, by one of the two.
    pods = operator_pods(cluster)
    killed = kill_container(st, pods[leader])
    time.sleep(0.5)  # a renewal the dead process had in flight lands before this read
    renewed_before = get_json(cluster, "lease", RELEASE, "-n", OPERATOR_NAMESPACE)["spec"]["renewTime"]

    def renewed() -> str | None:
        spec = get_json(cluster, "lease", RELEASE, "-n", OPERATOR_NAMESPACE)["spec"]
        return spec.get("holderIdentity") if spec.get("renewTime") != renewed_before else None

    back = wait_for("the Lease to be renewed after the kill", renewed, LEASE_SECONDS + FAILOVER_MARGIN, 0.25)
    print(f"container killed: {back} holds the Lease again after {time.monotonic() - killed:.1f}s")
    assert back in pods
    wait_for("both pods Ready again", lambda: all(ready(p) for p in operator_pods(cluster).values()), 60, 0.5)
    assert restarts(operator_pods(cluster)[leader]) == 1  # the kill did happen, and was restarted in place

    # The leader dies with its pod (SIGKILL, then the pod force-deleted, as with a lost node): the
    # standby takes over when the Lease expires, never through a release.
    pods = operator_pods(cluster)
    leader = holder(cluster)
    assert leader in pods
    (standby,) = set(pods) - {leader}
    killed = kill_container(st, pods[leader])
    cluster.kubectl("delete", "pod", leader, "-n", OPERATOR_NAMESPACE, "--grace-period=0", "--force", "--wait=false")
    seen = [leader]
    deadline = killed + LEASE_SECONDS + FAILOVER_MARGIN
    while seen[-1] != standby and time.monotonic() < deadline:
        now_holder = holder(cluster)
        if now_holder != seen[-1]:
            seen.append(str(now_holder))
        time.sleep(0.2)
    failover = time.monotonic() - killed
    print(f"leader {leader} killed with its pod: {standby} leads after {failover:.1f}s (holders: {seen})")
    assert seen == [leader, standby], f"holders after the kill: {seen} in {failover:.1f}s"

    # The Deployment's replacement stands by, Ready, without taking the Lease.
    wait_for(
        "the replacement pod Ready",
        lambda: len([p for n, p in operator_pods(cluster).items() if n != standby and ready(p)]) == 1,
        timeout=90,
        interval=0.5,
    )
    assert holder(cluster) == standby

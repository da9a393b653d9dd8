"""Two operator replicas: one acts, the other stands by and takes over when the active one is killed."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from pathlib import Path

from voxscale.localcluster.cluster import ClusterState, LocalCluster
from voxscale.localcluster.harness import OperatorProcess, get_json, install_operator_rbac, wait_for

LEASE_SECONDS = 6


def ttsd(name: str) -> str:
    return json.dumps(
        {
            "apiVersion": "voxscale.io/v1alpha1",
            "kind": "TTSDeployment",
            "metadata": {"name": name},
            "spec": {"model": {"image": "ghcr.io/voxscale/inference:0.1.0"}},
        }
    )


def test_standby_takes_over_when_the_active_operator_is_killed(
    cluster: LocalCluster, cluster_state: ClusterState, tmp_path: Path
) -> None:
    ns = f"ha-{uuid.uuid4().hex[:6]}"  # a rerun must not find the last run's Deployment in a terminating namespace
    # A namespace-scoped install (Role + RoleBinding in `ha-test` only), release `voxscale-ha`.
    kubeconfig = install_operator_rbac(cluster, "voxscale-ha", watch_namespaces=[ns])
    replicas = [
        OperatorProcess(
            kubeconfig,
            cluster_state.prometheus_url,
            "voxscale-ha",
            identity=f"replica-{i}",
            namespaces=[ns],
            lease_seconds=LEASE_SECONDS,
        )
        for i in range(2)
    ]
    first, second = replicas
    try:
        first.start(tmp_path)
        first.wait_leader()
        second.start(tmp_path)
        wait_for("the second replica to stand by", lambda: "standing by" in second.log())
        # The chart probes every replica: a standby that does not answer is restarted every ~30 s.
        assert second.healthz() == 200, second.log()[-2000:]
        assert first.healthz() == 200
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=ttsd("before"))
        wait_for("the leader reconciles", lambda: get_json(cluster, "deployment", "before", "-n", ns))
        assert not second.is_leader()

        first.kill()  # SIGKILL: no chance to hand the lease over
        killed, killed_wall = time.monotonic(), dt.datetime.now()
        cluster.kubectl("apply", "-n", ns, "-f", "-", input=ttsd("after"))
        wait_for(
            "the standby reconciles",
            lambda: get_json(cluster, "deployment", "after", "-n", ns),
            timeout=LEASE_SECONDS + 30,
        )
        takeover = time.monotonic() - killed
        print(f"takeover after SIGKILL: {takeover:.2f}s (lease {LEASE_SECONDS}s); {_phases(second.log(), killed_wall)}")
        assert second.is_leader()
        wait_for("kopf's liveness endpoint on the new leader", lambda: second.healthz() == 200, timeout=10)
        # Bounded: the lease duration, one poll, kopf's start-up and one reconcile.
        assert takeover <= LEASE_SECONDS + 15, takeover
        holder = get_json(cluster, "lease", "voxscale-ha", "-n", "voxscale-system")["spec"]["holderIdentity"]
        assert holder == "replica-1"
    finally:
        for op in replicas:
            op.stop()
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _phases(log: str, since: dt.datetime) -> str:
    """When the standby won the lease and when kopf had started, in seconds after the kill (for the report)."""
    marks = {"lease": "now holds lease", "kopf started": "Activity '_startup' succeeded"}
    out = []
    for what, needle in marks.items():
        line = next((ln for ln in log.splitlines() if needle in ln), None)
        if line is not None:
            at = dt.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
            out.append(f"{what} +{(at - since).total_seconds():.2f}s")
    return ", ".join(out)

"""A test killed midway leaves nothing behind (issue 20): the real-pods demo test, run by a pytest of
its own with pytest-timeout forced low, is interrupted while its real-node cluster runs; afterwards
no process, mount, link, iptables chain or cgroup of that cluster is left, and the next real-node
cluster starts and imports the images (this file sorts before test_real_pods_e2e.py, which needs the node too)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import cluster_reaping
from tests.cluster_reaping import leftovers_of
from voxscale.demo_real import CLUSTER
from voxscale.localcluster.cluster import ClusterState, LocalCluster, state_root
from voxscale.localcluster.harness import REPO

DEMO_TEST = "tests/test_demo.py::test_the_real_pods_demo_serves_every_accepted_request_and_leaves_nothing_behind"
FORCED_TIMEOUT_S = 75  # the cluster is up at ~15 s, the demo's load runs from ~40 s for ~90 s


@pytest.mark.cluster
@pytest.mark.timeout(900)
def test_a_timed_out_real_pods_test_leaves_nothing_behind_and_the_next_real_node_starts(
    operator_image: str, inference_image: str, reap_clusters: Callable[[str], None]
) -> None:
    reap_clusters(CLUSTER)  # should the inner run's cleanup fail, this test still leaves nothing
    inner = subprocess.Popen(
        [sys.executable, "-m", "pytest", DEMO_TEST, "-p", "no:cacheprovider", "-q"],
        env={**os.environ, "VOXSCALE_REAL_PODS_DEMO_TIMEOUT_S": str(FORCED_TIMEOUT_S)},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen_running = False
    deadline = time.monotonic() + 500
    while inner.poll() is None and time.monotonic() < deadline:
        seen_running = seen_running or LocalCluster(CLUSTER).is_up()
        time.sleep(1)
    out, _ = inner.communicate(timeout=60)
    assert seen_running, f"the demo's cluster never came up, so nothing was killed midway:\n{out[-3000:]}"
    assert inner.returncode == 1, out[-3000:]
    assert "Timeout" in out, out[-3000:]
    assert "session-end check" not in out, out[-3000:]
    assert leftovers_of(CLUSTER) == []

    # The machine's one real node is free again: a new real-node cluster starts, takes the images
    # (the kill may have landed mid-import: containerd's store must not be left unusable; the copy
    # is kept for the real-node tests after this one), and stops cleanly.
    after = LocalCluster("after-kill")
    reap_clusters(after.name)
    after.up(gpu_nodes=1, real_node=True, timeout=300)
    after.load_images([operator_image, inference_image])
    after.down(quiet=True)
    assert leftovers_of(after.name) == []
    assert not (state_root() / CLUSTER).exists()


def test_the_session_end_check_claims_only_this_sessions_clusters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two pytest sessions on one machine: each fails only on the clusters it started (its owner tag
    in state.json) or registered, never on - or tearing down - its neighbour's."""
    monkeypatch.setenv("VOXSCALE_STATE_DIR", str(tmp_path))
    for name, owner in (("mine", cluster_reaping.SESSION_OWNER), ("neighbours", "pytest-1")):
        ClusterState(name, str(tmp_path / name), 0, 0, 0, 0, 0, owner=owner).dir.mkdir()
        ClusterState(name, str(tmp_path / name), 0, 0, 0, 0, 0, owner=owner).save()
    left = cluster_reaping.unexpected_leftovers()
    assert set(left) == {"mine"} and left["mine"][0].startswith("state folder")

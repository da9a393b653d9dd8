"""Session fixtures: one real control plane (etcd, kube-apiserver, controller-manager, scheduler,
kwok) and one real Prometheus for the whole run, started by the project's own tooling."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator

import pytest

from tests import cluster_reaping
from voxscale.localcluster.cluster import ClusterState, LocalCluster, running_cluster
from voxscale.localcluster.harness import REPO, OperatorProcess, install_operator_rbac
from voxscale.localcluster.pod_exporter import PodMetricsExporter

TEST_CLUSTER = os.environ.get("VOXSCALE_TEST_CLUSTER", "pytest")


def build_image(target: str) -> str:
    """Build one image with `make images`' own script, tagged :test. `make test` has built both before
    pytest started, so this returns at once (the script skips an image whose inputs are unchanged);
    it builds only when pytest is run by hand after a change."""
    env = {"VOXSCALE_IMAGE_TAG": "test", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    script = str(REPO / "hack" / "build-images.sh")
    res = subprocess.run([script, target], capture_output=True, text=True, env=env, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    return f"localhost/voxscale/{target}:test"


@pytest.fixture(scope="session")
def operator_image() -> str:
    return build_image("operator")


@pytest.fixture(scope="session")
def inference_image() -> str:
    return build_image("inference")


@pytest.fixture(scope="session")
def piper_image() -> str:
    """Piper's own HTTP server (Dockerfile.piper): a TTS server nobody here wrote."""
    return build_image("piper")


@pytest.fixture(scope="session")
def triton_image() -> str:
    """NVIDIA Triton from the nvidia-pytriton wheel serving Piper on the CPU (Dockerfile.triton): a
    server nobody here wrote that publishes its own metrics (the triton metric profile)."""
    return build_image("triton")


@pytest.fixture
def reap_clusters() -> Iterator[Callable[[str], None]]:
    """Register the names of clusters a test (or its subprocess) starts: each is torn down with
    `cluster down` when the test ends, however it ends (failure, pytest-timeout, Ctrl-C)."""
    names: list[str] = []

    def register(name: str) -> None:
        names.append(name)
        cluster_reaping.register(name)

    yield register
    for name in names:
        cluster_reaping.tear_down(name)


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    """The local control plane + Prometheus; reused if already up (e.g. `voxscale cluster up --name pytest`)."""
    with running_cluster(TEST_CLUSTER):
        yield LocalCluster(TEST_CLUSTER)


@pytest.fixture(scope="session")
def cluster_state(cluster: LocalCluster) -> ClusterState:
    st = cluster.state
    assert st is not None
    return st


@pytest.fixture(scope="session")
def prometheus_url(cluster_state: ClusterState) -> str:
    return cluster_state.prometheus_url


@pytest.fixture(scope="module")
def operator(
    cluster: LocalCluster, cluster_state: ClusterState, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """A cluster-wide operator as `helm install` runs it (release `voxscale`, the chart's RBAC), per module."""
    kubeconfig = install_operator_rbac(cluster, "voxscale")
    op = OperatorProcess(kubeconfig, cluster_state.prometheus_url, lease_name="voxscale")
    op.start(tmp_path_factory.mktemp("operator"))
    op.wait_leader()
    yield op
    op.stop()


@pytest.fixture(scope="session")
def exporter(cluster: LocalCluster, cluster_state: ClusterState) -> Iterator[PodMetricsExporter]:
    """Per-pod GPU, queue and demand series for kwok's pods, scraped by the real Prometheus."""
    exp = PodMetricsExporter(cluster, cluster_state).start()
    yield exp
    exp.stop()


@pytest.fixture
def namespace(cluster: LocalCluster) -> Iterator[str]:
    """A fresh namespace per test, deleted (with everything in it) afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Anything that asks for the cluster is a cluster test, so `-m "not cluster"` runs the pure tests only.
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if {"cluster", "cluster_state", "prometheus_url", "operator", "namespace", "exporter"} & set(fixtures):
            item.add_marker(pytest.mark.cluster)


def pytest_sessionstart(session: pytest.Session) -> None:
    cluster_reaping.claim_clusters_for_this_session()


@pytest.hookimpl(trylast=True)  # after pytest's own teardown of the session fixtures (the `pytest` cluster)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a cluster (or a real node's trace) that the run started is still there: it
    would poison the next run. It is cleaned up on the way, so the next run starts clean."""
    left = cluster_reaping.unexpected_leftovers()
    if not left:
        return
    report = "; ".join(f"{name}: {', '.join(items[:5])}" for name, items in left.items())
    print(f"\nFAILED session-end check: the run left these behind (now torn down): {report}")
    for name in left:
        cluster_reaping.tear_down(name)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

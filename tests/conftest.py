"""Session fixtures: one real control plane (etcd, kube-apiserver, controller-manager, scheduler,
kwok) and one real Prometheus for the whole run, started by the project's own tooling."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from voxscale.localcluster.cluster import ClusterState, LocalCluster, running_cluster

TEST_CLUSTER = os.environ.get("VOXSCALE_TEST_CLUSTER", "pytest")


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Anything that asks for the cluster is a cluster test, so `-m "not cluster"` runs the pure tests only.
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if {"cluster", "cluster_state", "prometheus_url"} & set(fixtures):
            item.add_marker(pytest.mark.cluster)

"""The operator's watch-fed caches (operator/informers.py) on the real API server (issue 24 item 4):
an informer follows creates, changes and deletes; a broken watch lists again and converges; the
scaling round's reads come from the caches with no LIST per round; a derived view recomputes only
what changed (pure, on plain objects)."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from voxscale.localcluster.cluster import ClusterState, LocalCluster
from voxscale.localcluster.harness import wait_for
from voxscale.metrics_contract import POD_LABEL_TTSDEPLOYMENT
from voxscale.operator import children
from voxscale.operator.informers import Index, Informer, wait_synced
from voxscale.operator.kube import API_REQUESTS, Kube

MANAGED = {"app.kubernetes.io/managed-by": children.MANAGED_BY}


@pytest.fixture
def api(cluster_state: ClusterState) -> k8s.ApiClient:
    return k8s_config.new_client_from_config(config_file=str(cluster_state.kubeconfig))


def deployment(name: str, owner: str | None = None) -> dict[str, Any]:
    pod_labels = {"app": name, **({POD_LABEL_TTSDEPLOYMENT: owner} if owner else {})}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": MANAGED},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "containers": [{"name": "c", "image": "example.invalid/none:1"}],
                },
            },
        },
    }


@pytest.fixture
def informer(api: k8s.ApiClient, namespace: str) -> Iterator[Informer]:
    inf = Informer(
        "Deployments",
        k8s.AppsV1Api(api).list_namespaced_deployment,
        namespace,
        label_selector="app.kubernetes.io/managed-by=voxscale",
    )
    inf.start()
    assert wait_synced([inf], 30)
    yield inf
    inf.stop()


def names(inf: Informer) -> set[str]:
    return {o.metadata.name for o in inf.values()}


def test_an_informer_follows_creates_changes_and_deletes(
    informer: Informer, api: k8s.ApiClient, namespace: str
) -> None:
    apps = k8s.AppsV1Api(api)
    assert names(informer) == set() and informer.lists == 1
    apps.create_namespaced_deployment(namespace, deployment("a"))
    apps.create_namespaced_deployment(namespace, {**deployment("unlabelled"), "metadata": {"name": "unlabelled"}})
    wait_for("the create in the cache", lambda: names(informer) == {"a"}, timeout=20)
    apps.patch_namespaced_deployment_scale("a", namespace, {"spec": {"replicas": 3}})
    wait_for("the change in the cache", lambda: informer.get((namespace, "a")).spec.replicas == 3, timeout=20)
    apps.delete_namespaced_deployment("a", namespace)
    wait_for("the delete in the cache", lambda: names(informer) == set(), timeout=20)
    assert informer.lists == 1  # one LIST, then only the watch


def test_a_broken_watch_lists_again_and_converges(informer: Informer, api: k8s.ApiClient, namespace: str) -> None:
    apps = k8s.AppsV1Api(api)
    assert informer._watch is not None
    informer._watch.stop()  # what a restarting API server or a 410 Gone does to the stream
    apps.create_namespaced_deployment(namespace, deployment("b"))
    wait_for("a second LIST", lambda: informer.lists >= 2, timeout=20)
    wait_for("the object created meanwhile", lambda: names(informer) == {"b"}, timeout=20)


def test_the_rounds_reads_come_from_the_caches_without_a_list_per_round(
    api: k8s.ApiClient, cluster: LocalCluster, namespace: str
) -> None:
    apps = k8s.AppsV1Api(api)
    apps.create_namespaced_deployment(namespace, deployment("tts", owner="tts"))
    cluster.kubectl("create", "service", "clusterip", "tts", "--tcp=80:80", "-n", namespace)
    cluster.kubectl("label", "service", "tts", "app.kubernetes.io/managed-by=voxscale", "-n", namespace)
    listing = Kube(api)  # no watches: every read is a LIST, as before issue 24
    wait_for(
        "the pod Ready on a kwok node", lambda: listing.pod_starts([namespace]).get((namespace, "tts")), timeout=60
    )
    wait_for(
        "the pod's start sample", lambda: listing.pod_starts([namespace])[(namespace, "tts")].ready_seconds, timeout=60
    )

    watching = Kube(api)
    informers = watching.start_watches([namespace])
    try:
        assert wait_synced(informers, 30)
        lists_before = watching.informer_lists()
        requests_before = sum(s.value for s in _samples("voxscale_operator_api_requests_total"))
        for _ in range(3):  # three rounds' reads
            deployments = watching.list_deployments([namespace])
            present = watching.list_children([namespace])
            starts = watching.pod_starts([namespace])
            foreign = watching.foreign_autoscalers([namespace])
        assert set(deployments) == set(listing.list_deployments([namespace])) == {(namespace, "tts")}
        assert present == listing.list_children([namespace]) == {(namespace, "tts"): {"Service"}}
        assert (
            starts[(namespace, "tts")].ready_seconds
            == listing.pod_starts([namespace])[(namespace, "tts")].ready_seconds
        )
        assert foreign == {}
        requests_after = sum(s.value for s in _samples("voxscale_operator_api_requests_total"))
        listing_requests = 1 + 3 + 1  # the comparisons above, through `listing` (children: 3 kinds)
        assert requests_after - requests_before == listing_requests  # the three rounds sent none
        assert watching.informer_lists() == lists_before
        # The caches keep what the round reads, not whole objects (hundreds of MiB at thousands).
        cached_pods = watching._informers["Pod"][0].values()
        assert cached_pods and all(p.spec is None and p.metadata.managed_fields is None for p in cached_pods)

        # An HPA on the Deployment shows up in the next round's read, from the watch.
        cluster.kubectl("autoscale", "deployment", "tts", "--max=3", "-n", namespace)
        wait_for("the HPA in the cache", lambda: watching.foreign_autoscalers([namespace]), timeout=20)
    finally:
        watching.stop_watches()


def _samples(name: str) -> list[Any]:
    return [s for metric in API_REQUESTS.collect() for s in metric.samples if s.name == name]


# ---------------------------------------------------------------------------------------- pure
class Stream:
    """The part of an Informer an Index uses: objects by key, and change notifications."""

    def __init__(self) -> None:
        self.objects: dict[Hashable, Any] = {}
        self.listeners: list[Callable[[Hashable], None]] = []

    def subscribe(self, listener: Callable[[Hashable], None]) -> None:
        self.listeners.append(listener)

    def get(self, key: Hashable) -> Any:
        return self.objects.get(key)

    def put(self, key: Hashable, group: str | None, value: int) -> None:
        self.objects[key] = SimpleNamespace(group=group, value=value)
        for listener in self.listeners:
            listener(key)

    def delete(self, key: Hashable) -> None:
        self.objects.pop(key, None)
        for listener in self.listeners:
            listener(key)


def test_an_index_recomputes_only_the_groups_that_changed() -> None:
    stream = Stream()
    index: Index[int] = Index(lambda o: o.group, lambda members: sum(m.value for m in members))
    index.attach(stream)
    for i in range(100):
        stream.put(i, f"g{i % 10}", 1)
    assert index.views() == {f"g{g}": 10 for g in range(10)} and index.recomputed == 10
    stream.put(5, "g5", 3)  # a change in one group
    stream.put(15, "g6", 1)  # an object moving from g5 to g6
    stream.delete(25)  # a delete in g5
    views = index.views()
    assert index.recomputed == 12 and views["g5"] == 10 + 2 - 1 - 1 and views["g6"] == 11
    assert index.views() == views and index.recomputed == 12  # nothing changed: nothing recomputed
    for i in [i for i in range(100) if i % 10 == 7]:
        stream.delete(i)
    assert "g7" not in index.views()
    stream.put(200, None, 1)  # an object outside any group is not indexed
    assert len(index.views()) == 9


def test_wait_synced_times_out_on_an_informer_that_never_listed() -> None:
    never = Informer("nothing", lambda: None)
    started = time.monotonic()
    assert not wait_synced([never], 0.2)
    assert time.monotonic() - started < 2

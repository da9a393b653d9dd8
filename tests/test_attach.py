"""spec.targetRef: a TTSDeployment attached to a workload voxscale did not create (GitHub issue #23).

Pure parts first (no API server), then the operator against the real local API server under the
chart's RBAC: only the scale subresource is written, another autoscaler is refused (or shadowed in
advisory mode), and deleting the TTSDeployment leaves the workload as it is."""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import time
from collections.abc import Sequence
from typing import Any, cast

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from voxscale.localcluster.cluster import ClusterState, LocalCluster
from voxscale.localcluster.harness import OperatorProcess, get_json, wait_for
from voxscale.operator import children, crd, queries
from voxscale.operator import status as st
from voxscale.operator.engine import Decision, History, Metrics, Observed, decide
from voxscale.operator.forecast import RateHistory
from voxscale.operator.kube import Kube, Workload, selector_string
from voxscale.operator.policy import ScalingMode, ScalingPolicy
from voxscale.operator.prometheus import Endpoint, PrometheusSource, QueryError, Target
from voxscale.operator.scaler import Scaler

NOW = dt.datetime(2026, 3, 2, 9, 0, tzinfo=dt.UTC)
REF = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "their-tts"}


def attached(name: str, ref: dict[str, Any] | None = None, created: str = "", **spec: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ns", "generation": 1}
    if created:
        meta["creationTimestamp"] = created
    return {
        "apiVersion": "voxscale.io/v1alpha1",
        "kind": "TTSDeployment",
        "metadata": meta,
        "spec": {"targetRef": dict(ref or REF), **spec},
    }


# ------------------------------------------------------------------------------------------ pure parts
def test_a_target_ref_names_its_workload_and_asks_for_no_children() -> None:
    ref = children.target_ref(attached("a"))
    assert ref is not None
    assert (ref.group, ref.version, ref.kind, ref.name) == ("apps", "v1", "Deployment", "their-tts")
    assert ref.key == ("ns", "apps", "Deployment", "their-tts")
    assert ref.describe() == "Deployment ns/their-tts"
    assert ref.replica_set_pods and not ref.ordinal_pods
    sts = children.target_ref(attached("b", {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "s"}))
    assert sts is not None and sts.ordinal_pods and not sts.replica_set_pods
    assert children.expected_kinds(attached("a")) == set()
    own = {"metadata": {"name": "o", "namespace": "ns"}, "spec": {"model": {"image": "x:1"}}}
    assert children.target_ref(own) is None and "Deployment" in children.expected_kinds(own)
    # Nothing to apply: apply_children returns before any API call (no server behind this client).
    assert Kube(k8s.ApiClient()).apply_children(attached("a")) == []


def test_the_oldest_writer_keeps_a_shared_workload_and_advisory_ones_do_not_count() -> None:
    first = attached("first", created="2026-03-01T00:00:00Z")
    second = attached("second", created="2026-03-01T00:00:05Z")
    other = attached("other", {"apiVersion": "apps/v1", "kind": "Deployment", "name": "elsewhere"})
    keys = {("ns", "first"): True, ("ns", "second"): True, ("ns", "other"): True}
    rivals = children.attached_writers([second, first, other], keys)
    assert rivals == {("ns", "second"): "TTSDeployment ns/first (attached first)"}
    # An advisory one writes nothing: the next writer keeps the workload, the advisory one shadows it.
    rivals = children.attached_writers([second, first], {("ns", "first"): False, ("ns", "second"): True})
    assert rivals == {("ns", "first"): "TTSDeployment ns/second (attached first)"}
    assert children.attached_writers([first, second], {}) == {}


def test_a_workload_a_ttsdeployment_created_is_recognised() -> None:
    owners = [("voxscale.io/v1alpha1", "TTSDeployment", "mine")]
    assert children.created_by_voxscale({}, owners) == "mine"
    labels = {"app.kubernetes.io/managed-by": "voxscale", "voxscale.io/ttsdeployment": "mine"}
    assert children.created_by_voxscale(labels, []) == "mine"
    assert children.created_by_voxscale({"app": "theirs"}, [("apps/v1", "ReplicaSet", "x")]) is None


def test_a_label_selector_becomes_the_string_a_pod_list_takes() -> None:
    sel = k8s.V1LabelSelector(
        match_labels={"app": "tts", "tier": "gpu"},
        match_expressions=[
            k8s.V1LabelSelectorRequirement(key="track", operator="In", values=["stable", "canary"]),
            k8s.V1LabelSelectorRequirement(key="legacy", operator="DoesNotExist"),
            k8s.V1LabelSelectorRequirement(key="zone", operator="NotIn", values=["b"]),
            k8s.V1LabelSelectorRequirement(key="gpu", operator="Exists"),
        ],
    )
    assert selector_string(sel) == "app=tts,tier=gpu,track in (canary,stable),!legacy,zone notin (b),gpu"
    assert selector_string(None) == ""


def _pods_regex(promql: str) -> str:
    """The regex a substituted $pods became, unescaped from its PromQL string."""
    found = re.search(r'pod=~"([^"]*)"', promql)
    assert found is not None
    return found.group(1).replace("\\\\", "\\")


def test_pods_of_an_attached_workload_are_matched_by_its_name() -> None:
    own = queries.custom('x{pod=~"$pods"}', "ns", "tts")
    theirs = queries.custom('x{pod=~"$pods", t="$name"}', "ns", "tts", "their-tts")
    ordinal = queries.custom('x{pod=~"$pods"}', "ns", "tts", "db", ordinal_pods=True)
    pods = re.compile(_pods_regex(theirs))
    assert pods.fullmatch("their-tts-7d9f8c6b5b-x2k4z") and not pods.fullmatch("tts-7d9f8c6b5b-x2k4z")
    assert 't="tts"' in theirs and "tts-" in own and "their" not in own
    assert re.compile(_pods_regex(ordinal)).fullmatch("db-12")
    # The batched queries recover the owner from a Deployment pod's name: the attached workload's.
    m = re.compile(queries._POD_NAME).fullmatch("their-tts-7d9f8c6b5b-x2k4z")
    assert m is not None and m.group(1) == "their-tts"


class CannedPrometheus(PrometheusSource):
    """Every query answers the same batched series: one per pod owner."""

    def __init__(self, by_owner: dict[str, float]) -> None:
        super().__init__()
        self.by_owner = by_owner

    def _query(self, ep: Endpoint, promql: str) -> list[dict[str, Any]]:
        return [
            {"metric": {"namespace": "ns", "ttsdeployment": owner}, "value": [time.time(), str(v)]}
            for owner, v in self.by_owner.items()
        ]

    def _query_all(self, ep: Endpoint, queries: Sequence[str]) -> dict[str, list[dict[str, Any]] | QueryError]:
        """Each query answered alone (the joined request is tested on the real Prometheus, test_queries)."""
        return {q: self._one(ep, q) for q in queries}


def test_an_attached_object_reads_its_workloads_series_not_its_namesakes() -> None:
    pol = ScalingPolicy.from_spec(
        {"model": {"image": "x:1"}, "scaling": {"triggers": [{"name": "q", "type": "queueLength", "target": 4}]}}
    )
    source = CannedPrometheus({"tts": 1.0, "their-tts": 7.0})
    ep = Endpoint("http://prometheus:9090")
    own, theirs = Target("ns", "tts", pol, ep), Target("ns", "tts-attached", pol, ep, workload="their-tts")
    got = source.fetch([own, theirs])
    assert got[("ns", "tts")].values["q"] == 1.0
    assert got[("ns", "tts-attached")].values["q"] == 7.0
    # A namesake Deployment's pods are not the attached object's: its history is its workload's or none.
    named = Target("ns", "tts", pol, ep, workload="gone")
    source.fetch([named])
    namesake = {("ns", "tts"): cast(RateHistory, "a namesake Deployment's history")}
    assert source._by_object(namesake, ["ns"]) == {}
    source.forget(("ns", "tts"))
    assert source._by_object(namesake, ["ns"]) == namesake


def test_an_attached_spec_parses_without_a_model() -> None:
    spec = attached("a", replicas={"min": 2, "max": 5}, scaling={"mode": "advisory"})["spec"]
    policy = ScalingPolicy.from_spec(spec)
    assert (policy.min_replicas, policy.max_replicas, policy.mode) == (2, 5, ScalingMode.ADVISORY)
    assert "model" not in spec  # the stored spec is left as it is


def test_the_slo_models_slots_per_replica_follow_what_serves_the_requests() -> None:
    """The M/M/c model's slots: the batch for voxscale's GPU server, 1 on its CPU, the door's concurrency
    behind the door sidecar, 1 for an attached workload, and spec.scaling.slo.concurrency over all."""
    from voxscale.operator.policy import replica_slots
    from voxscale.proxy.settings import CONCURRENCY

    def slots(spec: dict[str, Any]) -> int:
        return replica_slots(crd.default_spec(spec))

    own = {"model": {"image": "x", "maxBatchSize": 6}, "replicas": {"min": 1, "max": 4}}
    assert slots(own) == 6
    assert slots({**own, "resources": {"gpus": 0}}) == 1
    door = {"enabled": True, "image": "d", "serverPort": 5000}
    assert slots({**own, "proxy": door}) == CONCURRENCY.default
    assert slots({**own, "proxy": {**door, "concurrency": 2}}) == 2
    assert slots(attached("a")["spec"]) == 1
    assert slots({**attached("a")["spec"], "scaling": {"slo": {"concurrency": 3}}}) == 3
    model = ScalingPolicy.from_spec({**attached("a")["spec"], "scaling": {"slo": {"concurrency": 3}}}).slo
    assert model is not None and model.slots == 3  # the default slo trigger inherits it


def test_status_says_missing_refused_and_shadowed_for_an_attached_workload() -> None:
    target = "Deployment ns/their-tts"
    missing = st.build({}, st.Observation(1, 0, 0, 1, deployment_found=False, target=target), None, History(), NOW)
    ready = next(c for c in missing["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "TargetMissing")
    assert target in ready["message"] and "creates nothing" in ready["message"]
    unreadable = st.ready_condition(0, 0, 1, False, target, "HTTP 403: Forbidden")
    assert unreadable.reason == "TargetUnavailable" and "403" in unreadable.message
    hpa = "HorizontalPodAutoscaler ns/their-hpa"
    decision = _evaluated(current=1, desired=2)
    refused = st.scaling_conditions(decision, None, False, conflict=hpa, target=target)[0]
    assert (refused.type, refused.status, refused.reason) == ("ScalingActive", "False", "ConflictingAutoscaler")
    assert hpa in refused.message and target in refused.message and "mode: advisory" in refused.message
    shadow = st.scaling_conditions(decision, None, False, target=target, shadowing=hpa)[0]
    assert (shadow.status, shadow.reason) == ("True", "ShadowingAutoscaler")
    assert hpa in shadow.message and "writes nothing" in shadow.message and "advises 2" in shadow.message
    seen = st.Observation(1, 1, 1, 2, True, advisory=True, target=target, shadowing=hpa)
    doc = st.build({}, seen, decision, History(), NOW)
    assert (doc["desiredReplicas"], doc["advisedReplicas"], doc["replicas"]) == (1, 2, 1)
    assert "lastScaleTime" not in doc


def _evaluated(current: int, desired: int) -> Decision:
    """A real decision from the engine: a policy with min `desired` on a workload at `current`."""
    pol = ScalingPolicy.from_spec(attached("a", replicas={"min": desired, "max": 4})["spec"])
    d = decide(pol, Observed(current, current), Metrics(), NOW, History())
    assert (d.current, d.desired) == (current, desired)
    return d


class FakeKube:
    """The Kube calls a round makes, answered from memory (no API server): one attached Deployment."""

    def __init__(self, hpa: str | None = None, created_by: str | None = None) -> None:
        self.workload = Workload(replicas=1, ready=1, selector="app=their-tts", created_by=created_by)
        self.hpa = hpa
        self.scaled: list[tuple[str, int]] = []
        self.applied: list[str] = []
        self.status: dict[str, Any] = {}
        self.events: list[tuple[str, str]] = []

    def list_deployments(self, namespaces: Any) -> dict[Any, Any]:
        return {}

    def pod_starts(self, namespaces: Any) -> dict[Any, Any]:
        return {}

    def list_children(self, namespaces: Any) -> dict[Any, Any]:
        return {}

    def foreign_autoscalers(self, namespaces: Any) -> dict[Any, str]:
        return {("ns", "apps", "Deployment", "their-tts"): self.hpa} if self.hpa else {}

    def read_target(self, ref: children.TargetRef) -> Workload | None:
        return self.workload if ref.name == "their-tts" else None

    def pods_of(self, ns: str, selector: str) -> list[Any]:
        return []

    def scale(self, ns: str, name: str, replicas: int) -> None:
        self.scaled.append((f"own {name}", replicas))

    def scale_target(self, ref: children.TargetRef, replicas: int) -> None:
        self.scaled.append((ref.describe(), replicas))

    def apply_children(self, body: dict[str, Any]) -> list[str]:
        self.applied.append(body["metadata"]["name"])
        return []

    def event(self, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
        self.events.append((reason, message))

    def replace_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self.status = status

    def set_deletion_costs(self, ns: str, costs: dict[str, int]) -> None:
        pass

    def secret_data(self, ns: str, name: str) -> dict[str, str]:
        raise AssertionError("no Secret is read here")


def _round(kube: FakeKube, body: dict[str, Any]) -> dict[str, Any]:
    scaler = Scaler(cast(Kube, kube))
    scaler.upsert(body)
    assert scaler.tick() == 1
    return kube.status


def test_a_round_scales_an_attached_workload_through_its_scale_only() -> None:
    kube = FakeKube()
    status = _round(kube, attached("a", replicas={"min": 2, "max": 4}))
    assert kube.scaled == [("Deployment ns/their-tts", 2)] and kube.applied == []
    assert status["desiredReplicas"] == 2 and "advisedReplicas" not in status


@pytest.mark.parametrize(
    ("hpa", "created_by", "who"),
    [
        ("HorizontalPodAutoscaler ns/h (created by ScaledObject ns/s)", None, "ScaledObject ns/s"),
        (None, "owner", "TTSDeployment ns/owner (which created it)"),
    ],
)
def test_a_round_refuses_a_workload_another_autoscaler_scales_and_advisory_shadows_it(
    hpa: str | None, created_by: str | None, who: str
) -> None:
    kube = FakeKube(hpa, created_by)
    status = _round(kube, attached("a", replicas={"min": 2, "max": 4}))
    active = next(c for c in status["conditions"] if c["type"] == "ScalingActive")
    assert (active["status"], active["reason"]) == ("False", "ConflictingAutoscaler") and who in active["message"]
    assert kube.scaled == [] and status["advisedReplicas"] == 2
    assert "ConflictingAutoscaler" in [r for r, _ in kube.events]
    kube = FakeKube(hpa, created_by)
    status = _round(kube, attached("a", replicas={"min": 2, "max": 4}, scaling={"mode": "advisory"}))
    active = next(c for c in status["conditions"] if c["type"] == "ScalingActive")
    assert (active["status"], active["reason"]) == ("True", "ShadowingAutoscaler") and who in active["message"]
    assert kube.scaled == [] and (status["advisedReplicas"], status["desiredReplicas"]) == (2, 1)


def test_a_round_says_a_missing_target_and_creates_nothing() -> None:
    kube = FakeKube()
    status = _round(kube, attached("a", {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gone"}))
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "TargetMissing" and kube.applied == [] and kube.scaled == []


# ------------------------------------------------------------------------------------------ the real API server
def apply(cluster: LocalCluster, ns: str, obj: dict[str, Any], check: bool = True) -> Any:
    return cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj), check=check)


def plain_deployment(name: str, replicas: int = 1) -> dict[str, Any]:
    """A workload as a team's own `kubectl apply` makes it: no voxscale label, owner or field manager."""
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "server", "image": "registry.example.com/their/tts:1"}]},
            },
        },
    }


def ttsd(name: str, target: str, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "voxscale.io/v1alpha1",
        "kind": "TTSDeployment",
        "metadata": {"name": name},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "replicas": {"min": 2, "max": 4},
            **spec,
        },
    }
    body["spec"].setdefault("scaling", {})["interval"] = "2s"
    return body


def hpa(name: str, target: str) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": 1,
            "maxReplicas": 3,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}},
                }
            ],
        },
    }


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def managed(cluster: LocalCluster, kind: str, name: str, ns: str) -> dict[str, Any]:
    """The object with its managedFields (kubectl leaves them out unless asked)."""
    return dict(get_json(cluster, kind, name, "-n", ns, "--show-managed-fields"))


def managers(obj: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Field manager -> its managedFields entries."""
    out: dict[str, list[dict[str, Any]]] = {}
    for entry in obj["metadata"].get("managedFields", []):
        out.setdefault(entry["manager"], []).append(entry)
    return out


def test_an_attached_deployment_is_scaled_through_scale_only_and_left_when_deleted(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, plain_deployment("their-tts"))
    before = get_json(cluster, "deployment", "their-tts", "-n", namespace)
    apply(cluster, namespace, ttsd("attach", "their-tts"))

    def scaled() -> Any:
        dep = managed(cluster, "deployment", "their-tts", namespace)
        return dep["spec"]["replicas"] == 2 and dep

    dep = wait_for("the floor written through /scale", scaled, timeout=60)
    ours = managers(dep)
    assert [e.get("subresource") for e in ours["voxscale-scaler"]] == ["scale"]
    assert ours["voxscale-scaler"][0]["fieldsV1"] == {"f:spec": {"f:replicas": {}}}
    assert "voxscale-operator" not in ours  # no server-side apply of anything
    assert dep["spec"]["template"] == before["spec"]["template"]
    assert dep["metadata"].get("labels") == before["metadata"].get("labels")
    assert not dep["metadata"].get("ownerReferences")
    for kind in ("deployment", "service", "pdb", "networkpolicy"):  # no children of its own
        assert cluster.kubectl("get", kind, "attach", "-n", namespace, check=False).returncode != 0, kind

    def status() -> dict[str, Any]:
        return dict(get_json(cluster, "ttsd", "attach", "-n", namespace).get("status", {}))

    wait_for("status counts the target's pods", lambda: status().get("readyReplicas") == 2, timeout=60)
    assert condition({"status": status()}, "Ready")["status"] == "True"
    assert status()["replicas"] == 2
    events = get_json(cluster, "events", "-n", namespace, "--field-selector", "involvedObject.name=attach")["items"]
    assert any(e["reason"] == "Attached" and "their-tts" in e["message"] for e in events)

    cluster.kubectl("delete", "ttsd", "attach", "-n", namespace)
    time.sleep(4)  # two intervals: a finalizer or a garbage collector would have acted by now
    left = get_json(cluster, "deployment", "their-tts", "-n", namespace)
    assert left["metadata"]["uid"] == before["metadata"]["uid"] and left["spec"]["replicas"] == 2
    assert left["metadata"].get("deletionTimestamp") is None


def test_a_target_another_autoscaler_scales_is_refused_and_advisory_mode_shadows_it(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, plain_deployment("hpa-tts"))
    apply(cluster, namespace, hpa("their-hpa", "hpa-tts"))
    apply(cluster, namespace, ttsd("rival", "hpa-tts"))

    def active() -> dict[str, Any]:
        return condition(get_json(cluster, "ttsd", "rival", "-n", namespace), "ScalingActive")

    refused = wait_for("refused", lambda: active().get("reason") == "ConflictingAutoscaler" and active())
    assert refused["status"] == "False"
    assert f"HorizontalPodAutoscaler {namespace}/their-hpa" in refused["message"]
    assert f"Deployment {namespace}/hpa-tts" in refused["message"] and "mode: advisory" in refused["message"]
    said = get_json(cluster, "events", "-n", namespace, "--field-selector", "reason=ConflictingAutoscaler")
    assert any("their-hpa" in e["message"] for e in said["items"])

    advisory = ttsd("rival", "hpa-tts", scaling={"mode": "advisory"})
    apply(cluster, namespace, advisory)
    shadow = wait_for("shadowing", lambda: active().get("reason") == "ShadowingAutoscaler" and active(), timeout=60)
    assert shadow["status"] == "True" and "their-hpa" in shadow["message"] and "writes nothing" in shadow["message"]
    obj = get_json(cluster, "ttsd", "rival", "-n", namespace)
    assert obj["status"]["advisedReplicas"] == 2 and obj["status"]["desiredReplicas"] == 1
    dep = managed(cluster, "deployment", "hpa-tts", namespace)
    assert dep["spec"]["replicas"] == 1 and "voxscale-scaler" not in managers(dep)


def test_a_second_ttsdeployment_on_the_same_target_is_refused_naming_the_first(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, plain_deployment("shared-tts"))
    apply(cluster, namespace, ttsd("first", "shared-tts"))
    wait_for(
        "first scales",
        lambda: get_json(cluster, "deployment", "shared-tts", "-n", namespace)["spec"]["replicas"] == 2,
    )
    time.sleep(1.1)  # a later creationTimestamp (one-second resolution)
    apply(cluster, namespace, ttsd("second", "shared-tts", replicas={"min": 3, "max": 4}))

    def active() -> dict[str, Any]:
        return condition(get_json(cluster, "ttsd", "second", "-n", namespace), "ScalingActive")

    refused = wait_for("second refused", lambda: active().get("reason") == "ConflictingAutoscaler" and active())
    assert f"TTSDeployment {namespace}/first" in refused["message"]
    assert get_json(cluster, "deployment", "shared-tts", "-n", namespace)["spec"]["replicas"] == 2


def test_a_missing_target_is_said_and_nothing_is_created(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, ttsd("orphan", "not-there"))

    def ready() -> dict[str, Any]:
        return condition(get_json(cluster, "ttsd", "orphan", "-n", namespace), "Ready")

    said = wait_for("TargetMissing", lambda: ready().get("reason") == "TargetMissing" and ready())
    assert f"Deployment {namespace}/not-there" in said["message"]
    assert cluster.kubectl("get", "deployment", "not-there", "-n", namespace, check=False).returncode != 0
    assert cluster.kubectl("get", "deployment", "orphan", "-n", namespace, check=False).returncode != 0


def test_switching_from_model_to_target_ref_says_what_was_left_behind(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, plain_deployment("their-tts"))
    owned = ttsd("switch", "their-tts")
    del owned["spec"]["targetRef"]
    owned["spec"]["model"] = {"image": "ghcr.io/voxscale/inference:0.1.0"}
    apply(cluster, namespace, owned)
    wait_for("its own Deployment", lambda: get_json(cluster, "deployment", "switch", "-n", namespace))
    # The user replaces spec.model with spec.targetRef (a merge patch: model removed, targetRef added).
    patch = {"spec": {"model": None, "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "their-tts"}}}
    cluster.kubectl("patch", "ttsd", "switch", "-n", namespace, "--type=merge", "-p", json.dumps(patch))

    def told() -> list[dict[str, Any]]:
        selector = "involvedObject.name=switch,reason=ChildrenLeftBehind"
        return list(get_json(cluster, "events", "-n", namespace, "--field-selector", selector)["items"])

    (event,) = wait_for("a ChildrenLeftBehind event", told, timeout=30)
    assert "Deployment" in event["message"] and "Service" in event["message"]
    # min 2: a PodDisruptionBudget was made too; one command removes them all.
    command = (
        f"kubectl delete deployment,poddisruptionbudget,service -l voxscale.io/ttsdeployment=switch -n {namespace}"
    )
    assert command in event["message"]


EXACTLY_ONE = "set exactly one of spec.model"


@pytest.mark.parametrize("which", ["both", "neither"])
def test_model_and_target_ref_together_or_neither_are_refused_at_admission(
    cluster: LocalCluster, operator: OperatorProcess, which: str
) -> None:
    obj = ttsd("bad", "their-tts")
    if which == "both":
        obj["spec"]["model"] = {"image": "x:1"}
    else:
        del obj["spec"]["targetRef"]
    result = cluster.kubectl(
        "apply", "--dry-run=server", "-n", "default", "-f", "-", input=json.dumps(obj), check=False
    )
    assert result.returncode != 0 and EXACTLY_ONE in result.stderr, result.stderr
    assert "spec.targetRef" in result.stderr
    ok = cluster.kubectl("apply", "--dry-run=server", "-n", "default", "-f", "-", input=json.dumps(ttsd("g", "t")))
    assert ok.returncode == 0
    explained = cluster.kubectl("explain", "ttsd.spec.targetRef").stdout
    assert "scale subresource" in explained and "exactly one" in explained


# ------------------------------------------------------------------------------------------ Kube, any /scale
@pytest.fixture
def admin_kube(cluster_state: ClusterState) -> Kube:
    return Kube(k8s_config.new_client_from_config(config_file=str(cluster_state.kubeconfig)))


def test_a_statefulset_is_read_and_scaled_through_its_scale_subresource(
    cluster: LocalCluster, admin_kube: Kube, namespace: str
) -> None:
    sts = plain_deployment("their-sts")
    sts["kind"] = "StatefulSet"
    sts["spec"]["serviceName"] = "their-sts"
    apply(cluster, namespace, sts)
    ref = children.TargetRef(namespace, "apps/v1", "StatefulSet", "their-sts")
    work = admin_kube.read_target(ref)
    assert work is not None and (work.replicas, work.selector, work.created_by) == (1, "app=their-sts", None)
    admin_kube.scale_target(ref, 2)
    got = managed(cluster, "statefulset", "their-sts", namespace)
    assert got["spec"]["replicas"] == 2
    assert [e.get("subresource") for e in managers(got)["voxscale-scaler"]] == ["scale"]
    # The generic path (any kind with /scale), found by discovery, reads the same scale.
    scale = admin_kube._call(admin_kube._scale_path(ref), "GET")
    assert scale["spec"]["replicas"] == 2 and scale["status"]["selector"] == "app=their-sts"
    assert admin_kube.read_target(children.TargetRef(namespace, "apps/v1", "StatefulSet", "absent")) is None


WIDGETS = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.attach.test.voxscale.io"},
    "spec": {
        "group": "attach.test.voxscale.io",
        "names": {"kind": "Widget", "plural": "widgets", "singular": "widget"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
                "subresources": {
                    "status": {},
                    "scale": {
                        "specReplicasPath": ".spec.replicas",
                        "statusReplicasPath": ".status.replicas",
                        "labelSelectorPath": ".status.selector",
                    },
                },
            }
        ],
    },
}


def test_any_kind_with_a_scale_subresource_is_read_and_scaled_generically(
    cluster: LocalCluster, admin_kube: Kube, namespace: str
) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(WIDGETS))
    try:
        cluster.kubectl("wait", "--for=condition=Established", "crd/widgets.attach.test.voxscale.io", "--timeout=60s")
        widget = {"apiVersion": "attach.test.voxscale.io/v1", "kind": "Widget", "metadata": {"name": "w"}}
        widget["spec"] = {"replicas": 1}
        wait_for("widget", lambda: apply(cluster, namespace, copy.deepcopy(widget)))
        status = {"status": {"replicas": 1, "selector": "app=w"}}
        cluster.kubectl(
            "patch", "widget", "w", "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(status)
        )
        ref = children.TargetRef(namespace, "attach.test.voxscale.io/v1", "Widget", "w")
        work = admin_kube.read_target(ref)
        assert work is not None and (work.replicas, work.ready, work.selector) == (1, 0, "app=w")
        admin_kube.scale_target(ref, 3)
        got = managed(cluster, "widget", "w", namespace)
        assert got["spec"]["replicas"] == 3
        assert [e.get("subresource") for e in managers(got)["voxscale-scaler"]] == ["scale"]
    finally:
        cluster.kubectl("delete", "crd", "widgets.attach.test.voxscale.io", "--wait=false", check=False)

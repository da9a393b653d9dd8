"""Image pre-pull (spec.prePull, issue 23 item 4): the DaemonSet builder (pure), its condition, the round
that keeps or deletes it, the CRD field and the chart's RBAC; and the registry pieces the real-node test
and bench use (chain IDs, containerd's hosts.toml). tests/test_prepull_e2e.py runs it on the real node."""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.test_chart import render
from voxscale.localcluster import realnode
from voxscale.localcluster.cluster import ClusterState
from voxscale.localcluster.registry import chain_ids, config
from voxscale.metrics_contract import POD_LABEL_TTSDEPLOYMENT
from voxscale.operator import children, crd, prepull, status
from voxscale.operator.kube import Kube

PLACEMENT = {
    "nodeSelector": {"nvidia.com/gpu.product": "H100"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
}


def ttsd(**spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": "voxscale.io/v1alpha1",
        "kind": "TTSDeployment",
        "metadata": {"name": "tts", "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": {"model": {"image": "reg/tts:1"}, "prePull": {"enabled": True}, **PLACEMENT},
    }
    body["spec"].update(spec)
    return body


def owned_daemonset(body: dict[str, Any], hold: str = "pause:x") -> dict[str, Any]:
    return children.prepull_daemonset(body, children.deployment(body)["spec"]["template"]["spec"], hold)


# ------------------------------------------------------------------ the DaemonSet builder
def test_the_daemonset_pulls_the_server_image_where_its_pods_can_land_and_holds_with_the_sandbox_image() -> None:
    ds = owned_daemonset(ttsd())
    assert ds["kind"] == "DaemonSet" and ds["metadata"]["name"] == "tts-prepull"
    assert ds["metadata"]["ownerReferences"][0]["uid"] == "u-1"  # deleted with the TTSDeployment
    pod = ds["spec"]["template"]["spec"]
    assert [(c["image"], c["command"], c["imagePullPolicy"]) for c in pod["initContainers"]] == [
        ("reg/tts:1", ["true"], "IfNotPresent")
    ]
    assert [c["image"] for c in pod["containers"]] == ["pause:x"]
    for key, value in PLACEMENT.items():  # the nodes the scheduler could give a server pod
        assert pod[key] == value
    for c in [*pod["initContainers"], *pod["containers"]]:
        assert c["resources"] == children.PREPULL_RESOURCES  # tiny, and never a GPU
        assert "nvidia.com/gpu" not in str(c["resources"])
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["automountServiceAccountToken"] is False


def test_pre_pull_pods_never_look_like_server_pods() -> None:
    """Not selected by the Service, the pod-start samples or $pods: no inference selector label."""
    ds = owned_daemonset(ttsd())
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert POD_LABEL_TTSDEPLOYMENT not in labels and POD_LABEL_TTSDEPLOYMENT not in ds["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"] == {children.PREPULL_LABEL: "tts"}
    assert children.created_by_voxscale(ds["metadata"]["labels"], []) is None  # never taken for a workload


def test_behind_the_door_both_images_are_pulled_and_the_command_can_be_named() -> None:
    body = ttsd(
        proxy={"enabled": True, "image": "reg/operator:1", "serverPort": 5000},
        prePull={"enabled": True, "command": ["/server", "--version"]},
    )
    pod = owned_daemonset(body)["spec"]["template"]["spec"]
    assert [c["image"] for c in pod["initContainers"]] == ["reg/tts:1", "reg/operator:1"]
    assert {tuple(c["command"]) for c in pod["initContainers"]} == {("/server", "--version")}


def test_an_attached_workloads_template_gives_the_images_pull_secrets_and_placement() -> None:
    template = {
        "imagePullSecrets": [{"name": "regcred"}],
        "nodeSelector": {"pool": "gpu"},
        "initContainers": [{"name": "fetch", "image": "reg/fetch:2"}],
        "containers": [{"name": "a", "image": "reg/their:3"}, {"name": "b", "image": "reg/their:3"}],
    }
    body = {
        "metadata": {"name": "theirs", "namespace": "ns", "uid": "u-2"},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "their-tts"},
            "prePull": {"enabled": True},
        },
    }
    pod = children.prepull_daemonset(body, template)["spec"]["template"]["spec"]
    assert [c["image"] for c in pod["initContainers"]] == ["reg/fetch:2", "reg/their:3"]  # each image once
    assert pod["imagePullSecrets"] == [{"name": "regcred"}] and pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["containers"][0]["image"] == children.PREPULL_HOLD_IMAGE


def test_pre_pull_is_off_unless_asked_for() -> None:
    assert not children.prepull_enabled({"spec": {"model": {"image": "x"}}})
    assert not children.prepull_enabled({"spec": {"model": {"image": "x"}, "prePull": {}}})
    assert children.prepull_enabled(ttsd())


# ------------------------------------------------------------------ the CRD field
def test_the_field_is_described_validated_and_refused_when_it_could_pull_nothing() -> None:
    spec = crd.schema()["properties"]["spec"]
    field = spec["properties"]["prePull"]
    assert "DaemonSet" in field["description"] and "ImagePrePulled" in field["description"]
    assert field["properties"]["enabled"]["default"] is False
    body = ttsd()
    assert crd.validate(body) == []
    typo = copy.deepcopy(body)
    typo["spec"]["prePull"]["enabeld"] = True
    assert crd.validate(typo) == ['spec.prePull.enabeld: unknown field "spec.prePull.enabeld"']
    wrong = copy.deepcopy(body)
    wrong["spec"]["prePull"]["enabled"] = "yes"
    assert any(e.startswith("spec.prePull.enabled:") for e in crd.validate(wrong))
    # The API server's rules (CEL): a Never pull policy has nothing to pre-pull; command needs enabled.
    messages = {r["message"] for r in spec["x-kubernetes-validations"]}
    assert any(m.startswith("spec.prePull.enabled: spec.model.imagePullPolicy Never") for m in messages)
    assert field["x-kubernetes-validations"][0]["message"].startswith("spec.prePull.command is only used")


def test_the_chart_lets_the_operator_keep_and_delete_the_daemonset() -> None:
    rules = render()
    role = next(d for d in rules if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("voxscale"))
    rule = next(r for r in role["rules"] if r["resources"] == ["daemonsets"])
    assert rule["apiGroups"] == ["apps"] and {"list", "create", "patch", "delete"} <= set(rule["verbs"])


# ------------------------------------------------------------------ the condition
def seen(
    desired: int, ready: int, updated: int | None = None, generation: int = 2, observed: int = 2
) -> prepull.Observed:
    return prepull.Observed(
        ("reg/tts:1",), generation, observed, desired, ready, desired if updated is None else updated, "h"
    )


def test_the_condition_counts_the_nodes_holding_the_images() -> None:
    done = prepull.condition("tts", seen(3, 3))
    assert (done.type, done.status, done.reason) == ("ImagePrePulled", "True", "Pulled")
    assert done.message.startswith("3/3 nodes hold reg/tts:1")
    assert prepull.condition("tts", seen(3, 1)).status == "False"
    assert prepull.condition("tts", seen(3, 3, updated=1)).reason == "Pulling"  # a new image on its way
    assert prepull.condition("tts", seen(0, 0)).reason == "NoNodes"
    assert prepull.condition("tts", seen(3, 3, observed=1)).status == "Unknown"
    assert prepull.condition("tts", None).reason == "Creating"
    assert prepull.condition("tts", None, "HTTP 403: Forbidden").reason == "PrePullFailed"


def test_status_carries_the_condition_only_when_pre_pull_is_on() -> None:
    import datetime as dt

    from voxscale.operator.engine import History

    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    base = status.Observation(generation=1, replicas=1, ready=1, min_replicas=1, deployment_found=True)
    without = status.build({}, base, None, History(), now)
    assert "ImagePrePulled" not in {c["type"] for c in without["conditions"]}
    on = dataclasses.replace(base, prepull=prepull.condition("tts", seen(1, 1)))
    types = {c["type"]: c["status"] for c in status.build({}, on, None, History(), now)["conditions"]}
    assert types["ImagePrePulled"] == "True"


# ------------------------------------------------------------------ the round (an in-memory apps API)
class Apps:
    """The apps/v1 calls PrePuller makes, answered from memory."""

    def __init__(self) -> None:
        self.stored: dict[tuple[str, str], dict[str, Any]] = {}
        self.calls: list[str] = []

    def list_daemon_set_for_all_namespaces(self, label_selector: str) -> Any:
        self.calls.append("list")
        return SimpleNamespace(items=list(self.stored.values()))

    def patch_namespaced_daemon_set(self, name: str, ns: str, body: dict[str, Any], **_: Any) -> Any:
        self.calls.append(f"apply {name}")
        stored = copy.deepcopy(body)
        stored["status"] = {"observedGeneration": 1, "desiredNumberScheduled": 2, "numberReady": 2,
                            "updatedNumberScheduled": 2}  # fmt: skip
        stored["metadata"]["generation"] = 1
        self.stored[(ns, name)] = stored
        return stored

    def delete_namespaced_daemon_set(self, name: str, ns: str) -> None:
        self.calls.append(f"delete {name}")
        if self.stored.pop((ns, name), None) is None:
            raise ApiException(status=404)


def puller() -> tuple[prepull.PrePuller, Apps]:
    apps = Apps()
    kube = SimpleNamespace(apps=apps, api=client.ApiClient())
    return prepull.PrePuller(cast(Kube, kube), None), apps


def test_the_round_applies_once_keeps_it_while_unchanged_and_deletes_it_when_turned_off() -> None:
    pp, apps = puller()
    body = ttsd()
    first = pp.round([body])
    assert first[("ns", "tts")].status == "True" and apps.calls == ["list", "apply tts-prepull"]
    apps.calls.clear()
    assert pp.round([body])[("ns", "tts")].reason == "Pulled" and apps.calls == ["list"]  # unchanged: no write
    new_image = ttsd(model={"image": "reg/tts:2"})
    pp.round([new_image])
    assert apps.calls[-1] == "apply tts-prepull"
    assert apps.stored[("ns", "tts-prepull")]["spec"]["template"]["spec"]["initContainers"][0]["image"] == "reg/tts:2"
    apps.calls.clear()
    off = ttsd(prePull={"enabled": False})
    assert pp.round([off]) == {} and apps.calls == ["list", "delete tts-prepull"]
    apps.calls.clear()
    pp.round([off])
    pp.round([off])
    assert apps.calls == ["list"]  # one more look finds nothing left; then no call at all


def test_a_fleet_without_pre_pull_costs_one_list_after_a_start_and_none_after() -> None:
    pp, apps = puller()
    plain = {"metadata": {"name": "a", "namespace": "ns", "uid": "u"}, "spec": {"model": {"image": "x"}}}
    for _ in range(3):
        assert pp.round([plain]) == {}
    assert apps.calls == ["list"]


# ------------------------------------------------------------------ the registry pieces
def test_chain_ids_follow_the_oci_definition() -> None:
    import hashlib

    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    assert chain_ids([a, b]) == [a, "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()]


def test_containerd_pulls_from_the_loopback_registry_over_plain_http() -> None:
    hosts = tomllib.loads(realnode.registry_hosts_toml("127.0.0.1:5000"))
    assert hosts["server"] == "http://127.0.0.1:5000"
    assert hosts["host"]["http://127.0.0.1:5000"]["capabilities"] == ["pull", "resolve"]
    reg = config(Path("/r"), 5000)
    assert reg["http"]["addr"] == "127.0.0.1:5000" and reg["storage"]["filesystem"]["rootdirectory"] == "/r/data"
    # The node's containerd reads those files from its registry config_path.
    st = SimpleNamespace(dir=Path("/state"))
    cri = tomllib.loads(realnode._containerd_config(cast(ClusterState, st)))["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["registry"]["config_path"] == str(realnode.hosts_dir(cast(ClusterState, st))) == "/state/node/certs.d"


def test_a_spec_that_cannot_be_rendered_is_said_in_its_condition_and_spares_the_others() -> None:
    pp, apps = puller()
    broken = ttsd(resources={"memory": "lots"})
    broken["metadata"]["name"] = "broken"
    conditions = pp.round([broken, ttsd()])
    assert conditions[("ns", "broken")].reason == "PrePullFailed"
    assert "resources" in conditions[("ns", "broken")].message
    assert conditions[("ns", "tts")].status == "True" and "apply tts-prepull" in apps.calls

"""The operator against the real control plane, running under the chart's RBAC (not cluster-admin)."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import OPERATOR_NAMESPACE, REPO, OperatorProcess, get_json, wait_for

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def minimal(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "voxscale.io/v1alpha1",
        "kind": "TTSDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"image": "ghcr.io/voxscale/inference:0.1.0"}, **spec},
    }


def apply(cluster: LocalCluster, ns: str, obj: dict[str, Any], check: bool = True) -> Any:
    return cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj), check=check)


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def test_examples_create_deployment_service_and_pdb(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "examples"))
    for path in EXAMPLES:
        name = yaml.safe_load(path.read_text())["metadata"]["name"]
        dep = wait_for(f"Deployment {name}", functools.partial(get_json, cluster, "deployment", name, "-n", namespace))
        ttsd = get_json(cluster, "ttsd", name, "-n", namespace)
        owner = dep["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
            "TTSDeployment",
            name,
            ttsd["metadata"]["uid"],
            True,
        )
        pod = dep["spec"]["template"]
        container = pod["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
        assert pod["spec"]["terminationGracePeriodSeconds"] >= 30
        assert pod["metadata"]["labels"]["voxscale.io/ttsdeployment"] == name
        # No claim named: each pod keeps registered voices in its own emptyDir, handed to the server.
        assert pod["spec"]["volumes"][0] == {"name": "voices", "emptyDir": {"sizeLimit": "1Gi"}}
        assert {"name": "VOXSCALE_VOICE_STORE", "value": "/var/lib/voxscale/voices"} in container["env"]
        assert container["volumeMounts"][0]["mountPath"] == "/var/lib/voxscale/voices"
        svc = get_json(cluster, "service", name, "-n", namespace)
        assert svc["spec"]["ports"][0]["port"] == 8000
        assert svc["spec"]["selector"] == {"voxscale.io/ttsdeployment": name}
        min_replicas = ttsd["spec"]["replicas"]["min"]
        if min_replicas >= 2:  # a PDB only where at least 2 replicas are promised
            pdb = get_json(cluster, "pdb", name, "-n", namespace)
            assert pdb["spec"]["maxUnavailable"] == 1
        else:
            assert cluster.kubectl("get", "pdb", name, "-n", namespace, check=False).returncode != 0

        def at_floor(n: str = name, m: int = min_replicas) -> bool:
            return bool(get_json(cluster, "deployment", n, "-n", namespace)["spec"]["replicas"] >= m)

        wait_for(f"{name} scaled to its floor", at_floor)
    table = cluster.kubectl("get", "ttsd", "-n", namespace).stdout
    assert table.split("\n")[0].split() == ["NAME", "MIN", "MAX", "DESIRED", "READY", "REASON", "AGE"]
    edu = get_json(cluster, "ttsd", "edu-tts", "-n", namespace)
    wait_for("status", lambda: get_json(cluster, "ttsd", "edu-tts", "-n", namespace).get("status", {}).get("reason"))
    edu = get_json(cluster, "ttsd", "edu-tts", "-n", namespace)
    # No exporter publishes these pods' metrics: missing data is said, never read as zero.
    assert condition(edu, "MetricsAvailable")["status"] == "False"
    assert "not read as zero" in condition(edu, "MetricsAvailable")["message"]


BAD_MANIFESTS: list[tuple[str, dict[str, Any], str]] = [
    ("min > max", {"replicas": {"min": 5, "max": 2}}, "spec.replicas.min must be <= spec.replicas.max"),
    ("min 0 without opt-in", {"replicas": {"min": 0, "max": 2}}, "allowScaleToZero"),
    (
        "min 0 with nothing that can wake it",
        {"replicas": {"min": 0, "max": 2, "allowScaleToZero": True}},
        "spec.replicas.min: 0 needs a signal that exists while no pod runs",
    ),
    ("negative max", {"replicas": {"min": 1, "max": -3}}, "spec.replicas.max"),
    ("absurd max", {"replicas": {"min": 1, "max": 100000}}, "spec.replicas.max"),
    ("absurd GPUs per pod", {"resources": {"gpus": 64}}, "spec.resources.gpus"),
    ("unknown field", {"replica": {"min": 1}}, 'unknown field "spec.replica"'),
    ("wrong precision enum", {"model": {"image": "x:1", "precision": "int4"}}, "spec.model.precision"),
    (
        "wrong trigger type",
        {"scaling": {"triggers": [{"name": "a", "type": "cpu", "target": 1}]}},
        "spec.scaling.triggers[0].type",
    ),
    ("malformed interval", {"scaling": {"interval": "10 seconds"}}, "spec.scaling.interval"),
    ("interval too short", {"scaling": {"interval": "500ms"}}, "spec.scaling.interval must be between 2s and 5m"),
    (
        "malformed sustainFor",
        {"scaling": {"triggers": [{"name": "g", "type": "gpuUtilization", "scaleUpAbove": 70, "sustainFor": "3 min"}]}},
        "spec.scaling.triggers[0].sustainFor",
    ),
    (
        "trigger with nothing to scale on",
        {"scaling": {"triggers": [{"name": "g", "type": "gpuUtilization"}]}},
        "a trigger needs target (proportional) or scaleUpAbove (threshold)",
    ),
    (
        "a gpuMetric nothing publishes yet",
        {
            "scaling": {
                "triggers": [
                    {"name": "g", "type": "gpuUtilization", "target": 60, "gpuMetric": "voxscale_gpu_utilization_ratio"}
                ]
            }
        },
        "spec.scaling.triggers[0].gpuMetric",
    ),
    (
        "promql without query",
        {"scaling": {"triggers": [{"name": "p", "type": "promql", "target": 1}]}},
        "a promql trigger needs query",
    ),
    (
        "down threshold above up threshold",
        {"scaling": {"triggers": [{"name": "g", "type": "gpuUtilization", "scaleUpAbove": 50, "scaleDownBelow": 60}]}},
        "scaleDownBelow must be lower than scaleUpAbove",
    ),
    (
        "schedule floor above max",
        {
            "replicas": {"min": 1, "max": 4},
            "scaling": {"schedules": [{"name": "s", "cron": "0 8 * * *", "duration": "1h", "minReplicas": 9}]},
        },
        "spec.scaling.schedules[].minReplicas must not exceed spec.replicas.max",
    ),
    (
        "prewarm longer than window",
        {
            "scaling": {
                "schedules": [{"name": "s", "cron": "0 8 * * *", "duration": "10m", "prewarm": "1h", "minReplicas": 1}]
            }
        },
        "prewarm must be shorter than duration",
    ),
    (
        "fixed fallback without count",
        {"scaling": {"fallback": {"mode": "fixed"}}},
        "spec.scaling.fallback.replicas is required when mode is fixed",
    ),
    ("bad fallback mode", {"scaling": {"fallback": {"mode": "zero"}}}, "spec.scaling.fallback.mode"),
    (
        "Prometheus URL without scheme",
        {"scaling": {"prometheus": {"url": "prometheus:9090"}}},
        "spec.scaling.prometheus.url",
    ),
    ("missing image", {"model": {"voice": "x"}}, "spec.model.image"),
    (
        "voice store claim that is not a name",
        {"model": {"image": "x:1", "voiceStore": {"claimName": "Shared_Voices"}}},
        "spec.model.voiceStore.claimName",
    ),
]


@pytest.mark.parametrize(("why", "spec", "message"), BAD_MANIFESTS, ids=[b[0] for b in BAD_MANIFESTS])
def test_bad_manifest_is_refused_at_admission_naming_the_field(
    cluster: LocalCluster, operator: OperatorProcess, why: str, spec: dict[str, Any], message: str
) -> None:
    obj = minimal("bad")
    obj["spec"].update(copy.deepcopy(spec))
    result = cluster.kubectl(
        "apply", "--dry-run=server", "-n", "default", "-f", "-", input=json.dumps(obj), check=False
    )
    assert result.returncode != 0, f"{why}: accepted"
    assert message in result.stderr, f"{why}: {result.stderr}"


def test_a_name_its_pods_would_truncate_is_refused_at_admission_with_the_limit(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    """47 characters: the pods' names (<name>-<hash>-<5>) would be cut at 63 and lose the owner."""
    from voxscale.operator.crd import MAX_NAME_LENGTH

    too_long = minimal("t" * (MAX_NAME_LENGTH + 1))
    result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(too_long), check=False)
    assert result.returncode != 0 and f"at most {MAX_NAME_LENGTH} characters" in result.stderr, result.stderr
    longest = minimal("t" * MAX_NAME_LENGTH)
    apply(cluster, namespace, longest)
    dep = wait_for(
        "the longest name's Deployment",
        functools.partial(get_json, cluster, "deployment", longest["metadata"]["name"], "-n", namespace),
    )
    assert dep["metadata"]["name"] == longest["metadata"]["name"]


def test_a_claimed_voice_store_is_shared_by_every_replica(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    obj = minimal("shared-voices")
    obj["spec"]["model"]["voiceStore"] = {"claimName": "tts-voices"}
    apply(cluster, namespace, obj)
    dep = wait_for(
        "Deployment shared-voices", functools.partial(get_json, cluster, "deployment", "shared-voices", "-n", namespace)
    )
    pod = dep["spec"]["template"]["spec"]
    assert pod["volumes"][0] == {"name": "voices", "persistentVolumeClaim": {"claimName": "tts-voices"}}
    assert pod["securityContext"]["fsGroup"] == 10001  # the image's user can write the claim


def test_unparseable_cron_surfaces_as_a_condition_not_a_crash(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    obj = minimal(
        "cronbad", scaling={"schedules": [{"name": "peak", "cron": "61 25 * * *", "duration": "1h", "minReplicas": 2}]}
    )
    apply(cluster, namespace, obj)

    def invalid() -> dict[str, Any]:
        return condition(get_json(cluster, "ttsd", "cronbad", "-n", namespace), "ScalingActive")

    cond = wait_for("ScalingActive=False", lambda: invalid().get("status") == "False" and invalid())
    assert cond["reason"] == "InvalidSpec"
    assert cond["message"].startswith("spec.scaling.schedules[0].cron: cannot parse cron expression '61 25 * * *'")
    events = get_json(cluster, "events", "-n", namespace, "--field-selector", "involvedObject.name=cronbad")
    assert any(e["reason"] == "InvalidSpec" and e["type"] == "Warning" for e in events["items"])
    assert operator.proc is not None and operator.proc.poll() is None
    # Fixing the expression recovers.
    obj["spec"]["scaling"]["schedules"][0]["cron"] = "0 8 * * *"
    apply(cluster, namespace, obj)
    wait_for("ScalingActive=True", lambda: invalid().get("status") == "True")


def test_image_update_rolls_the_deployment_and_keeps_its_replica_count(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    obj = minimal("roll", replicas={"min": 1, "max": 6}, scaling={"paused": True})
    apply(cluster, namespace, obj)
    wait_for("Deployment", lambda: get_json(cluster, "deployment", "roll", "-n", namespace))
    # Stand in for an engine decision: the scaler's field manager writes the scale subresource.
    cluster.kubectl("scale", "deployment/roll", "-n", namespace, "--replicas=4")
    wait_for(
        "4 ready",
        lambda: get_json(cluster, "deployment", "roll", "-n", namespace)["status"].get("readyReplicas") == 4,
        timeout=60,
    )
    old_rs = {rs["metadata"]["name"] for rs in get_json(cluster, "rs", "-n", namespace)["items"]}
    obj["spec"]["model"]["image"] = "ghcr.io/voxscale/inference:0.2.0"
    apply(cluster, namespace, obj)

    def rolled() -> bool:
        dep = get_json(cluster, "deployment", "roll", "-n", namespace)
        image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
        assert dep["spec"]["replicas"] == 4, "reconciling the spec must never reset the replica count"
        return (
            image.endswith(":0.2.0")
            and dep["status"].get("updatedReplicas") == 4
            and dep["status"].get("readyReplicas") == 4
        )

    wait_for("rollout to 0.2.0 with 4 replicas", rolled, timeout=120)
    new_rs = {rs["metadata"]["name"] for rs in get_json(cluster, "rs", "-n", namespace)["items"]} - old_rs
    assert new_rs, "a new ReplicaSet rolls the pods"
    events = get_json(cluster, "events", "-n", namespace, "--field-selector", "involvedObject.name=roll")["items"]
    assert {"Created", "Updated"} <= {e["reason"] for e in events}


def test_deleting_the_ttsdeployment_removes_its_children(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, minimal("gone", replicas={"min": 2, "max": 3}))
    wait_for("children", lambda: get_json(cluster, "pdb", "gone", "-n", namespace))
    cluster.kubectl("delete", "ttsd", "gone", "-n", namespace)

    def all_gone() -> bool:
        return all(
            cluster.kubectl("get", kind, "gone", "-n", namespace, check=False).returncode != 0
            for kind in ("deployment", "service", "pdb")
        )

    wait_for("garbage collection", all_gone, timeout=60)


@pytest.mark.parametrize("kind", ["deployment", "service", "poddisruptionbudget"])
def test_children_deleted_by_hand_are_recreated(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str, kind: str
) -> None:
    apply(cluster, namespace, minimal("heal", replicas={"min": 2, "max": 4}, scaling={"interval": "2s"}))
    first = wait_for(kind, lambda: get_json(cluster, kind, "heal", "-n", namespace))
    cluster.kubectl("delete", kind, "heal", "-n", namespace)

    def recreated() -> Any:
        obj = get_json(cluster, kind, "heal", "-n", namespace)
        return obj["metadata"]["uid"] != first["metadata"]["uid"] and obj

    again = wait_for(f"{kind} recreated", recreated, timeout=60)
    assert again["metadata"]["ownerReferences"][0]["name"] == "heal"


def test_network_policy_follows_the_spec_and_is_restored(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    """spec.networkPolicy.enabled: applied with the other children under the chart's RBAC, put back when
    deleted by hand, removed when turned off; the pods run read-only with a memory request and limit."""
    obj = minimal("fenced", networkPolicy={"enabled": True}, scaling={"interval": "2s"})
    apply(cluster, namespace, obj)
    first = wait_for("NetworkPolicy", lambda: get_json(cluster, "networkpolicy", "fenced", "-n", namespace))
    assert first["metadata"]["ownerReferences"][0]["name"] == "fenced"
    assert first["spec"]["ingress"] == [{"ports": [{"port": 8000, "protocol": "TCP"}]}]
    assert first["spec"]["policyTypes"] == ["Ingress", "Egress"] and not first["spec"].get("egress")
    pod = get_json(cluster, "deployment", "fenced", "-n", namespace)["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == "8Gi"  # the CRD's default
    cluster.kubectl("delete", "networkpolicy", "fenced", "-n", namespace)

    def recreated() -> Any:
        found = get_json(cluster, "networkpolicy", "fenced", "-n", namespace)
        return found["metadata"]["uid"] != first["metadata"]["uid"] and found

    wait_for("NetworkPolicy recreated", recreated, timeout=60)
    obj["spec"]["networkPolicy"]["enabled"] = False
    apply(cluster, namespace, obj)
    wait_for(
        "NetworkPolicy removed",
        lambda: cluster.kubectl("get", "networkpolicy", "fenced", "-n", namespace, check=False).returncode != 0,
        timeout=60,
    )
    explained = cluster.kubectl("explain", "ttsd.spec.networkPolicy.enabled").stdout
    assert "serving" in explained and "port" in explained
    assert "precedence" in cluster.kubectl("explain", "ttsd.spec.resources.memory").stdout


def test_operator_rbac_is_the_charts_not_cluster_admin(cluster: LocalCluster, operator: OperatorProcess) -> None:
    sa = f"system:serviceaccount:{OPERATOR_NAMESPACE}:voxscale"
    can = cluster.kubectl("auth", "can-i", "--as", sa, "patch", "deployments/scale", "-n", "default", check=False)
    assert can.stdout.strip() == "yes"
    for verb, resource in (("delete", "deployments"), ("create", "pods"), ("list", "secrets"), ("*", "*")):
        res = cluster.kubectl("auth", "can-i", "--as", sa, verb, resource, "-n", "default", check=False)
        assert res.stdout.strip() == "no", f"operator may {verb} {resource}"
    assert str(operator.kubeconfig).endswith("operator-voxscale.kubeconfig")
    assert "token" in Path(operator.kubeconfig).read_text()


def test_kubectl_explain_teaches_the_scaling_spec(cluster: LocalCluster, operator: OperatorProcess) -> None:
    out = wait_for("explain", lambda: cluster.kubectl("explain", "ttsd.spec.scaling.triggers").stdout)
    assert "Reactive rules" in out and "scaleUpAbove" in out and "sustainFor" in out
    deep = cluster.kubectl("explain", "ttsd.spec.scaling.schedules.prewarm").stdout
    assert "Lead time" in deep


def events(cluster: LocalCluster, namespace: str, reason: str) -> list[str]:
    listed = get_json(cluster, "events", "-n", namespace, "--field-selector", f"reason={reason}")["items"]
    return [e["message"] for e in listed]


def test_a_competing_hpa_is_detected_and_not_fought(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, minimal("rival", scaling={"interval": "2s"}))
    wait_for("Deployment", lambda: get_json(cluster, "deployment", "rival", "-n", namespace))
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "rival-hpa"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "rival"},
            "minReplicas": 1,
            "maxReplicas": 3,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization"}}}],
        },
    }
    hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] = 50
    apply(cluster, namespace, hpa)

    def conflict() -> dict[str, Any]:
        return condition(get_json(cluster, "ttsd", "rival", "-n", namespace), "ScalingActive")

    found = wait_for("conflict reported", lambda: conflict().get("reason") == "ConflictingAutoscaler" and conflict())
    assert f"HorizontalPodAutoscaler {namespace}/rival-hpa" in found["message"]
    assert wait_for("Event", lambda: events(cluster, namespace, "ConflictingAutoscaler"))
    cluster.kubectl("delete", "hpa", "rival-hpa", "-n", namespace)
    wait_for("scaling again", lambda: conflict().get("reason") == "Evaluating")


def test_a_manual_scale_that_the_policy_undoes_is_said(
    cluster: LocalCluster, operator: OperatorProcess, namespace: str
) -> None:
    apply(cluster, namespace, minimal("manual", replicas={"min": 2, "max": 4}, scaling={"interval": "2s"}))
    wait_for("status", lambda: get_json(cluster, "ttsd", "manual", "-n", namespace).get("status", {}).get("reason"))
    cluster.kubectl("scale", "deployment", "manual", "-n", namespace, "--replicas=1")
    said = wait_for("Event", lambda: events(cluster, namespace, "ManualScaleOverridden"))
    assert "replicas were set to 1 outside voxscale" in said[0]
    wait_for("back at min", lambda: get_json(cluster, "deployment", "manual", "-n", namespace)["spec"]["replicas"] == 2)

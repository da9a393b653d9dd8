"""spec.proxy: the operator puts the door sidecar (`voxscale proxy`) in front of a TTS server that is not
voxscale's own (issue 23, item 2). The builders are pure; the CRD's rules run on the real API server."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml

from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import REPO
from voxscale.operator import children, crd
from voxscale.proxy import settings as ps
from voxscale.proxy.settings import ProxySettings

DOOR = {"enabled": True, "image": "REG/voxscale/operator:0.1.0", "serverPort": 5000, "healthPath": "/voices"}


def ttsd(**spec: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "voxscale.io/v1alpha1",
        "kind": "TTSDeployment",
        "metadata": {"name": "piper", "namespace": "tts", "uid": "0c5e3f1a-0000-4000-8000-000000000002"},
        "spec": {"model": {"image": "REG/piper-http:1.8.0"}, "replicas": {"min": 1, "max": 4}, **copy.deepcopy(spec)},
    }
    return crd.apply_defaults(obj)


def containers(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pod = children.deployment(obj)["spec"]["template"]["spec"]
    return {c["name"]: c for c in pod["containers"]}


def env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def test_without_spec_proxy_the_pod_is_voxscales_own_server_alone() -> None:
    obj = ttsd()
    assert crd.schema()["properties"]["spec"]["properties"]["proxy"]["properties"]["enabled"]["default"] is False
    assert list(containers(obj)) == [children.CONTAINER]
    assert children.metrics_port(obj["spec"]) == 8000


def test_the_door_takes_the_services_port_and_forwards_to_the_servers() -> None:
    obj = ttsd(proxy=DOOR, service={"port": 8080}, model={"image": "REG/piper-http:1.8.0", "maxQueueLength": 16})
    found = containers(obj)
    assert list(found) == [children.CONTAINER, children.DOOR_CONTAINER]
    door = found[children.DOOR_CONTAINER]
    assert door["image"] == DOOR["image"] and door["command"] == ["voxscale", "proxy"]
    # The Service's targetPort is named `http`: the door's, so every request passes the door.
    service = children.service(obj)
    assert service["spec"]["ports"][0]["targetPort"] == children.PORT_NAME
    assert {p["name"]: p["containerPort"] for p in door["ports"]} == {
        children.PORT_NAME: 8080,
        children.DOOR_METRICS_PORT_NAME: ps.METRICS_PORT.default,
    }
    # Its variables read back, through the door's own settings, as the spec says.
    settings = ProxySettings.from_env(env(door))
    assert settings.listen == "0.0.0.0:8080" and settings.upstream == "127.0.0.1:5000"
    assert settings.health_path == "/voices" and settings.queue == 16
    assert settings.drain_timeout_s == children.drain_seconds(obj["spec"])
    assert settings.concurrency == ps.CONCURRENCY.default  # not in the spec: the door's own default
    assert door["readinessProbe"]["httpGet"] == {"path": "/ready", "port": ps.METRICS_PORT.default}
    assert door["livenessProbe"]["httpGet"] == {"path": "/live", "port": ps.METRICS_PORT.default}
    assert door["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_users_server_gets_its_own_env_its_health_path_and_waits_for_the_doors_drain() -> None:
    user_env = [{"name": "PIPER_SPEAKER", "value": "0"}]
    obj = ttsd(proxy=DOOR, model={"image": "REG/piper-http:1.8.0", "env": user_env})
    server = containers(obj)[children.CONTAINER]
    assert server["image"] == "REG/piper-http:1.8.0"
    assert server["env"] == user_env  # voxscale's pipeline settings mean nothing to another server
    assert server["ports"] == [{"name": children.SERVER_PORT_NAME, "containerPort": 5000, "protocol": "TCP"}]
    # No kubelet probe: it would reach the pod IP, where a server on 127.0.0.1 does not listen. The door
    # polls the health path from inside the pod and the pod's readiness is the door's.
    assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(server)
    # The kubelet signals every container at once: the server's SIGTERM waits until the door has answered
    # everything it accepted, and the grace period covers the door's whole drain.
    assert server["lifecycle"]["preStop"]["httpGet"] == {"path": "/wait-for-drain", "port": ps.METRICS_PORT.default}
    pod = children.deployment(obj)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > children.drain_seconds(obj["spec"]) + ps.DRAIN_QUIET_S.default
    assert server["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": children.SCRATCH_SIZE_LIMIT}}]


def test_without_a_health_path_or_concurrency_the_door_uses_its_own_defaults() -> None:
    door = {k: v for k, v in DOOR.items() if k != "healthPath"}
    settings = ProxySettings.from_env(env(containers(ttsd(proxy=door))[children.DOOR_CONTAINER]))
    assert settings.health_path == ps.HEALTH_PATH.default and settings.concurrency == ps.CONCURRENCY.default
    settings = ProxySettings.from_env(env(containers(ttsd(proxy=door | {"concurrency": 2}))[children.DOOR_CONTAINER]))
    assert settings.concurrency == 2


def test_prometheus_scrapes_the_door_and_a_network_policy_admits_it() -> None:
    obj = ttsd(proxy=DOOR, networkPolicy={"enabled": True})
    annotations = children.deployment(obj)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(ps.METRICS_PORT.default)
    assert annotations["kubectl.kubernetes.io/default-container"] == children.CONTAINER
    policy = children.network_policy(obj)
    assert policy is not None
    assert [p["port"] for p in policy["spec"]["ingress"][0]["ports"]] == [8000, ps.METRICS_PORT.default]


def test_the_crds_port_rule_names_the_doors_metrics_port() -> None:
    """The CEL rule cannot import the door's default: this keeps the two numbers one."""
    rules = crd.schema()["properties"]["spec"]["x-kubernetes-validations"]
    (rule,) = [r for r in rules if "proxy.serverPort" in r["rule"]]
    assert str(ps.METRICS_PORT.default) in rule["rule"] and str(ps.METRICS_PORT.default) in rule["message"]


@pytest.fixture
def with_crd(cluster: LocalCluster) -> LocalCluster:
    cluster.kubectl("apply", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/ttsdeployments.voxscale.io", "--timeout=60s")
    return cluster


def test_the_api_server_refuses_a_door_without_its_image_or_on_the_services_port(with_crd: LocalCluster) -> None:
    cluster = with_crd

    def dry_run(proxy: dict[str, Any]) -> tuple[int, str]:
        obj = ttsd(proxy=proxy)
        obj["metadata"] = {"name": "piper", "namespace": "default"}
        res = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=json.dumps(obj), check=False)
        return res.returncode, res.stderr

    code, err = dry_run({"enabled": True, "serverPort": 5000})
    assert code != 0 and "spec.proxy.image" in err and "spec.proxy.serverPort" in err
    code, err = dry_run({**DOOR, "serverPort": 8000})
    assert code != 0 and "spec.proxy.serverPort must differ from spec.service.port" in err
    assert dry_run(DOOR)[0] == 0
    assert dry_run({"enabled": False})[0] == 0  # off: nothing else needed


def test_the_deployment_with_a_door_is_accepted_by_the_api_server(cluster: LocalCluster) -> None:
    dep = children.deployment(ttsd(proxy=DOOR))
    dep["metadata"] = {"name": "piper", "namespace": "default"}
    res = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump(dep), check=False)
    assert res.returncode == 0, res.stderr

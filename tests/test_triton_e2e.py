"""NVIDIA Triton scaled from its own metrics (issue 23), end to end on the local cluster's real node.

Triton as shipped inside the nvidia-pytriton wheel (tritonserver 2.51) serves Piper as a Python model
on the CPU (examples/servers/triton/server.py, Dockerfile.triton): a plain Deployment and Service
applied with kubectl, no door sidecar. The real Prometheus scrapes Triton's own /metrics (:8002)
through Kubernetes service discovery; a TTSDeployment attached with spec.metrics.profile triton makes
the operator (a pod of the chart) size the Deployment from them under load, and its decision says
which profile fed it and what that approximated. Run under `flock /tmp/voxscale-realnode.lock`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.test_piper_e2e import manifests, prometheus
from voxscale.localcluster import realpods
from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import REPO, get_json, wait_for
from voxscale.operator.profiles import Approximation
from voxscale.simulator.cli import load_manifest

NAMESPACE = "triton"
EXAMPLES = REPO / "examples" / "servers" / "triton"
TEXT = "Triton serving Piper, scaled by voxscale from its own metrics."
INFER = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [TEXT]}]}


def replicas(cluster: LocalCluster) -> int:
    return int(get_json(cluster, "deployment", "triton", "-n", NAMESPACE)["spec"]["replicas"])


def wait_ready(cluster: LocalCluster, count: int, timeout: float = 180) -> None:
    def ready() -> int:
        items = get_json(cluster, "pods", "-n", NAMESPACE, "-l", "app=triton")["items"]
        conditions = [c for p in items for c in p.get("status", {}).get("conditions", [])]
        return sum(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    try:
        wait_for(f"{count} ready Triton pod(s)", lambda: ready() >= count, timeout)
    except AssertionError as exc:
        described = cluster.kubectl("describe", "pods", "-n", NAMESPACE, "-l", "app=triton", check=False).stdout
        raise AssertionError(f"{exc}\n{described[-4000:]}") from None


def ttsd(cluster: LocalCluster) -> dict[str, Any]:
    return dict(get_json(cluster, "ttsd", "triton", "-n", NAMESPACE))


@pytest.fixture(scope="module")
def real_cluster(operator_image: str, triton_image: str) -> Iterator[LocalCluster]:
    images = [operator_image, triton_image]
    with realpods.real_node_cluster("triton-e2e", images, operator_image, NAMESPACE) as cluster:
        yield cluster


def test_the_example_validates_against_the_crd() -> None:
    spec = load_manifest(EXAMPLES / "ttsdeployment.yaml")["spec"]
    assert spec["metrics"] == {"profile": "triton", "triton": {"model": "piper"}}


@pytest.mark.timeout(900)
def test_an_attached_triton_deployment_is_sized_from_tritons_own_metrics(
    real_cluster: LocalCluster, triton_image: str
) -> None:
    cluster = real_cluster
    images = {"REG/triton-piper:0.7.0": triton_image}
    cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=_yaml(manifests(EXAMPLES / "deployment.yaml", images)))
    wait_ready(cluster, 1)
    wait_for(
        "Prometheus to scrape Triton's own /metrics through Kubernetes SD",
        lambda: prometheus(cluster, f'nv_inference_pending_request_count{{namespace="{NAMESPACE}", model="piper"}}'),
        timeout=60,
    )
    cluster.kubectl(
        "apply", "-n", NAMESPACE, "-f", "-", input=_yaml(manifests(EXAMPLES / "ttsdeployment.yaml", images))
    )
    url = realpods.service_url(cluster, NAMESPACE, "triton")
    calls = realpods.SpeechLoad(url, clients=6, path="/v2/models/piper/infer", payload=INFER).start()
    try:
        wait_for("the slo model to scale Triton up from its metrics", lambda: replicas(cluster) >= 2, timeout=240)
        decision = ttsd(cluster)["status"]["lastDecision"]
    finally:
        answers = calls.stop()
    assert any(a.ok for a in answers), answers[:3]
    assert realpods.failed_accepted(answers) == [], realpods.failed_accepted(answers)[:5]
    signals = decision["signals"]
    assert signals["profile"] == "triton"
    assert Approximation.ARRIVALS_FROM_COMPLETIONS in signals["approximated"]
    demand = ttsd(cluster)["status"]["demand"]
    assert demand["arrivalRps"] > 0, demand
    served = prometheus(cluster, f'sum(nv_inference_request_success{{namespace="{NAMESPACE}", model="piper"}})')
    assert float(served[0]["value"][1]) > 0
    cluster.kubectl("delete", "ttsd", "triton", "-n", NAMESPACE, "--wait=true")
    cluster.kubectl("delete", "-n", NAMESPACE, "deployment/triton", "service/triton", "--wait=true")


def _yaml(docs: list[dict[str, Any]]) -> str:
    return str(yaml.safe_dump_all(docs))

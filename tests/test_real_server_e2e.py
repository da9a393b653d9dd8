"""The latency and custom PromQL triggers end to end on a real TTS server's own /metrics (issue 12,
item 11): `voxscale serve` (the real model, on the CPU) -> the real Prometheus -> the real operator ->
the Deployment. The server process stands in for the one pod kwok runs for the Deployment: its scrape
target carries that pod's name and namespace, as Kubernetes service discovery would label it."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.inference_helpers import ServerProcess
from tests.test_autoscaling_e2e import replicas, scale_decision, ttsd
from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import OperatorProcess, get_json, wait_for

TEXT = "The operator reads this server's own latency histogram and request counter from Prometheus."


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    srv = ServerProcess.start(tmp_path)
    yield srv
    srv.stop()


def only_pod(cluster: LocalCluster, namespace: str, name: str) -> str:
    pods = get_json(cluster, "pods", "-n", namespace, "-l", f"voxscale.io/ttsdeployment={name}")["items"]
    return str(pods[0]["metadata"]["name"]) if len(pods) == 1 else ""


def keep_busy(url: str, stop: threading.Event, clients: int = 4) -> list[threading.Thread]:
    """`clients` callers, each sending the next request as soon as the last is answered."""

    def call() -> None:
        while not stop.is_set():
            body = {"input": TEXT, "voice": "alloy", "response_format": "wav"}
            requests.post(f"{url}/v1/audio/speech", json=body, timeout=60)

    threads = [threading.Thread(target=call, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.cluster
def test_latency_and_promql_triggers_scale_on_a_real_servers_metrics(
    cluster: LocalCluster, operator: OperatorProcess, server: ServerProcess, namespace: str
) -> None:
    name = "real-server"
    triggers = [
        {"name": "latency", "type": "latencyP95", "scaleUpAbove": 1.0},
        {
            "name": "arrivals",
            "type": "promql",
            "query": 'sum(rate(voxscale_requests_received_total{namespace="$namespace"}[10s]))',
            "target": 100,  # far above what one CPU server takes: only the latency trigger asks for more
        },
    ]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ttsd(name, triggers)))
    pod = wait_for("the Deployment's one pod", lambda: only_pod(cluster, namespace, name), timeout=60)
    job = f"real-server-{namespace}"
    cluster.set_scrape_targets(job, [f"127.0.0.1:{server.port}"], {"pod": pod, "namespace": namespace})
    stop = threading.Event()
    try:
        callers = keep_busy(server.url, stop)
        wait_for("a scale-up from the real server's latency", lambda: replicas(cluster, namespace, name) >= 2, 120)
        decision = scale_decision(cluster, namespace, name)
        assert decision["rule"] == "latency", decision
        assert decision["metrics"]["latency"] > 1.0 and decision["metrics"]["arrivals"] > 0, decision
    finally:
        stop.set()
        cluster.remove_scrape_targets(job)
    for t in callers:
        t.join(timeout=60)

"""The SLO as the contract, end to end (issue 21): the real operator (chart RBAC), the real Prometheus,
per-pod door counters and GPU gauges from the pod exporter for kwok's pods.

- A policy whose only rule is a 3-minute GPU threshold still scales up at once when the pods start
  refusing requests: overload is answered from demand, past the rule's sustain clock.
- A scale-down after which the GPU rule would ask to scale up again is refused, and status says so.
- After Prometheus is stopped for 60 s and started again, no decision uses a sample from before the
  outage (an instant query would serve those for five minutes as if current).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

from tests.test_autoscaling_e2e import INTERVAL, replicas, scale_decision, status, ttsd
from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import OperatorProcess, instant_query, wait_for
from voxscale.localcluster.pod_exporter import PodMetricsExporter
from voxscale.operator import queries

CAPACITY = 16.0  # requests/s a pod completes per busy second
GPU_3M = {"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 75, "sustainFor": "3m", "scaleDownBelow": 40}
# The door counters' rates over 10 s (ten scrapes of the test Prometheus), so the test runs in seconds.
SLO = {"latencyP95": "2s", "rateWindow": "10s", "replicaCapacity": CAPACITY}


def apply(cluster: LocalCluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def query(cluster: LocalCluster, promql: str) -> list[dict[str, Any]]:
    assert cluster.state is not None
    return instant_query(cluster.state.prometheus_url, promql, timeout=5)


def refusing(cluster: LocalCluster, namespace: str) -> bool:
    found = query(cluster, queries.refused_rate([namespace], 10))
    return any(float(r["value"][1]) > 0 for r in found)


def test_a_three_minute_gpu_rule_does_not_delay_the_answer_to_refused_requests(
    cluster: LocalCluster, operator: OperatorProcess, exporter: PodMetricsExporter, namespace: str
) -> None:
    apply(cluster, namespace, ttsd("refusing", [GPU_3M], replicas={"min": 1, "max": 8}, slo=SLO))
    exporter.set(namespace, "refusing", gpu=50, queue_per_pod=0, arrivals_rps=8.0, capacity_rps=CAPACITY)
    wait_for("demand in status", lambda: status(cluster, namespace, "refusing").get("demand"), timeout=60)
    assert replicas(cluster, namespace, "refusing") == 1

    # 70 requests/s at one pod that serves 16: it refuses the rest with 429. The GPU reads 50 %, below
    # the rule's 75 %, and the rule would wait 3 minutes anyway.
    exporter.set(namespace, "refusing", gpu=50, queue_per_pod=0, arrivals_rps=70.0, capacity_rps=CAPACITY)
    wait_for("Prometheus to see the 429s", lambda: refusing(cluster, namespace), timeout=30, interval=0.2)
    seen = time.monotonic()
    wait_for("a scale-up", lambda: replicas(cluster, namespace, "refusing") > 1, timeout=30, interval=0.2)
    late = time.monotonic() - seen
    assert late <= 2 * INTERVAL + 1, f"scaled up {late:.1f} s after the refusals showed (interval {INTERVAL} s)"
    decision = scale_decision(cluster, namespace, "refusing")
    assert decision["to"] >= 5, decision  # sized from demand (70 rps / 16), not one step of the rule
    assert "rule gpu" in decision["message"] or "demand" in decision["message"], decision


def test_a_scale_down_the_gpu_rule_would_undo_is_refused_and_status_says_why(
    cluster: LocalCluster, operator: OperatorProcess, exporter: PodMetricsExporter, namespace: str
) -> None:
    flappy = {"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 70, "sustainFor": "1m", "scaleDownBelow": 40}
    app = ttsd("flappy", [flappy], replicas={"min": 2, "max": 4}, slo=SLO)
    apply(cluster, namespace, app)
    # 39 % on each of 2 pods is below the 40 % down threshold; on 1 pod it would read 78 % > 70 %.
    exporter.set(namespace, "flappy", gpu=39, queue_per_pod=0, arrivals_rps=2.0, capacity_rps=CAPACITY)
    wait_for("2 Ready pods", lambda: [p for p, ready in exporter.pods(namespace, "flappy") if ready][1:], timeout=60)
    app["spec"]["replicas"] = {"min": 1, "max": 4}
    apply(cluster, namespace, app)

    def refused_for_flapping() -> dict[str, Any] | None:
        st = status(cluster, namespace, "flappy")
        decision = st.get("lastDecision", {})
        return decision if decision.get("rule") == "would-flap" else None

    decision = wait_for("the scale-down refused", refused_for_flapping, timeout=60)
    assert "gpu would read 78% > 70%" in decision["message"], decision
    time.sleep(3 * INTERVAL)
    assert replicas(cluster, namespace, "flappy") == 2


def test_after_a_prometheus_outage_no_decision_uses_a_sample_from_before_it(
    cluster: LocalCluster, operator: OperatorProcess, exporter: PodMetricsExporter, namespace: str
) -> None:
    gpu = {"name": "gpu", "type": "gpuUtilization", "target": 60, "scaleDownBelow": 40}
    slo_off = {"enabled": False}  # the GPU rule alone decides, so every decision names its reading
    app = ttsd("outage", [gpu], replicas={"min": 1, "max": 8}, slo=slo_off, prometheus={"timeout": "1s"})
    apply(cluster, namespace, app)
    exporter.set(namespace, "outage", gpu=63, queue_per_pod=0)  # within the 10 % tolerance of 60: holds 1
    wait_for("a decision on 63 %", lambda: gpu_read(cluster, namespace) == 63, timeout=60, interval=0.5)
    cluster.stop_process("prometheus")
    try:
        # While it is down the load changes: 63 % before the outage; now 30 %.
        exporter.set(namespace, "outage", gpu=30, queue_per_pod=0)
        time.sleep(60)
    finally:
        cluster.start_process("prometheus")
    restarted = dt.datetime.now(dt.UTC).replace(microsecond=0)
    readings: list[float] = []  # the GPU readings of decisions made after the restart
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        decision = status(cluster, namespace, "outage").get("lastDecision", {})
        value = (decision.get("metrics") or {}).get("gpu")
        if value is not None and dt.datetime.fromisoformat(decision["time"]) >= restarted:
            readings.append(round(float(value)))
        time.sleep(0.3)
    assert 63 not in readings, f"a decision used the pre-outage sample: {readings}"
    assert readings and readings[-1] == 30, readings
    assert replicas(cluster, namespace, "outage") == 1


def gpu_read(cluster: LocalCluster, namespace: str) -> float | None:
    """The GPU reading the operator's last decision names (status.lastDecision.metrics), if any."""
    metrics = status(cluster, namespace, "outage").get("lastDecision", {}).get("metrics") or {}
    value = metrics.get("gpu")
    return None if value is None else round(float(value))

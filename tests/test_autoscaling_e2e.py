"""Closed loop on real components: exporter -> Prometheus -> operator (chart RBAC) -> Deployment -> kwok pods."""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import OperatorProcess, get_json, wait_for
from voxscale.localcluster.pod_exporter import PodMetricsExporter

INTERVAL = 2  # seconds, spec.scaling.interval
SCRAPE = 1  # seconds, the test Prometheus' scrape interval


def ttsd(name: str, triggers: list[dict[str, Any]], **scaling: Any) -> dict[str, Any]:
    return {
        "apiVersion": "voxscale.io/v1alpha1",
        "kind": "TTSDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"image": "ghcr.io/voxscale/inference:0.1.0"},
            "replicas": scaling.pop("replicas", {"min": 1, "max": 4}),
            "scaling": {
                "interval": f"{INTERVAL}s",
                "triggers": triggers,
                "scaleUp": {"maxStepPods": 1, "maxStepPercent": 1, "period": f"{INTERVAL}s"},
                "scaleDown": {
                    "stabilizationWindow": "10s",
                    "maxStepPods": 1,
                    "maxStepPercent": 1,
                    "period": f"{INTERVAL}s",
                    "cooldown": "0s",
                },
                **scaling,
            },
        },
    }


def replicas(cluster: LocalCluster, ns: str, name: str) -> int:
    return int(get_json(cluster, "deployment", name, "-n", ns)["spec"]["replicas"])


def status(cluster: LocalCluster, ns: str, name: str) -> dict[str, Any]:
    return dict(get_json(cluster, "ttsd", name, "-n", ns).get("status", {}))


def scale_decision(cluster: LocalCluster, ns: str, name: str, timeout: float = 30) -> dict[str, Any]:
    """The status's lastDecision once it is the one that set the Deployment's replicas. The operator
    writes the status after the scale (its status writer batches the writes), so a read right after
    the new count shows can still find the decision before it."""

    def caught_up() -> dict[str, Any] | None:
        decision = status(cluster, ns, name).get("lastDecision") or {}
        return decision if decision.get("to") == replicas(cluster, ns, name) else None

    return dict(wait_for(f"{ns}/{name}'s status to show the decision behind its replicas", caught_up, timeout))


def metrics_available(cluster: LocalCluster, ns: str, name: str) -> str | None:
    conds = {c["type"]: c for c in status(cluster, ns, name).get("conditions", [])}
    return conds.get("MetricsAvailable", {}).get("status")


def settle(cluster: LocalCluster, ns: str, name: str, count: int) -> None:
    wait_for(
        f"{name} at {count} with metrics",
        lambda: replicas(cluster, ns, name) == count and metrics_available(cluster, ns, name) == "True",
        timeout=60,
    )


def test_gpu_above_threshold_scales_up_in_time_then_steps_down_after_the_window(
    cluster: LocalCluster, operator: OperatorProcess, exporter: PodMetricsExporter, namespace: str
) -> None:
    sustain = 4
    gpu = {
        "name": "gpu",
        "type": "gpuUtilization",
        "scaleUpAbove": 75,
        "sustainFor": f"{sustain}s",
        "scaleDownBelow": 40,
    }
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ttsd("gpu-app", [gpu])))
    exporter.set(namespace, "gpu-app", gpu=55)
    settle(cluster, namespace, "gpu-app", 1)

    exporter.set(namespace, "gpu-app", gpu=90)
    crossed = time.monotonic()
    wait_for("scale-up", lambda: replicas(cluster, namespace, "gpu-app") >= 2, timeout=40)
    reaction = time.monotonic() - crossed
    # Within the sustain time plus one interval and one scrape (and a little for the API round trips).
    assert sustain - 1 <= reaction <= sustain + INTERVAL + SCRAPE + 4, reaction
    decision = scale_decision(cluster, namespace, "gpu-app")
    assert decision["rule"] == "gpu" and "gpu 90% > 75%" in decision["message"]
    events = get_json(cluster, "events", "-n", namespace, "--field-selector", "involvedObject.name=gpu-app")
    assert any(e["reason"] == "ScaledUp" and "gpu 90% > 75%" in e["message"] for e in events["items"])

    wait_for("3 replicas", lambda: replicas(cluster, namespace, "gpu-app") >= 3, timeout=40)
    exporter.set(namespace, "gpu-app", gpu=10)
    removed = time.monotonic()
    top = replicas(cluster, namespace, "gpu-app")
    wait_for("first step down", lambda: replicas(cluster, namespace, "gpu-app") < top, timeout=60)
    waited = time.monotonic() - removed
    assert waited >= 10 - 1, f"scaled down {waited:.1f}s after the load went, inside the 10 s window"
    assert replicas(cluster, namespace, "gpu-app") == top - 1  # one step at a time
    wait_for("back to min", lambda: replicas(cluster, namespace, "gpu-app") == 1, timeout=60)


def test_queue_above_threshold_scales_up_while_gpu_is_low(
    cluster: LocalCluster, operator: OperatorProcess, exporter: PodMetricsExporter, namespace: str
) -> None:
    triggers = [
        {"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 75, "sustainFor": "3m", "scaleDownBelow": 40},
        {"name": "queue", "type": "queueLength", "scaleUpAbove": 20, "sustainFor": "2s"},
    ]
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ttsd("q-app", triggers)))
    exporter.set(namespace, "q-app", gpu=20, queue_per_pod=3)
    settle(cluster, namespace, "q-app", 1)
    exporter.set(namespace, "q-app", gpu=20, queue_per_pod=31)
    wait_for("queue-driven scale-up", lambda: replicas(cluster, namespace, "q-app") >= 2, timeout=30)
    decision = scale_decision(cluster, namespace, "q-app")
    assert decision["rule"] == "queue", decision
    assert decision["metrics"]["gpu"] == 20


def test_schedule_floor_applies_at_its_time(
    cluster: LocalCluster, operator: OperatorProcess, exporter: PodMetricsExporter, namespace: str
) -> None:
    now = dt.datetime.now(dt.UTC)
    start = (now + dt.timedelta(minutes=2)).replace(second=0, microsecond=0)  # a cron start ahead of us
    floor_at = now + dt.timedelta(seconds=12)
    prewarm = int((start - floor_at).total_seconds())
    floor_at = start - dt.timedelta(seconds=prewarm)
    sched = {
        "name": "launch",
        "cron": f"{start.minute} {start.hour} * * *",
        "timezone": "UTC",
        "duration": "10m",
        "prewarm": f"{prewarm}s",
        "minReplicas": 3,
    }
    gpu = {"name": "gpu", "type": "gpuUtilization", "target": 60, "scaleDownBelow": 40}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(ttsd("cron-app", [gpu], schedules=[sched])))
    exporter.set(namespace, "cron-app", gpu=50)
    settle(cluster, namespace, "cron-app", 1)
    while dt.datetime.now(dt.UTC) < floor_at - dt.timedelta(seconds=1):
        assert replicas(cluster, namespace, "cron-app") == 1, "the floor applied early"
        time.sleep(0.5)
    wait_for("floor 3", lambda: replicas(cluster, namespace, "cron-app") == 3, timeout=INTERVAL + 8)
    late = (dt.datetime.now(dt.UTC) - floor_at).total_seconds()
    assert late <= INTERVAL + 4, late
    decision = scale_decision(cluster, namespace, "cron-app")
    assert decision["rule"] == "schedule:launch" and decision["activeSchedule"] == "launch"


def test_prometheus_down_holds_replicas_and_recovers(
    cluster: LocalCluster, operator: OperatorProcess, exporter: PodMetricsExporter, namespace: str
) -> None:
    gpu = {"name": "gpu", "type": "gpuUtilization", "target": 60, "scaleDownBelow": 40}
    app = ttsd("hold-app", [gpu], replicas={"min": 1, "max": 5}, prometheus={"timeout": "1s"})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(app))
    exporter.set(namespace, "hold-app", gpu=100)
    wait_for("scale-up to 2+", lambda: replicas(cluster, namespace, "hold-app") >= 2, timeout=40)
    exporter.set(namespace, "hold-app", gpu=5)  # low load: only missing data can keep the replicas now
    held = replicas(cluster, namespace, "hold-app")
    cluster.stop_process("prometheus")
    try:
        wait_for(
            "MetricsAvailable=False", lambda: metrics_available(cluster, namespace, "hold-app") == "False", timeout=20
        )
        conds = {c["type"]: c for c in status(cluster, namespace, "hold-app")["conditions"]}
        assert "unreachable" in conds["MetricsAvailable"]["message"], conds
        deadline = time.monotonic() + 15  # several intervals and longer than the scale-down window
        while time.monotonic() < deadline:
            assert replicas(cluster, namespace, "hold-app") >= held, "scaled down without data"
            time.sleep(0.5)
    finally:
        cluster.start_process("prometheus")
    wait_for("MetricsAvailable=True", lambda: metrics_available(cluster, namespace, "hold-app") == "True", timeout=40)
    events = get_json(cluster, "events", "-n", namespace, "--field-selector", "involvedObject.name=hold-app")
    reasons = {e["reason"] for e in events["items"]}
    assert {"MetricsUnavailable", "MetricsAvailable"} <= reasons


def test_a_scale_down_removes_idle_pods_and_spares_busy_ones(
    cluster: LocalCluster, operator: OperatorProcess, exporter: PodMetricsExporter, namespace: str
) -> None:
    """Two of four pods hold requests; 4 -> 2 must remove the two idle ones (pod-deletion-cost)."""
    gpu = {"name": "gpu", "type": "gpuUtilization", "target": 60}
    fast_down = {"stabilizationWindow": "0s", "maxStepPods": 4, "period": f"{INTERVAL}s", "cooldown": "0s"}
    app = ttsd("spare", [gpu], replicas={"min": 4, "max": 4}, scaleDown=fast_down)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(app))
    exporter.set(namespace, "spare", gpu=30, queue_per_pod=0)
    wait_for("4 Ready pods", lambda: [p for p, ready in exporter.pods(namespace, "spare") if ready][3:], timeout=60)
    busy = sorted(p for p, _ in exporter.pods(namespace, "spare"))[1:3]
    for pod in busy:
        exporter.pod_queue[(namespace, pod)] = 3
    time.sleep(3 * SCRAPE)  # Prometheus has the per-pod queues
    app["spec"]["replicas"] = {"min": 1, "max": 4}  # 4 pods at 30 % GPU with a 60 % target: 2 are enough
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(app))
    wait_for("2 replicas", lambda: replicas(cluster, namespace, "spare") == 2, timeout=60)

    def survivors() -> list[str]:
        pods = get_json(cluster, "pods", "-n", namespace, "-l", "voxscale.io/ttsdeployment=spare")["items"]
        alive = [p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp")]
        return sorted(alive) if len(alive) == 2 else []

    assert wait_for("two pods left", survivors, timeout=60) == busy

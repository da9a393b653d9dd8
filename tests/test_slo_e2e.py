"""The slo trigger, the forecast floor and advisory mode end to end: per-pod demand counters -> the
real Prometheus (history backfilled with promtool) -> the real operator (chart RBAC) -> Deployment."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from tests.test_autoscaling_e2e import INTERVAL, replicas, status
from voxscale.localcluster import history
from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import OperatorProcess, get_json, wait_for
from voxscale.localcluster.pod_exporter import PodMetricsExporter
from voxscale.operator.queueing import replicas_for_slo

CAPACITY = 16.0  # requests/s one pod completes per busy second (the exporter's pods, and the spec's figure)


def slo_ttsd(name: str, max_replicas: int = 8, **scaling: Any) -> dict[str, Any]:
    return {
        "apiVersion": "voxscale.io/v1alpha1",
        "kind": "TTSDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"image": "ghcr.io/voxscale/inference:0.1.0"},
            "replicas": {"min": 1, "max": max_replicas},
            "scaling": {
                "interval": f"{INTERVAL}s",
                # The test Prometheus scrapes every second, so a 10 s window holds ten samples.
                "triggers": [{"name": "slo", "type": "slo", "slo": {"latencyP95": "2s", "rateWindow": "10s"}}],
                "scaleDown": {"stabilizationWindow": "10s"},
                **scaling,
            },
        },
    }


def apply(cluster: LocalCluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def events(cluster: LocalCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    found = get_json(cluster, "events", "-n", namespace, "--field-selector", f"involvedObject.name={name}")
    return list(found["items"])


def test_slo_trigger_sizes_the_fleet_from_per_pod_arrivals_and_back(
    cluster: LocalCluster, operator: OperatorProcess, exporter: PodMetricsExporter, namespace: str
) -> None:
    apply(cluster, namespace, slo_ttsd("slo-app", predictive={"enabled": False}))
    exporter.set(namespace, "slo-app", arrivals_rps=4.0, capacity_rps=CAPACITY)
    wait_for("demand in status", lambda: status(cluster, namespace, "slo-app").get("demand", {}).get("arrivalRps"))
    assert replicas(cluster, namespace, "slo-app") == 1

    exporter.set(namespace, "slo-app", arrivals_rps=70.0, capacity_rps=CAPACITY)
    need = replicas_for_slo(70.0, CAPACITY, 8, 2.0)
    wait_for(f"{need} replicas", lambda: replicas(cluster, namespace, "slo-app") >= need, timeout=60)
    # Sized from demand: never more than one above what the load needs (the recent window may run ahead).
    assert need <= replicas(cluster, namespace, "slo-app") <= need + 1

    # The pods are busy, so their completed/busy ratio is a capacity; status figures refresh every 30 s.
    def settled() -> bool:
        d = status(cluster, namespace, "slo-app")["demand"]
        measured = d["capacitySource"] == "measured" and d.get("capacityUnit") == "characters"  # the door counts them
        return measured and 60 <= d["arrivalRps"] <= 80 and 15 <= d["replicaCapacityRps"] <= 17

    wait_for("demand and measured capacity in status", settled, timeout=70)
    ups = [e for e in events(cluster, namespace, "slo-app") if e["reason"] == "ScaledUp"]
    assert any("demand" in e["message"] and "p95 2s needs" in e["message"] for e in ups), ups

    exporter.set(namespace, "slo-app", arrivals_rps=4.0, capacity_rps=CAPACITY)
    wait_for("back to 1", lambda: replicas(cluster, namespace, "slo-app") == 1, timeout=90)
    assert status(cluster, namespace, "slo-app")["forecast"]["message"].startswith("forecast off")


def test_forecast_floor_prewarms_before_a_peak_learnt_from_backfilled_history(
    cluster: LocalCluster, operator: OperatorProcess, exporter: PodMetricsExporter, namespace: str
) -> None:
    now = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
    # Two days in which 100 requests/s arrived every day from 3 minutes after this time of day, for
    # half an hour; written as the counters of two long-gone pods, ending 3 h ago (before the head).
    peak = history.daily_peak(now + dt.timedelta(minutes=3), base=2.0, peak=100.0, minutes=30)
    pods = [(namespace, "prewarm-5f6d7c8b9-bc2d4"), (namespace, "prewarm-5f6d7c8b9-q8w2n")]
    history.backfill(cluster, history.openmetrics(pods, now - dt.timedelta(days=2), now - dt.timedelta(hours=3), peak))

    scaling = {"predictive": {"coldStart": "10s", "timezone": "UTC"}}
    apply(cluster, namespace, slo_ttsd("prewarm", max_replicas=10, **scaling))
    apply(cluster, namespace, slo_ttsd("no-history", max_replicas=10, **scaling))
    for name in ("prewarm", "no-history"):
        exporter.set(namespace, name, arrivals_rps=2.0, capacity_rps=CAPACITY)  # live load stays low

    floor = replicas_for_slo(100.0, CAPACITY, 8, 2.0)
    wait_for(f"pre-warmed to {floor}", lambda: replicas(cluster, namespace, "prewarm") >= floor, timeout=90)
    st = status(cluster, namespace, "prewarm")
    assert st["lastDecision"]["rule"] == "forecast", st["lastDecision"]
    assert st["forecast"]["replicas"] == floor and 90 <= st["forecast"]["peakRps"] <= 110, st["forecast"]
    assert (st["demand"].get("arrivalRps") or 0) < 10  # nothing live asked for it (maybe no data yet)
    assert dt.datetime.now(dt.UTC) < now + dt.timedelta(minutes=3), "not before the learnt peak time"

    # Its history is read in the background: until that read has answered, the note says it is not read yet.
    def note() -> dict[str, Any] | None:
        forecast = status(cluster, namespace, "no-history").get("forecast") or {}
        return forecast if "read yet" not in forecast.get("message", "read yet") else None

    quiet = wait_for("no-history's forecast note once its history is read", note, timeout=60)
    assert quiet["message"].startswith("no forecast:") and "needs 24 h" in quiet["message"], quiet
    assert replicas(cluster, namespace, "no-history") == 1  # reactive: 2 rps needs one


def test_advisory_mode_reports_what_it_would_do_and_writes_no_scale(
    cluster: LocalCluster, operator: OperatorProcess, exporter: PodMetricsExporter, namespace: str
) -> None:
    apply(cluster, namespace, slo_ttsd("advised", mode="advisory", predictive={"enabled": False}))
    exporter.set(namespace, "advised", arrivals_rps=70.0, capacity_rps=CAPACITY)
    need = replicas_for_slo(70.0, CAPACITY, 8, 2.0)
    wait_for("advice", lambda: (status(cluster, namespace, "advised").get("advisedReplicas") or 0) >= need, timeout=60)
    assert replicas(cluster, namespace, "advised") == 1  # the scale was never written
    st = status(cluster, namespace, "advised")
    assert st["desiredReplicas"] == 1 and "lastScaleTime" not in st
    advised = [e for e in events(cluster, namespace, "advised") if e["reason"] == "Advised"]
    assert advised and advised[0]["message"].startswith("would scale 1 -> "), advised
    assert not [e for e in events(cluster, namespace, "advised") if e["reason"].startswith("Scaled")]


pytestmark = pytest.mark.cluster

"""`voxscale demo` (what `make demo` runs): the whole loop on one machine.

A real control plane with fake GPU nodes, the real Prometheus, the real operator (under the chart's
RBAC) and a TTSDeployment with the slo trigger; a load model drives a burst and a quiet period
through the pods and publishes their demand counters and DCGM-format GPU and queue metrics; the
terminal shows demand, capacity, forecast and the replicas following the load, read from the
operator's own metrics; a summary (checked against what the load needs) and a PNG plot close the
run. Everything started here is stopped at the end or on Ctrl-C.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voxscale.localcluster.cluster import LocalCluster
from voxscale.operator.queueing import replicas_for_slo
from voxscale.simulator.model import CapacityModel, ReplicaQueue

DEMO_CLUSTER = "demo"
NAMESPACE = "tts-demo"
NAME = "launch-demo"
CAPACITY = CapacityModel(slots=8, service_seconds=0.5, max_queue=64, cold_start_seconds=12)
INTERVAL_SECONDS = 2
BURST_RPS = 70.0
SLO_SECONDS = 2.0
READINESS_RESOLUTION_SECONDS = 1.0  # the loop's 0.5 s period plus reading the pods' state

MANIFEST: dict[str, Any] = {
    "apiVersion": "voxscale.io/v1alpha1",
    "kind": "TTSDeployment",
    "metadata": {"name": NAME},
    "spec": {
        "model": {"image": "ghcr.io/voxscale/inference:0.1.0", "maxBatchSize": 8, "maxQueueLength": 64},
        "resources": {"gpus": 1},
        # kwok reads this to model the model-loading cold start of each new pod.
        "podAnnotations": {"voxscale.io/cold-start": f"{CAPACITY.cold_start_seconds:g}s"},
        "replicas": {"min": 1, "max": 8},
        "scaling": {
            "interval": f"{INTERVAL_SECONDS}s",
            # p95 <= 2 s at the demand arriving; the demo's Prometheus scrapes every second, so arrivals
            # are read over 8 s (and its last 2 s). A real cluster's 15 s scrape wants the default 1m.
            "triggers": [{"name": "slo", "type": "slo", "slo": {"latencyP95": "2s", "rateWindow": "8s"}}],
            "scaleDown": {"stabilizationWindow": "20s"},
        },
    },
}


def traffic(t: float, scale: float) -> float:
    """Requests per second: quiet, a course-launch burst, then quiet again."""
    if t < 25 * scale:
        return 4.0
    if t < 95 * scale:
        return BURST_RPS
    return 4.0


@dataclass
class Sample:
    t: float
    rps: float
    queue: float
    gpu: float
    desired: int
    ready: int
    reason: str
    demand: float | None = None  # as the operator measured it
    capacity: float | None = None
    forecast: float | None = None


@dataclass
class LoadModel:
    """Turns the traffic into what each pod's GPU and queue would show, from the pods that are Ready."""

    queue: ReplicaQueue = field(default_factory=lambda: ReplicaQueue(CAPACITY))
    gpu: float = 0.0
    depth: float = 0.0

    def step(self, now: float, dt_s: float, rps: float, ready: int) -> None:
        stats = self.queue.step(now, dt_s, rps, ready)
        self.gpu = min(100.0, 100 * stats.busy_slots / (ready * CAPACITY.slots)) if ready else 0.0
        self.depth = stats.queue


def _banner() -> None:
    print(
        "voxscale demo: the real kube-apiserver, scheduler, controller-manager, Prometheus and voxscale operator.\n"
        "The GPU nodes and pods are kwok's: no model runs here. Each pod's demand counters (requests received,\n"
        f"completed, busy seconds) and GPU/queue gauges come from a load model ({CAPACITY.rps_per_replica:.0f} "
        f"requests/s per replica: {CAPACITY.slots} slots x {CAPACITY.service_seconds:g} s, an assumption until the\n"
        f"inference benchmark calibrates it; pods take {CAPACITY.cold_start_seconds:g} s to load), scraped by "
        "Prometheus every second.\n",
        flush=True,
    )


def operator_gauges(url: str) -> dict[str, float]:
    """The operator's per-object gauges for the demo's TTSDeployment, from its own /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("ttsdeployment") == NAME:
                out[sample.name] = sample.value
    return out


def run(fast: bool = False, plot_path: Path | None = None, cluster_name: str = DEMO_CLUSTER) -> int:
    from voxscale.localcluster.harness import OperatorProcess, free_port, get_json, install_operator_rbac
    from voxscale.localcluster.pod_exporter import PodMetricsExporter

    scale = 0.6 if fast else 1.0
    total = 190 * scale
    plot_path = plot_path or Path("out") / "demo.png"
    _banner()
    cluster = LocalCluster(cluster_name)
    started_here = not cluster.is_up()
    operator: OperatorProcess | None = None
    exporter: PodMetricsExporter | None = None
    samples: list[Sample] = []
    try:
        st = cluster.up(gpu_nodes=4)
        print(cluster.kubectl("get", "nodes", "-L", "nvidia.com/gpu.product").stdout, flush=True)
        operator = OperatorProcess(install_operator_rbac(cluster, "voxscale"), st.prometheus_url, lease_name="voxscale")
        metrics_port = free_port()
        operator.start(st.dir / "logs", metrics_port=metrics_port)
        operator.wait_leader()
        exporter = PodMetricsExporter(cluster, st).start("demo-load-model")
        cluster.kubectl("create", "namespace", NAMESPACE, check=False)
        cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(MANIFEST))
        print(
            f"applied TTSDeployment {NAMESPACE}/{NAME}: an slo trigger, p95 <= {SLO_SECONDS:g} s, sized from the "
            "requests arriving at the pods and each pod's measured capacity; it scales up to what the demand "
            "needs in one step, and back down after a 20 s window\n",
            flush=True,
        )
        model = LoadModel()
        exporter.set(NAMESPACE, NAME, gpu=0.0, queue_per_pod=0.0, loading_gpu=0.0, arrivals_rps=traffic(0, scale))
        print(
            f"{'time':>5} {'load':>8} {'demand':>7} {'capacity':>9} {'forecast':>9} {'queue':>6} {'GPU':>5} "
            f"{'desired':>8} {'ready':>6}  last decision",
            flush=True,
        )
        t0 = time.monotonic()
        last_print, last_step = -10.0, 0.0
        gauges_url = f"http://127.0.0.1:{metrics_port}/metrics"
        readiness: list[tuple[float, int]] = []  # every loop (0.5 s): ready pods, for a precise catch-up time
        while (now := time.monotonic() - t0) < total:
            ready = sum(1 for _, r in exporter.pods(NAMESPACE, NAME) if r)
            readiness.append((now, ready))
            rps = traffic(now, scale)
            model.step(now, now - last_step, rps, ready)
            last_step = now
            per_pod_queue = model.depth / ready if ready else 0.0
            exporter.set(
                NAMESPACE,
                NAME,
                gpu=model.gpu,
                queue_per_pod=per_pod_queue,
                loading_gpu=0.0,
                arrivals_rps=rps,
                capacity_rps=CAPACITY.rps_per_replica,
            )
            if now - last_print >= 2.0:
                last_print = now
                samples.append(
                    _sample(now, rps, model, ready, get_json(cluster, "ttsd", NAME, "-n", NAMESPACE), gauges_url)
                )
                _print(samples[-1])
            time.sleep(0.5)
        _summary(samples, readiness, model, scale)
        _plot(samples, plot_path)
        print(f"\nplot written to {plot_path}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything the demo started", file=sys.stderr)
        return 130
    finally:
        if operator is not None:
            operator.stop()
        if exporter is not None:
            exporter.stop()
        if started_here:
            cluster.down(quiet=True)
            print("stopped the demo cluster, Prometheus and the operator", file=sys.stderr)


def _sample(now: float, rps: float, model: LoadModel, ready: int, ttsd: dict[str, Any], gauges_url: str) -> Sample:
    status = ttsd.get("status", {})
    gauges = operator_gauges(gauges_url)
    return Sample(
        now,
        rps,
        model.depth,
        model.gpu,
        int(status.get("desiredReplicas") or 0),
        ready,
        str(status.get("lastDecision", {}).get("message", "waiting for the first decision")),
        gauges.get("voxscale_operator_demand_rps"),
        gauges.get("voxscale_operator_replica_capacity_rps"),
        gauges.get("voxscale_operator_forecast_rps"),
    )


def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.0f}{unit}"


def _print(s: Sample) -> None:
    print(
        f"{s.t:4.0f}s {s.rps:5.0f} rps {_fmt(s.demand):>7} {_fmt(s.capacity, '/pod'):>9} {_fmt(s.forecast):>9} "
        f"{s.queue:6.0f} {s.gpu:4.0f}% {s.desired:8d} {s.ready:6d}  {s.reason[:130]}",
        flush=True,
    )


def needed_replicas(rps: float) -> int:
    """What the load needs for the SLO (the same model the operator sizes with)."""
    return replicas_for_slo(rps, CAPACITY.rps_per_replica, CAPACITY.slots, SLO_SECONDS)


def _summary(samples: list[Sample], readiness: list[tuple[float, int]], model: LoadModel, scale: float) -> None:
    burst = 25 * scale
    peak = max(s.desired for s in samples)
    need = needed_replicas(BURST_RPS)
    first_up = next((s.t for s in samples if s.t >= burst and s.desired > 1), None)
    # Readiness is read every loop (0.5 s); the table's samples (every ~2 s) would round it up.
    enough = next((t for t, ready in readiness if t >= burst and ready >= need), None)
    q = model.queue
    served = q.served or 1.0
    print("\nsummary")
    if first_up is None:
        print("  no scale-up seen")
    else:
        print(f"  burst of {BURST_RPS:g} rps at {burst:.0f} s; scale-up decided {first_up - burst:.0f} s later")
    if enough is not None and first_up is not None:
        bound = first_up - burst + CAPACITY.cold_start_seconds + INTERVAL_SECONDS
        verdict = "within" if enough - burst <= bound + READINESS_RESOLUTION_SECONDS else "OUTSIDE"
        print(
            f"  ready capacity caught up ({need} replicas Ready) {enough - burst:.1f} s after the burst: {verdict} "
            f"the decision + the {CAPACITY.cold_start_seconds:g} s cold start + one {INTERVAL_SECONDS} s interval "
            f"({bound:.0f} s; the decision seen in a ~2 s sample, readiness every 0.5 s)"
        )
    print(
        f"  peak replicas {peak}; the load needs {need} for p95 <= {SLO_SECONDS:g} s "
        f"({BURST_RPS:g} rps / {CAPACITY.rps_per_replica:.0f} rps each = {BURST_RPS / CAPACITY.rps_per_replica:.1f}); "
        f"back to {samples[-1].desired} after the burst"
    )
    print(
        f"  requests {served + q.rejected:.0f}: p95 latency {q.percentile(0.95):.2f} s, mean "
        f"{q.wait_sum / served + CAPACITY.service_seconds:.2f} s, rejected {q.rejected:.0f} (load model)"
    )


def _plot(samples: list[Sample], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    t = [s.t for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(10, 7.5), sharex=True)
    axes[0].plot(t, [s.rps for s in samples], color="black", label="load offered")
    axes[0].plot(t, [s.demand if s.demand is not None else float("nan") for s in samples], label="demand (operator)")
    axes[0].plot(
        t,
        [s.ready * s.capacity if s.capacity is not None else float("nan") for s in samples],
        label="ready capacity",
        ls="--",
    )
    axes[0].set_ylabel("requests/s")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[0].set_title(f"voxscale demo, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    axes[1].step(t, [s.desired for s in samples], where="post", label="desired")
    axes[1].step(t, [s.ready for s in samples], where="post", label="ready")
    axes[1].step(t, [needed_replicas(s.rps) for s in samples], where="post", ls=":", color="gray", label="needed")
    axes[1].set_ylabel("replicas")
    axes[1].legend(loc="upper right", fontsize=8)
    axes[2].plot(t, [s.queue for s in samples], label="queue (requests)")
    axes[2].plot(t, [s.gpu for s in samples], label="GPU %")
    axes[2].set_xlabel("seconds")
    axes[2].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

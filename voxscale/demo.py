"""`voxscale demo` (what `make demo` runs): the whole loop on one machine.

A real control plane with fake GPU nodes, the real Prometheus, the real operator (under the chart's
RBAC) and a TTSDeployment; a load model drives a burst and a quiet period through the pods and
publishes their DCGM-format GPU and queue metrics; the terminal shows the replicas following the
load; a summary and a PNG plot close the run. Everything started here is stopped at the end or on
Ctrl-C.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from voxscale.localcluster.cluster import LocalCluster
from voxscale.simulator.model import CapacityModel, ReplicaQueue

DEMO_CLUSTER = "demo"
NAMESPACE = "tts-demo"
NAME = "launch-demo"
CAPACITY = CapacityModel(slots=8, service_seconds=0.5, max_queue=64, cold_start_seconds=12)

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
            "interval": "2s",
            "triggers": [
                {"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 80, "scaleDownBelow": 40},
                {"name": "queue", "type": "queueLength", "target": 16, "scaleDownBelow": 4},
            ],
            "scaleUp": {"maxStepPods": 2, "maxStepPercent": 100, "period": "4s"},
            "scaleDown": {"stabilizationWindow": "20s", "maxStepPods": 1, "period": "6s", "cooldown": "6s"},
        },
    },
}


def traffic(t: float, scale: float) -> float:
    """Requests per second: quiet, a course-launch burst, then quiet again."""
    if t < 25 * scale:
        return 4.0
    if t < 95 * scale:
        return 70.0
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
        "The GPU nodes and pods are kwok's: no model runs here. Each pod's GPU and queue metrics come from a\n"
        f"load model ({CAPACITY.rps_per_replica:.0f} requests/s per replica: {CAPACITY.slots} slots x "
        f"{CAPACITY.service_seconds:g} s, an assumption until the inference benchmark calibrates it; pods take\n"
        f"{CAPACITY.cold_start_seconds:g} s to load), published in DCGM format, scraped by Prometheus every second.\n",
        flush=True,
    )


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run(fast: bool = False, plot_path: Path | None = None, cluster_name: str = DEMO_CLUSTER) -> int:
    from voxscale.localcluster.harness import OperatorProcess, get_json, install_operator_rbac
    from voxscale.localcluster.pod_exporter import PodMetricsExporter

    signal.signal(signal.SIGTERM, _stop_on_sigterm)
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
        operator.start(st.dir / "logs")
        operator.wait_leader()
        exporter = PodMetricsExporter(cluster, st).start("demo-load-model")
        cluster.kubectl("create", "namespace", NAMESPACE, check=False)
        cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(MANIFEST))
        print(
            f"applied TTSDeployment {NAMESPACE}/{NAME}: GPU > 80 % or queue > 16 per replica scales up; "
            "the window for scaling down is 20 s\n",
            flush=True,
        )
        model = LoadModel()
        exporter.set(NAMESPACE, NAME, gpu=0.0, queue_per_pod=0.0, loading_gpu=0.0)
        print(f"{'time':>5} {'load':>8} {'queue':>6} {'GPU':>5} {'desired':>8} {'ready':>6}  last decision", flush=True)
        t0 = time.monotonic()
        last_print, last_step = -10.0, 0.0
        while (now := time.monotonic() - t0) < total:
            ready = sum(1 for _, r in exporter.pods(NAMESPACE, NAME) if r)
            rps = traffic(now, scale)
            model.step(now, now - last_step, rps, ready)
            last_step = now
            per_pod_queue = model.depth / ready if ready else 0.0
            exporter.set(NAMESPACE, NAME, gpu=model.gpu, queue_per_pod=per_pod_queue, loading_gpu=0.0)
            if now - last_print >= 2.0:
                last_print = now
                ttsd = get_json(cluster, "ttsd", NAME, "-n", NAMESPACE)
                status = ttsd.get("status", {})
                decision = status.get("lastDecision", {})
                sample = Sample(
                    now,
                    rps,
                    model.depth,
                    model.gpu,
                    int(status.get("desiredReplicas") or 0),
                    ready,
                    str(decision.get("message", "waiting for the first decision")),
                )
                samples.append(sample)
                print(
                    f"{now:4.0f}s {rps:5.0f} rps {sample.queue:6.0f} {sample.gpu:4.0f}% {sample.desired:8d} "
                    f"{ready:6d}  {sample.reason[:90]}",
                    flush=True,
                )
            time.sleep(0.5)
        _summary(samples, model, scale)
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


def _summary(samples: list[Sample], model: LoadModel, scale: float) -> None:
    burst = 25 * scale
    peak = max(s.desired for s in samples)
    first_up = next((s.t for s in samples if s.t >= burst and s.desired > 1), None)
    enough = next((s.t for s in samples if s.t >= burst and s.ready * CAPACITY.rps_per_replica >= s.rps), None)
    q = model.queue
    served = q.served or 1.0
    print("\nsummary")
    print(
        f"  burst at {burst:.0f} s; first scale-up decided {first_up - burst:.0f} s later"
        if first_up is not None
        else "  no scale-up seen"
    )
    if enough is not None:
        print(
            f"  ready capacity caught up with the load {enough - burst:.0f} s after the burst "
            f"(pods need {CAPACITY.cold_start_seconds:g} s to load)"
        )
    print(f"  peak replicas {peak}; back to {samples[-1].desired} after the burst")
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
    fig, axes = plt.subplots(3, 1, figsize=(10, 7), sharex=True)
    axes[0].plot(t, [s.rps for s in samples], color="black")
    axes[0].set_ylabel("load (requests/s)")
    axes[0].set_title(f"voxscale demo, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    axes[1].step(t, [s.desired for s in samples], where="post", label="desired")
    axes[1].step(t, [s.ready for s in samples], where="post", label="ready")
    axes[1].set_ylabel("replicas")
    axes[1].legend(loc="upper right")
    axes[2].plot(t, [s.queue for s in samples], label="queue (requests)")
    axes[2].plot(t, [s.gpu for s in samples], label="GPU %")
    axes[2].set_xlabel("seconds")
    axes[2].legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""`voxscale demo --real-pods`: the same loop as `voxscale demo`, with real pods end to end.

A local cluster with a real worker node; the operator installed by `helm` from the chart with the
image `make images` built; a TTSDeployment whose pods are real `voxscale serve` containers on the
CPU; Prometheus finding them by Kubernetes service discovery; real /v1/audio/speech requests sent
through the Service by a ramp of closed-loop callers (1, then 6, then 2). The terminal shows the
callers, replicas and answers per second by pod; the PNG plot marks every request by the real pod
that served it. Needs the images (`make images`); everything started here is stopped at the end.

The kwok demo (`voxscale demo`) stays for the big-fleet view: GPUs, the slo trigger, eight replicas.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from voxscale.localcluster import realpods
from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import get_json

CLUSTER = "demo-real"
NAMESPACE = "tts-real"
NAME = "cpu-speech"
# (seconds from the start, callers): quiet, a burst that one CPU pod cannot keep up with, a tail.
RAMP = ((0, 1), (20, 6), (90, 2), (170, 0))


@dataclass(frozen=True)
class Sample:
    t: float
    clients: int
    desired: int
    ready: int
    answered: int  # 200s so far


def clients_at(t: float, scale: float) -> int:
    current = 0
    for start, clients in RAMP:
        if t >= start * scale:
            current = clients
    return current


def run(fast: bool = False, plot_path: Path | None = None, keep: bool = False) -> int:
    scale = 0.6 if fast else 1.0
    plot_path = plot_path or Path("out") / "demo-real-pods.png"
    operator_image, inference_image = realpods.image("operator"), realpods.image("inference")
    cluster = LocalCluster(CLUSTER)
    started_here = not cluster.is_up()
    load: realpods.SpeechLoad | None = None
    try:
        st = cluster.up(gpu_nodes=1, real_node=True, timeout=300)
        cluster.load_images([operator_image, inference_image])
        print(f"installing the operator chart with {operator_image} (helm, the chart's RBAC)", flush=True)
        realpods.install_operator(st, operator_image)
        cluster.kubectl("create", "namespace", NAMESPACE, check=False)
        manifest = realpods.real_ttsd(NAME, inference_image, min_replicas=1, max_replicas=3)
        cluster.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=json.dumps(manifest))
        print(
            f"applied TTSDeployment {NAMESPACE}/{NAME}: {inference_image}, 1-3 CPU replicas, "
            f"queue target {realpods.QUEUE_TARGET} waiting per replica"
        )
        realpods.wait_ready(cluster, NAMESPACE, NAME, 1, timeout=300)
        load = realpods.SpeechLoad(realpods.service_url(cluster, NAMESPACE, NAME), clients=1).start()
        samples = _drive(cluster, load, scale)
        answers = load.stop()
        load = None
        _summary(samples, answers)
        _plot(samples, answers, plot_path)
        print(f"\nplot written to {plot_path}")
        return 1 if realpods.failed_accepted(answers) else 0
    except KeyboardInterrupt:
        print("\ninterrupted; stopping everything the demo started", file=sys.stderr)
        return 130
    finally:
        if load is not None:
            load.stop()
        if started_here and not keep:
            cluster.down(quiet=True)
            print("stopped the demo cluster and its real node", file=sys.stderr)


def _drive(cluster: LocalCluster, load: realpods.SpeechLoad, scale: float) -> list[Sample]:
    print(f"{'time':>5} {'callers':>8} {'desired':>8} {'ready':>6} {'answered':>9}  answers by pod", flush=True)
    samples: list[Sample] = []
    t0 = time.monotonic()
    while (now := time.monotonic() - t0) < RAMP[-1][0] * scale:
        clients = clients_at(now, scale)
        if clients != load.clients:
            load.set_clients(clients)
        deployment = get_json(cluster, "deployment", NAME, "-n", NAMESPACE)
        ready = len(realpods.ready_pods(cluster, NAMESPACE, NAME))
        ok = [a for a in list(load.answers) if a.ok]
        samples.append(Sample(now, clients, int(deployment["spec"]["replicas"]), ready, len(ok)))
        by_pod = Counter(a.pod.rsplit("-", 1)[-1] for a in ok)
        print(f"{now:5.0f} {clients:8d} {samples[-1].desired:8d} {ready:6d} {len(ok):9d}  {dict(by_pod)}", flush=True)
        time.sleep(max(0.0, 2.0 - (time.monotonic() - t0 - now)))
    return samples


def _summary(samples: list[Sample], answers: list[realpods.Answer]) -> None:
    ok = [a for a in answers if a.ok]
    latencies = sorted(a.finished - a.started for a in ok)
    p95 = latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan")
    failed = realpods.failed_accepted(answers)
    refused = sum(1 for a in answers if not a.accepted)
    print(f"\nsummary: {len(answers)} requests through the Service, {len(ok)} answered 200 by "
          f"{len({a.pod for a in ok})} real pods; p95 {p95:.2f} s")  # fmt: skip
    print(f"  peak replicas {max(s.desired for s in samples)}, back to {samples[-1].desired} at the end")
    print(f"  accepted requests that failed: {len(failed)}; refused at the door (429/503, retried): {refused}")


def _plot(samples: list[Sample], answers: list[realpods.Answer], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    t = [s.t for s in samples]
    axes[0].step(t, [s.clients for s in samples], where="post", color="black", label="callers")
    axes[0].step(t, [s.desired for s in samples], where="post", label="desired replicas")
    axes[0].step(t, [s.ready for s in samples], where="post", label="ready replicas")
    axes[0].set_ylabel("count")
    axes[0].legend(loc="upper right", fontsize=8)
    ok = sum(1 for a in answers if a.ok)
    failed = realpods.failed_accepted(answers)
    axes[0].set_title(
        f"voxscale demo with real pods, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC\n"
        f"{ok} requests answered by real servers, {len(failed)} accepted and failed"
    )
    pods = sorted({a.pod for a in answers if a.ok})
    for pod in pods:
        mine = [a for a in answers if a.ok and a.pod == pod]
        axes[1].scatter(
            [a.finished for a in mine], [a.finished - a.started for a in mine], s=6, label=f"served by {pod}"
        )
    if failed:
        axes[1].scatter([a.finished for a in failed], [0] * len(failed), marker="x", color="red", label="failed")
    axes[1].set_ylabel("latency (s), one dot per request")
    axes[1].set_xlabel("seconds")
    axes[1].legend(loc="upper right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Replay a trace through autoscalers and the replica queueing model; summarise, compare and plot."""

from __future__ import annotations

import datetime as dt
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from voxscale.simulator.model import CapacityModel, ReplicaQueue
from voxscale.simulator.policies import Autoscaler, HpaKedaModel, Signals, StaticAutoscaler, VoxscaleAutoscaler
from voxscale.simulator.traces import Trace

SERIES_POINTS = 3000  # time-series samples kept per run, for plots


@dataclass
class Summary:
    autoscaler: str
    gpu_hours: float
    cost: float
    saved_vs_static_peak_percent: float | None
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    latency_mean_s: float
    within_slo_percent: float
    requests: float
    rejected: float
    success_percent: float
    scale_events: int
    under_provisioned_s: float
    over_provisioned_s: float


@dataclass
class RunResult:
    summary: Summary
    t: list[float] = field(default_factory=list)
    rps: list[float] = field(default_factory=list)
    desired: list[int] = field(default_factory=list)
    ready: list[int] = field(default_factory=list)
    p95: list[float] = field(default_factory=list)


class Progress:
    """A one-line progress bar on stderr for long traces (silent when not a terminal or disabled)."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total, self.enabled = label, total, enabled and sys.stderr.isatty()
        self.last = 0.0

    def update(self, i: int) -> None:
        if not self.enabled or time.monotonic() - self.last < 0.2:
            return
        self.last = time.monotonic()
        frac = i / self.total
        bar = "#" * int(30 * frac)
        print(f"\r  {self.label:<18} [{bar:<30}] {100 * frac:5.1f}%", end="", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            print(f"\r  {self.label:<18} [{'#' * 30}] 100.0%", file=sys.stderr, flush=True)


def simulate(
    trace: Trace,
    autoscaler: Autoscaler,
    capacity: CapacityModel,
    initial_replicas: int,
    slo_seconds: float = 2.0,
    price_per_gpu_hour: float = 2.5,
    min_replicas: int = 1,
    stochastic: bool = False,
    seed: int = 0,
    progress: bool = False,
) -> RunResult:
    dt_s = trace.step_seconds
    queue = ReplicaQueue(capacity, stochastic=stochastic, seed=seed)
    ready_at: list[float] = [0.0] * initial_replicas
    replicas = initial_replicas
    gpu_seconds = under = over = 0.0
    events = 0
    next_eval = 0.0
    every = max(1, len(trace.rps) // SERIES_POINTS)
    result = RunResult(summary=None)  # type: ignore[arg-type]
    bar = Progress(autoscaler.name, len(trace.rps), progress)
    last_p95 = 0.0
    start_ts = trace.start.timestamp()
    ready = initial_replicas
    next_ready = math.inf  # when the next starting pod turns Ready
    for i, rps in enumerate(trace.rps.tolist()):
        now = i * dt_s
        if now >= next_ready:
            ready = sum(1 for t in ready_at if t <= now)
            next_ready = min((t for t in ready_at if t > now), default=math.inf)
        stats = queue.step(now, dt_s, rps, ready)
        gpu_seconds += replicas * capacity.gpus_per_replica * dt_s
        ready_capacity = ready * capacity.rps_per_replica
        if rps > ready_capacity:
            under += dt_s
        elif ready_capacity > 2 * rps and replicas > min_replicas:
            over += dt_s
        if now >= next_eval:
            p95 = queue.p95_recent(now)
            last_p95 = p95 if p95 is not None else 0.0
            gpu = min(100.0, 100 * stats.busy_slots / (ready * capacity.slots)) if ready else None
            wall = dt.datetime.fromtimestamp(start_ts + now, dt.UTC)
            want = autoscaler.desired(wall, replicas, ready, Signals(gpu, stats.queue, p95))
            if want != replicas:
                if want > replicas:
                    ready_at += [now + capacity.cold_start_seconds] * (want - replicas)
                else:
                    ready_at = sorted(ready_at)[:want]  # the newest (possibly still starting) pods go first
                ready = sum(1 for t in ready_at if t <= now)
                next_ready = min((t for t in ready_at if t > now), default=math.inf)
            events += want != replicas
            replicas = want
            next_eval += autoscaler.interval_seconds
        if i % every == 0:
            result.t.append(now)
            result.rps.append(float(rps))
            result.desired.append(replicas)
            result.ready.append(ready)
            result.p95.append(last_p95)
            bar.update(i)
    bar.done()
    total = queue.served + queue.rejected + queue.queued + queue.in_service
    gpu_hours = gpu_seconds / 3600
    result.summary = Summary(
        autoscaler=autoscaler.name,
        gpu_hours=gpu_hours,
        cost=gpu_hours * price_per_gpu_hour,
        saved_vs_static_peak_percent=None,
        latency_p50_s=queue.percentile(0.50),
        latency_p95_s=queue.percentile(0.95),
        latency_p99_s=queue.percentile(0.99),
        latency_mean_s=(queue.wait_sum / queue.served + capacity.service_seconds) if queue.served else 0.0,
        within_slo_percent=100 * queue.fraction_within(slo_seconds) * (queue.served / total if total else 1.0),
        requests=total,
        rejected=queue.rejected,
        success_percent=100 * queue.served / total if total else 100.0,
        scale_events=events,
        under_provisioned_s=under,
        over_provisioned_s=over,
    )
    return result


@dataclass
class Comparison:
    trace: Trace
    capacity: CapacityModel
    slo_seconds: float
    price_per_gpu_hour: float
    runs: list[RunResult]
    sim_seconds: float  # wall-clock time the simulation took

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace": {
                "name": self.trace.name,
                "description": self.trace.description,
                "hours": self.trace.seconds / 3600,
                "step_seconds": self.trace.step_seconds,
                "mean_rps": float(np.mean(self.trace.rps)),
                "peak_rps": float(np.max(self.trace.rps)),
            },
            "capacity": asdict(self.capacity),
            "slo_seconds": self.slo_seconds,
            "price_per_gpu_hour": self.price_per_gpu_hour,
            "simulation_wall_seconds": self.sim_seconds,
            "results": [asdict(r.summary) for r in self.runs],
        }


def compare(
    trace: Trace,
    policy_engine: VoxscaleAutoscaler,
    capacity: CapacityModel,
    slo_seconds: float = 2.0,
    price_per_gpu_hour: float = 2.5,
    stochastic: bool = False,
    progress: bool = False,
) -> Comparison:
    """voxscale against static-for-peak, static-for-average and the KEDA+HPA model, on one trace."""
    pol = policy_engine.policy
    per = capacity.rps_per_replica
    peak = max(1, math.ceil(float(np.max(trace.rps)) / (0.8 * per)))
    avg = max(1, math.ceil(float(np.mean(trace.rps)) / per))
    hpa_target = next((t.target or t.scale_up_above for t in pol.triggers if t.type.value == "gpuUtilization"), 60.0)
    contenders: list[tuple[Autoscaler, int]] = [
        (policy_engine, pol.min_replicas),
        (StaticAutoscaler(peak, name=f"static peak ({peak})"), peak),
        (StaticAutoscaler(avg, name=f"static average ({avg})"), avg),
        (HpaKedaModel(float(hpa_target or 60.0), pol.min_replicas, pol.max_replicas), pol.min_replicas),
    ]
    started = time.perf_counter()
    runs = [
        simulate(
            trace, a, capacity, n, slo_seconds, price_per_gpu_hour, pol.min_replicas, stochastic, progress=progress
        )
        for a, n in contenders
    ]
    elapsed = time.perf_counter() - started
    static_peak_cost = runs[1].summary.cost
    for r in runs:
        r.summary.saved_vs_static_peak_percent = 100 * (1 - r.summary.cost / static_peak_cost)
    return Comparison(trace, capacity, slo_seconds, price_per_gpu_hour, runs, elapsed)


def format_table(c: Comparison) -> str:
    head = (
        f"{c.trace.description}\n{c.trace.seconds / 3600:.1f} h at {c.trace.step_seconds:g} s steps, "
        f"mean {np.mean(c.trace.rps):.1f} rps, peak {np.max(c.trace.rps):.1f} rps; one replica: "
        f"{c.capacity.rps_per_replica:.0f} rps, {c.capacity.cold_start_seconds:.0f} s cold start; "
        f"SLO {c.slo_seconds:g} s; ${c.price_per_gpu_hour:g}/GPU-hour"
    )
    cols = [
        "autoscaler",
        "GPU-h",
        "cost $",
        "saved",
        "p50 s",
        "p95 s",
        "p99 s",
        "mean s",
        "in SLO",
        "rejected",
        "events",
        "under",
        "over",
    ]
    rows = []
    for r in c.runs:
        s = r.summary
        rows.append(
            [
                s.autoscaler,
                f"{s.gpu_hours:.1f}",
                f"{s.cost:.0f}",
                f"{s.saved_vs_static_peak_percent or 0:.0f}%",
                f"{s.latency_p50_s:.2f}",
                f"{s.latency_p95_s:.2f}",
                f"{s.latency_p99_s:.2f}",
                f"{s.latency_mean_s:.2f}",
                f"{s.within_slo_percent:.1f}%",
                f"{s.rejected:.0f}",
                str(s.scale_events),
                f"{s.under_provisioned_s / 60:.0f}m",
                f"{s.over_provisioned_s / 60:.0f}m",
            ]
        )
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows, strict=False)]
    lines = [
        "  ".join(str(x).rjust(w) if j else str(x).ljust(w) for j, (x, w) in enumerate(zip(row, widths, strict=True)))
        for row in [cols, *rows]
    ]
    foot = (
        "under: time the load exceeded the ready capacity; over: time the ready capacity was more than "
        "twice the load (above min). keda+hpa is a model of their documented algorithms."
    )
    return "\n".join([head, "", *lines, "", foot, f"simulated in {c.sim_seconds:.1f} s"])


def plot(c: Comparison, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
    first = c.runs[0]
    hours = np.asarray(first.t) / 3600
    axes[0].plot(hours, first.rps, color="black", lw=0.8)
    axes[0].set_ylabel("load (requests/s)")
    axes[0].set_title(c.trace.description)
    for r in c.runs:
        axes[1].step(hours, r.ready, where="post", lw=1.2, label=f"{r.summary.autoscaler} ready")
        axes[2].plot(hours, r.p95, lw=1.0, label=r.summary.autoscaler)
    axes[1].step(hours, first.desired, where="post", lw=0.8, ls="--", color="gray", label="voxscale desired")
    axes[1].set_ylabel("replicas")
    axes[1].legend(fontsize=8, loc="upper left")
    axes[2].axhline(c.slo_seconds, color="red", lw=0.8, ls=":", label=f"SLO {c.slo_seconds:g} s")
    axes[2].set_yscale("log")
    axes[2].set_ylabel("p95 latency (s)")
    axes[2].set_xlabel("hours")
    axes[2].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

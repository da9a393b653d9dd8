"""Replay a trace through autoscalers and the replica queueing model; summarise, compare and plot."""

from __future__ import annotations

import datetime as dt
import math
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from voxscale.operator.policy import ScalingPolicy
from voxscale.operator.reversals import REVERSAL_TOLERANCE, REVERSAL_WINDOW_S, Move, count_reversals, reversed_pairs
from voxscale.simulator.baselines import KedaHpaModel, OracleAutoscaler, StaticAutoscaler, schedule_floors
from voxscale.simulator.kpa import KpaModel
from voxscale.simulator.model import CapacityModel, Fleet, ReplicaQueue, StepStats
from voxscale.simulator.policies import Autoscaler, Signals, VoxscaleAutoscaler
from voxscale.simulator.traces import Trace

SERIES_POINTS = 3000  # time-series samples kept per run, for plots
# Input characters of a request of the capacity model's mix (cost 1). The simulator's premise: a
# request's service time follows the length of its text, so a mix `cost` times as long carries
# `cost` times the characters (a request log's size column gives the cost the same way).
CHARACTERS_PER_REQUEST = 200.0
CAPACITY_MIN_BUSY = 0.6  # share of busy slots over the window above which a measured capacity is reported
# Reversals (a scale event undoing the one before it within a window while the load changed less than
# a share) are counted with operator/reversals.py: the operator's status and metrics use the same.


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
    # From the second day on (traces longer than a day): the first day includes warm-up and, for
    # voxscale's forecast, the day it learns from.
    within_slo_after_day1_percent: float | None = None
    gpu_hours_after_day1: float | None = None
    # This run's GPU-hours over the KEDA+HPA model's and over the oracle's (set by compare()).
    gpu_hours_vs_keda: float | None = None
    gpu_hours_vs_oracle: float | None = None
    # Moves undone within REVERSAL_WINDOW_S while the load changed less than REVERSAL_TOLERANCE.
    reversals: int = 0
    reversals_per_day: float = 0.0
    reversal_rules: dict[str, int] = field(default_factory=dict)  # rule -> moves of it that were undone


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


class Window:
    """A running sum over the last `size` steps, O(1) per step (simulate() keeps its own as prefix sums)."""

    def __init__(self, size: int) -> None:
        self.values = [0.0] * max(1, size)
        self.total = 0.0
        self.count = 0

    def push(self, value: float) -> None:
        i = self.count % len(self.values)
        self.total += value - self.values[i]
        self.values[i] = value
        self.count += 1

    @property
    def filled(self) -> int:
        return min(self.count, len(self.values))


def draw_arrivals(trace: Trace, stochastic: bool, seed: int) -> np.ndarray:
    """Requests arriving at each step: Poisson draws for the whole trace at once (stochastic), or the
    fluid rate x step."""
    expected = trace.rps * trace.step_seconds
    if not stochastic:
        return expected
    result: np.ndarray = np.random.default_rng((seed, 1)).poisson(expected).astype(float)
    return result


@dataclass
class _Day1:
    """What had happened by the end of the first day, so later days can be reported on their own."""

    gpu_seconds: float
    arrivals: float
    served_within: float


@dataclass
class _Rates:
    """Running sums over the rate window (and its last quarter) as prefix sums: arrivals are known
    for the whole trace up front; busy and available slots are appended as the steps run. O(1) a
    step, and the window is read only when an autoscaler evaluates."""

    width: int
    arrivals: np.ndarray  # prefix sums of arrivals, one more entry than steps
    characters: np.ndarray  # prefix sums of their input characters (CHARACTERS_PER_REQUEST x the mix's cost)
    busy: list[float] = field(default_factory=lambda: [0.0])
    slots: list[float] = field(default_factory=lambda: [0.0])

    def push(self, busy: float, slots: float) -> None:
        self.busy.append(self.busy[-1] + busy)
        self.slots.append(self.slots[-1] + slots)

    def arrival_rps(self, i: int, width: int, dt_s: float) -> float:
        """Mean arrival rate over the `width` steps up to step i (fewer at the start)."""
        lo = max(0, i + 1 - width)
        return float(self.arrivals[i + 1] - self.arrivals[lo]) / ((i + 1 - lo) * dt_s)

    def character_rate(self, i: int, width: int, dt_s: float) -> float:
        """Mean input characters per second arriving over the `width` steps up to step i."""
        lo = max(0, i + 1 - width)
        return float(self.characters[i + 1] - self.characters[lo]) / ((i + 1 - lo) * dt_s)

    def loaded(self) -> bool:
        """Busy enough over the window (>= CAPACITY_MIN_BUSY of the slots) for a measured capacity."""
        n = len(self.busy) - 1
        lo = max(0, n - self.width)
        slots = self.slots[n] - self.slots[lo]
        return slots > 0 and (self.busy[n] - self.busy[lo]) / slots >= CAPACITY_MIN_BUSY


def _signals(
    i: int,
    stats: StepStats,
    ready: int,
    rates: _Rates,
    queue: ReplicaQueue,
    capacity: CapacityModel,
    p95: float | None,
    metrics_up: bool,
    dt_s: float,
) -> Signals:
    """What Prometheus would answer now. arrival_rps counts refused requests too (the server counts
    at the door); capacity_rps (what the pods measure: slots over this mix's service time) is
    reported only when the fleet was busy enough (>= 60 % of its slots over the window) for a
    measured capacity to mean something."""
    return Signals(
        gpu_percent=min(100.0, 100 * stats.busy_slots / (ready * capacity.slots)) if ready else None,
        queue=stats.queue,
        p95_seconds=p95,
        arrival_rps=rates.arrival_rps(i, rates.width, dt_s) if ready else None,
        arrival_recent_rps=rates.arrival_rps(i, max(1, rates.width // 4), dt_s) if ready else None,
        capacity_rps=capacity.slots / queue.service_seconds if rates.loaded() else None,
        arrival_chars_rps=rates.character_rate(i, rates.width, dt_s) if ready else None,
        metrics_up=metrics_up,
        pod_start_seconds=capacity.cold_start_seconds,
    )


def _costs(trace: Trace) -> list[float] | None:
    """The request mix per step (service time over the capacity model's), None for a plain trace."""
    return None if trace.cost is None else trace.cost.tolist()


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
    rate_window_seconds: float = 60.0,
) -> RunResult:
    """Step the trace through `autoscaler` and the replica model; keep a thinned time series of the
    load, the replicas asked for and Ready, and p95 latency, and summarise the run (scale events and
    their reversals included). p95 is computed only where it is read: at the autoscaler's ticks when
    it reads latency (`reads_latency`, True unless it says otherwise) and at the plotted points."""
    dt_s = trace.step_seconds
    queue = ReplicaQueue(capacity, stochastic=stochastic, seed=seed)
    fleet = Fleet(initial_replicas, capacity.cold_start_seconds)
    arrivals = draw_arrivals(trace, stochastic, seed)
    costs = _costs(trace)
    chars = arrivals * CHARACTERS_PER_REQUEST * (trace.cost if trace.cost is not None else 1.0)
    rates = _Rates(
        max(1, round(rate_window_seconds / dt_s)),
        np.concatenate([[0.0], np.cumsum(arrivals)]),
        np.concatenate([[0.0], np.cumsum(chars)]),
    )
    ups = trace.metrics_up.tolist() if trace.metrics_up is not None else None
    reads_latency = bool(getattr(autoscaler, "reads_latency", True))
    day_steps = round(86400 / dt_s) if len(trace.rps) > round(86400 / dt_s) else -1
    day1: _Day1 | None = None
    gpu_seconds = under = over = 0.0
    moves: list[Move] = []
    next_eval = 0.0
    every = max(1, len(trace.rps) // SERIES_POINTS)
    result = RunResult(summary=None)  # type: ignore[arg-type]
    bar = Progress(autoscaler.name, len(trace.rps), progress)
    start_ts = trace.start.timestamp()
    per_replica, slots_per, gpus = capacity.rps_per_replica, capacity.slots, capacity.gpus_per_replica
    cost = 1.0
    for i, (rps, arrived) in enumerate(zip(trace.rps.tolist(), arrivals.tolist(), strict=True)):
        now = i * dt_s
        if i == day_steps:
            day1 = _Day1(gpu_seconds, float(arrivals[:i].sum()), queue.served_within(slo_seconds))
        if costs is not None and costs[i] != cost:
            cost = costs[i]
            queue.set_cost(cost)
        ready = fleet.tick(now)
        stats = queue.step(now, dt_s, rps, ready, arrived)
        rates.push(stats.busy_slots, ready * slots_per)
        gpu_seconds += fleet.replicas * gpus * dt_s
        ready_capacity = ready * per_replica / cost
        if rps > ready_capacity:
            under += dt_s
        elif ready_capacity > 2 * rps and fleet.replicas > min_replicas:
            over += dt_s
        if now >= next_eval:
            p95 = queue.p95_recent(now) if reads_latency else None
            up = ups[i] if ups is not None else True
            signals = _signals(i, stats, ready, rates, queue, capacity, p95, up, dt_s)
            wall = dt.datetime.fromtimestamp(start_ts + now, dt.UTC)
            want = autoscaler.desired(wall, fleet.replicas, ready, signals)
            if want != fleet.replicas:
                rule = getattr(getattr(autoscaler, "last", None), "rule", "")  # voxscale's decisions name one
                moves.append(Move(now, want > fleet.replicas, rates.arrival_rps(i, rates.width, dt_s), rule))
                fleet.scale(now, want)
            next_eval += autoscaler.interval_seconds
        if i % every == 0:
            result.t.append(now)
            result.rps.append(float(rps))
            result.desired.append(fleet.replicas)
            result.ready.append(fleet.ready)
            result.p95.append(queue.p95_recent(now) or 0.0)
            bar.update(i)
    bar.done()
    result.summary = _summary(autoscaler.name, queue, gpu_seconds, moves, under, over, day1, slo_seconds)
    result.summary.cost = result.summary.gpu_hours * price_per_gpu_hour
    days = trace.seconds / 86400
    result.summary.reversals_per_day = result.summary.reversals / days if days else 0.0
    return result


def _summary(
    name: str,
    queue: ReplicaQueue,
    gpu_seconds: float,
    moves: list[Move],
    under: float,
    over: float,
    day1: _Day1 | None,
    slo_seconds: float,
) -> Summary:
    # Every arrival: a request is `served` (with its latency) when it starts service, so the ones still
    # in service are already counted there; the ones still queued at the end count as not within.
    total = queue.served + queue.rejected + queue.queued
    within = queue.served_within(slo_seconds)
    after_day1_within: float | None = None
    after_day1_gpu: float | None = None
    if day1 is not None:
        later = total - day1.arrivals
        after_day1_within = 100 * (within - day1.served_within) / later if later else 100.0
        after_day1_gpu = (gpu_seconds - day1.gpu_seconds) / 3600
    return Summary(
        autoscaler=name,
        gpu_hours=gpu_seconds / 3600,
        cost=0.0,
        saved_vs_static_peak_percent=None,
        latency_p50_s=queue.percentile(0.50),
        latency_p95_s=queue.percentile(0.95),
        latency_p99_s=queue.percentile(0.99),
        latency_mean_s=(queue.wait_sum + queue.service_sum) / queue.served if queue.served else 0.0,
        within_slo_percent=100 * within / total if total else 100.0,
        requests=total,
        rejected=queue.rejected,
        success_percent=100 * queue.served / total if total else 100.0,
        scale_events=len(moves),
        under_provisioned_s=under,
        over_provisioned_s=over,
        within_slo_after_day1_percent=after_day1_within,
        gpu_hours_after_day1=after_day1_gpu,
        reversals=count_reversals(moves),
        reversal_rules=fighting_rules(moves),
    )


def fighting_rules(moves: list[Move]) -> dict[str, int]:
    """The rules whose moves were undone, with how often (most first): who fights, as the operator's
    Flapping condition names them. Empty for autoscalers that name no rule (the baselines)."""
    counts = Counter(m.rule for pair in reversed_pairs(moves) for m in pair if m.rule)
    return dict(counts.most_common())


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
                "start": self.trace.start.isoformat(),
                "mean_rps": float(np.mean(self.trace.rps)),
                "peak_rps": float(np.max(self.trace.rps)),
                "metrics_outage_seconds": self.trace.step_seconds * float(np.sum(~self.trace.metrics_up))
                if self.trace.metrics_up is not None
                else 0.0,
            },
            "capacity": asdict(self.capacity),
            "slo_seconds": self.slo_seconds,
            "price_per_gpu_hour": self.price_per_gpu_hour,
            "simulation_wall_seconds": self.sim_seconds,
            "results": [asdict(r.summary) for r in self.runs],
        }


def rate_window(policy: ScalingPolicy) -> float:
    """The window arrivals are averaged over: the slo trigger's rateWindow (the CRD's default without
    one), the same for every contender - they all read the same Prometheus."""
    slo = policy.slo or ScalingPolicy.from_spec({"model": {"image": "-"}}).slo  # a bare spec gets one
    assert slo is not None
    return slo.rate_window.total_seconds()


def contenders(
    trace: Trace, engine: VoxscaleAutoscaler, capacity: CapacityModel, slo_seconds: float
) -> list[tuple[Autoscaler, int]]:
    """voxscale, a static fleet for the peak, the KEDA + HPA model given every signal in the manifest,
    the clairvoyant oracle and the Knative KPA model (in that order: ROLES); each with the replicas
    it starts from."""
    pol = engine.policy
    peak = max(1, math.ceil(float(np.max(trace.work)) / (0.8 * capacity.rps_per_replica)))
    floors = schedule_floors(trace, pol)
    oracle = OracleAutoscaler.for_trace(trace, capacity, slo_seconds, pol.min_replicas, pol.max_replicas, floors)
    kpa = KpaModel(pol, capacity, floors, trace.start.timestamp(), trace.step_seconds)
    return [
        (engine, pol.min_replicas),
        (StaticAutoscaler(peak, name=f"static peak ({peak})"), peak),
        (KedaHpaModel(pol), pol.min_replicas),
        (oracle, int(oracle.plan[0])),
        (kpa, pol.min_replicas),
    ]


ROLES = ("voxscale", "static_peak", "keda", "oracle", "kpa")  # contenders() order


def compare(
    trace: Trace,
    policy_engine: VoxscaleAutoscaler,
    capacity: CapacityModel,
    slo_seconds: float = 2.0,
    price_per_gpu_hour: float = 2.5,
    stochastic: bool = False,
    progress: bool = False,
    seed: int = 0,
) -> Comparison:
    """Every contender on one trace (the same arrivals for all, given the seed), priced against the
    static fleet for the peak and set against the KEDA model and the oracle."""
    min_replicas = policy_engine.policy.min_replicas
    window = rate_window(policy_engine.policy)
    started = time.perf_counter()
    runs = [
        simulate(
            trace, a, capacity, n, slo_seconds, price_per_gpu_hour, min_replicas, stochastic, seed, progress, window
        )
        for a, n in contenders(trace, policy_engine, capacity, slo_seconds)
    ]
    elapsed = time.perf_counter() - started
    _relate(runs)
    return Comparison(trace, capacity, slo_seconds, price_per_gpu_hour, runs, elapsed)


def _relate(runs: list[RunResult]) -> None:
    """Savings against the static peak fleet (runs[1]); GPU-hour ratios to the KEDA model (runs[2])
    and the oracle (runs[3])."""
    static, keda, oracle = (runs[k].summary for k in (1, 2, 3))
    for r in runs:
        s = r.summary
        s.saved_vs_static_peak_percent = 100 * (1 - s.cost / static.cost) if static.cost else None
        s.gpu_hours_vs_keda = s.gpu_hours / keda.gpu_hours if keda.gpu_hours else None
        s.gpu_hours_vs_oracle = s.gpu_hours / oracle.gpu_hours if oracle.gpu_hours else None


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _row(s: Summary, multi_day: bool) -> list[str]:
    row = [
        s.autoscaler,
        f"{s.gpu_hours:.1f}",
        f"{s.cost:.0f}",
        f"{s.saved_vs_static_peak_percent or 0:.0f}%",
        _ratio(s.gpu_hours_vs_keda),
        _ratio(s.gpu_hours_vs_oracle),
        f"{s.latency_p50_s:.2f}",
        f"{s.latency_p95_s:.2f}",
        f"{s.latency_p99_s:.2f}",
        f"{s.latency_mean_s:.2f}",
        f"{s.within_slo_percent:.1f}%",
        f"{s.rejected:.0f}",
        str(s.scale_events),
        f"{s.reversals} ({s.reversals_per_day:.1f}/d)",
        f"{s.under_provisioned_s / 60:.0f}m",
        f"{s.over_provisioned_s / 60:.0f}m",
    ]
    if multi_day:
        row += [f"{s.gpu_hours_after_day1 or 0:.1f}", f"{s.within_slo_after_day1_percent or 0:.1f}%"]
    return row


def format_table(c: Comparison) -> str:
    head = (
        f"{c.trace.description}\n{c.trace.seconds / 3600:.1f} h at {c.trace.step_seconds:g} s steps, "
        f"mean {np.mean(c.trace.rps):.1f} rps, peak {np.max(c.trace.rps):.1f} rps; one replica: "
        f"{c.capacity.rps_per_replica:.0f} rps, {c.capacity.cold_start_seconds:.0f} s cold start; "
        f"SLO {c.slo_seconds:g} s; ${c.price_per_gpu_hour:g}/GPU-hour"
    )
    multi_day = c.runs[0].summary.gpu_hours_after_day1 is not None
    cols = ["autoscaler", "GPU-h", "cost $", "saved", "vs keda", "vs oracle", "p50 s", "p95 s", "p99 s", "mean s"]
    cols += ["in SLO", "rejected", "events", "reversals", "under", "over"] + (
        ["GPU-h d2+", "in SLO d2+"] if multi_day else []
    )
    rows = [_row(r.summary, multi_day) for r in c.runs]
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows, strict=True)]
    lines = [
        "  ".join(str(x).rjust(w) if j else str(x).ljust(w) for j, (x, w) in enumerate(zip(row, widths, strict=True)))
        for row in [cols, *rows]
    ]
    foot = (
        "under: time the load exceeded the ready capacity; over: time the ready capacity was more than "
        "twice the load (above min). reversals: moves undone within "
        f"{REVERSAL_WINDOW_S / 60:.0f} min while the load changed < {REVERSAL_TOLERANCE:.0%} (per simulated "
        "day). vs keda / vs oracle: GPU-hours over theirs. keda+hpa is a model of "
        "their documented algorithms given every trigger and schedule of the manifest; the oracle knows "
        "the load ahead and sizes exactly to the SLO within the manifest's min and schedule floors (a lower "
        "bound on GPU-hours); kpa is a model of Knative's KPA with its defaults."
        + (" d2+: from the second day on." if multi_day else "")
    )
    fights = [
        f"{r.summary.autoscaler}'s reversals came from rules that fight: "
        + ", ".join(f"{rule} {n}" for rule, n in r.summary.reversal_rules.items())
        for r in c.runs
        if r.summary.reversal_rules
    ]
    return "\n".join([head, "", *lines, "", *fights, foot, f"simulated in {c.sim_seconds:.1f} s"])


def outages(trace: Trace) -> list[tuple[float, float]]:
    """(start, end) seconds of each metrics outage of the trace."""
    if trace.metrics_up is None:
        return []
    edges = np.diff(np.concatenate([[1], trace.metrics_up.astype(np.int8), [1]]))
    starts, ends = np.flatnonzero(edges == -1), np.flatnonzero(edges == 1)
    return [(float(a) * trace.step_seconds, float(b) * trace.step_seconds) for a, b in zip(starts, ends, strict=True)]


def plot(c: Comparison, path: str) -> None:
    """Load, every contender's Ready replicas and p95 latency over time; metrics outages shaded."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
    first = c.runs[0]
    hours = np.asarray(first.t) / 3600
    axes[0].plot(hours, first.rps, color="black", lw=0.8)
    axes[0].set_ylabel("load (requests/s)")
    axes[0].set_title("\n".join(textwrap.wrap(c.trace.description, 120)), fontsize=9)
    for k, (lo, hi) in enumerate(outages(c.trace)):
        for ax in axes:
            label = None if k else "metrics outage"
            ax.axvspan(lo / 3600, hi / 3600, color="orange", alpha=0.25, lw=0, label=label)
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

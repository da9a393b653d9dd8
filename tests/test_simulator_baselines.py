"""The simulator's baselines on plain data: the KEDA + HPA model's formulas and behavior, the oracle's
sizing, the signals the simulator hands every autoscaler, and the multi-day scenarios."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from tests.engine_helpers import policy
from voxscale.operator.policy import ScalingPolicy
from voxscale.operator.queueing import replicas_for_slo
from voxscale.simulator import traces
from voxscale.simulator.baselines import (
    KedaHpaModel,
    OracleAutoscaler,
    StaticAutoscaler,
    TargetType,
    forward_max,
    hpa_replicas,
    keda_metrics,
    schedule_floors,
    slo_sizing,
)
from voxscale.simulator.cli import load_manifest
from voxscale.simulator.model import CapacityModel
from voxscale.simulator.policies import Signals
from voxscale.simulator.run import simulate

REPO = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2026, 1, 5, 12, 0, tzinfo=dt.UTC)
GPU = {"name": "gpu", "type": "gpuUtilization", "target": 60}
QUEUE = {"name": "queue", "type": "queueLength", "target": 4}
P95 = {"name": "p95", "type": "latencyP95", "scaleUpAbove": 2.0}


def sig(gpu: float | None = 0.0, queue: float = 0.0, p95: float | None = None, up: bool = True) -> Signals:
    return Signals(gpu, queue, p95, metrics_up=up)


def keda(triggers: list[dict[str, object]], lo: int = 1, hi: int = 40, **scaling: object) -> KedaHpaModel:
    return KedaHpaModel(policy({"triggers": triggers, **scaling}, {"min": lo, "max": hi}))


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


# --- the HPA formulas ------------------------------------------------------------------------------


def test_average_value_sizes_from_the_total_and_ignores_ratios_within_tolerance() -> None:
    avg = TargetType.AVERAGE_VALUE
    assert hpa_replicas(avg, 630.0, 60.0, current=10, tolerance=0.1) == 10  # ratio 1.05: within 10 %
    assert hpa_replicas(avg, 720.0, 60.0, current=10, tolerance=0.1) == 12  # ratio 1.2: ceil(720 / 60)
    assert hpa_replicas(avg, 100.0, 60.0, current=10, tolerance=0.1) == 2  # ratio 0.17: down to ceil(100 / 60)
    assert hpa_replicas(avg, 7.0, 4.0, current=0, tolerance=0.1) == 2  # from zero: no tolerance


def test_value_target_scales_the_current_count_by_the_ratio() -> None:
    val = TargetType.VALUE
    assert hpa_replicas(val, 3.0, 2.0, current=4, tolerance=0.1) == 6  # ceil(4 * 1.5)
    assert hpa_replicas(val, 2.1, 2.0, current=4, tolerance=0.1) == 4  # ratio 1.05: within tolerance
    assert hpa_replicas(val, 0.0, 2.0, current=4, tolerance=0.1) == 0


def test_each_trigger_becomes_one_metric_at_its_target_or_threshold() -> None:
    metrics = keda_metrics(policy({"triggers": [GPU, QUEUE, P95]}))
    assert [(m.name, m.target_type, m.threshold) for m in metrics] == [
        ("gpu", TargetType.AVERAGE_VALUE, 60.0),
        ("queue", TargetType.AVERAGE_VALUE, 4.0),
        ("p95", TargetType.VALUE, 2.0),
    ]


def test_slo_trigger_becomes_request_rate_at_80_percent_of_capacity_and_p95() -> None:
    pol = ScalingPolicy.from_spec(load_manifest(REPO / "examples" / "minimal.yaml")["spec"])
    slo = next(t for t in pol.triggers if t.type.value == "slo")
    capacity, latency = getattr(slo, "capacity_rps"), getattr(slo, "latency_seconds")  # noqa: B009
    rate, p95 = keda_metrics(pol)
    assert rate.target_type is TargetType.AVERAGE_VALUE and rate.threshold == pytest.approx(0.8 * capacity)
    assert (p95.target_type, p95.threshold) == (TargetType.VALUE, latency)
    model = KedaHpaModel(pol)
    demand = Signals(None, 0.0, None, arrival_rps=10 * 0.8 * capacity)
    assert model.recommend(T0, 2, 2, demand) == min(10, pol.max_replicas)


def test_the_highest_metric_wins_then_bounds_apply() -> None:
    model = keda([GPU, QUEUE], hi=12)
    # GPU: ceil(90 % x 4 ready / 60) = 6; queue: ceil(40 / 4) = 10.
    assert model.recommend(T0, 4, 4, sig(gpu=90.0, queue=40.0)) == 10
    assert model.recommend(T0, 4, 4, sig(gpu=90.0, queue=80.0)) == 12  # 20, capped at max


def test_gpu_and_p95_read_zero_with_no_ready_pod() -> None:
    model = keda([GPU, P95], lo=2)
    assert model.recommend(T0, 6, 0, sig(gpu=None, p95=None)) == 2


# --- behavior --------------------------------------------------------------------------------------


def test_scale_up_is_limited_to_4_pods_or_100_percent_per_15_s() -> None:
    model = keda([QUEUE])
    busy = sig(queue=160.0)  # wants 40
    counts, n = [], 2
    for k in range(4):
        n = model.desired(at(15 * k), n, n, busy)
        counts.append(n)
    assert counts == [6, 12, 24, 40]


def test_scale_up_limit_counts_the_changes_of_the_last_period() -> None:
    model = keda([QUEUE])
    model.interval_seconds = 5.0
    assert model.desired(at(0), 2, 2, sig(queue=160.0)) == 6
    assert model.desired(at(5), 6, 2, sig(queue=160.0)) == 6  # the period started at 2: 2 + 4 already used
    assert model.desired(at(15), 6, 2, sig(queue=160.0)) == 12


def test_scale_down_waits_for_the_highest_recommendation_of_300_s() -> None:
    model = keda([QUEUE])
    assert model.desired(at(0), 10, 10, sig(queue=40.0)) == 10
    quiet = sig(queue=4.0)  # wants 1
    for k in range(1, 20):  # up to 285 s: the 10 of t = 0 is still in the window
        assert model.desired(at(15 * k), 10, 10, quiet) == 10
    assert model.desired(at(300), 10, 10, quiet) == 1  # 100 % per 15 s: straight to the recommendation


def test_cron_is_a_metric_under_tolerance_and_behavior_not_a_floor() -> None:
    sched = {"name": "morning", "cron": "0 8 * * *", "duration": "1h", "minReplicas": 10, "prewarm": "10m"}
    model = keda([QUEUE], lo=2, schedules=[sched])
    before, opened = dt.datetime(2026, 1, 5, 7, 49, tzinfo=dt.UTC), dt.datetime(2026, 1, 5, 7, 50, tzinfo=dt.UTC)
    assert model.desired(before, 2, 2, sig()) == 2
    assert model.desired(opened, 2, 2, sig()) == 6  # the window opens at the pre-warm, but +4 per 15 s
    assert model.desired(opened + dt.timedelta(seconds=15), 6, 6, sig()) == 10
    # At 11 the cron metric reads 10/11, within the tolerance: the HPA keeps 11 (a floor would not care).
    assert keda([QUEUE], schedules=[sched]).recommend(opened, 11, 11, sig(queue=0.0)) == 11


def test_an_unreachable_prometheus_holds_the_hpa_as_its_metric_errors_do() -> None:
    """KEDA's Prometheus scaler errors when Prometheus cannot be reached (only an empty result reads 0
    with ignoreNullValues); the HPA then keeps the current count rather than scale down on the cron
    metric alone. The old model read the outage as zero load and scaled an overloaded fleet to 3."""
    sched = {"name": "day", "cron": "0 6 * * *", "duration": "12h", "minReplicas": 3}
    model = keda([GPU, QUEUE], schedules=[sched])
    noon = dt.datetime(2026, 1, 5, 12, 0, tzinfo=dt.UTC)
    assert model.desired(noon, 8, 8, sig(gpu=60.0, queue=32.0)) == 8
    blind = sig(gpu=95.0, queue=400.0, up=False)  # the truth is overload; the queries fail
    assert model.recommend(noon, 8, 8, blind) is None  # invalid metrics and a scale-down: the HPA holds
    n = 8
    for k in range(1, 21):
        n = model.desired(noon + dt.timedelta(seconds=15 * k), n, n, blind)
    assert n == 8
    # The cron scaler is still valid and may scale up through the outage.
    assert model.desired(noon, 2, 2, blind) == 3


def test_an_empty_result_still_reads_zero_under_ignore_null_values() -> None:
    model = keda([GPU])
    noon = dt.datetime(2026, 1, 5, 12, 0, tzinfo=dt.UTC)
    assert model.recommend(noon, 8, 8, sig(gpu=None)) == model.policy.min_replicas  # no data: read as 0


# --- the oracle -------------------------------------------------------------------------------------


def test_slo_sizing_is_never_below_replicas_for_slo_and_at_most_one_above() -> None:
    rng = np.random.default_rng(1)
    rates = np.concatenate([[0.0, 1e-3, 16.0, 32.0], rng.uniform(0, 400, 300)])
    got = slo_sizing(rates, 16.0, 8, 2.0)
    want = np.array([replicas_for_slo(float(r), 16.0, 8, 2.0) for r in rates])
    assert np.all(got >= want) and np.all(got <= want + 1)
    assert np.mean(got == want) > 0.98


def test_forward_max_looks_ahead_and_shortens_at_the_end() -> None:
    assert forward_max(np.array([1, 0, 0, 5, 0, 2]), 2).tolist() == [1, 5, 5, 5, 2, 2]


def test_oracle_is_never_below_the_slo_sizing_of_the_true_rate_until_ready() -> None:
    cap = CapacityModel(slots=8, service_seconds=0.5, cold_start_seconds=45)
    trace = traces.course_launch(hours=2)
    oracle = OracleAutoscaler.for_trace(trace, cap, 2.0, min_replicas=1, max_replicas=100)
    need = np.array([replicas_for_slo(float(r), cap.rps_per_replica, cap.slots, 2.0) for r in trace.rps])
    ahead = 45 + 5
    for i in range(0, len(need), 7):
        assert oracle.plan[i] >= need[i : i + ahead + 1].max()
    assert oracle.plan.min() >= 1
    run = simulate(trace, oracle, cap, int(oracle.plan[0]), stochastic=True, seed=1)
    assert run.summary.within_slo_percent > 99


def test_oracle_keeps_the_manifests_schedule_floors_as_it_keeps_min() -> None:
    """A floor the owner wrote binds every contender; an oracle that ignored it would price the
    floor as if it were the autoscaler's waste."""
    cap = CapacityModel(slots=8, service_seconds=0.5, cold_start_seconds=45)
    start = dt.datetime(2026, 3, 2, 7, 0, tzinfo=dt.UTC)
    trace = traces.Trace("flat", start, 1.0, np.full(4 * 3600, 5.0))
    pol = policy(
        {
            "schedules": [
                {
                    "name": "am",
                    "cron": "0 8 * * *",
                    "timezone": "UTC",
                    "duration": "1h",
                    "prewarm": "10m",
                    "minReplicas": 5,
                }
            ]
        },
        {"min": 1, "max": 5},
    )
    floors = schedule_floors(trace, pol)
    hour = 3600
    assert floors[: hour - 600].max() == 0 and floors[hour - 600 : 2 * hour].min() == 5
    assert floors[2 * hour :].max() == 0
    oracle = OracleAutoscaler.for_trace(trace, cap, 2.0, pol.min_replicas, pol.max_replicas, floors)
    assert oracle.plan[hour - 600 : 2 * hour].min() == 5 and oracle.plan[2 * hour :].max() == 1
    bare = OracleAutoscaler.for_trace(trace, cap, 2.0, pol.min_replicas, pol.max_replicas)
    assert bare.plan.max() == 1  # 5 rps needs one replica; only the floor asks for more


# --- the signals ------------------------------------------------------------------------------------


@dataclass
class Recorder:
    """An autoscaler that holds `replicas` and keeps every Signals it is shown."""

    replicas: int
    name: str = "recorder"
    interval_seconds: float = 10.0
    seen: list[tuple[dt.datetime, Signals]] = field(default_factory=list)

    def desired(self, now: dt.datetime, replicas: int, ready: int, signals: Signals) -> int:
        self.seen.append((now, signals))
        return self.replicas


def flat(rps: float, seconds: int, up: np.ndarray | None = None) -> traces.Trace:
    return traces.Trace("flat", T0, 1.0, np.full(seconds, rps), metrics_up=up)


def test_arrival_rps_counts_refused_requests_and_capacity_only_under_load() -> None:
    cap = CapacityModel(slots=8, service_seconds=0.5, max_queue=4)  # 16 rps per replica
    rec = Recorder(1)
    run = simulate(flat(100.0, 600), rec, cap, initial_replicas=1)
    assert run.summary.rejected > 0.8 * 100 * 600
    late = [s for now, s in rec.seen if now >= at(120)]
    assert all(s.arrival_rps == pytest.approx(100.0) for s in late)  # refused ones included
    assert all(s.capacity_rps == cap.rps_per_replica for s in late)  # saturated: measured
    idle = Recorder(4)
    simulate(flat(5.0, 600), idle, cap, initial_replicas=4)
    assert all(s.capacity_rps is None for _, s in idle.seen)  # 5 of 64 rps: too idle to measure
    assert all(s.arrival_rps == pytest.approx(5.0) for _, s in idle.seen)


def test_arrival_rps_is_missing_without_a_ready_pod_and_metrics_up_follows_the_trace() -> None:
    up = np.ones(300, dtype=bool)
    up[100:200] = False
    rec = Recorder(0)
    simulate(flat(5.0, 300, up), rec, CapacityModel(), initial_replicas=0, min_replicas=0)
    assert all(s.arrival_rps is None and s.gpu_percent is None for _, s in rec.seen)
    assert [s.metrics_up for _, s in rec.seen] == [not 100 <= 10 * k < 200 for k in range(30)]
    assert [now for now, _ in rec.seen][:2] == [T0, at(10)]  # the wall clock of the trace


def test_summary_reports_days_after_the_first_separately() -> None:
    trace = traces.Trace("two", T0, 10.0, np.full(2 * 8640, 5.0))
    run = simulate(trace, StaticAutoscaler(2), CapacityModel(), initial_replicas=2)
    assert run.summary.gpu_hours_after_day1 == pytest.approx(48.0)
    assert run.summary.within_slo_after_day1_percent == pytest.approx(100.0)
    short = simulate(traces.course_launch(hours=1), StaticAutoscaler(2), CapacityModel(), initial_replicas=2)
    assert short.summary.gpu_hours_after_day1 is None


# --- the multi-day scenarios --------------------------------------------------------------------------


def _first_above(tr: traces.Trace, threshold: float, day: int) -> dt.datetime:
    seg = tr.rps[day * 86400 : (day + 1) * 86400]
    return tr.start + dt.timedelta(seconds=day * 86400 + int(np.argmax(seg > threshold)))


def test_daily_dst_follows_berlin_local_time_across_the_change() -> None:
    tr = traces.daily_dst()
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    assert len(tr.rps) == 3 * 86400 and tr.start == dt.datetime(2026, 3, 28, tzinfo=berlin)
    peaks = [_first_above(tr, 100.0, d) for d in range(2)]
    assert [p.astimezone(berlin).strftime("%H:%M") for p in peaks] == ["08:01", "08:01"]
    assert [p.astimezone(dt.UTC).hour for p in peaks] == [7, 6]  # an hour earlier in UTC after the change
    night = tr.rps[2 * 86400 + 3 * 3600 : 2 * 86400 + 5 * 3600]  # the last day's small hours
    burst = tr.start + dt.timedelta(seconds=2 * 86400 + 3 * 3600 + int(np.argmax(night > 40)))
    assert burst.astimezone(berlin).strftime("%m-%d %H:%M") == "03-30 05:10"  # 8x the night's ~7.5 rps
    assert 50 < night.max() < 75 and 130 < tr.rps.max() < 200


def test_daily_outages_marks_3_5_and_20_minutes_every_day() -> None:
    tr = traces.daily_outages(days=1)
    assert tr.metrics_up is not None
    down = np.flatnonzero(~tr.metrics_up)
    runs = np.split(down, np.flatnonzero(np.diff(down) > 1) + 1)
    assert [(int(r[0]) // 60, len(r) // 60) for r in runs] == [(180, 20), (479, 3), (658, 5)]
    ramp, ebb = runs[1], runs[2]
    assert tr.rps[ramp[-1]] > 2 * tr.rps[ramp[0]]  # the morning ramp rises across the outage
    assert tr.rps[ebb[-1]] < tr.rps[ebb[0]]  # and the peak ebbs across the other


def test_every_arrival_is_counted_once() -> None:
    """Requests still in service at the end were counted twice (served at their start, and in service):
    a few requests' worth of "misses" that depended only on the fleet's state at the last second."""
    from voxscale.simulator.model import CapacityModel
    from voxscale.simulator.policies import VoxscaleAutoscaler
    from voxscale.simulator.run import compare
    from voxscale.simulator.traces import Trace

    trace = Trace("flat", dt.datetime(2026, 3, 2, tzinfo=dt.UTC), 1.0, np.full(600, 40.0))
    pol = policy({}, {"min": 6, "max": 6})  # 6 replicas for 40 rps: nobody waits past the SLO
    result = compare(trace, VoxscaleAutoscaler(pol), CapacityModel(cold_start_seconds=0.0), stochastic=True, seed=3)
    assert len({r.summary.requests for r in result.runs}) == 1  # the same arrivals for every contender
    static = next(r for r in result.runs if r.summary.autoscaler.startswith("static"))
    assert static.summary.within_slo_percent == 100.0

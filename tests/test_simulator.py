"""The policy simulator against cases with known answers, and its error messages."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.engine_helpers import policy
from voxscale.simulator import traces
from voxscale.simulator.baselines import StaticAutoscaler
from voxscale.simulator.cli import load_manifest
from voxscale.simulator.model import CapacityModel, ReplicaQueue, erlang_c_wait
from voxscale.simulator.policies import VoxscaleAutoscaler
from voxscale.simulator.run import compare, simulate

REPO = Path(__file__).resolve().parents[1]
START = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)


def constant(rps: float, seconds: int) -> traces.Trace:
    return traces.Trace("const", START, 1.0, np.full(seconds, rps))


def test_constant_load_below_one_replica_needs_min_replicas_and_rejects_nothing() -> None:
    cap = CapacityModel(slots=8, service_seconds=0.5)  # 16 rps per replica
    gpu = {"name": "gpu", "type": "gpuUtilization", "target": 60, "scaleDownBelow": 40}
    pol = policy({"triggers": [gpu]}, {"min": 2, "max": 10})
    run = simulate(constant(5.0, 3600), VoxscaleAutoscaler(pol), cap, initial_replicas=2, min_replicas=2)
    assert set(run.desired) == {2}
    assert run.summary.rejected == 0
    assert run.summary.latency_p99_s == pytest.approx(0.5, abs=0.01)  # service time only: nobody waits
    assert run.summary.gpu_hours == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("servers", "rps", "dt_s"), [(4, 6.0, 0.05), (8, 13.0, 0.05), (8, 13.0, 1.0), (80, 150.0, 1.0)]
)
def test_stochastic_queue_matches_erlang_c(servers: int, rps: float, dt_s: float) -> None:
    cap = CapacityModel(slots=servers, service_seconds=0.5, max_queue=10_000)
    queue = ReplicaQueue(cap, stochastic=True, seed=7)
    steps = round(12000 / dt_s)  # 12000 s of simulated time
    for i in range(steps):
        queue.step(i * dt_s, dt_s, rps, ready=1)
    measured = queue.wait_sum / queue.served
    expected = erlang_c_wait(rps, cap.service_seconds, servers)
    # Stated tolerance: 15 % (sampling noise over 12000 s, seen within 8 % across seeds, and the geometric
    # service in sub-steps of S/8, whose lower variance shortens waits by some 5-10 % at 1 s steps).
    assert measured == pytest.approx(expected, rel=0.15), (measured, expected)


def test_stochastic_mode_keeps_full_capacity_at_steps_longer_than_the_service_time() -> None:
    # 1 s steps, 0.5 s service: 8 slots serve 16 rps; at 12 rps nothing may pile up.
    cap = CapacityModel(slots=8, service_seconds=0.5, max_queue=10_000)
    queue = ReplicaQueue(cap, stochastic=True, seed=3)
    stats = [queue.step(float(i), 1.0, 12.0, ready=1) for i in range(3600)]
    assert queue.rejected == 0 and queue.queued < 50
    assert np.mean([s.busy_slots for s in stats]) == pytest.approx(12.0 * 0.5, rel=0.05)


def test_step_load_scale_up_lands_within_interval_plus_cold_start() -> None:
    cap = CapacityModel(slots=8, service_seconds=0.5, cold_start_seconds=30)
    queue_trigger = {"name": "queue", "type": "queueLength", "scaleUpAbove": 10}
    pol = policy({"interval": "10s", "triggers": [queue_trigger]}, {"min": 1, "max": 10})
    rps = np.concatenate([np.full(600, 5.0), np.full(600, 40.0)])  # the step at t = 600 s
    run = simulate(traces.Trace("step", START, 1.0, rps), VoxscaleAutoscaler(pol), cap, initial_replicas=1)
    t = np.asarray(run.t)
    first_more_ready = t[(np.asarray(run.ready) > 1)][0]
    assert 600 < first_more_ready <= 600 + 10 + 30 + 1, first_more_ready


def test_static_fleet_for_the_peak_never_queues() -> None:
    cap = CapacityModel(slots=8, service_seconds=0.5)
    trace = traces.course_launch(hours=2)
    n = int(np.ceil(trace.rps.max() / cap.rps_per_replica))
    run = simulate(trace, StaticAutoscaler(n), cap, initial_replicas=n)
    assert run.summary.rejected == 0 and run.summary.latency_p99_s == pytest.approx(0.5, abs=0.01)


def test_compare_prices_every_contender_against_static_peak() -> None:
    ttsd = load_manifest(REPO / "examples" / "course-launch-burst.yaml")
    from voxscale.operator.policy import ScalingPolicy

    result = compare(
        traces.course_launch(hours=2), VoxscaleAutoscaler(ScalingPolicy.from_spec(ttsd["spec"])), CapacityModel(slots=8)
    )
    names = [r.summary.autoscaler for r in result.runs]
    assert names[0] == "voxscale" and names[1].startswith("static peak") and "keda+hpa" in names[2]
    assert names[3] == "oracle"
    assert result.runs[1].summary.saved_vs_static_peak_percent == 0
    assert result.runs[2].summary.gpu_hours_vs_keda == 1 and result.runs[3].summary.gpu_hours_vs_oracle == 1
    assert result.runs[3].summary.gpu_hours <= min(r.summary.gpu_hours for r in result.runs)
    assert result.runs[0].summary.cost < result.runs[1].summary.cost
    assert json.loads(json.dumps(result.to_dict()))["results"][0]["autoscaler"] == "voxscale"


def test_invalid_trace_errors_name_line_and_field(tmp_path: Path) -> None:
    cases = {
        "timestamp,rps\n0,1\n1,abc\n": "bad.csv:3: field rps: 'abc' is not a number",
        "timestamp,rps\n0,1\n0,2\n": "bad.csv:3: field timestamp: timestamps must strictly increase",
        "timestamp,rps\n0,1\n1,-4\n": "bad.csv:3: field rps: must be a finite number >= 0",
        "time,load\n0,1\n": "bad.csv:1: expected a header `timestamp,rps` (or `timestamp,requests_per_second`)",
        "timestamp,rps\nyesterday,1\n2,2\n": "bad.csv:2: field timestamp: timestamp 'yesterday' is neither",
        "timestamp,requests_per_second\n0,1\n1,x\n": "bad.csv:3: field requests_per_second: 'x' is not a number",
        "timestamp,rps,metrics_up\n0,1,1\n1,2,yes\n": "bad.csv:3: field metrics_up: 'yes' is not 1 (metrics up) or 0",
        "timestamp,rps,metrics_up\n0,1,1\n1,2\n": "bad.csv:3: expected at least 3 fields as in the header, got 2",
        "": "bad.csv:1: empty file; expected a header `timestamp,rps`",
    }
    for text, message in cases.items():
        path = tmp_path / "bad.csv"
        path.write_text(text)
        with pytest.raises(traces.TraceError) as err:
            traces.load_csv(path)
        assert message in str(err.value), str(err.value)


def test_csv_trace_is_resampled_to_the_step(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("timestamp,rps\n0,2\n10,8\n20,0\n")
    tr = traces.load_csv(path)
    assert len(tr.rps) == 20 and tr.rps[0] == 2 and tr.rps[15] == 8
    assert tr.metrics_up is None


def test_csv_rate_column_may_be_named_requests_per_second_and_found_by_name(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("mean_chars,requests_per_second,timestamp\n80,2,0\n80,8,10\n80,0,20\n")
    tr = traces.load_csv(path, step_seconds=5)
    assert tr.rps.tolist() == [2, 2, 8, 8]


def test_csv_metrics_up_marks_outages_resampled_like_the_rate(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("timestamp,rps,metrics_up\n0,2,1\n10,8,0\n20,3,true\n30,0,1\n")
    tr = traces.load_csv(path, step_seconds=5)
    assert tr.metrics_up is not None and tr.metrics_up.dtype == bool
    assert tr.metrics_up.tolist() == [True, True, False, False, True, True]


def test_cli_refuses_a_bad_manifest_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (REPO / "examples" / "course-launch-burst.yaml").read_text().replace("interval: 5s", "intervall: 5s")
    )
    res = subprocess.run(
        [sys.executable, "-m", "voxscale.cli", "simulate", "--scenario", "course-launch", "--manifest", str(bad)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert 'spec.scaling.intervall: unknown field "spec.scaling.intervall"' in res.stderr
    bad.write_text((REPO / "examples" / "course-launch-burst.yaml").read_text().replace("max: 10", "max: -1"))
    res = subprocess.run(
        [sys.executable, "-m", "voxscale.cli", "simulate", "--scenario", "course-launch", "--manifest", str(bad)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "spec.replicas.max" in res.stderr


def test_cli_runs_a_scenario_with_json_and_plot(tmp_path: Path) -> None:
    png = tmp_path / "out.png"
    res = subprocess.run(
        [sys.executable, "-m", "voxscale.cli", "simulate", "--scenario", "course-launch", "--json", "--plot", str(png)],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(res.stdout)
    assert {r["autoscaler"] for r in data["results"]} >= {"voxscale", "keda+hpa (model)", "kpa (model)"}
    assert all(r["reversals"] >= 0 and r["reversals_per_day"] >= 0 for r in data["results"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_simulates_a_request_log(tmp_path: Path) -> None:
    """--requests: an access log (timestamp, status, chars) binned into a trace, its table printed;
    a bad row is refused with its line and field."""
    log = tmp_path / "access.csv"
    rows = [f"{i * 0.05:.2f},200,{40 + (i % 7) * 60}" for i in range(12000)]  # 20 rps for 10 minutes
    log.write_text("timestamp,status,chars\n" + "\n".join(rows) + "\n")
    manifest = str(Path(__file__).resolve().parents[1] / "examples" / "minimal.yaml")
    cmd = [sys.executable, "-m", "voxscale.cli", "simulate", "--requests", str(log), "-f", manifest, "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "request log" in res.stdout and "12000 requests with sizes" in res.stdout
    assert "reversals" in res.stdout and "kpa (model)" in res.stdout
    log.write_text("timestamp,chars\n1,20\n2,-3\n")
    bad = subprocess.run(cmd, capture_output=True, text=True)
    assert bad.returncode == 2 and f"{log}:3: field chars" in bad.stderr, bad.stderr


def test_replica_capacity_can_come_from_the_inference_benchmark(tmp_path: Path) -> None:
    from voxscale.simulator.cli import measured_capacity

    result = {"http": [{"clients": 1, "rps": 2.8, "p50_s": 0.4}, {"clients": 16, "rps": 20.0, "p50_s": 0.9}]}
    path = tmp_path / "inference.json"
    path.write_text(json.dumps(result))
    cap = measured_capacity(path, CapacityModel())
    assert cap.slots == 8 and cap.rps_per_replica == pytest.approx(20.0)

"""The generalization bench's parts: trace and manifest generators, the Knative KPA model, reversal
counting, request logs, and the request mix in the replica model."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from voxscale.operator.policy import ScalingPolicy
from voxscale.operator.reversals import Move, count_reversals
from voxscale.simulator import generators, traces
from voxscale.simulator.baselines import StaticAutoscaler
from voxscale.simulator.cli import checked_manifest
from voxscale.simulator.kpa import KpaModel
from voxscale.simulator.model import CapacityModel
from voxscale.simulator.policies import Signals
from voxscale.simulator.run import simulate


# ------------------------------------------------------------------------------------------ generators
@pytest.mark.parametrize("kind", sorted(generators.TRACE_KINDS))
def test_every_trace_kind_is_seeded_and_sized(kind: str) -> None:
    """The same seed gives the same trace; rates are finite, non-negative and near the asked peak."""
    make = generators.TRACE_KINDS[kind]
    a, b = make(np.random.default_rng(5), 0.2, 100.0), make(np.random.default_rng(5), 0.2, 100.0)
    assert np.array_equal(a.rps, b.rps) and len(a.rps) == int(0.2 * 86400)
    assert np.all(np.isfinite(a.rps)) and a.rps.min() >= 0
    assert 20 <= np.max(a.work) <= 200, np.max(a.work)


def test_mix_shift_and_outages_carry_their_extra_series() -> None:
    mix = generators.mix_shift(np.random.default_rng(1), 1.0, 100.0)
    assert mix.cost is not None and mix.cost.max() >= 1.5 and mix.cost.min() >= 1.0
    out = generators.outages(np.random.default_rng(1), 1.0, 100.0)
    assert out.metrics_up is not None and 0 < (~out.metrics_up).sum() < len(out.rps)


@pytest.mark.parametrize("kind", generators.MANIFEST_KINDS)
def test_every_manifest_kind_passes_the_crd_and_parses(kind: str) -> None:
    """Manifests are what the API server would accept, drawn many times."""
    for seed in range(15):
        doc = generators.manifest(np.random.default_rng(seed), kind, 8, "t")
        spec = checked_manifest(doc)["spec"]
        policy = ScalingPolicy.from_spec(spec)
        assert 1 <= policy.min_replicas < policy.max_replicas
        if kind == "minimal":
            assert "triggers" not in doc["spec"].get("scaling", {})


def test_pairs_cover_every_combination_and_are_reproducible() -> None:
    todo = generators.pairs(42, None)
    assert len({(p.trace_kind, p.manifest_kind) for p in todo}) == 42
    assert {p.days for p in todo if p.trace_kind in generators.TWO_DAYS} == {2.0}
    one, two = generators.build(todo[3]), generators.build(todo[3])
    assert np.array_equal(one[0].rps, two[0].rps) and one[1] == two[1]


# ------------------------------------------------------------------------------------------ KPA
def _kpa(min_replicas: int = 1, max_replicas: int = 100) -> KpaModel:
    spec = {"model": {"image": "x"}, "replicas": {"min": min_replicas, "max": max_replicas}}
    return KpaModel(ScalingPolicy.from_spec(spec), CapacityModel(slots=10))  # target 7 per pod


def test_another_seed_draws_a_held_out_set_of_the_same_kinds() -> None:
    """bench/generalize.py --seed: the same kinds in the same order, other numbers."""
    held, ours = generators.pairs(7, 0.01, 22), generators.pairs(7, 0.01)
    assert [(p.trace_kind, p.manifest_kind) for p in held] == [(p.trace_kind, p.manifest_kind) for p in ours]
    assert {p.seed for p in held} == {22} and {p.seed for p in ours} == {generators.SEED}
    assert not np.array_equal(generators.build(held[0])[0].rps, generators.build(ours[0])[0].rps)


def test_kpa_stable_mode_sizes_to_70_percent_of_the_slots() -> None:
    kpa = _kpa()
    assert kpa.decide(0.0, 4, stable=28.0, panic=28.0) == 4
    assert kpa.decide(2.0, 4, stable=29.0, panic=29.0) == 5


def test_kpa_halves_at_most_per_tick_and_never_scales_down_in_panic() -> None:
    kpa = _kpa()
    assert kpa.decide(0.0, 10, stable=0.0, panic=0.0) == 5  # max-scale-down-rate 2
    assert kpa.decide(2.0, 2, stable=7.0, panic=28.0) == 4  # panic: 4 pods wanted >= 2 x 2 ready
    assert kpa.panic_since == 2.0
    assert kpa.decide(4.0, 4, stable=0.0, panic=0.0) == 4  # in panic: no scale-down
    assert kpa.decide(62.0, 4, stable=0.0, panic=0.0) == 4  # not yet a full stable window
    assert kpa.decide(64.1, 4, stable=0.0, panic=0.0) == 2  # out of panic: halving again
    assert kpa.panic_since is None


def test_kpa_honours_min_max_and_schedule_floors() -> None:
    kpa = _kpa(min_replicas=2, max_replicas=6)
    kpa.floors = np.array([0, 0, 5, 5])
    now = dt.datetime.fromtimestamp(0, dt.UTC)
    quiet = Signals(gpu_percent=0.0, queue=0.0, p95_seconds=None)
    assert kpa.desired(now, 3, 3, quiet) == 2
    assert kpa.desired(now + dt.timedelta(seconds=3), 2, 2, quiet) == 5
    busy = Signals(gpu_percent=100.0, queue=500.0, p95_seconds=None)
    assert kpa.desired(now + dt.timedelta(seconds=4), 5, 5, busy) == 6


# ------------------------------------------------------------------------------------------ reversals
def test_reversals_count_moves_undone_at_the_same_load() -> None:
    flap = [Move(0, True, 100), Move(120, False, 105), Move(240, True, 98), Move(1000, False, 100)]
    assert count_reversals(flap) == 2  # the last comes after the window
    followed = [Move(0, True, 100), Move(120, False, 40)]  # the load fell: a response, not a flap
    assert count_reversals(followed) == 0
    assert count_reversals([Move(0, True, 10), Move(60, True, 11)]) == 0


def test_a_flat_trace_has_no_reversals_and_reports_them() -> None:
    trace = traces.Trace("flat", generators.MONDAY, 1.0, np.full(1800, 50.0))
    r = simulate(trace, _kpa(), CapacityModel(), 4, stochastic=False)
    assert r.summary.reversals == 0 and r.summary.reversals_per_day == 0.0


# ------------------------------------------------------------------------------------------ request mix
def test_longer_requests_need_more_of_the_same_fleet() -> None:
    """The same rate with requests twice as long: the fixed fleet is overloaded."""
    rps = np.full(600, 100.0)
    plain = traces.Trace("p", generators.MONDAY, 1.0, rps)
    heavy = traces.Trace("h", generators.MONDAY, 1.0, rps, cost=np.full(600, 2.0))
    fleet = StaticAutoscaler(9)
    a = simulate(plain, fleet, CapacityModel(), 9, stochastic=True, seed=1)
    b = simulate(heavy, fleet, CapacityModel(), 9, stochastic=True, seed=1)
    assert a.summary.within_slo_percent > 99 and b.summary.within_slo_percent < 60
    assert b.summary.latency_mean_s > a.summary.latency_mean_s


# ------------------------------------------------------------------------------------------ request logs
def test_request_log_bins_counts_and_sizes(tmp_path: Path) -> None:
    log = tmp_path / "access.csv"
    log.write_text("timestamp,status,chars\n0.2,200,100\n0.7,200,300\n2.5,200,200\n1.1,200,200\n")
    trace = traces.load_requests(log, 1.0)
    assert trace.rps.tolist() == [2.0, 1.0, 1.0] and trace.cost is not None
    assert trace.cost.tolist() == pytest.approx([1.0, 1.0, 1.0])
    plain = tmp_path / "plain.csv"
    plain.write_text("timestamp\n2026-01-05T00:00:00Z\n2026-01-05T00:00:03Z\n")
    t = traces.load_requests(plain, 1.0)
    assert t.cost is None and t.rps.tolist() == [1.0, 0.0, 0.0, 1.0] and t.start.year == 2026


@pytest.mark.parametrize(
    ("text", "where", "says"),
    [
        ("time,chars\n1,2\n", ":1", "timestamp"),
        ("timestamp,chars\n1,20\n2,abc\n", ":3: field chars", "not a number"),
        ("timestamp,audio_seconds\n1,2\n2,0\n", ":3: field audio_seconds", "> 0"),
        ("timestamp\n1\nyesterday\n", ":3: field timestamp", "ISO-8601"),
        ("timestamp\n1\n", "", "at least 2"),
    ],
)
def test_request_log_errors_name_the_line_and_field(tmp_path: Path, text: str, where: str, says: str) -> None:
    log = tmp_path / "log.csv"
    log.write_text(text)
    with pytest.raises(traces.TraceError) as err:
        traces.load_requests(log)
    assert f"{log}{where}" in str(err.value) and says in str(err.value)

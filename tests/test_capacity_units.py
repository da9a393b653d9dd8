"""The unit of work (issue 21 item 6): a replica's capacity learnt in requests and in input characters,
and sized in whichever predicts new measurements better. Pure logic on plain data, and the simulator's
fleet on a trace whose request mix shifts."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from voxscale.operator import capacity as cap
from voxscale.operator.engine import History, Metrics, Observed, decide
from voxscale.operator.state import Demand
from voxscale.simulator.model import CapacityModel
from voxscale.simulator.policies import VoxscaleAutoscaler
from voxscale.simulator.run import simulate
from voxscale.simulator.traces import Trace

from .engine_helpers import policy

T0 = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC)
rates = st.floats(0.5, 500, allow_nan=False)
lengths = st.floats(5, 5000, allow_nan=False)


def test_a_capacity_measured_under_long_requests_serves_more_short_ones() -> None:
    # Measured at 10 rps while requests carried 600 characters: 6,000 characters per busy second.
    learnt = cap.learn(cap.Learnt(), 10.0, 600.0)
    now = cap.now(learnt, 200.0)  # the mix turned to replies a third as long
    assert now is not None and now.unit is cap.Unit.CHARACTERS and math.isclose(now.rps, 30.0)


def test_without_a_character_count_capacity_is_in_requests() -> None:
    learnt = cap.learn(cap.Learnt(), 10.0, None)
    assert cap.now(learnt, None) == cap.Capacity(10.0, cap.Unit.REQUESTS)
    assert cap.now(cap.learn(cap.Learnt(), 10.0, 600.0), None) == cap.Capacity(10.0, cap.Unit.REQUESTS)
    assert cap.now(cap.Learnt(), 200.0) is None  # nothing measured yet: the spec's figure is used


def test_requests_take_over_where_cost_does_not_follow_length() -> None:
    # A server whose cost per request is fixed: 10 rps whatever the length of the text.
    learnt = cap.Learnt()
    for chars in (600.0, 200.0, 600.0, 200.0, 600.0):
        learnt = cap.learn(learnt, 10.0, chars)
    assert learnt.unit() is cap.Unit.REQUESTS and cap.now(learnt, 200.0) == cap.Capacity(10.0, cap.Unit.REQUESTS)


def test_characters_keep_the_unit_where_cost_follows_length() -> None:
    learnt = cap.Learnt()
    for chars in (600.0, 200.0, 600.0, 200.0, 600.0):
        learnt = cap.learn(learnt, 6000.0 / chars, chars)  # 6,000 characters per busy second
    assert learnt.unit() is cap.Unit.CHARACTERS
    now = cap.now(learnt, 300.0)
    assert now is not None and math.isclose(now.rps, 20.0)


@given(st.lists(st.tuples(rates, st.one_of(st.none(), lengths)), max_size=20), st.one_of(st.none(), lengths))
def test_the_capacity_is_always_a_positive_rate_from_what_was_measured(
    samples: list[tuple[float, float | None]], per_request: float | None
) -> None:
    learnt = cap.Learnt()
    for rps, chars in samples:
        learnt = cap.learn(learnt, rps, chars)
    now = cap.now(learnt, per_request)
    if not samples:
        assert now is None
        return
    assert now is not None and math.isfinite(now.rps) and now.rps > 0
    if now.unit is cap.Unit.REQUESTS:
        assert min(r for r, _ in samples) <= now.rps <= max(r for r, _ in samples)


@given(rates, lengths)
def test_a_missing_or_non_finite_measurement_changes_nothing(rps: float, chars: float) -> None:
    learnt = cap.learn(cap.Learnt(), rps, chars)
    for bad in (None, math.nan, math.inf, 0.0, -1.0):
        assert cap.learn(learnt, bad, chars) == learnt


def test_the_engine_sizes_from_characters_and_status_keeps_what_it_learnt() -> None:
    pol = policy({}, {"min": 1, "max": 20})
    heavy = Metrics({"slo": 40.0, "slo.capacity": 10.0, "slo.characters": 40.0 * 600})
    d = decide(pol, Observed(4, 4), heavy, T0)
    restored = History.from_dict(d.history.to_dict())
    light = Metrics({"slo": 40.0, "slo.characters": 40.0 * 200})  # too idle to measure: the learnt figure
    later = decide(pol, Observed(d.desired, d.desired), light, T0 + dt.timedelta(seconds=15), restored)
    demand = later.demand
    assert isinstance(demand, Demand) and demand.capacity_unit is cap.Unit.CHARACTERS
    assert math.isclose(demand.capacity_rps, 30.0)
    model = next(r for r in later.readings if r.name == "slo")
    assert "at 30 rps each (measured, in characters)" in model.note


def test_a_fleet_sized_under_long_requests_shrinks_when_they_shorten() -> None:
    """The lock-in the unit removes: a capacity learnt while requests were 3x as long kept the fleet 3x
    too large once they shortened, and too idle to be measured again (requests-only learning)."""
    hours = 6
    step = 5.0
    n = int(hours * 3600 / step)
    cost = np.where(np.arange(n) < n // 2, 3.0, 1.0)  # long requests for 3 h, then short ones
    trace = Trace("mix", T0, step, np.full(n, 60.0), "steady 60 rps, mix 3x then 1x", cost=cost)
    model = CapacityModel(slots=8, service_seconds=0.25, cold_start_seconds=60.0)  # 32 rps a replica
    pol = policy({}, {"min": 1, "max": 30})
    engine = VoxscaleAutoscaler(pol)
    run = simulate(trace, engine, model, 2, seed=3, stochastic=True)
    last_hour = run.desired[-max(1, len(run.desired) // hours) :]
    # 60 rps of short requests at 32 rps a replica: 3 or 4 replicas meet p95 2 s; the long ones needed ~7.
    assert max(last_hour) <= 4, last_hour
    assert run.summary.within_slo_percent >= 99.0
    assert engine.last is not None and engine.last.demand is not None
    assert engine.last.demand.capacity_unit is cap.Unit.CHARACTERS

"""The slo trigger, the forecast floor, the scale-down guard and advisory mode, on the pure engine."""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.engine_helpers import T0, Run, policy
from voxscale.operator import forecast as fc
from voxscale.operator.engine import History, Metrics, Observed, Reason, decide
from voxscale.operator.policy import ScalingPolicy
from voxscale.operator.queueing import erlang_c, replicas_for_slo, response_time_tail
from voxscale.operator.reversals import REVERSAL_TOLERANCE
from voxscale.operator.triggers import slo as slo_kind
from voxscale.simulator.model import CapacityModel, ReplicaQueue, erlang_c_wait

SLO = {"name": "slo", "type": "slo", "slo": {"latencyP95": "2s", "replicaCapacity": 16}}


def slo_policy(max_replicas: int = 20, min_replicas: int = 1, **scaling: object) -> ScalingPolicy:
    return policy({"triggers": [SLO], **scaling}, {"min": min_replicas, "max": max_replicas})


# ------------------------------------------------------------------------------------- queueing
def test_erlang_c_agrees_with_the_textbook_formula() -> None:
    for servers in (1, 2, 8, 40):
        for rho in (0.1, 0.5, 0.9, 0.99):
            lam, service = rho * servers / 0.5, 0.5
            textbook = erlang_c_wait(lam, service, servers)  # factorial form, mean wait
            ours = erlang_c(servers, lam * service) / (servers / service - lam)
            assert math.isclose(ours, textbook, rel_tol=1e-9), (servers, rho)


def test_one_server_response_tail_is_m_m_1() -> None:
    lam, service, t = 1.5, 0.5, 2.0
    assert math.isclose(response_time_tail(lam, service, 1, t), math.exp(-(1 / service - lam) * t), rel_tol=1e-9)


@settings(max_examples=200, deadline=None)
@given(
    demand=st.floats(min_value=0.1, max_value=400),
    capacity=st.floats(min_value=1, max_value=40),
    slots=st.integers(1, 16),
    slo=st.floats(min_value=0.5, max_value=10),
)
def test_slo_sizing_is_the_fewest_replicas_that_meet_the_tail(
    demand: float, capacity: float, slots: int, slo: float
) -> None:
    n = replicas_for_slo(demand, capacity, slots, slo)
    service = slots / capacity
    assert n * capacity > demand  # stable
    if math.exp(-slo / service) <= 0.05:  # the SLO is reachable at all
        assert response_time_tail(demand, service, n * slots, slo) <= 0.05
        if n - 1 > demand / capacity:
            assert response_time_tail(demand, service, (n - 1) * slots, slo) > 0.05
    assert replicas_for_slo(demand * 1.5, capacity, slots, slo) >= n  # more demand never needs fewer


def test_slo_sizing_holds_in_the_simulators_stochastic_queue() -> None:
    cap = CapacityModel(slots=8, service_seconds=0.5, max_queue=10_000)
    lam = 70.0
    n = replicas_for_slo(lam, cap.rps_per_replica, cap.slots, 2.0)
    assert n == 5  # 70 rps = 4.4 replicas of 16 rps: the model asks for one more
    q = ReplicaQueue(cap, stochastic=True, seed=3)
    for i in range(12_000):  # 1200 s at 0.1 s steps
        q.step(i * 0.1, 0.1, lam, n)
    assert q.fraction_within(2.0) >= 0.95


# ------------------------------------------------------------------------------------- the trigger
def test_demand_sizes_the_fleet_in_one_step_and_says_how() -> None:
    d = decide(slo_policy(8), Observed(1, 1), Metrics({"slo": 70.0, "slo.backlog": 0.0}), T0)
    assert (d.current, d.desired, d.reason, d.rule) == (1, 5, Reason.TRIGGER, "slo")
    assert d.message.startswith("demand 70 rps = 4.4 replicas at 16 rps each (assumed: not yet measured under load)")
    assert d.message.endswith("p95 2s needs 5: 1 -> 5")


def test_pods_still_starting_count_as_capacity_on_its_way() -> None:
    d = decide(slo_policy(8), Observed(5, 1), Metrics({"slo": 70.0}), T0)
    assert d.desired == 5


def test_a_burst_shows_first_in_the_recent_window() -> None:
    d = decide(slo_policy(20), Observed(2, 2), Metrics({"slo": 20.0, "slo.recent": 120.0}), T0)
    # Sized for the recent rate, and one ahead: the recent rate's rise over the window's is under way.
    assert d.desired == replicas_for_slo(120.0, 16, 8, 2.0) + slo_kind.TREND_MAX_EXTRA
    assert "ahead of a rise under way (+50% over a pod start)" in d.message


def test_a_rise_within_poisson_noise_is_no_trend() -> None:
    trig = slo_policy(20).triggers[0]
    window_rps = 100.0  # the 15 s recent window of a 1 m rate window: noise sd = sqrt(100 / 15) = 2.6 rps
    assert slo_kind.trend(trig, window_rps, {"recent": window_rps + 15.0}, 60.0) == 1.0  # < 6 sd
    rising = slo_kind.trend(trig, window_rps, {"recent": window_rps + 20.0}, 60.0)
    # slope 20 rps over the 22.5 s between the windows' midpoints, extrapolated over 60 s.
    assert rising == pytest.approx(1 + (20 / 22.5) * 60 / 120)


@given(
    window_rps=st.floats(0, 1e4),
    recent_rps=st.floats(0, 1e4),
    lookahead=st.floats(0, 3600),
)
def test_the_trend_never_lowers_demand_nor_exceeds_its_cap(
    window_rps: float, recent_rps: float, lookahead: float
) -> None:
    trig = slo_policy(20).triggers[0]
    assert 1.0 <= slo_kind.trend(trig, window_rps, {"recent": recent_rps}, lookahead) <= slo_kind.TREND_CAP


def test_measured_capacity_replaces_the_assumed_one_and_is_remembered() -> None:
    pol = slo_policy(20)
    d = decide(pol, Observed(4, 4), Metrics({"slo": 40.0, "slo.capacity": 8.0}), T0)
    assert "at 8 rps each (measured, in requests)" in d.message and d.desired == replicas_for_slo(40, 8, 8, 2.0)
    restored = History.from_dict(d.history.to_dict())
    later = decide(pol, Observed(d.desired, d.desired), Metrics({"slo": 40.0}), T0 + dt.timedelta(seconds=10), restored)
    # Not measured this tick (load too light): the learnt figure stays.
    assert "(measured, in requests)" in later.message


def test_no_triggers_means_the_slo_trigger_and_the_forecast_floor() -> None:
    pol = policy({}, {"min": 1, "max": 10})
    assert [t.type.value for t in pol.triggers] == ["slo"] and pol.predictive.enabled
    assert decide(pol, Observed(1, 1), Metrics({"slo": 70.0}), T0).desired == 5


def test_missing_demand_holds_instead_of_scaling_down() -> None:
    d = decide(slo_policy(), Observed(6, 6), Metrics({}), T0)
    assert (d.desired, d.reason) == (6, Reason.FALLBACK)


# ------------------------------------------------------------------------------------- scale-down guard
def test_scale_down_keeps_what_the_current_demand_needs() -> None:
    pol = slo_policy(
        20, scaleDown={"stabilizationWindow": "1m", "maxStepPods": 10, "maxStepPercent": 100, "cooldown": "0s"}
    )
    run = Run(pol, replicas=10)
    run.run(120, 10, lambda _now: Metrics({"slo": 100.0}))
    # Down to what 100 rps needs (not to min), out of the rebound band: a rise of REVERSAL_TOLERANCE
    # (the load change a reversal is counted within) would not ask for the pods back.
    assert run.replicas == replicas_for_slo(100.0 * (1 + REVERSAL_TOLERANCE), 16, 8, 2.0)
    assert run.replicas < 10


# ------------------------------------------------------------------------------------- forecast floor
def daily_history(days: float, now: dt.datetime, peak_hour: float = 8.0) -> fc.RateHistory:
    """A minute-step history ending at `now`: 10 rps, 120 rps from peak_hour for 3 hours (UTC)."""
    n = int(days * 1440)
    start = now - dt.timedelta(minutes=n)
    minutes = np.arange(n)
    hour = ((start.hour * 60 + start.minute + minutes) % 1440) / 60
    rps = np.where((hour >= peak_hour) & (hour < peak_hour + 3), 120.0, 10.0)
    return fc.RateHistory(start, 60.0, rps)


def test_the_forecast_floor_prewarms_before_a_learnt_peak() -> None:
    now = dt.datetime(2026, 3, 4, 7, 59, tzinfo=dt.UTC)
    pol = slo_policy(20)
    d = decide(pol, Observed(1, 1), Metrics({"slo": 10.0}, history=daily_history(2, now)), now)
    assert d.reason is Reason.FORECAST and d.desired == replicas_for_slo(120.0, 16, 8, 2.0)
    assert d.demand is not None and d.demand.forecast_rps == 120.0
    assert "forecast floor" in d.message and "same local time on 2 past day(s)" in d.message


def test_without_a_day_of_history_it_says_so_and_stays_reactive() -> None:
    now = dt.datetime(2026, 3, 4, 7, 59, tzinfo=dt.UTC)
    d = decide(slo_policy(20), Observed(1, 1), Metrics({"slo": 10.0}, history=daily_history(0.5, now)), now)
    assert d.desired == 1 and d.forecast_floor == 0
    assert d.demand is not None and d.demand.forecast_note == "no forecast: 12.0 h of arrival history, needs 24 h"


def test_a_pattern_moved_by_an_hour_is_found() -> None:
    """Users wake up and start an hour earlier today (a DST change in a timezone nobody configured):
    today's early hours fit yesterday's an hour later, so yesterday's 08:00 peak is expected at 07:00."""
    now = dt.datetime(2026, 3, 4, 6, 58, tzinfo=dt.UTC)
    start = now - dt.timedelta(days=2)
    minute = np.arange(2 * 1440)
    today = minute >= 2 * 1440 - 7 * 60  # the last 7 hours run an hour early
    hour = ((start.hour * 60 + start.minute + minute + np.where(today, 60, 0)) % 1440) / 60
    rps = np.where(hour >= 5.5, 40.0, 10.0) * np.where((hour >= 8) & (hour < 11), 3.0, 1.0)
    got = fc.forecast(fc.RateHistory(start, 60.0, rps), now, dt.timedelta(minutes=2), zoneinfo.ZoneInfo("UTC"))
    assert isinstance(got, fc.Forecast) and got.peak_rps >= 100 and "pattern moved +1 h" in got.note
    same_day = fc.forecast(
        fc.RateHistory(start, 60.0, rps),
        now,
        dt.timedelta(minutes=2),
        zoneinfo.ZoneInfo("UTC"),
        method=fc.Method(detect_shift=False),
    )
    assert isinstance(same_day, fc.Forecast) and same_day.peak_rps < 100  # without detection: an hour late


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    current=st.integers(1, 12),
    arrivals=st.one_of(st.none(), st.floats(min_value=0, max_value=300)),
)
def test_the_forecast_floor_never_lowers_the_count_nor_exceeds_max(
    data: st.DataObject, current: int, arrivals: float | None
) -> None:
    now = dt.datetime(2026, 3, 4, data.draw(st.integers(0, 23)), data.draw(st.integers(0, 59)), tzinfo=dt.UTC)
    levels = data.draw(st.lists(st.floats(min_value=0, max_value=500), min_size=4, max_size=4))
    n = 2 * 1440
    rps = np.repeat(np.asarray(levels), n // 4)
    hist = fc.RateHistory(now - dt.timedelta(minutes=n), 60.0, rps)
    pol = slo_policy(12)
    values = {} if arrivals is None else {"slo": arrivals}
    without = decide(pol, Observed(current, current), Metrics(dict(values)), now)
    with_forecast = decide(pol, Observed(current, current), Metrics(dict(values), history=hist), now)
    assert with_forecast.desired >= without.desired
    assert with_forecast.desired <= pol.max_replicas


# ------------------------------------------------------------------------------------- advisory
def test_advisory_mode_decides_but_records_no_scale_event() -> None:
    pol = policy({"triggers": [SLO], "mode": "advisory"}, {"min": 1, "max": 8})
    d = decide(pol, Observed(1, 1), Metrics({"slo": 70.0}), T0)
    assert d.desired == 5 and d.history.events == ()

"""Bursts shorter than a cold start (issue 21 item 3): headroom for the bursts recent traffic showed,
given back an hour after the last one. Pure logic on plain data."""

from __future__ import annotations

import datetime as dt

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from voxscale.operator import forecast as fc
from voxscale.operator.engine import Metrics, Observed, decide
from voxscale.operator.triggers.slo import size

from .engine_helpers import policy

T0 = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC)
MINUTE = 60.0
POD_START = dt.timedelta(minutes=2)


def history(per_minute: list[float]) -> fc.RateHistory:
    return fc.RateHistory(T0, MINUTE, np.asarray(per_minute, dtype=float))


def at_end(h: fc.RateHistory) -> dt.datetime:
    return h.end


def test_bursts_that_recur_are_remembered_as_their_largest_rise() -> None:
    h = history([2.0] * 10 + [60.0, 80.0, 10.0] + [2.0] * 10 + [50.0, 2.0] + [2.0] * 10)
    assert fc.burst(h, at_end(h), POD_START) == 78.0


def test_one_crowd_is_expected_again_within_the_memory() -> None:
    h = history([2.0] * 20 + [60.0, 80.0, 10.0] + [2.0] * 20)
    assert fc.burst(h, at_end(h), POD_START) == 78.0


def test_the_drift_of_a_ramp_and_poisson_noise_are_not_bursts() -> None:
    ramp = history(list(np.linspace(20, 80, 60)))
    noisy = history(list(50 + np.random.default_rng(1).normal(0, 3, 60)))
    assert fc.burst(ramp, at_end(ramp), POD_START) is None
    assert fc.burst(noisy, at_end(noisy), POD_START) is None


def test_a_burst_older_than_the_memory_is_forgotten() -> None:
    h = history([5.0] * 10 + [90.0] + [5.0] * 10 + [40.0] + [5.0] * 70)
    assert fc.burst(h, at_end(h), POD_START) is None
    assert fc.burst(h, T0 + dt.timedelta(minutes=50), POD_START) == 85.0


def test_minutes_without_samples_are_no_burst() -> None:
    """A metrics outage (NaN minutes) followed by the usual rate is not a rise from zero."""
    h = history([40.0] * 20 + [float("nan")] * 5 + [40.0] * 20)
    assert fc.burst(h, at_end(h), POD_START) is None


@given(st.lists(st.one_of(st.floats(0, 1000), st.just(float("nan"))), min_size=0, max_size=90))
def test_a_burst_is_a_positive_rise_no_larger_than_the_highest_rate(per_minute: list[float]) -> None:
    h = history(per_minute)
    rise = fc.burst(h, at_end(h), POD_START)
    if rise is not None:
        assert 0 < rise <= np.nanmax(h.rps)


def test_the_slo_model_holds_room_for_a_recent_burst_and_says_so() -> None:
    pol = policy({}, {"min": 1, "max": 20})
    assert pol.slo is not None
    calm = history([20.0] * 60)
    bursty = history([20.0] * 30 + [100.0] + [20.0] * 10 + [20.0, 100.0, 20.0] + [20.0] * 16)
    quiet = decide(pol, Observed(2, 2), Metrics({"slo": 20.0}, history=calm), calm.end)
    ready = decide(pol, Observed(2, 2), Metrics({"slo": 20.0}, history=bursty), bursty.end)
    assert quiet.desired < ready.desired == size(pol.slo, 20.0 + 80.0, pol.slo.capacity_rps)
    model = next(r for r in ready.readings if r.name == "slo")
    assert "+80 rps for bursts seen lately" in model.note

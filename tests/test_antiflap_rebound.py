"""Scale-downs that a reversal would undo are refused (issue 21, item 2), on plain data:
- the SLO model's rebound: no scale-down to a count the model asks to leave again once demand rises by
  the swing seen lately (forecast.wobble), at least REVERSAL_TOLERANCE;
- no scale-down that undoes the last scale-up within REVERSAL_WINDOW_S while the load is about the same;
- a rule between its thresholds abstains where the SLO model sizes the fleet, as long as its reading,
  grown by the same swing, stays below its scale-up threshold at the new count.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.engine_helpers import T0, Run, policy
from voxscale.operator import forecast as fc
from voxscale.operator.engine import History, Metrics, Observed, Reason, decide
from voxscale.operator.policy import IMPLICIT_SLO, ScalingPolicy
from voxscale.operator.reversals import REVERSAL_TOLERANCE, REVERSAL_WINDOW_S
from voxscale.operator.triggers.slo import size
from voxscale.simulator import generators
from voxscale.simulator.policies import VoxscaleAutoscaler
from voxscale.simulator.run import rate_window, simulate

QUICK_DOWN = {"scaleDown": {"stabilizationWindow": "1m", "maxStepPods": 10, "maxStepPercent": 100, "cooldown": "0s"}}


def demand(rps: float, name: str = "slo") -> dict[str, float]:
    """The SLO model's demand: the default slo trigger's (`slo`) or the implicit objective's."""
    return {name: rps}


WIDE = {"min": 1, "max": 40}


def minutes(values: list[float], end: dt.datetime) -> fc.RateHistory:
    """A one-sample-a-minute arrival history ending at `end`."""
    return fc.RateHistory(end - dt.timedelta(minutes=len(values)), 60.0, np.asarray(values, dtype=float))


# ------------------------------------------------------------------------------------- wobble
def test_wobble_is_the_spread_of_the_recent_samples() -> None:
    span = dt.timedelta(minutes=10)
    assert fc.wobble(minutes([100.0] * 10, T0), T0, span) == 0.0
    assert abs((fc.wobble(minutes([100, 120, 110, 100, 90] * 2, T0), T0, span) or 0) - (120 / 90 - 1)) < 1e-9
    assert fc.wobble(minutes([1.0, 50.0, 1.0] * 4, T0), T0, span) == fc.WOBBLE_CAP  # a burst, not a wobble
    assert fc.wobble(minutes([100.0, np.nan], T0), T0, span) is None  # too few samples to say
    old = minutes([10.0, 500.0] + [100.0] * 10, T0)  # a swing older than the span is not counted
    assert fc.wobble(old, T0, span) == 0.0


def test_the_wobble_memory_keeps_a_swing_through_a_calm_spell() -> None:
    """A load that swings every half hour: a scale-down taken in the calm ten minutes between is
    undone by the next swing (pair 54 of the generalization bench flapped so, 24 times a day)."""
    span, hour = dt.timedelta(minutes=10), dt.timedelta(hours=1)
    swings = minutes([100.0, 130.0] * 5 + [100.0] * 20, T0)
    assert fc.wobble(swings, T0, span) == 0.0
    assert abs((fc.wobble(swings, T0, span, hour) or 0) - 0.3) < 1e-9
    older = minutes([100.0, 130.0] * 5 + [100.0] * 70, T0)  # the swing left the memory
    assert fc.wobble(older, T0, span, hour) == 0.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.floats(1.0, 1e4), st.just(float("nan"))), min_size=1, max_size=90))
def test_a_longer_memory_never_narrows_the_band(values: list[float]) -> None:
    span, hour = dt.timedelta(minutes=10), dt.timedelta(hours=1)
    history = minutes(values, T0)
    recent, remembered = fc.wobble(history, T0, span), fc.wobble(history, T0, span, hour)
    if recent is not None:
        assert remembered is not None and remembered >= recent - 1e-12


# ------------------------------------------------------------------------------------- rebound
def test_the_slo_model_does_not_scale_down_into_its_own_band() -> None:
    pol = policy(QUICK_DOWN, WIDE)
    slo = pol.slo
    assert slo is not None
    rps = 100.0
    inside, outside = size(slo, rps, slo.capacity_rps), size(slo, rps * (1 + REVERSAL_TOLERANCE), slo.capacity_rps)
    assert outside > inside  # 100 rps sits within the band below a replica's step
    run = Run(pol, replicas=outside + 3)
    run.run(300, 10, lambda _now: Metrics(demand(rps)))
    assert run.replicas == outside
    last = run.decisions[-1][1]
    assert last.reason is Reason.WOULD_FLAP and "slo would ask for" in last.message


def test_a_noisy_load_widens_the_band() -> None:
    pol = policy(QUICK_DOWN, WIDE)
    slo = pol.slo
    assert slo is not None
    steady = minutes([100.0] * 10, T0)
    noisy = minutes([100.0, 160.0] * 5, T0)  # swung by 60 % within the last ten minutes
    hist = History(data_since=T0 - dt.timedelta(hours=1), below_since={}, observed_at=T0 - dt.timedelta(seconds=10))
    calm = decide(pol, Observed(20, 20), Metrics(demand(100.0), history=steady), T0, hist)
    wide = decide(pol, Observed(20, 20), Metrics(demand(100.0), history=noisy), T0, hist)
    assert calm.desired == size(slo, 100.0 * (1 + REVERSAL_TOLERANCE), slo.capacity_rps)
    assert wide.desired == size(slo, 100.0 * 1.6, slo.capacity_rps) > calm.desired


@settings(max_examples=40, deadline=None)
@given(rps=st.floats(5, 300), current=st.integers(2, 30))
def test_no_scale_down_lands_inside_the_band(rps: float, current: int) -> None:
    pol = policy(QUICK_DOWN, {"min": 1, "max": 40})
    slo = pol.slo
    assert slo is not None
    hist = History(data_since=T0 - dt.timedelta(hours=1), observed_at=T0 - dt.timedelta(seconds=10))
    d = decide(pol, Observed(current, current), Metrics(demand(rps)), T0, hist)
    if d.desired < current:
        assert d.desired >= size(slo, rps * (1 + REVERSAL_TOLERANCE), slo.capacity_rps)


# ------------------------------------------------------------------------------------- undoing a scale-up
def _after_scale_up(load_then: float, ago: dt.timedelta) -> History:
    return History(
        data_since=T0 - dt.timedelta(hours=1),
        observed_at=T0 - dt.timedelta(seconds=10),
        last_up=(T0 - ago, load_then),
    )


def test_a_scale_down_does_not_undo_a_recent_scale_up_under_the_same_load() -> None:
    pol = policy(QUICK_DOWN, WIDE)
    recent = _after_scale_up(100.0, dt.timedelta(minutes=4))
    same = decide(pol, Observed(12, 12), Metrics(demand(90.0)), T0, recent)
    assert (same.desired, same.reason, same.rule) == (12, Reason.WOULD_FLAP, "would-flap")
    assert "would undo the scale-up of 4m ago" in same.message
    fell = decide(pol, Observed(12, 12), Metrics(demand(100.0 * (1 - REVERSAL_TOLERANCE) - 1)), T0, recent)
    assert fell.desired < 12  # the traffic turned: not a reversal, the pods go at once
    later = _after_scale_up(100.0, dt.timedelta(seconds=REVERSAL_WINDOW_S + 10))
    assert decide(pol, Observed(12, 12), Metrics(demand(90.0)), T0, later).desired < 12


def test_a_scale_up_remembers_the_load_it_answered() -> None:
    pol = policy({}, WIDE)
    d = decide(pol, Observed(1, 1), Metrics(demand(200.0)), T0, History())
    assert d.desired > 1 and d.history.last_up == (T0, 200.0)
    assert History.from_dict(d.history.to_dict()).last_up == (T0, 200.0)  # survives a restart


# ------------------------------------------------------------------------------------- rules between thresholds
WIDE_BAND = {"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 64, "sustainFor": "2m", "scaleDownBelow": 20}


def test_a_rule_between_its_thresholds_abstains_where_the_model_sizes() -> None:
    pol = policy({"triggers": [WIDE_BAND], **QUICK_DOWN})
    # 4 pods at 43 %: the rule neither asks for more nor below its 20 %; demand needs one pod.
    run = Run(pol, replicas=4)
    run.run(300, 10, lambda _now: Metrics({"gpu": 172 / run.ready, **demand(10.0, IMPLICIT_SLO)}))
    # At 3 pods the rule reads 57 % (63 % grown by its 10 % tolerance, under 64 %); at 2 it would
    # read 86 % and fire: the scale-down stops at 3.
    assert run.replicas == 3
    down = [d for _, d in run.decisions if d.changed]
    assert len(down) == 1 and "not" in down[0].message and "gpu would read" in down[0].message


def test_without_the_model_a_rule_between_its_thresholds_still_holds() -> None:
    pol = policy({"triggers": [WIDE_BAND], "slo": {"enabled": False}, **QUICK_DOWN})
    run = Run(pol, replicas=4)
    run.run(300, 10, lambda _now: Metrics({"gpu": 172 / run.ready}))
    assert run.replicas == 4


def test_noisy_gpu_samples_after_a_scale_down_do_not_flap_a_threshold_rule() -> None:
    """WouldFlap predicts an averaged rule's reading from the mean load it read over the last minutes
    (load = reading x ready pods), not from one sample. Pair 139 of the generalization bench (weekly
    traffic, GPU above 63 % for 1 min / below 31 %): per-step GPU samples are noisy, and checked
    against one low sample a scale-down stepped 10 -> 8 -> 6 until the rule fired again at 6, 76
    times a day (the KEDA + HPA model: 45)."""
    pair = next(p for p in generators.pairs(140, None) if p.index == 139)
    trace, ttsd, capacity = generators.build(pair)
    pol = ScalingPolicy.from_spec(ttsd["spec"])
    engine = VoxscaleAutoscaler(pol)
    window = rate_window(pol)
    run = simulate(
        trace,
        engine,
        capacity,
        pol.min_replicas,
        min_replicas=pol.min_replicas,
        stochastic=True,
        seed=pair.index,
        rate_window_seconds=window,
    )
    assert run.summary.reversals_per_day <= 2 and run.summary.within_slo_percent >= 99.9

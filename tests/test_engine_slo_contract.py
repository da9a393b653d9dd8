"""The SLO as the contract of every TTSDeployment (issue 21), on the pure engine.

A policy of threshold rules alone still gets the SLO model (spec.scaling.slo): overload is answered
from demand at once, every scale-down keeps what demand needs (N-1), a scale-down a rule would
answer with a scale-up is refused, and `spec.scaling.slo.enabled: false` turns all of it off.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.engine_helpers import T0, Run, policy
from voxscale.operator.engine import Metrics, Observed, Reason, decide
from voxscale.operator.policy import IMPLICIT_SLO, ScalingPolicy
from voxscale.operator.reversals import REVERSAL_TOLERANCE
from voxscale.operator.triggers.slo import size

GPU_3M = {"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 75, "sustainFor": "3m", "scaleDownBelow": 40}
FLAPPY = {"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 70, "sustainFor": "1m", "scaleDownBelow": 40}


def demand(rps: float, **inputs: float) -> dict[str, float]:
    """The implicit objective's door counters, keyed as the operator and the simulator key them."""
    return {IMPLICIT_SLO: rps, **{f"{IMPLICIT_SLO}.{k}": v for k, v in inputs.items()}}


def const_metrics(metrics: Metrics) -> Callable[[dt.datetime], Metrics]:
    return lambda _now: metrics


def needed(pol: ScalingPolicy, rps: float) -> int:
    assert pol.slo is not None
    return size(pol.slo, rps, pol.slo.capacity_rps)


def test_every_policy_gets_the_slo_model_with_the_crd_defaults() -> None:
    pol = policy({"triggers": [GPU_3M]})
    assert pol.objective is not None and pol.slo is pol.objective and pol.objective.name == IMPLICIT_SLO
    slo = pol.objective
    assert (slo.latency_seconds, slo.quantile, slo.capacity_rps, slo.rate_window.total_seconds()) == (2, 0.95, 16, 60)
    assert pol.queried == (*pol.triggers, pol.objective)  # the operator queries its door counters too


def test_an_slo_trigger_is_the_model_and_inherits_spec_scaling_slo() -> None:
    pol = policy({"slo": {"latencyP95": "1s", "replicaCapacity": 8}, "triggers": [{"name": "s", "type": "slo"}]})
    assert pol.objective is None and pol.slo is pol.triggers[0]
    assert (pol.slo.latency_seconds, pol.slo.capacity_rps) == (1.0, 8.0)  # stated once, in spec.scaling.slo
    own = policy({"slo": {"latencyP95": "1s"}, "triggers": [{"name": "s", "type": "slo", "slo": {"latencyP95": "3s"}}]})
    assert own.triggers[0].latency_seconds == 3.0


def test_overload_is_sized_from_demand_at_once_despite_sustain_clock_window_and_step_limit() -> None:
    pol = policy(
        {
            "triggers": [GPU_3M],
            "scaleUp": {"stabilizationWindow": "2m", "maxStepPods": 1, "maxStepPercent": 1, "cooldown": "5m"},
        }
    )
    need = needed(pol, 70)
    assert need >= 5
    d = decide(pol, Observed(2, 2), Metrics({"gpu": 99, **demand(70, p95=4.5)}), T0)
    assert (d.desired, d.reason, d.rule) == (need, Reason.TRIGGER, "slo")
    # The decision names what won: what the rule asks beside what demand needs.
    assert d.message.startswith("rule gpu asks nothing; demand 70 rps needs")
    assert f"for p95 2s (p95 4.5s beyond the 2s objective): 2 -> {need}" in d.message
    assert d.demand is not None and d.demand.overload is not None


def test_without_overload_a_demand_floor_respects_the_scale_up_window() -> None:
    pol = policy({"triggers": [GPU_3M], "scaleUp": {"stabilizationWindow": "1m"}})
    run = Run(pol, replicas=2)
    run.run(60, 10, lambda _now: Metrics({"gpu": 30, **demand(10, p95=0.6)}))
    risen = run.run(90, 10, lambda _now: Metrics({"gpu": 50, **demand(40, p95=0.6)}))  # < 2x the ready 32 rps
    assert (risen[0].desired, risen[0].reason) == (2, Reason.STABILIZING)
    assert risen[-1].desired == needed(pol, 40) > 2


def test_demand_at_twice_the_ready_capacity_is_overload_that_holds_scale_down() -> None:
    pol = policy({"triggers": [GPU_3M], "scaleDown": {"stabilizationWindow": "30s"}})
    d = decide(pol, Observed(6, 1), Metrics({"gpu": 10, **demand(40)}), T0)
    assert d.demand is not None and d.demand.overload is not None and "ready capacity" in d.demand.overload
    run = Run(pol, replicas=6)
    held = run.run(120, 10, lambda _now: Metrics({"gpu": 10, **demand(1, p95=3.0)}))  # p95 beyond the objective
    assert all(d.desired == 6 for d in held) and held[-1].reason is Reason.OVERLOAD


def test_a_scale_down_a_rule_would_answer_with_a_scale_up_is_refused_naming_the_rule() -> None:
    pol = policy({"triggers": [FLAPPY], "scaleDown": {"stabilizationWindow": "1m"}})
    run = Run(pol, replicas=2)
    held = run.run(180, 10, lambda _now: Metrics({"gpu": 39}))  # at 1 replica: 78 % > 70 %
    assert all(d.desired == 2 for d in held)
    assert held[-1].reason is Reason.WOULD_FLAP and held[-1].rule == "would-flap"
    assert "gpu would read 78% > 70%" in held[-1].message
    calm = Run(pol, replicas=2)
    calm.run(180, 10, lambda _now: Metrics({"gpu": 30}))  # 60 % at 1: no fight
    assert calm.replicas == 1


def test_a_scale_down_stops_at_the_lowest_count_no_rule_fights() -> None:
    pol = policy({"triggers": [FLAPPY], "scaleDown": {"stabilizationWindow": "1m"}}, {"min": 1, "max": 10})
    run = Run(pol, replicas=8)
    run.run(180, 10, lambda _now: Metrics({"gpu": 240 / run.ready}))  # 8 pods read 30 %, 4 would read 60 %
    assert run.replicas == 4
    down = [d for _, d in run.decisions if d.changed]
    assert down[0].desired == 4 and "not 1: gpu would read 80% > 70%" in down[0].message


def test_opting_out_turns_the_implicit_model_off() -> None:
    scaling: dict[str, Any] = {"triggers": [GPU_3M], "scaleDown": {"stabilizationWindow": "1m"}}
    off = policy({**scaling, "slo": {"enabled": False}})
    assert off.objective is None and off.slo is None and off.queried == off.triggers
    metrics = Metrics({"gpu": 10, **demand(60)})
    run = Run(off, replicas=6)
    run.run(120, 10, lambda _now: metrics)
    assert run.replicas == 1  # the rules alone: nothing holds the fleet for the demand
    on = Run(policy(scaling), replicas=6)
    on.run(120, 10, lambda _now: metrics)
    # What 60 rps needs, out of the rebound band: a scale-down survives a rise of REVERSAL_TOLERANCE.
    assert on.replicas == needed(on.policy, 60 * (1 + REVERSAL_TOLERANCE))


RULES = st.sampled_from(
    [
        FLAPPY,
        GPU_3M,
        {"name": "gpu", "type": "gpuUtilization", "target": 60, "scaleDownBelow": 30},
        {"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 60, "sustainFor": "0s", "scaleDownBelow": 50},
    ]
)


@settings(max_examples=60, deadline=None)
@given(
    rule=RULES,
    levels=st.lists(st.tuples(st.floats(0, 300), st.floats(0, 120)), min_size=1, max_size=4),
    start=st.integers(1, 12),
)
def test_every_scale_down_keeps_what_demand_needs(
    rule: dict[str, Any], levels: list[tuple[float, float]], start: int
) -> None:
    pol = policy({"triggers": [rule], "scaleDown": {"stabilizationWindow": "1m"}}, {"min": 1, "max": 12})
    run = Run(pol, replicas=start)
    for rps, gpu in levels:
        for d in run.run(300, 10, const_metrics(Metrics({"gpu": gpu, **demand(rps)}))):
            if d.desired < d.current:
                assert d.desired >= min(needed(pol, rps), pol.max_replicas), d.message


@settings(max_examples=60, deadline=None)
@given(rule=RULES, load=st.floats(0, 900), start=st.integers(1, 12))
def test_no_scale_up_follows_a_scale_down_under_constant_work(rule: dict[str, Any], load: float, start: int) -> None:
    """The work is constant and spreads over the pods (GPU % = work / ready pods), as it does in a
    fleet: whatever the rule's thresholds, a scale-down is never answered by a scale-up."""
    pol = policy({"triggers": [rule], "scaleDown": {"stabilizationWindow": "1m"}}, {"min": 1, "max": 12})
    run = Run(pol, replicas=start)
    run.run(3600, 10, lambda _now: Metrics({"gpu": min(100.0, load / max(run.ready, 1))}))
    moves = [1 if to > frm else -1 for _, frm, to, _ in run.changes()]
    assert all(not (a == -1 and b == 1) for a, b in itertools.pairwise(moves)), run.changes()


def test_a_schedule_ends_no_faster_than_the_scale_down_window() -> None:
    pol = policy(
        {
            "triggers": [{"name": "gpu", "type": "gpuUtilization", "target": 60, "scaleDownBelow": 40}],
            "schedules": [{"name": "day", "cron": "0 1 * * *", "duration": "1h", "minReplicas": 8}],
            "scaleDown": {"stabilizationWindow": "5m", "maxStepPods": 2, "maxStepPercent": 1, "period": "1m"},
        }
    )
    run = Run(pol, replicas=8, now=T0 + dt.timedelta(hours=1, minutes=50))
    run.run(30 * 60, 10, lambda _now: Metrics({"gpu": 20}))  # the window ends at 02:00
    changes = [(t, d.current, d.desired) for t, d in run.decisions if d.changed]
    assert changes[0][0] == T0 + dt.timedelta(hours=2, minutes=5)  # held for the 5m window
    assert all(frm - to <= 2 for _, frm, to in changes)  # then 2 pods a minute

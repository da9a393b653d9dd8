"""Reversals (operator/reversals.py): one definition for the simulator, the operator's status and
metrics, and the Flapping condition (issue 21, item 2)."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from voxscale.operator import crd, status
from voxscale.operator.engine import Decision, History, Metrics, Observed, decide
from voxscale.operator.policy import ScalingPolicy
from voxscale.operator.reversals import (
    FLAPPING_HORIZON_S,
    REVERSAL_TOLERANCE,
    REVERSAL_WINDOW_S,
    Flapping,
    Move,
    count_reversals,
    flapping,
)


def test_a_move_undone_within_the_window_at_the_same_load_is_a_reversal() -> None:
    up, down = Move(0, True, 100.0, "gpu"), Move(300, False, 110.0, "gpu")
    assert count_reversals([up, down]) == 1
    assert count_reversals([up, Move(REVERSAL_WINDOW_S + 1, False, 100.0)]) == 0  # too late to be a flap
    assert count_reversals([up, Move(300, False, 100.0 * (1 - REVERSAL_TOLERANCE) - 1)]) == 0  # traffic fell
    assert count_reversals([up, Move(300, True, 100.0)]) == 0  # the same way twice
    assert count_reversals([up, Move(300, False, None)]) == 0  # no load measured: cannot tell


@given(st.lists(st.tuples(st.floats(0, 100), st.booleans(), st.one_of(st.none(), st.floats(0, 1e3))), max_size=30))
def test_reversals_are_fewer_than_moves_and_need_a_change_of_direction(raw: list[tuple[float, bool, float]]) -> None:
    t, moves = 0.0, []
    for gap, up, load in raw:
        t += gap
        moves.append(Move(t, up, load))
    n = count_reversals(moves)
    assert 0 <= n <= max(0, len(moves) - 1)
    same_way = [Move(m.t, True, m.load) for m in moves]
    assert count_reversals(same_way) == 0


def test_flapping_names_the_rules_of_the_last_hour_only() -> None:
    old = [Move(0, True, 50.0, "queue"), Move(60, False, 50.0, "queue")]
    recent = [Move(5000, True, 50.0, "gpu"), Move(5100, False, 52.0, "cooldown"), Move(5200, True, 51.0, "gpu")]
    state = flapping([*old, *recent], now=5300)
    assert state == Flapping(2, ("gpu", "cooldown"))
    assert state.flapping and "gpu and cooldown fight" in state.message()
    assert flapping(old, now=60 + FLAPPING_HORIZON_S + 1) == Flapping(0, ())


def _decision(now: dt.datetime) -> Decision:
    spec = crd.default_spec({"model": {"image": "x"}, "replicas": {"min": 1, "max": 4}})
    return decide(ScalingPolicy.from_spec(spec), Observed(3, 3), Metrics({}), now)


def test_status_carries_the_flapping_condition_and_the_reversals() -> None:
    now = dt.datetime(2026, 3, 2, 9, tzinfo=dt.UTC)
    seen = status.Observation(generation=1, replicas=3, ready=3, min_replicas=1, deployment_found=True)
    fighting = status.build({}, replace(seen, flapping=Flapping(3, ("gpu",))), _decision(now), History(), now)
    (cond,) = [c for c in fighting["conditions"] if c["type"] == "Flapping"]
    assert (cond["status"], cond["reason"]) == ("True", "RulesFight") and "gpu fight" in cond["message"]
    assert fighting["reversals"] == {"lastHour": 3, "rules": ["gpu"]}
    calm = status.build({}, replace(seen, flapping=Flapping(0, ())), _decision(now), History(), now)
    (cond,) = [c for c in calm["conditions"] if c["type"] == "Flapping"]
    assert (cond["status"], cond["reason"]) == ("False", "Steady") and "reversals" not in calm


def test_the_simulator_names_the_rules_whose_moves_were_undone() -> None:
    from voxscale.simulator.run import fighting_rules

    moves = [Move(0, True, 50.0, "gpu"), Move(100, False, 50.0, "queue"), Move(200, True, 50.0, "gpu")]
    assert fighting_rules(moves) == {"gpu": 2, "queue": 2}
    assert fighting_rules([Move(0, True, 50.0), Move(100, False, 50.0)]) == {}  # a baseline names none

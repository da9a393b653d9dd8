"""The scaler builds a status document only when it may write it (issue 24): whether to write is
decided on `status.significant_of`, which must equal `significant(build(...))` for every input, and
the write rule itself (a significant change at once; an unchanged status refreshed after
STATUS_REFRESH_SECONDS within the shared budget) must be what it was when every evaluation built the
document. A spec's children are computed per spec generation, not per round."""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from tests.engine_helpers import T0, Run, policy
from tests.kube_helpers import RecordingKube
from voxscale.operator import status as st
from voxscale.operator.engine import Metrics
from voxscale.operator.kube import Kube, PodStarts
from voxscale.operator.reversals import Move, flapping
from voxscale.operator.scaler import STATUS_REFRESH_SECONDS, Scaler
from voxscale.operator.writes import TokenBucket

POLICIES = [
    {"triggers": [{"name": "q", "type": "queueLength", "target": 4}]},
    {"triggers": [{"name": "g", "type": "gpuUtilization", "scaleUpAbove": 75, "scaleDownBelow": 40}]},
    {"triggers": [{"name": "s", "type": "slo", "slo": {"latencyP95": "2s", "replicaCapacity": 16}}]},
]
TEXT = hst.sampled_from(["HorizontalPodAutoscaler ns/h", "TTSDeployment ns/other", "HTTP 403: Forbidden"])


@hst.composite
def inputs(draw: hst.DrawFn) -> tuple[dict[str, Any], st.Observation, Any, Any, dt.datetime]:
    """A decision and history from the real engine after a random metric stream, a random observation
    around it, and a previous status (none, or a built one)."""
    run = Run(policy(draw(hst.sampled_from(POLICIES))), replicas=draw(hst.integers(1, 6)))
    values = draw(hst.lists(hst.one_of(hst.none(), hst.floats(0, 200)), min_size=1, max_size=8))
    decision = None
    for value in values:
        name = run.policy.triggers[0].name
        metrics = Metrics({name: value}) if value is not None else Metrics(error="no data")
        decision = run.tick(metrics)
        run.now += dt.timedelta(seconds=draw(hst.sampled_from([5, 10, 60])))
    if draw(hst.booleans()):
        decision = None
    moves = [Move(float(i * 60), i % 2 == 0, 10.0, "q") for i in range(draw(hst.integers(0, 4)))]
    seen = st.Observation(
        generation=draw(hst.integers(1, 3)),
        replicas=draw(hst.integers(0, 6)),
        ready=draw(hst.integers(0, 6)),
        min_replicas=draw(hst.integers(0, 3)),
        deployment_found=draw(hst.booleans()),
        spec_error=draw(hst.one_of(hst.none(), hst.just("spec.scaling: bad"))),
        paused=draw(hst.booleans()),
        advisory=draw(hst.booleans()),
        conflict=draw(hst.one_of(hst.none(), TEXT)),
        pending=draw(hst.one_of(hst.none(), hst.just(("OverBudget", "no answer")))),
        target=draw(hst.one_of(hst.none(), hst.just("Deployment ns/web"))),
        target_problem=draw(hst.one_of(hst.none(), TEXT)),
        shadowing=draw(hst.one_of(hst.none(), TEXT)),
        flapping=flapping(moves, 300.0) if decision is not None else None,
        start_phases=tuple(draw(hst.lists(hst.tuples(*[hst.floats(0, 60)] * 3), max_size=3))),
    )
    now = run.now
    previous: dict[str, Any] = {}
    if draw(hst.booleans()):
        earlier = draw(hst.sampled_from([now, now - dt.timedelta(seconds=30)]))
        previous = st.build({}, seen, decision, run.history, earlier)
        if draw(hst.booleans()):
            previous["lastScaleTime"] = "2026-01-01T00:00:00Z"
    return previous, seen, decision, run.history, now


@settings(max_examples=300, deadline=None)
@given(inputs())
def test_significant_of_equals_the_significant_part_of_the_built_status(
    case: tuple[dict[str, Any], st.Observation, Any, Any, dt.datetime],
) -> None:
    previous, seen, decision, history, now = case
    assert st.significant_of(previous, seen, decision, history, now) == st.significant(
        st.build(previous, seen, decision, history, now)
    )


# ------------------------------------------------------------------ the scaler's write rule
class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def ttsd(generation: int = 1, network_policy: bool = False) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": "a", "generation": generation, "uid": "u1"},
        "spec": {
            "model": {"image": "tts:1"},
            "replicas": {"min": 1, "max": 10},
            "scaling": {"triggers": [{"name": "q", "type": "queueLength", "target": 4}]},
            "networkPolicy": {"enabled": network_policy},
        },
    }


class Dep:
    def __init__(self, replicas: int) -> None:
        self.spec = type("S", (), {"replicas": replicas})()
        self.status = type("T", (), {"ready_replicas": replicas})()


def test_the_document_is_built_only_when_it_may_be_written(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr("voxscale.operator.scaler.time.monotonic", clock)
    built: list[int] = []
    real_build = st.build

    def counted_build(*args: Any) -> dict[str, Any]:
        built.append(1)
        return real_build(*args)

    monkeypatch.setattr(st, "build", counted_build)
    kube = RecordingKube()
    scaler = Scaler(cast(Kube, kube))
    scaler._refreshes = TokenBucket(rate=1, burst=1, clock=clock)
    scaler.upsert(ttsd())
    tr = scaler.tracked[("ns", "a")]

    def evaluate(at: dt.datetime, queue: float = 4.0, replicas: int = 2) -> None:
        scaler._evaluate(tr, Dep(replicas), Metrics({"q": queue}), at, PodStarts())

    evaluate(T0)
    assert (len(built), len(kube.writes)) == (1, 1)  # the first status: built and written
    clock.t += 5
    evaluate(T0 + dt.timedelta(seconds=10))  # only the decision's time moved, within the refresh period
    assert (len(built), len(kube.writes)) == (1, 1)
    clock.t += STATUS_REFRESH_SECONDS
    assert scaler._refreshes.take()  # someone else spent the budget
    evaluate(T0 + dt.timedelta(seconds=40))
    assert (len(built), len(kube.writes)) == (1, 1)  # a refresh is due, but no budget: not even built
    clock.t += 1  # one token back
    evaluate(T0 + dt.timedelta(seconds=41))
    assert (len(built), len(kube.writes)) == (2, 2)  # refreshed
    assert kube.statuses[-1]["lastDecision"]["time"] == "2026-03-02T00:00:41Z"
    clock.t += 1
    evaluate(T0 + dt.timedelta(seconds=42), queue=40.0)  # a scale-up: written at once, out of budget
    assert (len(built), len(kube.writes)) == (3, 3)
    assert kube.statuses[-1]["desiredReplicas"] > 2


def test_the_children_a_spec_asks_for_follow_its_generation() -> None:
    kube = RecordingKube()
    scaler = Scaler(cast(Kube, kube))
    scaler.upsert(ttsd())
    tr = scaler.tracked[("ns", "a")]
    scaler._restore_children(tr, {"Service"})
    assert kube.applied == []  # all there: min 1 has no PDB, the NetworkPolicy is off
    scaler.upsert(ttsd(generation=2, network_policy=True))
    scaler._restore_children(tr, {"Service"})
    assert kube.applied == ["a"]  # the new generation asks for a NetworkPolicy: applied
    scaler.upsert(ttsd(generation=3, network_policy=False))
    kube.applied.clear()
    scaler._restore_children(tr, {"Service"})
    assert kube.applied == []

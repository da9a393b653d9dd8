"""An operator round that does not grow with the fleet (issue 24), on plain objects: a status nothing
acts on changed in (the last decision's time, a running clock) is refreshed only within a shared
budget of writes per second, while a change a user or a controller acts on is written at once;
statuses are written off the round's path, newest first-come; a round evaluates what fits in its
budget, the longest-waiting first, and leaves the rest for the next."""

from __future__ import annotations

import datetime as dt
import threading
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as hst

from tests.kube_helpers import RecordingKube
from voxscale.operator.engine import Metrics
from voxscale.operator.kube import Kube, PodStarts
from voxscale.operator.scaler import EVALUATION_BUDGET_SECONDS, MIN_OBJECTS_PER_ROUND, STATUS_REFRESH_SECONDS, Scaler
from voxscale.operator.writes import StatusWriter, TokenBucket

NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def ttsd(name: str) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": name, "generation": 1},
        "spec": {
            "model": {"image": "tts:1"},
            "replicas": {"min": 1, "max": 10},
            "scaling": {"triggers": [{"name": "q", "type": "queueLength", "target": 4}]},
        },
    }


def round_over(scaler: Scaler, names: list[str], now: dt.datetime, queue: float = 4.0) -> None:
    dep = SimpleNamespace(spec=SimpleNamespace(replicas=2), status=SimpleNamespace(ready_replicas=2))
    for name in names:
        scaler._evaluate(scaler.tracked[("ns", name)], dep, Metrics({"q": queue}), now, PodStarts())


def test_unchanged_status_refreshes_share_a_budget_and_changes_are_written_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    monkeypatch.setattr("voxscale.operator.scaler.time.monotonic", clock)
    kube = RecordingKube()
    scaler = Scaler(cast(Kube, kube))
    scaler._refreshes = TokenBucket(rate=5, burst=50, clock=clock)
    names = [f"tts-{i:03d}" for i in range(300)]
    for name in names:
        scaler.upsert(ttsd(name))
    round_over(scaler, names, NOW)
    assert len(kube.writes) == 300  # the first status of each: written, no budget asked

    kube.writes.clear()
    clock.t += STATUS_REFRESH_SECONDS + 1
    round_over(scaler, names, NOW + dt.timedelta(seconds=40))  # only the decision's time moved
    assert len(kube.writes) == 50  # the burst, not 300

    kube.writes.clear()
    clock.t += 10  # 10 s at 5 a second
    round_over(scaler, names, NOW + dt.timedelta(seconds=50))
    assert len(kube.writes) == 50

    kube.writes.clear()
    clock.t += 0.1
    round_over(scaler, names, NOW + dt.timedelta(seconds=51), queue=40.0)  # a scale-up: acted on
    assert len(kube.writes) == 300


@given(hst.lists(hst.floats(min_value=0, max_value=5), min_size=1, max_size=60))
def test_a_token_bucket_never_gives_more_than_its_burst_plus_rate_times_time(gaps: list[float]) -> None:
    clock = Clock()
    bucket = TokenBucket(rate=2, burst=4, clock=clock)
    start, taken = clock.t, 0
    for gap in gaps:
        clock.t += gap
        taken += sum(bucket.take() for _ in range(3))
        assert taken <= 4 + 2 * (clock.t - start) + 1e-9


# ------------------------------------------------------------------ the background writer
class SlowApi:
    """A status endpoint that holds each write until released, recording what arrived."""

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)
        self.seen: list[tuple[str, int]] = []

    def write(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self.gate.acquire(timeout=10)
        if name == "broken":
            raise RuntimeError("HTTP 404")
        self.seen.append((name, status["n"]))


def test_the_writer_writes_each_objects_newest_status_once_in_order_and_survives_a_failure() -> None:
    api = SlowApi()
    writer = StatusWriter(api.write).start()
    try:
        writer.put(("ns", "a"), {"n": 1})  # taken at once, held at the gate
        time.sleep(0.1)
        for n in (2, 3, 4):
            writer.put(("ns", "b"), {"n": n})  # b queued, then replaced twice before it is written
        writer.put(("ns", "broken"), {"n": 0})
        writer.put(("ns", "gone"), {"n": 0})
        writer.forget(("ns", "gone"))  # deleted meanwhile
        writer.put(("ns", "c"), {"n": 5})
        writer.put(("ns", "a"), {"n": 6})
        for _ in range(10):
            api.gate.release()
        assert writer.flush(10)
        assert api.seen == [("a", 1), ("b", 4), ("c", 5), ("a", 6)]
        assert writer.coalesced == 2 and writer.written == 4
    finally:
        writer.stop()


# ------------------------------------------------------------------ rounds that spread a large fleet
def test_a_round_takes_the_longest_waiting_objects_that_fit_its_budget() -> None:
    scaler = Scaler(cast(Kube, RecordingKube()))
    for i in range(1000):
        scaler.upsert(ttsd(f"tts-{i:04d}"))
    for i, tr in enumerate(scaler.tracked.values()):
        tr.next_due = 1000.0 - i  # the last upserted has waited longest
    scaler._seconds_per_object = EVALUATION_BUDGET_SECONDS / 300  # measured: 300 fit
    chosen, deferred = scaler._this_round(scaler.due(2000.0))
    assert len(chosen) == 300 and deferred == 700
    assert [tr.key[1] for tr in chosen[:2]] == ["tts-0999", "tts-0998"]
    assert max(tr.next_due for tr in chosen) <= min(tr.next_due for tr in scaler.tracked.values() if tr not in chosen)
    scaler._seconds_per_object = 10.0  # a very slow API server: still a useful round
    assert len(scaler._this_round(scaler.due(2000.0))[0]) == MIN_OBJECTS_PER_ROUND
    scaler._seconds_per_object = 1e-9
    assert scaler._this_round(scaler.due(2000.0))[1] == 0  # a cheap fleet: everything due, in one round

"""Each example manifest, through the real engine on an injected clock, does what its comments promise."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from pathlib import Path

import pytest

from tests.engine_helpers import Run
from voxscale.operator.engine import Metrics, Observed, decide
from voxscale.operator.policy import ScalingPolicy
from voxscale.simulator.cli import load_manifest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(name: str) -> ScalingPolicy:
    return ScalingPolicy.from_spec(load_manifest(EXAMPLES / name)["spec"])


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_validates_against_the_crd(path: Path) -> None:
    assert load_manifest(path)["spec"]["replicas"]["max"] >= 1


def test_education_prewarms_from_3_to_10_ten_minutes_before_0800_shanghai() -> None:
    pol = example("education-morning-peak.yaml")
    tz = zoneinfo.ZoneInfo("Asia/Shanghai")
    quiet = Metrics({"gpu": 30, "slo": 20.0})
    assert decide(pol, Observed(3, 3), quiet, dt.datetime(2026, 3, 2, 7, 49, 59, tzinfo=tz)).desired == 3
    d = decide(pol, Observed(3, 3), quiet, dt.datetime(2026, 3, 2, 7, 50, tzinfo=tz))
    assert (d.desired, d.rule) == (10, "schedule:morning-peak")


def test_game_studio_runs_5_by_day_and_2_at_night() -> None:
    pol = example("game-studio-day-night.yaml")
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    low = {"gpu": 20.0, "queue": 0.0, "slo": 10.0}
    run = Run(pol, replicas=2, now=dt.datetime(2026, 1, 6, 6, 50, tzinfo=berlin))
    run.run(20 * 60, 10, lambda _now: Metrics(dict(low)))
    assert run.replicas == 5  # 07:00 floor
    run.now = dt.datetime(2026, 1, 7, 0, 50, tzinfo=berlin)
    run.run(30 * 60, 10, lambda _now: Metrics(dict(low)))
    assert run.replicas == 2  # after 01:00, quiet: back to min in steps of 3


def test_course_launch_scales_on_gpu_or_queue_capped_at_10_and_falls_back_to_4() -> None:
    pol = example("course-launch-burst.yaml")
    start = dt.datetime(2026, 3, 2, 9, tzinfo=dt.UTC)
    run = Run(pol, replicas=2, now=start)
    run.run(120, 5, lambda _now: Metrics({"gpu": 50, "queue": 400, "p95": 1.0, "slo": 30.0}))  # queue alone crosses
    assert run.replicas == 10 and max(d.desired for _, d in run.decisions) == 10
    assert decide(pol, Observed(2, 2), Metrics(error="Prometheus unreachable"), start).desired == 4

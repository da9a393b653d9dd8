"""The seed documents' rules, replayed through the pure engine on an injected clock, to the second."""

from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from tests.engine_helpers import T0, Run, const, policy
from voxscale.operator.engine import Metrics, Observed, decide
from voxscale.operator.policy import SpecError

GPU_75_FOR_3M = {"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 75, "sustainFor": "3m", "scaleDownBelow": 40}
QUEUE_20_FOR_2M = {"name": "queue", "type": "queueLength", "scaleUpAbove": 20, "sustainFor": "2m"}


def test_gpu_above_75_for_3_minutes_scales_up_at_exactly_3_minutes() -> None:
    run = Run(policy({"triggers": [GPU_75_FOR_3M]}), replicas=3)
    run.run(180, 1, const(gpu=80))  # t = 0..179 s: above, but not for 3 minutes yet
    assert run.changes() == []
    d = run.tick(Metrics({"gpu": 80}))  # t = 180 s
    assert (d.current, d.desired, d.rule) == (3, 7, "gpu")
    assert d.message == "gpu 80% > 75% for 3m: 3 -> 7"


def test_gpu_dip_below_threshold_restarts_the_sustain_clock() -> None:
    run = Run(policy({"triggers": [GPU_75_FOR_3M]}), replicas=3)
    run.run(120, 1, const(gpu=80))
    run.tick(Metrics({"gpu": 70}))  # t = 120: one sample below
    run.now += dt.timedelta(seconds=1)
    run.run(180, 1, const(gpu=80))  # t = 121..300: above again since t = 121
    assert run.changes() == []
    assert run.tick(Metrics({"gpu": 80})).desired == 7  # t = 301 = 121 + 3m


def test_queue_above_20_for_2_minutes_scales_up_while_gpu_is_below_its_threshold() -> None:
    run = Run(policy({"triggers": [GPU_75_FOR_3M, QUEUE_20_FOR_2M]}), replicas=2)
    run.run(120, 1, const(gpu=30, queue=31))
    assert run.changes() == []
    d = run.tick(Metrics({"gpu": 30, "queue": 31}))  # t = 120
    assert (d.desired, d.rule) == (6, "queue")
    assert d.message == "queue 31 > 20 for 2m: 2 -> 6"


def test_gpu_70_or_queue_15_never_exceeds_the_cap_of_10() -> None:
    triggers = [
        {"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 70},
        {"name": "queue", "type": "queueLength", "scaleUpAbove": 15},
    ]
    run = Run(policy({"triggers": triggers, "scaleUp": {"period": "10s"}}, {"min": 1, "max": 10}), replicas=1)
    run.run(60, 10, const(gpu=50, queue=40))  # queue alone crosses: the OR holds
    assert run.replicas > 1
    run.run(300, 10, const(gpu=95, queue=400))
    assert run.replicas == 10
    assert max(d.desired for _, d in run.decisions) == 10


def test_pods_still_starting_are_capacity_on_its_way() -> None:
    gpu_70 = {"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 70}
    pol = policy({"triggers": [gpu_70], "scaleUp": {"period": "1s"}}, {"min": 1, "max": 20})
    run = Run(pol, replicas=2, cold_start=dt.timedelta(seconds=45))
    run.run(45, 1, const(gpu=90))  # t = 0: 2 -> 6; t = 1..44 the new pods are loading their model
    assert run.changes() == [(0.0, 2, 6, "gpu")]
    assert "4 pod(s) still starting" in run.decisions[-1][1].message
    run.tick(Metrics({"gpu": 90}))  # t = 45: they are Ready and the load is still high: the next step
    assert run.changes()[-1] == (45.0, 6, 12, "gpu")


def test_proportional_gpu_target_counts_ready_pods_only() -> None:
    pol = policy({"triggers": [{"name": "gpu", "type": "gpuUtilization", "target": 60}]})
    # 2 ready at 90% -> 3 needed; 1 more is already starting, so nothing to add.
    assert decide(pol, Observed(replicas=3, ready=2), Metrics({"gpu": 90}), T0).desired == 3
    assert decide(pol, Observed(replicas=2, ready=2), Metrics({"gpu": 90}), T0).desired == 3
    # Within the 10% tolerance: no change.
    assert decide(pol, Observed(replicas=4, ready=4), Metrics({"gpu": 64}), T0).desired == 4


def test_scale_down_only_after_gpu_below_40_for_the_whole_10_minute_window() -> None:
    pol = policy(
        {
            "triggers": [GPU_75_FOR_3M],
            "scaleDown": {
                "stabilizationWindow": "10m",
                "maxStepPods": 1,
                "maxStepPercent": 1,
                "period": "1m",
                "cooldown": "0s",
            },
        },
        {"min": 2, "max": 10},
    )
    run = Run(pol, replicas=6)
    run.run(60, 5, const(gpu=55))  # t = 0..55: not below 40
    run.run(600, 5, const(gpu=30))  # t = 60..655: below since t = 60
    assert run.changes() == []
    d = run.tick(Metrics({"gpu": 30}))  # t = 660 = 60 + 10m
    assert (d.current, d.desired, d.rule) == (6, 5, "scale-down")
    assert d.message == "gpu 30 < 40% for 10m: 6 -> 5"
    run.now += dt.timedelta(seconds=5)
    run.run(600, 5, const(gpu=30))
    steps = run.changes()
    assert [s[2] for s in steps] == [5, 4, 3, 2]  # one pod per minute, never below min
    assert [s[0] for s in steps] == [660.0, 720.0, 780.0, 840.0]


def test_prewarm_reaches_10_replicas_10_minutes_before_0800_local_time() -> None:
    shanghai = zoneinfo.ZoneInfo("Asia/Shanghai")
    pol = policy(
        {
            "schedules": [
                {
                    "name": "morning-peak",
                    "cron": "0 8 * * *",
                    "timezone": "Asia/Shanghai",
                    "duration": "4h",
                    "minReplicas": 10,
                    "prewarm": "10m",
                }
            ]
        },
        {"min": 3, "max": 12},
    )
    before = dt.datetime(2026, 3, 2, 7, 49, 59, tzinfo=shanghai)
    at = dt.datetime(2026, 3, 2, 7, 50, 0, tzinfo=shanghai)
    assert decide(pol, Observed(3, 3), Metrics(), before).desired == 3
    d = decide(pol, Observed(3, 3), Metrics(), at)
    assert (d.desired, d.rule, d.active_schedule) == (10, "schedule:morning-peak", "morning-peak")
    assert d.message == "schedule morning-peak floor 10: 3 -> 10"
    # The floor holds through the window however quiet it is, and lifts at 12:00.
    noon = dt.datetime(2026, 3, 2, 11, 59, 59, tzinfo=shanghai)
    assert decide(pol, Observed(10, 10), Metrics(), noon).schedule_floor == 10
    assert decide(pol, Observed(10, 10), Metrics(), noon + dt.timedelta(seconds=1)).schedule_floor == 0


def test_schedule_is_dst_safe() -> None:
    # Europe/Berlin springs forward on 2026-03-29: 08:00 local is 06:00 UTC after, 07:00 UTC before.
    pol = policy(
        {
            "schedules": [
                {"name": "peak", "cron": "0 8 * * *", "timezone": "Europe/Berlin", "duration": "1h", "minReplicas": 5}
            ]
        },
        {"min": 1, "max": 10},
    )
    for day, utc_hour in ((28, 7), (29, 6), (30, 6)):
        start = dt.datetime(2026, 3, day, utc_hour, 0, 0, tzinfo=dt.UTC)
        assert decide(pol, Observed(1, 1), Metrics(), start - dt.timedelta(seconds=1)).desired == 1, day
        assert decide(pol, Observed(1, 1), Metrics(), start).desired == 5, day


def test_night_2_day_5_game_studio_schedule() -> None:
    # Nightly 01:00 -> 2 replicas, 07:00 -> 5: min 2 with a day window 07:00-01:00 at floor 5.
    pol = policy(
        {
            "triggers": [{"name": "gpu", "type": "gpuUtilization", "target": 60, "scaleDownBelow": 40}],
            "schedules": [{"name": "day", "cron": "0 7 * * *", "duration": "18h", "minReplicas": 5}],
            "scaleDown": {"stabilizationWindow": "5m", "maxStepPods": 3, "cooldown": "0s"},
        },
        {"min": 2, "max": 10},
    )
    run = Run(pol, replicas=2, now=dt.datetime(2026, 3, 2, 6, 50, tzinfo=dt.UTC))
    run.run(20 * 60, 10, const(gpu=20))  # 06:50 -> 07:10
    assert [(c[1], c[2], c[3]) for c in run.changes()] == [(2, 5, "schedule:day")]
    assert run.decisions[-1][1].active_schedule == "day"
    run.now = dt.datetime(2026, 3, 3, 0, 50, tzinfo=dt.UTC)
    run.run(20 * 60, 10, const(gpu=20))  # 00:50 -> 01:10: the window ends at 01:00
    night = [(t, d) for t, d in run.decisions if d.changed and t.hour == 1]
    # The end of a window lowers the count as the scale-down rules do: after the 5m window, not at once.
    assert night[0][0] == dt.datetime(2026, 3, 3, 1, 5, tzinfo=dt.UTC)
    assert (night[0][1].current, night[0][1].desired) == (5, 2)


def test_missing_data_holds_and_recovers() -> None:
    pol = policy({"triggers": [GPU_75_FOR_3M], "scaleDown": {"stabilizationWindow": "1m", "cooldown": "0s"}})
    run = Run(pol, replicas=5)
    down = run.run(120, 5, lambda _now: Metrics(error="Prometheus at http://prom:9090 unreachable"))
    assert all(d.desired == 5 and not d.metrics_available for d in down)
    assert "unreachable" in down[-1].metrics_message
    empty = run.run(120, 5, lambda _now: Metrics({}))  # an empty result is not zero load either
    assert all(d.desired == 5 for d in empty)
    assert "empty result is not read as zero" in empty[-1].metrics_message
    back = run.run(30, 5, const(gpu=10))
    assert back[0].metrics_available and all(d.desired == 5 for d in back)  # the window restarts with data
    later = run.run(120, 5, const(gpu=10))
    assert any(d.desired < 5 for d in later)


def test_fallback_fixed_goes_up_not_down_without_data() -> None:
    pol = policy({"triggers": [GPU_75_FOR_3M], "fallback": {"mode": "fixed", "replicas": 6}})
    assert decide(pol, Observed(3, 3), Metrics(error="timeout"), T0).desired == 6
    assert decide(pol, Observed(8, 8), Metrics(error="timeout"), T0).desired == 8
    below = policy(
        {"triggers": [GPU_75_FOR_3M], "fallback": {"mode": "fixed", "replicas": 6, "allowBelowCurrent": True}}
    )
    assert decide(below, Observed(8, 8), Metrics(error="timeout"), T0).desired == 6


def test_paused_freezes_but_reports_what_it_would_do() -> None:
    pol = policy({"paused": True, "triggers": [{"name": "q", "type": "queueLength", "target": 10}]})
    d = decide(pol, Observed(2, 2), Metrics({"q": 100}), T0)
    assert (d.desired, d.rule) == (2, "paused")
    assert "would aim for 10" in d.message


def test_bounds_apply_at_once() -> None:
    pol = policy({}, {"min": 2, "max": 4})
    assert decide(pol, Observed(9, 9), Metrics(), T0).desired == 4
    assert decide(pol, Observed(1, 1), Metrics(), T0).desired == 2


def test_history_round_trips_through_json() -> None:
    run = Run(policy({"triggers": [GPU_75_FOR_3M]}), replicas=3)
    run.run(200, 10, const(gpu=80))
    from voxscale.operator.engine import History

    assert History.from_dict(run.history.to_dict()) == run.history


@pytest.mark.parametrize(
    ("scaling", "field"),
    [
        (
            {"schedules": [{"name": "x", "cron": "61 8 * * *", "duration": "1h", "minReplicas": 1}]},
            "spec.scaling.schedules[0].cron",
        ),
        (
            {
                "schedules": [
                    {"name": "x", "cron": "0 8 * * *", "timezone": "Mars/Olympus", "duration": "1h", "minReplicas": 1}
                ]
            },
            "spec.scaling.schedules[0].timezone",
        ),
        ({"interval": "ten seconds"}, "spec.scaling.interval"),
    ],
)
def test_settings_the_schema_cannot_judge_are_refused_with_the_field_named(
    scaling: dict[str, object], field: str
) -> None:
    with pytest.raises(SpecError) as err:
        policy(scaling)
    assert err.value.field == field
    assert str(err.value).startswith(field)


# Issue 12, item 11: the scale-up stabilisation window and both cooldowns, to the second.
QUEUE_4_PER_REPLICA = {"name": "queue", "type": "queueLength", "target": 4}


def test_a_scale_up_waits_for_the_recommendation_to_hold_for_the_whole_up_window() -> None:
    """A spike shorter than scaleUp.stabilizationWindow adds nothing; one that lasts it does, at its end."""
    pol = policy({"triggers": [QUEUE_4_PER_REPLICA], "scaleUp": {"stabilizationWindow": "30s"}})
    run = Run(pol, replicas=2)
    run.run(60, 1, const(queue=8))  # what 2 carry
    run.run(20, 1, const(queue=24))  # 6 replicas' worth, for 20 s
    run.run(60, 1, const(queue=8))
    assert run.changes() == []
    start = (run.now - T0).total_seconds()
    run.run(40, 1, const(queue=24))
    assert run.changes() == [(start + 30, 2, 6, "queue")]


def test_scale_up_cooldown_blocks_a_second_step_until_it_has_passed() -> None:
    pol = policy(
        {"triggers": [QUEUE_4_PER_REPLICA], "scaleUp": {"cooldown": "1m", "maxStepPercent": 50}}, {"min": 1, "max": 30}
    )
    run = Run(pol, replicas=4)
    run.run(150, 1, const(queue=80))  # wants 20; 4 pods (or 50 %) a step, then a minute's pause
    assert [c[:3] for c in run.changes()] == [(0, 4, 8), (60, 8, 12), (120, 12, 18)]


def test_scale_down_cooldown_keeps_the_count_after_any_scale_event() -> None:
    """After a scale-up, a drop in load waits out scaleDown.cooldown as well as the window."""
    pol = policy(
        {
            "triggers": [QUEUE_4_PER_REPLICA],
            "scaleDown": {"stabilizationWindow": "0s", "cooldown": "2m"},
        }
    )
    run = Run(pol, replicas=2)
    run.tick(Metrics({"queue": 24}))  # t = 0: 2 -> 6
    run.now += dt.timedelta(seconds=1)
    run.run(200, 1, const(queue=4))  # one replica's worth from t = 1
    assert [c[:3] for c in run.changes()] == [(0, 2, 6), (120, 6, 1)]

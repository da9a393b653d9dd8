"""Cold start a team can see (issue 23, item 4): status.coldStart breaks the Ready pods' start time into
waiting for a node, pulling the image and starting the containers, and loading until Ready, P90 each,
read from the pods' own conditions and container states."""

from __future__ import annotations

import datetime as dt

from kubernetes import client

from voxscale.operator import status
from voxscale.operator.kube import StartPhases, start_phases, starts_of

CREATED = dt.datetime(2026, 3, 2, 9, tzinfo=dt.UTC)


def pod(name: str, scheduled: float, started: list[float], ready: float, restarts: int = 0) -> client.V1Pod:
    """A Ready pod created at CREATED, scheduled, its containers started and Ready `...` seconds later."""

    def at(seconds: float) -> dt.datetime:
        return CREATED + dt.timedelta(seconds=seconds)

    conditions = [
        client.V1PodCondition(type="PodScheduled", status="True", last_transition_time=at(scheduled)),
        client.V1PodCondition(type="Ready", status="True", last_transition_time=at(ready)),
    ]
    containers = [
        client.V1ContainerStatus(
            name=f"c{i}",
            image="x",
            image_id="",
            ready=True,
            restart_count=restarts,
            state=client.V1ContainerState(running=client.V1ContainerStateRunning(started_at=at(t))),
        )
        for i, t in enumerate(started)
    ]
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, creation_timestamp=CREATED),
        status=client.V1PodStatus(phase="Running", conditions=conditions, container_statuses=containers),
    )


def test_a_pods_start_splits_into_scheduling_pull_and_start_and_loading() -> None:
    # Scheduled after 2 s, the server and its door sidecar started at 40 s and 41 s, Ready at 70 s.
    assert start_phases(pod("a", 2, [40, 41], 70)) == StartPhases(2.0, 39.0, 29.0)


def test_a_pod_with_impossible_or_missing_times_gives_no_phases() -> None:
    assert start_phases(pod("skew", 10, [5], 70)) is None  # started before it was scheduled
    no_start = pod("b", 2, [40], 70)
    no_start.status.container_statuses[0].state = client.V1ContainerState()
    assert start_phases(no_start) is None


def test_only_ready_pods_without_restarts_are_sampled() -> None:
    starts = starts_of([pod("a", 1, [30], 60), pod("b", 1, [30], 3600, restarts=2)])
    assert starts.phases == (StartPhases(1.0, 29.0, 30.0),)


def test_status_reports_the_p90_of_each_phase() -> None:
    phases = tuple((1.0, float(pull), 20.0) for pull in range(10, 110, 10))  # pulls of 10 ... 100 s
    block = status.cold_start(phases)
    assert block == {
        "schedulingP90Seconds": 1.0,
        "pullAndStartP90Seconds": 90.0,  # nearest rank: the second slowest of ten
        "loadingP90Seconds": 20.0,
        "totalP90Seconds": 111.0,
        "pods": 10,
    }
    assert status.cold_start(()) is None

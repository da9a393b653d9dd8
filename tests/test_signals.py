"""Signals that cannot lie: every number the engine is fed means what it says, on plain data.

A stale sample is missing data, a latency NaN is no data unless nobody arrived, the cold start is
creation -> FIRST Ready, and a pod stuck not-Ready stops counting as capacity on its way."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import requests
from kubernetes import client
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.engine_helpers import T0, policy
from voxscale import metrics_contract as mc
from voxscale.localcluster.harness import free_port, wait_for
from voxscale.operator import triggers
from voxscale.operator.engine import Metrics, Observed, decide
from voxscale.operator.kube import Kube, NotReady, PodStarts, starts_of
from voxscale.operator.prometheus import (
    SCRAPE_INTERVAL_UNKNOWN,
    STALE_MIN_SECONDS,
    Endpoint,
    Freshness,
    PrometheusSource,
    QueryError,
    Target,
    freshness,
)
from voxscale.operator.scaler import Scaler, stuck_note, stuck_pods

NOW = 1_800_000_000.0  # Prometheus' evaluation time in the canned answers


# ------------------------------------------------------------------ canned Prometheus answers
def _series(value: float | str, at: float = NOW, name: str = "app", ns: str = "ns", **labels: str) -> dict[str, Any]:
    return {"metric": {"namespace": ns, "ttsdeployment": name, **labels}, "value": [at, str(value)]}


def _fresh(*newest_ages: float, samples: float = 40, recent: float = 4) -> list[dict[str, Any]]:
    """The freshness query's answer for one object: a pod per age, each with `samples` sent over the
    last 600 s and `recent` over the last 60 s."""
    out = []
    for i, age in enumerate(newest_ages):
        pod = {"pod": f"app-7d9f8c6b5b-x2k4{i}"}
        out.append(_series(NOW - age, voxscale_sample="newest", **pod))
        out.append(_series(samples, voxscale_sample="600", **pod))
        out.append(_series(recent, voxscale_sample="60", **pod))
    return out


class CannedPrometheus(PrometheusSource):
    """A PrometheusSource whose queries are answered from `answers`, by the first key found in the PromQL."""

    def __init__(self, answers: dict[str, list[dict[str, Any]] | Exception]) -> None:
        super().__init__()
        self.answers = answers
        self.asked: list[str] = []

    def _query(self, ep: Endpoint, promql: str) -> list[dict[str, Any]]:
        self.stats.count()
        self.asked.append(promql)
        for key, answer in self.answers.items():
            if key in promql:
                if isinstance(answer, Exception):
                    raise answer
                return answer
        return []

    def _query_all(self, ep: Endpoint, queries: Sequence[str]) -> dict[str, list[dict[str, Any]] | QueryError]:
        """Each query answered alone (the joined request is tested on the real Prometheus, test_queries)."""
        return {q: self._one(ep, q) for q in queries}


FRESHNESS = "timestamp("  # only the freshness query asks for sample timestamps
LATENCY = "histogram_quantile"
ARRIVALS = "rate(voxscale_requests_received_total"
QUEUE = "sum by (namespace, ttsdeployment) (label_replace(voxscale_queue_depth"

QUEUE_POLICY = policy({"triggers": [{"name": "q", "type": "queueLength", "target": 4}]})
LATENCY_POLICY = policy(
    {"triggers": [{"name": "p95", "type": "latencyP95", "scaleUpAbove": 2, "scaleDownBelow": 0.5, "sustainFor": "0s"}]}
)


def _fetch(source: PrometheusSource, pol: Any) -> Metrics:
    target = Target("ns", "app", pol, Endpoint("http://prometheus:9090"))
    return source.fetch([target])[target.key]


# ------------------------------------------------------------------ stale samples
def test_a_sample_older_than_three_scrapes_is_stale_and_the_interval_comes_from_the_samples() -> None:
    got = freshness(_fresh(5, 50, samples=40))  # 40 samples in 600 s: a 15 s scrape
    assert got[("ns", "app")] == Freshness(age=50, interval=15)
    assert got[("ns", "app")].stale  # the stalest pod decides: the sum holds its old value
    assert not freshness(_fresh(5, 40, samples=40))[("ns", "app")].stale
    # A 1 s scrape is never judged on less than 10 s (query latency, clock skew).
    assert not freshness(_fresh(8, samples=600, recent=60))[("ns", "app")].stale
    assert freshness(_fresh(11, samples=600, recent=60))[("ns", "app")].stale
    # One sample only: the interval cannot be read; Prometheus' default is assumed.
    assert freshness(_fresh(100, samples=1, recent=1))[("ns", "app")] == Freshness(100, SCRAPE_INTERVAL_UNKNOWN)


def test_a_young_pod_reads_its_interval_from_the_short_window() -> None:
    """Two minutes old at a 5 s scrape: 24 samples in 600 s would say 25 s; the last minute's 12 say 5 s."""
    assert freshness(_fresh(20, samples=24, recent=12))[("ns", "app")] == Freshness(20, 5)


def test_after_a_prometheus_outage_the_pre_outage_gauges_are_missing_data_not_load() -> None:
    """Prometheus was down for 60 s: its instant query still answers with the last queue before the
    outage (30 waiting, 50 s ago). That is no reading of now: no scale-up from it, and the decision says why."""
    source = CannedPrometheus({FRESHNESS: _fresh(50, 50), QUEUE: [_series(30)]})
    m = _fetch(source, QUEUE_POLICY)
    assert m.values == {} and m.error is None  # every batched value goes, secondary inputs too
    assert m.invalid["q"].startswith("has a sample 50s old, older than 3 scrapes of 15s")
    d = decide(QUEUE_POLICY, Observed(2, 2), m, T0)
    assert d.desired == 2 and not d.metrics_available
    assert "50s old" in d.metrics_message
    # Once scraped again, the same query is a reading.
    fresh = _fetch(CannedPrometheus({FRESHNESS: _fresh(2, 3), QUEUE: [_series(30)]}), QUEUE_POLICY)
    assert fresh.values["q"] == 30.0 and "q" not in fresh.invalid
    assert decide(QUEUE_POLICY, Observed(2, 2), fresh, T0).desired > 2


@pytest.mark.parametrize("freshness_answer", [[], QueryError("Prometheus at x: boom")])
def test_unknown_sample_ages_take_nothing_away(freshness_answer: list[dict[str, Any]] | Exception) -> None:
    """No pod series (pods not scraped, a GPU-only fleet) or a failed look-up: the values stand as read."""
    m = _fetch(CannedPrometheus({FRESHNESS: freshness_answer, QUEUE: [_series(30)]}), QUEUE_POLICY)
    assert m.values["q"] == 30.0


# ------------------------------------------------------------------ latency NaN
def test_latency_nan_while_requests_arrive_is_missing_data_not_zero_seconds() -> None:
    """Every request refused or hung: none ended, so the p95 is NaN. That is not "0 s, all is well"."""
    source = CannedPrometheus({FRESHNESS: _fresh(1), LATENCY: [_series("NaN")], ARRIVALS: [_series(12.5)]})
    m = _fetch(source, LATENCY_POLICY)
    assert "p95" not in m.values
    assert m.invalid["p95"] == "returned 'NaN': 12.5 requests/s arrived but none ended in the last 1m (no data)"
    d = decide(LATENCY_POLICY, Observed(4, 4), m, T0)
    assert d.desired == 4 and "12.5 requests/s arrived" in d.metrics_message  # held, never scaled down


def test_latency_nan_with_no_arrivals_is_no_latency_pressure() -> None:
    """An idle fleet: nobody waited, so it may scale down (missing data would hold it up forever)."""
    source = CannedPrometheus({FRESHNESS: _fresh(1), LATENCY: [_series("NaN")], ARRIVALS: [_series(0)]})
    m = _fetch(source, LATENCY_POLICY)
    assert m.values["p95"] == 0.0 and "p95" not in m.invalid


@pytest.mark.parametrize("arrivals", [[], QueryError("Prometheus at x: boom")])
def test_latency_nan_without_arrivals_to_tell_is_missing_data(arrivals: list[dict[str, Any]] | Exception) -> None:
    m = _fetch(CannedPrometheus({FRESHNESS: _fresh(1), LATENCY: [_series("NaN")], ARRIVALS: arrivals}), LATENCY_POLICY)
    assert "p95" not in m.values
    assert m.invalid["p95"] == "returned 'NaN': no request ended in the last 1m (no data)"


# ------------------------------------------------------------------ cold start: creation -> first Ready
CREATED = dt.datetime(2026, 3, 2, 10, 0, 0, tzinfo=dt.UTC)


def _pod(
    name: str,
    ready: bool | None,
    changed_after: float,
    restarts: int = 0,
    waiting: str | None = None,
    deleted: bool = False,
) -> client.V1Pod:
    """A V1Pod as the API server returns it: created at CREATED, its Ready condition last changed
    `changed_after` seconds later (None: no Ready condition yet)."""
    conditions = (
        None
        if ready is None
        else [
            client.V1PodCondition(
                type="Ready",
                status="True" if ready else "False",
                last_transition_time=CREATED + dt.timedelta(seconds=changed_after),
            )
        ]
    )
    state = client.V1ContainerState(waiting=client.V1ContainerStateWaiting(reason=waiting)) if waiting else None
    container = client.V1ContainerStatus(
        name="tts", image="tts:1", image_id="", ready=bool(ready), restart_count=restarts, state=state
    )
    return client.V1Pod(
        metadata=client.V1ObjectMeta(
            name=name, creation_timestamp=CREATED, deletion_timestamp=CREATED if deleted else None
        ),
        status=client.V1PodStatus(
            phase="Running" if ready else "Pending", conditions=conditions, container_statuses=[container]
        ),
    )


def test_the_cold_start_is_creation_to_first_ready_and_a_restarted_pod_gives_no_sample() -> None:
    """After a container restart the Ready condition's last transition is the restart: read as a
    start, one such pod (here 3 h old) would become the learnt P90 - hours of look-ahead."""
    starts = starts_of([_pod("a", True, 40), _pod("b", True, 55), _pod("c", True, 3 * 3600, restarts=1)])
    assert sorted(starts.ready_seconds) == [40.0, 55.0]


def test_the_learnt_cold_start_ignores_a_restarted_pod() -> None:
    pods = [_pod(f"p{i}", True, 30 + i) for i in range(9)] + [_pod("restarted", True, 3 * 3600, restarts=2)]
    starts = starts_of(pods)
    pol = policy({"triggers": [{"name": "q", "type": "queueLength", "target": 4}]}, {"min": 1, "max": 20})
    d = decide(pol, Observed(10, 10, starts.ready_seconds), Metrics({"q": 4.0}), T0)
    assert d.history.cold_start_seconds == 38.0  # P90 of 30..38 s, not 3 h


def test_not_ready_pods_say_since_when_and_why_and_pods_going_away_are_left_out() -> None:
    starts = starts_of(
        [
            _pod("pulling", False, 1, waiting="ImagePullBackOff"),
            _pod("fresh", None, 0),
            _pod("crashing", False, 600, restarts=4, waiting="CrashLoopBackOff"),
            _pod("leaving", False, 5, deleted=True),
        ]
    )
    assert starts.ready_seconds == ()
    assert starts.not_ready == (
        NotReady("pulling", CREATED + dt.timedelta(seconds=1), "ImagePullBackOff"),
        NotReady("fresh", CREATED, "Pending"),
        NotReady("crashing", CREATED + dt.timedelta(seconds=600), "CrashLoopBackOff"),
    )


# ------------------------------------------------------------------ stuck pods
def test_a_pod_not_ready_for_longer_than_the_cold_start_is_stuck_and_said() -> None:
    starts = PodStarts(
        not_ready=(
            NotReady("new", CREATED + dt.timedelta(minutes=9), "ContainerCreating"),
            NotReady("pulling", CREATED, "ImagePullBackOff"),
        )
    )
    now = CREATED + dt.timedelta(minutes=10)
    stuck = stuck_pods(starts, cold_start=120, now=now)
    assert [p.name for p in stuck] == ["pulling"]  # the new one is within a cold start: on its way
    assert stuck_note(stuck, 120, now) == (
        "pod pulling not Ready for 10m (ImagePullBackOff), longer than the 2m cold start: "
        "not counted as capacity on its way"
    )


def test_a_stuck_pod_is_not_starting() -> None:
    assert Observed(replicas=3, ready=2).starting == 1
    assert Observed(replicas=3, ready=2, stuck=1).starting == 0


def test_a_stuck_pod_does_not_freeze_a_threshold_trigger() -> None:
    """ImagePullBackOff on one pod: counted as starting, "a pod is still starting" held every
    threshold rule at the current count for as long as it stayed stuck."""
    pol = policy(
        {"triggers": [{"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 75, "sustainFor": "0s"}]},
        {"min": 1, "max": 10},
    )
    frozen = decide(pol, Observed(3, 2), Metrics({"gpu": 95.0}), T0)
    assert frozen.desired == 3  # a pod really starting: its capacity is on its way
    d = decide(pol, Observed(3, 2, stuck=1), Metrics({"gpu": 95.0}), T0)
    assert d.desired > 3


# ------------------------------------------------------------------ a real Prometheus restarting
class PrivatePrometheus:
    """A Prometheus of the test's own (1 s scrape of one target), which the test stops and starts."""

    def __init__(self, directory: Path, target_port: int) -> None:
        self.dir, self.port = directory, free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {
                    "job_name": "pods",
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                }
            ],
        }
        (directory / "prometheus.yml").write_text(json.dumps(config))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [
            str(shutil.which("prometheus")),
            f"--config.file={self.dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with (self.dir / "prometheus.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_for("Prometheus ready", lambda: _answers(f"{self.url}/-/ready"), timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _queue_exporter(port: int) -> Any:
    """One server pod's queue gauge, as the inference server publishes it (30 waiting)."""
    registry = CollectorRegistry()
    gauge = Gauge(mc.QUEUE_DEPTH.name, "queue", ["pod", "namespace"], registry=registry)
    gauge.labels(pod="app-7d9f8c6b5b-x2k4z", namespace="ns").set(30)
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    return server


@pytest.mark.prometheus
@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs the prometheus binary on PATH")
def test_after_prometheus_restarts_no_reading_uses_a_pre_outage_sample(tmp_path: Path) -> None:
    """Prometheus stopped, and back while the pods cannot be scraped yet: its instant queries answer
    with the samples from before the outage for five minutes (after a restart it knows no scrape to
    mark them stale). The operator reads none of them; once the pods are scraped again, it reads."""
    port = free_port()
    exporter = _queue_exporter(port)
    prometheus = PrivatePrometheus(tmp_path, port)
    target = Target("ns", "app", QUEUE_POLICY, Endpoint(prometheus.url))
    source = PrometheusSource()

    def queue() -> float | None:
        return source.fetch([target])[target.key].values.get("q")

    try:
        prometheus.start()
        wait_for("the queue read", lambda: queue() == 30, timeout=30)
        time.sleep(12)  # some history: the scrape interval is read from it
        prometheus.stop()
        exporter.shutdown()
        exporter.server_close()
        time.sleep(STALE_MIN_SECONDS + 5)
        prometheus.start()
        lie = source._query(Endpoint(prometheus.url), triggers.batch_query("queue", ["ns"]))
        assert [s["value"][1] for s in lie] == ["30"]  # what the instant query alone would have read
        m = source.fetch([target])[target.key]
        assert "q" not in m.values
        assert "old, older than 3 scrapes" in m.invalid["q"]
        assert decide(QUEUE_POLICY, Observed(2, 2), m, T0).desired == 2  # 30 waiting would have asked for 8
        exporter = _queue_exporter(port)
        wait_for("the queue read again", lambda: queue() == 30, timeout=30)
    finally:
        prometheus.stop()
        exporter.shutdown()


class RecordingKube:
    """The scaler's Kube calls a round makes on one object, recorded (no API server)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []
        self.scaled: list[int] = []
        self.status: dict[str, Any] = {}

    def event(self, body: dict[str, Any], kind: str, reason: str, message: str) -> None:
        self.events.append((kind, reason, message))

    def scale(self, ns: str, name: str, replicas: int) -> None:
        self.scaled.append(replicas)

    def replace_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        self.status = status

    def set_deletion_costs(self, ns: str, costs: dict[str, int]) -> None:
        pass

    def secret_data(self, ns: str, name: str) -> dict[str, str]:
        raise AssertionError("no Secret is read here")


def test_the_decision_and_an_event_say_which_pod_is_stuck_once() -> None:
    kube = RecordingKube()
    scaler = Scaler(cast(Kube, kube))
    body = {
        "metadata": {"namespace": "ns", "name": "app", "generation": 1},
        "spec": {
            "model": {"image": "tts:1"},
            "replicas": {"min": 1, "max": 10},
            "scaling": {
                "predictive": {"coldStart": "2m"},
                "triggers": [{"name": "q", "type": "queueLength", "target": 4}],
            },
        },
    }
    scaler.upsert(body)
    tr = scaler.tracked[("ns", "app")]
    dep = SimpleNamespace(spec=SimpleNamespace(replicas=3), status=SimpleNamespace(ready_replicas=2))
    starts = PodStarts(not_ready=(NotReady("app-7d9f8c6b5b-x2k4z", CREATED, "ImagePullBackOff"),))
    now = CREATED + dt.timedelta(minutes=10)
    for _ in range(2):
        scaler._evaluate(tr, dep, Metrics({"q": 12.0}), now, starts)
    assert tr.decision is not None
    said = "pod app-7d9f8c6b5b-x2k4z not Ready for 10m (ImagePullBackOff), longer than the 2m cold start"
    assert said in tr.decision.message
    assert said in kube.status["lastDecision"]["message"]
    assert [e for e in kube.events if e[1] == "PodsStuck"] == [("Warning", "PodsStuck", tr.decision.message)]

"""Operator faults (issue 12): stale status after a fail-over, NaN and garbage from PromQL.

Pure parts run the engine and the status builder on plain data; the parts marked `cluster` write
status through the real API server and query the real Prometheus.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import random
import socket
import threading
import time
import urllib.parse
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as hst
from kubernetes import config as k8s_config

from tests.engine_helpers import T0, Run, policy
from voxscale.localcluster.cluster import ClusterState, LocalCluster
from voxscale.localcluster.harness import REPO
from voxscale.operator import children
from voxscale.operator import status as st
from voxscale.operator.crd import GROUP, PLURAL, VERSION
from voxscale.operator.crd import apply_defaults as crd_apply_defaults
from voxscale.operator.crd import validate as crd_validate
from voxscale.operator.engine import History, Metrics, Observed, decide
from voxscale.operator.kube import Kube
from voxscale.operator.policy import SpecError
from voxscale.operator.prometheus import Endpoint, PrometheusSource, Target, sample_value
from voxscale.operator.scaler import Scaler

GPU = {"name": "gpu", "type": "gpuUtilization", "target": 60, "scaleDownBelow": 40}
SCALE_DOWN = {"stabilizationWindow": "10m", "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}


def gpu_policy() -> Any:
    return policy({"triggers": [GPU], "scaleDown": SCALE_DOWN}, {"min": 1, "max": 10})


def written(run_status: list[dict[str, Any]]) -> dict[str, Any]:
    """What the API server holds after the operator wrote these statuses, one after another."""
    return run_status[-1] if run_status else {}


def seen(replicas: int) -> st.Observation:
    return st.Observation(generation=1, replicas=replicas, ready=replicas, min_replicas=1, deployment_found=True)


# ------------------------------------------------------------------------------ 1. stale status
def test_a_new_leader_does_not_act_on_a_clock_that_stopped_holding() -> None:
    """The issue's reproduction: GPU below 40 % once, then at 60 % for 20 minutes, then one tick at
    39 %. Statuses are rebuilt whole, so the ended below-clock is gone and a fresh operator holds."""
    run = Run(gpu_policy(), replicas=6)
    statuses: list[dict[str, Any]] = []
    for gpu in [30.0] + [60.0] * 120:  # 10 s ticks: 20 minutes at 60 %
        d = run.tick(Metrics({"gpu": gpu}))
        statuses.append(st.build(written(statuses), seen(d.desired), d, d.history, run.now))
        run.now += dt.timedelta(seconds=10)
    stored = written(statuses)
    assert "gpu" not in stored["engine"].get("belowSince", {})
    fresh = History.from_dict(stored["engine"])
    d = decide(gpu_policy(), Observed(6, 6), Metrics({"gpu": 39.0}), run.now, fresh)
    assert d.desired == 6, d.message


def test_clocks_read_back_after_a_gap_start_again() -> None:
    """Belt and braces: memory no tick kept up to date (a status read back after an outage) cannot
    claim "below 40 % for 10m"."""
    stale = History(below_since={"gpu": T0}, observed_at=T0 + dt.timedelta(minutes=5))
    later = T0 + dt.timedelta(minutes=30)
    d = decide(gpu_policy(), Observed(6, 6), Metrics({"gpu": 39.0}), later, stale)
    assert d.desired == 6 and d.history.below_since == {"gpu": later}
    kept = History(below_since={"gpu": T0}, data_since=T0, observed_at=later - dt.timedelta(seconds=10))
    assert decide(gpu_policy(), Observed(6, 6), Metrics({"gpu": 39.0}), later, kept).desired < 6


@pytest.mark.parametrize(
    ("previous", "path"),
    [
        ({"lastDecision": {"activeSchedule": "morning"}}, ("lastDecision", "activeSchedule")),
        ({"lastDecision": {"metrics": {"old": 1.0}}}, ("lastDecision", "metrics", "old")),
        ({"engine": {"belowSince": {"gpu": "2026-01-01T00:00:00+00:00"}}}, ("engine", "belowSince", "gpu")),
        ({"advisedReplicas": 4}, ("advisedReplicas",)),
        ({"demand": {"arrivalRps": 3.0}}, ("demand", "arrivalRps")),  # no arrivals this round: none written
    ],
)
def test_build_carries_nothing_over_but_scale_time_and_transitions(
    previous: dict[str, Any], path: tuple[str, ...]
) -> None:
    d = decide(gpu_policy(), Observed(3, 3), Metrics({"gpu": 50.0}), T0)  # between the thresholds: holds
    assert not d.changed
    out = st.build({**previous, "lastScaleTime": "2026-01-01T00:00:00Z"}, seen(3), d, d.history, T0)
    node: Any = out
    for key in path[:-1]:
        node = node.get(key, {})
    assert path[-1] not in node
    assert out["lastScaleTime"] == "2026-01-01T00:00:00Z"
    assert out["lastDecision"]["metrics"] == {"gpu": 50.0}
    assert "activeSchedule" not in out["lastDecision"]


def test_build_never_writes_null() -> None:
    d = decide(gpu_policy(), Observed(3, 3), Metrics(), T0)
    out = st.build({}, seen(3), d, d.history, T0)
    assert "null" not in json.dumps(out)


# ------------------------------------------------------------------------------ 2. NaN and garbage
CUSTOM = {"name": "c", "type": "promql", "query": "x", "target": 10}
CUSTOM_THRESHOLD = {"name": "c", "type": "promql", "query": "x", "scaleUpAbove": 10, "scaleDownBelow": 2}


@pytest.mark.parametrize("trigger", [CUSTOM, CUSTOM_THRESHOLD], ids=["proportional", "threshold"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_value_that_is_not_a_number_is_missing_data(trigger: dict[str, Any], value: float) -> None:
    pol = policy({"triggers": [trigger]}, {"min": 1, "max": 10})
    d = decide(pol, Observed(4, 4), Metrics({"c": value}), T0)
    assert d.desired == 4 and not d.metrics_available
    assert "not a number" in d.metrics_message
    out = st.build({}, seen(4), d, d.history, T0)
    json.dumps(out, allow_nan=False)  # a bare NaN in a status patch is invalid JSON: HTTP 400
    assert out["conditions"][-1]["reason"] == "MetricsUnavailable"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1.5", 1.5), ("0", 0.0), ("NaN", None), ("+Inf", None), ("-Inf", None), ("", None), ("abc", None)],
)
def test_sample_values_are_finite_numbers_or_none(raw: str, expected: float | None) -> None:
    assert sample_value(raw) == expected


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("query", "why"),
    [
        ("vector(0) / 0", "not a number"),  # PromQL's 0/0 at idle
        ("vector(1) / 0", "not a number"),  # +Inf
        ('label_replace(vector(1), "x", "a", "", "") or label_replace(vector(2), "x", "b", "", "")', "2 series"),
        ('"abc"', "returned 'abc' (a scalar or string)"),  # a string result is not "2 series"
        ("scalar(vector(0) / 0)", "returned 'NaN' (a scalar or string)"),
    ],
)
def test_nan_inf_and_many_series_from_the_real_prometheus_name_the_cause(
    prometheus_url: str, query: str, why: str
) -> None:
    pol = policy({"triggers": [{**CUSTOM, "query": query}]}, {"min": 1, "max": 10})
    target = Target("ns", "app", pol, Endpoint(prometheus_url))
    m = PrometheusSource().fetch([target])[target.key]
    assert m.values == {} and m.error is None
    assert why in m.invalid["c"]
    d = decide(pol, Observed(2, 2), m, T0)
    assert d.desired == 2 and why in d.metrics_message


@pytest.mark.cluster
def test_a_scalar_result_is_one_number(prometheus_url: str) -> None:
    pol = policy({"triggers": [{**CUSTOM, "query": "scalar(vector(25))"}]}, {"min": 1, "max": 10})
    target = Target("ns", "app", pol, Endpoint(prometheus_url))
    assert PrometheusSource().fetch([target])[target.key].values == {"c": 25.0}


@pytest.mark.cluster
def test_status_writes_remove_what_the_new_status_lacks(
    cluster: LocalCluster, cluster_state: ClusterState, namespace: str
) -> None:
    """Through the real API server: a key written once is gone after a status without it."""
    cluster.kubectl("apply", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/ttsdeployments.voxscale.io", "--timeout=60s")
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TTSDeployment",
        "metadata": {"name": "app", "namespace": namespace},
        "spec": {"model": {"image": "tts:1"}, "replicas": {"min": 1, "max": 3}},
    }
    api = k8s_config.new_client_from_config(config_file=str(cluster_state.kubeconfig))
    kube = Kube(api)
    kube.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    first = {"replicas": 6, "engine": {"belowSince": {"gpu": "2026-01-01T00:00:00+00:00"}}, "advisedReplicas": 5}
    kube.replace_status(namespace, "app", first)
    kube.replace_status(namespace, "app", {"replicas": 6, "engine": {"belowSince": {}}})
    stored = kube.custom.get_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "app")["status"]
    assert stored == {"replicas": 6, "engine": {"belowSince": {}}}


# ------------------------------------------------------------------------------ 4. scale to zero
GATEWAY = {"name": "gateway", "type": "promql", "query": "sum(rate(gateway_requests_total[1m]))", "target": 10}
TO_ZERO = {"min": 0, "max": 5, "allowScaleToZero": True}


def test_min_zero_without_a_signal_outside_the_pods_is_refused_naming_the_field() -> None:
    with pytest.raises(SpecError) as err:
        policy({}, TO_ZERO)
    assert err.value.field == "spec.replicas.min" and "promql trigger" in str(err.value)
    policy({"triggers": [GATEWAY]}, TO_ZERO)  # a gateway's counter can wake it
    policy({"schedules": [{"name": "day", "cron": "0 8 * * *", "duration": "1h", "minReplicas": 1}]}, TO_ZERO)


@pytest.mark.parametrize("fallback", [{"mode": "hold"}, {"mode": "fixed", "replicas": 3}])
def test_at_zero_a_gateway_signal_wakes_one_replica_and_silence_keeps_zero(fallback: dict[str, Any]) -> None:
    pol = policy({"triggers": [{"name": "slo", "type": "slo"}, GATEWAY], "fallback": fallback}, TO_ZERO)
    quiet = decide(pol, Observed(0, 0), Metrics({"gateway": 0.0}), T0)
    assert quiet.desired == 0 and quiet.metrics_available  # no pods: their metrics are absent, not missing
    assert "scaled to zero" in next(r.note for r in quiet.readings if r.name == "slo")
    woken = decide(pol, Observed(0, 0), Metrics({"gateway": 0.2}), T0)
    assert woken.desired == 1, woken.message


# ------------------------------------------------------------------------------ 8. tenants
def ttsd_body(prometheus: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"namespace": "team-a", "name": "app"}, "spec": {"scaling": {"prometheus": prometheus}}}


def test_a_prometheus_url_outside_the_allowlist_is_refused_before_any_secret_is_read() -> None:
    # No Kube at all: reading the Secret would fail loudly; the check must come first.
    scaler = Scaler(
        cast(Kube, None), default_prometheus_url="http://prom:9090", allowed_prometheus_urls=("http://prom",)
    )
    evil = {"url": "https://attacker.example/", "auth": {"bearerTokenSecretRef": {"name": "s", "key": "token"}}}
    with pytest.raises(SpecError) as err:
        scaler.endpoints.resolve(ttsd_body(evil))
    assert err.value.field == "spec.scaling.prometheus.url" and "allowedPrometheusUrls" in str(err.value)
    assert scaler.endpoints.resolve(ttsd_body({})).url == "http://prom:9090"
    assert scaler.endpoints.resolve(ttsd_body({"url": "http://prom/api"})).url == "http://prom/api"
    with pytest.raises(SpecError):  # a longer host with the entry's prefix is another host
        scaler.endpoints.resolve(ttsd_body({"url": "http://prom-team-a:9090"}))
    assert Scaler(cast(Kube, None)).endpoints.resolve(ttsd_body({"url": "http://any:9090"})).url == "http://any:9090"


ALLOWED = ("http://prom:9090", "https://thanos.example/team-a")


@pytest.mark.parametrize(
    "url",
    [
        "http://prom:9090@evil.example/",  # userinfo: the host is evil.example
        "http://prom:9090@evil.example:9090/",
        "http://user@prom:9090/",  # credentials belong in the auth Secret
        "http://prom:9090.evil.example/",  # not a port: a bad URL
        "http://prom.evil.example:9090/",  # a longer host with the same prefix
        "http://prom:90901/",  # a longer port
        "http://prom:9091/",
        "https://prom:9090/",  # another scheme
        "https://thanos.example/team-ab",  # a longer last segment
        "https://thanos.example/team-a/../team-b",  # dot segments
        "https://thanos.example/team-a/%2e%2e/team-b",  # encoded dot segments
        "https://thanos.example/team-a/%2E%2E%2Fteam-b",
        "https://thanos.example/team-a\\..\\team-b",
        "https://thanos.example/team-a/..%5cteam-b",
        "https://thanos.example\t.evil.example/team-a",  # control characters urlsplit would drop
        "https://thanos.example/",  # above the entry's path
        "http://[::1]:9090/",
    ],
)
def test_the_prometheus_allowlist_refuses_urls_that_pass_a_string_prefix_check(url: str) -> None:
    from voxscale.operator.endpoints import allowlist_refusal

    assert allowlist_refusal(url, ALLOWED) is not None


@pytest.mark.parametrize(
    "url",
    [
        "http://prom:9090",
        "http://prom:9090/",
        "HTTP://PROM:9090/api/v1",  # scheme and host are case-insensitive
        "https://thanos.example/team-a",
        "https://thanos.example/team-a/",
        "https://thanos.example:443/team-a/query",  # the scheme's default port, written out
    ],
)
def test_the_prometheus_allowlist_admits_its_entries_and_paths_under_them(url: str) -> None:
    from voxscale.operator.endpoints import allowlist_refusal

    assert allowlist_refusal(url, ALLOWED) is None


@given(
    host=hst.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True),
    suffix=hst.text("abcdefghijklmnopqrstuvwxyz0123456789.-@:", min_size=1, max_size=12),
    path=hst.lists(hst.from_regex(r"[a-zA-Z0-9_-]{1,8}", fullmatch=True), max_size=3),
)
def test_an_allowlist_entry_admits_only_its_own_host_whatever_is_appended(
    host: str, suffix: str, path: list[str]
) -> None:
    """Appending anything to the host part never keeps a URL allowed unless it is still the same
    host and port (the userinfo and longer-host tricks of a prefix check); any path under it is fine."""
    from voxscale.operator.endpoints import allowlist_refusal

    entry = f"http://{host}:9090"
    assert allowlist_refusal(f"{entry}/{'/'.join(path)}", (entry,)) is None
    tricked = f"http://{host}{suffix}/x"
    parts = urllib.parse.urlsplit(tricked)
    try:
        same = (parts.hostname, parts.port) == (host, 9090) and parts.username is None
    except ValueError:
        same = False
    assert (allowlist_refusal(tricked, (entry,)) is None) == same


@pytest.mark.cluster
def test_scoped_custom_queries_run_only_inside_their_namespace(prometheus_url: str) -> None:
    """With scoping on, a query that could read another namespace is not sent at all (nothing of it
    can reach the status); a pinned one runs as written."""
    loose = {**CUSTOM, "name": "loose", "query": "count(up)"}
    pinned = {**CUSTOM, "name": "pinned", "query": 'count(up{namespace="$namespace"}) or vector(3)'}
    # Custom queries alone: the SLO model's door queries are the operator's own, scoped by construction.
    pol = policy({"triggers": [loose, pinned], "slo": {"enabled": False}}, {"min": 1, "max": 10})
    target = Target("team-a", "app", pol, Endpoint(prometheus_url))
    source = PrometheusSource(scope_custom_queries=True)
    m = source.fetch([target])[target.key]
    assert m.values == {"pinned": 3.0} and m.error is None
    assert m.invalid["loose"].startswith("not run: the query reads series outside namespace team-a: up;")
    assert source.stats.queries == 1
    d = decide(pol, Observed(2, 2), m, T0)
    assert d.desired == 2 and 'namespace="$namespace"' in d.metrics_message


def hung_endpoint() -> tuple[socket.socket, str]:
    """A TCP port that accepts connections and never answers: a Prometheus that hangs."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    return server, f"http://127.0.0.1:{server.getsockname()[1]}"


@pytest.mark.cluster
def test_a_hung_prometheus_holds_only_its_own_objects(prometheus_url: str) -> None:
    """Endpoints are queried side by side, each within twice its timeout: the objects on a hung one
    are held with the cause while the others get their data in the same round."""
    server, hung_url = hung_endpoint()
    slow = policy({"triggers": [{**CUSTOM, "name": f"c{i}", "query": "vector(1)"} for i in range(3)]})
    fine = policy({"triggers": [{**CUSTOM, "query": "vector(5)"}]})
    stuck = Target("team-b", "stuck", slow, Endpoint(hung_url, timeout_seconds=1.0))
    served = Target("team-a", "served", fine, Endpoint(prometheus_url, timeout_seconds=1.0))
    source = PrometheusSource()
    try:
        started = time.monotonic()
        got = source.fetch([stuck, served])
        took = time.monotonic() - started
        assert got[served.key].values == {"c": 5.0}
        assert got[stuck.key].error == f"Prometheus at {hung_url} did not answer within 2s"
        assert took < 2.9, took  # three 1 s timeouts in a row would be 3 s
        # The hung endpoint's worker is still busy: the next round does not pile another one on it.
        again = source.fetch([stuck, served])
        assert again[stuck.key].error == f"Prometheus at {hung_url} is still answering an earlier round's queries"
        assert again[served.key].values == {"c": 5.0}
    finally:
        server.close()


# ------------------------------------------------------------------------------ 10. handler threads
def test_handlers_may_change_the_registry_while_a_round_reads_it() -> None:
    """kopf's handler threads upsert and remove while the round takes its due objects."""
    scaler = Scaler(cast(Kube, None))
    bodies = [
        {"metadata": {"namespace": "ns", "name": f"t{i}", "generation": 1}, "spec": {"model": {"image": "x:1"}}}
        for i in range(200)
    ]
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        while not stop.is_set():
            for b in bodies:
                scaler.upsert(b)
            for b in bodies:
                scaler.remove((b["metadata"]["namespace"], b["metadata"]["name"]))

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(2000):
            scaler.due(math.inf)
    except RuntimeError as exc:  # "dictionary changed size during iteration"
        errors.append(exc)
    finally:
        stop.set()
        worker.join()
    assert not errors


# ------------------------------------------------------------------------------ 6. grace period
@pytest.mark.parametrize(
    ("model", "triggers", "drain"),
    [
        ({}, None, 60),  # 64 queued at the default 16 rps is 4 s: the floor
        ({"maxQueueLength": 1000}, None, 125),  # 2 x 1000 / 16
        ({"maxQueueLength": 1000}, [{"name": "s", "type": "slo", "slo": {"replicaCapacity": 2}}], 1000),
        ({"maxQueueLength": 1000}, [{"name": "g", "type": "gpuUtilization", "target": 60}], 125),  # CRD default
        ({"maxQueueLength": 1000, "drainTimeout": "3m"}, None, 180),  # said explicitly
    ],
)
def test_the_grace_period_holds_the_servers_timeouts_and_a_full_queue(
    model: dict[str, Any], triggers: list[dict[str, Any]] | None, drain: int
) -> None:
    spec: dict[str, Any] = {"model": {"image": "tts:1", **model}}
    if triggers is not None:
        spec["scaling"] = {"triggers": triggers}
    ttsd = crd_apply_defaults({"metadata": {"name": "app", "namespace": "ns", "uid": "u"}, "spec": spec})
    pod = children.deployment(ttsd)["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["VOXSCALE_DRAIN_TIMEOUT_S"] == env["VOXSCALE_REQUEST_TIMEOUT_S"] == str(drain)
    pause = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] == pause + drain + children.EXIT_MARGIN_SECONDS


# ------------------------------------------------------------------------------ held-out bad manifests
GARBAGE: list[Any] = [None, "", "abc", -1, 0, 1e309, "1d", "0s", [], {}, "Mars/Phobos", True, 2**40, "* * *", "NaN"]


def _mutations(seed: int, trials: int) -> list[dict[str, Any]]:
    """Valid specs with one to three fields replaced by garbage (wrong types, odd values)."""
    rng = random.Random(seed)
    base = crd_apply_defaults(
        {
            "spec": {
                "model": {"image": "tts:1"},
                "scaling": {
                    "triggers": [{"name": "slo", "type": "slo", "slo": {}}, {**GPU}, {**CUSTOM}],
                    "schedules": [{"name": "am", "cron": "0 8 * * *", "duration": "1h", "minReplicas": 2}],
                },
            }
        }
    )["spec"]
    paths: list[list[Any]] = []

    def walk(node: Any, path: list[Any]) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            paths.append([*path, k])
            walk(v, [*path, k])

    walk(base, [])
    out = []
    for _ in range(trials):
        spec = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 3)):
            *parents, last = rng.choice(paths)
            node = spec
            with contextlib.suppress(KeyError, IndexError, TypeError):
                for k in parents:
                    node = node[k]
                node[last] = rng.choice(GARBAGE)
        out.append(spec)
    return out


def test_no_manifest_crashes_the_registry_and_every_schema_valid_one_parses_or_names_a_field() -> None:
    """Objects the schema refuses can still be stored from before a CRD change; none may raise out of
    the registry. One the schema accepts either parses or is refused as a SpecError naming a field."""
    scaler = Scaler(cast(Kube, None))
    for i, spec in enumerate(_mutations(seed=12, trials=1500)):
        body = {"metadata": {"namespace": "ns", "name": f"o{i}", "generation": 1}, "spec": spec}
        scaler.upsert(body)  # never raises
        tr = scaler.tracked[("ns", f"o{i}")]
        assert (tr.policy is None) == (tr.spec_error is not None)
        obj = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TTSDeployment", **body}
        if not crd_validate(obj) and tr.spec_error is not None:
            assert tr.spec_error.startswith("spec."), tr.spec_error


def test_a_new_leader_waits_a_window_it_saw_itself_before_removing_pods() -> None:
    """The fault bench's SIGKILLs found new leaders scaling down 1-5 s after the load fell: the load
    had risen and fallen while nobody led, and the stored clock said "below 40 % for 10 minutes"."""
    run = Run(gpu_policy(), replicas=6)
    for _ in range(60):  # 9 min 50 s below 40 %, observed; the leader dies
        d = run.tick(Metrics({"gpu": 30.0}))
        run.now += dt.timedelta(seconds=10)
    assert d.desired == 6
    stored = st.build({}, seen(6), d, d.history, run.now)
    run.now += dt.timedelta(seconds=20)  # nobody led for 20 s
    kept = decide(gpu_policy(), Observed(6, 6), Metrics({"gpu": 30.0}), run.now, d.history)
    assert kept.desired < 6  # what the stored clock alone would do: "below 40 % for 10m10s"
    scaler = Scaler(cast(Kube, None))
    body = {"metadata": {"namespace": "ns", "name": "app", "generation": 1}, "status": stored}
    scaler.upsert({**body, "spec": {"model": {"image": "tts:1"}}})
    taken = scaler.tracked[("ns", "app")].history
    assert not taken.below_since and taken.data_since is None
    after = decide(gpu_policy(), Observed(6, 6), Metrics({"gpu": 30.0}), run.now, taken)
    assert after.desired == 6, after.message

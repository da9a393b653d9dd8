"""Metric profiles as pure code: which PromQL answers each pod signal, per profile, and what it approximates."""

from __future__ import annotations

import re
from typing import Any

import promql_parser
import pytest
from hypothesis import given
from hypothesis import strategies as hs

from tests.engine_helpers import policy
from voxscale.operator import crd, profiles, queries, tenancy, triggers
from voxscale.operator.policy import SpecError
from voxscale.operator.profiles import Approximation, Pods, Query, SignalKey, Unavailable
from voxscale.operator.profiles.promql import PromQLProfile
from voxscale.operator.profiles.triton import Triton
from voxscale.operator.prometheus import Endpoint, Target, _profile_query
from voxscale.operator.scaler import Scaler, Tracked

PODS = Pods("team-a", "tts", "their-triton")
SLO_KEYS = ("arrivals:60", "arrivals:15", "capacity:60", "refused:60", "queue", "latency")


def spec(metrics: dict[str, Any] | None) -> dict[str, Any]:
    body: dict[str, Any] = {"spec": {"targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"}}}
    if metrics is not None:
        body["spec"]["metrics"] = metrics
    return crd.apply_defaults(body)["spec"]


def key(k: str) -> SignalKey:
    parsed = SignalKey.parse(k)
    assert parsed is not None
    return parsed


# ------------------------------------------------------------------------------------------ spec.metrics
def test_the_default_profile_is_voxscale_from_the_crd() -> None:
    assert spec(None)["metrics"] == {"profile": "voxscale"}
    assert profiles.from_spec(spec(None)) is profiles.VOXSCALE


def test_triton_and_promql_profiles_parse_their_settings() -> None:
    assert profiles.from_spec(spec({"profile": "triton", "triton": {"model": "piper"}})) == Triton("piper")
    got = profiles.from_spec(spec({"profile": "promql", "promql": {"arrivals": "sum(rate(a[$window]))"}}))
    assert got == PromQLProfile("sum(rate(a[$window]))")


@pytest.mark.parametrize(
    ("metrics", "field"),
    [
        ({"profile": "triton"}, "spec.metrics.triton.model"),
        ({"profile": "promql"}, "spec.metrics.promql.arrivals"),
        ({"profile": "promql", "promql": {"arrivals": "a", "completions": "c"}}, "spec.metrics.promql"),
        ({"profile": "kserve"}, "spec.metrics.profile"),
    ],
)
def test_a_profile_without_what_it_needs_is_refused_naming_the_field(metrics: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as err:
        profiles.from_spec({"metrics": metrics})
    assert err.value.field == field


def test_the_crd_documents_and_validates_the_profile_fields() -> None:
    schema = crd.schema()["properties"]["spec"]["properties"]["metrics"]
    assert schema["properties"]["profile"]["enum"] == list(profiles.REGISTRY)
    rules = {r["rule"]: r["message"] for r in schema["x-kubernetes-validations"]}
    assert all(m.startswith("spec.metrics.") for m in rules.values())
    assert any("has(self.triton)" in r for r in rules)


# ------------------------------------------------------------------------------------------ voxscale
def test_the_voxscale_profile_asks_exactly_what_the_trigger_kinds_asked_before() -> None:
    for k in SLO_KEYS:
        assert profiles.VOXSCALE.signal(key(k), PODS, ["team-a"]) == Query(triggers.batch_query(k, ["team-a"]))
    assert profiles.VOXSCALE.approximations() == ()
    assert profiles.describe(profiles.VOXSCALE) == {"profile": "voxscale"}


def test_a_gpu_key_is_no_pod_signal_and_keeps_its_trigger_kinds_query_under_every_profile() -> None:
    gpu = "gpu:DCGM_FI_DEV_GPU_UTIL"
    assert SignalKey.parse(gpu) is None
    pol = policy({"triggers": [{"name": "g", "type": "gpuUtilization", "target": 60}]})
    for profile in (profiles.VOXSCALE, Triton("piper"), PromQLProfile("a")):
        t = Target("team-a", "tts", pol, Endpoint("http://p:9090"), profile=profile)
        assert _profile_query(t, gpu, ["team-a"]) == Query(triggers.batch_query(gpu, ["team-a"]))


# ------------------------------------------------------------------------------------------ triton
def test_triton_queries_read_one_models_series_batched_by_owner() -> None:
    tr = Triton("piper")
    arrivals = tr.signal(key("arrivals:60"), PODS, ["team-a"])
    assert isinstance(arrivals, Query) and arrivals.batched
    assert arrivals.promql == (
        'clamp_min(sum by (namespace, ttsdeployment) (label_replace(rate({namespace=~"team\\\\-a", pod!="", '
        '__name__=~"nv_inference_request_success|nv_inference_request_failure", model="piper"}[60s]), '
        f'"ttsdeployment", "$1", "pod", "{queries._POD_NAME}")) + sum by (namespace, ttsdeployment) '
        '(label_replace(delta({namespace=~"team\\\\-a", pod!="", __name__=~"nv_inference_pending_request_count", '
        f'model="piper"}}[60s]), "ttsdeployment", "$1", "pod", "{queries._POD_NAME}")) / 60, 0)'
    )
    refused = tr.signal(key("refused:60"), PODS, ["team-a"])
    assert isinstance(refused, Query) and 'reason="REJECTED"' in refused.promql
    queue = tr.signal(key("queue"), PODS, ["team-a"])
    assert isinstance(queue, Query) and "nv_inference_pending_request_count" in queue.promql
    capacity = tr.signal(key("capacity:60"), PODS, ["team-a"])
    assert isinstance(capacity, Query)
    for series in ("nv_inference_count", "nv_inference_exec_count", "nv_inference_compute_infer_duration_us"):
        assert series in capacity.promql
    assert capacity.promql.endswith(">= 0.6)")  # the door's busy gate (triggers.slo.CAPACITY_MIN_BUSY)
    latency = tr.signal(key("latency"), PODS, ["team-a"])
    assert isinstance(latency, Unavailable) and "spec.metrics.profile triton" in latency.message


def test_triton_freshness_and_pod_work_read_the_pending_gauge_of_the_model() -> None:
    tr = Triton("piper")
    fresh = tr.freshness(PODS, ["team-a"], (60, 600), "voxscale_sample")
    work = tr.pod_work(PODS)
    assert fresh is not None and work is not None
    assert 'timestamp({namespace=~"team\\\\-a", pod!="", nv_inference_pending_request_count' not in fresh.promql
    assert 'nv_inference_pending_request_count{namespace=~"team\\\\-a", pod!="", model="piper"}' in fresh.promql
    assert work.promql.startswith('sum by (pod) ({__name__=~"nv_inference_pending_request_count", namespace="team-a"')
    assert 'pod=~"their\\\\-triton-' in work.promql and work.promql.endswith('model="piper"})')


def test_the_decision_says_what_triton_approximates() -> None:
    said = profiles.describe(Triton("piper"))
    assert said["profile"] == "triton"
    assert Approximation.ARRIVALS_FROM_COMPLETIONS in said["approximated"]
    assert Approximation.BUSY_FROM_EXECUTIONS in said["approximated"]
    assert "pending gauge" in said["message"] and "mean batch size" in said["message"]


MODEL_NAMES = hs.text(hs.characters(blacklist_categories=("Cc", "Cs")) | hs.sampled_from('"\\\n'), min_size=1)


@given(model=MODEL_NAMES, namespace=hs.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True))
def test_every_triton_selector_reads_the_model_and_the_namespaces_asked(model: str, namespace: str) -> None:
    """Whatever the model is called (quotes, backslashes, newlines), every selector of every Triton
    query parses back to exactly that model and the namespace asked: nothing breaks out of a matcher."""
    tr = Triton(model)
    pods = Pods(namespace, "tts")
    asked: list[Query | Unavailable | None] = [tr.signal(key(k), pods, [namespace]) for k in SLO_KEYS[:-1]]
    asked += [tr.freshness(pods, [namespace], (60,), "t"), tr.pod_work(pods)]
    for q in asked:
        assert isinstance(q, Query)
        for sel in tenancy._selectors(promql_parser.parse(q.promql)):
            matchers = {m.name: m for m in sel.matchers.matchers}
            assert matchers["model"].value == model
            ns = matchers["namespace"]
            assert ns.value == namespace or re.fullmatch(ns.value, namespace), q.promql


# ------------------------------------------------------------------------------------------ promql
USER = PromQLProfile(
    arrivals='sum(rate(door_received_total{namespace="$namespace", pod=~"$pods"}[$window]))',
    completions='sum(rate(door_completed_total{namespace="$namespace", pod=~"$pods"}[$window]))',
    busy_seconds='sum(rate(door_busy_seconds_total{namespace="$namespace", pod=~"$pods"}[$window]))',
    queue='sum(door_waiting{namespace="$namespace", pod=~"$pods"})',
)


def test_promql_queries_are_the_objects_own_with_window_namespace_and_pods_filled() -> None:
    q = USER.signal(key("arrivals:15"), PODS, ["team-a"])
    assert q == Query(
        'sum(rate(door_received_total{namespace="team-a", pod=~"their\\\\-triton-[a-z0-9]+-[a-z0-9]+"}[15s]))',
        batched=False,
    )
    capacity = USER.signal(key("capacity:60"), PODS, ["team-a"])
    assert isinstance(capacity, Query) and not capacity.batched
    assert "$" not in capacity.promql and 'up{namespace="team-a"' in capacity.promql
    assert tenancy.scope_problem(capacity.promql, "team-a") is None  # runs under the chart's scoping
    assert isinstance(USER.signal(key("latency"), PODS, ["team-a"]), Unavailable)
    assert isinstance(USER.signal(key("refused:60"), PODS, ["team-a"]), Unavailable)
    assert USER.freshness(PODS, ["team-a"], (60,), "t") is None and USER.pod_work(PODS) is None


def test_promql_without_capacity_queue_or_window_says_what_it_approximates() -> None:
    bare = PromQLProfile("sum(rate(x[1m]))")
    capacity = bare.signal(key("capacity:60"), PODS, ["team-a"])
    assert isinstance(capacity, Unavailable) and "replicaCapacity" in capacity.message
    assert isinstance(bare.signal(key("queue"), PODS, ["team-a"]), Unavailable)
    found = bare.approximations()
    assert Approximation.RECENT_IS_WINDOW in found and Approximation.CAPACITY_ASSUMED in found
    assert Approximation.RECENT_IS_WINDOW not in USER.approximations()


@given(window=hs.integers(min_value=1, max_value=3600))
def test_window_is_a_promql_duration_in_seconds(window: int) -> None:
    q = USER.signal(SignalKey(f"arrivals:{window}", profiles.Signal.ARRIVALS, float(window)), PODS, ["n"])
    assert isinstance(q, Query) and re.search(rf"\[{window}s\]", q.promql)


def test_the_scaler_reads_the_profile_with_the_spec_and_a_bad_one_is_a_spec_error() -> None:
    body: dict[str, Any] = {"metadata": {"namespace": "n", "name": "t", "generation": 1}}
    body["spec"] = spec({"profile": "triton", "triton": {"model": "piper"}})
    tr = Tracked(body=body)
    Scaler._parse_spec(tr)
    assert tr.spec_error is None and tr.profile == Triton("piper")
    body["spec"]["metrics"] = {"profile": "triton"}  # stored before the CRD's rule, say
    body["metadata"]["generation"] = 2
    Scaler._parse_spec(tr)
    assert tr.policy is None and tr.spec_error is not None
    assert tr.spec_error.startswith("spec.metrics.triton.model: ")

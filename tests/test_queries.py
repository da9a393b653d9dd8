"""PromQL built by the operator: one query per metric kind for every TTSDeployment, owner by pod name."""

from __future__ import annotations

import re

from tests.engine_helpers import policy
from voxscale.operator import queries, triggers
from voxscale.operator.policy import TriggerType

POD_RE = re.compile(queries._POD_NAME)


def test_owner_is_recovered_from_real_deployment_pod_names() -> None:
    for pod, owner in (
        ("edu-tts-7d9f8c6b5b-x2k4z", "edu-tts"),
        ("a-b-c-5f6d7c8b9-bc2d4", "a-b-c"),
        ("tts-0001-6c9b7d5f4d-q8w2n", "tts-0001"),
    ):
        m = POD_RE.fullmatch(pod)
        assert m is not None and m.group(1) == owner
    assert POD_RE.fullmatch("edu-tts-0") is None  # a StatefulSet-style name is not ours


def test_one_batched_query_per_kind_scoped_to_namespaces() -> None:
    q = triggers.batch_query("queue", ["team-a", "team-b"])
    assert q.startswith("sum by (namespace, ttsdeployment) (label_replace(voxscale_queue_depth{")
    assert 'namespace=~"team\\\\-a|team\\\\-b"' in q or 'namespace=~"team-a|team-b"' in q
    gpu = triggers.batch_query("gpu:DCGM_FI_PROF_GR_ENGINE_ACTIVE", ["ns"])
    assert gpu.startswith("100 * avg by (namespace, ttsdeployment)")  # a ratio, normalised to percent
    lat = triggers.batch_query("latency", ["ns"])
    assert "histogram_quantile(0.95" in lat and "voxscale_request_duration_seconds_bucket" in lat


def test_triggers_share_batches_and_custom_promql_is_substituted_and_escaped() -> None:
    pol = policy(
        {
            "triggers": [
                {"name": "g1", "type": "gpuUtilization", "target": 60},
                {"name": "q", "type": "queueLength", "target": 4},
                {
                    "name": "c",
                    "type": "promql",
                    "target": 1,
                    "query": 'sum(rate(x{namespace="$namespace",pod=~"$pods"}[1m]))',
                },
            ]
        }
    )
    keys = [triggers.kind(t).inputs(t)["value"] for t in pol.triggers]
    assert keys == ["gpu:DCGM_FI_DEV_GPU_UTIL", "queue", None]
    custom = next(t for t in pol.triggers if t.type is TriggerType.PROMQL)
    q = queries.custom(custom.query or "", 'we"ird', "app")
    assert 'namespace="we\\"ird"' in q and "app-[a-z0-9]+-[a-z0-9]+" in q


def test_slo_trigger_reads_arrivals_capacity_and_backlog_in_batches() -> None:
    pol = policy({"triggers": [{"name": "slo", "type": "slo", "slo": {"rateWindow": "30s"}}]})
    slo = pol.triggers[0]
    assert triggers.kind(slo).inputs(slo) == {
        "value": "arrivals:30",
        "recent": "arrivals:8",  # a quarter of the window: a burst shows there first
        "capacity": "capacity:30",
        "backlog": "queue",
    }
    arrivals = triggers.batch_query("arrivals:30", ["ns"])
    assert "rate(voxscale_requests_received_total{" in arrivals and "[30s]" in arrivals
    cap = triggers.batch_query("capacity:30", ["ns"])
    # completed / busy per GPU product, only where the pods were busy enough for it to mean capacity
    assert "voxscale_completed_requests_total" in cap and "voxscale_busy_seconds_total" in cap
    assert "gpu_product" in cap and ">= 0.6" in cap


def test_a_trigger_without_settings_gets_the_defaults_from_the_crd() -> None:
    slo = policy({"triggers": [{"name": "s", "type": "slo"}]}).triggers[0]
    assert (slo.latency_seconds, slo.capacity_rps, slo.rate_window.total_seconds()) == (2.0, 16.0, 60.0)
    assert policy({}).triggers[0].type.value == "slo"  # no triggers: the slo trigger

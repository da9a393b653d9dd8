"""PromQL built by the operator: one query per metric kind for every TTSDeployment, owner by pod name."""

from __future__ import annotations

import re

from tests.engine_helpers import policy
from voxscale.operator import queries
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
    q = queries.batch_query("queue", ["team-a", "team-b"])
    assert q.startswith("sum by (namespace, ttsdeployment) (label_replace(voxscale_queue_depth{")
    assert 'namespace=~"team\\\\-a|team\\\\-b"' in q or 'namespace=~"team-a|team-b"' in q
    gpu = queries.batch_query("gpu:DCGM_FI_PROF_GR_ENGINE_ACTIVE", ["ns"])
    assert gpu.startswith("100 * avg by (namespace, ttsdeployment)")  # a ratio, normalised to percent
    lat = queries.batch_query("latency", ["ns"])
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
    keys = [queries.batch_key(t) for t in pol.triggers]
    assert keys == ["gpu:DCGM_FI_DEV_GPU_UTIL", "queue", None]
    custom = next(t for t in pol.triggers if t.type is TriggerType.PROMQL)
    q = queries.custom(custom.query or "", 'we"ird', "app")
    assert 'namespace="we\\"ird"' in q and "app-[a-z0-9]+-[a-z0-9]+" in q

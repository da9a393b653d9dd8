"""Tenants on the server (audit item 10): per-key identities, voices owned by their key, per-key quotas.

The quota arithmetic and the keys document are pure and property-tested; the behaviour runs against
the real app with the real voice (one loaded pipeline shared by the apps, as in test_server_api.py), and
the log line against a real `voxscale serve` process.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tests.inference_helpers import ServerProcess, reference_recording
from voxscale import metrics_contract as mc
from voxscale import settings_contract as sc
from voxscale.inference import voices
from voxscale.inference.pipeline import TTSPipeline
from voxscale.inference.server import create_app
from voxscale.inference.settings import Settings
from voxscale.inference.tenants import (
    WINDOW_S,
    ApiKey,
    KeysError,
    Quota,
    Usage,
    charge,
    identify,
    key_digest,
    load_keys,
    may_see,
    refund,
)

KEY_A = "a-key-for-team-a-0123456789abcdef"
KEY_B = "a-key-for-team-b-0123456789abcdef"
KEY_OPS = "the-admins-key-0123456789abcdef"
KEY_SLOW = "a-key-with-a-low-request-rate-000"
KEY_TERSE = "a-key-with-few-characters-a-day-0"
TOKEN = "the-old-shared-token"
UNKNOWN_VOICE = "vc_00000000000000ff"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS_DOC: dict[str, Any] = {
    "team-a": {"sha256": sha(KEY_A)},
    "team-b": {"sha256": sha(KEY_B), "requestsPerMinute": 1000, "charactersPerDay": 100_000},
    "ops": {"key": KEY_OPS, "admin": True},
    "slow": {"sha256": sha(KEY_SLOW), "requestsPerMinute": 3},
    "terse": {"sha256": sha(KEY_TERSE), "charactersPerDay": 40},
}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _error(r: Any) -> dict[str, Any]:
    body: dict[str, Any] = r.json()["error"]
    return body


def _sample(text: str, metric: mc.Metric, **labels: str) -> float:
    """One series' value in a /metrics text (0 while it does not exist)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == metric.name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def _env(keys: Path | None, store: Path, token: str | None = TOKEN) -> dict[str, str]:
    """The server's environment, as the operator would set it (unknown variables are ignored by old servers)."""
    env = {"VOXSCALE_PRECISION": "fp32", "VOXSCALE_VOICE_STORE": str(store)}
    env |= {"VOXSCALE_API_KEYS": str(keys)} if keys else {}
    return env | ({"VOXSCALE_API_TOKEN": token} if token else {})


def _app(pipeline: TTSPipeline, env: dict[str, str]) -> TestClient:
    return TestClient(create_app(Settings.from_env(env), preloaded=pipeline))


def _upload(client: TestClient, key: str | None, recording: bytes) -> Any:
    headers = auth(key) if key else {}
    return client.post("/v1/voices", files={"file": ("ref.wav", recording, "audio/wav")}, headers=headers)


def _listed(client: TestClient, key: str) -> dict[str, Any]:
    """Registered voices this key sees: id -> entry."""
    r = client.get("/v1/voices", headers=auth(key))
    assert r.status_code == 200, r.text
    return {v["id"]: v for v in r.json()["data"] if v["type"] == "registered"}


def _speak(client: TestClient, key: str, voice: str, text: str = "Hi.") -> Any:
    return client.post(
        "/v1/audio/speech", json={"input": text, "voice": voice, "response_format": "pcm"}, headers=auth(key)
    )


@pytest.fixture(scope="module")
def pipeline() -> TTSPipeline:
    return TTSPipeline.load(precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("secret") / "keys.yaml"
    path.write_text(yaml.safe_dump(KEYS_DOC))
    return path


@pytest.fixture(scope="module")
def client(pipeline: TTSPipeline, keys_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    with _app(pipeline, _env(keys_file, tmp_path_factory.mktemp("store"))) as c:
        yield c


def recording(pipeline: TTSPipeline, n: int) -> bytes:
    """A different real reference recording for each n (so tests do not share voices)."""
    return reference_recording(pipeline, f"This is reference recording number {n}. It has clear speech in it.")


# ------------------------------------------------------------------------------ voices belong to their key
def test_key_b_cannot_list_use_or_delete_key_as_voice(client: TestClient, pipeline: TTSPipeline) -> None:
    up = _upload(client, KEY_A, recording(pipeline, 1))
    assert up.status_code == 201 and up.json()["owner"] == "team-a", up.text
    voice_id = up.json()["id"]
    assert voice_id not in _listed(client, KEY_B)
    used, unknown = _speak(client, KEY_B, voice_id), _speak(client, KEY_B, UNKNOWN_VOICE)
    assert used.status_code == unknown.status_code == 404 and _error(used)["param"] == "voice"
    assert _error(used)["message"] == _error(unknown)["message"].replace(UNKNOWN_VOICE, voice_id)  # nothing leaks
    deleted = client.delete(f"/v1/voices/{voice_id}", headers=auth(KEY_B))
    assert deleted.status_code == 404 and _error(deleted)["param"] == "voice_id"
    assert _listed(client, KEY_A)[voice_id]["owner"] == "team-a"
    assert _speak(client, KEY_A, voice_id).status_code == 200


def test_the_same_recording_from_two_keys_is_two_voices_and_tells_neither(
    client: TestClient, pipeline: TTSPipeline
) -> None:
    ref = recording(pipeline, 2)
    a = _upload(client, KEY_A, ref)
    b = _upload(client, KEY_B, ref)
    assert (a.status_code, b.status_code) == (201, 201), (a.text, b.text)
    assert b.json()["cached"] is False and b.json()["id"] != a.json()["id"]  # no hint that team-a has it
    again = _upload(client, KEY_A, ref)
    assert again.status_code == 200 and again.json()["cached"] is True and again.json()["id"] == a.json()["id"]
    assert a.json()["id"] not in _listed(client, KEY_B) and b.json()["id"] not in _listed(client, KEY_A)


def test_an_admin_key_lists_and_deletes_every_keys_voices(client: TestClient, pipeline: TTSPipeline) -> None:
    voice_id = _upload(client, KEY_A, recording(pipeline, 3)).json()["id"]
    assert _listed(client, KEY_OPS)[voice_id]["owner"] == "team-a"
    assert _speak(client, KEY_OPS, voice_id).status_code == 200
    assert client.delete(f"/v1/voices/{voice_id}", headers=auth(KEY_OPS)).status_code == 204
    assert voice_id not in _listed(client, KEY_A)
    assert _speak(client, KEY_A, voice_id).status_code == 404


def test_the_legacy_token_is_the_admin_key_default(client: TestClient, pipeline: TTSPipeline) -> None:
    theirs = _upload(client, KEY_A, recording(pipeline, 4)).json()["id"]
    mine = _upload(client, TOKEN, recording(pipeline, 5))
    assert mine.status_code == 201 and mine.json()["owner"] == "default"
    seen = _listed(client, TOKEN)
    assert seen[theirs]["owner"] == "team-a" and seen[mine.json()["id"]]["owner"] == "default"
    assert mine.json()["id"] not in _listed(client, KEY_A)


def test_voices_from_before_keys_are_seen_by_admins_only_and_keep_their_ids(
    pipeline: TTSPipeline, keys_file: Path, tmp_path: Path
) -> None:
    ref = recording(pipeline, 6)
    with _app(pipeline, _env(None, tmp_path, token=None)) as before:  # a server without keys, as before
        old = _upload(before, None, ref)
    assert old.status_code == 201
    old_id = old.json()["id"]
    assert "owner" not in json.loads((tmp_path / f"{old_id}.json").read_text())
    with _app(pipeline, _env(keys_file, tmp_path)) as after:
        assert old_id not in _listed(after, KEY_A) and _speak(after, KEY_A, old_id).status_code == 404
        assert after.delete(f"/v1/voices/{old_id}", headers=auth(KEY_A)).status_code == 404
        assert _listed(after, KEY_OPS)[old_id]["owner"] is None
        again = _upload(after, TOKEN, ref)  # the old token's clients re-register and get the same id
        assert again.status_code == 200 and again.json()["id"] == old_id


def test_ownership_is_in_the_shared_store_for_every_replica_and_restart(
    pipeline: TTSPipeline, keys_file: Path, tmp_path: Path
) -> None:
    with _app(pipeline, _env(keys_file, tmp_path)) as one:
        voice_id = _upload(one, KEY_A, recording(pipeline, 7)).json()["id"]
    with _app(pipeline, _env(keys_file, tmp_path)) as other:  # another replica, or this one restarted
        assert _listed(other, KEY_A)[voice_id]["owner"] == "team-a"
        assert voice_id not in _listed(other, KEY_B)
        assert other.delete(f"/v1/voices/{voice_id}", headers=auth(KEY_B)).status_code == 404
        assert other.delete(f"/v1/voices/{voice_id}", headers=auth(KEY_A)).status_code == 204


# ------------------------------------------------------------------------------ who is calling
@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({}, "send `Authorization: Bearer <key>`"),
        ({"Authorization": f"Basic {KEY_A}"}, "send `Authorization: Bearer <key>`"),
        (auth("not-a-key-this-server-has"), "not one this server accepts"),
        (auth(sha(KEY_A)), "not one this server accepts"),  # the hash in the Secret is not a key
    ],
)
def test_a_missing_or_unknown_key_is_a_401_naming_the_header(
    client: TestClient, headers: dict[str, str], says: str
) -> None:
    r = client.get("/v1/voices", headers=headers)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert _error(r)["param"] == "Authorization" and says in _error(r)["message"]
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(open_path).status_code == 200


# ------------------------------------------------------------------------------ quotas
def test_a_key_over_its_requests_per_minute_gets_a_429_naming_the_quota(client: TestClient) -> None:
    # At most 3 a minute; 7 tries see a refusal even if a minute turns over between them.
    answers = [client.get("/v1/voices", headers=auth(KEY_SLOW)) for _ in range(7)]
    refused = [r for r in answers if r.status_code == 429]
    assert refused and {r.status_code for r in answers} == {200, 429}
    r = refused[0]
    assert r.headers["x-voxscale-quota"] == "requestsPerMinute" and 1 <= int(r.headers["retry-after"]) <= 60
    message = _error(r)["message"]
    assert "'slow'" in message and "requestsPerMinute quota of 3" in message and "this replica" in message
    assert _error(r)["type"] == "requestsPerMinute_exceeded"
    assert client.get("/v1/voices", headers=auth(KEY_A)).status_code == 200  # others are not slowed
    assert _sample(client.get("/metrics").text, mc.QUOTA_REFUSALS, key="slow", quota="requestsPerMinute") >= 1


def test_a_key_over_its_characters_per_day_gets_a_429_and_refused_requests_cost_nothing(
    client: TestClient,
) -> None:
    text = "Twenty five characters.."
    assert _speak(client, KEY_TERSE, UNKNOWN_VOICE, text).status_code == 404  # refused: given back
    assert _speak(client, KEY_TERSE, "alloy", text).status_code == 200  # 24 of 40
    over = _speak(client, KEY_TERSE, "alloy", text)
    assert over.status_code == 429 and _error(over)["param"] == "input"
    assert "charactersPerDay quota of 40" in _error(over)["message"] and "this replica" in _error(over)["message"]
    assert over.headers["x-voxscale-quota"] == "charactersPerDay" and 1 <= int(over.headers["retry-after"]) <= 86_400
    job = client.post("/v1/audio/speech/jobs", json={"input": text}, headers=auth(KEY_TERSE))
    assert job.status_code == 429 and _error(job)["param"] == "input"
    whole = _speak(client, KEY_TERSE, "alloy", "x" * 41)  # never fits: waiting would not help
    assert whole.status_code == 429 and "retry-after" not in whole.headers and "whole" in _error(whole)["message"]
    assert _speak(client, KEY_A, "alloy", text).status_code == 200  # a key without the quota is not limited
    assert _sample(client.get("/metrics").text, mc.KEY_INPUT_CHARACTERS, key="terse") == len(text)


# ------------------------------------------------------------------------------ logs, metrics, the start
def test_the_key_id_never_the_key_is_in_the_log_and_metrics(keys_file: Path, tmp_path: Path) -> None:
    server = ServerProcess.start(tmp_path, **_env(keys_file, tmp_path / "store"))
    try:
        headers = {**auth(KEY_B), "X-Request-Id": "tenant-log-1"}
        r = requests.post(f"{server.url}/v1/audio/speech", json={"input": "Hi."}, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        metrics = requests.get(f"{server.url}/metrics", timeout=10).text
        deadline = time.monotonic() + 10
        while "request_id=tenant-log-1" not in server.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.stop()
    lines = [line for line in server.log.read_text().splitlines() if "request_id=tenant-log-1" in line]
    assert any("POST /v1/audio/speech 200" in line and "key=team-b" in line for line in lines), lines
    assert _sample(metrics, mc.KEY_REQUESTS, key="team-b", code="200") == 1
    for secret in (KEY_B, sha(KEY_B), TOKEN, KEY_OPS):
        assert secret not in server.log.read_text() and secret not in metrics


def test_serve_refuses_a_bad_keys_file_naming_it_before_loading_anything(tmp_path: Path) -> None:
    bad = tmp_path / "keys.yaml"
    bad.write_text(yaml.safe_dump({"team-a": {"sha256": sha(KEY_A), "requestPerMinute": 5}}))
    out = subprocess.run(
        [sys.executable, "-m", "voxscale.cli", "serve"],
        env={**os.environ, "VOXSCALE_API_KEYS": str(bad)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"VOXSCALE_API_KEYS: {bad}: key 'team-a': requestPerMinute: unknown field" in out.stderr


def test_the_keys_setting_is_in_the_contract_and_the_token_stays_out_of_reprs() -> None:
    assert Settings.from_env({sc.API_KEYS.env: "/etc/voxscale/keys"}).api_keys == "/etc/voxscale/keys"
    assert TOKEN not in repr(Settings.from_env({sc.API_TOKEN.env: TOKEN}))
    assert mc.KEY_REQUESTS.labels == (mc.KEY_LABEL, "code")


# ------------------------------------------------------------------------------ the keys document
def _write(path: Path, doc: object) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


BAD_DOCS = [
    ({"team a": {"sha256": sha(KEY_A)}}, "key id 'team a': use 1-63 letters"),
    ({"t": {"sha256": sha(KEY_A), "key": KEY_A}}, "key 't': give exactly one of `sha256`"),
    ({"t": {}}, "key 't': give exactly one of `sha256`"),
    ({"t": {"sha256": "abc"}}, "key 't': sha256: expected 64 hex digits"),
    ({"t": {"key": "short"}}, "key 't': key: use at least 16 random characters"),
    ({"t": {"sha256": sha(KEY_A), "admin": "yes"}}, "key 't': admin: expected true or false"),
    ({"t": {"sha256": sha(KEY_A), "requestsPerMinute": 0}}, "key 't': requestsPerMinute: expected a whole number"),
    ({"t": {"sha256": sha(KEY_A), "charactersPerDay": True}}, "key 't': charactersPerDay: expected a whole number"),
    ({"t": {"sha256": sha(KEY_A), "requestPerMinute": 5}}, "key 't': requestPerMinute: unknown field"),
    ({"t": KEY_A}, "key 't': expected a mapping with `sha256` or `key`, got str"),
    ({"t": {"sha256": sha(KEY_A)}, "u": {"key": KEY_A}}, "key 'u' has the same key as 't'"),
    ([KEY_A], "expected a mapping of key id to entry"),
    ({}, "defines no keys"),
]


@pytest.mark.parametrize(("doc", "message"), BAD_DOCS, ids=[m for _, m in BAD_DOCS])
def test_a_bad_keys_document_names_the_file_the_key_and_the_field(tmp_path: Path, doc: object, message: str) -> None:
    path = _write(tmp_path / "keys.yaml", doc)
    with pytest.raises(KeysError, match=f"VOXSCALE_API_KEYS: {re.escape(str(path))}: .*{re.escape(message)}") as raised:
        load_keys(str(path), None)
    assert KEY_A not in str(raised.value)  # a key in the wrong place is not echoed into the log


def test_a_file_that_is_not_yaml_is_named_without_quoting_its_lines(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f't: {{key: "{KEY_A}"\n')
    with pytest.raises(KeysError, match=re.escape(f"{path}: not YAML or JSON (line")) as raised:
        load_keys(str(path), None)
    assert KEY_A not in str(raised.value)


def test_a_mounted_secret_directory_merges_its_files_and_the_token_is_the_admin_default(tmp_path: Path) -> None:
    # What a Secret volume looks like: items as links into a hidden, timestamped directory.
    data = tmp_path / "..2024_01_01_00_00_00.1"
    data.mkdir()
    _write(data / "team-a.yaml", {"team-a": {"sha256": sha(KEY_A), "requestsPerMinute": 5}})
    (data / "ops.json").write_text(json.dumps({"ops": {"key": KEY_OPS, "admin": True}}))
    (tmp_path / "..data").symlink_to(data.name)
    for item in ("team-a.yaml", "ops.json"):
        (tmp_path / item).symlink_to(f"..data/{item}")
    keys = {k.id: k for k in load_keys(str(tmp_path), TOKEN)}
    assert keys == {
        "team-a": ApiKey("team-a", key_digest(KEY_A), requests_per_minute=5),
        "ops": ApiKey("ops", key_digest(KEY_OPS), admin=True),
        "default": ApiKey("default", key_digest(TOKEN), admin=True),
    }
    _write(tmp_path / "more.yaml", {"default": {"sha256": sha(KEY_B)}})
    with pytest.raises(KeysError, match=r"key 'default' is defined in .*more\.yaml and again in VOXSCALE_API_TOKEN"):
        load_keys(str(tmp_path), TOKEN)
    assert load_keys(None, None) == ()  # neither: an open server


def test_only_an_admin_or_the_owner_may_see_a_voice() -> None:
    a, ops = ApiKey("a", key_digest(KEY_A)), ApiKey("ops", key_digest(KEY_OPS), admin=True)
    assert may_see(a, "a") and not may_see(a, "b") and not may_see(a, None)
    assert may_see(ops, "a") and may_see(ops, None)


key_strings = st.text(min_size=1, max_size=40)


@settings(max_examples=100, deadline=None)
@given(keys=st.lists(key_strings, min_size=1, max_size=8, unique=True), other=key_strings, data=st.data())
def test_a_key_is_identified_by_comparing_every_digest_in_constant_time(
    keys: list[str], other: str, data: st.DataObject
) -> None:
    ring = [ApiKey(f"k{i}", key_digest(k)) for i, k in enumerate(keys)]
    compared: list[bool] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append(real(a, b))
        return compared[-1]

    with pytest.MonkeyPatch.context() as m:
        m.setattr("voxscale.inference.tenants.hmac.compare_digest", counting)
        index = data.draw(st.integers(0, len(keys) - 1))
        assert identify(ring, keys[index]) == ring[index]
        assert len(compared) == len(ring)  # all compared, wherever the match is: no early exit
        compared.clear()
        assert identify(ring, other) == (ring[keys.index(other)] if other in keys else None)
        assert len(compared) == len(ring)


def test_voice_ids_are_per_owner_and_without_one_are_the_ids_from_before_keys(pipeline: TTSPipeline) -> None:
    wav, sr = pipeline.synthesize(pipeline.prepare("Same recording.", (0.667, 1.0, 0.8), seed=1))[0], 22050
    ids = {owner: voices.voice_id_for(wav, sr, owner) for owner in (None, "team-a", "team-b")}
    assert len(set(ids.values())) == 3 and voices.voice_id_for(wav, sr, "team-a") == ids["team-a"]
    before = hashlib.sha256(wav.astype("float32").tobytes() + str(sr).encode()).hexdigest()[:16]
    assert ids[None] == f"vc_{before}"


# ------------------------------------------------------------------------------ quota arithmetic
@st.composite
def charges(draw: st.DrawFn) -> tuple[int, list[tuple[float, int]]]:
    """A limit and a run of (seconds since the previous charge, cost) for one key."""
    limit = draw(st.integers(1, 50))
    steps = draw(st.lists(st.tuples(st.floats(0, 200, allow_nan=False), st.integers(1, 60)), max_size=60))
    return limit, steps


@settings(max_examples=200, deadline=None)
@given(run=charges(), start=st.floats(0, 2e9, allow_nan=False), quota=st.sampled_from(list(Quota)))
def test_quota_windows_admit_at_most_the_limit_and_refuse_only_what_does_not_fit(
    run: tuple[int, list[tuple[float, int]]], start: float, quota: Quota
) -> None:
    limit, steps = run
    window_s = WINDOW_S[quota]
    usage: Usage | None = None
    spent: dict[int, int] = {}
    now = start
    for dt, cost in steps:
        now += dt
        verdict = charge(usage, cost, limit, window_s, now)
        window = int(now // window_s)
        before = spent.get(window, 0)
        assert now < verdict.resets_at <= (window + 1) * window_s  # Retry-After is the next window's start
        assert verdict.never_fits == (not verdict.allowed and cost > limit)
        if verdict.allowed:
            spent[window] = before + cost
        else:
            assert before + cost > limit  # never refused while it would fit
            assert verdict.usage == (usage if usage is not None and usage.window == window else Usage(window, 0))
        assert spent.get(window, 0) <= limit and verdict.usage.used == spent.get(window, 0)
        usage = verdict.usage


@settings(max_examples=100, deadline=None)
@given(used=st.integers(0, 30), cost=st.integers(1, 30), now=st.floats(0, 2e9, allow_nan=False))
def test_a_refund_gives_back_a_charge_in_its_window_only(used: int, cost: int, now: float) -> None:
    window_s = 60
    usage = Usage(int(now // window_s), used)
    verdict = charge(usage, cost, 100, window_s, now)
    assert refund(verdict.usage, verdict, cost) == usage
    later = charge(verdict.usage, 1, 100, window_s, now + window_s).usage  # the next window began
    assert refund(later, verdict, cost) == later


def test_a_clock_stepped_back_does_not_reopen_a_spent_window() -> None:
    spent = charge(None, 3, 3, 60, 1_000_000_000.0).usage
    back = charge(spent, 1, 3, 60, 1_000_000_000.0 - 120)
    assert not back.allowed and back.usage == spent

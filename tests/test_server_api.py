"""The server's API beyond one speech request: request ids, priority, jobs, voice deletion, bounded uploads, NVML.

In-process apps share one loaded pipeline (as in test_inference.py); the behaviour that needs
processes - logs, a store shared by two replicas - runs against real `voxscale serve` processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import socket
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import soundfile as sf
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from tests.inference_helpers import ServerProcess, held, reference_recording
from voxscale import metrics_contract as mc
from voxscale.inference.errors import ApiError
from voxscale.inference.jobs import JobRecord, JobRunner, JobStore
from voxscale.inference.pipeline import TTSPipeline
from voxscale.inference.request_context import trace_id
from voxscale.inference.server import create_app
from voxscale.inference.server_metrics import NvmlGauges, ServerMetrics
from voxscale.inference.settings import Settings, usable_cpus
from voxscale.inference.uploads import MULTIPART_OVERHEAD, read_file_field

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"
JOBS = "/v1/audio/speech/jobs"


@pytest.fixture(scope="module")
def pipeline() -> TTSPipeline:
    return TTSPipeline.load(precision="fp32", device="cpu")


class SubmitSpy:
    """Records what the server hands Batcher.submit, then lets the real batcher do the work."""

    def __init__(self, client: TestClient) -> None:
        self.batcher = client.app.state.voxscale.batcher  # type: ignore[attr-defined]
        self.real = self.batcher.submit
        self.calls: list[dict[str, Any]] = []
        self.batcher.submit = self

    def __call__(self, items: list[Any], priority: str = "realtime", request_id: str = "") -> Any:
        self.calls.append({"priority": priority, "request_id": request_id})
        return self.real(items, priority=priority, request_id=request_id)


@pytest.fixture(scope="module")
def client(pipeline: TTSPipeline) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(precision="fp32", max_upload_bytes=200_000), preloaded=pipeline)) as c:
        yield c


@pytest.fixture
def spy(client: TestClient) -> Iterator[SubmitSpy]:
    recorder = SubmitSpy(client)
    yield recorder
    recorder.batcher.submit = recorder.real


@pytest.fixture(scope="module")
def reference(pipeline: TTSPipeline) -> bytes:
    """Five seconds of our own voice at 16 kHz (about 160 KB as wav), as a user would upload it."""
    text = "This is a reference recording. It has a few sentences of clear speech."
    return reference_recording(pipeline, text)


def _error(r: requests.Response | Any) -> dict[str, Any]:
    body: dict[str, Any] = r.json()["error"]
    return body


# ------------------------------------------------------------------------------------------ request ids
@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (TRACEPARENT, TRACE),
        (f"01-{TRACE}-00f067aa0ba902b7-01-future-field", TRACE),  # a later version may add fields
        (f"00-{TRACE}-00f067aa0ba902b7-01-extra", None),  # version 00 may not
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None),  # all-zero ids are invalid
        (f"00-{TRACE}-{'0' * 16}-01", None),
        (f"ff-{TRACE}-00f067aa0ba902b7-01", None),
        (TRACEPARENT.upper(), None),
        ("garbage", None),
        (None, None),
    ],
)
def test_traceparent_is_read_as_w3c_trace_context(header: str | None, expected: str | None) -> None:
    assert trace_id(header) == expected


def test_the_request_id_is_the_clients_else_the_trace_id_else_a_new_one(client: TestClient) -> None:
    assert client.get("/healthz", headers={"X-Request-Id": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert client.get("/healthz", headers={"traceparent": TRACEPARENT}).headers["x-request-id"] == TRACE
    both = client.get("/healthz", headers={"X-Request-Id": "mine", "traceparent": TRACEPARENT})
    assert both.headers["x-request-id"] == "mine"
    ids = {client.get("/healthz", headers={"traceparent": "not-a-trace"}).headers["x-request-id"] for _ in range(2)}
    assert len(ids) == 2 and all(len(i) == 16 for i in ids)  # an invalid traceparent is ignored, as W3C asks


def test_a_request_id_that_is_not_one_is_a_400_naming_the_header(client: TestClient) -> None:
    r = client.get("/healthz", headers={"X-Request-Id": "a b\tc"})
    assert r.status_code == 400 and _error(r)["param"] == "X-Request-Id"
    assert "X-Request-Id" in _error(r)["message"]
    assert client.get("/healthz", headers={"X-Request-Id": "x" * 129}).status_code == 400


def test_request_id_and_priority_reach_the_batcher(client: TestClient, spy: SubmitSpy) -> None:
    body = {"input": "Hi.", "response_format": "pcm"}
    assert client.post("/v1/audio/speech", json=body, headers={"X-Request-Id": "r-1"}).status_code == 200
    batch = client.post("/v1/audio/speech", json={**body, "priority": "batch"}, headers={"traceparent": TRACEPARENT})
    assert batch.status_code == 200
    assert spy.calls == [{"priority": "realtime", "request_id": "r-1"}, {"priority": "batch", "request_id": TRACE}]


@pytest.mark.parametrize("priority", ["urgent", 1, ""])
def test_a_bad_priority_is_a_422_naming_it(client: TestClient, priority: object) -> None:
    for path in ("/v1/audio/speech", JOBS):
        r = client.post(path, json={"input": "Hi.", "priority": priority})
        assert r.status_code == 422 and _error(r)["param"] == "priority", r.text


# ------------------------------------------------------------------------------------------------- jobs
def _poll(client: TestClient | Any, job_id: str, base: str = "", timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"{base}{JOBS}/{job_id}").json()
        if job["status"] in ("done", "failed") or time.monotonic() > deadline:
            return job
        time.sleep(0.05)


def test_a_job_is_accepted_run_at_batch_priority_and_its_audio_fetched(client: TestClient, spy: SubmitSpy) -> None:
    r = client.post(JOBS, json={"input": "A job. Two sentences.", "response_format": "wav", "voice": "alloy"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"{JOBS}/{job['id']}" and job["status"] in ("queued", "running")
    assert spy.calls == [{"priority": "batch", "request_id": r.headers["x-request-id"]}]
    done = _poll(client, job["id"])
    assert done["status"] == "done" and done["audio_url"] == f"{JOBS}/{job['id']}/audio"
    assert done["expires_at"] >= done["created_at"] + 3600 - 1
    got = client.get(done["audio_url"])
    assert got.status_code == 200 and got.headers["content-type"] == "audio/wav"
    assert got.headers["x-voxscale-voice-mapped"] == "alloy -> en_US-joe-medium"
    wav, sr = sf.read(io.BytesIO(got.content), dtype="float32")
    assert sr == 22050 and len(wav) > sr


def test_a_realtime_job_may_be_asked_for(client: TestClient, spy: SubmitSpy) -> None:
    r = client.post(JOBS, json={"input": "Now please.", "priority": "realtime"})
    assert r.status_code == 202 and r.json()["priority"] == "realtime"
    assert spy.calls[0]["priority"] == "realtime"
    assert _poll(client, r.json()["id"])["status"] == "done"


def test_a_jobs_audio_is_a_409_until_it_is_done(client: TestClient, pipeline: TTSPipeline) -> None:
    with held(pipeline):  # holds synthesis: the job cannot finish
        job = client.post(JOBS, json={"input": "Wait for it."}).json()
        r = client.get(f"{JOBS}/{job['id']}/audio")
        assert r.status_code == 409 and _error(r)["param"] == "job_id"
        assert "until it is done" in _error(r)["message"]
    assert _poll(client, job["id"])["status"] == "done"


BAD_JOBS: list[tuple[str, dict[str, Any], int, str]] = [
    ("streamed", {"input": "hi", "stream": True}, 422, "stream"),
    ("as events", {"input": "hi", "stream_format": "sse"}, 422, "stream_format"),
    ("unknown voice", {"input": "hi", "voice": "bob"}, 404, "voice"),
    ("nothing speakable", {"input": "...!?"}, 400, "input"),
    ("empty input", {"input": ""}, 422, "input"),
]


@pytest.mark.parametrize(("why", "body", "status", "param"), BAD_JOBS, ids=[b[0] for b in BAD_JOBS])
def test_a_bad_job_is_refused_at_once_naming_the_field(
    client: TestClient, why: str, body: dict[str, Any], status: int, param: str
) -> None:
    r = client.post(JOBS, json=body)
    assert r.status_code == status and _error(r)["param"] == param, f"{why}: {r.text}"


@pytest.mark.parametrize("job_id", ["job_" + "0" * 32, "not-a-job", "vc_0123456789abcdef", "job_" + "g" * 32])
def test_an_unknown_job_is_a_404_naming_it(client: TestClient, job_id: str) -> None:
    for path in (f"{JOBS}/{job_id}", f"{JOBS}/{job_id}/audio"):
        r = client.get(path)
        assert r.status_code == 404 and _error(r)["param"] == "job_id", r.text


def test_an_unknown_route_answers_in_the_same_error_shape(client: TestClient) -> None:
    r = client.get("/v1/audio/nowhere")
    assert r.status_code == 404 and "/v1/audio/nowhere" in _error(r)["message"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(job_id: str, now: float, status: str = "done") -> JobRecord:
    return JobRecord(job_id, status, now, now, "batch", "wav", 22050, "r", {}, "ns/p")


@pytest.mark.parametrize("on_disk", [True, False], ids=["directory", "memory"])
def test_jobs_expire_after_their_ttl_and_are_removed(tmp_path: Path, on_disk: bool) -> None:
    clock = Clock()
    store = JobStore(tmp_path / "jobs" if on_disk else None, ttl_s=60, clock=clock)
    old, fresh = "job_" + "a" * 32, "job_" + "b" * 32
    store.put(_record(old, clock.now), b"audio")
    clock.now += 30
    store.put(_record(fresh, clock.now), b"audio")
    assert store.get(old) is not None and store.audio(old) == b"audio"
    clock.now += 31  # old is 61 s old, fresh 31 s
    assert store.get(old) is None  # expired on sight
    assert store.sweep() == 0 and store.get(fresh) is not None
    clock.now += 30
    assert store.sweep() == 1 and store.get(fresh) is None and store.audio(fresh) is None
    if on_disk:
        assert list((tmp_path / "jobs").iterdir()) == []  # no record, no audio, no temp file left


def test_a_job_whose_synthesis_fails_or_times_out_says_so(tmp_path: Path) -> None:
    async def scenario() -> list[JobRecord | None]:
        store = JobStore(tmp_path, ttl_s=60)
        runner = JobRunner(store, pod="ns/p", timeout_s=0.2)
        loop = asyncio.get_running_loop()
        failing: asyncio.Future[np.ndarray] = loop.create_future()
        failing.set_exception(RuntimeError("the vocoder fell over"))
        hanging: asyncio.Future[np.ndarray] = loop.create_future()

        async def encode(wavs: list[np.ndarray]) -> bytes:
            return b""

        records = [runner.create("batch", "wav", 22050, f"r{i}", {}) for i in range(2)]
        runner.start(records[0], [failing], encode)
        runner.start(records[1], [hanging], encode)
        await runner.idle()
        return [store.get(r.id) for r in records]

    failed, timed_out = asyncio.run(scenario())
    assert failed is not None and failed.status == "failed" and "the vocoder fell over" in (failed.error or "")
    assert timed_out is not None and timed_out.status == "failed" and "longer than 0.2 s" in (timed_out.error or "")


# -------------------------------------------------------------------------------------- voice deletion
def test_a_deleted_voice_is_gone_and_a_second_delete_is_a_404(client: TestClient, reference: bytes) -> None:
    voice_id = client.post("/v1/voices", files={"file": ("ref.wav", reference, "audio/wav")}).json()["id"]
    assert client.post("/v1/audio/speech", json={"input": "Hi.", "voice": voice_id}).status_code == 200
    assert client.delete(f"/v1/voices/{voice_id}").status_code == 204
    r = client.post("/v1/audio/speech", json={"input": "Hi.", "voice": voice_id})
    assert r.status_code == 404 and _error(r)["param"] == "voice"
    assert voice_id not in {v["id"] for v in client.get("/v1/voices").json()["data"]}
    again = client.delete(f"/v1/voices/{voice_id}")
    assert again.status_code == 404 and _error(again)["param"] == "voice_id" and voice_id in _error(again)["message"]


@pytest.mark.parametrize("voice_id", ["alloy", "vc_short", "en_US-joe-medium"])
def test_deleting_what_is_not_a_registered_voice_is_a_404_naming_it(client: TestClient, voice_id: str) -> None:
    r = client.delete(f"/v1/voices/{voice_id}")
    assert r.status_code == 404 and _error(r)["param"] == "voice_id" and repr(voice_id) in _error(r)["message"]


# ------------------------------------------------------------------------------------------------ uploads
def test_an_upload_over_the_limit_is_a_413_naming_the_field_and_the_limit(client: TestClient) -> None:
    r = client.post("/v1/voices", files={"file": ("big.wav", b"\0" * 300_000, "audio/wav")})
    assert r.status_code == 413, r.text
    assert _error(r)["param"] == "file" and "200000 bytes" in _error(r)["message"]


def test_a_missing_or_misnamed_upload_is_a_422_naming_file(client: TestClient, reference: bytes) -> None:
    for kwargs in ({"files": {"recording": ("ref.wav", reference, "audio/wav")}}, {"json": {"file": "x"}}):
        r = client.post("/v1/voices", **kwargs)
        assert r.status_code == 422 and _error(r)["param"] == "file", r.text


def _multipart(size: int, chunk: int) -> tuple[list[bytes], str]:
    boundary = "voxscaleboundary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'.encode()
    body = head + b"\1" * size + f"\r\n--{boundary}--\r\n".encode()
    return [body[i : i + chunk] for i in range(0, len(body), chunk)], f"multipart/form-data; boundary={boundary}"


def _read_upload(chunks: list[bytes], content_type: str, limit: int) -> tuple[bytes | ApiError, int]:
    """read_file_field over a body that arrives in chunks with no Content-Length; how much it took."""
    taken = 0

    async def receive() -> dict[str, Any]:
        nonlocal taken
        body = chunks[taken // len(chunks[0])] if taken < sum(map(len, chunks)) else b""
        taken += len(body)
        return {"type": "http.request", "body": body, "more_body": taken < sum(map(len, chunks))}

    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode())]}

    async def run() -> bytes | ApiError:
        try:
            return await read_file_field(Request(scope, receive), "file", limit)
        except ApiError as exc:
            return exc

    return asyncio.run(run()), taken


def test_an_upload_is_cut_off_at_the_limit_not_read_whole() -> None:
    chunk, limit = 16 * 1024, 100_000
    chunks, content_type = _multipart(10 * 1024 * 1024, chunk)  # 10 MB, no Content-Length
    result, taken = _read_upload(chunks, content_type, limit)
    assert isinstance(result, ApiError) and result.status == 413 and result.param == "file"
    assert taken <= limit + MULTIPART_OVERHEAD + chunk  # stopped reading at the limit
    small, _ = _read_upload(*_multipart(50_000, chunk), limit)
    assert small == b"\1" * 50_000


def _silence(seconds: float, rate: int, channels: int = 1, fmt: str = "FLAC") -> bytes:
    """A recording of digital silence, written a second at a time (never held whole in memory)."""
    buf = io.BytesIO()
    block = np.zeros((rate, channels), dtype=np.int16)
    with sf.SoundFile(buf, "w", samplerate=rate, channels=channels, format=fmt, subtype="PCM_16") as f:
        for _ in range(int(seconds)):
            f.write(block)
    return buf.getvalue()


def test_a_flac_bomb_is_refused_from_its_header_without_decoding_it() -> None:
    """10 min of FLAC silence is ~0.2 MB uploaded and 115 MB as float32: refused before decoding."""
    import tracemalloc

    from voxscale.inference import audio

    bomb = _silence(600, 48_000)
    assert len(bomb) < 1_000_000
    tracemalloc.start()
    try:
        with pytest.raises(audio.AudioError, match=r"too long: 600\.0 s"):
            audio.decode(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10_000_000, f"{peak / 1e6:.0f} MB allocated to refuse it"


def test_a_header_that_understates_the_length_still_decodes_at_most_the_limit() -> None:
    """A wav whose header claims 1 s while 60 s follow: libsndfile reads what the header says, and
    the bounded read never takes more than the limit either way."""
    from voxscale.inference import audio

    wav = bytearray(_silence(60, 16_000, fmt="WAV"))
    data_at = wav.index(b"data")
    wav[data_at + 4 : data_at + 8] = (16_000 * 2).to_bytes(4, "little")  # 1 s of 16-bit mono
    samples, rate = audio.decode(bytes(wav))
    assert rate == 16_000 and len(samples) <= audio.MAX_REFERENCE_S * rate + 1


@pytest.mark.parametrize(
    ("seconds", "rate", "channels", "says"),
    [(5, 192_000, 1, "sample rate 192000 Hz"), (5, 16_000, 6, "6 channels"), (31, 16_000, 1, "too long: 31.0 s")],
)
def test_an_upload_that_would_decode_to_too_much_is_a_422_naming_the_limit(
    client: TestClient, seconds: int, rate: int, channels: int, says: str
) -> None:
    upload = _silence(seconds, rate, channels)
    r = client.post("/v1/voices", files={"file": ("big.flac", upload, "audio/flac")})
    assert r.status_code == 422, r.text
    assert _error(r)["param"] == "file" and says in _error(r)["message"], r.text


# ---------------------------------------------------------------------------------------------------- NVML
def test_gpu_gauges_are_absent_on_the_cpu(client: TestClient) -> None:
    samples = [
        s.name
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for s in family.samples
        if s.name in (mc.GPU_UTILIZATION.name, mc.GPU_MEMORY_USED.name)
    ]
    assert samples == []


def test_without_the_binding_or_a_driver_nvml_publishes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert NvmlGauges.start(ServerMetrics.create()) is None  # the real binding here: no libnvidia-ml
    monkeypatch.setitem(__import__("sys").modules, "pynvml", None)  # the binding not installed
    assert NvmlGauges.start(ServerMetrics.create()) is None


class NVMLError(Exception):
    pass


def _fake_nvml(fail_reads: set[int]) -> types.SimpleNamespace:
    def read(handle: int, value: Any) -> Any:
        if handle in fail_reads:
            raise NVMLError("GPU is lost")
        return value

    return types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUtilizationRates=lambda h: read(h, types.SimpleNamespace(gpu=40 + h)),
        nvmlDeviceGetMemoryInfo=lambda h: read(h, types.SimpleNamespace(used=(h + 1) * 2**30)),
    )


def test_nvml_gauges_follow_each_gpu_and_drop_one_that_cannot_be_read() -> None:
    metrics = ServerMetrics.create()
    fails: set[int] = set()
    gauges = NvmlGauges.start(metrics, _fake_nvml(fails))
    assert gauges is not None
    gauges.refresh()
    value = metrics.registry.get_sample_value
    assert value(mc.GPU_UTILIZATION.name, {"gpu": "1"}) == pytest.approx(0.41)
    assert value(mc.GPU_MEMORY_USED.name, {"gpu": "0"}) == 2**30
    fails.add(1)
    gauges.refresh()
    assert value(mc.GPU_UTILIZATION.name, {"gpu": "1"}) is None  # gone, not stale
    assert value(mc.GPU_UTILIZATION.name, {"gpu": "0"}) == pytest.approx(0.40)
    broken = _fake_nvml(set())
    broken.nvmlInit = lambda: (_ for _ in ()).throw(NVMLError("Driver Not Loaded"))
    assert NvmlGauges.start(ServerMetrics.create(), broken) is None


# ------------------------------------------------------------------------------ real processes, one store
@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess, Path]]:
    """Two `voxscale serve` processes sharing a voice store, as two pods of one TTSDeployment."""
    root = tmp_path_factory.mktemp("replicas")
    store = root / "store"
    common = {"VOXSCALE_VOICE_STORE": str(store), "VOXSCALE_POD_NAMESPACE": "tts"}
    a = ServerProcess.start(root, VOXSCALE_POD_NAME="pod-a", **common)
    try:
        b = ServerProcess.start(root, VOXSCALE_POD_NAME="pod-b", **common)
    except BaseException:
        a.stop()
        raise
    yield a, b, store
    a.stop()
    b.stop()


def test_the_request_id_and_the_pod_are_in_the_servers_log(replicas: tuple[ServerProcess, ServerProcess, Path]) -> None:
    a, _, _ = replicas
    headers = {"X-Request-Id": "log-check-1"}
    r = requests.post(f"{a.url}/v1/audio/speech", json={"input": "Hi.", "priority": "batch"}, headers=headers)
    assert r.status_code == 200 and r.headers["x-request-id"] == "log-check-1"
    traced = requests.post(f"{a.url}/v1/audio/speech", json={"input": "Hi."}, headers={"traceparent": TRACEPARENT})
    assert traced.status_code == 200 and traced.headers["x-request-id"] == TRACE
    lines = a.log.read_text().splitlines()  # both answered, so both logged (stderr is line-buffered)
    mine = [line for line in lines if "request_id=log-check-1" in line]
    assert any("POST /v1/audio/speech 200" in line and "pod=tts/pod-a" in line for line in mine), lines[-10:]
    batches = [line for line in lines if "voxscale.inference.batcher:" in line]
    for rid in ("log-check-1", TRACE):  # the batch that synthesised each request names it, at INFO
        assert any(rid in line for line in batches), f"no batcher line names {rid}: {batches[-5:] or lines[-10:]}"


def test_a_job_posted_to_one_replica_is_polled_and_fetched_on_another(
    replicas: tuple[ServerProcess, ServerProcess, Path],
) -> None:
    a, b, store = replicas
    r = requests.post(f"{a.url}{JOBS}", json={"input": "Shared results.", "response_format": "flac"}, timeout=30)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert (store / "jobs" / f"{job_id}.json").exists()
    done = _poll(requests, job_id, base=b.url)
    assert done["status"] == "done" and done["pod"] == "tts/pod-a", done
    audio = requests.get(f"{b.url}{done['audio_url']}", timeout=30)
    assert audio.status_code == 200 and audio.headers["content-type"] == "audio/flac"
    wav, sr = sf.read(io.BytesIO(audio.content), dtype="float32")
    assert sr == 22050 and len(wav) > 0.5 * sr


def test_a_voice_deleted_through_one_replica_is_gone_on_every_replica(
    replicas: tuple[ServerProcess, ServerProcess, Path], reference: bytes
) -> None:
    a, b, store = replicas
    up = requests.post(f"{a.url}/v1/voices", files={"file": ("ref.wav", reference, "audio/wav")}, timeout=60)
    voice_id = up.json()["id"]
    speak = {"input": "Hi.", "voice": voice_id, "response_format": "pcm"}
    assert requests.post(f"{a.url}/v1/audio/speech", json=speak, timeout=60).status_code == 200  # now cached on a
    assert requests.delete(f"{b.url}/v1/voices/{voice_id}", timeout=30).status_code == 204
    assert not (store / f"{voice_id}.json").exists()
    gone = requests.post(f"{a.url}/v1/audio/speech", json=speak, timeout=60)
    assert gone.status_code == 404 and _error(gone)["param"] == "voice"
    assert requests.delete(f"{a.url}/v1/voices/{voice_id}", timeout=30).status_code == 404


# ------------------------------------------------------------------------- work nobody waits for, wedged GPUs
def _eventually(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


class SynthesisSpy:
    """Records the sentences the batcher hands the pipeline, then lets the real pipeline synthesise them."""

    def __init__(self, batcher: Any) -> None:
        self.real = batcher.synthesize
        self.items: list[Any] = []
        batcher.synthesize = self

    def __call__(self, items: list[Any]) -> Any:
        self.items += items
        return self.real(items)


def test_a_request_that_timed_out_is_never_synthesised(pipeline: TTSPipeline) -> None:
    """A 504 withdraws the request: its queued sentences leave the batcher before they cost anything."""
    queued_text = "This request waits in the queue. It has three sentences. Nobody hears them."
    with TestClient(
        create_app(Settings(precision="fp32", request_timeout_s=0.5, cpu_threads=usable_cpus()), preloaded=pipeline)
    ) as c:
        state = c.app.state.voxscale  # type: ignore[attr-defined]
        spy = SynthesisSpy(state.batcher)
        value = state.metrics.registry.get_sample_value

        def speak(text: str) -> int:
            return c.post("/v1/audio/speech", json={"input": text, "response_format": "pcm"}).status_code

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            with held(pipeline):  # synthesis held: the first request stays in its batch, the second queued
                first = pool.submit(speak, "The first request is being spoken.")
                _eventually(lambda: value(mc.INFLIGHT.name) == 1, "the first request in flight")
                second = pool.submit(speak, queued_text)
                assert second.result() == 504
                assert value(mc.QUEUE_DEPTH.name) == 0  # it left the queue when its client was answered
            assert first.result() == 504  # its batch ran to the end: synthesis already under way is not cut
        _eventually(lambda: value(mc.INFLIGHT.name) == 0, "the first request's batch done")
    assert len(spy.items) == 1, f"{len(spy.items)} sentences synthesised; only the first request's one was due"


def _sample(url: str, name: str) -> float:
    """One unlabelled sample of a server's /metrics (0 when absent)."""
    for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name and not sample.labels:
                return float(sample.value)
    return 0.0


def _admitted(url: str) -> float:
    return _sample(url, mc.QUEUE_DEPTH.name) + _sample(url, mc.INFLIGHT.name)


def test_a_request_whose_client_went_away_is_not_synthesised(
    replicas: tuple[ServerProcess, ServerProcess, Path], pipeline: TTSPipeline
) -> None:
    """A client that hangs up withdraws its request, as a timeout does (a real socket, closed)."""
    a, _, _ = replicas
    busy_text = " ".join(f"Sentence number {n} keeps this replica busy for a while." for n in range(1, 13))
    busy_sentences = len(pipeline.prepare(busy_text, (0.667, 1.0, 0.8)))
    synthesised = f"{mc.BATCH_SIZE.name}_sum"  # sentences in the batches run
    before = _sample(a.url, synthesised)
    body = b'{"input": "Nobody will listen to this.", "response_format": "pcm"}'
    head = f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        speech = {"input": busy_text, "response_format": "pcm"}
        busy = pool.submit(requests.post, f"{a.url}/v1/audio/speech", json=speech, timeout=300)
        _eventually(lambda: _admitted(a.url) == 1, "the busy request admitted")
        with socket.create_connection(("127.0.0.1", a.port)) as client:
            client.sendall(f"{head}\r\n\r\n".encode() + body)
            _eventually(lambda: _admitted(a.url) == 2, "the second request admitted behind it")
        # closed: the client went away while its request waited behind the busy one's sentences
        assert busy.result().status_code == 200
    _eventually(lambda: _admitted(a.url) == 0, "the replica idle")
    assert _sample(a.url, synthesised) - before == busy_sentences, "the abandoned request was synthesised"


class DeviceAssert(torch.nn.Module):
    """A vocoder whose kernel trips a device-side assert, reported as CUDA reports it."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # the pipeline reads the vocoder's dtype from it

    def forward(self, z: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        raise RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA` to debug")


def test_a_sticky_cuda_error_fails_liveness_and_readiness_with_the_reason(
    pipeline: TTSPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wedged GPU fails every request until the process restarts: the probes say so, so the pod
    leaves the Service and the kubelet restarts it."""
    with TestClient(create_app(Settings(precision="fp32"), preloaded=pipeline), raise_server_exceptions=False) as c:
        assert c.get("/healthz").status_code == c.get("/readyz").status_code == 200
        monkeypatch.setattr(pipeline.voice, "vocoder", DeviceAssert())
        assert c.post("/v1/audio/speech", json={"input": "Hi."}).status_code == 500
        for probe in ("/healthz", "/readyz"):
            r = c.get(probe)
            assert r.status_code == 503, f"{probe}: {r.status_code} {r.text}"
            assert "CUDA error: device-side assert triggered" in r.json()["reason"], r.text

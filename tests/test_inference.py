"""The TTS server on the CPU: parity with onnxruntime, every endpoint, every bad input, load behaviour."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import requests
import soundfile as sf
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.inference_helpers import ServerProcess, held, reference_recording, wav_bytes
from voxscale import metrics_contract as mc
from voxscale.inference import audio
from voxscale.inference.pipeline import TTSPipeline
from voxscale.inference.piper import default_voice_paths
from voxscale.inference.server import create_app
from voxscale.inference.settings import Settings, usable_cpus
from voxscale.inference.speaker import resample
from voxscale.inference.vits import Scales

PARITY_TOLERANCE = 1e-3  # max absolute sample difference (audio in [-1, 1]); measured ~1e-4


@pytest.fixture(scope="module")
def pipeline() -> TTSPipeline:
    return TTSPipeline.load(precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def client(pipeline: TTSPipeline) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(precision="fp32"), preloaded=pipeline)) as c:
        yield c


@pytest.mark.parametrize(
    "text",
    [
        "Hello world.",
        "The quick brown fox, jumping over the lazy dog!",
        "Autoscaling GPU text to speech is hard; voxscale makes it boring.",
    ],
)
def test_torch_pipeline_matches_onnxruntime_with_zero_noise(pipeline: TTSPipeline, text: str) -> None:
    ids = pipeline.prepare(text, (0.0, 1.0, 0.0))[0].ids
    onnx_path, _ = default_voice_paths()
    ref = (
        ort.InferenceSession(str(onnx_path))
        .run(
            None,
            {
                "input": np.array([ids], dtype=np.int64),
                "input_lengths": np.array([len(ids)], dtype=np.int64),
                "scales": np.array([0.0, 1.0, 0.0], dtype=np.float32),
            },
        )[0]
        .ravel()
    )
    wav, samples = pipeline.voice(torch.tensor([ids]), torch.tensor([len(ids)]), Scales(0.0, 1.0, 0.0))
    ours = wav.ravel().numpy()
    assert len(ours) == len(ref) == int(samples[0])
    assert np.abs(ours - ref).max() < PARITY_TOLERANCE
    assert np.abs(ref).max() > 0.1  # it is speech, not silence


def test_batched_synthesis_equals_one_by_one(pipeline: TTSPipeline) -> None:
    items = [pipeline.prepare(t, (0.0, 1.0, 0.0))[0] for t in ("Short.", "A somewhat longer sentence here.")]
    pipeline.audio_cache.clear()
    together = pipeline.synthesize(items)
    alone = []
    for item in items:
        pipeline.audio_cache.clear()  # zero noise is deterministic, so the batch's audio would be cached
        alone.append(pipeline.synthesize([item])[0])
    for a, b in zip(together, alone, strict=True):
        assert len(a) == len(b) and np.abs(a - b).max() < 1e-4


def _decode(body: bytes) -> tuple[np.ndarray, int]:
    wav, sr = sf.read(io.BytesIO(body), dtype="float32")
    return wav, sr


@pytest.mark.parametrize("fmt", audio.supported_formats())
def test_speech_in_every_supported_format(client: TestClient, fmt: str) -> None:
    r = client.post(
        "/v1/audio/speech",
        json={"model": "tts-1", "input": "Hello there. Nice to meet you.", "voice": "alloy", "response_format": fmt},
    )
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith(audio.CONTENT_TYPES[fmt].split(";")[0])
    assert r.headers["x-request-id"]
    if fmt == "pcm":
        samples = np.frombuffer(r.content, dtype="<i2")
        assert len(samples) > 22050  # more than a second at 22.05 kHz
    else:
        wav, sr = _decode(r.content)
        assert sr in (22050, 24000) and len(wav) > sr and np.abs(wav).max() > 0.05  # opus plays at 24 kHz


def test_same_seed_same_audio_and_speed_shortens(client: TestClient) -> None:
    body = {"input": "Reproducible speech, please.", "seed": 42, "response_format": "pcm"}
    a, b = (client.post("/v1/audio/speech", json=body).content for _ in range(2))
    assert a == b
    fast = client.post("/v1/audio/speech", json={**body, "speed": 2.0}).content
    assert len(fast) < 0.7 * len(a)
    calm = client.post("/v1/audio/speech", json={**body, "style": "calm"}).content
    assert len(calm) > len(a)


BAD_SPEECH: list[tuple[str, dict[str, Any], int, str]] = [
    ("empty input", {"input": ""}, 422, "input"),
    ("over-long input", {"input": "a" * 4097}, 422, "input"),
    ("unknown voice", {"input": "hi", "voice": "bob"}, 404, "built-in voices: en_US-joe-medium"),
    ("unsupported format", {"input": "hi", "response_format": "aac"}, 422, "response_format"),
    ("speed too high", {"input": "hi", "speed": 9}, 422, "speed"),
    ("speed too low", {"input": "hi", "speed": 0.1}, 422, "speed"),
    ("negative seed", {"input": "hi", "seed": -1}, 422, "seed"),
    ("unknown field", {"input": "hi", "temperature": 0.5}, 422, "temperature"),
    ("unknown style", {"input": "hi", "style": "angry"}, 422, "style"),
    ("nothing speakable", {"input": "...!?"}, 400, "input"),
    ("streaming flac", {"input": "hi", "stream": True, "response_format": "flac"}, 400, "response_format"),
    ("wrong type", {"input": 12}, 422, "input"),
]


@pytest.mark.parametrize(("why", "body", "status", "mentions"), BAD_SPEECH, ids=[b[0] for b in BAD_SPEECH])
def test_bad_speech_requests_get_a_4xx_naming_the_problem(
    client: TestClient, why: str, body: dict[str, Any], status: int, mentions: str
) -> None:
    r = client.post("/v1/audio/speech", json=body)
    assert r.status_code == status, f"{why}: {r.status_code} {r.text}"
    assert mentions in r.json()["error"]["message"], r.json()


def test_malformed_json_is_a_4xx(client: TestClient) -> None:
    r = client.post("/v1/audio/speech", content=b"{not json", headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500


@pytest.fixture(scope="module")
def reference(pipeline: TTSPipeline) -> bytes:
    """Six seconds of real speech at 16 kHz (our own voice's, resampled), as a user would upload."""
    text = "This is a reference recording. It has a few sentences of clear speech. That should be plenty."
    return reference_recording(pipeline, text)


def test_register_a_voice_then_speak_with_it(client: TestClient, reference: bytes) -> None:
    first = client.post("/v1/voices", files={"file": ("ref.wav", reference, "audio/wav")})
    assert first.status_code == 201, first.text
    voice = first.json()
    assert voice["id"].startswith("vc_") and voice["mapped_to"] == "en_US-joe-medium"
    assert "not conditioned" in voice["note"]  # never pretends to clone
    again = client.post("/v1/voices", files={"file": ("ref.wav", reference, "audio/wav")})
    assert again.status_code == 200 and again.json()["cached"] is True and again.json()["id"] == voice["id"]
    listed = {v["id"]: v for v in client.get("/v1/voices").json()["data"]}
    assert listed[voice["id"]]["type"] == "registered"
    r = client.post("/v1/audio/speech", json={"input": "Speaking with a registered voice.", "voice": voice["id"]})
    assert r.status_code == 200
    assert r.headers["x-voxscale-voice-mapped"].startswith(f"{voice['id']} -> en_US-joe-medium")


def test_flac_and_other_sample_rates_are_accepted(client: TestClient, reference: bytes) -> None:
    wav, _ = _decode(reference)
    buf = io.BytesIO()
    sf.write(buf, resample(torch.from_numpy(wav), 16000, 44100).numpy(), 44100, format="FLAC")
    r = client.post("/v1/voices", files={"file": ("ref.flac", buf.getvalue(), "audio/flac")})
    assert r.status_code in (200, 201), r.text


def _tone(seconds: float, level: float, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(0)
    return (level * np.sin(2 * np.pi * 180 * t) * (1 + 0.3 * rng.standard_normal(len(t)))).astype(np.float32)


BAD_UPLOADS = [
    ("too short", wav_bytes(_tone(1.0, 0.3), 16000), "too short"),
    ("too long", wav_bytes(_tone(40.0, 0.3), 16000), "too long"),
    ("silent", wav_bytes(np.zeros(16000 * 5, dtype=np.float32), 16000), "silent"),
    ("clipped", wav_bytes(np.clip(_tone(5.0, 3.0), -1, 1), 16000), "clipped"),
    ("not audio", b"this is not a wav file at all", "not a readable audio file"),
    ("empty", b"", "empty"),
]


@pytest.mark.parametrize(("why", "data", "reason"), BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_quality_gate_refuses_bad_references_with_the_reason(
    client: TestClient, why: str, data: bytes, reason: str
) -> None:
    r = client.post("/v1/voices", files={"file": ("ref.wav", data, "audio/wav")})
    assert r.status_code == 422, f"{why}: {r.status_code}"
    assert reason in r.json()["error"]["message"]


def test_health_readiness_and_metrics_from_the_contract(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").status_code == 200
    client.post("/v1/audio/speech", json={"input": "Count me."})
    text = client.get("/metrics").text
    for metric in mc.SERVER_METRICS:
        if metric.kind is mc.Kind.GAUGE and metric.labels:
            continue  # NVML series appear only on a GPU
        assert f"# TYPE {metric.name.removesuffix('_total')}" in text, metric.name
    assert 'voxscale_requests_total{code="200"}' in text


def _sample(client: TestClient, metric: mc.Metric, **labels: str) -> float:
    """One series' value from /metrics (0 while the series does not exist yet)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == metric.name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def _wait_for(client: TestClient, metric: mc.Metric, value: float, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _sample(client, metric) != value:
        assert time.monotonic() < deadline, f"{metric.name} never reached {value}"
        time.sleep(0.02)


@pytest.fixture
def small_queue(pipeline: TTSPipeline) -> Iterator[TestClient]:
    """A fresh server (counters at zero) whose queue holds one request, over the shared pipeline."""
    with TestClient(
        create_app(Settings(precision="fp32", max_queue=1, cpu_threads=usable_cpus()), preloaded=pipeline)
    ) as c:
        yield c


LONG = "Sentence one is here. Sentence two follows it. Then a third sentence arrives. And a fourth one ends it."


def test_a_request_that_could_never_be_served_is_not_demand(small_queue: TestClient) -> None:
    """Malformed requests cost nothing to answer: counting them as demand would let them buy GPUs."""
    assert small_queue.post("/v1/audio/speech", json={"input": "...!?"}).status_code == 400
    assert small_queue.post("/v1/audio/speech", json={"input": "hi", "voice": "bob"}).status_code == 404
    assert small_queue.post("/v1/audio/speech", json={"input": ""}).status_code == 422  # never reaches the handler
    assert _sample(small_queue, mc.REQUESTS_RECEIVED) == 0
    assert _sample(small_queue, mc.INPUT_CHARACTERS) == 0


def test_the_queue_counts_requests_and_a_refused_request_is_still_received(
    small_queue: TestClient, pipeline: TTSPipeline
) -> None:
    texts = ["The first request is being spoken.", LONG, "The third one finds the queue full."]

    def speak(text: str) -> int:
        return small_queue.post("/v1/audio/speech", json={"input": text, "response_format": "pcm"}).status_code

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        with held(pipeline):  # holds synthesis, so the first request stays in flight and the second queued
            first = pool.submit(speak, texts[0])
            _wait_for(small_queue, mc.INFLIGHT, 1)
            second = pool.submit(speak, texts[1])
            _wait_for(small_queue, mc.QUEUE_DEPTH, 1)  # four sentences, one request
            refused = small_queue.post("/v1/audio/speech", json={"input": texts[2]})
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            assert _sample(small_queue, mc.REQUESTS_RECEIVED) == 3
            assert _sample(small_queue, mc.INPUT_CHARACTERS) == sum(len(t) for t in texts)
        assert first.result() == second.result() == 200
    elapsed = time.monotonic() - started
    assert _sample(small_queue, mc.QUEUE_DEPTH) == _sample(small_queue, mc.INFLIGHT) == 0
    assert _sample(small_queue, mc.COMPLETED_REQUESTS, gpu_product="cpu") == 2
    assert 0 < _sample(small_queue, mc.BUSY_SECONDS, gpu_product="cpu") < elapsed


def test_a_request_longer_than_the_queue_is_admitted_on_an_empty_queue(small_queue: TestClient) -> None:
    busy_before = _sample(small_queue, mc.BUSY_SECONDS, gpu_product="cpu")  # the warm-up is no batch
    r = small_queue.post("/v1/audio/speech", json={"input": LONG, "response_format": "pcm"})
    assert r.status_code == 200, r.text
    assert _sample(small_queue, mc.COMPLETED_REQUESTS, gpu_product="cpu") == 1  # once, not per sentence
    assert _sample(small_queue, mc.BUSY_SECONDS, gpu_product="cpu") > busy_before == 0


def test_bearer_token_is_enforced_when_configured(pipeline: TTSPipeline) -> None:
    with TestClient(create_app(Settings(api_token="s3cret"), preloaded=pipeline)) as c:
        assert c.post("/v1/audio/speech", json={"input": "hi"}).status_code == 401
        ok = c.post("/v1/audio/speech", json={"input": "hi"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/healthz").status_code == 200  # probes need no token


# ----------------------------------------------------------------- a real server process under load
ONE_SENTENCE = (
    "This is request number {i}, and it keeps talking for a while so that the server is still busy "
    "with it when the signal arrives, which is the whole point of this exercise"
)


def test_overload_gets_429_with_retry_after_and_nothing_accepted_is_dropped(tmp_path: Path) -> None:
    server = ServerProcess.start(tmp_path, VOXSCALE_MAX_QUEUE="3", VOXSCALE_MAX_BATCH_SIZE="2")
    try:

        def call(i: int) -> requests.Response:
            return requests.post(
                f"{server.url}/v1/audio/speech",
                json={"input": f"Request number {i} is here.", "response_format": "wav"},
                timeout=120,
            )

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(call, range(16)))
        codes = [r.status_code for r in results]
        assert set(codes) <= {200, 429}, codes
        assert 429 in codes and 200 in codes, codes
        assert all(r.headers.get("retry-after") for r in results if r.status_code == 429)
        for r in results:
            if r.status_code == 200:
                wav, _ = _decode(r.content)
                assert len(wav) > 22050 * 0.8
    finally:
        server.stop()


def _accepted(server: ServerProcess) -> float:
    text = requests.get(f"{server.url}/metrics", timeout=5).text
    values = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith((mc.QUEUE_DEPTH.name + " ", mc.INFLIGHT.name + " "))
    ]
    return sum(values)


def test_sigterm_drains_accepted_requests_then_exits(tmp_path: Path) -> None:
    server = ServerProcess.start(tmp_path, VOXSCALE_MAX_BATCH_SIZE="2")
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [
            pool.submit(
                requests.post, f"{server.url}/v1/audio/speech", json={"input": ONE_SENTENCE.format(i=i)}, timeout=120
            )
            for i in range(4)
        ]
        # SIGTERM only once all four are accepted (queued or being synthesised): those must finish.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _accepted(server) < 4:
            time.sleep(0.05)
        assert time.monotonic() < deadline, "the four requests were never all in the server at once"
        server.terminate()
        time.sleep(0.3)
        try:
            ready = requests.get(f"{server.url}/readyz", timeout=2).status_code
        except requests.ConnectionError:
            ready = 503
        results = [f.result() for f in futures]
    assert ready == 503  # no longer ready while draining
    assert [r.status_code for r in results] == [200, 200, 200, 200]
    assert server.proc.wait(timeout=60) == 0


def test_streaming_sends_the_first_sentence_before_the_whole_text_is_done(tmp_path: Path) -> None:
    server = ServerProcess.start(tmp_path, VOXSCALE_MAX_BATCH_SIZE="1")
    try:
        start = time.monotonic()
        with requests.post(
            f"{server.url}/v1/audio/speech",
            json={"input": LONG * 2, "stream": True, "response_format": "wav"},
            stream=True,
            timeout=120,
        ) as r:
            assert r.status_code == 200
            chunks = r.iter_content(chunk_size=None)
            header = next(chunks)
            first_audio = next(chunks) if len(header) <= 44 else header
            first_at = time.monotonic() - start
            rest = b"".join(chunks)
        total = time.monotonic() - start
        assert header[:4] == b"RIFF"
        assert len(first_audio) > 0 and len(rest) > len(first_audio)
        assert first_at < 0.6 * total, (first_at, total)
    finally:
        server.stop()


def test_a_voice_registered_on_one_replica_works_on_another_and_after_a_restart(
    tmp_path: Path, reference: bytes
) -> None:
    store = tmp_path / "voices"  # what the pods' shared claim is
    first = ServerProcess.start(tmp_path, VOXSCALE_VOICE_STORE=str(store))
    try:
        r = requests.post(f"{first.url}/v1/voices", files={"file": ("ref.wav", reference, "audio/wav")}, timeout=120)
        assert r.status_code == 201, r.text
        voice_id = r.json()["id"]
    finally:
        first.stop()
    # A second process (another replica, or the first one restarted) knows the voice from the store alone.
    second = ServerProcess.start(tmp_path, VOXSCALE_VOICE_STORE=str(store))
    try:
        listed = {v["id"]: v for v in requests.get(f"{second.url}/v1/voices", timeout=10).json()["data"]}
        assert listed[voice_id]["type"] == "registered"
        r = requests.post(
            f"{second.url}/v1/audio/speech",
            json={"input": "Still here after a restart.", "voice": voice_id},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-voxscale-voice-mapped"].startswith(f"{voice_id} -> en_US-joe-medium")
        again = requests.post(
            f"{second.url}/v1/voices", files={"file": ("ref.wav", reference, "audio/wav")}, timeout=120
        )
        assert again.status_code == 200 and again.json()["cached"] is True  # no second embedding, on any replica
    finally:
        second.stop()


def test_an_unknown_registered_voice_says_where_it_was_looked_for(client: TestClient) -> None:
    r = client.post("/v1/audio/speech", json={"input": "hi", "voice": "vc_00000000deadbeef"})
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert "VOXSCALE_VOICE_STORE" in message and "POST /v1/voices" in message


def test_serve_refuses_a_voice_store_it_cannot_write_naming_the_path(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    out = subprocess.run(
        [sys.executable, "-m", "voxscale.cli", "serve", "--voice-store", str(blocker / "voices")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert f"voice store {blocker}/voices: not a writable directory" in out.stderr


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_half_precision_vocoder_stays_close_to_fp32(pipeline: TTSPipeline, precision: str) -> None:
    """The quality argument behind fp16/bf16 on CUDA, checked with the CPU's kernels (measured 58/40 dB)."""
    from voxscale.inference.pipeline import DTYPES

    items = pipeline.prepare("Half precision, whole voice.", (0.0, 1.0, 0.0))
    reference = pipeline.synthesize(items)[0]
    pipeline.voice.vocoder.to(DTYPES[precision])
    try:
        half = pipeline.synthesize(items)[0]
    finally:
        pipeline.voice.vocoder.float()
    snr_db = 10 * np.log10(np.sum(reference**2) / np.sum((half - reference) ** 2))
    assert snr_db > 30, f"{precision}: {snr_db:.1f} dB"


def test_a_voice_store_that_fails_under_the_server_is_a_507_naming_it(
    pipeline: TTSPipeline, reference: bytes, tmp_path: Path
) -> None:
    from voxscale.inference.voices import VoiceStore

    store_dir = tmp_path / "gone"
    kept = pipeline.voices
    pipeline.voices = VoiceStore(store_dir)
    store_dir.rmdir()  # the volume went away after start-up
    try:
        with TestClient(create_app(Settings(precision="fp32"), preloaded=pipeline)) as c:
            r = c.post("/v1/voices", files={"file": ("ref.wav", reference, "audio/wav")})
    finally:
        pipeline.voices = kept
    assert r.status_code == 507
    assert f"voice store {store_dir}: cannot write" in r.json()["error"]["message"]


def test_bf16_is_refused_on_a_gpu_without_it_and_allowed_where_it_is_native() -> None:
    """The decision alone: emulated bfloat16 (T4, V100) is slower than fp32, so it is no choice to accept."""
    from voxscale.inference.pipeline import vocoder_dtype
    from voxscale.settings_contract import SettingError

    cuda, cpu = torch.device("cuda:0"), torch.device("cpu")

    def lacking(_: torch.device) -> bool:
        return False

    with pytest.raises(SettingError, match=r"VOXSCALE_PRECISION=bf16: this GPU \(cuda:0\) has no native bfloat16"):
        vocoder_dtype("bf16", cuda, lacking)
    assert vocoder_dtype("bf16", cuda, lambda _: True) is torch.bfloat16
    assert vocoder_dtype("fp16", cuda, lacking) is torch.float16
    assert vocoder_dtype("bf16", cpu, lambda _: pytest.fail("not asked on the CPU")) is torch.float32


def test_a_server_asked_for_bf16_on_a_gpu_without_it_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused at load, naming the setting and the fix (before any weights move to the device)."""

    from voxscale.settings_contract import SettingError

    # No GPU here: CUDA's answers are a T4's.
    monkeypatch.setattr(torch.cuda, "device", lambda _: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    with pytest.raises(SettingError, match=r"spec\.model\.precision / VOXSCALE_PRECISION to fp16 or fp32"):
        TTSPipeline.load(precision="bf16", device="cuda")


def test_the_cpu_layout_follows_voxscale_cpu_threads(tmp_path: Path) -> None:
    from voxscale.inference.settings import cpu_layout, usable_cpus

    assert cpu_layout(1, 2) == (2, 1, None) and cpu_layout(2, 2) == (1, 2, None) and cpu_layout(4, 2) == (1, 4, None)
    assert cpu_layout(0, 16) == (16, None, 16)  # adaptive: a worker per CPU, the CPUs shared by the running
    limit = tmp_path / "cpu.max"
    limit.write_text("150000 100000\n")  # a pod limited to 1.5 CPUs
    assert usable_cpus(limit) == 1
    limit.write_text("max 100000\n")
    assert usable_cpus(limit) == usable_cpus(tmp_path / "absent") >= 1

"""The server's metrics: the gpu_product label and busy-time accounting without a model; and, through
the real FastAPI app, the signals the autoscaler sizes from (demand at the door, latency of every end)."""

from __future__ import annotations

import concurrent.futures
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from tests.inference_helpers import held
from voxscale import metrics_contract as mc
from voxscale.inference.pipeline import Item, TTSPipeline
from voxscale.inference.server import create_app
from voxscale.inference.server_metrics import BusyClock, gpu_product
from voxscale.inference.settings import Settings, usable_cpus


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA-H100-80GB-HBM3"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA-A100-SXM4-40GB"),
        ("Tesla T4 ", "Tesla-T4"),
    ],
)
def test_gpu_product_has_the_form_of_the_node_label(name: str, label: str) -> None:
    assert gpu_product(torch.device("cuda:0"), device_name=lambda _: name) == label


def test_gpu_product_is_cpu_without_a_gpu() -> None:
    assert gpu_product(torch.device("cpu"), device_name=lambda _: pytest.fail("no CUDA name on the CPU")) == "cpu"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_busy_time_counts_overlapping_batches_once() -> None:
    registry = CollectorRegistry()
    busy = BusyClock(Counter("busy_seconds", "test", registry=registry), clock := FakeClock())

    def seconds() -> float | None:
        return registry.get_sample_value("busy_seconds_total")

    with busy.running():  # 0..5
        clock.now = 1.0
        with busy.running():  # 1..3, inside the first
            clock.now = 3.0
        assert seconds() == 3.0  # moves at every boundary, not only when the last batch ends
        clock.now = 5.0
    clock.now = 10.0  # idle time is not busy time
    with busy.running():  # 10..12
        clock.now = 12.0
    assert seconds() == 7.0


# ------------------------------------------------------------------ the real app's counters
@pytest.fixture(scope="module")
def pipeline() -> TTSPipeline:
    return TTSPipeline.load(precision="fp32", device="cpu")


def _server(pipeline: TTSPipeline, raise_server_exceptions: bool = True, **settings: float) -> TestClient:
    """A fresh server (counters at zero) over the shared pipeline."""
    app = create_app(Settings(precision="fp32", **settings), preloaded=pipeline)
    return TestClient(app, raise_server_exceptions=raise_server_exceptions)


def _sample(client: TestClient, name: str, **labels: str) -> float:
    """One sample's value from /metrics (0 while the series does not exist yet)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def _latencies(client: TestClient) -> tuple[float, float]:
    """(requests timed, seconds summed) in the latency histogram."""
    name = mc.REQUEST_LATENCY.name
    return _sample(client, f"{name}_count"), _sample(client, f"{name}_sum")


def _code(client: TestClient, code: int) -> float:
    return _sample(client, mc.REQUESTS.name, code=str(code))


def _speak(client: TestClient, **body: object) -> int:
    return client.post("/v1/audio/speech", json={"response_format": "pcm", **body}).status_code


@pytest.mark.parametrize(
    ("why", "body", "status"),
    [
        ("nothing speakable", {"input": "...!?"}, 400),
        ("unknown voice", {"input": "hi", "voice": "bob"}, 404),
        ("unknown registered voice", {"input": "hi", "voice": "vc_0123456789abcdef"}, 404),
        ("format the server cannot encode", {"input": "hi", "response_format": "aac"}, 422),
        ("empty input", {"input": ""}, 422),
    ],
)
def test_a_malformed_request_is_not_demand(pipeline: TTSPipeline, why: str, body: dict[str, str], status: int) -> None:
    """Demand buys GPUs: a request more GPUs would not serve must not count as arriving."""
    with _server(pipeline) as client:
        assert client.post("/v1/audio/speech", json={"response_format": "pcm", **body}).status_code == status, why
        assert _sample(client, mc.REQUESTS_RECEIVED.name) == 0, why
        assert _sample(client, mc.INPUT_CHARACTERS.name) == 0, why
        assert _speak(client, input="Count me.") == 200
        assert _sample(client, mc.REQUESTS_RECEIVED.name) == 1
        assert _sample(client, mc.INPUT_CHARACTERS.name) == len("Count me.")


def test_a_timed_out_request_is_timed_and_counted(pipeline: TTSPipeline) -> None:
    """A fleet where every request times out must read p95 >= the timeout, not "no latency at all"."""
    with _server(pipeline, request_timeout_s=0.3) as client:
        with held(pipeline):  # holds synthesis: nothing finishes within the timeout
            assert _speak(client, input="This one will not make it in time.") == 504
        assert _code(client, 504) == 1 and _code(client, 200) == 0
        count, seconds = _latencies(client)
        assert count == 1 and seconds >= 0.3


def test_a_timed_out_stream_is_timed_and_counted(pipeline: TTSPipeline) -> None:
    with _server(pipeline, request_timeout_s=0.3) as client:
        with held(pipeline):
            r = client.post("/v1/audio/speech", json={"input": "Streamed too late.", "stream_format": "sse"})
        assert r.status_code == 200 and "timeout" in r.text  # the error travels as an event
        assert _code(client, 504) == 1
        assert _latencies(client)[0] == 1


def test_a_failed_synthesis_is_timed_and_counted(pipeline: TTSPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(items: list[Item]) -> list[np.ndarray]:
        time.sleep(0.05)
        raise RuntimeError("synthesis broke")

    with _server(pipeline, raise_server_exceptions=False) as client:
        monkeypatch.setattr(client.app.state.voxscale.batcher, "synthesize", broken)  # type: ignore[attr-defined]
        assert _speak(client, input="This one fails.") == 500
        assert _code(client, 500) == 1 and _code(client, 200) == 0
        count, seconds = _latencies(client)
        assert count == 1 and seconds >= 0.05


def test_a_request_refused_for_room_is_demand_but_not_timed(pipeline: TTSPipeline) -> None:
    """429 (queue full) is demand the fleet could serve with more room; it waited for nothing."""

    def wait_for(metric: mc.Metric) -> None:
        deadline = time.monotonic() + 30
        while _sample(client, metric.name) < 1:
            assert time.monotonic() < deadline, f"{metric.name} never reached 1"
            time.sleep(0.02)

    with (
        _server(pipeline, max_queue=1, cpu_threads=usable_cpus()) as client,
        concurrent.futures.ThreadPoolExecutor(2) as pool,
    ):
        with held(pipeline):  # holds synthesis: the first request in flight, the second queued
            first = pool.submit(_speak, client, input="The first request is being spoken.")
            wait_for(mc.INFLIGHT)
            second = pool.submit(_speak, client, input="The second one waits in the queue.")
            wait_for(mc.QUEUE_DEPTH)
            assert _speak(client, input="Refused.") == 429
        assert first.result() == second.result() == 200
        assert _sample(client, mc.REQUESTS_RECEIVED.name) == 3
        assert _code(client, 429) == 1 and _code(client, 200) == 2
        assert _latencies(client)[0] == 2

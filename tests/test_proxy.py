"""The door sidecar (`voxscale proxy`): its pure core, then the real proxy in front of a real HTTP server.

The server behind the door is an aiohttp app on 127.0.0.1 in the test's own event loop (nobody's TTS:
what is checked is what the door does with what any server answers); the SIGTERM drain runs the door
as the `voxscale proxy` process a pod would run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from voxscale import metrics_contract as mc
from voxscale.proxy.app import running
from voxscale.proxy.core import (
    ABORTED,
    BY_DOOR,
    BY_SERVER,
    Admission,
    Door,
    Histogram,
    Limits,
    Readiness,
    forward_headers,
    input_characters,
    parse_hostport,
    status_class,
)
from voxscale.proxy.settings import ProxySettings

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------------------ the pure core
def test_limits_name_the_field_and_the_fix() -> None:
    with pytest.raises(ValueError, match="concurrency=0: the server must be sent at least 1"):
        Limits(0, 4)
    with pytest.raises(ValueError, match="queue=-1: use 0 to refuse at once"):
        Limits(1, -1)


def test_admission_runs_then_queues_then_refuses_and_slots_pass_on_in_order() -> None:
    door: Door[str] = Door(Limits(concurrency=2, queue=2), FakeClock())
    got = [door.arrive(name) for name in "abcde"]
    assert got == [Admission.RUN, Admission.RUN, Admission.WAIT, Admission.WAIT, Admission.FULL]
    assert (door.inflight, list(door.waiting), door.tally.received) == (2, ["c", "d"], 5)
    assert door.finish() == "c"  # the slot passes on, first come first served
    assert door.abandon("d") and not door.abandon("d")
    assert door.finish() is None and door.finish() is None
    assert door.idle
    door.closed = True
    assert door.arrive("f") is Admission.CLOSED and door.tally.received == 6


def test_busy_time_counts_once_however_many_run_and_splits_by_concurrency() -> None:
    clock = FakeClock()
    door: Door[int] = Door(Limits(4, 0), clock)
    door.arrive(1)
    clock.now = 1.0
    door.arrive(2)
    clock.now = 3.0
    door.finish()
    clock.now = 4.0
    door.finish()
    clock.now = 10.0  # idle: not busy
    tally = door.read()
    assert tally.busy_seconds == 4.0
    assert tally.seconds_at == {1: 2.0, 2: 2.0}


def test_a_long_request_counts_busy_time_before_it_ends() -> None:
    clock = FakeClock()
    door: Door[int] = Door(Limits(1, 0), clock)
    door.arrive(1)
    clock.now = 5.0
    assert door.read().busy_seconds == 5.0


OPS = st.lists(
    st.tuples(st.sampled_from(["arrive", "finish", "abandon"]), st.floats(0, 10), st.integers(0, 30)), max_size=80
)


@given(concurrency=st.integers(1, 4), queue=st.integers(0, 4), ops=OPS)
@settings(max_examples=200, deadline=None)
def test_door_invariants_hold_for_any_sequence(concurrency: int, queue: int, ops: list[tuple[str, float, int]]) -> None:
    """Limits never exceeded, every arrival counted, slots handed out FIFO, and busy time equal to a
    reference computed from the same timeline."""
    clock = FakeClock()
    door: Door[int] = Door(Limits(concurrency, queue), clock)
    arrivals, handed, queued = 0, [], []
    busy_ref, ticket = 0.0, 0
    for op, dt, chars in ops:
        busy_ref += dt if door.inflight else 0.0
        clock.now += dt
        if op == "arrive":
            ticket += 1
            arrivals += 1
            if door.arrive(ticket, chars) is Admission.WAIT:
                queued.append(ticket)
        elif op == "finish" and door.inflight:
            nxt = door.finish()
            if nxt is not None:
                handed.append(nxt)
        elif op == "abandon" and door.waiting:
            victim = door.waiting[-1]
            assert door.abandon(victim)
            queued.remove(victim)
        assert door.inflight <= concurrency and len(door.waiting) <= queue
        assert door.inflight == concurrency or not door.waiting  # nobody waits beside a free slot
    tally = door.read()
    assert tally.received == arrivals
    assert handed == [t for t in queued if t in handed] and handed == queued[: len(handed)]
    assert tally.busy_seconds == pytest.approx(busy_ref)
    assert sum(tally.seconds_at.values()) == pytest.approx(tally.busy_seconds)
    assert all(1 <= level <= concurrency for level in tally.seconds_at)


@given(st.lists(st.floats(0, 100), max_size=50))
def test_histogram_buckets_are_cumulative_and_end_with_the_count(values: list[float]) -> None:
    hist = Histogram(mc.REQUEST_LATENCY.buckets)
    for v in values:
        hist.observe(v)
    cumulative = hist.cumulative()
    assert cumulative[-1] == ("+Inf", len(values))
    assert [n for _, n in cumulative] == sorted(n for _, n in cumulative)
    for le, n in cumulative[:-1]:
        assert n == sum(1 for v in values if v <= float(le))
    assert hist.total == pytest.approx(sum(values))


def test_answers_are_counted_by_class_and_who_answered() -> None:
    door: Door[int] = Door(Limits(1, 0), FakeClock())
    for status, by in ((200, BY_SERVER), (204, BY_SERVER), (404, BY_SERVER), (503, BY_SERVER), (429, BY_DOOR)):
        door.answered(status, by, latency=0.1)
    door.answered(ABORTED, BY_SERVER)
    t = door.tally
    assert t.responses == {
        ("2xx", BY_SERVER): 2,
        ("4xx", BY_SERVER): 1,
        ("5xx", BY_SERVER): 1,
        ("4xx", BY_DOOR): 1,
        (ABORTED, BY_SERVER): 1,
    }
    assert t.completed == 2 and t.latency.count == 5
    assert [status_class(s) for s in (101, 302, 599, 600, 42)] == ["1xx", "3xx", "5xx", "other", "other"]


@given(st.integers(1, 8), st.integers(0, 40), st.lists(st.floats(0, 1000), max_size=10))
def test_retry_after_is_between_1_and_60_seconds(concurrency: int, queue: int, latencies: list[float]) -> None:
    door: Door[int] = Door(Limits(concurrency, queue), FakeClock())
    for i in range(concurrency + queue):
        door.arrive(i)
    for lat in latencies:
        door.answered(200, BY_SERVER, latency=lat)
    assert 1 <= door.retry_after() <= 60


def test_input_characters_reads_the_text_field_servers_use() -> None:
    assert input_characters(json.dumps({"input": "héllo", "voice": "x"}).encode(), "application/json") == 5
    assert input_characters(b'{"text": "hello"}', "application/json") == 5  # Piper's HTTP server, GPT-SoVITS
    assert input_characters(b'{"tts_text": "hi"}', "application/json") == 2  # CosyVoice
    assert input_characters(b'{"input": "ab", "text": "abcd"}', "application/json") == 2  # input first
    assert input_characters(b'{"prompt": "hello"}', "application/json") == 0
    assert input_characters(b'{"input": 5}', "application/json") == 0
    assert input_characters(b'["input"]', "application/json") == 0
    assert input_characters(b'{"input": "hello"}', "text/plain") == 0


@given(st.binary(max_size=200))
def test_input_characters_never_raises(body: bytes) -> None:
    assert input_characters(body, "application/json") >= 0


def test_forward_headers_drops_hop_by_hop_and_keeps_ids() -> None:
    headers = [
        ("Connection", "keep-alive, X-Hop"),
        ("X-Hop", "1"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "12"),
        ("x-request-id", "abc"),
        ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("Authorization", "Bearer t"),
        ("Host", "tts.example"),
    ]
    assert forward_headers(headers) == headers[5:]


def test_parse_hostport_names_the_flag() -> None:
    assert parse_hostport("127.0.0.1:5000", "--upstream") == ("127.0.0.1", 5000)
    assert parse_hostport("[::1]:80", "--upstream") == ("::1", 80)
    for bad in ("5000", "host:", "host:port", ":80", "h:70000"):
        with pytest.raises(ValueError, match=r"--upstream=.*expected HOST:PORT"):
            parse_hostport(bad, "--upstream")


def test_readiness_follows_the_server_until_draining() -> None:
    r = Readiness()
    assert r.state() == (False, "the server has not answered yet")
    r.saw(True, "the server answered GET /health with 200")
    assert r.state()[0]
    r.draining = True
    assert r.state()[0] is False and "draining" in r.state()[1]


# ------------------------------------------------------------------------------- a real server behind it
@dataclass
class Upstream:
    """An HTTP server on 127.0.0.1 with the answers a TTS server gives, and switches for the tests."""

    healthy: bool = True
    gate: asyncio.Event = field(default_factory=asyncio.Event)  # /hold answers once set
    second_chunk: asyncio.Event = field(default_factory=asyncio.Event)
    finished_stream: bool = False
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    port: int = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_post("/v1/audio/speech", self.speech)
        app.router.add_post("/hold", self.hold)
        app.router.add_get("/status/{code}", self.status)
        app.router.add_get("/stream", self.stream)
        app.router.add_get("/broken", self.broken)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503, text="ok" if self.healthy else "loading")

    async def speech(self, request: web.Request) -> web.Response:
        self.seen_headers.append(dict(request.headers))
        await request.read()
        await asyncio.sleep(float(request.query.get("ms", "0")) / 1000)
        echo = {k: v for k, v in request.headers.items() if k.lower() in ("x-request-id", "traceparent")}
        return web.Response(body=b"RIFF" + bytes(1000), content_type="audio/wav", headers=echo)

    async def hold(self, request: web.Request) -> web.Response:
        await self.gate.wait()
        return web.Response(text="done")

    async def status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="as asked")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_type = "audio/wav"
        await resp.prepare(request)
        await resp.write(b"first chunk")
        await asyncio.wait_for(self.second_chunk.wait(), 10)
        await resp.write(b"second chunk")
        await resp.write_eof()
        self.finished_stream = True
        return resp

    async def broken(self, request: web.Request) -> web.StreamResponse:
        """A server that dies mid-answer: status and a first chunk out, then the connection is cut."""
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"half an answer")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp


@asynccontextmanager
async def upstream_server(up: Upstream) -> AsyncIterator[Upstream]:
    runner = web.AppRunner(up.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    up.port = runner.addresses[0][1]
    try:
        yield up
    finally:
        await runner.cleanup()


Scenario = Callable[[Upstream, str, str, aiohttp.ClientSession], Awaitable[None]]


def with_door(scenario: Scenario, upstream_port: int | None = None, **door: Any) -> None:
    """Run `scenario(upstream, door_url, metrics_url, client)` with the real door in front of the server."""

    async def main() -> None:
        async with upstream_server(Upstream()) as up:
            target = f"127.0.0.1:{upstream_port or up.port}"
            cfg = ProxySettings(listen="127.0.0.1:0", upstream=target, metrics_port=0, **door)
            async with running(cfg) as r, aiohttp.ClientSession() as client:
                await scenario(up, f"http://127.0.0.1:{r.port}", f"http://127.0.0.1:{r.metrics_port}", client)

    asyncio.run(asyncio.wait_for(main(), 60))


async def scrape(
    client: aiohttp.ClientSession, metrics_url: str
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with client.get(metrics_url + "/metrics") as resp:
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def wait_ready(client: aiohttp.ClientSession, metrics_url: str, want: int = 200) -> str:
    for _ in range(100):
        async with client.get(metrics_url + "/ready") as resp:
            if resp.status == want:
                return await resp.text()
        await asyncio.sleep(0.05)
    raise AssertionError(f"/ready never answered {want}")


def test_counters_match_what_was_sent() -> None:
    async def scenario(up: Upstream, door: str, metrics: str, client: aiohttp.ClientSession) -> None:
        texts = ["Hello there.", "A second, longer sentence to speak.", "Третий."]
        for text in texts:
            async with client.post(door + "/v1/audio/speech", json={"input": text, "voice": "a"}) as r:
                assert r.status == 200 and (await r.read()).startswith(b"RIFF")
        for code in (404, 404, 503, 204):
            async with client.get(f"{door}/status/{code}") as r:
                assert r.status == code
        m = await scrape(client, metrics)
        gpu = (("gpu_product", "NVIDIA-H100-80GB-HBM3"),)
        assert m[(mc.REQUESTS_RECEIVED.name, ())] == 7
        assert m[(mc.INPUT_CHARACTERS.name, ())] == sum(map(len, texts))
        assert m[(mc.COMPLETED_REQUESTS.name, gpu)] == 4
        responses = {labels: v for (name, labels), v in m.items() if name == mc.DOOR_RESPONSES.name}
        assert responses == {
            (("by", "server"), ("class", "2xx")): 4,
            (("by", "server"), ("class", "4xx")): 2,
            (("by", "server"), ("class", "5xx")): 1,
        }
        assert m[(mc.REQUEST_LATENCY.name + "_count", ())] == 7
        busy = m[(mc.BUSY_SECONDS.name, gpu)]
        levels = sum(v for (name, _), v in m.items() if name == mc.DOOR_CONCURRENCY_SECONDS.name)
        assert busy > 0 and levels == pytest.approx(busy)
        assert m[(mc.INFLIGHT.name, ())] == 0 and m[(mc.QUEUE_DEPTH.name, ())] == 0
        assert m[(mc.DOOR_CONCURRENCY_LIMIT.name, ())] == 4 and m[(mc.QUEUE_CAPACITY.name, ())] == 64
        async with client.get(door + "/health") as r:  # the server's own probe passes, uncounted
            assert r.status == 200
        assert (await scrape(client, metrics))[(mc.REQUESTS_RECEIVED.name, ())] == 7

    with_door(scenario, health_path="/health", gpu_product="NVIDIA-H100-80GB-HBM3")


def test_the_door_publishes_exactly_the_contracts_door_metrics() -> None:
    async def scenario(up: Upstream, door: str, metrics: str, client: aiohttp.ClientSession) -> None:
        async with client.post(door + "/v1/audio/speech", json={"input": "hi"}) as r:
            assert r.status == 200
        async with client.get(metrics + "/metrics") as resp:
            families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
        want = {m.name.removesuffix("_total"): m for m in mc.DOOR_METRICS}
        assert set(families) == set(want)
        for name, metric in want.items():
            assert families[name].type == metric.kind.value, name
            for sample in families[name].samples:
                assert set(sample.labels) - {"le"} == set(metric.labels), name

    with_door(scenario)


def test_a_full_door_answers_429_with_retry_after_and_counts_the_refusal() -> None:
    async def scenario(up: Upstream, door: str, metrics: str, client: aiohttp.ClientSession) -> None:
        async def hold() -> tuple[int, str, str]:
            async with client.post(door + "/hold") as r:
                return r.status, r.headers.get("Retry-After", ""), await r.text()

        first, second = asyncio.create_task(hold()), asyncio.create_task(hold())
        while (await scrape(client, metrics))[(mc.QUEUE_DEPTH.name, ())] < 1:
            await asyncio.sleep(0.01)
        m = await scrape(client, metrics)
        assert (m[(mc.INFLIGHT.name, ())], m[(mc.QUEUE_DEPTH.name, ())]) == (1, 1)
        status, retry_after, text = await hold()
        assert status == 429 and int(retry_after) >= 1 and "queue is full" in text
        up.gate.set()
        assert [(await t)[0] for t in (first, second)] == [200, 200]
        m = await scrape(client, metrics)
        assert m[(mc.REQUESTS_RECEIVED.name, ())] == 3
        assert m[(mc.DOOR_RESPONSES.name, (("by", "door"), ("class", "4xx")))] == 1
        assert m[(mc.DOOR_RESPONSES.name, (("by", "server"), ("class", "2xx")))] == 2
        assert m[(mc.QUEUE_WAIT.name + "_count", ())] == 2
        assert m[(mc.DOOR_CONCURRENCY_SECONDS.name, (("concurrency", "1"),))] > 0

    with_door(scenario, concurrency=1, queue=1)


def test_a_client_that_leaves_the_queue_gives_its_place_up() -> None:
    async def scenario(up: Upstream, door: str, metrics: str, client: aiohttp.ClientSession) -> None:
        held = asyncio.create_task(client.post(door + "/hold"))
        while (await scrape(client, metrics))[(mc.INFLIGHT.name, ())] < 1:
            await asyncio.sleep(0.01)
        with pytest.raises(TimeoutError):  # queued behind the held one, then hangs up
            await client.post(door + "/v1/audio/speech", json={"input": "x"}, timeout=aiohttp.ClientTimeout(0.3))
        for _ in range(100):
            if (await scrape(client, metrics))[(mc.QUEUE_DEPTH.name, ())] == 0:
                break
            await asyncio.sleep(0.02)
        up.gate.set()
        assert (await held).status == 200
        async with client.post(door + "/v1/audio/speech", json={"input": "y"}) as r:  # the slot was not leaked
            assert r.status == 200
        m = await scrape(client, metrics)
        assert m[(mc.DOOR_RESPONSES.name, (("by", "door"), ("class", ABORTED)))] == 1
        assert m[(mc.REQUESTS_RECEIVED.name, ())] == 3 and m[(mc.INFLIGHT.name, ())] == 0

    with_door(scenario, concurrency=1, queue=1)


def test_without_a_health_path_ready_follows_the_servers_port() -> None:
    async def scenario(up: Upstream, door: str, metrics: str, client: aiohttp.ClientSession) -> None:
        assert "takes connections" in await wait_ready(client, metrics, 200)

    with_door(scenario)


def test_streaming_answers_pass_through_unbuffered() -> None:
    async def scenario(up: Upstream, door: str, metrics: str, client: aiohttp.ClientSession) -> None:
        async with client.get(door + "/stream") as r:
            assert r.status == 200 and r.headers["Transfer-Encoding"] == "chunked"
            first = await asyncio.wait_for(r.content.readany(), 5)  # buffered, this would never come
            assert first == b"first chunk" and not up.finished_stream
            up.second_chunk.set()
            assert await r.read() == b"second chunk"

    with_door(scenario)


def test_a_server_dying_mid_answer_cuts_the_client_off_and_counts_aborted() -> None:
    async def scenario(up: Upstream, door: str, metrics: str, client: aiohttp.ClientSession) -> None:
        async with client.get(door + "/broken") as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):  # never a clean end on half an answer
                await r.read()
        m = await scrape(client, metrics)
        assert m[(mc.DOOR_RESPONSES.name, (("by", "server"), ("class", ABORTED)))] == 1
        assert m[(mc.COMPLETED_REQUESTS.name, (("gpu_product", "unknown"),))] == 0
        assert m[(mc.INFLIGHT.name, ())] == 0

    with_door(scenario)


def test_request_ids_and_traceparent_pass_through_hop_by_hop_headers_do_not() -> None:
    async def scenario(up: Upstream, door: str, metrics: str, client: aiohttp.ClientSession) -> None:
        sent = {
            "x-request-id": "req-42",
            "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "Authorization": "Bearer secret",
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "only for the door",
        }
        async with client.post(door + "/v1/audio/speech", json={"input": "hi"}, headers=sent) as r:
            assert r.status == 200
            assert r.headers["x-request-id"] == "req-42" and r.headers["traceparent"] == sent["traceparent"]
        seen = {k.lower(): v for k, v in up.seen_headers[-1].items()}
        assert seen["x-request-id"] == "req-42" and seen["traceparent"] == sent["traceparent"]
        assert seen["authorization"] == "Bearer secret" and seen["content-type"] == "application/json"
        assert "x-hop" not in seen and seen["host"].startswith("127.0.0.1:")
        async with client.head(door + "/status/200") as r:  # no body, a length: framing stays right
            assert r.status == 200 and await r.read() == b""
        async with client.get(door + "/status/304") as r:
            assert r.status == 304

    with_door(scenario)


def test_readiness_follows_the_servers_health_path() -> None:
    async def scenario(up: Upstream, door: str, metrics: str, client: aiohttp.ClientSession) -> None:
        await wait_ready(client, metrics, 200)
        up.healthy = False
        assert "answered GET /health with 503" in await wait_ready(client, metrics, 503)
        assert (await scrape(client, metrics))[(mc.DOOR_SERVER_READY.name, ())] == 0
        up.healthy = True
        await wait_ready(client, metrics, 200)
        async with client.get(metrics + "/live") as r:
            assert r.status == 200

    with_door(scenario, health_path="/health")


def test_an_unreachable_server_gets_502_in_prose_and_the_door_is_not_ready() -> None:
    async def scenario(up: Upstream, door: str, metrics: str, client: aiohttp.ClientSession) -> None:
        async with client.post(door + "/v1/audio/speech", json={"input": "hi"}) as r:
            assert r.status == 502
            assert "unreachable" in await r.text()
        text = await wait_ready(client, metrics, 503)
        assert "did not answer" in text or "refused" in text
        m = await scrape(client, metrics)
        assert m[(mc.DOOR_RESPONSES.name, (("by", "door"), ("class", "5xx")))] == 1

    with_door(scenario, upstream_port=free_port())


def test_bad_input_never_gets_a_500() -> None:
    async def scenario(up: Upstream, door: str, metrics: str, client: aiohttp.ClientSession) -> None:
        for body in (b"{not json", b"\xff\xfe", b'{"input": ' + b"9" * 5000 + b"}"):
            async with client.post(
                door + "/v1/audio/speech", data=body, headers={"Content-Type": "application/json"}
            ) as r:
                assert r.status == 200  # the server's to judge; the door only counts
        host, port = door.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"NONSENSE \x00\x01 HTTP/9.9\r\n\r\n")
        status_line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status_line.split()[1] == b"400", status_line

    with_door(scenario)


async def _free_proxy_process(upstream_port: int, *extra: str) -> tuple[asyncio.subprocess.Process, int, int]:
    port, metrics_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "voxscale.cli",
        "proxy",
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        f"127.0.0.1:{upstream_port}",
        "--metrics-port",
        str(metrics_port),
        "--health-path",
        "/health",
        *extra,
        cwd=REPO,
        stderr=subprocess.PIPE,
    )
    return proc, port, metrics_port


def test_sigterm_drains_every_accepted_request() -> None:
    async def main() -> None:
        async with upstream_server(Upstream()) as up, aiohttp.ClientSession() as client:
            proc, port, metrics_port = await _free_proxy_process(
                up.port, "--drain-quiet-s", "0.3", "--concurrency", "1"
            )
            try:
                deadline = time.monotonic() + 30
                while True:
                    try:
                        await wait_ready(client, f"http://127.0.0.1:{metrics_port}")
                        break
                    except (aiohttp.ClientError, AssertionError):
                        assert time.monotonic() < deadline, "the door never became ready"
                        await asyncio.sleep(0.2)
                url = f"http://127.0.0.1:{port}/v1/audio/speech?ms=1500"
                running_one = asyncio.create_task(client.post(url, json={"input": "running"}))
                queued_one = asyncio.create_task(client.post(url, json={"input": "queued"}))
                pre_stop = asyncio.create_task(client.get(f"http://127.0.0.1:{metrics_port}/wait-for-drain"))
                await asyncio.sleep(0.4)
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.1)
                async with client.get(f"http://127.0.0.1:{metrics_port}/ready") as r:
                    assert r.status == 503 and "draining" in await r.text()
                for task in (running_one, queued_one):
                    resp = await task
                    assert resp.status == 200 and (await resp.read()).startswith(b"RIFF")
                    if task is running_one:  # the queued one is at the server for 1.5 s more
                        assert not pre_stop.done()  # the server's preStop hook still holds its SIGTERM back
                assert (await asyncio.wait_for(pre_stop, 10)).status == 200
                assert await asyncio.wait_for(proc.wait(), 20) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()

    asyncio.run(asyncio.wait_for(main(), 90))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--concurrency", "0"], "concurrency=0: the server must be sent at least 1"),
        (["--upstream", "localhost"], "--upstream='localhost': expected HOST:PORT"),
        (["--health-path", "health"], "--health-path='health': a path starts with /"),
    ],
)
def test_the_cli_refuses_bad_settings_by_name(args: list[str], message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "voxscale.proxy", *args], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_a_bad_variable_names_itself() -> None:
    env = {**os.environ, "VOXSCALE_PROXY_QUEUE": "lots"}
    out = subprocess.run([sys.executable, "-m", "voxscale.proxy"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "VOXSCALE_PROXY_QUEUE='lots': expected an integer" in out.stderr


def test_proxy_bench_smoke(tmp_path: Path) -> None:
    """The smallest run: fields present and sane, no timing asserted."""
    out = tmp_path / "proxy.json"
    cmd = [sys.executable, "-m", "bench.proxy_bench", "--rounds", "1", "--seconds", "0.2", "--clients", "1,2"]
    res = subprocess.run(
        [*cmd, "--service-ms", "0", "--bytes", "100", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert [f["clients"] for f in report["figures"]] == [1, 2]
    for f in report["figures"]:
        assert f["errors"] == 0 and f["rounds"] == 1
        for key in ("server_p50_ms", "door_p50_ms", "added_p50_ms", "server_rps", "door_rps", "throughput_ratio"):
            assert isinstance(f[key], float), key
    assert "upstream" in report and "voxscale.proxy" in report["door"]

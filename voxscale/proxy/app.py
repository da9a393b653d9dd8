"""The door sidecar's shell: aiohttp server in front, aiohttp client to the server, the core deciding.

The stack was picked by measurement (bench/proxy_bench.py; --proxy-cmd put a uvicorn + Starlette + httpx
pass-through in the same harness; a 20 ms FastAPI stand-in behind both; the project's 2-core VM, under
other work): aiohttp added
2.5 ms p50 at 1 client and kept 56 % of the throughput at 16, for 1.0-1.8 ms of its own CPU per
request; uvicorn + Starlette + httpx added 18.9 ms and kept 11 %, for 5.1-6.0 ms. aiohttp is also
installed wherever kopf is (the operator image), so the sidecar needs no image of its own. Request
bodies are read whole (TTS requests are small, and the JSON `input` is counted); answers are streamed
chunk by chunk as the server writes them, never buffered, so streamed audio keeps its time to first
byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from voxscale import metrics_contract as mc
from voxscale.proxy.core import (
    ABORTED,
    BY_DOOR,
    BY_SERVER,
    Admission,
    Door,
    Limits,
    Readiness,
    forward_headers,
    input_characters,
    parse_hostport,
)
from voxscale.proxy.settings import ProxySettings

log = logging.getLogger("voxscale.proxy")
MAX_BODY = 64 * 1024 * 1024  # a request body beyond it gets 413 from the door (bodies are read whole)
UPSTREAM_KEEPALIVE_S = 4.0  # under uvicorn's 5 s default, so the door never reuses a connection being closed
HEALTH_TIMEOUT_S = 2.0
# Headers the client library would add on its own; the server must see the client's, not the door's.
NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class SettingsProblem(ValueError):
    """A flag or variable the door cannot start with; the message names it and the fix."""


def check(settings: ProxySettings) -> tuple[tuple[str, int], tuple[str, int], Limits]:
    """Listen address, upstream address and limits, or a SettingsProblem naming the flag."""
    try:
        listen = parse_hostport(settings.listen, "--listen")
        upstream = parse_hostport(settings.upstream, "--upstream")
        limits = Limits(settings.concurrency, settings.queue)
    except ValueError as exc:
        raise SettingsProblem(str(exc)) from None
    if settings.health_path and not settings.health_path.startswith("/"):
        raise SettingsProblem(f"--health-path={settings.health_path!r}: a path starts with /, e.g. /health")
    return listen, upstream, limits


def _text(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=message + "\n", headers=headers)


class DoorCollector(Collector):
    """Reads the core's tallies when Prometheus scrapes: the hot path never touches a metric object."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy

    def collect(self) -> Iterator[Metric]:
        door, gpu = self.proxy.door, self.proxy.settings.gpu_product
        t = door.read()
        yield _counter(mc.REQUESTS_RECEIVED, t.received)
        yield _counter(mc.INPUT_CHARACTERS, t.input_characters)
        yield _counter(mc.BUSY_SECONDS, t.busy_seconds, [gpu])
        yield _counter(mc.COMPLETED_REQUESTS, t.completed, [gpu])
        responses = CounterMetricFamily(mc.DOOR_RESPONSES.name, mc.DOOR_RESPONSES.help, labels=mc.DOOR_RESPONSES.labels)
        for (cls, by), n in sorted(t.responses.items()):
            responses.add_metric([cls, by], n)
        yield responses
        at = CounterMetricFamily(
            mc.DOOR_CONCURRENCY_SECONDS.name,
            mc.DOOR_CONCURRENCY_SECONDS.help,
            labels=mc.DOOR_CONCURRENCY_SECONDS.labels,
        )
        for level, seconds in sorted(t.seconds_at.items()):
            at.add_metric([str(level)], seconds)
        yield at
        yield GaugeMetricFamily(mc.INFLIGHT.name, mc.INFLIGHT.help, value=door.inflight)
        yield GaugeMetricFamily(mc.QUEUE_DEPTH.name, mc.QUEUE_DEPTH.help, value=len(door.waiting))
        yield GaugeMetricFamily(mc.QUEUE_CAPACITY.name, mc.QUEUE_CAPACITY.help, value=door.limits.queue)
        yield GaugeMetricFamily(mc.DOOR_CONCURRENCY_LIMIT.name, mc.DOOR_CONCURRENCY_LIMIT.help, door.limits.concurrency)
        yield GaugeMetricFamily(mc.DOOR_SERVER_READY.name, mc.DOOR_SERVER_READY.help, self.proxy.readiness.state()[0])
        for metric, hist in ((mc.REQUEST_LATENCY, t.latency), (mc.QUEUE_WAIT, t.queue_wait)):
            yield HistogramMetricFamily(metric.name, metric.help, buckets=hist.cumulative(), sum_value=hist.total)


def _counter(metric: mc.Metric, value: float, label_values: list[str] | None = None) -> CounterMetricFamily:
    if not label_values:
        return CounterMetricFamily(metric.name, metric.help, value=value)
    family = CounterMetricFamily(metric.name, metric.help, labels=metric.labels)
    family.add_metric(label_values, value)
    return family


@dataclass
class Exchange:
    """How one admitted request ended: ABORTED until its last byte is out, then the server's status; or
    the door's own status when the server could not be reached."""

    outcome: int | str = ABORTED
    by: str = BY_SERVER

    def door(self, status: int, message: str) -> web.Response:
        self.outcome, self.by = status, BY_DOOR
        return _text(status, message)


class RelayedResponse(web.StreamResponse):
    """Its headers leave with the first chunk of body, in one write: one send fewer per request (a third
    of the door's system calls on a short answer), as Go's ReverseProxy does; the status and headers are
    never held longer than the server holds its first chunk."""

    _send_headers_immediately = False  # aiohttp's own switch (>= 3.11), as its web.Response sets it


@dataclass
class Proxy:
    """One door: the core's state, the client session to the server, and the request handlers."""

    settings: ProxySettings
    upstream: tuple[str, int]
    door: Door[asyncio.Future[None]]
    readiness: Readiness = field(default_factory=Readiness)
    session: aiohttp.ClientSession | None = None
    open_handlers: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    last_arrival: float = 0.0
    _registry: CollectorRegistry | None = None

    @property
    def base(self) -> str:
        host, port = self.upstream
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S)
            self.session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self.session

    # ------------------------------------------------------------------------------------------ handlers
    async def handle(self, request: web.Request) -> web.StreamResponse:
        start = self.last_arrival = self.door.clock()  # uvloop's loop.time() ticks in whole ms
        self.open_handlers += 1
        try:
            if request.path == self.settings.health_path:  # probes of the server pass, uncounted and unqueued
                return await self._forward(request, await request.read(), Exchange())
            return await self._admit(request, start)
        finally:
            self.open_handlers -= 1

    async def _admit(self, request: web.Request, start: float) -> web.StreamResponse:
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self.door.answered(413, BY_DOOR)
            return _text(413, f"request body over {MAX_BODY} bytes: the door reads bodies whole; send less")
        ticket: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        admission = self.door.arrive(ticket, input_characters(body, request.content_type))
        if admission is Admission.FULL:
            self.door.answered(429, BY_DOOR)
            wait = self.door.retry_after()
            message = f"the server is busy and its queue is full; retry in {wait} s"
            return _text(429, message, {"Retry-After": str(wait)})
        if admission is Admission.CLOSED:
            self.door.answered(503, BY_DOOR)
            headers = {"Retry-After": "1", "Connection": "close"}
            return _text(503, "this pod is shutting down; retry (another pod will answer)", headers)
        if admission is Admission.WAIT:
            await self._wait(ticket)
        waited = self.door.clock() - start
        exchange = Exchange()
        try:
            return await self._forward(request, body, exchange)
        finally:  # one place counts every admitted request, however it ended (cancelled included)
            self._release()
            latency = self.door.clock() - start
            self.door.answered(exchange.outcome, exchange.by, latency, waited)

    async def _wait(self, ticket: asyncio.Future[None]) -> None:
        """Wait for a slot; a client that leaves meanwhile (the handler is cancelled) gives its place up."""
        try:
            await ticket
        except asyncio.CancelledError:
            if not self.door.abandon(ticket):  # it had been handed a slot: pass it on
                self._release()
            self.door.answered(ABORTED, BY_DOOR)
            raise

    def _release(self) -> None:
        nxt = self.door.finish()
        if nxt is not None and not nxt.cancelled():  # a cancelled waiter passes the slot on itself (_wait)
            nxt.set_result(None)

    async def _forward(self, request: web.Request, body: bytes, exchange: Exchange) -> web.StreamResponse:
        """Send the request to the server and stream its answer back; the door's own 502/504 otherwise."""
        headers = forward_headers(request.headers.items())
        headers.append(("X-Forwarded-For", request.remote or ""))
        try:
            async with self._session().request(
                request.method,
                self.base + request.rel_url.raw_path_qs,
                headers=headers,
                data=body or None,
                allow_redirects=False,
                skip_auto_headers=NO_AUTO_HEADERS,
                timeout=aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=self.settings.request_timeout_s),
                compress=False,
            ) as upstream:
                return await self._relay(request, upstream, exchange)
        except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
            self.readiness.saw(False, f"the server at {self.base} refused or dropped a connection: {exc}")
            return exchange.door(502, f"the TTS server at {self.base} is unreachable ({exc}); retry")
        except TimeoutError:
            limit = self.settings.request_timeout_s
            return exchange.door(504, f"the TTS server at {self.base} sent nothing for {limit:g} s; retry")
        except aiohttp.ClientError as exc:
            return exchange.door(502, f"the TTS server at {self.base} broke the exchange ({exc!r}); retry")

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, exchange: Exchange
    ) -> web.StreamResponse:
        response = RelayedResponse(status=upstream.status, reason=upstream.reason)
        for key, value in forward_headers(upstream.headers.items()):
            response.headers.add(key, value)
        if upstream.content_length is not None and "chunked" not in upstream.headers.get("Transfer-Encoding", ""):
            response.content_length = upstream.content_length
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientError, TimeoutError):
            # The status went out but not the whole body: cut the client off, never fake an end (stays ABORTED).
            if request.transport is not None:
                request.transport.abort()
            return response
        exchange.outcome = upstream.status
        if upstream.ok and not self.settings.health_path:  # "or the first successful request"
            self.readiness.saw(True, "the server answered a request")
        return response

    # -------------------------------------------------------------------------------------- door's own
    async def ready(self, request: web.Request) -> web.Response:
        ok, why = self.readiness.state()
        return _text(200 if ok else 503, f"ready: {why}" if ok else f"not ready: {why}")

    async def wait_for_drain(self, request: web.Request) -> web.Response:
        """The server container's preStop hook: answers once the door has drained, so the kubelet's SIGTERM
        (sent to every container of the pod at once) reaches the server only after what the door
        accepted has been answered, as Knative's queue-proxy does for its user container."""
        await self.drained.wait()
        return _text(200, "drained")

    async def live(self, request: web.Request) -> web.Response:
        return _text(200, "alive")

    async def metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @property
    def registry(self) -> CollectorRegistry:
        if self._registry is None:
            self._registry = CollectorRegistry()
            self._registry.register(DoorCollector(self))
        return self._registry

    async def probe(self) -> tuple[bool, str]:
        """One look at the server: its health path if named, else whether its port takes a connection."""
        path = self.settings.health_path
        try:
            if path:
                timeout = aiohttp.ClientTimeout(total=HEALTH_TIMEOUT_S)
                async with self._session().get(self.base + path, timeout=timeout) as resp:
                    await resp.read()
                    return resp.status < 400, f"the server answered GET {path} with {resp.status}"
            host, port = self.upstream
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), HEALTH_TIMEOUT_S)
            writer.close()
            return True, f"the server's port {port} takes connections"
        except (OSError, aiohttp.ClientError, TimeoutError) as exc:
            return False, f"the server at {self.base} did not answer {path or 'a connection'}: {exc!r}"

    async def watch_health(self, period: float = 1.0) -> None:
        """Readiness follows the server: probed every `period` once ready, 5 times as often before."""
        while True:
            self.readiness.saw(*await self.probe())
            await asyncio.sleep(period if self.readiness.server_ok else period / 5)


def build(settings: ProxySettings) -> tuple[Proxy, web.Application, web.Application]:
    """The proxy, its public app (everything forwarded) and its admin app (/metrics, /ready, /live)."""
    _, upstream, limits = check(settings)
    proxy = Proxy(settings, upstream, Door(limits))
    public = web.Application(client_max_size=MAX_BODY, handler_args={"max_field_size": 65536})
    public.router.add_route("*", "/{tail:.*}", proxy.handle)
    admin = web.Application()
    admin.router.add_get("/metrics", proxy.metrics)
    admin.router.add_get("/ready", proxy.ready)
    admin.router.add_get("/live", proxy.live)
    admin.router.add_get("/wait-for-drain", proxy.wait_for_drain)
    return proxy, public, admin


@contextlib.asynccontextmanager
async def running(settings: ProxySettings) -> AsyncIterator[Running]:
    """Both apps listening and the health watch on; on exit, everything closed (no drain: see `drain`)."""
    proxy, public, admin = build(settings)
    listen, _, _ = check(settings)
    runners = [
        web.AppRunner(public, access_log=None, shutdown_timeout=1.0, handler_cancellation=True),
        web.AppRunner(admin, access_log=None),
    ]
    for r in runners:
        await r.setup()
    site = web.TCPSite(runners[0], listen[0], listen[1], reuse_address=True)
    admin_site = web.TCPSite(runners[1], listen[0], settings.metrics_port, reuse_address=True)
    await site.start()
    await admin_site.start()
    watch = asyncio.create_task(proxy.watch_health())
    try:
        yield Running(proxy, site, _bound_port(site), _bound_port(admin_site))
    finally:
        watch.cancel()
        for r in runners:
            await r.cleanup()
        if proxy.session is not None:
            await proxy.session.close()


def _bound_port(site: web.BaseSite) -> int:
    server: Any = site._server  # the asyncio Server; port 0 in the settings means "any free port"
    return int(server.sockets[0].getsockname()[1])


@dataclass
class Running:
    proxy: Proxy
    site: web.BaseSite
    port: int
    metrics_port: int

    async def drain(self) -> bool:
        """SIGTERM's path: not ready at once, keep accepting until quiet, close the port, finish every
        accepted request (up to the drain timeout). True when nothing accepted was cut off."""
        proxy, settings = self.proxy, self.proxy.settings
        clock = proxy.door.clock
        proxy.readiness.draining = True
        log.info("draining: not ready; accepting until %.1f s pass without a request", settings.drain_quiet_s)
        while (quiet_left := proxy.last_arrival + settings.drain_quiet_s - clock()) > 0:
            await asyncio.sleep(quiet_left)
        await self.site.stop()
        proxy.door.closed = True
        deadline = clock() + settings.drain_timeout_s
        while proxy.open_handlers and clock() < deadline:
            await asyncio.sleep(0.02)
        left = proxy.open_handlers
        if left:
            log.warning("drain timeout (--drain-timeout-s): %d accepted requests cut off", left)
        else:
            log.info("drained: every accepted request answered")
        proxy.drained.set()
        await asyncio.sleep(0.1)  # the preStop hooks waiting on /wait-for-drain get their answer
        return not left


async def serve(settings: ProxySettings) -> bool:
    """Run until SIGTERM or SIGINT, then drain; True when the drain cut nothing off."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running(settings) as door:
        log.info(
            "door on :%d -> %s (concurrency %d, queue %d); /metrics /ready /live on :%d",
            door.port,
            door.proxy.base,
            settings.concurrency,
            settings.queue,
            door.metrics_port,
        )
        await stop.wait()
        return await door.drain()


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed (the `proxy` extra installs it: 10-20 % less of the door's CPU per request in
    A/B runs on a busy VM), else asyncio's own loop: the door works the same on either."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(settings: ProxySettings) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return 0 if runner.run(serve(settings)) else 1

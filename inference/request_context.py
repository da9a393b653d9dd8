"""Request ids, API keys and quotas at the door, and the log lines that carry the request, key and pod.

A request id is the client's X-Request-Id, else the trace-id of a W3C `traceparent`, else a new one.
It is answered in X-Request-Id, handed to the batcher, and put on every log line written while the
request is handled (a ContextVar read by a logging filter), so one id follows a request from a
gateway's trace through this server's logs to the batch that synthesised it.

Every API request (not probes or /metrics) names its key (`Authorization: Bearer <key>`, checked in
tenants.py): an unknown or missing key is a 401, a key over its requestsPerMinute a 429 naming the quota
with Retry-After; the key's id (never the key) then goes on the log lines and the per-key metrics, and
the routes get the caller as the `Caller` dependency. Quotas are counted per replica (tenants.py).
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from voxscale import metrics_contract as mc
from voxscale.inference.errors import ApiError, error_response
from voxscale.inference.settings import Settings
from voxscale.inference.tenants import ANONYMOUS, ApiKey, Ledger, Quota, Verdict, bearer_key, identify, load_keys

log = logging.getLogger("voxscale.inference")

REQUEST_ID: ContextVar[str | None] = ContextVar("voxscale_request_id", default=None)
KEY_ID: ContextVar[str | None] = ContextVar("voxscale_key_id", default=None)
QUOTA_HEADER = "X-Voxscale-Quota"
REQUEST_ID_HEADER = "X-Request-Id"
POD_HEADER = "X-Voxscale-Pod"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# version-traceid-parentid-flags (W3C Trace Context); versions after 00 may append fields.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
OPEN_PATHS = ("/healthz", "/readyz", "/metrics")


class BadRequestId(ValueError):
    pass


def trace_id(traceparent: str | None) -> str | None:
    """The trace-id of a valid `traceparent`; None for an invalid one, which the W3C spec says to ignore."""
    match = _TRACEPARENT.fullmatch((traceparent or "").strip())
    if match is None:
        return None
    version, trace, parent, _, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or set(trace) == {"0"} or set(parent) == {"0"}:
        return None
    return trace


def request_id(headers: Mapping[str, str]) -> str:
    """X-Request-Id when given (checked: it goes into logs and headers), else traceparent's trace-id, else new."""
    given = headers.get(REQUEST_ID_HEADER.lower())
    if given is not None:
        if not _REQUEST_ID.fullmatch(given):
            raise BadRequestId(
                f"{REQUEST_ID_HEADER}: {given[:40]!r} is not a request id; send 1-128 characters of "
                "letters, digits and ._:/+=@- or leave the header out to get one"
            )
        return given
    return trace_id(headers.get("traceparent")) or uuid.uuid4().hex[:16]


# ------------------------------------------------------------------------------ keys and quotas
def _counter(metric: mc.Metric, registry: CollectorRegistry) -> Counter:
    return Counter(metric.name.removesuffix("_total"), metric.help, metric.labels, registry=registry)


@dataclass(frozen=True)
class KeyMetrics:
    """The per-key counters of the metrics contract, in the server's registry (labelled by key id)."""

    requests: Counter
    characters: Counter
    refusals: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry) -> KeyMetrics:
        return cls(*(_counter(m, registry) for m in mc.TENANT_METRICS))


def _clock_time(epoch_s: float) -> str:
    moment = datetime.fromtimestamp(epoch_s, UTC)
    return moment.strftime("%H:%M:%S UTC" if moment.second else "%H:%M UTC")


def quota_refused(caller: ApiKey, quota: Quota, verdict: Verdict, cost: int, now: float) -> ApiError:
    """A 429 naming the key, the quota and its limit, when it resets, and that this replica counted it."""
    limit, used = caller.limit(quota), verdict.usage.used
    code, headers = f"{quota.value}_exceeded", {QUOTA_HEADER: quota.value}
    if quota is Quota.REQUESTS_PER_MINUTE:
        param, what = None, f"key {caller.id!r} has made its {quota} quota of {limit} requests this minute"
    elif verdict.never_fits:
        whole = f"input: {cost} characters is more than key {caller.id!r}'s whole {quota} quota of {limit}"
        return ApiError(429, f"{whole}; send shorter input", "input", code, headers)
    else:
        param = "input"
        what = f"input: {cost} characters would take key {caller.id!r} over its {quota} quota of {limit} ({used} used)"
    wait = max(1, math.ceil(verdict.resets_at - now))
    message = (
        f"{what}, counted on this replica (each replica counts its own); "
        f"it resets at {_clock_time(verdict.resets_at)}, in {wait} s"
    )
    return ApiError(429, message, param, code, {**headers, "Retry-After": str(wait)})


@dataclass(frozen=True)
class Tenancy:
    """The keys this server accepts, this replica's quota ledger, and the per-key counters.

    No keys (neither VOXSCALE_API_KEYS nor VOXSCALE_API_TOKEN): an open server, every caller ANONYMOUS."""

    keys: tuple[ApiKey, ...]
    ledger: Ledger
    metrics: KeyMetrics

    @classmethod
    def create(cls, settings: Settings, registry: CollectorRegistry) -> Tenancy:
        """Keys read now, so a bad keys file fails the start naming itself (KeysError), not a request."""
        tenancy = cls(load_keys(settings.api_keys, settings.api_token), Ledger(), KeyMetrics.create(registry))
        if tenancy.enabled:
            log.info("API keys: %s", ", ".join(f"{k.id}{' (admin)' if k.admin else ''}" for k in tenancy.keys))
        return tenancy

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def authenticate(self, authorization: str | None) -> ApiKey | None:
        """The caller's key; None for a missing or unknown key (ANONYMOUS on an open server)."""
        if not self.enabled:
            return ANONYMOUS
        presented = bearer_key(authorization)
        return identify(self.keys, presented) if presented is not None else None

    def owner(self, caller: ApiKey) -> str | None:
        """Whose a voice the caller registers is: its key id; nobody's on an open server (as before keys)."""
        return caller.id if self.enabled else None

    def spend(self, caller: ApiKey, quota: Quota, cost: int) -> Verdict | None:
        """Charge a quota; a refusal is raised as the 429 (and counted). None: the key has no such limit."""
        verdict = self.ledger.charge(caller, quota, cost)
        if verdict is not None and not verdict.allowed:
            self.metrics.refusals.labels(caller.id, quota.value).inc()
            raise quota_refused(caller, quota, verdict, cost, self.ledger.clock())
        return verdict

    @contextmanager
    def characters(self, caller: ApiKey, count: int) -> Iterator[None]:
        """Charge `count` characters of input for the admission inside the block; given back if it is refused."""
        verdict = self.spend(caller, Quota.CHARACTERS_PER_DAY, count)
        try:
            yield
        except ApiError:
            if verdict is not None:
                self.ledger.refund(caller, Quota.CHARACTERS_PER_DAY, verdict, count)
            raise
        self.metrics.characters.labels(caller.id).inc(count)


def _unauthorized(authorization: str | None, rid: str) -> Response:
    """401 naming the header and the fix; the same for a missing and an unknown key but for what to do."""
    headers = {"WWW-Authenticate": "Bearer", REQUEST_ID_HEADER: rid}
    if bearer_key(authorization) is None:
        message = "Authorization: this server needs an API key; send `Authorization: Bearer <key>`"
    else:
        message = "Authorization: the bearer key is not one this server accepts; check the key or ask for one"
    return error_response(401, message, "Authorization", "authentication_error", headers)


def _admit(tenancy: Tenancy, request: Request, rid: str) -> ApiKey | Response:
    """The caller, authenticated and within its request rate; or the refusal to answer with."""
    authorization = request.headers.get("authorization")
    caller = tenancy.authenticate(authorization)
    if caller is None:
        return _unauthorized(authorization, rid)
    try:
        tenancy.spend(caller, Quota.REQUESTS_PER_MINUTE, 1)
    except ApiError as exc:
        tenancy.metrics.requests.labels(caller.id, str(exc.status)).inc()
        return error_response(exc.status, exc.message, exc.param, exc.code, {**exc.headers, REQUEST_ID_HEADER: rid})
    return caller


async def get_caller(request: Request) -> ApiKey:
    caller: ApiKey = request.state.caller
    return caller


async def get_tenancy(request: Request) -> Tenancy:
    tenancy: Tenancy = request.app.state.voxscale_tenancy
    return tenancy


Caller = Annotated[ApiKey, Depends(get_caller)]
Tenants = Annotated[Tenancy, Depends(get_tenancy)]


class RequestContext:
    """The request-context middleware as plain ASGI. Starlette's `@app.middleware("http")` runs the rest
    of the app in a task of its own behind memory streams (and its `receive` tells a disconnect late);
    this wraps `send` instead: the id, pod and key go on the response's headers as it starts."""

    def __init__(self, app: ASGIApp, settings: Settings, tenancy: Tenancy) -> None:
        self.app, self.settings, self.tenancy = app, settings, tenancy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            rid = request_id(request.headers)
        except BadRequestId as exc:
            await error_response(400, str(exc), REQUEST_ID_HEADER, "invalid_request_error")(scope, receive, send)
            return
        request.state.request_id = rid
        REQUEST_ID.set(rid)
        caller: ApiKey | None = None
        tenancy = self.tenancy
        if scope["path"] not in OPEN_PATHS:
            admitted = _admit(tenancy, request, rid)
            if isinstance(admitted, Response):
                await admitted(scope, receive, send)
                return
            caller = request.state.caller = admitted
            KEY_ID.set(caller.id if tenancy.enabled else None)
        started = time.monotonic()
        extra = [(REQUEST_ID_HEADER.lower().encode(), rid.encode("latin-1"))]
        if self.settings.pod_name:  # which replica answered: a client behind a Service can tell them apart
            extra.append((POD_HEADER.lower().encode(), self.settings.pod_name.encode("latin-1")))
        status = 500

        async def send_with_context(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *(h for h in message.get("headers", ()) if h[0].lower() != extra[0][0]),
                    *extra,
                ]
                if caller is not None:
                    tenancy.metrics.requests.labels(caller.id, str(status)).inc()
                elapsed_ms = 1000 * (time.monotonic() - started)
                log.info("%s %s %s %.0fms", scope["method"], scope["path"], status, elapsed_ms)
            await send(message)

        await self.app(scope, receive, send_with_context)


def install_middleware(app: FastAPI, settings: Settings, tenancy: Tenancy) -> None:
    """Every request gets its id (answered in X-Request-Id, also on refusals); API requests a key and its quota."""
    app.state.voxscale_tenancy = tenancy
    app.add_middleware(RequestContext, settings=settings, tenancy=tenancy)


class ContextFilter(logging.Filter):
    """Appends ` request_id=... key=... pod=...` (what is known) to each record, as `%(context)s`.

    `key` is the API key's id, never the key, and only on a server with keys."""

    def __init__(self, pod: str | None) -> None:
        super().__init__()
        self.pod = pod

    def filter(self, record: logging.LogRecord) -> bool:
        parts = [f"request_id={rid}"] if (rid := REQUEST_ID.get()) else []
        parts += [f"key={key}"] if (key := KEY_ID.get()) else []
        parts += [f"pod={self.pod}"] if self.pod else []
        record.context = "".join(f" {p}" for p in parts)
        return True


def configure_logging(settings: Settings) -> None:
    """The server's own lines on stderr at INFO, each with its request id and the pod (VOXSCALE_POD_*)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter(settings.pod))
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s%(context)s"))
    logger = logging.getLogger("voxscale")
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False

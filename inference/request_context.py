"""Request ids, the bearer token and the log lines that carry both the request and the pod.

A request id is the client's X-Request-Id, else the trace-id of a W3C `traceparent`, else a new one.
It is answered in X-Request-Id, handed to the batcher, and put on every log line written while the
request is handled (a ContextVar read by a logging filter), so one id follows a request from a
gateway's trace through this server's logs to the batch that synthesised it.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar

from fastapi import FastAPI, Request, Response

from voxscale.inference.errors import error_response
from voxscale.inference.settings import Settings

log = logging.getLogger("voxscale.inference")

REQUEST_ID: ContextVar[str | None] = ContextVar("voxscale_request_id", default=None)
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


def install_middleware(app: FastAPI, settings: Settings) -> None:
    """Every request gets its id (answered in X-Request-Id, also on refusals) and, if configured, a token check."""

    @app.middleware("http")
    async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        try:
            rid = request_id(request.headers)
        except BadRequestId as exc:
            return error_response(400, str(exc), REQUEST_ID_HEADER, "invalid_request_error")
        request.state.request_id = rid
        REQUEST_ID.set(rid)
        authorized = request.headers.get("authorization") == f"Bearer {settings.api_token}"
        if settings.api_token and request.url.path not in OPEN_PATHS and not authorized:
            headers = {"WWW-Authenticate": "Bearer", REQUEST_ID_HEADER: rid}
            return error_response(401, "missing or wrong bearer token", None, "authentication_error", headers)
        started = time.monotonic()
        response = await call_next(request)
        response.headers[REQUEST_ID_HEADER] = rid
        if settings.pod_name:  # which replica answered: a client behind a Service can tell them apart
            response.headers[POD_HEADER] = settings.pod_name
        elapsed_ms = 1000 * (time.monotonic() - started)
        log.info("%s %s %s %.0fms", request.method, request.url.path, response.status_code, elapsed_ms)
        return response


class ContextFilter(logging.Filter):
    """Appends ` request_id=... pod=...` (what is known) to each record, as `%(context)s`."""

    def __init__(self, pod: str | None) -> None:
        super().__init__()
        self.pod = pod

    def filter(self, record: logging.LogRecord) -> bool:
        parts = [f"request_id={rid}"] if (rid := REQUEST_ID.get()) else []
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

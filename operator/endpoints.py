"""Where each TTSDeployment's metrics come from: its Prometheus URL (checked against the operator's
allowlist) and credentials (read from a Secret of its namespace).

Kept out of the scaling round: a Secret is read once and cached for CACHE_SECONDS (so a round with 500
objects does not read 500 Secrets), a failed read is retried with a growing back-off instead of every
round, and while a retry waits the last good endpoint keeps serving - a rotated Secret or an API
server hiccup does not turn into missing metrics. The round asks `resolve_nowait()`, which never reads
a Secret itself: reads (first ones and refreshes) run in a background worker.
"""

from __future__ import annotations

import base64
import concurrent.futures
import logging
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from voxscale.operator.policy import SpecError, parse_duration
from voxscale.operator.prometheus import Endpoint, Key

log = logging.getLogger("voxscale.operator.endpoints")

CACHE_SECONDS = 60.0  # a rotated Secret is picked up within this long
RETRY_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)
TRANSIENT_STATUSES = (0, 408, 429, 500, 502, 503, 504)  # an API server restarting, overloaded or unreachable
BEARER_FIELD = "spec.scaling.prometheus.auth.bearerTokenSecretRef"
BASIC_FIELD = "spec.scaling.prometheus.auth.basicAuthSecretRef"


@dataclass
class _Entry:
    spec: Any  # spec.scaling.prometheus as it was when resolved
    endpoint: Endpoint | None
    error: SpecError | None
    resolved_at: float
    failures: int = 0

    def fresh(self, now: float) -> bool:
        if self.error is None:
            return now - self.resolved_at < CACHE_SECONDS
        wait = RETRY_BACKOFF_SECONDS[min(self.failures, len(RETRY_BACKOFF_SECONDS)) - 1]
        return now - self.resolved_at < wait


DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(parts: urllib.parse.SplitResult) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port made explicit; raises ValueError on a bad port."""
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or DEFAULT_PORTS.get(scheme)


def allowlist_refusal(url: str, allowed: tuple[str, ...]) -> str | None:
    """Why `url` may not be queried under `allowed` (None when some entry admits it).

    Compared on the parsed URL, never as a string prefix: the scheme, host and port must equal an
    entry's, and the path must lie under the entry's path on a segment boundary. A prefix check let
    `http://prom:9090@evil.example/` (userinfo; the host is evil.example) and `http://prom.evil.example`
    (a longer host) pass an `http://prom:9090` or `http://prom` entry and carry the namespace's
    credentials there. Userinfo, dot segments (also percent-encoded), backslashes and control
    characters are refused outright: nothing legitimate needs them in a Prometheus base URL."""
    if any(ch.isspace() or ord(ch) < 0x20 or ch == "\\" for ch in url):
        return "it contains whitespace, a control character or a backslash"
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None or parts.password is not None:
        return "it carries userinfo (user:password@); put credentials in spec.scaling.prometheus.auth"
    segments = urllib.parse.unquote(parts.path).split("/")
    if any(seg in (".", "..") for seg in segments) or "\\" in urllib.parse.unquote(parts.path):
        return "its path has dot segments (.. or ., also percent-encoded)"
    try:
        origin = _origin(parts)
    except ValueError:
        return "its port is not a number between 0 and 65535"
    for entry in allowed:
        entry_parts = urllib.parse.urlsplit(entry)
        try:
            same_origin = _origin(entry_parts) == origin
        except ValueError:
            continue
        prefix = entry_parts.path.rstrip("/")
        if same_origin and (parts.path.rstrip("/") == prefix or parts.path.startswith(prefix + "/")):
            return None
    return "no entry has its scheme, host and port with a path it lies under"


SecretReader = Callable[[str, str], dict[str, str]]  # (namespace, name) -> base64 data; raises ApiException


class EndpointResolver:
    def __init__(
        self,
        read_secret: SecretReader | None,
        default_url: str | None = None,
        allowed_urls: tuple[str, ...] = (),
        clock: Callable[[], float] = time.monotonic,
        on_resolved: Callable[[Key], None] | None = None,
    ) -> None:
        """`on_resolved(key)`: called from the background worker when an endpoint the round had to
        wait for (`resolve_nowait()` returned None) has been resolved, so its object is evaluated soon."""
        self.read_secret = read_secret
        self.default_url = default_url
        self.allowed_urls = allowed_urls
        self.clock = clock
        self.on_resolved = on_resolved
        self._lock = threading.Lock()
        self._cache: dict[Key, _Entry] = {}
        self._last_good: dict[Key, Endpoint] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="secrets")
        self._resolving: set[Key] = set()

    def resolve(self, body: dict[str, Any]) -> Endpoint:
        """The object's endpoint, from the cache while fresh; raises SpecError naming the field when
        there is none and no earlier good one to fall back on."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        spec = (body["spec"].get("scaling") or {}).get("prometheus") or {}
        now = self.clock()
        with self._lock:
            entry = self._cache.get(key)
        if entry is None or entry.spec != spec or not entry.fresh(now):
            entry = self._refresh(key, spec, body["metadata"]["namespace"], entry, now)
        return self._answer(key, entry, spec)

    def resolve_nowait(self, body: dict[str, Any]) -> Endpoint | None:
        """`resolve()` for the scaling round, which must not wait on the API server: a spec that reads
        no Secret is resolved here (no I/O); otherwise the cache answers, a stale entry keeps serving
        while a background worker reads the Secret again, and with no entry for this spec yet the
        read starts in the background and None says the endpoint is not known yet."""
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        spec = (body["spec"].get("scaling") or {}).get("prometheus") or {}
        with self._lock:
            entry = self._cache.get(key)
        if entry is not None and entry.spec == spec and entry.fresh(self.clock()):
            return self._answer(key, entry, spec)
        if not (spec.get("auth") or {}):
            return self.resolve(body)
        current = entry is not None and entry.spec == spec
        self._resolve_in_background(key, body, notify=not current)
        return self._answer(key, entry, spec) if entry is not None and current else None

    def _answer(self, key: Key, entry: _Entry, spec: Any) -> Endpoint:
        if entry.endpoint is not None:
            return entry.endpoint
        assert entry.error is not None
        fallback = self._last_good.get(key)
        if fallback is not None and entry.spec == spec and _transient(entry.error):
            return fallback
        raise entry.error

    def _resolve_in_background(self, key: Key, body: dict[str, Any], notify: bool) -> None:
        """One read per object at a time; its outcome (endpoint or error) lands in the cache."""
        with self._lock:
            if key in self._resolving:
                return
            self._resolving.add(key)
        self._pool.submit(self._resolve_worker, key, body, notify)

    def _resolve_worker(self, key: Key, body: dict[str, Any], notify: bool) -> None:
        try:
            self.resolve(body)
        except SpecError:
            pass  # cached: the round reports it
        except Exception:
            log.exception("resolving the Prometheus endpoint of %s/%s failed", *key)
        finally:
            with self._lock:
                self._resolving.discard(key)
        if notify and self.on_resolved is not None:
            self.on_resolved(key)

    def forget(self, key: Key) -> None:
        with self._lock:
            self._cache.pop(key, None)
            self._last_good.pop(key, None)

    def _refresh(self, key: Key, spec: dict[str, Any], namespace: str, old: _Entry | None, now: float) -> _Entry:
        try:
            entry = _Entry(spec, self._build(spec, namespace), None, now)
        except SpecError as exc:
            failures = old.failures + 1 if old is not None and old.error is not None and old.spec == spec else 1
            entry = _Entry(spec, None, exc, now, failures)
        with self._lock:
            self._cache[key] = entry
            if entry.endpoint is not None:
                self._last_good[key] = entry.endpoint
        return entry

    def _build(self, prom: dict[str, Any], ns: str) -> Endpoint:
        url = prom.get("url") or self.default_url
        if not url:
            why = "no Prometheus URL: set it here or start the operator with --prometheus-url"
            raise SpecError("spec.scaling.prometheus.url", why)
        self._check_allowed(url)
        timeout = parse_duration(prom.get("timeout", "5s"), "spec.scaling.prometheus.timeout").total_seconds()
        auth = prom.get("auth") or {}
        if "bearerTokenSecretRef" in auth:
            ref = auth["bearerTokenSecretRef"]
            token = self._secret_value(ns, ref["name"], ref["key"], BEARER_FIELD)
            return Endpoint(url, timeout, headers=(("Authorization", f"Bearer {token}"),))
        if "basicAuthSecretRef" in auth:
            ref = auth["basicAuthSecretRef"]
            user = self._secret_value(ns, ref["name"], "username", BASIC_FIELD)
            password = self._secret_value(ns, ref["name"], "password", BASIC_FIELD)
            return Endpoint(url, timeout, basic_auth=(user, password))
        return Endpoint(url, timeout)

    def _check_allowed(self, url: str) -> None:
        """Refuse a Prometheus URL outside the operator's allowlist, before any Secret is read for it."""
        allowed = self.allowed_urls
        if not allowed or url == self.default_url:
            return
        why = allowlist_refusal(url, allowed)
        if why is None:
            return
        raise SpecError(
            "spec.scaling.prometheus.url",
            f"{url} is not among the Prometheus URLs this operator may query ({', '.join(allowed)}): {why}; "
            "leave the field empty for the default, or ask the operator's admin to add it "
            "(chart value allowedPrometheusUrls)",
        )

    def _secret_value(self, ns: str, name: str, key: str, field_path: str) -> str:
        if self.read_secret is None:
            raise SpecError(field_path, "this operator has no API access to read Secrets")
        try:
            data = self.read_secret(ns, name)
        except ApiException as exc:
            error = TransientSpecError if exc.status in TRANSIENT_STATUSES else SpecError
            raise error(field_path, f"cannot read Secret {ns}/{name}: HTTP {exc.status}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise TransientSpecError(field_path, f"cannot read Secret {ns}/{name}: {exc}") from exc
        if key not in data:
            raise SpecError(field_path, f"Secret {ns}/{name} has no key {key!r}")
        return base64.b64decode(data[key]).decode().strip()


class TransientSpecError(SpecError):
    """A Secret that could not be read this time (API error): the last good endpoint may stand in."""


def _transient(exc: SpecError) -> bool:
    return isinstance(exc, TransientSpecError)

"""Where each TTSDeployment's metrics come from: its Prometheus URL (checked against the operator's
allowlist) and credentials (read from a Secret of its namespace).

Kept out of the scaling round: a Secret is read once and cached for CACHE_SECONDS (so a round with 500
objects does not read 500 Secrets), a failed read is retried with a growing back-off instead of every
round, and while a retry waits the last good endpoint keeps serving - a rotated Secret or an API
server hiccup does not turn into missing metrics.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes.client.exceptions import ApiException

from voxscale.operator.policy import SpecError, parse_duration
from voxscale.operator.prometheus import Endpoint, Key

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


SecretReader = Callable[[str, str], dict[str, str]]  # (namespace, name) -> base64 data; raises ApiException


class EndpointResolver:
    def __init__(
        self,
        read_secret: SecretReader | None,
        default_url: str | None = None,
        allowed_urls: tuple[str, ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.read_secret = read_secret
        self.default_url = default_url
        self.allowed_urls = allowed_urls
        self.clock = clock
        self._lock = threading.Lock()
        self._cache: dict[Key, _Entry] = {}
        self._last_good: dict[Key, Endpoint] = {}

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
        if entry.endpoint is not None:
            return entry.endpoint
        assert entry.error is not None
        fallback = self._last_good.get(key)
        if fallback is not None and entry.spec == spec and _transient(entry.error):
            return fallback
        raise entry.error

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
        if not allowed or url == self.default_url or any(url.startswith(p) for p in allowed):
            return
        raise SpecError(
            "spec.scaling.prometheus.url",
            f"{url} is not among the Prometheus URLs this operator may query ({', '.join(allowed)}); "
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

"""Prometheus adapter: one query per metric kind per tick for every TTSDeployment it serves.

A thin shell around `queries.py` on `prometheus-api-client`. An error, a timeout or an empty result
is reported as such (never as zero); the engine decides what missing data means.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from voxscale.operator import queries, tenancy, triggers
from voxscale.operator.engine import Metrics
from voxscale.operator.forecast import RateHistory
from voxscale.operator.policy import ScalingPolicy

Key = tuple[str, str]  # (namespace, name)
HISTORY_STEP_SECONDS = 60
LABELS_LOOKBACK_SECONDS = 300  # series seen this recently explain an empty result


@dataclass(frozen=True)
class Endpoint:
    """Where and how to query; TTSDeployments sharing one are batched together."""

    url: str
    timeout_seconds: float = 5.0
    headers: tuple[tuple[str, str], ...] = ()
    basic_auth: tuple[str, str] | None = None


@dataclass(frozen=True)
class Target:
    namespace: str
    name: str
    policy: ScalingPolicy
    endpoint: Endpoint

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)


@dataclass
class QueryStats:
    """PromQL queries sent so far; the scaler reports the per-round delta (it must not grow with objects).
    Endpoints are queried from worker threads, so counting goes through `count`."""

    queries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, n: int = 1) -> None:
        with self._lock:
            self.queries += n


# An endpoint gets this many times its own query timeout to answer a round; objects on an endpoint
# that is slower are held for the round (with the cause) while every other endpoint's are scaled.
BUDGET_TIMEOUTS = 2.0


class PrometheusSource:
    def __init__(self, scope_custom_queries: bool = False, max_parallel_endpoints: int = 8) -> None:
        """`scope_custom_queries`: run a custom PromQL trigger only if every selector in it is pinned
        to its object's namespace (tenancy.py) - for clusters where TTSDeployment authors are tenants."""
        self.stats = QueryStats()
        self.scope_custom_queries = scope_custom_queries
        self._clients: dict[Endpoint, PrometheusConnect] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_parallel_endpoints, thread_name_prefix="prometheus")
        self._in_flight: dict[Endpoint, concurrent.futures.Future[dict[Key, Metrics]]] = {}

    def _client(self, ep: Endpoint) -> PrometheusConnect:
        if ep not in self._clients:
            # No client-side retries: the next tick is the retry, and a hung query must not stall a tick.
            self._clients[ep] = PrometheusConnect(
                url=ep.url,
                headers=dict(ep.headers) or None,
                auth=ep.basic_auth,
                timeout=ep.timeout_seconds,
                retry=Retry(total=0),
            )
        return self._clients[ep]

    def _query(self, ep: Endpoint, promql: str) -> list[dict[str, Any]]:
        self.stats.count()
        try:
            result: list[dict[str, Any]] = self._client(ep).custom_query(promql)
            return result
        except (requests.RequestException, PrometheusApiClientException, ValueError) as exc:
            raise QueryError(_describe(ep, exc)) from exc

    def fetch(self, targets: Sequence[Target]) -> dict[Key, Metrics]:
        """Metrics for each target: one batched query per metric kind and endpoint, the endpoints
        side by side, each within its budget (BUDGET_TIMEOUTS x its timeout) - a slow or hung
        Prometheus holds only the objects that use it."""
        by_endpoint: dict[Endpoint, list[Target]] = defaultdict(list)
        for t in targets:
            by_endpoint[t.endpoint].append(t)
        out: dict[Key, Metrics] = {}
        waiting: dict[concurrent.futures.Future[dict[Key, Metrics]], tuple[Endpoint, list[Target]]] = {}
        for ep, group in by_endpoint.items():
            previous = self._in_flight.get(ep)
            if previous is not None and not previous.done():
                why = f"Prometheus at {ep.url} is still answering an earlier round's queries"
                out.update({t.key: Metrics(error=why) for t in group})
                continue
            future = self._pool.submit(self._fetch_endpoint, ep, group)
            self._in_flight[ep] = future
            waiting[future] = (ep, group)
        deadline = time.monotonic() + max((ep.timeout_seconds for ep in by_endpoint), default=0) * BUDGET_TIMEOUTS
        for future, (ep, group) in waiting.items():
            try:
                out.update(future.result(timeout=max(0.0, deadline - time.monotonic())))
            except concurrent.futures.TimeoutError:
                why = f"Prometheus at {ep.url} did not answer within {ep.timeout_seconds * BUDGET_TIMEOUTS:g}s"
                out.update({t.key: Metrics(error=why) for t in group})
        return out

    def _fetch_endpoint(self, ep: Endpoint, group: Sequence[Target]) -> dict[Key, Metrics]:
        """One endpoint's objects (runs in a worker thread; touches nothing another endpoint uses)."""
        values: dict[Key, dict[str, float]] = defaultdict(dict)
        invalid: dict[Key, dict[str, str]] = defaultdict(dict)
        errors: dict[Key, str] = {}
        namespaces = sorted({t.namespace for t in group})
        needed: dict[str, list[tuple[Target, str]]] = defaultdict(list)
        for t in group:
            for trig in t.policy.triggers:
                for role, key in triggers.kind(trig).inputs(trig).items():
                    slot = trig.name if role == "value" else f"{trig.name}.{role}"
                    if key is not None:
                        needed[key].append((t, slot))
                    else:
                        self._custom(ep, t, slot, trig.query or "", values, invalid, errors)
        for batch, users in needed.items():
            try:
                result = self._query(ep, triggers.batch_query(batch, namespaces))
                # The lowest capacity of any GPU product the pods run on: sized for the slowest.
                samples = _by_owner(result, nan_means=0.0 if batch == "latency" else None, combine=min)
            except QueryError as exc:
                for t, slot in users:
                    if "." not in slot:  # a secondary input's failure leaves its trigger usable
                        errors.setdefault(t.key, str(exc))
                continue
            garbage = _not_numbers(result)
            for t, slot in users:
                if t.key in samples:
                    values[t.key][slot] = samples[t.key]
                elif t.key in garbage and "." not in slot:
                    invalid[t.key][slot] = f"returned {garbage[t.key]!r}, which is not a number (no data)"
            missing = [(t, s) for t, s in users if t.key not in samples and t.key not in garbage]
            self._explain_missing(ep, batch, missing, invalid)
        return {t.key: Metrics(dict(values[t.key]), errors.get(t.key), invalid=dict(invalid[t.key])) for t in group}

    def _explain_missing(
        self, ep: Endpoint, batch: str, missing: Sequence[tuple[Target, str]], invalid: dict[Key, dict[str, str]]
    ) -> None:
        """Say why a join matched nothing, from the label names the series carry: one look-up per
        endpoint and batch, only when some object came back empty, and names only (no other tenant's values)."""
        explainer = triggers.explainer(batch)
        main = [(t, slot) for t, slot in missing if "." not in slot]
        if explainer is None or not main:
            return
        seen = self._label_names(ep, explainer.probe(batch))
        for t, slot in main:
            invalid[t.key].setdefault(slot, explainer.explain_missing(batch, slot, t.namespace, t.name, seen))

    def _label_names(self, ep: Endpoint, series: str) -> list[str] | None:
        """Label names of `series` over the last few minutes (None: they could not be read)."""
        self.stats.count()
        params = {"match[]": series, "start": f"{time.time() - LABELS_LOOKBACK_SECONDS:.0f}"}
        try:
            names: list[str] = self._client(ep).get_label_names(params=params)
        except (requests.RequestException, PrometheusApiClientException, ValueError, KeyError):
            return None
        return [n for n in names if n != "__name__"]

    def pod_work(self, ep: Endpoint, namespace: str, name: str) -> dict[str, float]:
        """Requests held by each pod of one TTSDeployment (pods without a finite value are left out)."""
        out: dict[str, float] = {}
        for series in self._query(ep, queries.pod_work(namespace, name)):
            pod, value = series.get("metric", {}).get("pod"), sample_value(_raw_value(series))
            if pod and value is not None:
                out[pod] = value
        return out

    def arrival_history(
        self, ep: Endpoint, namespaces: Sequence[str], window_seconds: float, lookback: dt.timedelta, now: dt.datetime
    ) -> dict[Key, RateHistory]:
        """Each TTSDeployment's arrival rate over `lookback`, one sample a minute, in one range query.

        Prometheus answers at most 11,000 points per series, so a longer look-back takes a longer step.
        """
        step = max(HISTORY_STEP_SECONDS, math.ceil(lookback.total_seconds() / 10_000))
        start = now - lookback
        promql = queries.arrival_rate(namespaces, max(window_seconds, 2 * step))  # >= 2 samples per window
        self.stats.count()
        try:
            result: list[dict[str, Any]] = self._client(ep).custom_query_range(
                promql, start_time=start, end_time=now, step=f"{step}s"
            )
        except (requests.RequestException, PrometheusApiClientException, ValueError) as exc:
            raise QueryError(_describe(ep, exc)) from exc
        n = int(lookback.total_seconds() // step) + 1
        out: dict[Key, RateHistory] = {}
        for series in result:
            labels = series.get("metric", {})
            owner = labels.get(queries.OWNER_LABEL)
            if not owner or "namespace" not in labels:
                continue
            rps = np.full(n, np.nan)
            for ts, value in series.get("values", []):
                i = round((float(ts) - start.timestamp()) / step)
                v = float(value)
                if 0 <= i < n and math.isfinite(v) and v >= 0:
                    rps[i] = v
            out[(labels["namespace"], owner)] = RateHistory(start, float(step), rps)
        return out

    def _custom(
        self,
        ep: Endpoint,
        t: Target,
        trigger: str,
        promql: str,
        values: dict[Key, dict[str, float]],
        invalid: dict[Key, dict[str, str]],
        errors: dict[Key, str],
    ) -> None:
        """A custom trigger's own query: one series, one number; anything else is that trigger's missing data."""
        promql = queries.custom(promql, t.namespace, t.name)
        if self.scope_custom_queries:
            problem = tenancy.scope_problem(promql, t.namespace)
            if problem is not None:
                invalid[t.key][trigger] = f"not run: the query {problem}"
                return
        try:
            result = self._query(ep, promql)
        except QueryError as exc:
            errors.setdefault(t.key, str(exc))
            return
        if result and not isinstance(result[0], dict):  # a scalar or string result: [time, "value"]
            raw = str(result[1]) if len(result) == 2 else ""
            value = sample_value(raw)
            if value is None:
                invalid[t.key][trigger] = f"returned {raw!r} (a scalar or string), which is not a number (no data)"
            else:
                values[t.key][trigger] = value
        elif len(result) > 1:
            invalid[t.key][trigger] = f"returned {len(result)} series; the query must return one (aggregate it)"
        elif result:
            raw = _raw_value(result[0])
            value = sample_value(raw)
            if value is None:
                invalid[t.key][trigger] = f"returned {raw!r}, which is not a number (no data)"
            else:
                values[t.key][trigger] = value


class QueryError(RuntimeError):
    pass


def _describe(ep: Endpoint, exc: Exception) -> str:
    if isinstance(exc, requests.Timeout):
        return f"Prometheus at {ep.url} timed out after {ep.timeout_seconds:g}s"
    if isinstance(exc, requests.ConnectionError):
        return f"Prometheus at {ep.url} unreachable"
    return f"Prometheus at {ep.url}: {exc}"


def _by_owner(
    result: Iterable[dict[str, Any]],
    nan_means: float | None = None,
    combine: Callable[[float, float], float] = min,
) -> dict[Key, float]:
    """{(namespace, ttsdeployment): value} from a batched query.

    NaN comes from a quantile over zero requests: the series exist but nothing was served. For
    latency that means "no latency pressure" (`nan_means=0`); elsewhere it counts as no data.
    """
    out: dict[Key, float] = {}
    for key, raw in _owned_samples(result):
        value = sample_value(raw)
        if value is None:
            if nan_means is None or raw.lower() != "nan":
                continue
            value = nan_means
        out[key] = combine(out[key], value) if key in out else value
    return out


def _not_numbers(result: Iterable[dict[str, Any]]) -> dict[Key, str]:
    """{(namespace, ttsdeployment): raw} for objects whose series came back as NaN, Inf or garbage -
    so the condition says "returned 'NaN'" rather than that no series matched."""
    return {key: raw for key, raw in _owned_samples(result) if sample_value(raw) is None}


def _owned_samples(result: Iterable[dict[str, Any]]) -> Iterator[tuple[Key, str]]:
    for series in result:
        labels = series.get("metric", {})
        owner = labels.get(queries.OWNER_LABEL)
        if owner and "namespace" in labels:
            yield (labels["namespace"], owner), _raw_value(series)


def _raw_value(series: dict[str, Any]) -> str:
    """The sample of an instant-vector series as Prometheus sent it ("" if it sent none)."""
    sample = series.get("value")
    return str(sample[1]) if isinstance(sample, list | tuple) and len(sample) == 2 else ""


def sample_value(raw: str) -> float | None:
    """A sample as a finite float; None for NaN, +-Inf and anything that is not a number."""
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None

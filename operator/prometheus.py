"""Prometheus adapter: one query per metric kind per tick for every TTSDeployment it serves.

A thin shell around `queries.py` on `prometheus-api-client`. An error, a timeout or an empty result
is reported as such (never as zero); the engine decides what missing data means. So is a sample too
old to describe now: an instant query answers with the last sample within Prometheus' 5-minute
look-back, so right after a Prometheus outage it serves the gauges from before it as if current.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
import requests
from prometheus_api_client import PrometheusConnect
from prometheus_api_client.exceptions import PrometheusApiClientException
from urllib3.util.retry import Retry

from voxscale.operator import profiles, queries, tenancy, triggers
from voxscale.operator.engine import Metrics
from voxscale.operator.forecast import RateHistory
from voxscale.operator.policy import ScalingPolicy
from voxscale.operator.profiles import Pods, Profile, Query, SignalKey, Unavailable

Key = tuple[str, str]  # (namespace, name)
HISTORY_STEP_SECONDS = 60
LABELS_LOOKBACK_SECONDS = 300  # series seen this recently explain an empty result
# A sample older than this many scrape intervals is missing data; never judged on less than
# STALE_MIN_SECONDS (query latency and clock skew on a 1 s scrape). The interval is read from how many
# samples a pod sent over each of SCRAPE_WINDOWS; SCRAPE_INTERVAL_UNKNOWN (Prometheus' default) when they cannot tell.
STALE_SCRAPES = 3
STALE_MIN_SECONDS = 10.0
SCRAPE_WINDOWS = (60, 600)  # seconds: the short one for young pods, the long one across an outage
BATCH_LABEL = "voxscale_batch"  # which query of a joined request (_query_all) a series answers
SCRAPE_INTERVAL_UNKNOWN = 60.0


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
    # The workload whose pods are this object's, by name: its own Deployment (its name, the default),
    # or the one spec.targetRef attaches it to. Prometheus knows pods by name only, so the batched
    # queries recover that name from the pod's (`queries.py`) and this is what an answer is looked up by.
    workload: str = ""
    ordinal_pods: bool = False  # the workload's pods are <workload>-<n> (a StatefulSet)
    # Where its pod signals come from (spec.metrics.profile): the door's, Triton's, the user's PromQL.
    profile: Profile = profiles.VOXSCALE

    @property
    def pods(self) -> Pods:
        return Pods(self.namespace, self.name, self.workload, self.ordinal_pods)

    @property
    def key(self) -> Key:
        return (self.namespace, self.name)

    @property
    def series_key(self) -> Key:
        """(namespace, owner) as the batched queries' `ttsdeployment` label names this object's pods."""
        return (self.namespace, self.workload or self.name)


@dataclass
class QueryStats:
    """PromQL queries sent so far; the scaler reports the per-round delta (it must not grow with objects).
    Endpoints are queried from worker threads, so counting goes through `count`."""

    queries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, n: int = 1) -> None:
        with self._lock:
            self.queries += n


# `fetch()` without a budget waits this many times the largest timeout (tests and one-off callers);
# the scaler passes its own round budget instead, whatever timeouts the objects name.
BUDGET_TIMEOUTS = 2.0
RETRY_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)  # an endpoint that answered nothing is asked again after
ARRIVED_MAX_AGE_SECONDS = 120.0  # a late answer nobody picked up by then is dropped (and asked again)


class Pending(StrEnum):
    """Why an object has no answer this round: it keeps its last decision (identifiers for status)."""

    OVER_BUDGET = "QueryOverBudget"  # its Prometheus did not answer within the round's budget
    RESOLVING = "ResolvingEndpoint"  # its endpoint's Secret is being read in the background


@dataclass(frozen=True)
class Gathered:
    """One round's answers: metrics (data, or an error the engine treats as missing data) for the
    objects whose Prometheus answered or failed, and why the others have no answer yet."""

    metrics: dict[Key, Metrics]
    pending: dict[Key, str]  # key -> message (reason Pending.OVER_BUDGET)


class Backoff:
    """Consecutive failures per key (an endpoint), and when it may be asked again: a Prometheus that
    fails is retried after a growing delay, not every round (a hung one would hold a worker each time).
    Thread-safe: workers record outcomes while the round asks."""

    def __init__(self, delays: Sequence[float] = RETRY_BACKOFF_SECONDS, clock: Callable[[], float] = time.monotonic):
        self.delays = tuple(delays)
        self.clock = clock
        self._lock = threading.Lock()
        self._state: dict[Hashable, tuple[int, float, str]] = {}  # failures, retry at, last error

    def waiting(self, key: Hashable) -> str | None:
        """Why `key` is not asked now (the last error and the delay), or None when it may be."""
        with self._lock:
            state = self._state.get(key)
        if state is None or self.clock() >= state[1]:
            return None
        failures, _, error = state
        return f"{error} ({failures} failed in a row; asked again after {self.delay(failures):g}s)"

    def delay(self, failures: int) -> float:
        return self.delays[min(failures, len(self.delays)) - 1]

    def failed(self, key: Hashable, error: str) -> None:
        with self._lock:
            failures = self._state.get(key, (0, 0.0, ""))[0] + 1
            self._state[key] = (failures, self.clock() + self.delay(failures), error)

    def succeeded(self, key: Hashable) -> None:
        with self._lock:
            self._state.pop(key, None)


@dataclass
class _Flight:
    """One endpoint's queries in a worker: at most one per endpoint, so a hung Prometheus gets no
    second round of queries piled on while it still owes the first."""

    future: concurrent.futures.Future[dict[Key, Metrics]]
    keys: frozenset[Key]
    sent: float  # monotonic


class PrometheusSource:
    def __init__(self, scope_custom_queries: bool = False, max_parallel_endpoints: int = 8) -> None:
        """`scope_custom_queries`: run a custom PromQL trigger only if every selector in it is pinned
        to its object's namespace (tenancy.py) - for clusters where TTSDeployment authors are tenants."""
        self.stats = QueryStats()
        self.scope_custom_queries = scope_custom_queries
        self._clients: dict[Endpoint, PrometheusConnect] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(max_parallel_endpoints, thread_name_prefix="prometheus")
        self._lock = threading.Lock()  # _clients: the round and the history reader's workers share them
        self._in_flight: dict[Endpoint, _Flight] = {}
        self._arrived: dict[Key, tuple[float, Metrics]] = {}  # answers that came after their round's budget
        self._series_keys: dict[Key, Key] = {}  # object -> the owner its pods have in the batched answers
        self._targets: dict[Key, Target] = {}  # object -> its latest target (its profile, for the history worker)
        self.backoff = Backoff()

    def _client(self, ep: Endpoint) -> PrometheusConnect:
        with self._lock:
            if ep not in self._clients:
                # No client-side retries: the back-off is the retry, and a hung query must not stall a tick.
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
        except PrometheusApiClientException as exc:
            raise QueryError(_describe(ep, exc), refused=True) from exc
        except (requests.RequestException, ValueError) as exc:
            raise QueryError(_describe(ep, exc)) from exc

    def _query_all(self, ep: Endpoint, queries: Sequence[str]) -> dict[str, list[dict[str, Any]] | QueryError]:
        """Several instant queries in one request: each wrapped in `label_replace(q, BATCH_LABEL, "<i>",
        "", "")` and joined with `or` (the label keeps their series apart, so `or` drops none); the
        answer is split back by that label. A round costs one request per endpoint, not one per signal
        kind. Should Prometheus refuse the whole (one query of them does not parse, or is not a vector),
        each is asked alone, so one bad query fails only its own objects."""
        unique = list(dict.fromkeys(queries))
        if len(unique) == 1:
            return {unique[0]: self._one(ep, unique[0])}
        joined = " or ".join(f'label_replace({q}, "{BATCH_LABEL}", "{i}", "", "")' for i, q in enumerate(unique))
        try:
            result = self._query(ep, joined)
        except QueryError as exc:
            if not exc.refused:
                return dict.fromkeys(unique, exc)
            return {q: self._one(ep, q) for q in unique}
        split: dict[str, list[dict[str, Any]] | QueryError] = {q: [] for q in unique}
        for series in result:
            index = series.get("metric", {}).pop(BATCH_LABEL, None)
            answer = split[unique[int(index)]] if index is not None else None
            if isinstance(answer, list):
                answer.append(series)
        return split

    def _one(self, ep: Endpoint, promql: str) -> list[dict[str, Any]] | QueryError:
        try:
            return self._query(ep, promql)
        except QueryError as exc:
            return exc

    def fetch(self, targets: Sequence[Target], budget: float | None = None) -> dict[Key, Metrics]:
        """`gather()` for callers that want an answer for every target: one still pending is
        reported as missing data. Without a budget: BUDGET_TIMEOUTS x the largest timeout."""
        if budget is None:
            budget = max((t.endpoint.timeout_seconds for t in targets), default=0) * BUDGET_TIMEOUTS
        got = self.gather(targets, budget)
        return {**got.metrics, **{k: Metrics(error=why) for k, why in got.pending.items()}}

    def gather(
        self, targets: Sequence[Target], budget: float, on_late: Callable[[Iterable[Key]], None] | None = None
    ) -> Gathered:
        """Metrics for each target: one batched query per metric kind and endpoint, the endpoints side
        by side, all within `budget` seconds - a slow or hung Prometheus holds only the objects that
        use it. An answer that comes later is kept and returned the next time its objects are asked
        (`on_late(keys)` is called when it comes); an endpoint that answered nothing is not asked
        again until its back-off has passed (its objects get the last error: missing data)."""
        deadline = time.monotonic() + budget
        by_endpoint: dict[Endpoint, list[Target]] = defaultdict(list)
        for t in targets:
            by_endpoint[t.endpoint].append(t)
            self._series_keys[t.key] = t.series_key  # for the history worker, which knows namespaces only
            self._targets[t.key] = t
        self._harvest()
        out: dict[Key, Metrics] = {}
        waiting: list[tuple[Endpoint, _Flight, list[Target], bool]] = []
        for ep, group in by_endpoint.items():
            ask = [t for t in group if not self._take_arrived(t.key, out)]
            if not ask:
                continue
            flight = self._in_flight.get(ep)
            if flight is not None:  # still running (harvested otherwise)
                waiting.append((ep, flight, ask, True))
                continue
            held = self.backoff.waiting(ep)
            if held is not None:
                out.update({t.key: Metrics(error=held) for t in ask})
                continue
            future = self._pool.submit(self._fetch_endpoint, ep, ask)
            flight = self._in_flight[ep] = _Flight(future, frozenset(t.key for t in ask), time.monotonic())
            waiting.append((ep, flight, ask, False))
        # Only this round's own queries are waited for: an earlier round's answer is used when it comes.
        sent = [f.future for _, f, _, earlier in waiting if not earlier]
        concurrent.futures.wait(sent, timeout=max(0.0, deadline - time.monotonic()))
        self._harvest()
        pending: dict[Key, str] = {}
        for ep, flight, ask, earlier in waiting:
            late = [t.key for t in ask if not self._take_arrived(t.key, out)]
            if not late:
                continue
            if earlier:
                why = f"Prometheus at {ep.url} is still answering an earlier round's queries"
            else:
                why = f"Prometheus at {ep.url} did not answer within {budget:g}s"
            pending.update(dict.fromkeys(late, why))
            if on_late is not None:
                flight.future.add_done_callback(_notify(on_late, late))
        return Gathered(out, pending)

    def forget(self, key: Key) -> None:
        """Drop a late answer for an object no longer tracked."""
        self._arrived.pop(key, None)
        self._series_keys.pop(key, None)
        self._targets.pop(key, None)

    def _take_arrived(self, key: Key, out: dict[Key, Metrics]) -> bool:
        got = self._arrived.pop(key, None)
        if got is not None:
            out[key] = got[1]
        return got is not None

    def _harvest(self) -> None:
        """Move finished flights' answers to `_arrived`, note each endpoint's outcome in the back-off,
        and drop answers nobody asked for in time. Called from the round's thread only."""
        now = time.monotonic()
        for ep, flight in list(self._in_flight.items()):
            if not flight.future.done():
                continue
            del self._in_flight[ep]
            try:
                answers = flight.future.result()
            except Exception as exc:  # a bug or an odd answer in the worker: missing data, said
                answers = {k: Metrics(error=f"Prometheus at {ep.url}: {exc}") for k in flight.keys}
            failed = [m.error for m in answers.values() if m.error is not None and not m.values]
            if answers and len(failed) == len(answers):
                self.backoff.failed(ep, failed[0] or "")
            else:
                self.backoff.succeeded(ep)
            self._arrived.update({k: (now, m) for k, m in answers.items()})
        for key in [k for k, (at, _) in self._arrived.items() if now - at > ARRIVED_MAX_AGE_SECONDS]:
            del self._arrived[key]

    def _fetch_endpoint(self, ep: Endpoint, group: Sequence[Target]) -> dict[Key, Metrics]:
        """One endpoint's objects (runs in a worker thread; touches nothing another endpoint uses)."""
        values: dict[Key, dict[str, float]] = defaultdict(dict)
        invalid: dict[Key, dict[str, str]] = defaultdict(dict)
        errors: dict[Key, str] = {}
        namespaces = sorted({t.namespace for t in group})
        needed: dict[tuple[str, str], list[tuple[Target, str]]] = defaultdict(list)  # (batch key, PromQL)
        for t in group:
            for trig in t.policy.queried:  # the implicit SLO objective's door counters too
                for role, key in triggers.kind(trig).inputs(trig).items():
                    slot = trig.name if role == "value" else f"{trig.name}.{role}"
                    if key is None:
                        self._custom(ep, t, slot, trig.query or "", values, invalid, errors)
                        continue
                    asked = _profile_query(t, key, namespaces)
                    if isinstance(asked, Unavailable):
                        if "." not in slot:
                            invalid[t.key][slot] = asked.message
                    elif asked.batched:
                        needed[(key, asked.promql)].append((t, slot))
                    else:
                        self._one_series(ep, t, slot, asked.promql, values, invalid, errors)
        idle_latency: list[tuple[Target, str]] = []
        everyone = [u for users in needed.values() for u in users]
        freshness_queries = self._freshness_queries(namespaces, everyone)
        answers = self._query_all(ep, [promql for _, promql in needed] + list(freshness_queries)) if needed else {}
        for (batch, promql), users in needed.items():
            result = answers[promql]
            if isinstance(result, QueryError):
                for t, slot in users:
                    if "." not in slot:  # a secondary input's failure leaves its trigger usable
                        errors.setdefault(t.key, str(result))
                continue
            # The lowest capacity of any GPU product the pods run on: sized for the slowest.
            samples = _by_owner(result, combine=min)
            garbage = _not_numbers(result)
            for t, slot in users:
                pods = t.series_key
                if pods in samples:
                    values[t.key][slot] = samples[pods]
                elif pods in garbage and "." not in slot:
                    invalid[t.key][slot] = f"returned {garbage[pods]!r}, which is not a number (no data)"
                    if batch == "latency" and garbage[pods].lower() == "nan":
                        idle_latency.append((t, slot))
            missing = [(t, s) for t, s in users if t.series_key not in samples and t.series_key not in garbage]
            if promql == triggers.batch_query(batch, namespaces):  # a trigger kind's own series: it can explain
                self._explain_missing(ep, batch, missing, invalid)
        self._read_idle_latency(ep, namespaces, idle_latency, values, invalid)
        for promql, its_users in freshness_queries.items():
            _drop_stale(answers[promql], its_users, values, invalid)
        return {t.key: Metrics(dict(values[t.key]), errors.get(t.key), invalid=dict(invalid[t.key])) for t in group}

    def _read_idle_latency(
        self,
        ep: Endpoint,
        namespaces: Sequence[str],
        users: Sequence[tuple[Target, str]],
        values: dict[Key, dict[str, float]],
        invalid: dict[Key, dict[str, str]],
    ) -> None:
        """A p95 of NaN means no request ended in the window. Where none arrived either, nobody waited:
        no latency pressure (0 s), so an idle fleet may scale down. Where requests arrived and none
        ended (refused, hung), or arrivals cannot be read, it stays missing data, said so - never 0 s."""
        if not users:
            return
        window = queries.LATENCY_WINDOW
        try:
            arrived = _by_owner(self._query(ep, queries.arrival_rate(namespaces, _seconds(window))), combine=max)
        except QueryError:
            arrived = {}
        for t, slot in users:
            rps = arrived.get(t.series_key)
            if rps == 0:
                values[t.key][slot] = 0.0
                invalid[t.key].pop(slot, None)
            elif rps is None:
                invalid[t.key][slot] = f"returned 'NaN': no request ended in the last {window} (no data)"
            else:
                invalid[t.key][slot] = (
                    f"returned 'NaN': {rps:.3g} requests/s arrived but none ended in the last {window} (no data)"
                )

    @staticmethod
    def _freshness_queries(
        namespaces: Sequence[str], users: Sequence[tuple[Target, str]]
    ) -> dict[str, list[tuple[Target, str]]]:
        """The queries for the age of each object's newest samples, each with the (object, input)
        pairs it answers; a profile that cannot read the samples' age asks none (values stay)."""
        by_query: dict[str, list[tuple[Target, str]]] = defaultdict(list)
        for t, slot in users:
            asked = t.profile.freshness(t.pods, namespaces, SCRAPE_WINDOWS, _SAMPLE)
            if asked is not None:
                by_query[asked.promql].append((t, slot))
        return by_query

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

    def pod_work(
        self, ep: Endpoint, namespace: str, name: str, profile: Profile = profiles.VOXSCALE
    ) -> dict[str, float]:
        """Requests held by each pod of one TTSDeployment (pods without a finite value are left out;
        none where its metric profile cannot tell)."""
        out: dict[str, float] = {}
        asked = profile.pod_work(Pods(namespace, name, name))
        if asked is None:
            return out
        for series in self._query(ep, asked.promql):
            pod, value = series.get("metric", {}).get("pod"), sample_value(_raw_value(series))
            if pod and value is not None:
                out[pod] = value
        return out

    def pod_work_soon(
        self, ep: Endpoint, namespace: str, name: str, profile: Profile = profiles.VOXSCALE
    ) -> concurrent.futures.Future[dict[str, float]]:
        """`pod_work()` in a worker, for a caller that waits only as long as its own budget."""
        return self._pool.submit(self.pod_work, ep, namespace, name, profile)

    def arrival_history(
        self, ep: Endpoint, namespaces: Sequence[str], window_seconds: float, lookback: dt.timedelta, now: dt.datetime
    ) -> dict[Key, RateHistory]:
        """Each TTSDeployment's arrival rate over `lookback`, one sample a minute, in one range query.

        Prometheus answers at most 11,000 points per series, so a longer look-back takes a longer step.
        """
        step = max(HISTORY_STEP_SECONDS, math.ceil(lookback.total_seconds() / 10_000))
        window = max(window_seconds, 2 * step)  # >= 2 samples per window
        promql = queries.arrival_rate(namespaces, window)
        result = self._range(ep, promql, now - lookback, now, step)
        n = int(lookback.total_seconds() // step) + 1
        out: dict[Key, RateHistory] = {}
        for series in result:
            labels = series.get("metric", {})
            owner = labels.get(queries.OWNER_LABEL)
            if owner and "namespace" in labels:
                out[(labels["namespace"], owner)] = _history(series, now - lookback, step, n)
        out = self._by_object(out, namespaces)
        out.update(self._profile_history(ep, namespaces, window, now - lookback, now, step))
        return out

    def _range(
        self, ep: Endpoint, promql: str, start: dt.datetime, end: dt.datetime, step: int
    ) -> list[dict[str, Any]]:
        self.stats.count()
        try:
            result: list[dict[str, Any]] = self._client(ep).custom_query_range(
                promql, start_time=start, end_time=end, step=f"{step}s"
            )
        except (requests.RequestException, PrometheusApiClientException, ValueError) as exc:
            raise QueryError(_describe(ep, exc)) from exc
        return result

    def _profile_history(
        self, ep: Endpoint, namespaces: Sequence[str], window: float, start: dt.datetime, end: dt.datetime, step: int
    ) -> dict[Key, RateHistory]:
        """The arrival history of the objects whose metric profile is not the door's: one range query per
        distinct arrivals query (Triton's per model, batched; a user's per object)."""
        n = int((end - start).total_seconds() // step) + 1
        key = SignalKey.parse(f"arrivals:{window:g}")
        assert key is not None
        by_query: dict[Query, list[Target]] = defaultdict(list)
        for t in list(self._targets.values()):
            if t.namespace in namespaces and t.endpoint == ep and t.profile is not profiles.VOXSCALE:
                asked = t.profile.signal(key, t.pods, namespaces)
                if isinstance(asked, Query):
                    by_query[asked].append(t)
        out: dict[Key, RateHistory] = {}
        for asked, group in by_query.items():
            result = self._range(ep, asked.promql, start, end, step)
            if not asked.batched:
                if len(result) == 1:
                    out[group[0].key] = _history(result[0], start, step, n)
                continue
            owned = {_owner_of(series): series for series in result}
            out.update({t.key: _history(owned[t.series_key], start, step, n) for t in group if t.series_key in owned})
        return out

    def _by_object(self, found: dict[Key, RateHistory], namespaces: Sequence[str]) -> dict[Key, RateHistory]:
        """A batched answer keyed by pod owner, re-keyed for the objects attached to another workload
        (spec.targetRef): each gets its workload's series, never those of a workload that merely
        shares its name."""
        out = dict(found)
        for key, pods in list(self._series_keys.items()):
            if key == pods or key[0] not in namespaces:
                continue
            if pods in found:
                out[key] = found[pods]
            else:
                out.pop(key, None)
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
        promql = queries.custom(promql, t.namespace, t.name, t.workload or None, t.ordinal_pods)
        self._one_series(ep, t, trigger, promql, values, invalid, errors)

    def _one_series(
        self,
        ep: Endpoint,
        t: Target,
        trigger: str,
        promql: str,
        values: dict[Key, dict[str, float]],
        invalid: dict[Key, dict[str, str]],
        errors: dict[Key, str],
    ) -> None:
        """An object's own query, its placeholders filled (a custom trigger's, a promql profile's): one
        series, one number, run only if tenancy scoping allows it; anything else is that input's missing
        data (a secondary input's trouble, "slo.backlog", leaves its trigger usable and is not said)."""
        problem: str | None = None
        if self.scope_custom_queries:
            scope = tenancy.scope_problem(promql, t.namespace)
            problem = None if scope is None else f"not run: the query {scope}"
        if problem is None:
            try:
                value, problem = _one_value(self._query(ep, promql))
            except QueryError as exc:
                if "." not in trigger:
                    errors.setdefault(t.key, str(exc))
                return
            if value is not None:
                values[t.key][trigger] = value
        if problem is not None and "." not in trigger:
            invalid[t.key][trigger] = problem


def _one_value(result: list[Any]) -> tuple[float | None, str | None]:
    """The number an object's own query returned, or why there is none (None, None: no series)."""
    if result and not isinstance(result[0], dict):  # a scalar or string result: [time, "value"]
        raw = str(result[1]) if len(result) == 2 else ""
        value = sample_value(raw)
        return (
            (value, None)
            if value is not None
            else (None, f"returned {raw!r} (a scalar or string), which is not a number (no data)")
        )
    if len(result) > 1:
        return None, f"returned {len(result)} series; the query must return one (aggregate it)"
    if result:
        raw = _raw_value(result[0])
        value = sample_value(raw)
        return (value, None) if value is not None else (None, f"returned {raw!r}, which is not a number (no data)")
    return None, None


def _profile_query(t: Target, key: str, namespaces: Sequence[str]) -> Query | Unavailable:
    """The PromQL answering a trigger's batch key for this object: its metric profile's for a pod
    signal, the trigger kind's own otherwise (a GPU exporter's series are the same under every profile)."""
    signal = SignalKey.parse(key)
    if signal is None:
        return Query(triggers.batch_query(key, namespaces))
    return t.profile.signal(signal, t.pods, namespaces)


def _owner_of(series: dict[str, Any]) -> Key:
    labels = series.get("metric", {})
    return (labels.get("namespace", ""), labels.get(queries.OWNER_LABEL, ""))


def _history(series: dict[str, Any], start: dt.datetime, step: int, n: int) -> RateHistory:
    """A range query's series as a rate history of `n` steps from `start` (gaps and garbage: NaN)."""
    rps = np.full(n, np.nan)
    for ts, value in series.get("values", []):
        i = round((float(ts) - start.timestamp()) / step)
        v = float(value)
        if 0 <= i < n and math.isfinite(v) and v >= 0:
            rps[i] = v
    return RateHistory(start, float(step), rps)


class QueryError(RuntimeError):
    """A query without an answer. `refused`: Prometheus answered with an error (the query itself, e.g.
    a user's PromQL that does not parse), as opposed to no answer at all (unreachable, timed out)."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


def _drop_stale(
    answer: list[dict[str, Any]] | QueryError,
    users: Sequence[tuple[Target, str]],
    values: dict[Key, dict[str, float]],
    invalid: dict[Key, dict[str, str]],
) -> None:
    """Take out every batched value of an object whose pods' newest samples are too old to describe
    now (missing data, the reason in `invalid`). Ages unknown (the query failed, no pod series)
    leave the values as they are: this can only take data away, never invent it."""
    if isinstance(answer, QueryError):
        return
    ages = freshness(answer)
    for t, slot in users:
        fresh = ages.get(t.series_key)
        if fresh is None or not fresh.stale:
            continue
        values[t.key].pop(slot, None)
        if "." not in slot:
            invalid[t.key][slot] = fresh.reason()


def _notify(
    on_late: Callable[[Iterable[Key]], None], keys: Sequence[Key]
) -> Callable[[concurrent.futures.Future[dict[Key, Metrics]]], None]:
    """A done-callback telling `on_late` that these objects' answer came."""
    return lambda _future: on_late(tuple(keys))


def _describe(ep: Endpoint, exc: Exception) -> str:
    if isinstance(exc, requests.Timeout):
        return f"Prometheus at {ep.url} timed out after {ep.timeout_seconds:g}s"
    if isinstance(exc, requests.ConnectionError):
        return f"Prometheus at {ep.url} unreachable"
    return f"Prometheus at {ep.url}: {exc}"


def _by_owner(result: Iterable[dict[str, Any]], combine: Callable[[float, float], float] = min) -> dict[Key, float]:
    """{(namespace, ttsdeployment): value} from a batched query; NaN, +-Inf and garbage are no data."""
    out: dict[Key, float] = {}
    for key, raw in _owned_samples(result):
        value = sample_value(raw)
        if value is not None:
            out[key] = combine(out[key], value) if key in out else value
    return out


def _seconds(window: str) -> float:
    """A PromQL duration of one unit ("1m", "30s") in seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    return float(window[:-1]) * units[window[-1]]


@dataclass(frozen=True)
class Freshness:
    """How old an object's samples are: the age of its stalest pod's newest sample, against the
    scrape interval its pods' samples show."""

    age: float  # seconds
    interval: float  # seconds between scrapes

    @property
    def limit(self) -> float:
        return max(STALE_SCRAPES * self.interval, STALE_MIN_SECONDS)

    @property
    def stale(self) -> bool:
        return self.age > self.limit

    def reason(self) -> str:
        return (
            f"has a sample {self.age:.0f}s old, older than {STALE_SCRAPES} scrapes of {self.interval:.3g}s "
            "(Prometheus restarting, or not scraping the pods): stale, no data"
        )


_SAMPLE = "voxscale_sample"  # which half of the freshness query a series answers


def freshness(result: Iterable[dict[str, Any]]) -> dict[Key, Freshness]:
    """{(namespace, ttsdeployment): Freshness} from the freshness query. The age is measured on
    Prometheus' own clock (the evaluation time it answers with), from the stalest live pod: an
    instant query sums every live pod's last sample, so one old one is enough to make the sum old.

    The interval is a window over the most samples any pod sent in it. A pod younger than the window,
    or an outage inside it, only lowers a count, so every window overestimates the interval; the
    smallest estimate is the closest."""
    newest: dict[Key, list[float]] = defaultdict(list)
    intervals: dict[Key, list[float]] = defaultdict(list)
    evaluated: dict[Key, float] = {}
    for series in result:
        labels = series.get("metric", {})
        owner, ns, sample = labels.get(queries.OWNER_LABEL), labels.get("namespace"), series.get("value")
        tag = labels.get(_SAMPLE, "")
        if not owner or not ns or not isinstance(sample, list | tuple) or len(sample) != 2:
            continue
        value = sample_value(str(sample[1]))
        if value is None:
            continue
        key = (ns, owner)
        if tag == "newest":
            newest[key].append(value)
            evaluated[key] = float(sample[0])
        elif tag.isdigit() and value > 1:
            intervals[key].append(int(tag) / value)
    return {
        key: Freshness(max(0.0, evaluated[key] - min(times)), min(intervals[key], default=SCRAPE_INTERVAL_UNKNOWN))
        for key, times in newest.items()
    }


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

"""The scaling loop: the imperative shell around `engine.decide()`.

Every round it takes the TTSDeployments whose interval has elapsed, lists their Deployments in one
call, asks Prometheus once per metric kind for all of them, runs the engine for each, writes the new
replica count through the scale subresource, and records the decision in status and Events.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Gauge, Histogram

from voxscale.operator import children
from voxscale.operator import status as st
from voxscale.operator.endpoints import EndpointResolver
from voxscale.operator.engine import Decision, History, Metrics, Observed, decide
from voxscale.operator.forecast import RateHistory
from voxscale.operator.kube import Kube
from voxscale.operator.policy import ScalingMode, ScalingPolicy, SpecError
from voxscale.operator.prometheus import HISTORY_STEP_SECONDS, Endpoint, Key, PrometheusSource, QueryError, Target

log = logging.getLogger("voxscale.operator.scaler")

DECISIONS = Counter("voxscale_operator_decisions", "Scaling decisions by rule.", ["rule"])
SCALE_EVENTS = Counter("voxscale_operator_scale_events", "Replica changes written.", ["direction"])
PROM_ERRORS = Counter("voxscale_operator_prometheus_errors", "TTSDeployments whose metrics query failed.")
PROM_QUERIES = Counter("voxscale_operator_prometheus_queries", "PromQL queries sent.")
TICK_SECONDS = Histogram(
    "voxscale_operator_tick_seconds",
    "Duration of one scaling round (all due TTSDeployments).",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TRACKED = Gauge("voxscale_operator_ttsdeployments", "TTSDeployments the operator is scaling.")
LAST_ROUND_SECONDS = Gauge("voxscale_operator_last_round_seconds", "Duration of the latest scaling round.")
LAST_ROUND_OBJECTS = Gauge("voxscale_operator_last_round_ttsdeployments", "TTSDeployments in the latest round.")
LAST_ROUND_QUERIES = Gauge("voxscale_operator_last_round_queries", "PromQL queries in the latest round.")

_PER_OBJECT = ["namespace", "ttsdeployment"]
DESIRED = Gauge("voxscale_operator_desired_replicas", "The engine's latest decision.", _PER_OBJECT)
READY = Gauge("voxscale_operator_ready_replicas", "Ready pods of the TTSDeployment.", _PER_OBJECT)
MAX = Gauge("voxscale_operator_max_replicas", "spec.replicas.max of the TTSDeployment.", _PER_OBJECT)
METRICS_OK = Gauge("voxscale_operator_metrics_available", "1 while every trigger has data.", _PER_OBJECT)
ADVISED = Gauge("voxscale_operator_advised_replicas", "What advisory mode would set (not written).", _PER_OBJECT)
DEMAND = Gauge("voxscale_operator_demand_rps", "Requests/s arriving at the pods (slo trigger).", _PER_OBJECT)
CAPACITY = Gauge("voxscale_operator_replica_capacity_rps", "One replica's capacity, measured or assumed.", _PER_OBJECT)
FORECAST = Gauge(
    "voxscale_operator_forecast_rps", "Peak demand forecast over the look-ahead (predictive floor).", _PER_OBJECT
)
FORECAST_ACTUAL = Gauge(
    "voxscale_operator_forecast_actual_rps", "Peak demand that arrived in the last forecast window.", _PER_OBJECT
)
_PER_OBJECT_GAUGES = (DESIRED, READY, MAX, METRICS_OK, ADVISED, DEMAND, CAPACITY, FORECAST, FORECAST_ACTUAL)
HISTORY_REFRESH_SECONDS = 300.0  # re-read the arrival history from Prometheus this often

STATUS_REFRESH_SECONDS = 30.0  # refresh status messages at least this often


@dataclass
class Tracked:
    body: dict[str, Any]
    policy: ScalingPolicy | None = None
    spec_error: str | None = None
    generation: int = -1
    next_due: float = 0.0
    history: History = field(default_factory=History)
    decision: Decision | None = None
    status: dict[str, Any] | None = None  # the last status written
    written: dict[str, Any] | None = None  # its significant part
    written_at: float = 0.0
    reported_error: str | None = None
    metrics_ok: bool | None = None
    advised: int | None = None  # the last advice reported (advisory mode)
    expected_replicas: int | None = None  # spec.replicas as voxscale last left it
    conflict: str | None = None  # another autoscaler on the Deployment, this round
    reported_conflict: str | None = None

    @property
    def key(self) -> Key:
        return (self.body["metadata"]["namespace"], self.body["metadata"]["name"])


class Scaler:
    def __init__(
        self,
        kube: Kube,
        source: PrometheusSource | None = None,
        default_prometheus_url: str | None = None,
        namespaces: list[str] | None = None,
        wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        allowed_prometheus_urls: tuple[str, ...] = (),
    ) -> None:
        self.kube = kube
        self.source = source or PrometheusSource()
        self.endpoints = EndpointResolver(
            kube.secret_data if kube is not None else None, default_prometheus_url, allowed_prometheus_urls
        )
        self.namespaces = namespaces or None
        self.wall_clock = wall_clock
        # kopf runs sync handlers (upsert/remove) in its executor threads while the round runs in
        # another: every access to `tracked` holds this lock.
        self._lock = threading.Lock()
        self.tracked: dict[Key, Tracked] = {}
        self.histories: dict[Key, tuple[float, RateHistory]] = {}  # (when read, history)

    # ---------------------------------------------------------------- registry (fed by kopf events)
    def upsert(self, body: dict[str, Any]) -> None:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        with self._lock:
            tr = self.tracked.get(key)
            if tr is None:
                stored = History.from_dict((body.get("status") or {}).get("engine"))
                tr = Tracked(body=body, history=stored.taken_over())
                self.tracked[key] = tr
            tr.body = body
            self._parse_spec(tr)
            TRACKED.set(len(self.tracked))

    @staticmethod
    def _parse_spec(tr: Tracked) -> None:
        """Parse the policy again when the spec's generation moved (status-only events keep it)."""
        body = tr.body
        generation = int(body["metadata"].get("generation", 0))
        if generation != tr.generation:
            tr.generation = generation
            try:
                tr.policy, tr.spec_error = ScalingPolicy.from_spec(body["spec"]), None
            except SpecError as exc:
                tr.policy, tr.spec_error = None, str(exc)
            # A shape the schema refuses can still be stored from before a CRD change: say it, never crash.
            except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
                tr.policy, tr.spec_error = None, f"spec: {exc}"
            tr.next_due = 0.0  # evaluate a changed spec at once

    def remove(self, key: Key) -> None:
        with self._lock:
            self.tracked.pop(key, None)
            TRACKED.set(len(self.tracked))
            self.histories.pop(key, None)
        self.endpoints.forget(key)
        for gauge in _PER_OBJECT_GAUGES:
            with contextlib.suppress(KeyError):
                gauge.remove(*key)

    def mark_due(self, key: Key) -> None:
        with self._lock:
            if key in self.tracked:
                self.tracked[key].next_due = 0.0

    def due(self, mono: float) -> list[Tracked]:
        """The TTSDeployments whose interval has elapsed (a snapshot: handlers may change the registry
        while the round works through it)."""
        with self._lock:
            return [tr for tr in self.tracked.values() if tr.next_due <= mono]

    # ---------------------------------------------------------------- the loop
    async def run_forever(self, granularity: float = 0.5) -> None:
        while True:
            try:
                await asyncio.to_thread(self.tick)
            except Exception:
                log.exception("scaling round failed; retrying next round")
            await asyncio.sleep(granularity)

    def tick(self) -> int:
        """One round over every due TTSDeployment; returns how many were evaluated."""
        mono = time.monotonic()
        due = self.due(mono)
        if not due:
            return 0
        started = time.perf_counter()
        now = self.wall_clock()
        deployments = self.kube.list_deployments(self.namespaces)
        targets, endpoint_errors = [], {}
        for tr in due:
            if tr.policy is None or not tr.policy.triggers:
                continue
            try:
                targets.append(Target(tr.key[0], tr.key[1], tr.policy, self.endpoints.resolve(tr.body)))
            except SpecError as exc:
                endpoint_errors[tr.key] = str(exc)
        queries_before = self.source.stats.queries
        metrics = self.source.fetch(targets)
        self._refresh_histories(targets, now, mono)
        starts = self.kube.pod_start_seconds(self.namespaces)
        present = self.kube.list_children(self.namespaces)
        foreign = self.kube.foreign_autoscalers(self.namespaces)
        PROM_QUERIES.inc(self.source.stats.queries - queries_before)
        for tr in due:
            interval = tr.policy.interval.total_seconds() if tr.policy else 10.0
            tr.next_due = mono + interval
            m = metrics.get(tr.key) or Metrics(error=endpoint_errors.get(tr.key, "not queried"))
            history = self.histories.get(tr.key)
            m = replace(m, history=history[1] if history else None)
            try:
                self._restore_children(tr, present.get(tr.key, set()))
                tr.conflict = foreign.get(tr.key)
                self._evaluate(tr, deployments.get(tr.key), m, now, starts.get(tr.key, ()))
            except Exception:
                log.exception("evaluating %s/%s failed", *tr.key)
        elapsed = time.perf_counter() - started
        TICK_SECONDS.observe(elapsed)
        LAST_ROUND_SECONDS.set(elapsed)
        LAST_ROUND_OBJECTS.set(len(due))
        LAST_ROUND_QUERIES.set(self.source.stats.queries - queries_before)
        return len(due)

    def _refresh_histories(self, targets: list[Target], now: dt.datetime, mono: float) -> None:
        """Re-read the arrival history of objects with a forecast floor, one range query per endpoint."""
        stale = [
            t
            for t in targets
            if t.policy.slo is not None
            and t.policy.predictive.enabled
            and mono - self.histories.get(t.key, (-math.inf, None))[0] >= HISTORY_REFRESH_SECONDS
        ]
        by_endpoint: dict[Endpoint, list[Target]] = {}
        for t in stale:
            by_endpoint.setdefault(t.endpoint, []).append(t)
        for ep, group in by_endpoint.items():
            lookback = max(t.policy.predictive.lookback for t in group)
            window = max(t.policy.slo.rate_window.total_seconds() for t in group if t.policy.slo)
            try:
                found = self.source.arrival_history(ep, sorted({t.namespace for t in group}), window, lookback, now)
            except QueryError as exc:
                log.warning("arrival history unavailable (%s); forecasts use what was read before", exc)
                continue
            for t in group:
                # No series at all is an answer too: no history yet (the forecast says how much it needs).
                empty = RateHistory(now, HISTORY_STEP_SECONDS, np.full(0, np.nan))
                self.histories[t.key] = (mono, found.get(t.key, empty))

    def _restore_children(self, tr: Tracked, present: set[str]) -> None:
        """Re-apply the children when a Service or PDB the spec calls for is gone (the Deployment is
        checked in `_evaluate`)."""
        missing = sorted(children.expected_kinds(tr.body) - {"Deployment"} - present)
        if missing:
            applied = self.kube.apply_children(tr.body)
            message = f"{', '.join(missing)} missing (deleted?): applied {', '.join(applied)}"
            self.kube.event(tr.body, "Normal", "ChildrenRecreated", message)

    def _evaluate(
        self, tr: Tracked, dep: Any, metrics: Metrics, now: dt.datetime, starts: tuple[float, ...] = ()
    ) -> None:
        ns, name = tr.key
        if dep is None:
            # Deleted by hand, or not created yet: make the children again.
            applied = self.kube.apply_children(tr.body)
            self.kube.event(tr.body, "Normal", "ChildrenRecreated", f"applied {', '.join(applied)}")
            tr.next_due = 0.0
            self._write_status(tr, None, 0, 0, deployment_found=False, now=now)
            return
        replicas = int(dep.spec.replicas if dep.spec.replicas is not None else 1)
        ready = int(dep.status.ready_replicas or 0)
        if tr.policy is None:
            self._write_status(tr, None, replicas, ready, deployment_found=True, now=now)
            return
        decision = decide(tr.policy, Observed(replicas, ready, starts), metrics, now, tr.history)
        DECISIONS.labels(decision.reason.value).inc()
        if metrics.error:
            PROM_ERRORS.inc()
        self._report_conflict(tr)
        advisory = tr.policy.mode is ScalingMode.ADVISORY or tr.conflict is not None
        if advisory:
            self._advise(tr, decision)
        else:
            self._report_manual_scale(tr, decision)
        if decision.changed and not advisory:
            if decision.desired < replicas:
                self._spare_busy_pods(tr)
            self.kube.scale(ns, name, decision.desired)
            direction = "up" if decision.desired > replicas else "down"
            SCALE_EVENTS.labels(direction).inc()
            self.kube.event(tr.body, "Normal", f"Scaled{direction.capitalize()}", decision.message)
            log.info("%s/%s: %s", ns, name, decision.message)
        tr.expected_replicas = replicas if advisory else decision.desired
        if tr.metrics_ok is not False and not decision.metrics_available and tr.policy.triggers:
            self.kube.event(tr.body, "Warning", "MetricsUnavailable", decision.metrics_message)
        if tr.metrics_ok is False and decision.metrics_available:
            self.kube.event(tr.body, "Normal", "MetricsAvailable", "metrics are back: " + decision.metrics_message)
        tr.metrics_ok = decision.metrics_available
        self._export(tr.key, decision, ready, tr.policy.max_replicas, advisory)
        tr.history = decision.history
        tr.decision = decision
        self._write_status(tr, decision, replicas if advisory else decision.desired, ready, True, now)

    def _spare_busy_pods(self, tr: Tracked) -> None:
        """Before a scale-down, rank the pods by the requests they hold, so the ReplicaSet removes idle
        ones first. Best effort: without the figures the scale-down still happens, as it would have."""
        ns, name = tr.key
        try:
            work = self.source.pod_work(self.endpoints.resolve(tr.body), ns, name)
            self.kube.set_deletion_costs(ns, deletion_costs(work))
        except (QueryError, SpecError, ApiException) as exc:
            log.warning("%s/%s: could not rank pods for the scale-down (%s)", ns, name, exc)

    def _report_conflict(self, tr: Tracked) -> None:
        """Another autoscaler on the same Deployment: stop writing (two writers overwrite each other
        every sync) and say who, once per change."""
        if tr.conflict != tr.reported_conflict:
            if tr.conflict is not None:
                message = (
                    f"{tr.conflict} also scales this Deployment: voxscale stopped writing replicas and only "
                    "advises; delete one of the two autoscalers"
                )
                self.kube.event(tr.body, "Warning", "ConflictingAutoscaler", message)
            else:
                self.kube.event(tr.body, "Normal", "ConflictResolved", "no other autoscaler: scaling again")
            tr.reported_conflict = tr.conflict

    def _report_manual_scale(self, tr: Tracked, decision: Decision) -> None:
        """spec.replicas changed by someone else (kubectl scale): if the policy moves it, say so."""
        if tr.expected_replicas is None or decision.current == tr.expected_replicas or not decision.changed:
            return
        message = (
            f"replicas were set to {decision.current} outside voxscale (kubectl scale?); the policy sets "
            f"{decision.desired}. To hold a count, set spec.replicas.min and max to it or spec.scaling.paused: true"
        )
        self.kube.event(tr.body, "Warning", "ManualScaleOverridden", message)

    def _advise(self, tr: Tracked, decision: Decision) -> None:
        """Advisory mode: say what would be done, once per change of advice, and write nothing."""
        if decision.desired != tr.advised:
            if decision.changed:
                message = f"would scale {decision.current} -> {decision.desired}: {decision.message}"
                self.kube.event(tr.body, "Normal", "Advised", message)
            tr.advised = decision.desired

    @staticmethod
    def _export(key: Key, decision: Decision, ready: int, max_replicas: int, advisory: bool) -> None:
        DESIRED.labels(*key).set(decision.current if advisory else decision.desired)
        READY.labels(*key).set(ready)
        MAX.labels(*key).set(max_replicas)
        METRICS_OK.labels(*key).set(1 if decision.metrics_available else 0)
        if advisory:
            ADVISED.labels(*key).set(decision.desired)
        d = decision.demand
        if d is None:
            return
        if d.arrival_rps is not None:
            DEMAND.labels(*key).set(d.arrival_rps)
        CAPACITY.labels(*key).set(d.capacity_rps)
        if d.forecast_rps is not None:
            FORECAST.labels(*key).set(d.forecast_rps)
        if d.last_forecast is not None:
            FORECAST_ACTUAL.labels(*key).set(d.last_forecast[1])

    def _write_status(
        self,
        tr: Tracked,
        decision: Decision | None,
        replicas: int,
        ready: int,
        deployment_found: bool,
        now: dt.datetime,
    ) -> None:
        """Replace status with this round's (see status.build), at once when something a user, a
        controller or a new leader acts on changed; sentences with running clocks ("below 40% for
        1m10s of 5m") refresh at most every STATUS_REFRESH_SECONDS, so a steady fleet does not turn
        into one status write per object per interval."""
        body = tr.body
        seen = st.Observation(
            generation=tr.generation,
            replicas=replicas,
            ready=ready,
            min_replicas=int((body["spec"].get("replicas") or {}).get("min", 1)),
            deployment_found=deployment_found,
            spec_error=tr.spec_error,
            paused=bool(tr.policy.paused) if tr.policy else False,
            advisory=(tr.policy is not None and tr.policy.mode is ScalingMode.ADVISORY) or tr.conflict is not None,
            conflict=tr.conflict,
        )
        if tr.spec_error and tr.spec_error != tr.reported_error:
            self.kube.event(body, "Warning", "InvalidSpec", tr.spec_error)
        tr.reported_error = tr.spec_error
        new = st.build(tr.status or body.get("status") or {}, seen, decision, tr.history, now)
        significant = {**st.significant(new), "specError": tr.spec_error}
        mono = time.monotonic()
        if significant == tr.written and mono - tr.written_at < STATUS_REFRESH_SECONDS:
            return
        self.kube.replace_status(tr.key[0], tr.key[1], new)
        tr.status, tr.written, tr.written_at = new, significant, mono


def deletion_costs(work: dict[str, float]) -> dict[str, int]:
    """Pod -> deletion cost: the requests it holds, in thousandths (int32, as the annotation wants)."""
    return {pod: min(round(held * 1000), 2**31 - 1) for pod, held in work.items()}

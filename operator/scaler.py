"""The scaling loop: the imperative shell around `engine.decide()`.

Every round it takes the TTSDeployments whose interval has elapsed, lists their Deployments in one
call, asks Prometheus once per metric kind for all of them, runs the engine for each, writes the new
replica count through the scale subresource, and records the decision in status and Events.

A round waits for Prometheus at most the operator's own budget (`--round-budget`), whatever timeout
an object names: an object whose Prometheus has not answered by then keeps its last decision (its
MetricsAvailable condition says why) and its answer is used when it comes. Arrival history and
Secrets are read by background workers (history.py, endpoints.py), never inside the round.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter, Gauge, Histogram

from voxscale import metrics_contract as mc
from voxscale.operator import children, profiles
from voxscale.operator import status as st
from voxscale.operator.endpoints import EndpointResolver
from voxscale.operator.engine import Decision, History, Metrics, Observed, decide
from voxscale.operator.history import HistoryReader
from voxscale.operator.kube import Kube, NotReady, PodStarts, Workload, starts_of
from voxscale.operator.policy import ScalingMode, ScalingPolicy, SpecError, format_duration
from voxscale.operator.prepull import PrePuller
from voxscale.operator.prometheus import Key, Pending, PrometheusSource, QueryError, Target
from voxscale.operator.reversals import FLAPPING_HORIZON_S, REVERSAL_WINDOW_S, Move, count_reversals, flapping
from voxscale.operator.runner import ROUND_BUDGET_SECONDS  # the `--round-budget` default, set with the flag
from voxscale.operator.writes import StatusWriter, TokenBucket

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
LAST_ROUND_PENDING = Gauge(
    "voxscale_operator_last_round_pending",
    "TTSDeployments of the latest round that kept their last decision (no answer within the budget).",
)
EVALUATION_WAIT = Histogram(
    "voxscale_operator_evaluation_wait_seconds",
    "Seconds between two evaluations of a TTSDeployment: its interval, plus the rounds it waited while the "
    "fleet's evaluations did not fit the round's budget.",
    buckets=(1, 5, 10, 11, 12.5, 15, 20, 30, 60, 120),
)
LAST_ROUND_LONGEST_WAIT = Gauge(
    "voxscale_operator_last_round_longest_wait_seconds",
    "The longest an object of the latest round went since its previous evaluation.",
)
LAST_ROUND_DEFERRED = Gauge(
    "voxscale_operator_last_round_deferred",
    "TTSDeployments that were due but left to the next round (the round's evaluation budget was spent).",
)

_PER_OBJECT = ["namespace", "ttsdeployment"]
DESIRED = Gauge("voxscale_operator_desired_replicas", "The engine's latest decision.", _PER_OBJECT)
READY = Gauge("voxscale_operator_ready_replicas", "Ready pods of the TTSDeployment.", _PER_OBJECT)
MAX = Gauge("voxscale_operator_max_replicas", "spec.replicas.max of the TTSDeployment.", _PER_OBJECT)
METRICS_OK = Gauge("voxscale_operator_metrics_available", "1 while every trigger has data.", _PER_OBJECT)
ADVISED = Gauge(mc.OPERATOR_ADVISED_REPLICAS.name, mc.OPERATOR_ADVISED_REPLICAS.help, _PER_OBJECT)
# The other side of the advice: the replicas the workload has (what a shadowed autoscaler set).
WORKLOAD_REPLICAS = Gauge(mc.OPERATOR_WORKLOAD_REPLICAS.name, mc.OPERATOR_WORKLOAD_REPLICAS.help, _PER_OBJECT)
REVERSALS = Counter(
    "voxscale_operator_reversals",
    "Scale moves (or advice) undone within 10 min while the load changed < 20 % (operator/reversals.py).",
    _PER_OBJECT,
)
DEMAND = Gauge("voxscale_operator_demand_rps", "Requests/s arriving at the pods (slo trigger).", _PER_OBJECT)
CAPACITY = Gauge("voxscale_operator_replica_capacity_rps", "One replica's capacity, measured or assumed.", _PER_OBJECT)
FORECAST = Gauge(
    "voxscale_operator_forecast_rps", "Peak demand forecast over the look-ahead (predictive floor).", _PER_OBJECT
)
FORECAST_ACTUAL = Gauge(
    "voxscale_operator_forecast_actual_rps", "Peak demand that arrived in the last forecast window.", _PER_OBJECT
)
SPEC_INVALID = Gauge(
    "voxscale_operator_spec_invalid", "1 while the spec cannot be parsed (decision series removed).", _PER_OBJECT
)
# Series that hold only while the engine decides for the object; removed while its spec is invalid.
_DECISION_GAUGES = (DESIRED, MAX, METRICS_OK, ADVISED, WORKLOAD_REPLICAS, DEMAND, CAPACITY, FORECAST, FORECAST_ACTUAL)
_PER_OBJECT_GAUGES = (*_DECISION_GAUGES, READY, SPEC_INVALID, REVERSALS)

EVALUATION_BUDGET_SECONDS = 0.5  # a round evaluates what fits in this; the rest of the due objects wait a round
MIN_OBJECTS_PER_ROUND = 50
STATUS_REFRESH_SECONDS = 30.0  # refresh status messages at least this often
# Refreshes of unchanged status (running clocks, the last decision's time), all objects together: a
# steady fleet of thousands costs a bounded number of writes per second, not one per object per 30 s.
# A change anyone acts on is written at once, outside this budget.
STATUS_REFRESHES_PER_SECOND = 10.0


@dataclass
class Tracked:
    body: dict[str, Any]
    policy: ScalingPolicy | None = None
    profile: profiles.Profile = profiles.VOXSCALE  # where its pod signals come from (spec.metrics)
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
    conflict: str | None = None  # another autoscaler on the Deployment, this round (nothing is written)
    shadowing: str | None = None  # another autoscaler that advisory mode shadows, this round
    reported_conflict: str | None = None
    reported_stuck: frozenset[str] = frozenset()  # stuck pods already told in an Event
    moves: list[Move] = field(default_factory=list)  # this leader's recent moves (or changes of advice)
    start_phases: tuple[tuple[float, float, float], ...] = ()  # of its Ready pods, this round
    prepull: st.Condition | None = None  # ImagePrePulled this round (None: spec.prePull is off)
    reported_left: frozenset[str] = frozenset()  # children of a former spec.model already told in an Event
    reported_flapping: bool = False
    evaluated_at: float | None = None  # monotonic start of the round that last evaluated it
    expected_kinds: frozenset[str] | None = None  # the children its spec asks for (at `generation`)

    @property
    def key(self) -> Key:
        return (self.body["metadata"]["namespace"], self.body["metadata"]["name"])

    @property
    def target(self) -> children.TargetRef | None:
        """The workload spec.targetRef attaches it to (None: its own Deployment)."""
        return children.target_ref(self.body)

    @property
    def writes(self) -> bool:
        """Whether its policy writes replicas (a valid spec, not advisory)."""
        return self.policy is not None and self.policy.mode is not ScalingMode.ADVISORY


class Scaler:
    def __init__(
        self,
        kube: Kube,
        source: PrometheusSource | None = None,
        default_prometheus_url: str | None = None,
        namespaces: list[str] | None = None,
        wall_clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        allowed_prometheus_urls: tuple[str, ...] = (),
        round_budget: float = ROUND_BUDGET_SECONDS,
        status_writer: StatusWriter | None = None,
    ) -> None:
        self.kube = kube
        # Where statuses go: a background writer (the operator's), or straight to the API (tests).
        self.status_writer = status_writer
        self.source = source or PrometheusSource()
        self.endpoints = EndpointResolver(
            kube.secret_data if kube is not None else None,
            default_prometheus_url,
            allowed_prometheus_urls,
            on_resolved=self.mark_due,
        )
        self.history = HistoryReader(self.source)
        self.namespaces = namespaces or None
        self.wall_clock = wall_clock
        self.round_budget = round_budget
        # kopf runs sync handlers (upsert/remove) in its executor threads while the round runs in
        # another: every access to `tracked` holds this lock.
        self._lock = threading.Lock()
        self.tracked: dict[Key, Tracked] = {}
        self._queries_counted = 0  # stats.queries already added to PROM_QUERIES (history reads count too)
        self._seconds_per_object = 0.001  # evaluation cost per object (EWMA over rounds; a prior until measured)
        self._refreshes = TokenBucket(STATUS_REFRESHES_PER_SECOND, burst=10 * STATUS_REFRESHES_PER_SECOND)
        self.prepull = PrePuller(kube, self.namespaces)  # spec.prePull's DaemonSets (operator/prepull.py)

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
                tr.profile = profiles.from_spec(body["spec"])
                tr.policy, tr.spec_error = ScalingPolicy.from_spec(body["spec"]), None
            except SpecError as exc:
                tr.policy, tr.spec_error = None, str(exc)
            # A shape the schema refuses can still be stored from before a CRD change: say it, never crash.
            except (KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
                tr.policy, tr.spec_error = None, f"spec: {exc}"
            try:
                # Per spec, not per round: it fills in the CRD's defaults (a deep copy and a schema walk).
                tr.expected_kinds = frozenset(children.expected_kinds(body))
            except Exception:  # said where the round asks for it (_restore_children), as before the cache
                tr.expected_kinds = None
            tr.next_due = 0.0  # evaluate a changed spec at once

    def remove(self, key: Key) -> None:
        with self._lock:
            self.tracked.pop(key, None)
            TRACKED.set(len(self.tracked))
        if self.status_writer is not None:
            self.status_writer.forget(key)
        self.history.forget(key)
        self.source.forget(key)
        self.endpoints.forget(key)
        _remove_series(key, _PER_OBJECT_GAUGES)

    def mark_due(self, key: Key) -> None:
        with self._lock:
            if key in self.tracked:
                self.tracked[key].next_due = 0.0

    def _mark_answered(self, keys: Iterable[Key]) -> None:
        """A late answer came: evaluate its objects in the next round rather than an interval later."""
        for key in keys:
            self.mark_due(key)

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
        """One round over every due TTSDeployment; returns how many were evaluated. It waits for
        Prometheus at most `round_budget` seconds from its start; objects without an answer by then
        keep their last decision."""
        mono = time.monotonic()
        due, deferred = self._this_round(self.due(mono))
        if not due:
            return 0
        started = time.perf_counter()
        now = self.wall_clock()
        deployments = self.kube.list_deployments(self.namespaces)
        targets, endpoint_errors, pending = self._targets(due)
        queries_before = self.source.stats.queries
        budget = max(0.0, self.round_budget - (time.monotonic() - mono))
        gathered = self.source.gather(targets, budget, on_late=self._mark_answered)
        pending |= {k: (Pending.OVER_BUDGET.value, why) for k, why in gathered.pending.items()}
        self.history.request(targets, now)  # in the background: its result is used once it arrives
        starts = self.kube.pod_starts(self.namespaces)
        present = self.kube.list_children(self.namespaces)
        foreign = self.kube.foreign_autoscalers(self.namespaces)
        self._prepull(due)
        with self._lock:
            everyone = list(self.tracked.values())
        rivals = children.attached_writers([o.body for o in everyone], {o.key: o.writes for o in everyone})
        evaluating = time.perf_counter()
        longest_wait = 0.0
        for tr in due:
            interval = tr.policy.interval.total_seconds() if tr.policy else 10.0
            tr.next_due = mono + interval
            if tr.evaluated_at is not None:
                waited = mono - tr.evaluated_at
                EVALUATION_WAIT.observe(waited)
                longest_wait = max(longest_wait, waited)
            tr.evaluated_at = mono
            m = gathered.metrics.get(tr.key) or Metrics(error=endpoint_errors.get(tr.key, "not queried"))
            m = replace(m, history=self.history.get(tr.key))
            try:
                ref = tr.target
                if ref is None:
                    self._restore_children(tr, present.get(tr.key, set()))
                    other = foreign.get((tr.key[0], "apps", "Deployment", tr.key[1]))
                    work, pods = _own_workload(deployments.get(tr.key)), starts.get(tr.key, PodStarts())
                    problem = None
                else:
                    work, pods, problem = self._read_target(ref)
                    other = self._other_scaler(tr, ref, work, foreign.get(ref.key), rivals.get(tr.key))
                    left = frozenset(present.get(tr.key, set()) | ({"Deployment"} if tr.key in deployments else set()))
                    self._report_left_behind(tr, left)
                # Advisory mode writes nothing, so another autoscaler is shadowed there, not fought.
                advisory = tr.policy is not None and tr.policy.mode is ScalingMode.ADVISORY
                tr.conflict, tr.shadowing = (None, other) if advisory else (other, None)
                if tr.key in pending and work is not None:
                    self._hold(tr, work, pending[tr.key], now)
                else:
                    self._evaluate(tr, work, m, now, pods, problem)
            except Exception:
                log.exception("evaluating %s/%s failed", *tr.key)
        per_object = (time.perf_counter() - evaluating) / len(due)
        self._seconds_per_object = 0.7 * self._seconds_per_object + 0.3 * per_object
        self._count_queries(queries_before)
        elapsed = time.perf_counter() - started
        TICK_SECONDS.observe(elapsed)
        LAST_ROUND_SECONDS.set(elapsed)
        LAST_ROUND_OBJECTS.set(len(due))
        LAST_ROUND_PENDING.set(len(pending))
        LAST_ROUND_DEFERRED.set(deferred)
        LAST_ROUND_LONGEST_WAIT.set(longest_wait)
        return len(due)

    def _this_round(self, due: list[Tracked]) -> tuple[list[Tracked], int]:
        """The due objects this round evaluates, and how many wait for the next: the longest-waiting
        first, as many as EVALUATION_BUDGET_SECONDS of evaluation fits at the cost per object measured
        in past rounds (at least MIN_OBJECTS_PER_ROUND). A fleet of thousands created at once spreads
        over a few rounds instead of one round growing with it; each keeps its interval as long as
        the fleet's evaluations fit in it."""
        due.sort(key=lambda tr: tr.next_due)
        fits = max(MIN_OBJECTS_PER_ROUND, int(EVALUATION_BUDGET_SECONDS / max(self._seconds_per_object, 1e-6)))
        return due[:fits], max(0, len(due) - fits)

    def _targets(self, due: list[Tracked]) -> tuple[list[Target], dict[Key, str], dict[Key, tuple[str, str]]]:
        """What to query for the due objects, from the endpoint cache (a Secret is never read here):
        targets, objects whose endpoint is refused (SpecError), and objects whose endpoint is still
        being resolved (kept for this round)."""
        targets: list[Target] = []
        errors: dict[Key, str] = {}
        pending: dict[Key, tuple[str, str]] = {}
        for tr in due:
            if tr.policy is None or not tr.policy.triggers:
                continue
            try:
                endpoint = self.endpoints.resolve_nowait(tr.body)
            except SpecError as exc:
                errors[tr.key] = str(exc)
                continue
            if endpoint is None:
                why = "reading the Prometheus credentials' Secret in the background; evaluated once it is read"
                pending[tr.key] = (Pending.RESOLVING.value, why)
            else:
                ref = tr.target
                workload, ordinal = (ref.name, ref.ordinal_pods) if ref is not None else ("", False)
                targets.append(Target(tr.key[0], tr.key[1], tr.policy, endpoint, workload, ordinal, tr.profile))
        return targets, errors, pending

    def _read_target(self, ref: children.TargetRef) -> tuple[Workload | None, PodStarts, str | None]:
        """An attached workload's counts and its pods' starts (its selector's pods), or why it cannot
        be read (a forbidden read, a kind without a scale subresource): said in status, not raised."""
        try:
            work = self.kube.read_target(ref)
            pods = starts_of(self.kube.pods_of(ref.namespace, work.selector)) if work is not None else PodStarts()
        except ApiException as exc:
            why = f"HTTP {exc.status}: {exc.reason}"
            if exc.status in (401, 403):
                why += (
                    f"; the operator's RBAC must allow get on {ref.kind} ({ref.api_version}) and get and patch on "
                    "its scale subresource, and list on pods"
                )
            return None, PodStarts(), why
        return work, pods, None

    @staticmethod
    def _other_scaler(
        tr: Tracked, ref: children.TargetRef, work: Workload | None, hpa: str | None, rival: str | None
    ) -> str | None:
        """Who else scales an attached workload: an HPA (KEDA's included), the TTSDeployment that created
        it, or another TTSDeployment attached to it first; None when nobody does."""
        if hpa is not None:
            return hpa
        if work is not None and work.created_by is not None and work.created_by != tr.key[1]:
            return f"TTSDeployment {ref.namespace}/{work.created_by} (which created it)"
        return rival

    def _prepull(self, due: list[Tracked]) -> None:
        """Keep the due objects' pre-pull DaemonSets; a failure there never stops the scaling round."""
        try:
            conditions = self.prepull.round([tr.body for tr in due])
        except Exception:
            log.exception("keeping the pre-pull DaemonSets failed; retrying next round")
            return
        for tr in due:
            tr.prepull = conditions.get(tr.key)

    def _count_queries(self, before_round: int) -> None:
        """PROM_QUERIES counts every query (background history reads included) exactly once."""
        total = self.source.stats.queries
        PROM_QUERIES.inc(total - self._queries_counted)
        self._queries_counted = total
        LAST_ROUND_QUERIES.set(total - before_round)

    def _hold(self, tr: Tracked, work: Workload, pending: tuple[str, str], now: dt.datetime) -> None:
        """No answer within the budget: the last decision stands (nothing is scaled, no engine clock
        moves) and MetricsAvailable says why; the answer is used in the round after it comes."""
        reason, why = pending
        kept = f"{why}; keeping the last decision" if tr.decision is not None else why
        self._write_status(tr, tr.decision, work.replicas, work.ready, True, now, pending=(reason, kept))

    def _restore_children(self, tr: Tracked, present: set[str]) -> None:
        """Re-apply the children when a Service or PDB the spec calls for is gone (the Deployment is
        checked in `_evaluate`)."""
        kinds = tr.expected_kinds if tr.expected_kinds is not None else children.expected_kinds(tr.body)
        missing = sorted(kinds - {"Deployment"} - present)
        if missing:
            applied = self.kube.apply_children(tr.body)
            message = f"{', '.join(missing)} missing (deleted?): applied {', '.join(applied)}"
            self.kube.event(tr.body, "Normal", "ChildrenRecreated", message)

    def _evaluate(
        self,
        tr: Tracked,
        work: Workload | Any,
        metrics: Metrics,
        now: dt.datetime,
        starts: PodStarts | None = None,
        target_problem: str | None = None,
    ) -> None:
        """`work`: the Workload read this round, or the TTSDeployment's own Deployment as the client
        returns it (None: not there)."""
        ns, name = tr.key
        starts = starts or PodStarts()
        tr.start_phases = tuple((p.scheduling, p.pull_and_start, p.loading) for p in starts.phases)
        if work is not None and not isinstance(work, Workload):
            work = _own_workload(work)
        if work is None and tr.target is not None:
            # An attached workload is the user's: voxscale never creates it; status says it is missing.
            self._write_status(tr, None, 0, 0, deployment_found=False, now=now, target_problem=target_problem)
            return
        if work is None:
            # Deleted by hand, or not created yet: make the children again.
            applied = self.kube.apply_children(tr.body)
            self.kube.event(tr.body, "Normal", "ChildrenRecreated", f"applied {', '.join(applied)}")
            tr.next_due = 0.0
            self._write_status(tr, None, 0, 0, deployment_found=False, now=now)
            return
        replicas, ready = work.replicas, work.ready
        if tr.policy is None:
            _export_invalid(tr.key, ready)
            self._write_status(tr, None, replicas, ready, deployment_found=True, now=now)
            return
        cold_start = _cold_start(tr.policy, tr.history)
        stuck = stuck_pods(starts, cold_start, now)[: max(0, replicas - ready)]
        decision = decide(
            tr.policy, Observed(replicas, ready, starts.ready_seconds, len(stuck)), metrics, now, tr.history
        )
        if stuck:
            decision = replace(decision, message=f"{decision.message}; {stuck_note(stuck, cold_start, now)}")
        self._report_stuck(tr, stuck, decision.message)
        DECISIONS.labels(decision.reason.value).inc()
        if metrics.error:
            PROM_ERRORS.inc()
        self._report_conflict(tr)
        advisory = tr.policy.mode is ScalingMode.ADVISORY or tr.conflict is not None
        # What this decision moves from: the replicas, or in advisory mode the advice given before.
        before = tr.advised if advisory and tr.advised is not None else replicas
        if advisory:
            self._advise(tr, decision)
        else:
            self._report_manual_scale(tr, decision)
        if decision.changed and not advisory:
            if decision.desired < replicas:
                self._spare_busy_pods(tr)
            ref = tr.target
            if ref is None:
                self.kube.scale(ns, name, decision.desired)
            else:  # only the scale subresource of a workload voxscale did not create
                self.kube.scale_target(ref, decision.desired)
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
        self._record_move(tr, decision, before, now)
        self._export(tr.key, decision, ready, tr.policy.max_replicas, advisory)
        tr.history = decision.history
        tr.decision = decision
        self._write_status(tr, decision, replicas if advisory else decision.desired, ready, True, now)

    def _spare_busy_pods(self, tr: Tracked) -> None:
        """Before a scale-down, rank the pods by the requests they hold, so the ReplicaSet removes idle
        ones first. Best effort: without the figures the scale-down still happens, as it would have."""
        ns, name = tr.key
        ref = tr.target
        if ref is not None and not ref.replica_set_pods:
            return  # the cost ranks a ReplicaSet's pods only (a StatefulSet removes its highest ordinal)
        workload = ref.name if ref is not None else name
        try:
            endpoint = self.endpoints.resolve_nowait(tr.body)
            if endpoint is None:
                return
            # Bounded by the round's budget, not the object's timeout (up to 1 m): unranked pods are
            # the fallback anyway. A query still running goes on in its worker and is discarded.
            work = self.source.pod_work_soon(endpoint, ns, workload, tr.profile).result(timeout=self.round_budget)
            self.kube.set_deletion_costs(ns, deletion_costs(work))
        except (QueryError, SpecError, ApiException, concurrent.futures.TimeoutError) as exc:
            log.warning("%s/%s: could not rank pods for the scale-down (%r)", ns, name, exc)

    def _report_stuck(self, tr: Tracked, stuck: list[NotReady], message: str) -> None:
        """A Warning Event when a pod newly counts as stuck (once per pod, not every round)."""
        names = frozenset(p.name for p in stuck)
        if names - tr.reported_stuck:
            self.kube.event(tr.body, "Warning", "PodsStuck", message)
        tr.reported_stuck = names

    def _report_conflict(self, tr: Tracked) -> None:
        """Another autoscaler on the same Deployment: stop writing (two writers overwrite each other
        every sync) and say who, once per change."""
        if tr.conflict != tr.reported_conflict:
            if tr.conflict is not None:
                ref = tr.target
                workload = ref.describe() if ref is not None else "this Deployment"
                message = (
                    f"{tr.conflict} also scales {workload}: voxscale stopped writing replicas and only "
                    "advises; delete one of the two autoscalers, or set spec.scaling.mode: advisory to shadow it"
                )
                self.kube.event(tr.body, "Warning", "ConflictingAutoscaler", message)
            elif tr.shadowing is not None:
                message = f"advisory mode: shadowing {tr.shadowing}; voxscale writes no replicas"
                self.kube.event(tr.body, "Normal", "ShadowingAutoscaler", message)
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

    def _report_left_behind(self, tr: Tracked, left: frozenset[str]) -> None:
        """Children made while the spec had spec.model stay when it switches to spec.targetRef (owned by
        the TTSDeployment, so removed only with it): their pods may still hold GPUs. Said once per change."""
        if left and left != tr.reported_left:
            name = tr.key[1]
            kinds = ",".join(sorted(k.lower() for k in left))
            message = (
                f"spec.targetRef replaced spec.model, and the {', '.join(sorted(left))} made for spec.model "
                f"{'is' if len(left) == 1 else 'are'} still there (the operator never deletes a Deployment): remove "
                f"them with kubectl delete {kinds} -l voxscale.io/ttsdeployment={name} -n {tr.key[0]}"
            )
            self.kube.event(tr.body, "Warning", "ChildrenLeftBehind", message)
        tr.reported_left = left

    def _record_move(self, tr: Tracked, decision: Decision, before: int, now: dt.datetime) -> None:
        """Remember a move (or a change of advice) with the load it was made at, count the reversals it
        completes, and say once when the rules start or stop fighting (the Flapping condition)."""
        t = now.timestamp()
        if decision.desired != before:
            load = decision.demand.arrival_rps if decision.demand is not None else None
            moves = [m for m in tr.moves if t - m.t <= FLAPPING_HORIZON_S + REVERSAL_WINDOW_S]
            had = count_reversals(moves)
            moves.append(Move(t, decision.desired > before, load, decision.rule))
            if count_reversals(moves) > had:
                REVERSALS.labels(*tr.key).inc()
            tr.moves = moves
        state = flapping(tr.moves, t)
        if state.flapping != tr.reported_flapping:
            kind, reason = ("Warning", "Flapping") if state.flapping else ("Normal", "NotFlapping")
            self.kube.event(tr.body, kind, reason, state.message())
            tr.reported_flapping = state.flapping

    def _advise(self, tr: Tracked, decision: Decision) -> None:
        """Advisory mode: say what would be done, once per change of advice, and write nothing."""
        if decision.desired != tr.advised:
            if decision.changed:
                message = f"would scale {decision.current} -> {decision.desired}: {decision.message}"
                self.kube.event(tr.body, "Normal", "Advised", message)
            tr.advised = decision.desired

    @staticmethod
    def _export(key: Key, decision: Decision, ready: int, max_replicas: int, advisory: bool) -> None:
        """This decision's series; a series it has no value for is removed, never left at an old one
        (advice after advisory mode ended, demand after its data went)."""
        DESIRED.labels(*key).set(decision.current if advisory else decision.desired)
        WORKLOAD_REPLICAS.labels(*key).set(decision.current)
        READY.labels(*key).set(ready)
        MAX.labels(*key).set(max_replicas)
        METRICS_OK.labels(*key).set(1 if decision.metrics_available else 0)
        SPEC_INVALID.labels(*key).set(0)
        d = decision.demand
        last = d.last_forecast if d is not None else None
        _set_or_remove(ADVISED, key, decision.desired if advisory else None)
        _set_or_remove(DEMAND, key, d.arrival_rps if d is not None else None)
        _set_or_remove(CAPACITY, key, d.capacity_rps if d is not None else None)
        _set_or_remove(FORECAST, key, d.forecast_rps if d is not None else None)
        _set_or_remove(FORECAST_ACTUAL, key, last[1] if last is not None else None)

    def _write_status(
        self,
        tr: Tracked,
        decision: Decision | None,
        replicas: int,
        ready: int,
        deployment_found: bool,
        now: dt.datetime,
        pending: tuple[str, str] | None = None,
        target_problem: str | None = None,
    ) -> None:
        """Replace status with this round's (see status.build), at once when something a user, a
        controller or a new leader acts on changed; sentences with running clocks ("below 40% for
        1m10s of 5m") refresh at most every STATUS_REFRESH_SECONDS, so a steady fleet does not turn
        into one status write per object per interval, and only while the shared budget of
        STATUS_REFRESHES_PER_SECOND allows (thousands of objects: a longer refresh, not more writes)."""
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
            pending=pending,
            target=tr.target.describe() if tr.target is not None else None,
            target_problem=target_problem,
            shadowing=tr.shadowing,
            flapping=flapping(tr.moves, now.timestamp()) if decision is not None else None,
            start_phases=tr.start_phases,
            prepull=tr.prepull,
        )
        if tr.spec_error and tr.spec_error != tr.reported_error:
            self.kube.event(body, "Warning", "InvalidSpec", tr.spec_error)
        tr.reported_error = tr.spec_error
        previous = tr.status or body.get("status") or {}
        significant = {**st.significant_of(previous, seen, decision, tr.history, now), "specError": tr.spec_error}
        mono = time.monotonic()
        if significant == tr.written and (
            mono - tr.written_at < STATUS_REFRESH_SECONDS or not self._refreshes.available()
        ):
            return  # nothing to write, so the document is not built (most evaluations of a steady fleet)
        new = st.build(previous, seen, decision, tr.history, now)
        if decision is not None and isinstance(new.get("lastDecision"), dict):
            # Which metric profile fed it and what that profile approximated.
            new["lastDecision"] = {**new["lastDecision"], "signals": profiles.describe(tr.profile)}
        if significant == tr.written and (new == tr.status or not self._refreshes.take()):
            return
        if self.status_writer is not None:
            self.status_writer.put(tr.key, new)
        else:
            self.kube.replace_status(tr.key[0], tr.key[1], new)
        tr.status, tr.written, tr.written_at = new, significant, mono


def _own_workload(dep: Any) -> Workload | None:
    """A TTSDeployment's own Deployment (a kubernetes client V1Deployment) as the scaler reads it."""
    if dep is None:
        return None
    replicas = int(dep.spec.replicas if dep.spec.replicas is not None else 1)
    return Workload(replicas, int((dep.status.ready_replicas if dep.status else None) or 0), "")


_SET_SERIES: set[tuple[str, Key]] = set()  # (gauge, object) series _set_or_remove has set


def _set_or_remove(gauge: Gauge, key: Key, value: float | None) -> None:
    """Set the series, or remove it when there is no value. A series never set costs nothing to
    "remove" (prometheus_client's remove() reads the environment each call: per object per round)."""
    if value is None:
        if (gauge._name, key) in _SET_SERIES:
            _remove_series(key, (gauge,))
    else:
        gauge.labels(*key).set(value)
        _SET_SERIES.add((gauge._name, key))


def _remove_series(key: Key, gauges: Iterable[Gauge | Counter]) -> None:
    for gauge in gauges:
        _SET_SERIES.discard((gauge._name, key))
        with contextlib.suppress(KeyError):
            gauge.remove(*key)


def _export_invalid(key: Key, ready: int) -> None:
    """An invalid spec: no decision holds, so its series go (they would freeze at the last valid
    spec's values); the pods' readiness still holds, and `spec_invalid` marks the object for alerts."""
    _remove_series(key, _DECISION_GAUGES)
    READY.labels(*key).set(ready)
    SPEC_INVALID.labels(*key).set(1)


def _cold_start(policy: ScalingPolicy, history: History) -> float:
    """Seconds a pod takes to turn Ready: the learnt P90, or the spec's coldStart until there is one."""
    learnt = history.cold_start_seconds
    return learnt if learnt is not None else policy.predictive.cold_start.total_seconds()


def stuck_pods(starts: PodStarts, cold_start: float, now: dt.datetime) -> list[NotReady]:
    """The pods not Ready for longer than a pod takes to start (ImagePullBackOff, CrashLoopBackOff,
    unschedulable...): counted as capacity on its way they would freeze every threshold trigger
    ("a pod is still starting") for as long as they stay stuck. Longest stuck first."""
    stuck = [p for p in starts.not_ready if (now - p.since).total_seconds() > cold_start]
    return sorted(stuck, key=lambda p: p.since)


def stuck_note(stuck: list[NotReady], cold_start: float, now: dt.datetime) -> str:
    """The decision's words for stuck pods, naming the longest stuck and why."""
    first = stuck[0]
    others = f" and {len(stuck) - 1} more" if len(stuck) > 1 else ""
    return (
        f"pod {first.name} not Ready for {format_duration(now - first.since)} ({first.why}){others}, longer than "
        f"the {format_duration(dt.timedelta(seconds=cold_start))} cold start: not counted as capacity on its way"
    )


def deletion_costs(work: dict[str, float]) -> dict[str, int]:
    """Pod -> deletion cost: the requests it holds, in thousandths (int32, as the annotation wants)."""
    return {pod: min(round(held * 1000), 2**31 - 1) for pod, held in work.items()}

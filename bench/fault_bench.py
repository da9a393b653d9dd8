"""Fault-injection suite for the operator on the real local control plane (issue 12; figures, not a test).

    .venv/bin/python -m bench.fault_bench [--kills 50] [--only NAME,...] [--seed N] [--outage-seconds 300]

It brings up a dedicated local cluster named `fault-bench` (`--cluster NAME` another; etcd,
kube-apiserver, controller-manager, scheduler, kwok GPU nodes and Prometheus, all started by
voxscale.localcluster), installs the chart's RBAC, runs real `voxscale operator` processes and the pod
exporter (per-pod GPU series scraped by the real Prometheus), injects every fault for real, and tears it
all down at the end, also on Ctrl-C or an exception. It will not share a `fault-bench` cluster that is
already up (another run's faults would land in its figures, and its teardown would stop this run):
`--keep-cluster` reuses one and leaves it up. Progress goes to stderr, a markdown table to stdout, every
figure to bench/results/fault-bench.json and fault-bench.md (`--results DIR` elsewhere).
Operator logs stay in a temporary folder named in the output, as evidence. The exit status is 1 when a
goal was missed (a finding), 0 otherwise.

Every TTSDeployment here has a GPU threshold trigger (scale up above 75 % held for 2 s, one pod per 2 s;
scale down below 40 %, after a 10 s window, one pod per 4 s), a 2 s interval and min 1 replica. The
bench keeps the timeline of the GPU load it published and of every replica change it saw (polled every
0.1 s), and judges each change against the engine's rules ("forbidden scale events"):
  - replicas outside [min, max];
  - a step larger than one pod, or two scale-down steps closer than the 4 s period;
  - a scale-down while the published load was at or above 40 % (the load needs the pods), or less than
    the 10 s window after it fell below 40 %, or while Prometheus was down, or less than the window after
    it came back (a scale-down without a full window of data); judged leniently on any load published
    in the 1.5 s before the scale was seen (the deciding round may not have seen a newer one);
  - a scale-up when no load above 75 % was published in the 8 s before it (nothing asked for it).

Scenarios (names for --only), in the order they run, and what their figures mean:
  competing-hpa      an autoscaling/v2 HPA on the operator's Deployment, created at a random moment of
                     the round: rounds until the ScalingActive condition says ConflictingAutoscaler
                     (seconds / interval; goal <= 2), the replicas written while both would scale under
                     high load (goal 0), rounds until it scales again once the HPA is deleted.
  bad-series         NaN, +Inf, -Inf, empty, scalar, string, many-series and unparsable custom PromQL;
                     NaN and +Inf from the exporter's GPU series; the exporter scraped without
                     honorLabels (its pod label arrives as exported_pod) for a GPU and a queue trigger;
                     an exporter that serves garbage text: whether each TTSDeployment's MetricsAvailable
                     condition names the cause (goal: all), replicas held, the operator process alive,
                     and a healthy TTSDeployment next to them still scaled (it is not stuck).
  conflicts          the load drives the operator 1 -> 4 -> 1 once quietly, then again while four clients
                     rewrite the TTSDeployment, its status, the Deployment and its scale subresource in
                     read-modify-write loops, 10 a second each, every write conditional on the
                     resourceVersion read (their 409s prove the writes collided): whether every scale and
                     status write landed and how long each count took (quiet / contended), the 409s in the
                     operator's log, errors; then two clients rewrite the leader-election Lease flat out
                     for --lease-hammer-seconds: leader exits caused by a 409 on its renewal (goal 0).
  apiserver-restart  kube-apiserver stopped (SIGTERM), kept down --apiserver-down-seconds and started
                     again with the same flags while two operator replicas run (lease 15 s, the chart's):
                     seconds from the API server being ready again to the operator's first status write
                     and first scale, status fields lost across the restart (goal 0), condition transition
                     times that moved without a status change (goal 0), operator exits.
  prometheus-outage  Prometheus stopped (SIGTERM) for --outage-seconds while the load falls below 40 %:
                     scale-downs while it was down (goal 0), seconds until MetricsAvailable=False, seconds
                     until data is back after the restart, and seconds from then to the first scale-down
                     (>= the 10 s window: the engine wants a full window of data). Then a second, short
                     outage (--short-outage-seconds) that starts under high load and ends inside
                     Prometheus' 5-minute lookback, the load gone meanwhile: scale-ups after it (goal 0;
                     the samples from before the outage are stale), with what Prometheus served first.
  ha-kills           two operator replicas with leader election (lease --lease-seconds), the load cycling
                     through scale-up (90 %), hold (55 %) and scale-down (10 %, with one 4 s blip back to
                     55 % that any live leader sees) windows; the leader SIGKILLed --kills times at
                     random moments (60 %: 1-4 s after the previous takeover, kills in quick succession;
                     40 %: 10-18 s after, long enough for a leader to see a whole scale-down window), a
                     new standby started at once each time: forbidden scale events (goal 0),
                     takeover time (kill -> the first status write of the new leader; median and worst),
                     kills per load phase, operator exits nobody asked for.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.server
import json
import math
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException

from voxscale import metrics_contract as mc
from voxscale.localcluster.cluster import ClusterState, LocalCluster
from voxscale.localcluster.harness import OPERATOR_NAMESPACE, REPO, OperatorProcess, free_port, install_operator_rbac
from voxscale.localcluster.pod_exporter import PodMetricsExporter
from voxscale.operator.crd import GROUP, PLURAL, VERSION

CLUSTER = "fault-bench"
RESULTS = REPO / "bench" / "results"
SCENARIOS = ("competing-hpa", "bad-series", "conflicts", "apiserver-restart", "prometheus-outage", "ha-kills")
INTERVAL = 2.0  # spec.scaling.interval of every TTSDeployment here, seconds
UP_ABOVE, DOWN_BELOW = 75.0, 40.0  # the GPU trigger's thresholds, percent
HIGH, HOLD, LOW = 90.0, 55.0, 10.0  # loads above, between and below them
SUSTAIN = 2.0  # sustainFor of the scale-up threshold, seconds
DOWN_WINDOW, DOWN_PERIOD = 10.0, 4.0  # scale-down stabilization window and step period, seconds
UP_LAG = 8.0  # a published load reaches a decision within scrape (1 s) + interval + sustain + API time
PERIOD_SLACK = 0.5  # two writes seen by a 0.1 s poller can look this much closer than they were decided
# A load published less than this before a scale was seen cannot have reached the round that decided it
# (the next 1 s scrape, the round's queries, the write, the 0.1 s poller): judged on the load before.
VISIBLE = 1.5
POLL = 0.1
T = TypeVar("T")
START = time.monotonic()
TRANSIENT = (ApiException, urllib3.exceptions.HTTPError, OSError, ValueError, KeyError)


class BenchError(RuntimeError):
    """A scenario could not set itself up (not a fault outcome): recorded, and the next scenario runs."""


def say(msg: str) -> None:
    print(f"[fault-bench {time.monotonic() - START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def since_start(mono: float) -> float:
    return round(mono - START, 2)


def poll(check: Callable[[], T | None], timeout: float, interval: float = POLL) -> T | None:
    """check() until it returns something truthy; None on timeout. A fault's outcome is a figure, not a
    crash, and a read that fails while the fault lasts (API server down) counts as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(*TRANSIENT):
            got = check()
            if got:
                return got
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def timed(check: Callable[[], Any], timeout: float, since: float | None = None) -> float | None:
    """Seconds from `since` (default: now) until check() holds; None if it never did within `timeout`."""
    t0 = time.monotonic() if since is None else since
    return None if poll(check, timeout) is None else round(time.monotonic() - t0, 2)


def r2(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


# ------------------------------------------------------------------------------------------ manifests
def gpu_trigger() -> dict[str, Any]:
    return {
        "name": "gpu",
        "type": "gpuUtilization",
        "scaleUpAbove": UP_ABOVE,
        "sustainFor": f"{SUSTAIN:g}s",
        "scaleDownBelow": DOWN_BELOW,
    }


def ttsd(name: str, triggers: list[dict[str, Any]], max_replicas: int = 4) -> dict[str, Any]:
    """A TTSDeployment with fast, one-pod steps, so that faults meet many decisions in a short run."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TTSDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"image": "ghcr.io/voxscale/inference:0.1.0"},
            "replicas": {"min": 1, "max": max_replicas},
            "scaling": {
                "interval": f"{INTERVAL:g}s",
                "triggers": triggers,
                "scaleUp": {"maxStepPods": 1, "maxStepPercent": 1, "period": f"{INTERVAL:g}s"},
                "scaleDown": {
                    "stabilizationWindow": f"{DOWN_WINDOW:g}s",
                    "maxStepPods": 1,
                    "maxStepPercent": 1,
                    "period": f"{DOWN_PERIOD:g}s",
                    "cooldown": "0s",
                },
                "prometheus": {"timeout": "1s"},
            },
        },
    }


def custom_trigger(query: str) -> dict[str, Any]:
    return {"name": "c", "type": "promql", "query": query, "target": 10}


# ------------------------------------------------------------------------------------------ API access
def _raw(response: Any) -> Any:
    """A list read without the client's model parsing (ten times cheaper: the poller runs 10x a second)."""
    return json.loads(response.data)


class Api:
    """The bench's own admin client: reads, and the writes it injects (never the operator's credentials)."""

    def __init__(self, kubeconfig: Path) -> None:
        self.client = k8s_config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        self.apps: Any = k8s.AppsV1Api(self.client)
        self.core: Any = k8s.CoreV1Api(self.client)
        self.custom: Any = k8s.CustomObjectsApi(self.client)
        self.coord: Any = k8s.CoordinationV1Api(self.client)
        self.autoscaling: Any = k8s.AutoscalingV2Api(self.client)

    def ttsd(self, ns: str, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, name, _request_timeout=5
        )
        return obj

    def status(self, ns: str, name: str) -> dict[str, Any]:
        return dict(self.ttsd(ns, name).get("status") or {})

    def condition(self, ns: str, name: str, kind: str) -> dict[str, Any]:
        conds = self.status(ns, name).get("conditions", [])
        return next((dict(c) for c in conds if c.get("type") == kind), {})

    def replicas(self, ns: str, name: str) -> int:
        dep = _raw(self.apps.read_namespaced_deployment(name, ns, _preload_content=False, _request_timeout=5))
        return int(dep["spec"].get("replicas", 1))

    def holder(self, lease: str) -> str | None:
        spec = self.coord.read_namespaced_lease(lease, OPERATOR_NAMESPACE, _request_timeout=5).spec
        return str(spec.holder_identity) if spec and spec.holder_identity else None

    def events(self, ns: str, name: str, reason: str) -> list[dict[str, Any]]:
        selector = f"involvedObject.name={name},reason={reason}"
        listed = self.core.list_namespaced_event(ns, field_selector=selector, _preload_content=False)
        return list(_raw(listed)["items"])


# ------------------------------------------------------------------------------------------ recording
@dataclass(frozen=True)
class Change:
    at: float  # monotonic time the poller saw it
    name: str
    old: int
    new: int


@dataclass(frozen=True)
class Write:
    at: float  # monotonic time the poller saw it
    name: str
    observed: float | None  # status.engine.observedAt (epoch): when the round that wrote it decided
    status: dict[str, Any]


def observed_at(status: dict[str, Any]) -> float | None:
    raw = (status.get("engine") or {}).get("observedAt")
    return dt.datetime.fromisoformat(raw).timestamp() if raw else None


class Recorder:
    """Polls a namespace's Deployments and TTSDeployments every 0.1 s with its own client, keeping every
    replica change and status write with the time it became visible: the ground truth the rules are
    judged on, independent of what the operator says about itself."""

    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        api = k8s_config.new_client_from_config(config_file=str(kubeconfig))  # type: ignore[no-untyped-call]
        self.apps: Any = k8s.AppsV1Api(api)
        self.custom: Any = k8s.CustomObjectsApi(api)
        self.ns = namespace
        self.changes: list[Change] = []
        self.writes: list[Write] = []
        self._replicas: dict[str, int] = {}
        self._status: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"recorder-{namespace}", daemon=True)

    def start(self) -> Recorder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(POLL):
            with contextlib.suppress(*TRANSIENT):
                self._once()

    def _once(self) -> None:
        deps = _raw(self.apps.list_namespaced_deployment(self.ns, _preload_content=False, _request_timeout=3))
        objs = _raw(
            self.custom.list_namespaced_custom_object(
                GROUP, VERSION, self.ns, PLURAL, _preload_content=False, _request_timeout=3
            )
        )
        now = time.monotonic()
        with self._lock:
            for d in deps["items"]:
                name, n = d["metadata"]["name"], int(d["spec"].get("replicas", 1))
                old = self._replicas.get(name)
                if old is not None and old != n:
                    self.changes.append(Change(now, name, old, n))
                self._replicas[name] = n
            for o in objs["items"]:
                name, status = o["metadata"]["name"], o.get("status") or {}
                key = json.dumps(status, sort_keys=True)
                if self._status.get(name) != key:
                    self._status[name] = key
                    self.writes.append(Write(now, name, observed_at(status), status))

    def changes_of(self, name: str) -> list[Change]:
        with self._lock:
            return [c for c in self.changes if c.name == name]

    def first_write(self, name: str, decided_after: float) -> Write | None:
        """The first status write whose round decided after `decided_after` (epoch): after a kill, only a
        live replica can have written it."""
        with self._lock:
            return next(
                (w for w in self.writes if w.name == name and w.observed is not None and w.observed > decided_after),
                None,
            )


def as_seen(thing: Change | Outage) -> dict[str, Any]:
    """A record for the JSON, its monotonic instants as seconds since the bench started."""
    instants = {"at", "stopped", "restarted", "ready"}
    return {k: since_start(v) if k in instants else v for k, v in thing.__dict__.items()}


class Loads:
    """Every GPU load published per TTSDeployment, with when: the rules are judged against this timeline."""

    def __init__(self, exporter: PodMetricsExporter) -> None:
        self.exporter = exporter
        self.timeline: dict[tuple[str, str], list[tuple[float, float | None]]] = {}

    def set(self, ns: str, name: str, gpu: float | None, **extra: Any) -> None:
        self.exporter.set(ns, name, gpu=gpu, **extra)
        self.timeline.setdefault((ns, name), []).append((time.monotonic(), gpu))

    def forget(self, ns: str) -> None:
        """Stop publishing (and listing pods) for a finished scenario's namespace."""
        for key in [k for k in self.exporter.loads if k[0] == ns]:
            self.exporter.loads.pop(key, None)


# ------------------------------------------------------------------------------------------ the rules
@dataclass(frozen=True)
class Violation:
    at: float  # seconds since the bench started
    kind: str
    detail: str


def value_at(timeline: list[tuple[float, float | None]], t: float) -> float | None:
    current = None
    for at, v in timeline:
        if at > t:
            break
        current = v
    return current


def low_since(timeline: list[tuple[float, float | None]], t: float) -> float | None:
    """When the published load fell below scaleDownBelow and stayed there until t (None: not below at t)."""
    since = None
    for at, v in timeline:
        if at > t:
            break
        below = v is not None and v < DOWN_BELOW
        since = (since if since is not None else at) if below else None
    return since


def earliest_low_since(timeline: list[tuple[float, float | None]], t: float) -> float | None:
    """The most lenient reading of what the round behind a scale seen at t could know: of the loads
    published over [t - VISIBLE, t], the low ones, and the earliest start of their low streaks (None: the
    load was at or above scaleDownBelow all that time)."""
    instants = [t - VISIBLE] + [at for at, _ in timeline if t - VISIBLE < at <= t]
    starts = [low_since(timeline, i) for i in instants]
    found = [s for s in starts if s is not None]
    return min(found) if found else None


def peak_between(timeline: list[tuple[float, float | None]], a: float, b: float) -> float | None:
    """The highest load published at any moment of [a, b]."""
    values = [value_at(timeline, a)] + [v for at, v in timeline if a < at <= b]
    finite = [v for v in values if v is not None]
    return max(finite) if finite else None


def judge(
    changes: list[Change],
    timeline: list[tuple[float, float | None]],
    max_replicas: int,
    blind: list[tuple[float, float]] | None = None,
) -> list[Violation]:
    """Every replica change the engine's rules forbid, given what the load was (see the module docstring)."""
    out: list[Violation] = []
    last_down: float | None = None
    for c in changes:
        if not 1 <= c.new <= max_replicas:
            out.append(Violation(since_start(c.at), "out-of-bounds", f"{c.old} -> {c.new} outside [1, {max_replicas}]"))
        if abs(c.new - c.old) > 1:
            out.append(Violation(since_start(c.at), "step-too-large", f"{c.old} -> {c.new} (maxStepPods 1)"))
        if c.new < c.old:
            out += _judge_down(c, timeline, blind or [], last_down)
            last_down = c.at
        else:
            out += _judge_up(c, timeline)
    return out


def _judge_down(
    c: Change, timeline: list[tuple[float, float | None]], blind: list[tuple[float, float]], last_down: float | None
) -> list[Violation]:
    out: list[Violation] = []
    at = since_start(c.at)
    if last_down is not None and c.at - last_down < DOWN_PERIOD - PERIOD_SLACK:
        out.append(Violation(at, "period", f"{c.old} -> {c.new} {c.at - last_down:.1f}s after the previous step"))
    since = earliest_low_since(timeline, c.at)
    if since is None:
        load = value_at(timeline, c.at)
        out.append(Violation(at, "load-needs-more", f"{c.old} -> {c.new} while the load was {load}% (>= 40%)"))
    elif c.at - since < DOWN_WINDOW:
        out.append(Violation(at, "inside-window", f"{c.old} -> {c.new} {c.at - since:.1f}s after the load fell"))
    for a, b in blind:
        if a <= c.at <= b:
            out.append(Violation(at, "without-data", f"{c.old} -> {c.new} while Prometheus was down"))
        elif b < c.at < b + DOWN_WINDOW:
            out.append(Violation(at, "without-data", f"{c.old} -> {c.new} {c.at - b:.1f}s after data came back"))
    return out


def _judge_up(c: Change, timeline: list[tuple[float, float | None]]) -> list[Violation]:
    peak = peak_between(timeline, c.at - UP_LAG, c.at)
    if peak is None or peak <= UP_ABOVE:
        return [Violation(since_start(c.at), "unasked-up", f"{c.old} -> {c.new}; load peaked at {peak}% in {UP_LAG}s")]
    return []


# ------------------------------------------------------------------------------------------ operators
LOG_MARKS = {
    "tracebacks": "Traceback (most recent call last)",
    "error_lines": "[ERROR",
    "round_failures": "scaling round failed",
    "http_409_retries": "HTTP 409",
}


class Fleet:
    """The operator replicas of one scenario, supervised as their Deployment would be: one that exits on
    its own is recorded and replaced (the kubelet restarts it); one the bench kills is replaced by a new
    standby. Each replica watches only the scenario's namespace and has its own Lease."""

    def __init__(self, bench: Bench, ns: str, size: int, lease_seconds: int) -> None:
        self.bench, self.ns, self.size, self.lease_seconds = bench, ns, size, lease_seconds
        # A namespace-scoped install of the chart's RBAC per scenario: its Lease is named after the release.
        self.lease = f"voxscale-{ns}"
        self.kubeconfig = install_operator_rbac(bench.cluster, self.lease, watch_namespaces=[ns])
        self.procs: list[OperatorProcess] = []
        self.every: list[OperatorProcess] = []  # all ever started, for the log counts
        self.killed: set[str] = set()
        self.exits: list[dict[str, Any]] = []

    def spawn(self) -> OperatorProcess:
        op = OperatorProcess(
            self.kubeconfig,
            self.bench.state.prometheus_url,
            self.lease,
            identity=f"{self.ns}-op{len(self.every) + 1}",
            namespaces=[self.ns],
            lease_seconds=self.lease_seconds,
        )
        op.start(self.bench.log_dir)
        self.procs.append(op)
        self.every.append(op)
        return op

    def start(self) -> Fleet:
        first = self.spawn()
        first.wait_leader(timeout=120)
        for _ in range(self.size - 1):
            self.wait_standby(self.spawn())
        return self

    @staticmethod
    def wait_standby(op: OperatorProcess) -> None:
        if not poll(lambda: "standing by" in op.log(), 90):
            raise BenchError(f"standby {op.identity} never stood by:\n{op.log()[-2000:]}")

    def leader(self) -> OperatorProcess | None:
        holder = poll(lambda: self.bench.api.holder(self.lease), 5)
        return next((p for p in self.procs if p.identity == holder and p.proc and p.proc.poll() is None), None)

    def kill(self, op: OperatorProcess) -> None:
        """SIGKILL the process group: no chance to release the Lease or finish a write."""
        self.killed.add(op.identity)
        op.kill()
        self.procs.remove(op)

    def reap(self) -> list[dict[str, Any]]:
        """Record and replace replicas that exited although nobody killed them."""
        gone = [p for p in self.procs if p.proc is not None and p.proc.poll() is not None]
        found = []
        for p in gone:
            self.procs.remove(p)
            last = [ln for ln in p.log().splitlines() if ln.strip()][-3:]
            assert p.proc is not None
            found.append(
                {"identity": p.identity, "rc": p.proc.returncode, "at": since_start(time.monotonic()), "log": last}
            )
            self.spawn()
        self.exits += found
        return found

    def alive(self) -> bool:
        return any(p.proc is not None and p.proc.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in list(self.procs):
            p.kill()
        self.procs.clear()

    def log_counts(self) -> dict[str, int]:
        logs = "\n".join(p.log() for p in self.every)
        counts = {k: logs.count(v) for k, v in LOG_MARKS.items()}
        counts["evaluation_failures"] = sum(1 for ln in logs.splitlines() if "evaluating" in ln and "failed" in ln)
        return counts

    def log_lines(self, needle: str, limit: int = 5) -> list[str]:
        lines = [ln for p in self.every for ln in p.log().splitlines() if needle in ln]
        return lines[:limit]


@dataclass
class Outcome:
    """One scenario's figures: table rows, every number in `figures`, and findings in plain words."""

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    findings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    def row(self, figure: str, value: Any, goal: str = "", ok: bool | None = None) -> None:
        self.rows.append({"scenario": self.name, "figure": figure, "value": value, "goal": goal, "ok": ok})


@dataclass
class Bench:
    cluster: LocalCluster
    state: ClusterState
    api: Api
    loads: Loads
    log_dir: Path
    rng: random.Random
    args: argparse.Namespace
    fleets: list[Fleet] = field(default_factory=list)
    recorders: list[Recorder] = field(default_factory=list)
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def namespace(self, prefix: str) -> str:
        ns = f"fb-{prefix}-{uuid.uuid4().hex[:4]}"
        self.cluster.kubectl("create", "namespace", ns)
        return ns

    def fleet(self, ns: str, size: int = 1, lease_seconds: int = 15) -> Fleet:
        fleet = Fleet(self, ns, size, lease_seconds)
        self.fleets.append(fleet)
        return fleet.start()

    def recorder(self, ns: str) -> Recorder:
        rec = Recorder(self.state.kubeconfig, ns).start()
        self.recorders.append(rec)
        return rec

    def apply(self, ns: str, obj: dict[str, Any]) -> None:
        self.cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))

    def settle(self, ns: str, name: str, replicas: int | None = None, timeout: float = 90) -> None:
        """Wait until the operator evaluated `name` with data (and, if given, holds it at `replicas`)."""

        def done() -> bool:
            ok = self.api.condition(ns, name, "MetricsAvailable").get("status") == "True"
            return ok and (replicas is None or self.api.replicas(ns, name) == replicas)

        if not poll(done, timeout):
            raise BenchError(f"{ns}/{name} never settled (replicas {replicas}): {self.api.status(ns, name)}")

    def reach(self, ns: str, name: str, replicas: int, timeout: float) -> float | None:
        """Seconds until the Deployment and the status both say `replicas` (None: never)."""

        def there() -> bool:
            st = self.api.status(ns, name)
            return self.api.replicas(ns, name) == replicas == st.get("desiredReplicas") == st.get("replicas")

        return timed(there, timeout)

    def finish(self, ns: str) -> None:
        """A scenario's namespace goes, and the exporter stops publishing for it."""
        self.loads.forget(ns)
        self.cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


# ------------------------------------------------------------------------------------------ 6. competing HPA
def hpa_manifest(target: str) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": f"{target}-hpa"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": target},
            "minReplicas": 1,
            "maxReplicas": 3,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}},
                }
            ],
        },
    }


def competing_hpa(b: Bench, out: Outcome) -> None:
    """An HPA on the same Deployment, created at a random moment of the round: detected how fast, and
    does voxscale stop writing replicas while it is there?"""
    ns = b.namespace("hpa")
    b.fleet(ns)
    b.apply(ns, ttsd("rival", [gpu_trigger()], max_replicas=3))
    b.loads.set(ns, "rival", HOLD)
    b.settle(ns, "rival", 1)

    def reason() -> str:
        return str(b.api.condition(ns, "rival", "ScalingActive").get("reason"))

    detect: list[float | None] = []
    resolve: list[float | None] = []
    fought: dict[str, Any] = {}
    for trial in range(b.args.hpa_trials):
        time.sleep(b.rng.uniform(0, INTERVAL))
        b.api.autoscaling.create_namespaced_horizontal_pod_autoscaler(ns, hpa_manifest("rival"))
        detect.append(timed(lambda: reason() == "ConflictingAutoscaler", 30))
        if trial == 0:
            fought = not_fought(b, ns, "rival")
        b.api.autoscaling.delete_namespaced_horizontal_pod_autoscaler("rival-hpa", ns)
        resolve.append(timed(lambda: reason() == "Evaluating", 30))
        say(f"competing-hpa: trial {trial + 1}: detected after {detect[-1]}s, resolved after {resolve[-1]}s")
    rounds = [None if s is None else round(s / INTERVAL, 2) for s in detect]
    worst = None if None in rounds else max(r for r in rounds if r is not None)
    events = len(b.api.events(ns, "rival", "ConflictingAutoscaler"))
    out.figures |= {
        "detection_seconds": detect,
        "detection_rounds": rounds,
        "resolution_seconds": resolve,
        "conflict_events": events,
        **fought,
    }
    out.row("trials (HPA created at a random moment of the round)", len(detect))
    out.row("rounds to ConflictingAutoscaler, worst", worst, "<= 2", worst is not None and worst <= 2)
    ok_rounds = [r for r in rounds if r is not None]
    out.row("rounds to ConflictingAutoscaler, median", r2(statistics.median(ok_rounds)) if ok_rounds else None)
    out.row("ConflictingAutoscaler Events", events, f"= {len(detect)}", events == len(detect))
    out.row(
        "replicas written while the HPA was there (load high)",
        fought["writes_during_conflict"],
        "0",
        fought["writes_during_conflict"] == 0,
    )
    ok_resolve = [s for s in resolve if s is not None]
    out.row(
        "rounds to scaling again once the HPA was deleted, worst",
        r2(max(ok_resolve) / INTERVAL) if len(ok_resolve) == len(resolve) else None,
    )
    if worst is None or worst > 2:
        out.findings.append(f"competing HPA detected after {rounds} rounds (goal <= 2)")
    b.finish(ns)


def not_fought(b: Bench, ns: str, name: str) -> dict[str, Any]:
    """High load for four rounds while the HPA is there: voxscale must advise, not write replicas."""
    before = b.api.replicas(ns, name)
    b.loads.set(ns, name, HIGH)
    deadline = time.monotonic() + SUSTAIN + 4 * INTERVAL
    writes, advised = 0, None
    while time.monotonic() < deadline:
        with contextlib.suppress(*TRANSIENT):
            writes = max(writes, abs(b.api.replicas(ns, name) - before))
            advised = b.api.status(ns, name).get("advisedReplicas", advised)
        time.sleep(0.2)
    b.loads.set(ns, name, HOLD)
    time.sleep(3)  # Prometheus has the lower load before the HPA goes and voxscale may write again
    return {"writes_during_conflict": writes, "advised_during_conflict": advised, "replicas_during_conflict": before}


# ------------------------------------------------------------------------------------------ 4. bad series
@dataclass(frozen=True)
class BadCase:
    name: str
    trigger: dict[str, Any]
    says: tuple[str, ...]  # any of these in the MetricsAvailable message names the cause
    gpu: float | None = None  # what the pod exporter publishes for its pods (None: nothing)
    source: str = "main"  # main exporter, "relabel" (no honorLabels) or "garbage" (unparsable text)
    expect_data: bool = False
    # PromQL ($ns: the namespace) whose answer shows what Prometheus really holds: evidence for the report.
    evidence: str | None = None


QUEUE = {"name": "queue", "type": "queueLength", "target": 5}
BAD_CASES = (
    BadCase("nan", custom_trigger("vector(0) / 0"), ("NaN",)),
    BadCase("inf", custom_trigger("vector(1) / 0"), ("+Inf",)),
    BadCase("neg-inf", custom_trigger("vector(-1) / 0"), ("-Inf",)),
    BadCase("empty", custom_trigger("absent(vector(1))"), ("empty result",)),
    BadCase(
        "many-series",
        custom_trigger('label_replace(vector(1), "x", "a", "", "") or label_replace(vector(2), "x", "b", "", "")'),
        ("2 series",),
    ),
    # A scalar is one number (scalar(sum(...)) is a fair query); a NaN one is still no data.
    BadCase("scalar-nan", custom_trigger("scalar(vector(0) / 0)"), ("NaN",)),
    BadCase("string", custom_trigger('"fast"'), ("string",)),
    BadCase("syntax-error", custom_trigger("sum("), ("parse error",)),
    BadCase(
        "exporter-nan",
        gpu_trigger(),
        ("NaN",),
        gpu=math.nan,
        evidence='DCGM_FI_DEV_GPU_UTIL{namespace="$ns", pod=~"exporter-nan-.+"}',
    ),
    BadCase(
        "exporter-inf",
        gpu_trigger(),
        ("+Inf", "Inf"),
        gpu=math.inf,
        evidence='DCGM_FI_DEV_GPU_UTIL{namespace="$ns", pod=~"exporter-inf-.+"}',
    ),
    BadCase("exported-pod-gpu", gpu_trigger(), (), gpu=HOLD, source="relabel", expect_data=True),
    BadCase(
        "exported-pod-queue",
        QUEUE,
        ("exported_pod", "honorLabels"),
        source="relabel",
        evidence=f'{mc.QUEUE_DEPTH.name}{{exported_namespace="$ns"}}',
    ),
    BadCase(
        "garbage-text",
        gpu_trigger(),
        ("could not be scraped", "unparsable", "scrape"),
        source="garbage",
        evidence='up{job="fb-garbage-$ns"}',
    ),
)


class GarbageExporter:
    """An exporter whose /metrics is not the exposition format: Prometheus fails the scrape (up 0)."""

    def __init__(self, pods: Callable[[], list[str]], ns: str) -> None:
        def body() -> bytes:
            lines = [f'DCGM_FI_DEV_GPU_UTIL{{gpu="0",pod="{p}",namespace="{ns}"}} fast' for p in pods()]
            return ("# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n" + "\n".join(lines) + "\n").encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = body()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.port = free_port()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()


def bad_series(b: Bench, out: Outcome) -> None:
    """Each bad answer on its own TTSDeployment next to a healthy one: no crash, no scale, the cause said."""
    ns = b.namespace("bad")
    fleet = b.fleet(ns)
    relabel = relabelled_exporter(b, ns)
    garbage = GarbageExporter(lambda: [p for p, _ in b.loads.exporter.pods(ns, "garbage-text")], ns)
    b.cleanups.append(garbage.stop)
    job = f"fb-garbage-{ns}"
    b.cluster.set_scrape_targets(job, [f"127.0.0.1:{garbage.port}"])
    b.cleanups.append(lambda: b.cluster.remove_scrape_targets(job))
    b.apply(ns, ttsd("control", [gpu_trigger()], max_replicas=2))
    b.loads.set(ns, "control", HOLD)
    for case in BAD_CASES:
        b.apply(ns, ttsd(case.name, [case.trigger], max_replicas=3))
        if case.source == "relabel":
            relabel.set(ns, case.name, gpu=case.gpu, queue_per_pod=2.0)
        elif case.source == "garbage" or case.trigger["type"] == "gpuUtilization":
            b.loads.set(ns, case.name, case.gpu)  # also makes the exporter list the pods (garbage-text)
    b.settle(ns, "control", 1)
    seen = watch_conditions(b, ns, BAD_CASES, timeout=45)
    b.loads.set(ns, "control", HIGH)
    scaled = timed(lambda: b.api.replicas(ns, "control") == 2, 40)
    b.loads.set(ns, "control", HOLD)
    held = {c.name: b.api.replicas(ns, c.name) for c in BAD_CASES}
    out.figures["evidence"] = {c.name: prom_query(b, c.evidence.replace("$ns", ns)) for c in BAD_CASES if c.evidence}
    report_bad_series(out, seen, held, scaled, fleet)
    b.finish(ns)


def relabelled_exporter(b: Bench, ns: str) -> PodMetricsExporter:
    """A second pod exporter scraped as a ServiceMonitor does by default (honorLabels false, the exporter
    pod's own pod/namespace as target labels): its pod and namespace labels arrive as exported_*."""
    job = f"fb-relabel-{ns}"
    exp = PodMetricsExporter(b.cluster, b.state).start(job=job)
    path = b.state.scrape_targets_dir / f"{job}.json"
    target = json.loads(path.read_text())[0]["targets"][0]
    b.cluster.remove_scrape_targets(job)
    b.cluster.set_scrape_targets(
        job, [target], {"pod": "dcgm-exporter-x7k2p", "namespace": "gpu-operator"}, honor_labels=False
    )
    b.cleanups.append(exp.stop)
    return exp


def watch_conditions(b: Bench, ns: str, cases: tuple[BadCase, ...], timeout: float) -> dict[str, dict[str, Any]]:
    """Each case's MetricsAvailable condition once it shows what the case expects, or as it stands at the
    deadline (a message can start as "no data" before the pods and their series exist)."""
    seen: dict[str, dict[str, Any]] = {}
    pending = {c.name: c for c in cases}
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for name, case in list(pending.items()):
            with contextlib.suppress(*TRANSIENT):
                cond = b.api.condition(ns, name, "MetricsAvailable")
                seen[name] = cond
                if _as_expected(case, cond):
                    pending.pop(name)
        time.sleep(0.5)
    return seen


def _as_expected(case: BadCase, cond: dict[str, Any]) -> bool:
    if case.expect_data:
        return cond.get("status") == "True"
    message = str(cond.get("message", ""))
    return cond.get("status") == "False" and any(word in message for word in case.says)


def report_bad_series(
    out: Outcome, seen: dict[str, dict[str, Any]], held: dict[str, int], scaled: float | None, fleet: Fleet
) -> None:
    named = 0
    for case in BAD_CASES:
        cond = seen.get(case.name, {})
        ok = _as_expected(case, cond)
        named += ok
        goal = "MetricsAvailable=True (read)" if case.expect_data else f"False, names {' / '.join(case.says)}"
        msg = str(cond.get("message", ""))
        out.row(f"{case.name}: condition", f"{cond.get('status')}: {msg[:160]}", goal, ok)
        out.figures[case.name] = {"condition": cond, "replicas": held[case.name], "as_expected": ok}
        if not ok:
            out.findings.append(
                f"bad-series {case.name}: MetricsAvailable={cond.get('status')} {msg!r}; expected {goal}"
            )
    moved = {n: r for n, r in held.items() if r != 1}
    counts = fleet.log_counts()
    out.figures |= {
        "named": named,
        "cases": len(BAD_CASES),
        "moved": moved,
        "control_scaled_after": scaled,
        "log": counts,
    }
    out.row("cases whose condition names the cause", f"{named}/{len(BAD_CASES)}", "all", named == len(BAD_CASES))
    out.row("bad TTSDeployments scaled away from 1", len(moved), "0", not moved)
    out.row(
        "operator alive; healthy neighbour scaled 1 -> 2 after (s)",
        f"{fleet.alive()}; {scaled}",
        "True; < 15",
        fleet.alive() and scaled is not None and scaled < 15,
    )
    out.row(
        "tracebacks / failed evaluations in the operator log",
        f"{counts['tracebacks']} / {counts['evaluation_failures']}",
        "0 / 0",
        counts["tracebacks"] == 0 and counts["evaluation_failures"] == 0,
    )


# ------------------------------------------------------------------------------------------ 5. 409 conflicts
@dataclass
class Hammer:
    """A client rewriting one object in a tight read-modify-write loop (10 a second: five per operator
    round); every write carries the resourceVersion it read, so a 409 means another writer (the operator,
    a controller, another hammer) got in between."""

    what: str
    step: Callable[[int], None]
    period: float = 0.1
    ok: int = 0
    conflicts: int = 0
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Hammer:
        self._thread = threading.Thread(target=self._loop, name=f"hammer-{self.what}", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        n = 0
        while not self._stop.wait(self.period):
            n += 1
            try:
                self.step(n)
                self.ok += 1
            except ApiException as exc:
                if exc.status == 409:
                    self.conflicts += 1
                else:
                    self.errors += 1
            except TRANSIENT:
                self.errors += 1

    def stop(self) -> dict[str, int]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return {"writes": self.ok, "409s": self.conflicts, "other_errors": self.errors}


def guarded(rv: str, n: int) -> dict[str, Any]:
    """A merge patch that changes a label only if the object is still at `rv`: the API server answers 409
    when another writer got in between. A label, not an annotation: a Deployment's generation moves with
    its annotations, and a generation moving 10 times a second keeps the deployment controller from ever
    catching up (then no pod is created for the operator's scale). Raw dicts, no typed-model round trip."""
    return {"metadata": {"resourceVersion": rv, "labels": {"fault-bench-n": str(n)}}}


def hammers(b: Bench, ns: str, name: str) -> list[Hammer]:
    """One hammer per object the operator writes: the TTSDeployment, its status, the Deployment, its scale."""
    api = Api(b.state.kubeconfig)  # its own connection pool: the hammers must not queue behind the poller
    crd = (GROUP, VERSION, ns, PLURAL, name)

    def ttsd_meta(n: int) -> None:
        rv = api.ttsd(ns, name)["metadata"]["resourceVersion"]
        api.custom.patch_namespaced_custom_object(*crd, guarded(rv, n), _request_timeout=5)

    def ttsd_status(n: int) -> None:
        obj = api.custom.get_namespaced_custom_object_status(*crd, _request_timeout=5)
        body = {"metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]}, "status": obj.get("status", {})}
        api.custom.patch_namespaced_custom_object_status(*crd, body, _request_timeout=5)

    def dep_meta(n: int) -> None:
        dep = _raw(api.apps.read_namespaced_deployment(name, ns, _preload_content=False, _request_timeout=5))
        api.apps.patch_namespaced_deployment(
            name, ns, guarded(dep["metadata"]["resourceVersion"], n), _request_timeout=5
        )

    def dep_scale(n: int) -> None:
        scale = _raw(api.apps.read_namespaced_deployment_scale(name, ns, _preload_content=False, _request_timeout=5))
        body = {
            "metadata": {"resourceVersion": scale["metadata"]["resourceVersion"]},
            "spec": {"replicas": scale["spec"].get("replicas", 0)},  # the count it read: no manual scale
        }
        api.apps.patch_namespaced_deployment_scale(name, ns, body, _request_timeout=5)

    steps = {"TTSDeployment": ttsd_meta, "status": ttsd_status, "Deployment": dep_meta, "scale": dep_scale}
    return [Hammer(what, step).start() for what, step in steps.items()]


def up_and_down(b: Bench, ns: str, name: str) -> tuple[float | None, float | None]:
    """Drive 1 -> 4 -> 1 with the load: seconds until the Deployment and the status say 4, then 1."""
    b.loads.set(ns, name, HIGH)
    up = b.reach(ns, name, 4, 120)
    b.loads.set(ns, name, LOW)
    down = b.reach(ns, name, 1, 90)
    return up, down


def conflicts(b: Bench, out: Outcome) -> None:
    """Writers racing the operator on every object it writes: do its scale and status writes land?"""
    ns = b.namespace("409")
    fleet = b.fleet(ns)
    b.apply(ns, ttsd("contended", [gpu_trigger()], max_replicas=4))
    b.loads.set(ns, "contended", HOLD)
    b.settle(ns, "contended", 1)
    base_up, base_down = up_and_down(b, ns, "contended")  # the same cycle without contention, to compare
    say(f"conflicts: without contention 1 -> 4 in {base_up}s, 4 -> 1 in {base_down}s")
    running = hammers(b, ns, "contended")
    up, down = up_and_down(b, ns, "contended")
    hammered = {h.what: h.stop() for h in running}
    say(f"conflicts: under contention 1 -> 4 in {up}s, 4 -> 1 in {down}s; hammers {hammered}")
    counts = fleet.log_counts()
    total_409 = sum(h["409s"] for h in hammered.values())
    out.figures |= {
        "hammers": hammered,
        "baseline_seconds": {"up": base_up, "down": base_down},
        "contended_seconds": {"up": up, "down": down},
        "log": counts,
    }
    out.row(
        "hammer writes landed / refused with 409 (proof the writes collided)",
        f"{sum(h['writes'] for h in hammered.values())} / {total_409}",
        "409s > 0",
        total_409 > 0,
    )
    out.row("1 -> 4 in Deployment and status: quiet / contended (s)", f"{base_up} / {up}", "reached", up is not None)
    out.row(
        "4 -> 1 in Deployment and status: quiet / contended (s)", f"{base_down} / {down}", "reached", down is not None
    )
    out.row("409s the operator met and retried (log)", counts["http_409_retries"])
    failed = counts["round_failures"] + counts["evaluation_failures"]
    out.row(
        "operator alive / tracebacks / failed rounds",
        f"{fleet.alive()} / {counts['tracebacks']} / {failed}",
        "True / 0 / 0",
        fleet.alive() and counts["tracebacks"] == 0 and failed == 0,
    )
    if up is None or down is None:
        out.findings.append(f"under write contention the operator did not reach 4 ({up}) or 1 ({down})")
    lease_conflicts(b, out, fleet)
    b.finish(ns)


def lease_conflicts(b: Bench, out: Outcome, fleet: Fleet) -> None:
    """The one write of the operator that carries a resourceVersion is the Lease renewal: a client that
    rewrites the Lease (a label or an annotation) makes some renewals meet a 409."""
    api = Api(b.state.kubeconfig)

    def touch(n: int) -> None:
        read = api.coord.read_namespaced_lease(fleet.lease, OPERATOR_NAMESPACE, _preload_content=False)
        rv = _raw(read)["metadata"]["resourceVersion"]
        api.coord.patch_namespaced_lease(fleet.lease, OPERATOR_NAMESPACE, guarded(rv, n), _request_timeout=5)

    # Flat out: a renewal reads and writes within milliseconds, so only a dense stream of writes meets one.
    pair = [Hammer("Lease", touch, period=0.0).start() for _ in range(2)]
    deadline = time.monotonic() + b.args.lease_hammer_seconds
    exits: list[dict[str, Any]] = []
    leaderless = 0.0
    while time.monotonic() < deadline:
        for gone in fleet.reap():  # was it really taken over? The Lease says who holds it right after.
            gone["holder_after_exit"] = poll(lambda: api.holder(fleet.lease), 5)
            exits.append(gone)
        if fleet.leader() is None:
            leaderless += 0.5
        time.sleep(0.5)
    stopped = [h.stop() for h in pair]
    touched = {k: sum(h[k] for h in stopped) for k in stopped[0]}
    exits += fleet.reap()
    taken = [e for e in exits if any("taken over" in ln for ln in e["log"])]
    out.figures["lease"] = {"hammer": touched, "exits": exits, "leaderless_seconds": leaderless}
    out.row(
        f"Lease rewritten for {b.args.lease_hammer_seconds:g}s: PUTs / 409s", f"{touched['writes']} / {touched['409s']}"
    )
    out.row("leader exits caused by a 409 on its Lease renewal", len(taken), "0", not taken)
    out.row("seconds without a leader meanwhile", leaderless, "0", leaderless == 0)
    if taken:
        lines = fleet.log_lines("taken over", 2)
        out.findings.append(
            f"a 409 on the Lease renewal (another client wrote the Lease's metadata) makes the leader exit as if "
            f"the lease had been taken over: {len(taken)} exits in {b.args.lease_hammer_seconds:g}s, {leaderless:g}s "
            f"without a leader; the Lease still named the leader that exited: "
            f"{[(e['identity'], e.get('holder_after_exit')) for e in taken]}; operator log: {lines}"
        )


# ------------------------------------------------------------------------------------------ 3. apiserver restart
DYNAMIC = {"engine.aboveSince", "engine.belowSince", "engine.recommendations", "engine.events", "lastDecision.metrics"}


def field_paths(doc: Any, prefix: str = "") -> set[str]:
    """Every key path of a status; conditions by type; the contents of per-trigger maps collapsed."""
    out: set[str] = set()
    if isinstance(doc, dict):
        for k, v in doc.items():
            path = f"{prefix}.{k}" if prefix else k
            out.add(path)
            if path not in DYNAMIC:
                out |= field_paths(v, path)
    elif isinstance(doc, list) and prefix == "conditions":
        for c in doc:
            out |= field_paths({k: v for k, v in c.items()}, f"conditions[{c.get('type')}]")
    return out


def apiserver_restart(b: Bench, out: Outcome) -> None:
    """Stop kube-apiserver, let the load rise meanwhile, start it again: when do rounds resume, and is
    any status field lost?"""
    ns = b.namespace("api")
    fleet = b.fleet(ns, size=2, lease_seconds=15)
    rec = b.recorder(ns)
    b.apply(ns, ttsd("steady", [gpu_trigger()], max_replicas=4))
    b.loads.set(ns, "steady", HIGH)
    if not poll(lambda: b.api.replicas(ns, "steady") >= 2, 60):
        raise BenchError("no scale-up before the restart")
    b.loads.set(ns, "steady", HOLD)
    b.settle(ns, "steady", 2)
    time.sleep(4)
    before = b.api.status(ns, "steady")
    stop_wall, stopped = time.time(), time.monotonic()
    b.cluster.stop_process("kube-apiserver")
    gone = time.monotonic()
    b.loads.set(ns, "steady", HIGH)  # a scale-up is due the moment the operator can act again
    time.sleep(b.args.apiserver_down_seconds)
    b.cluster.start_process("kube-apiserver")
    ready_s = timed(lambda: b.cluster.kubectl("get", "--raw", "/readyz", check=False).returncode == 0, 120, stopped)
    ready = time.monotonic()
    persisted = poll(lambda: b.api.status(ns, "steady"), 10) or {}
    write = poll(lambda: rec.first_write("steady", stop_wall), 90)
    scale = poll(lambda: next((c for c in rec.changes_of("steady") if c.at > stopped), None), 90)
    b.reach(ns, "steady", 3, 30)
    time.sleep(3)
    after = b.api.status(ns, "steady")
    b.loads.set(ns, "steady", HOLD)
    restarted = restart_dead_components(b)
    exits = fleet.reap()
    out.figures["stop_seconds"] = r2(gone - stopped)  # SIGTERM, then SIGKILL after 10 s (LocalCluster)
    report_restart(out, before, persisted, after, ready_s, ready, write, scale, exits, restarted)
    rec.stop()
    b.finish(ns)


def restart_dead_components(b: Bench) -> list[str]:
    """Control-plane components that died while the API server was away (they would be restarted by
    their supervisor in a real cluster); start them again so the next scenarios have a whole cluster."""
    dead = [name for name, alive in b.cluster.running().items() if not alive]
    for name in dead:
        b.cluster.start_process(name)
    return dead


def report_restart(
    out: Outcome,
    before: dict[str, Any],
    persisted: dict[str, Any],
    after: dict[str, Any],
    ready_s: float | None,
    ready: float,
    write: Write | None,
    scale: Change | None,
    exits: list[dict[str, Any]],
    restarted: list[str],
) -> None:
    lost = sorted(field_paths(before) - field_paths(after))
    unchanged = {c["type"]: c for c in before.get("conditions", [])}
    moved = [
        c["type"]
        for c in after.get("conditions", [])
        if c["type"] in unchanged
        and unchanged[c["type"]]["status"] == c["status"]
        and unchanged[c["type"]].get("lastTransitionTime") != c.get("lastTransitionTime")
    ]
    resumed = r2(write.at - ready) if write else None
    scaled = r2(scale.at - ready) if scale else None
    same = persisted == before or (observed_at(persisted) or 0) > (observed_at(before) or 0)
    out.figures |= {
        "down_until_ready_seconds": ready_s,
        "first_status_write_after_ready_seconds": resumed,
        "first_scale_after_ready_seconds": scaled,
        "status_fields_lost": lost,
        "transition_times_moved": moved,
        "lastScaleTime_before_after": [before.get("lastScaleTime"), after.get("lastScaleTime")],
        "operator_exits": exits,
        "components_restarted": restarted,
        "status_before": before,
        "status_after": after,
    }
    out.row("API server stop -> ready again (s; of which stopping)", f"{ready_s} ({out.figures['stop_seconds']})")
    # A standby that missed the leader's last renewal before the outage waits one full lease (15 s) after
    # the API server is back before it may take over (client-go's rule), then starts kopf and runs a round.
    out.row("ready -> operator's first status write (s)", resumed, "<= 20", resumed is not None and resumed <= 20)
    out.row("ready -> first scale (the load rose while it was down) (s)", scaled, "<= 25", (scaled or 99) <= 25)
    out.row("status as stored before = as read after the restart", same, "True", same)
    out.row("status fields lost", len(lost), "0", not lost)
    out.row("condition transition times moved without a status change", len(moved), "0", not moved)
    out.row("operator replicas that exited / components restarted", f"{len(exits)} / {len(restarted)}")
    if lost:
        out.findings.append(f"apiserver-restart: status fields lost across the restart: {lost}")
    if moved:
        out.findings.append(f"apiserver-restart: lastTransitionTime moved without a status change: {moved}")


# ------------------------------------------------------------------------------------------ 2. Prometheus outage
def prometheus_ready(b: Bench) -> bool:
    try:
        with urllib.request.urlopen(f"{b.state.prometheus_url}/-/ready", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def prom_query(b: Bench, promql: str) -> Any:
    """What the real Prometheus answers to `promql` (series labels and values), or the error."""
    url = f"{b.state.prometheus_url}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return {"query": promql, "result": json.loads(resp.read())["data"]["result"]}
    except (OSError, ValueError, KeyError) as exc:
        return {"query": promql, "error": str(exc)}


@dataclass
class Outage:
    """One Prometheus outage as the bench saw it (monotonic times; seconds are measured from them)."""

    stopped: float
    restarted: float = 0.0
    ready: float = 0.0
    noticed: float | None = None  # stop -> MetricsAvailable=False
    message: str = ""
    data_back: float | None = None  # ready -> MetricsAvailable=True
    first_answers: list[Any] = field(default_factory=list)  # what Prometheus answered right after ready


def stop_prometheus(
    b: Bench, ns: str, name: str, seconds: float, during: Callable[[float], object], load_at_stop: float
) -> Outage:
    """Stop the real Prometheus for `seconds` (the load set to `load_at_stop` as it goes, `during` called
    every few seconds), start it again with the same flags and data folder, and record what the operator
    said and what Prometheus answered."""
    o = Outage(stopped=time.monotonic())
    b.cluster.stop_process("prometheus")
    b.loads.set(ns, name, load_at_stop)
    say(f"prometheus-outage: Prometheus stopped with {b.api.replicas(ns, name)} replicas for {seconds:g}s")
    o.noticed = timed(lambda: b.api.condition(ns, name, "MetricsAvailable").get("status") == "False", 30, o.stopped)
    o.message = str(b.api.condition(ns, name, "MetricsAvailable").get("message"))
    while (now := time.monotonic()) < o.stopped + seconds:
        during(now - o.stopped)
        time.sleep(min(5.0, max(0.0, o.stopped + seconds - now)))
    b.cluster.start_process("prometheus")
    o.restarted = time.monotonic()
    poll(lambda: prometheus_ready(b), 120, interval=0.05)
    o.ready = time.monotonic()
    # The GPU samples Prometheus serves in the first seconds, with their age: stale ones from before the
    # outage are still inside its 5-minute lookback if the outage was shorter than that.
    series = f'DCGM_FI_DEV_GPU_UTIL{{namespace="{ns}"}}'
    for _ in range(6):
        answer = prom_query(b, f"time() - timestamp({series})")
        values = prom_query(b, series)
        o.first_answers.append({"after_ready": r2(time.monotonic() - o.ready), "age_s": answer, "value": values})
        time.sleep(0.5)
    o.data_back = timed(lambda: b.api.condition(ns, name, "MetricsAvailable").get("status") == "True", 90, o.ready)
    return o


def prometheus_outage(b: Bench, out: Outcome) -> None:
    """Prometheus stopped for the outage while the load falls: any scale-down without data is forbidden.
    Then a short outage that ends inside Prometheus' 5-minute lookback, with the load gone meanwhile:
    does the operator act on the samples from before the outage?"""
    ns = b.namespace("prom")
    fleet = b.fleet(ns)
    rec = b.recorder(ns)
    b.apply(ns, ttsd("falling", [gpu_trigger()], max_replicas=5))
    b.loads.set(ns, "falling", HIGH)
    if not poll(lambda: b.api.replicas(ns, "falling") >= 4, 90):
        raise BenchError("no scale-up to 4 before the outage")
    b.loads.set(ns, "falling", HOLD)
    time.sleep(3)  # Prometheus holds 55 %: between the thresholds, nothing to do

    def fall(elapsed: float) -> None:
        steps = [30.0, 20.0, 10.0, 5.0]
        level = steps[min(len(steps) - 1, int(elapsed / b.args.outage_seconds * len(steps)))]
        if value_at(b.loads.timeline[(ns, "falling")], time.monotonic()) != level:
            b.loads.set(ns, "falling", level)
        fleet.reap()

    long = stop_prometheus(b, ns, "falling", b.args.outage_seconds, fall, 30.0)  # the load starts to fall
    b.reach(ns, "falling", 1, 120)
    b.loads.set(ns, "falling", HIGH)
    poll(lambda: b.api.replicas(ns, "falling") >= 2, 60)
    short = stop_prometheus(b, ns, "falling", b.args.short_outage_seconds, lambda _: fleet.reap(), LOW)
    time.sleep(DOWN_WINDOW)  # what does the operator do with what it finds after the restart?
    rec.stop()
    changes = rec.changes_of("falling")
    timeline = b.loads.timeline[(ns, "falling")]
    violations = judge(changes, timeline, 5, blind=[(long.stopped, long.ready), (short.stopped, short.ready)])
    report_outage(out, b, long, short, changes, violations)
    b.finish(ns)


def report_outage(
    out: Outcome,
    b: Bench,
    long: Outage,
    short: Outage,
    changes: list[Change],
    violations: list[Violation],
) -> None:
    downs_while = [c for c in changes if long.stopped <= c.at <= long.ready and c.new < c.old]
    first_down = next((c for c in changes if c.at > long.ready and c.new < c.old), None)
    first = r2(first_down.at - long.ready) if first_down else None
    after_short = [c for c in changes if c.at > short.ready]
    out.figures |= {
        "outage": {**as_seen(long), "first_scale_down_after_ready": first},
        "short_outage": as_seen(short),
        "scale_downs_while_down": [as_seen(c) for c in downs_while],
        "changes_after_short_outage": [as_seen(c) for c in after_short],
        "violations": [v.__dict__ for v in violations],
        "changes": [as_seen(c) for c in changes],
    }
    out.row("Prometheus down (s)", r2(long.restarted - long.stopped), f"{b.args.outage_seconds:g}")
    out.row("scale-downs while it was down (load falling below 40%)", len(downs_while), "0", not downs_while)
    out.row(
        "MetricsAvailable=False after (s); message",
        f"{long.noticed}; {long.message[:90]}",
        "< 6; unreachable",
        long.noticed is not None and long.noticed < 6 and "unreachable" in long.message,
    )
    out.row("Prometheus ready -> MetricsAvailable=True (s)", long.data_back, "< 10", (long.data_back or 99) < 10)
    out.row(
        "Prometheus ready -> first scale-down (s)", first, f">= {DOWN_WINDOW:g} (window)", (first or 0) >= DOWN_WINDOW
    )
    ups = [c for c in after_short if c.new > c.old]
    out.row(
        f"short outage ({b.args.short_outage_seconds:g}s, load gone meanwhile): scale-ups after it",
        len(ups),
        "0",
        not ups,
    )
    out.row("forbidden scale events (both outages)", len(violations), "0", not violations)
    for v in violations:
        out.findings.append(f"prometheus-outage: {v.kind} at {v.at}s: {v.detail}")
    if ups:
        out.findings.append(
            f"prometheus-outage: after a {b.args.short_outage_seconds:g}s outage the operator scaled up on GPU samples "
            f"from before the outage (Prometheus serves a sample for 5 minutes and wrote no staleness markers while "
            f"it was down); the load had been {LOW:g}% since the stop. Prometheus' answers right after it was "
            f"ready (pod, value, sample age): {stale_samples(short)}; scale-ups: {[as_seen(c) for c in ups]}"
        )


def stale_samples(o: Outage) -> list[tuple[float | None, str, str, str]]:
    """(seconds after ready, pod, value, age in seconds) of the GPU samples Prometheus served first."""
    out: list[tuple[float | None, str, str, str]] = []
    for answer in o.first_answers[:3]:
        values = {r["metric"].get("pod"): r["value"][1] for r in answer["value"].get("result", [])}
        for r in answer["age_s"].get("result", []):
            pod = r["metric"].get("pod")
            out.append((answer["after_ready"], pod, values.get(pod, "?"), f"{float(r['value'][1]):.1f}"))
    return out


# ------------------------------------------------------------------------------------------ 1. HA kills
# (window, GPU load, seconds, jitter): the scale-down window holds a 4 s blip back to 55 %, long enough for
# any live leader to see (two rounds, four scrapes); only a leaderless gap can hide it.
PHASES = (
    ("scale-up", HIGH, 14.0, 0.2),
    ("hold", HOLD, 8.0, 0.2),
    ("scale-down", LOW, 12.0, 0.2),
    ("scale-down", HOLD, 4.0, 0.0),
    ("scale-down", LOW, 24.0, 0.2),
)
WINDOWS = ("scale-up", "hold", "scale-down")


class LoadCycle:
    """Drives one TTSDeployment's load through scale-up, hold and scale-down windows (lengths jittered
    +-20 %, so the kills do not fall in step with the cycle) until stopped. `phase` is the window now."""

    def __init__(self, b: Bench, ns: str, name: str, rng: random.Random) -> None:
        self.b, self.ns, self.name, self.rng = b, ns, name, rng
        self.phase = "hold"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="load-cycle", daemon=True)

    def start(self) -> LoadCycle:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            for phase, gpu, seconds, jitter in PHASES:
                self.phase = phase
                self.b.loads.set(self.ns, self.name, gpu)
                if self._stop.wait(seconds * self.rng.uniform(1 - jitter, 1 + jitter)):
                    return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def ha_kills(b: Bench, out: Outcome) -> None:
    """SIGKILL the leader of two replicas at random moments of a load cycle; judge every scale event."""
    ns = b.namespace("ha")
    fleet = b.fleet(ns, size=2, lease_seconds=b.args.lease_seconds)
    rec = b.recorder(ns)
    b.apply(ns, ttsd("ha-app", [gpu_trigger()], max_replicas=4))
    b.loads.set(ns, "ha-app", HOLD)
    b.settle(ns, "ha-app", 1)
    cycle = LoadCycle(b, ns, "ha-app", random.Random(b.rng.random())).start()
    kills: list[dict[str, Any]] = []
    try:
        for i in range(b.args.kills):
            kills.append(kill_once(b, fleet, rec, cycle, i))
    except BenchError as exc:  # the kills so far still count; say why the rest did not happen
        out.error = str(exc)[:2000]
        out.findings.append(f"ha-kills stopped after {len(kills)} kills: {out.error}")
    finally:
        cycle.stop()
        rec.stop()
    timeline = b.loads.timeline[(ns, "ha-app")]
    violations = judge(rec.changes_of("ha-app"), timeline, 4)
    report_kills(out, b, fleet, rec, kills, violations, timeline)
    b.finish(ns)


def kill_delay(rng: random.Random) -> float:
    """Seconds from a takeover to the next kill: mostly soon (fail-overs in quick succession, where a
    leader's memory is read back again and again), sometimes late enough for a leader to see a whole
    scale-down window itself (a new leader trusts no scale-down clock it did not keep)."""
    return rng.uniform(1.0, 4.0) if rng.random() < 0.6 else rng.uniform(10.0, 18.0)


def kill_once(b: Bench, fleet: Fleet, rec: Recorder, cycle: LoadCycle, i: int) -> dict[str, Any]:
    """One kill: wait for a leader and a standby, kill the leader at a random moment, start a new standby
    at once (as a ReplicaSet would), and time the takeover to the new leader's first status write."""
    exits = fleet.reap()
    standby = poll(lambda: [p for p in fleet.procs if "standing by" in p.log() and not p.is_leader()], 90)
    leader = poll(fleet.leader, 60)
    if leader is None or not standby:
        raise BenchError(f"kill {i + 1}: no leader ({leader}) or no standby ({standby}); exits {fleet.exits}")
    time.sleep(kill_delay(b.rng))
    leader = poll(fleet.leader, 30)
    if leader is None:
        raise BenchError(f"kill {i + 1}: the leader went away on its own; exits {fleet.reap()}")
    phase, replicas = cycle.phase, b.api.replicas(fleet.ns, "ha-app")
    fleet.kill(leader)
    killed_wall, killed = time.time(), time.monotonic()
    fleet.spawn()
    write = poll(lambda: rec.first_write("ha-app", killed_wall), b.args.lease_seconds + 60)
    takeover = r2(write.at - killed) if write else None
    new = fleet.leader()
    say(
        f"ha-kills: kill {i + 1}/{b.args.kills} of {leader.identity} in {phase} at {replicas} replicas: "
        f"{new.identity if new else '?'} wrote status after {takeover}s"
    )
    return {
        "kill": i + 1,
        "at": since_start(killed),
        "killed": leader.identity,
        "phase": phase,
        "replicas": replicas,
        "takeover_seconds": takeover,
        "new_leader": new.identity if new else None,
        "exits_before": exits,
    }


def brief(w: Write) -> dict[str, Any]:
    """A status write as evidence: when it was seen and decided, the count, and the engine's clocks."""
    engine = w.status.get("engine") or {}
    return {
        "at": since_start(w.at),
        "decided": dt.datetime.fromtimestamp(w.observed, dt.UTC).isoformat() if w.observed else None,
        "replicas": w.status.get("replicas"),
        "desired": w.status.get("desiredReplicas"),
        "message": (w.status.get("lastDecision") or {}).get("message"),
        "belowSince": engine.get("belowSince"),
        "dataSince": engine.get("dataSince"),
    }


def log_time(line: str) -> float | None:
    """Epoch seconds of an operator log line ("[2026-01-01 10:00:00,123] ..."), None if it has none."""
    try:
        return dt.datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    except ValueError:
        return None


def evidence(
    v: Violation, timeline: list[tuple[float, float | None]], fleet: Fleet, kills: list[dict[str, Any]]
) -> str:
    """What a violation is judged on: the kill before it, the load published in the 16 s before it, and
    the operator's own log line for the scale (its reason, in its words)."""
    before = [k for k in kills if k["at"] <= v.at]
    kill = f"{v.at - before[-1]['at']:.1f}s after kill {before[-1]['kill']}" if before else "before any kill"
    if before and before[-1]["takeover_seconds"] is not None:
        gap = (before[-1]["at"], before[-1]["at"] + before[-1]["takeover_seconds"])
        hidden = [(since_start(t), g) for t, g in timeline if START + gap[0] <= t <= START + gap[1]]
        kill += f"; load changes while no leader watched ({gap[0]:.1f}-{gap[1]:.1f}s): {hidden or 'none'}"
    at = START + v.at
    loads = [(since_start(t), g) for t, g in timeline if at - 16 <= t <= at]
    loads.insert(0, (round(v.at - 16, 2), value_at(timeline, at - 16)))
    wall = time.time() - (time.monotonic() - at)
    said = [
        ln.split("] ", 2)[-1]
        for p in fleet.every
        for ln in p.log().splitlines()
        if "ha-app:" in ln and abs((log_time(ln) or 0) - wall) < 2
    ]
    return f"{kill}; load published (s, %): {loads}; operator log: {said}"


def report_kills(
    out: Outcome,
    b: Bench,
    fleet: Fleet,
    rec: Recorder,
    kills: list[dict[str, Any]],
    violations: list[Violation],
    timeline: list[tuple[float, float | None]],
) -> None:
    takeovers = [k["takeover_seconds"] for k in kills if k["takeover_seconds"] is not None]
    missing = len(kills) - len(takeovers)
    changes = rec.changes_of("ha-app")
    ups = sum(1 for c in changes if c.new > c.old)
    by_phase = {w: sum(1 for k in kills if k["phase"] == w) for w in WINDOWS}
    exits = fleet.exits + fleet.reap()
    counts = fleet.log_counts()
    for v in violations:
        out.findings.append(f"ha-kills: {v.kind} at {v.at}s: {v.detail} ({evidence(v, timeline, fleet, kills)})")
    out.figures |= {
        "kills": kills,
        "kills_by_phase": by_phase,
        "takeover_median_seconds": r2(statistics.median(takeovers)) if takeovers else None,
        "takeover_p90_seconds": r2(sorted(takeovers)[int(0.9 * (len(takeovers) - 1))]) if takeovers else None,
        "takeover_worst_seconds": max(takeovers) if takeovers else None,
        "takeovers_not_seen": missing,
        "scale_ups": ups,
        "scale_downs": len(changes) - ups,
        "violations": [v.__dict__ for v in violations],
        "unexpected_exits": exits,
        "log": counts,
        "changes": [as_seen(c) for c in changes],
        "loads": [(since_start(t), g) for t, g in timeline],
        "status_writes": [brief(w) for w in rec.writes if w.name == "ha-app"],
        "lease_seconds": b.args.lease_seconds,
    }
    f = out.figures
    out.row(
        f"leader SIGKILLs (lease {b.args.lease_seconds}s)", len(kills), f"{b.args.kills}", len(kills) == b.args.kills
    )
    out.row("kills in scale-up / hold / scale-down", " / ".join(str(n) for n in by_phase.values()))
    out.row("scale events seen (up / down)", f"{ups} / {len(changes) - ups}")
    out.row("forbidden scale events", len(violations), "0", not violations)
    out.row("takeover kill -> new leader's first status write, median (s)", f["takeover_median_seconds"])
    out.row(
        "takeover, p90 / worst (s)",
        f"{f['takeover_p90_seconds']} / {f['takeover_worst_seconds']}",
        f"<= lease + 10 = {b.args.lease_seconds + 10}",
        bool(takeovers) and max(takeovers) <= b.args.lease_seconds + 10,
    )
    out.row("takeovers never seen (no new leader wrote)", missing, "0", missing == 0)
    out.row("operator exits nobody asked for", len(exits), "0", not exits)
    out.row(
        "tracebacks / failed rounds in the logs",
        f"{counts['tracebacks']} / {counts['round_failures'] + counts['evaluation_failures']}",
    )
    if exits:
        out.findings.append(f"ha-kills: {len(exits)} operator exit(s) nobody asked for: {exits[:3]}")


# ------------------------------------------------------------------------------------------ running it all
RUNNERS: dict[str, Callable[[Bench, Outcome], None]] = {
    "competing-hpa": competing_hpa,
    "bad-series": bad_series,
    "conflicts": conflicts,
    "apiserver-restart": apiserver_restart,
    "prometheus-outage": prometheus_outage,
    "ha-kills": ha_kills,
}


def run_scenario(b: Bench, name: str) -> Outcome:
    """Run one scenario; a scenario that cannot set itself up is recorded as an error, not the end of the run."""
    out = Outcome(name)
    t0 = time.monotonic()
    say(f"{name}: start")
    try:
        RUNNERS[name](b, out)
    except Exception as exc:  # recorded; the other scenarios still run (Ctrl-C is not an Exception)
        detail = f": {exc.stderr.strip()}" if isinstance(exc, subprocess.CalledProcessError) and exc.stderr else ""
        out.error = f"{type(exc).__name__}: {exc}{detail}"[:2000]  # a failed kubectl says why on stderr
        out.row("scenario error", out.error[:200], "none", False)
        say(f"{name}: ERROR {out.error[:500]}")
    finally:
        for fleet in b.fleets:
            fleet.stop()
        for rec in b.recorders:
            rec.stop()
        b.fleets.clear()
        b.recorders.clear()
    out.seconds = round(time.monotonic() - t0, 1)
    say(f"{name}: done in {out.seconds}s")
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=50, help="leader SIGKILLs in ha-kills (default %(default)s)")
    p.add_argument("--only", default="", help=f"comma-separated scenarios: {', '.join(SCENARIOS)}")
    p.add_argument("--seed", type=int, default=12, help="seed of every random moment (default %(default)s)")
    p.add_argument("--outage-seconds", type=float, default=300, help="Prometheus outage (default %(default)s)")
    p.add_argument("--short-outage-seconds", type=float, default=45, help="the second one (default %(default)s)")
    p.add_argument("--lease-seconds", type=int, default=5, help="lease of the ha-kills replicas (default %(default)s)")
    p.add_argument("--apiserver-down-seconds", type=float, default=5, help="extra downtime (default %(default)s)")
    p.add_argument("--hpa-trials", type=int, default=5, help="competing HPAs created (default %(default)s)")
    p.add_argument("--lease-hammer-seconds", type=float, default=30, help="Lease rewritten for (default %(default)s)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where fault-bench.json/.md go")
    p.add_argument("--cluster", default=CLUSTER, help="name of the dedicated local cluster (default %(default)s)")
    p.add_argument(
        "--keep-cluster",
        action="store_true",
        help="use the fault-bench cluster if it is up already, and leave it up afterwards (for development)",
    )
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SCENARIOS))
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    args.scenarios = [s for s in SCENARIOS if not only or s in only]
    return args


def code_version() -> dict[str, Any]:
    """The commit the operator code came from, and its files that differ from it (others edit the tree
    while benches run; each operator process imports what is on disk when it starts). Read-only git."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False)
        return done.stdout.strip()

    return {
        "head": git("rev-parse", "HEAD"),
        "changed": git("diff-index", "--name-only", "HEAD", "--", "operator").split(),
    }


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def bench_cluster(args: argparse.Namespace, log_dir: Path) -> Iterator[Bench]:
    """The dedicated cluster and the pod exporter; everything stopped afterwards."""
    cluster = LocalCluster(args.cluster)
    if cluster.is_up() and not args.keep_cluster:
        # Another run owns it: sharing would let its faults hit this run's figures and its teardown
        # stop this run's cluster (it did once). A leftover from a killed run is not "up": up() cleans it.
        raise SystemExit(
            f"cluster {args.cluster!r} is already up (another fault bench running?): wait for it, or "
            f"`voxscale cluster down --name {args.cluster}`, or reuse it with --keep-cluster"
        )
    exporter: PodMetricsExporter | None = None
    bench: Bench | None = None
    try:
        st = cluster.up(gpu_nodes=4)
        exporter = PodMetricsExporter(cluster, st).start(job="fault-bench-pods")
        bench = Bench(cluster, st, Api(st.kubeconfig), Loads(exporter), log_dir, random.Random(args.seed), args)
        yield bench
    finally:
        if bench is not None:
            for fleet in bench.fleets:
                fleet.stop()
            for rec in bench.recorders:
                rec.stop()
            for cleanup in bench.cleanups:
                with contextlib.suppress(Exception):
                    cleanup()
        if exporter is not None:
            with contextlib.suppress(Exception):
                exporter.stop()
        if not args.keep_cluster:
            cluster.down()


def markdown(outcomes: list[Outcome], meta: dict[str, Any]) -> str:
    ok = {True: "yes", False: "**NO**", None: ""}
    lines = [
        "| scenario | figure | value | goal | met |",
        "|---|---|---|---|---|",
    ]
    for o in outcomes:
        for r in o.rows:
            value = str(r["value"]).replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['scenario']} | {r['figure']} | {value} | {r['goal']} | {ok[r['ok']]} |")
    findings = [f"- {f}" for o in outcomes for f in o.findings]
    head = (
        f"Fault bench, {meta['finished']}: `{meta['command']}`, wall time {meta['wall_seconds']:.0f} s "
        f"(seed {meta['seed']}), operator code at commit {meta['code_at_start']['head'][:10]} "
        f"(changed since: {meta['code_at_start']['changed'] or 'none'}; "
        f"at the end: {meta['code_at_end']['head'][:10]}). "
        f"Operator logs: {meta['log_dir']}\n"
    )
    return "\n".join([head, *lines, "", "Findings:" if findings else "Findings: none", *findings, ""])


def save(outcomes: list[Outcome], meta: dict[str, Any], results: Path) -> str:
    results.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": meta,
        "scenarios": {
            o.name: {"seconds": o.seconds, "error": o.error, "figures": o.figures, "findings": o.findings}
            for o in outcomes
        },
        "table": [r for o in outcomes for r in o.rows],
    }
    (results / "fault-bench.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    table = markdown(outcomes, meta)
    (results / "fault-bench.md").write_text("# Fault-injection bench\n\n" + table)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    log_dir = Path(tempfile.mkdtemp(prefix="voxscale-fault-bench-logs-"))
    code = code_version()
    say(f"scenarios {', '.join(args.scenarios)}; operator logs in {log_dir}; code {code}")
    outcomes: list[Outcome] = []
    with bench_cluster(args, log_dir) as bench:
        for name in args.scenarios:
            outcomes.append(run_scenario(bench, name))
    meta = {
        "command": " ".join([".venv/bin/python -m bench.fault_bench", *(argv if argv is not None else sys.argv[1:])]),
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(time.monotonic() - START, 1),
        "seed": args.seed,
        "log_dir": str(log_dir),
        "scenarios": args.scenarios,
        "code_at_start": code,
        "code_at_end": code_version(),
    }
    print(save(outcomes, meta, args.results))
    return 0 if all(r["ok"] is not False for o in outcomes for r in o.rows) else 1


if __name__ == "__main__":
    sys.exit(main())

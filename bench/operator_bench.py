"""Operator benchmark on the real local control plane (not a test: it reports figures).

1. Reaction time: a DCGM-format exporter raises GPU utilisation above a TTSDeployment's threshold;
   how long until the Deployment's replica count changes (interval 5 s, the real Prometheus scraping
   every 1 s)? Median and p95 over --trials.
2. Scale: N TTSDeployments (N in --counts; queue trigger, min 1 replica, so one Ready pod each):
   scaling-round duration, operator CPU and peak RSS, and PromQL queries per round, which must stay
   flat as N grows, over a --window of 30 s once every one has been evaluated and its pod is Ready.

    .venv/bin/python -m bench.operator_bench [--trials 12] [--counts 10,100,500] [--json out.json]

It brings up a local cluster named `bench` (--cluster) with enough fake GPU nodes for every pod, and
tears it down at the end; a cluster of that name that is up already is used and left up (the smoke
test in tests/test_benches.py runs it so, on the test session's cluster, at --trials 2 --counts 2
--window 12). Its namespaces are deleted at the end.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import random
import statistics
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import OperatorProcess, free_port, get_json, install_operator_rbac, wait_for
from voxscale.localcluster.pod_exporter import PodMetricsExporter

INTERVAL_S = 5
GPUS_PER_NODE = 8  # what voxscale.localcluster gives each fake node
EXPORTER_JOB = "operator-bench-pods"  # not the default job: a test session's exporter keeps its own


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def ttsd(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "voxscale.io/v1alpha1",
        "kind": "TTSDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"image": "ghcr.io/voxscale/inference:0.1.0"}, **spec},
    }


def operator_metrics(port: int) -> dict[str, float]:
    """The operator's own series; labelled ones summed per name (e.g. api requests over methods), except
    that watch streams opened are kept apart as `..._watch`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("voxscale_operator_"):
            continue
        series, value = line.rsplit(" ", 1)
        name = series.split("{", 1)[0] + ("_watch" if 'method="WATCH"' in series else "")
        out[name] = out.get(name, 0.0) + float(value)
    return out


def proc_cpu_rss(pid: int) -> tuple[float, float]:
    """(CPU seconds used so far, peak RSS in MiB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    hwm = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmHWM"))
    return ticks / 100.0, int(hwm.split()[1]) / 1024


def reaction_times(cluster: LocalCluster, exporter: PodMetricsExporter, ns: str, trials: int) -> list[float]:
    cluster.kubectl("create", "namespace", ns)
    trigger = {"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 75, "scaleDownBelow": 40}
    obj = ttsd(
        "react",
        replicas={"min": 1, "max": trials + 2},
        scaling={
            "interval": f"{INTERVAL_S}s",
            "triggers": [trigger],
            "scaleUp": {"maxStepPods": 1, "maxStepPercent": 1, "period": "1s"},
        },
    )
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))
    exporter.set(ns, "react", gpu=50)

    def replicas() -> tuple[int, int]:
        dep = get_json(cluster, "deployment", "react", "-n", ns)
        return int(dep["spec"]["replicas"]), int(dep["status"].get("readyReplicas") or 0)

    wait_for("the TTSDeployment's first pod", lambda: replicas() == (1, 1), timeout=60)

    def settled(count: int) -> bool:
        return replicas() == (count, count)

    def grown(count: int) -> bool:
        return replicas()[0] > count

    out = []
    for i in range(trials):
        before, _ = replicas()
        wait_for("all pods ready", functools.partial(settled, before), timeout=60)
        time.sleep(random.uniform(1.5, 1.5 + INTERVAL_S))  # a random phase against the operator's interval
        exporter.set(ns, "react", gpu=90)
        crossed = time.monotonic()
        wait_for("scale-up", functools.partial(grown, before), timeout=60, interval=0.05)
        out.append(time.monotonic() - crossed)
        exporter.set(ns, "react", gpu=50)
        say(f"reaction trial {i + 1}/{trials}: {out[-1]:.2f}s")
    exporter.loads.pop((ns, "react"), None)
    cluster.kubectl("delete", "namespace", ns, "--wait=false")
    return out


def evaluated_at_least(cluster: LocalCluster, ns: str, n: int) -> bool:
    items = get_json(cluster, "ttsd", "-n", ns)["items"]
    return sum(1 for o in items if o.get("status", {}).get("reason")) >= n


def ready_at_least(cluster: LocalCluster, ns: str, n: int) -> bool:
    items = get_json(cluster, "deployment", "-n", ns)["items"]
    return sum(1 for d in items if int(d.get("status", {}).get("readyReplicas") or 0) >= 1) >= n


def scale_run(
    cluster: LocalCluster,
    start_operator: Callable[[str], OperatorProcess],
    ns: str,
    counts: list[int],
    reads: list[str],
    window: float = 30,
) -> list[dict[str, Any]]:
    """Per count, each --reads mode with an operator of its own, one after the other on the same objects."""
    cluster.kubectl("create", "namespace", ns)
    rows = []
    created = 0
    trigger = {"name": "queue", "type": "queueLength", "target": 5}
    for n in counts:
        # min 1: a queue trigger reads the pods themselves, so min 0 would need a signal that exists
        # while no pod runs (the CRD refuses it without one); a user with only this trigger keeps a pod.
        objs = [
            ttsd(
                f"tts-{i:04d}",
                replicas={"min": 1, "max": 10},
                scaling={"interval": "10s", "triggers": [trigger]},
            )
            for i in range(created, n)
        ]
        for chunk in range(0, len(objs), 100):
            docs = yaml.safe_dump_all(objs[chunk : chunk + 100])
            cluster.kubectl("apply", "-n", ns, "-f", "-", input=docs)
        created = n
        for mode in reads:
            op = start_operator(mode)
            try:
                if len(reads) > 1 or mode == reads[0]:
                    say(f"{n} TTSDeployments, --reads {mode}: waiting until every one is evaluated, its pod Ready")
                wait_for(
                    "status on all", functools.partial(evaluated_at_least, cluster, ns, n), timeout=900, interval=2
                )
                wait_for("a Ready pod", functools.partial(ready_at_least, cluster, ns, n), timeout=900, interval=2)
                time.sleep(INTERVAL_S * 2 + 2)  # this operator's first rounds (every object is due at once)
                rows.append({"reads": mode, **measure(op, n, window)})
            finally:
                op.stop()
            say(json.dumps(rows[-1]))
    cluster.kubectl("delete", "namespace", ns, "--wait=false")
    return rows


def measure(op: OperatorProcess, n: int, window: float) -> dict[str, Any]:
    """Round time, CPU, RSS, PromQL queries and API requests per round over `window` seconds."""
    metrics_port = op.metrics_port
    assert op.proc is not None
    cpu0, _ = proc_cpu_rss(op.proc.pid)
    m0 = operator_metrics(metrics_port)
    t0 = time.monotonic()
    rounds_seen: list[tuple[float, float, float]] = []
    while time.monotonic() - t0 < window:
        m = operator_metrics(metrics_port)
        rounds_seen.append(
            (
                m["voxscale_operator_last_round_seconds"],
                m["voxscale_operator_last_round_ttsdeployments"],
                m["voxscale_operator_last_round_queries"],
            )
        )
        time.sleep(0.5)
    cpu1, rss = proc_cpu_rss(op.proc.pid)
    m1 = operator_metrics(metrics_port)
    wall = time.monotonic() - t0
    rounds = m1["voxscale_operator_tick_seconds_count"] - m0["voxscale_operator_tick_seconds_count"]
    queries = m1["voxscale_operator_prometheus_queries_total"] - m0["voxscale_operator_prometheus_queries_total"]
    requests = m1.get("voxscale_operator_api_requests_total", 0.0) - m0.get("voxscale_operator_api_requests_total", 0.0)
    evaluated = sum(objs for _, objs, _ in rounds_seen)
    return {
        "ttsdeployments": n,
        "rounds": int(rounds),
        "round_seconds_mean": (m1["voxscale_operator_tick_seconds_sum"] - m0["voxscale_operator_tick_seconds_sum"])
        / max(rounds, 1),
        "ms_per_ttsdeployment": 1000 * sum(s for s, _, _ in rounds_seen) / max(evaluated, 1),
        "queries_per_round": queries / max(rounds, 1),
        "api_requests_per_round": requests / max(rounds, 1),
        "api_requests_per_second": requests / wall,
        "max_queries_in_a_round": max(q for _, _, q in rounds_seen),
        "evaluations_per_second": n / 10,
        "operator_cpu_percent": 100 * (cpu1 - cpu0) / wall,
        "operator_peak_rss_mib": rss,
    }


def reaction_summary(times: list[float]) -> dict[str, Any]:
    return {
        "interval_seconds": INTERVAL_S,
        "trials": len(times),
        "median_seconds": statistics.median(times),
        # quantiles() needs two points; with one trial its p95 is that trial
        "p95_seconds": statistics.quantiles(times, n=20)[18] if len(times) > 1 else times[0],
        "max_seconds": max(times),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--counts", default="10,100,500")
    parser.add_argument("--window", type=float, default=30, help="seconds measured per count (default %(default)s)")
    parser.add_argument("--cluster", default="bench", help="local cluster to use or start (default %(default)s)")
    parser.add_argument(
        "--reads",
        default="watch,list",
        help="the operator's --reads modes to measure side by side at each count: watch (the caches) and list "
        "(a LIST per kind per round, the baseline) (default %(default)s)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    try:
        args.counts = [int(c) for c in args.counts.split(",")]
    except ValueError:
        parser.error(f"--counts: comma-separated integers, got {args.counts!r}")
    if not args.counts or min(args.counts) < 1 or args.counts != sorted(args.counts):
        parser.error("--counts: ascending, each at least 1 (each count adds TTSDeployments to the last)")
    args.reads = args.reads.split(",")
    if not args.reads or not set(args.reads) <= {"watch", "list"}:
        parser.error(f"--reads: watch, list or both comma-separated, got {','.join(args.reads)!r}")
    if args.trials < 1:
        parser.error("--trials: must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cluster = LocalCluster(args.cluster)
    started = not cluster.is_up()
    # one GPU per pod: every scale-run pod, and the reaction run's at its largest, fit
    nodes = max(8, math.ceil((max(args.counts) + args.trials + 2) / GPUS_PER_NODE))
    cluster.up(gpu_nodes=nodes)
    st = cluster.state
    assert st is not None
    exporter: PodMetricsExporter | None = None
    op: OperatorProcess | None = None
    suffix = uuid.uuid4().hex[:6]
    namespaces = (f"bench-reaction-{suffix}", f"bench-scale-{suffix}")
    try:
        exporter = PodMetricsExporter(cluster, st).start(job=EXPORTER_JOB)
        kubeconfig = install_operator_rbac(cluster, "voxscale")
        log_dir = st.dir / "logs"

        def start_operator(reads: str) -> OperatorProcess:
            started = OperatorProcess(
                kubeconfig, st.prometheus_url, lease_name="voxscale", extra_args=[f"--reads={reads}"]
            )
            started.start(log_dir, metrics_port=free_port())
            started.wait_leader()
            return started

        op = start_operator(args.reads[0])
        reaction = reaction_summary(reaction_times(cluster, exporter, namespaces[0], args.trials))
        say(f"reaction: {json.dumps(reaction)}")
        op.stop()
        op = None
        rows = scale_run(cluster, start_operator, namespaces[1], args.counts, args.reads, args.window)
    finally:
        if op is not None:
            op.stop()
        if exporter is not None:
            exporter.stop()
        if started:
            cluster.down(quiet=True)
        elif cluster.is_up():  # a cluster we did not start stays, without our namespaces
            for ns in namespaces:
                cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
    result = {"reaction": reaction, "scale": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

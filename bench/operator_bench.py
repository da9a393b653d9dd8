"""Operator benchmark on the real local control plane (not a test: it reports figures).

1. Reaction time: a DCGM-format exporter raises GPU utilisation above a TTSDeployment's threshold;
   how long until the Deployment's replica count changes (interval 5 s, the real Prometheus scraping
   every 1 s)? Median and p95 over --trials.
2. Scale: N TTSDeployments (N in --counts; queue trigger, min 1 replica, so one Ready pod each):
   scaling-round duration, operator CPU and peak RSS, and PromQL queries per round, which must stay
   flat as N grows, over a --window of 30 s once every one has been evaluated and its pod is Ready;
   and how long an object waits between two evaluations (its interval is 10 s: a longer wait means
   the fleet's evaluations did not fit in the interval).

    .venv/bin/python -m bench.operator_bench [--trials 12] [--counts 10,100,500] [--json out.json]

It brings up a local cluster named `bench` (--cluster) and tears it down at the end; a cluster of
that name that is up already is used and left up (the smoke test in tests/test_benches.py runs it so,
on the test session's cluster, at --trials 2 --counts 2 --window 12). Its namespaces are deleted at
the end. Thousands of objects: the TTSDeployments are created by --create-threads concurrent API
calls, the pods land on large fake nodes the bench adds (BIG_NODE_GPUS each, removed at the end), and
a cluster the bench starts gets --api-qps for its controller-manager and scheduler (1,000 objects
with their pods took ~15 minutes with kubectl apply and those components' default rate limits).
"""

from __future__ import annotations

import argparse
import concurrent.futures
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
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from voxscale.localcluster.cluster import ClusterState, LocalCluster, gpu_node_manifest
from voxscale.localcluster.harness import OperatorProcess, free_port, get_json, install_operator_rbac, wait_for
from voxscale.localcluster.pod_exporter import PodMetricsExporter

INTERVAL_S = 5
GPUS_PER_NODE = 8  # what voxscale.localcluster gives each fake node
EXPORTER_JOB = "operator-bench-pods"  # not the default job: a test session's exporter keeps its own
BIG_NODE_GPUS = 100  # the scale run's fake nodes: a node holds 110 pods, so 100 one-GPU pods fit
BIG_NODE_PREFIX = "bench-gpu-node"


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
    that watch streams opened are kept apart as `..._watch` and a histogram's buckets as `..._bucket@<le>`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("voxscale_operator_"):
            continue
        series, value = line.rsplit(" ", 1)
        name = series.split("{", 1)[0] + ("_watch" if 'method="WATCH"' in series else "")
        if name.endswith("_bucket") and 'le="' in series:
            name += "@" + series.split('le="', 1)[1].split('"', 1)[0]
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


def create_concurrently(api: k8s.ApiClient, ns: str, objs: list[dict[str, Any]], threads: int) -> None:
    """Create the TTSDeployments by `threads` concurrent API calls (kubectl apply sent them one by one)."""
    custom = k8s.CustomObjectsApi(api)

    def create(obj: dict[str, Any]) -> None:
        custom.create_namespaced_custom_object("voxscale.io", "v1alpha1", ns, "ttsdeployments", obj)

    with concurrent.futures.ThreadPoolExecutor(max_workers=threads) as pool:
        for done in pool.map(create, objs):  # re-raises the first failure
            del done


def poll_interval(n: int) -> float:
    """Seconds between two reads of every object: a read of thousands of statuses costs the shared
    cores as much as the operator's rounds it waits on."""
    return max(2.0, n / 250)


def scale_run(
    cluster: LocalCluster,
    start_operator: Callable[[str], OperatorProcess],
    ns: str,
    counts: list[int],
    reads: list[str],
    window: float = 30,
    create_threads: int = 8,
) -> list[dict[str, Any]]:
    """Per count, each --reads mode with an operator of its own, one after the other on the same objects."""
    st = cluster.state
    assert st is not None
    api = k8s_config.new_client_from_config(config_file=str(st.kubeconfig))  # type: ignore[no-untyped-call]
    cluster.kubectl("create", "namespace", ns)
    rows = []
    created = 0
    trigger = {"name": "queue", "type": "queueLength", "target": 5}
    try:
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
            t0 = time.monotonic()
            create_concurrently(api, ns, objs, create_threads)
            create_seconds = time.monotonic() - t0
            say(f"created {len(objs)} TTSDeployments in {create_seconds:.1f}s ({create_threads} threads)")
            created = n
            for first, mode in enumerate(reads):
                op = start_operator(mode)
                try:
                    say(f"{n} TTSDeployments, --reads {mode}: waiting until every one is evaluated, its pod Ready")
                    every = poll_interval(n)
                    wait_for(
                        "status on all",
                        functools.partial(evaluated_at_least, cluster, ns, n),
                        timeout=1800,
                        interval=every,
                    )
                    wait_for(
                        "a Ready pod", functools.partial(ready_at_least, cluster, ns, n), timeout=1800, interval=every
                    )
                    # The first mode's wait includes the children and pods of the new objects: creation.
                    setup = (
                        {"new_ttsdeployments": len(objs), "create_api_seconds": create_seconds} if first == 0 else {}
                    )
                    setup["created_to_ready_seconds" if first == 0 else "start_to_ready_seconds"] = (
                        time.monotonic() - t0
                    )
                    time.sleep(INTERVAL_S * 2 + 2)  # this operator's first rounds (every object is due at once)
                    rows.append({"reads": mode, **measure(op, n, window), **setup})
                finally:
                    op.stop()
                t0 = time.monotonic()
                say(json.dumps(rows[-1]))
    finally:
        api.close()
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
    longest_wait = 0.0  # the longest an object of a sampled round went between two evaluations
    while time.monotonic() - t0 < window:
        m = operator_metrics(metrics_port)
        rounds_seen.append(
            (
                m["voxscale_operator_last_round_seconds"],
                m["voxscale_operator_last_round_ttsdeployments"],
                m["voxscale_operator_last_round_queries"],
            )
        )
        longest_wait = max(longest_wait, m.get("voxscale_operator_last_round_longest_wait_seconds", 0.0))
        time.sleep(0.5)
    cpu1, rss = proc_cpu_rss(op.proc.pid)
    m1 = operator_metrics(metrics_port)
    wall = time.monotonic() - t0
    rounds = m1["voxscale_operator_tick_seconds_count"] - m0["voxscale_operator_tick_seconds_count"]
    queries = m1["voxscale_operator_prometheus_queries_total"] - m0["voxscale_operator_prometheus_queries_total"]
    requests = m1.get("voxscale_operator_api_requests_total", 0.0) - m0.get("voxscale_operator_api_requests_total", 0.0)
    evaluated = sum(objs for _, objs, _ in rounds_seen)
    wait = "voxscale_operator_evaluation_wait_seconds"
    waits = m1.get(f"{wait}_count", 0.0) - m0.get(f"{wait}_count", 0.0)
    on_time = m1.get(f"{wait}_bucket@12.5", 0.0) - m0.get(f"{wait}_bucket@12.5", 0.0)
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
        "evaluations_per_second": n / 10,  # what a 10 s interval asks for
        "evaluations_per_second_measured": waits / wall,  # re-evaluations in the window
        "evaluation_wait_seconds_mean": (m1.get(f"{wait}_sum", 0.0) - m0.get(f"{wait}_sum", 0.0)) / max(waits, 1),
        # interval 10 s and a round every ~0.5 s: 12.5 s is "on time"
        "evaluation_wait_within_12_5s": on_time / max(waits, 1),
        "evaluation_wait_seconds_max_sampled": longest_wait,
        "operator_cpu_percent": 100 * (cpu1 - cpu0) / wall,
        "operator_peak_rss_mib": rss,
    }


def add_big_nodes(cluster: LocalCluster, st: ClusterState, pods: int) -> list[str]:
    """Register the fake nodes `pods` one-GPU pods need beyond the cluster's own, BIG_NODE_GPUS each
    (thousands of pods on 8-GPU nodes would be hundreds of nodes, each heartbeating into the shared
    API server), and wait until they are Ready; returns their names."""
    missing = pods - st.gpu_nodes * GPUS_PER_NODE
    if missing <= 0:
        return []
    manifests = []
    for i in range(math.ceil(missing / BIG_NODE_GPUS)):
        node = gpu_node_manifest(i, gpus=BIG_NODE_GPUS)
        meta: dict[str, Any] = node["metadata"]  # type: ignore[assignment]
        meta["name"] = meta["labels"]["kubernetes.io/hostname"] = f"{BIG_NODE_PREFIX}-{i}"
        meta["labels"] |= {"voxscale.io/fake-cpu": "1000", "voxscale.io/fake-memory": "8Ti"}
        manifests.append(node)
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(manifests))
    names = [str(n["metadata"]["name"]) for n in manifests]  # type: ignore[index]

    def ready() -> bool:
        items = get_json(cluster, "nodes")["items"]
        up = {
            n["metadata"]["name"]
            for n in items
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n.get("status", {}).get("conditions", []))
        }
        return set(names) <= up

    wait_for(f"{len(names)} fake {BIG_NODE_GPUS}-GPU nodes Ready", ready, timeout=300, interval=2)
    say(f"added {len(names)} fake nodes of {BIG_NODE_GPUS} GPUs for {missing} pods")
    return names


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
    parser.add_argument(
        "--create-threads", type=int, default=8, help="concurrent API calls creating the TTSDeployments (%(default)s)"
    )
    parser.add_argument(
        "--api-qps",
        type=int,
        default=200,
        help="client QPS of the controller-manager and scheduler of a cluster the bench starts (burst twice it; "
        "0: their defaults) (default %(default)s)",
    )
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
    if args.create_threads < 1 or args.api_qps < 0:
        parser.error("--create-threads: at least 1; --api-qps: 0 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cluster = LocalCluster(args.cluster)
    started = not cluster.is_up()
    # one GPU per pod: the reaction run's pods at their largest on the cluster's own nodes
    cluster.up(gpu_nodes=max(8, math.ceil((args.trials + 2) / GPUS_PER_NODE)), api_qps=args.api_qps)
    st = cluster.state
    assert st is not None
    exporter: PodMetricsExporter | None = None
    op: OperatorProcess | None = None
    suffix = uuid.uuid4().hex[:6]
    namespaces = (f"bench-reaction-{suffix}", f"bench-scale-{suffix}")
    big_nodes: list[str] = []
    try:
        big_nodes = add_big_nodes(cluster, st, max(args.counts) + args.trials + 2)
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
        rows = scale_run(
            cluster, start_operator, namespaces[1], args.counts, args.reads, args.window, args.create_threads
        )
    finally:
        if op is not None:
            op.stop()
        if exporter is not None:
            exporter.stop()
        if started:
            cluster.down(quiet=True)
        elif cluster.is_up():  # a cluster we did not start stays, without our namespaces and nodes
            for ns in namespaces:
                cluster.kubectl("delete", "namespace", ns, "--wait=false", "--ignore-not-found", check=False)
            for node in big_nodes:
                cluster.kubectl("delete", "node", node, "--wait=false", "--ignore-not-found", check=False)
    result = {"reaction": reaction, "scale": rows}
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

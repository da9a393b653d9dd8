"""`voxscale operator`: leader election, the operator's own /metrics, then kopf."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
from types import FrameType
from typing import TYPE_CHECKING, Any

from prometheus_client import start_http_server

from voxscale import __version__

# How long a round waits for Prometheus (`--round-budget`); the scaler's default too. Here, not in the
# scaler, so `--help` does not import the operator (kubernetes, numpy) to print it.
ROUND_BUDGET_SECONDS = 5.0

if TYPE_CHECKING:
    from voxscale.operator.handlers import Runtime
    from voxscale.operator.leader import LeaseElector


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        help="watch only this namespace (repeatable); default: the whole cluster",
    )
    p.add_argument(
        "--prometheus-url",
        default=os.environ.get("VOXSCALE_PROMETHEUS_URL"),
        help="Prometheus for TTSDeployments that name none (env VOXSCALE_PROMETHEUS_URL)",
    )
    p.add_argument(
        "--allowed-prometheus-url",
        action="append",
        default=[],
        metavar="URL",
        help="a Prometheus URL spec.scaling.prometheus.url may name: same scheme, host and port, path under "
        "this one's (repeatable); the default URL is always "
        "allowed; none given: any URL (a TTSDeployment author then chooses where its Secret's credentials go)",
    )
    p.add_argument(
        "--scope-custom-queries",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="run a custom PromQL trigger only if every selector in it is pinned to its own namespace "
        '(namespace="$namespace"): for clusters where TTSDeployment authors are separate tenants',
    )
    p.add_argument(
        "--round-budget",
        type=float,
        default=float(os.environ.get("VOXSCALE_ROUND_BUDGET", ROUND_BUDGET_SECONDS)),
        metavar="SECONDS",
        help="a scaling round waits for Prometheus at most this long, whatever timeout an object names; an "
        "object without an answer by then keeps its last decision (MetricsAvailable=Unknown, QueryOverBudget) "
        "and its answer is used when it comes (env VOXSCALE_ROUND_BUDGET; default %(default)g)",
    )
    p.add_argument("--metrics-port", type=int, default=8080, help="the operator's own /metrics (0: off)")
    p.add_argument("--health-port", type=int, default=8081, help="kopf liveness endpoint /healthz (0: off)")
    p.add_argument("--bind", default="0.0.0.0", help="address for the metrics and health endpoints")
    p.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hold a coordination Lease before acting, so replicas never act at once",
    )
    p.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the leader-election Lease (env POD_NAMESPACE)",
    )
    p.add_argument("--lease-name", default="voxscale-operator", help="name of the Lease")
    p.add_argument(
        "--lease-seconds",
        type=int,
        default=15,
        help="a dead leader is replaced after at most this long (default %(default)s)",
    )
    # The pod's name (the chart sets POD_NAME): with hostNetwork the hostname is the node's and every
    # container's pid is 1, so two replicas on one node would otherwise share one identity.
    default_identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    p.add_argument("--identity", default=default_identity, help="this replica's Lease identity (default: $POD_NAME)")
    p.add_argument(
        "--reads",
        choices=("watch", "list"),
        default="watch",
        help="where a scaling round reads Deployments, pods, children and HPAs: caches fed by watches "
        "(default), or one LIST per kind per round (the behaviour before the caches; the operator bench's "
        "baseline)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    import kopf

    from voxscale.operator.kube import load_config

    _configure_logging(kopf, args.verbose)
    logging.getLogger("voxscale.operator").info(
        "voxscale operator %s starting (%s)", __version__, "leader election on" if args.leader_election else "alone"
    )
    load_config()
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.bind)
    runtime = _prepare(args)
    # In a container this is PID 1, which ignores SIGTERM without a handler: a standby waiting for
    # the lease would hold a rollout for the whole grace period. kopf installs its own once it runs.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    elector = _lead_alive(args) if args.leader_election else None
    liveness = f"http://{args.bind}:{args.health_port}/healthz" if args.health_port else None
    try:
        asyncio.run(
            kopf.operator(
                clusterwide=not args.namespace,
                namespaces=list(args.namespace),
                standalone=True,  # leader election above replaces kopf's peering
                liveness_endpoint=liveness,
                memo=runtime,
            )
        )
    finally:
        if elector is not None:
            elector.release()  # a clean stop hands over at once instead of after the lease expires
    return 0


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _configure_logging(kopf: Any, verbose: bool) -> None:
    logging.getLogger().handlers.clear()  # a library may have called basicConfig on import
    kopf.configure(verbose=verbose)  # kopf owns the root log handler; ours log through it
    if not verbose:
        # One line per watch event drowns the decisions; keep kopf's per-object chatter for -v.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    logging.getLogger("voxscale").setLevel(logging.DEBUG if verbose else logging.INFO)


def _prepare(args: argparse.Namespace) -> Runtime:
    """Build, while standing by, everything that neither reads the cluster's objects nor writes:
    the API clients (~0.8 s of first-use cost in the kubernetes client), the scaler, the CRD's
    defaults (~0.2 s of YAML). A standby that wins then only starts kopf and runs a round."""
    from voxscale.operator import crd, handlers
    from voxscale.operator.kube import Kube
    from voxscale.operator.prometheus import PrometheusSource
    from voxscale.operator.scaler import Scaler
    from voxscale.operator.writes import StatusWriter

    kube = Kube()
    writer = StatusWriter(kube.replace_status).start()  # statuses are written off the round's path
    scaler = Scaler(
        kube,
        PrometheusSource(scope_custom_queries=args.scope_custom_queries),
        default_prometheus_url=args.prometheus_url,
        namespaces=args.namespace or None,
        allowed_prometheus_urls=tuple(args.allowed_prometheus_url),
        round_budget=args.round_budget,
        status_writer=writer,
    )
    crd.schema()  # cached for the process: the first object's defaults no longer parse the CRD file
    return handlers.Runtime(kube, scaler, watch_reads=args.reads == "watch")


def _lead_alive(args: argparse.Namespace) -> LeaseElector:
    """_lead(), answering the liveness probe while standing by; kopf's endpoint takes the port after."""
    from voxscale.operator.standby import StandbyHealth

    standby = StandbyHealth(args.bind, args.health_port).start() if args.health_port else None
    try:
        return _lead(args)
    finally:
        if standby is not None:
            standby.stop()


def _lead(args: argparse.Namespace) -> LeaseElector:
    """Block until this replica holds the Lease, then keep renewing it in the background."""
    from voxscale.operator.leader import LeaseElector

    renew = max(1.0, args.lease_seconds / 3)
    elector = LeaseElector(args.lease_namespace, args.lease_name, args.identity, args.lease_seconds, renew)
    elector.acquire()
    elector.keep_renewing()
    return elector

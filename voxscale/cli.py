"""`voxscale`: one command line for the whole project; later subsystems add their subcommands here."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from voxscale import __version__

Handler = Callable[[argparse.Namespace], int]


def _cluster_build(args: argparse.Namespace) -> int:
    from voxscale.localcluster import binaries

    for name, path in binaries.ensure_all(args.component or None, force=args.force).items():
        if args.verbose:
            print(f"{name}: {path}")
    return 0


def _cluster_up(args: argparse.Namespace) -> int:
    from voxscale.localcluster.cluster import LocalCluster

    cluster = LocalCluster(args.name)
    if cluster.is_up():
        print(f"cluster {args.name!r} is already up", file=sys.stderr)
    else:
        cluster.up(gpu_nodes=args.gpu_nodes, real_node=args.real_node)
    print("\n".join(cluster.env_lines()))
    return 0


def _cluster_load_image(args: argparse.Namespace) -> int:
    from voxscale.localcluster.cluster import LocalCluster

    try:
        copied = LocalCluster(args.name).load_images(args.image)
    except RuntimeError as exc:
        print(f"voxscale: {exc}", file=sys.stderr)
        return 1
    skipped = [ref for ref in args.image if ref not in copied]
    if skipped:
        print(f"already in the real node's containerd: {', '.join(skipped)}", file=sys.stderr)
    return 0


def _cluster_down(args: argparse.Namespace) -> int:
    from voxscale.localcluster.cluster import LocalCluster

    LocalCluster(args.name).down()
    return 0


def _cluster_env(args: argparse.Namespace) -> int:
    from voxscale.localcluster.cluster import LocalCluster

    try:
        print("\n".join(LocalCluster(args.name).env_lines()))
    except RuntimeError as exc:
        print(f"voxscale: {exc}", file=sys.stderr)
        return 1
    return 0


def _cluster_status(args: argparse.Namespace) -> int:
    from voxscale.localcluster.cluster import LocalCluster

    cluster = LocalCluster(args.name)
    st = cluster.state
    if st is None:
        print(f"cluster {args.name!r}: down")
        return 1
    print(f"cluster {args.name!r}: state in {st.directory}")
    for proc, alive in cluster.running().items():
        print(f"  {proc:<24} pid {st.pids[proc]:<8} {'running' if alive else 'EXITED'}")
    print(f"  apiserver  {st.apiserver_url}  {'ready' if cluster.is_up() else 'NOT ready'}")
    print(f"  prometheus {st.prometheus_url}")
    if cluster.is_up():
        print(cluster.kubectl("get", "nodes", "-L", "nvidia.com/gpu.product", check=False).stdout.rstrip())
        return 0
    return 1


def _serve(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from voxscale.inference.server import serve
    from voxscale.inference.settings import Settings
    from voxscale.inference.stages import StageWeightsError
    from voxscale.inference.voices import VoiceStoreError
    from voxscale.settings_contract import SettingError

    overrides: dict[str, Any] = {
        k: v
        for k, v in (
            ("voice", args.voice),
            ("precision", args.precision),
            ("device", args.device),
            ("voice_store", args.voice_store),
            ("stage_weights", ",".join(args.stage_weights) if args.stage_weights else None),
            ("port", args.port),
        )
        if v is not None
    }
    try:
        serve(args.host, settings=replace(Settings.from_env(), **overrides))
    except (VoiceStoreError, StageWeightsError, SettingError) as exc:
        print(f"voxscale serve: {exc}", file=sys.stderr)
        return 2
    return 0


def _interrupt_on_sigterm() -> None:
    """A demo stopped with SIGTERM (a CI job cancelled, a test's timeout) takes the same way out as
    Ctrl-C, so its clusters are torn down: their daemons run in sessions of their own and would
    outlive it."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _demo(args: argparse.Namespace) -> int:
    _interrupt_on_sigterm()
    if args.real_pods:
        from voxscale import demo_real

        return demo_real.run(fast=args.fast, plot_path=args.plot, keep=args.keep)
    from voxscale import demo

    return demo.run(fast=args.fast, plot_path=args.plot or Path("out/demo.png"), cluster_name=args.cluster_name)


def _operator(args: argparse.Namespace) -> int:
    from voxscale.operator import runner

    return runner.run(args)


def _needs_extra(command: str, extra: str, exc: ModuleNotFoundError) -> Handler:
    """A sub-command whose extra is not installed in this image: say which, instead of breaking
    every other sub-command at start (each image installs only the extra it runs)."""

    def refuse(args: argparse.Namespace) -> int:
        print(f"voxscale {command} needs {exc.name}: pip install 'voxscale[{extra}]'", file=sys.stderr)
        return 2

    return refuse


def _simulate(args: argparse.Namespace) -> int:
    from voxscale.simulator import cli

    return cli.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxscale", description=__doc__)
    parser.add_argument("--version", action="version", version=f"voxscale {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    cluster = sub.add_parser("cluster", help="a local Kubernetes control plane + Prometheus on 127.0.0.1")
    csub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")

    def add(name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p = csub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--name", default="default", help="which local cluster (default: %(default)s)")
        p.set_defaults(handler=handler)
        return p

    up = add("up", _cluster_up, "build what is missing, start the cluster, print its env")
    up.add_argument("--gpu-nodes", type=int, default=4, help="fake 8-GPU nodes to register (default: %(default)s)")
    up.add_argument(
        "--real-node",
        action="store_true",
        help="also run a real worker node (containerd, kubelet, kube-proxy): pods selecting "
        "voxscale.dev/real-node=true are real containers; one per machine",
    )
    load = add("load-image", _cluster_load_image, "copy images from podman into the real node's containerd")
    load.add_argument(
        "image", nargs="+", help="image references in podman's store, e.g. localhost/voxscale/inference:dev"
    )
    add("down", _cluster_down, "stop every process `up` started and remove its state")
    add("status", _cluster_status, "show the cluster's processes, endpoints and nodes")
    add("env", _cluster_env, "print export lines for KUBECONFIG, the Prometheus URL and PATH")
    build = csub.add_parser("build", help="build the pinned binaries into the cache (no-op when cached)")
    build.add_argument(
        "component",
        nargs="*",
        help="etcd, kubernetes, kubernetes-node, pause, kwok, helm, prometheus, prometheus-operator "
        "(default: all but prometheus-operator, which only its test builds)",
    )
    build.add_argument("--force", action="store_true", help="rebuild even when cached")
    build.add_argument("-v", "--verbose", action="store_true", help="print where each component lives")
    build.set_defaults(handler=_cluster_build)

    op = sub.add_parser("operator", help="run the TTSDeployment operator (kopf) against the current cluster")
    try:
        from voxscale.operator.runner import add_arguments
    except ModuleNotFoundError as exc:  # an image with voxscale[inference] only
        op.set_defaults(handler=_needs_extra("operator", "operator", exc))
    else:
        add_arguments(op)
        op.set_defaults(handler=_operator)

    sim = sub.add_parser(
        "simulate", help="replay a traffic trace through the scaling engine and price it against baselines"
    )
    try:
        from voxscale.simulator.cli import add_arguments as add_sim_arguments
    except ModuleNotFoundError as exc:  # the inference image carries voxscale[inference] only
        sim.set_defaults(handler=_needs_extra("simulate", "sim", exc))
    else:
        add_sim_arguments(sim)
        sim.set_defaults(handler=_simulate)

    srv = sub.add_parser("serve", help="run the TTS inference server (FastAPI + uvicorn)")
    from voxscale import settings_contract as sc

    def env_help(setting: sc.Setting[Any], text: str) -> str:
        """The flag's help with the variable it overrides and the contract's default."""
        default = f"; default {setting.default}" if setting.default is not None else ""
        return f"{text} (env {setting.env}{default})"

    srv.add_argument("--host", default="0.0.0.0", help="bind address (default %(default)s)")
    srv.add_argument("--port", type=int, help=env_help(sc.PORT, "HTTP port"))
    srv.add_argument("--voice", help=env_help(sc.VOICE, "built-in voice or a Piper .onnx path"))
    srv.add_argument("--precision", choices=sc.PRECISION.choices, help=env_help(sc.PRECISION, "on CUDA"))
    srv.add_argument("--device", help=env_help(sc.DEVICE, "cuda, cuda:1 or cpu; unset: cuda when available"))
    srv.add_argument(
        "--voice-store",
        help=env_help(
            sc.VOICE_STORE, "directory keeping registered voices and job results, shared by replicas; unset: memory"
        ),
    )
    srv.add_argument(
        "--stage-weights",
        action="append",
        metavar="STAGE=PATH",
        help=env_help(
            sc.STAGE_WEIGHTS,
            "your own state_dict for one stage (speaker_encoder, text_encoder, acoustic, vocoder); repeatable",
        ),
    )
    srv.set_defaults(handler=_serve)

    from voxscale.proxy import cli as proxy_cli

    door = sub.add_parser(
        "proxy", help="the door sidecar: a reverse proxy in front of any HTTP TTS server, publishing its door signals"
    )
    proxy_cli.add_arguments(door)
    door.set_defaults(handler=proxy_cli.run)

    demo = sub.add_parser("demo", help="what `make demo` runs: voxscale at work on a local cluster")
    demo.add_argument("--fast", action="store_true", help="a shorter run (about 2 minutes)")
    demo.add_argument(
        "--plot", type=Path, help="PNG to write (default out/demo.png; with --real-pods out/demo-real-pods.png)"
    )
    demo.add_argument("--cluster-name", default="demo", help="local cluster to use (default %(default)s)")
    demo.add_argument(
        "--real-pods",
        action="store_true",
        help="the loop with real containers: a real node, the chart's operator pod, CPU TTS servers, real "
        "requests through the Service (needs `make images`; about 4 minutes)",
    )
    demo.add_argument("--keep", action="store_true", help="with --real-pods: leave the cluster up afterwards")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError, KeyError) as exc:
        print(f"voxscale: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

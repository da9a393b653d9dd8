"""Image pre-pull, measured on the real node (issue 23 item 4; reports figures, not a test): scale-up to
Ready with and without spec.prePull, on a node that has never pulled the server's image.

A local cluster with a real node (containerd, kubelet) and a registry on 127.0.0.1 (distribution's, built
from its Go module: voxscale/localcluster/registry.py) that the node's containerd pulls from over HTTP.
The image (Piper's own server, localhost/voxscale/piper:test from Dockerfile.piper, unless --image says
otherwise) is pushed there once. A plain Deployment of it (0 replicas, Piper on 0.0.0.0:5000, Ready
when its port accepts connections, i.e. once the voice is loaded) has a TTSDeployment attached in
advisory mode (it writes nothing; the bench scales with kubectl), so the operator - a host process with
the chart's RBAC - reports status.coldStart and keeps the pre-pull DaemonSet.

Each trial starts from a cold node: every image but the sandbox's is removed from containerd and its
garbage collected, and the trial checks that none of the image's layers is left (no snapshot named by
one of its chain IDs, no image name). Then:
- without pre-pull: `kubectl scale --replicas=1`, timed until the pod is Ready;
- with pre-pull: spec.prePull.enabled is set, the DaemonSet turned Ready (its time is reported:
  it is spent before the load arrives), then the same scale-up, timed the same way.
Per trial: seconds from the scale command to the pod seen Ready (polled every 0.2 s), the pod's own phases
(operator/kube.py start_phases: scheduling, pull and start, loading; second resolution), the kubelet's
event about the image (pulled in N s, or already present), and status.coldStart.pullAndStartP90Seconds
as the operator wrote it for that pod. The pod is then scaled away and pre-pull turned off.
Medians per mode go to the report. Several minutes (a push, a cold pull per trial).

    flock /tmp/voxscale-realnode.lock .venv/bin/python -m bench.prepull_bench [--trials 3]
        [--image localhost/voxscale/piper:test] [--cluster prepull-bench] [--json bench/results/prepull.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

from voxscale.localcluster import realnode
from voxscale.localcluster.cluster import ClusterState, LocalCluster
from voxscale.localcluster.harness import OperatorProcess, get_json, install_operator_rbac, wait_for
from voxscale.localcluster.registry import Pushed, Registry, chain_ids
from voxscale.operator import children, prepull
from voxscale.operator.kube import start_phases

NAMESPACE = "prepull"
NAME = "piper"
PIPER_PORT = 5000


def manifests(image: str, prepull_on: bool = False, piper: bool = True) -> list[dict[str, Any]]:
    """Piper's server as a team runs it (a plain Deployment, 0 replicas to start) and a TTSDeployment
    attached to it in advisory mode (so only the bench scales it). `piper` False: the image's own
    entrypoint, Ready once started (a quick check of the machinery with a small image)."""
    labels = {"app": NAME}
    server: dict[str, Any] = {
        "name": "server",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
    }
    if piper:
        server |= {
            # The image's entrypoint listens on 127.0.0.1; the last --host wins, so the kubelet's probe reaches it.
            "args": ["-m", "/voices/en_US-joe-medium.onnx", "--host", "0.0.0.0"],
            "ports": [{"containerPort": PIPER_PORT}],
            "readinessProbe": {"tcpSocket": {"port": PIPER_PORT}, "periodSeconds": 1},
        }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {realnode.NODE_LABEL: "true"},
                    "terminationGracePeriodSeconds": 1,
                    "containers": [server],
                },
            },
        },
    }
    ttsd = {
        "apiVersion": "voxscale.io/v1alpha1",
        "kind": "TTSDeployment",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {
            "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": NAME},
            "replicas": {"min": 1, "max": 2},
            "prePull": {"enabled": prepull_on},
            "scaling": {"interval": "2s", "mode": "advisory"},
        },
    }
    return [deployment, ttsd]


@dataclass
class Env:
    """Everything a trial touches."""

    cluster: LocalCluster
    st: ClusterState
    pushed: Pushed
    core: client.CoreV1Api

    def kubectl(self, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.cluster.kubectl(*args, **kw)


# ------------------------------------------------------------------ a node that never pulled the image
def make_cold(env: Env, timeout: float = 120) -> dict[str, Any]:
    """Remove every image but the sandbox's from the node and check that none of the benched image's
    layers is left; returns what was removed and checked. Waits for the pods' containers to go."""
    st, pushed = env.st, env.pushed
    chains = set(chain_ids(list(pushed.diff_ids)))
    removed: set[str] = set()

    def cold() -> bool:
        realnode.remove_exited_containers(st)
        held = realnode.images(st)
        keep = {held[realnode.PAUSE_IMAGE]} if realnode.PAUSE_IMAGE in held else set()
        others = [ref for ref, digest in held.items() if digest not in keep]
        removed.update(others)
        realnode.forget_images(st, others)
        return not (chains & realnode.snapshot_keys(st)) and pushed.ref not in realnode.images(st)

    wait_for("a node holding none of the image's layers", cold, timeout=timeout, interval=2)
    return {"removed": sorted(removed), "layersChecked": len(chains)}


# ------------------------------------------------------------------ one trial
def set_prepull(env: Env, on: bool) -> None:
    patch = json.dumps({"spec": {"prePull": {"enabled": on}}})
    env.kubectl("patch", "ttsd", NAME, "-n", NAMESPACE, "--type=merge", "-p", patch)


def condition(env: Env, kind: str) -> dict[str, Any] | None:
    conditions = get_json(env.cluster, "ttsd", NAME, "-n", NAMESPACE).get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == kind), None)


def wait_prepulled(env: Env, timeout: float = 600) -> float:
    """Seconds from turning pre-pull on to ImagePrePulled=True (the DaemonSet Ready on every node)."""
    start = time.monotonic()
    set_prepull(env, True)
    wait_for(
        "ImagePrePulled=True",
        lambda: (c := condition(env, prepull.CONDITION)) is not None and c["status"] == "True",
        timeout=timeout,
        interval=0.5,
    )
    return time.monotonic() - start


def wait_prepull_gone(env: Env, timeout: float = 120) -> None:
    set_prepull(env, False)
    wait_for(
        "the pre-pull DaemonSet and its pods gone, the condition with them",
        lambda: (
            env.kubectl("get", f"daemonset/{children.prepull_name(NAME)}", "-n", NAMESPACE, check=False).returncode
            and not prepull_pods(env)
            and condition(env, prepull.CONDITION) is None
        ),
        timeout=timeout,
        interval=1,
    )


def prepull_pods(env: Env) -> list[dict[str, Any]]:
    return list(get_json(env.cluster, "pods", "-n", NAMESPACE, "-l", f"{children.PREPULL_LABEL}={NAME}")["items"])


def server_pods(env: Env) -> list[Any]:
    return list(env.core.list_namespaced_pod(NAMESPACE, label_selector=f"app={NAME}").items)


def is_ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in (pod.status.conditions or []))


def image_events(env: Env, pod: str) -> list[str]:
    """The kubelet's events about the pod's image: Pulling/Pulled with the pull time, or already present."""
    selector = f"involvedObject.name={pod}"
    events = get_json(env.cluster, "events", "-n", NAMESPACE, "--field-selector", selector)["items"]
    return [e["message"] for e in events if e.get("reason") in ("Pulling", "Pulled")]


def scale_up(env: Env, timeout: float = 600) -> dict[str, Any]:
    """Scale the Deployment 0 -> 1 and time it to the pod Ready; then read where the time went."""
    start = time.monotonic()
    env.kubectl("scale", "deployment", NAME, "-n", NAMESPACE, "--replicas=1")
    pod = wait_for("the new pod Ready", lambda: next((p for p in server_pods(env) if is_ready(p)), None), timeout, 0.2)
    ready_s = time.monotonic() - start
    phases = start_phases(pod)
    cold = wait_for(
        "status.coldStart for the pod",
        lambda: (
            (c := get_json(env.cluster, "ttsd", NAME, "-n", NAMESPACE).get("status", {}).get("coldStart"))
            and c.get("pods", 0) >= 1
            and c
        ),
        timeout=60,
        interval=0.5,
    )
    return {
        "pod": pod.metadata.name,
        "scaleUpToReadySeconds": round(ready_s, 2),
        "phases": asdict(phases) if phases is not None else None,
        "statusColdStart": cold,
        "imageEvents": image_events(env, pod.metadata.name),
    }


def scale_down(env: Env, timeout: float = 120) -> None:
    env.kubectl("scale", "deployment", NAME, "-n", NAMESPACE, "--replicas=0")
    wait_for("the pod gone", lambda: not server_pods(env), timeout, 0.5)


def trial(env: Env, with_prepull: bool) -> dict[str, Any]:
    checked = make_cold(env)
    out: dict[str, Any] = {"prePull": with_prepull, "coldNode": checked}
    if with_prepull:
        out["prePullReadySeconds"] = round(wait_prepulled(env), 2)
        ds = get_json(env.cluster, "daemonset", children.prepull_name(NAME), "-n", NAMESPACE)
        out["daemonSet"] = {k: ds["status"].get(k) for k in ("desiredNumberScheduled", "numberReady")}
        out["prePullPodLabels"] = [p["metadata"]["labels"] for p in prepull_pods(env)]
        out["imageOnNodeBeforeScaleUp"] = env.pushed.ref in realnode.images(env.st)
        out["serverPodsBeforeScaleUp"] = len(server_pods(env))
    out |= scale_up(env)
    scale_down(env)
    if with_prepull:
        wait_prepull_gone(env)
    return out


def summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    def median(values: list[float]) -> float | None:
        return round(statistics.median(values), 2) if values else None

    out: dict[str, Any] = {}
    for mode in (False, True):
        rows = [t for t in trials if t["prePull"] is mode]
        out["withPrePull" if mode else "withoutPrePull"] = {
            "trials": len(rows),
            "scaleUpToReadyMedianSeconds": median([t["scaleUpToReadySeconds"] for t in rows]),
            "pullAndStartMedianSeconds": median([t["phases"]["pull_and_start"] for t in rows if t["phases"]]),
            "statusPullAndStartP90MedianSeconds": median(
                [t["statusColdStart"]["pullAndStartP90Seconds"] for t in rows]
            ),
            "loadingMedianSeconds": median([t["phases"]["loading"] for t in rows if t["phases"]]),
            "prePullReadyMedianSeconds": median([t["prePullReadySeconds"] for t in rows if "prePullReadySeconds" in t]),
        }
    return out


# ------------------------------------------------------------------ the setup
def run(args: argparse.Namespace) -> dict[str, Any]:
    cluster = LocalCluster(args.cluster)
    started = not cluster.is_up()
    st = cluster.up(gpu_nodes=1, real_node=True, timeout=300)
    assert st is not None
    registry = Registry(st.dir / "registry")
    operator: OperatorProcess | None = None
    try:
        registry.start()
        registry.serve_node(st)
        say(f"pushing {args.image} to the registry at {registry.address}")
        pushed = registry.push(args.image, repository(args.image))
        say(f"pushed {pushed.ref}: {pushed.size_bytes / 1e6:.0f} MB compressed, {len(pushed.diff_ids)} layers")
        kubeconfig = install_operator_rbac(cluster, "voxscale")
        # The operator's hold container: the sandbox image this node's containerd runs (realnode.py).
        os.environ[prepull.HOLD_IMAGE_ENV] = realnode.PAUSE_IMAGE
        operator = OperatorProcess(kubeconfig, st.prometheus_url, lease_name="voxscale", lease_seconds=5)
        operator.start(Path(tempfile.mkdtemp(prefix="prepull-operator-")))
        operator.wait_leader()
        cluster.kubectl("create", "namespace", NAMESPACE, check=False)
        cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(manifests(pushed.ref, piper=not args.plain)))
        api = config.new_client_from_config(config_file=str(st.kubeconfig))  # type: ignore[no-untyped-call]
        env = Env(cluster, st, pushed, client.CoreV1Api(api))
        trials = []
        for i in range(args.trials):
            for mode in (False, True):
                say(f"trial {i + 1}/{args.trials}, {'with' if mode else 'without'} pre-pull")
                trials.append(trial(env, mode))
                say(f"  scale-up to Ready {trials[-1]['scaleUpToReadySeconds']} s")
        return {
            "bench": "prepull",
            "image": args.image,
            "pushedAs": pushed.ref,
            "imageBytes": podman_size(args.image),
            "imageCompressedBytes": pushed.size_bytes,
            "imageLayers": len(pushed.diff_ids),
            "node": realnode.NODE_NAME,
            "summary": summary(trials),
            "trials": trials,
        }
    finally:
        if operator is not None:
            operator.stop()
        registry.stop()
        if started and not args.keep:
            cluster.down(quiet=True)


def repository(image: str) -> str:
    """Where the image goes in the registry: localhost/voxscale/piper:test -> voxscale/piper."""
    name = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    return "voxscale/" + name.rsplit("/", 1)[-1]


def podman_size(ref: str) -> int:
    out = subprocess.run(["podman", "image", "inspect", "--format", "{{.Size}}", ref], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def say(msg: str) -> None:
    print(f"[prepull-bench] {msg}", file=sys.stderr, flush=True)


def table(report: dict[str, Any]) -> str:
    heads = [
        "mode",
        "trials",
        "scale-up to Ready",
        "pull+start",
        "status pullAndStart P90",
        "loading",
        "pre-pull Ready",
    ]
    keys = ["trials", "scaleUpToReadyMedianSeconds", "pullAndStartMedianSeconds", "statusPullAndStartP90MedianSeconds",
            "loadingMedianSeconds", "prePullReadyMedianSeconds"]  # fmt: skip
    rows = ["| " + " | ".join(heads) + " |  (medians, seconds)", "|" + "---|" * len(heads)]
    for mode, s in report["summary"].items():
        rows.append(f"| {mode} | " + " | ".join("-" if s[k] is None else str(s[k]) for k in keys) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=3, help="trials per mode (with and without pre-pull)")
    p.add_argument("--image", default="localhost/voxscale/piper:test", help="the image, from podman's store")
    p.add_argument("--cluster", default="prepull-bench", help="local cluster name (brought up with a real node)")
    p.add_argument("--plain", action="store_true", help="run the image's own entrypoint (not Piper's server)")
    p.add_argument("--keep", action="store_true", help="leave a cluster this run brought up running")
    p.add_argument("--json", type=Path, help="write the report here (e.g. bench/results/prepull.json)")
    args = p.parse_args(argv)
    report = run(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

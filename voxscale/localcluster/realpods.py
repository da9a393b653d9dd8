"""The whole loop with real pods, shared by the real-pod e2e test and `voxscale demo --real-pods`.

The operator is installed with `helm` from charts/voxscale using the image `make images` built, so it
runs as a pod under the chart's ServiceAccount and leader election. A TTSDeployment whose pods are
real `voxscale serve` containers on the local cluster's real node (on the CPU: `gpus: 0`); the
cluster's Prometheus finds them by Kubernetes service discovery; `SpeechLoad` sends real
/v1/audio/speech requests through the Service (kube-proxy's rules) and records who answered.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from voxscale.localcluster import realnode
from voxscale.localcluster.cluster import ClusterState, LocalCluster
from voxscale.localcluster.harness import CHART, OPERATOR_NAMESPACE, get_json, helm, wait_for

POD_HEADER = "X-Voxscale-Pod"  # the server names the pod that answered (inference/request_context.py)
QUEUE_TARGET = 1  # requests waiting per replica
TEXT = "A real server in a real container answers this request through the Service."


def image(target: str, tag: str | None = None) -> str:
    """What hack/build-images.sh tags: localhost/voxscale/<target>:<VOXSCALE_IMAGE_TAG or dev>."""
    return f"localhost/voxscale/{target}:{tag or os.environ.get('VOXSCALE_IMAGE_TAG', 'dev')}"


@contextlib.contextmanager
def real_node_cluster(
    name: str, images: list[str], operator_image: str | None = None, namespace: str | None = None
) -> Iterator[LocalCluster]:
    """A local cluster with one real node (`voxscale cluster up --real-node`), `images` loaded into
    its containerd, the operator installed with the chart when `operator_image` is given, and
    `namespace` created; taken down after, and checked to leave nothing behind on this machine."""
    cluster = LocalCluster(name)
    st = cluster.up(gpu_nodes=1, real_node=True, timeout=300)
    try:
        cluster.load_images(images)
        if operator_image is not None:
            install_operator(st, operator_image)
        if namespace is not None:
            cluster.kubectl("create", "namespace", namespace)
        yield cluster
    finally:
        cluster.down(quiet=True)
        left = realnode.leftovers(st)
        if left:
            raise AssertionError(f"cluster down left these behind: {left}")


def install_operator(st: ClusterState, operator_image: str, release: str = "voxscale") -> None:
    """`helm install` the chart with the built operator image, the way a cluster gets it, on the pod
    network as the chart's defaults have it. What this machine needs: the API server's and
    Prometheus' addresses as a pod reaches them (they listen on 127.0.0.1 only; the real node
    forwards its bridge address to them), and the node selector of the real node."""
    repository, tag = operator_image.rsplit(":", 1)
    env = [{"name": k, "value": v} for k, v in realnode.api_server_env(st, pod_network=True).items()]
    res = helm(
        "upgrade", "--install", release, str(CHART),
        "--namespace", OPERATOR_NAMESPACE, "--create-namespace",
        "--set", f"image.repository={repository}",
        "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never",  # copied into the node's containerd; there is no registry
        # One replica: these tests follow the one operator pod (`operator_pod`), and a standby's CPU is
        # better left to the servers on this small machine. tests/test_operator_ha_real.py runs two.
        "--set", "replicaCount=1",
        "--set-json", f"extraEnv={json.dumps(env)}",
        "--set", f"prometheusUrl={realnode.prometheus_url(st, pod_network=True)}",
        "--set", "leaseSeconds=5",
        "--set-json", f"nodeSelector={json.dumps({realnode.NODE_LABEL: 'true'})}",
        "--wait", "--timeout", "180s",
        state=st, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"helm install of the operator failed: {res.stderr.strip()}")


def operator_pod(cluster: LocalCluster, release: str = "voxscale") -> dict[str, Any]:
    pods = get_json(cluster, "pods", "-n", OPERATOR_NAMESPACE, "-l", f"app.kubernetes.io/instance={release}")["items"]
    return dict(pods[0]) if pods else {}


def real_ttsd(name: str, inference_image: str, min_replicas: int = 1, max_replicas: int = 3) -> dict[str, Any]:
    """A TTSDeployment of CPU servers on the real node, scaled on queue length per replica."""
    return {
        "apiVersion": "voxscale.io/v1alpha1",
        "kind": "TTSDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {
                "image": inference_image,
                "imagePullPolicy": "Never",
                "precision": "fp32",  # the CPU has no fast fp16
                "maxBatchSize": 1,  # on the CPU a batch buys little; one at a time keeps the queue honest
                "maxQueueLength": 32,
                "drainTimeout": "60s",
            },
            "resources": {"gpus": 0, "requests": {"cpu": "100m", "memory": "512Mi"}},
            "nodeSelector": {realnode.NODE_LABEL: "true"},
            "replicas": {"min": min_replicas, "max": max_replicas},
            "scaling": {
                "interval": "2s",
                # A CPU replica answers one request at a time; one more waiting on each is the target.
                # (With 2, six callers on three replicas read as two replicas' worth and the fleet
                # flapped 3 -> 2 -> 3 in mid-burst: a small integer queue against a proportional target.)
                "triggers": [{"name": "queue", "type": "queueLength", "target": QUEUE_TARGET}],
                "scaleUp": {"maxStepPods": 1, "period": "4s"},
                "scaleDown": {"stabilizationWindow": "20s", "maxStepPods": 1, "period": "10s", "cooldown": "0s"},
            },
        },
    }


def service_url(cluster: LocalCluster, namespace: str, name: str, timeout: float = 60) -> str:
    """The Service's ClusterIP URL, once it takes connections. A pod turns Ready before kube-proxy
    has programmed it as the Service's endpoint; until then the Service's REJECT rule answers
    "connection refused", which a load started at once would count as failed requests."""
    svc = get_json(cluster, "service", name, "-n", namespace)
    host, port = svc["spec"]["clusterIP"], int(svc["spec"]["ports"][0]["port"])
    wait_for(f"Service {namespace}/{name} to take connections", lambda: _connects(host, port), timeout, 0.5)
    return f"http://{host}:{port}"


def _connects(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def pods(cluster: LocalCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    """The TTSDeployment's pods, whatever their state."""
    return list(get_json(cluster, "pods", "-n", namespace, "-l", f"voxscale.io/ttsdeployment={name}")["items"])


def ready_pods(cluster: LocalCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return [
        p
        for p in pods(cluster, namespace, name)
        if any(c["type"] == "Ready" and c["status"] == "True" for c in p.get("status", {}).get("conditions", []))
    ]


def wait_ready(cluster: LocalCluster, namespace: str, name: str, count: int, timeout: float = 300) -> None:
    wait_for(f"{count} ready {name} pod(s)", lambda: len(ready_pods(cluster, namespace, name)) >= count, timeout, 1.0)


@dataclass(frozen=True)
class Answer:
    """One request as the client saw it. status 0: no HTTP answer (connection refused/reset, timeout)."""

    started: float  # seconds since the load began
    finished: float
    status: int
    pod: str  # the X-Voxscale-Pod that answered; "" when none did
    error: str = ""

    @property
    def accepted(self) -> bool:
        """The server took the request on: anything but a refusal at the door (429 queue full, 503
        not ready/draining), which a client retries. A dropped connection counts as accepted:
        the client cannot tell that its request was not being worked on."""
        return self.status not in (429, 503)

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class SpeechLoad:
    """Closed-loop callers: each sends the next /v1/audio/speech request as soon as the last is
    answered. `clients` can change while it runs (the demo's ramp)."""

    url: str
    clients: int = 4
    timeout: float = 120.0
    # What each request is: the OpenAI speech API of voxscale's server by default; another server's
    # path and JSON body (e.g. Piper's HTTP server: /synthesize, {"text": ...}) where it has its own.
    path: str = "/v1/audio/speech"
    payload: dict[str, Any] = field(
        default_factory=lambda: {"model": "tts-1", "input": TEXT, "voice": "alloy", "response_format": "wav"}
    )
    answers: list[Answer] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _t0: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> SpeechLoad:
        self._t0 = time.monotonic()
        self.set_clients(self.clients)
        return self

    def set_clients(self, clients: int) -> None:
        self.clients = clients
        while len(self._threads) < clients:
            index = len(self._threads)
            thread = threading.Thread(target=self._caller, args=(index,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 5)
        return list(self.answers)

    def _caller(self, index: int) -> None:
        while not self._stop.is_set():
            if index >= self.clients:  # parked by a lower client count
                time.sleep(0.2)
                continue
            answer = self._one()
            with self._lock:
                self.answers.append(answer)
            if not answer.accepted:
                time.sleep(0.2)

    def _one(self) -> Answer:
        body = json.dumps(self.payload).encode()
        request = urllib.request.Request(
            f"{self.url}{self.path}", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        started = time.monotonic() - self._t0
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                resp.read()
                return Answer(started, time.monotonic() - self._t0, resp.status, resp.headers.get(POD_HEADER, ""))
        except urllib.error.HTTPError as exc:
            exc.read()
            return Answer(started, time.monotonic() - self._t0, exc.code, exc.headers.get(POD_HEADER, ""), str(exc))
        except OSError as exc:
            return Answer(started, time.monotonic() - self._t0, 0, "", f"{type(exc).__name__}: {exc}")


def failed_accepted(answers: list[Answer]) -> list[Answer]:
    """Accepted requests that did not get their audio: what a scale-down or a rollout must not cause."""
    return [a for a in answers if a.accepted and not a.ok]

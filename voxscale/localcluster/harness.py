"""Run the real operator (`voxscale operator`) against the local control plane, under the chart's RBAC.

Used by the tests, the benchmarks and `make demo` (all from a source checkout: the chart is read
from charts/ next to this package).

The ServiceAccount, (Cluster)Role and bindings come from `helm template` of charts/voxscale, and the
operator authenticates with a token the API server issues for that ServiceAccount: the tests see
exactly the permissions a cluster install grants, not cluster-admin.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from voxscale.localcluster import binaries
from voxscale.localcluster.cluster import ClusterState, LocalCluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "voxscale"
OPERATOR_NAMESPACE = "voxscale-system"


def instant_query(prometheus_url: str, promql: str, timeout: float = 10) -> list[dict[str, Any]]:
    """The result vector of an instant PromQL query (the tests' own reading of Prometheus)."""
    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return list(json.load(resp)["data"]["result"])


def wait_for(what: str, check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.25) -> Any:
    """Poll `check` until it returns something truthy; a failing kubectl call counts as not yet."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except subprocess.CalledProcessError as exc:
            last = exc.stderr
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get_json(cluster: LocalCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def helm(*args: str, state: ClusterState | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The pinned helm, against `state`'s cluster when given (its kubeconfig)."""
    env = dict(os.environ)
    if state is not None:
        env["KUBECONFIG"] = str(state.kubeconfig)
    return subprocess.run(
        [str(binaries.binary("helm")), *args], capture_output=True, text=True, env=env, check=check, timeout=300
    )


def install_operator_rbac(cluster: LocalCluster, release: str, watch_namespaces: list[str] | None = None) -> Path:
    """Apply the chart's ServiceAccount and RBAC for `release`; return a kubeconfig holding its token."""
    cluster.kubectl("apply", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/ttsdeployments.voxscale.io", "--timeout=60s")
    cluster.kubectl("create", "namespace", OPERATOR_NAMESPACE, check=False)
    for ns in watch_namespaces or []:
        cluster.kubectl("create", "namespace", ns, check=False)
    args = ["template", release, str(CHART), "-n", OPERATOR_NAMESPACE]
    args += ["--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml"]
    if watch_namespaces:
        args += ["--set", "watchNamespaces={" + ",".join(watch_namespaces) + "}"]
    rendered = helm(*args).stdout
    cluster.kubectl("apply", "-f", "-", input=rendered)
    sa = next(d["metadata"]["name"] for d in yaml.safe_load_all(rendered) if d and d["kind"] == "ServiceAccount")
    token = cluster.kubectl("create", "token", sa, "-n", OPERATOR_NAMESPACE, "--duration=4h").stdout.strip()
    st = cluster.state
    assert st is not None
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "local",
                "cluster": {"server": st.apiserver_url, "certificate-authority": str(st.dir / "pki" / "ca.crt")},
            }
        ],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "local", "user": sa}}],
        "current-context": "operator",
    }
    path = st.dir / f"operator-{release}.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class OperatorProcess:
    kubeconfig: Path
    prometheus_url: str
    lease_name: str
    identity: str = field(default_factory=lambda: f"op-{uuid.uuid4().hex[:6]}")
    namespaces: list[str] = field(default_factory=list)
    lease_seconds: int = 15
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    health_port: int = 0  # set by start(): where /healthz answers, as the chart's liveness probe asks
    metrics_port: int = 0  # set by start(): where the operator's own /metrics answers
    extra_args: list[str] = field(default_factory=list)  # more `voxscale operator` flags

    def healthz(self) -> int:
        """The liveness probe's view: the HTTP status of GET /healthz (0 when nothing answers)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            return 0

    def start(self, log_dir: Path, metrics_port: int | None = None) -> OperatorProcess:
        self.log_path = log_dir / f"{self.identity}.log"
        self.health_port = free_port()
        self.metrics_port = metrics_port or free_port()
        cmd = [
            sys.executable,
            "-m",
            "voxscale.cli",
            "operator",
            f"--prometheus-url={self.prometheus_url}",
            f"--lease-namespace={OPERATOR_NAMESPACE}",
            f"--lease-name={self.lease_name}",
            f"--lease-seconds={self.lease_seconds}",
            f"--identity={self.identity}",
            f"--metrics-port={self.metrics_port}",
            f"--health-port={self.health_port}",
            "--bind=127.0.0.1",
        ]
        cmd += [f"--namespace={ns}" for ns in self.namespaces] + self.extra_args
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig))
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""

    def is_leader(self) -> bool:
        return f"{self.identity} now holds lease" in self.log()

    def wait_leader(self, timeout: float = 60) -> None:
        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"operator exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            return self.is_leader() and "Activity '_startup' succeeded" in self.log()

        wait_for(f"operator {self.identity} to lead", ready, timeout=timeout)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

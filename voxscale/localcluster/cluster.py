"""Start and stop a real Kubernetes control plane plus Prometheus on 127.0.0.1, for tests and the demo.

etcd, kube-apiserver (TLS, client-cert auth, RBAC), kube-controller-manager, kube-scheduler and
kwok (fake GPU nodes, pods with a model-loading cold start) run as plain processes from the binaries
built by `binaries.py`; Prometheus is Debian's. Everything a cluster writes lives in one state
folder, and `down` stops exactly the pids that `up` recorded there, then removes the folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from voxscale.localcluster import binaries, pki

STAGES_FILE = Path(__file__).with_name("kwok-stages.yaml")

# Labels that NVIDIA's GPU feature discovery puts on real GPU nodes; workloads select on them.
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
_NO_HONOR_DIR = "default-labels"  # file-sd targets scraped with honor_labels: false


def state_root() -> Path:
    env = os.environ.get("VOXSCALE_STATE_DIR")
    return Path(env) if env else Path(tempfile.gettempdir()) / f"voxscale-{os.getuid()}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _say(msg: str) -> None:
    print(f"[voxscale cluster] {msg}", file=sys.stderr, flush=True)


@dataclass
class ClusterState:
    """What `up` started and where; persisted as state.json so `down`/`env`/`status` can find it."""

    name: str
    directory: str
    etcd_port: int
    apiserver_port: int
    kwok_port: int
    prometheus_port: int
    gpu_nodes: int
    pids: dict[str, int] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return Path(self.directory)

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def apiserver_url(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def prometheus_url(self) -> str:
        return f"http://127.0.0.1:{self.prometheus_port}"

    @property
    def scrape_targets_dir(self) -> Path:
        return self.dir / "prometheus" / "targets"

    def save(self) -> None:
        (self.dir / "state.json").write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, name: str = "default") -> ClusterState | None:
        path = state_root() / name / "state.json"
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0); treat it as gone.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def write_kubeconfig(path: Path, server: str, ca: Path, client: pki.KeyPair, user: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "voxscale", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(client.cert), "client-key": str(client.key)}}],
        "contexts": [{"name": "voxscale", "context": {"cluster": "voxscale", "user": user}}],
        "current-context": "voxscale",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def gpu_node_manifest(index: int, gpus: int = 8) -> dict[str, object]:
    """A fake GPU node as kwok manages it, labelled the way GPU feature discovery labels real ones."""
    name = f"gpu-node-{index}"
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {FAKE_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "node.kubernetes.io/instance-type": "fake-gpu-8x-h100",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": GPU_PRODUCT,
                "nvidia.com/gpu.count": str(gpus),
                "nvidia.com/gpu.memory": "81559",
                "nvidia.com/gpu.family": "hopper",
            },
        },
    }


class LocalCluster:
    """Handle on one named local cluster (`default` unless told otherwise)."""

    def __init__(self, name: str = "default") -> None:
        self.name = name
        self.directory = state_root() / name

    # ----------------------------------------------------------------- queries
    @property
    def state(self) -> ClusterState | None:
        return ClusterState.load(self.name)

    def running(self) -> dict[str, bool]:
        st = self.state
        if st is None:
            return {}
        return {proc: _pid_alive(pid) for proc, pid in st.pids.items()}

    def is_up(self) -> bool:
        st = self.state
        return st is not None and bool(st.pids) and all(self.running().values()) and self._apiserver_ready(st)

    def env_lines(self) -> list[str]:
        st = self.state
        if st is None:
            raise RuntimeError(f"cluster {self.name!r} is not up; run `voxscale cluster up` first")
        k8s_bin = binaries.components()["kubernetes"].bin_dir
        helm_bin = binaries.components()["helm"].bin_dir
        return [
            f"export KUBECONFIG={st.kubeconfig}",
            f"export VOXSCALE_PROMETHEUS_URL={st.prometheus_url}",
            f'export PATH="{k8s_bin}:{helm_bin}:$PATH"',
        ]

    # ----------------------------------------------------------------- helpers for tests
    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        st = self._require_state()
        cmd = [str(binaries.binary("kubectl")), "--kubeconfig", str(st.kubeconfig), *args]
        return subprocess.run(cmd, input=input, capture_output=True, text=True, check=check, timeout=120)

    def set_scrape_targets(
        self, job: str, targets: list[str], labels: dict[str, str] | None = None, honor_labels: bool = True
    ) -> Path:
        """Point Prometheus at host:port targets (file service discovery; picked up within ~1 s).

        `honor_labels=False` scrapes them as a ServiceMonitor does by default: an exporter's own
        `pod`/`namespace` labels that clash with the target's `labels` arrive as `exported_pod`/...
        """
        path = self._targets_file(job, honor_labels)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps([{"targets": targets, "labels": {"job": job, **(labels or {})}}]))
        tmp.rename(path)
        return path

    def remove_scrape_targets(self, job: str) -> None:
        for honor in (True, False):
            self._targets_file(job, honor).unlink(missing_ok=True)

    def _targets_file(self, job: str, honor_labels: bool) -> Path:
        st = self._require_state()
        folder = st.scrape_targets_dir if honor_labels else st.scrape_targets_dir / _NO_HONOR_DIR
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{job}.json"

    def stop_process(self, name: str) -> None:
        """Stop one component (e.g. to test how clients cope with Prometheus going away)."""
        st = self._require_state()
        if _pid_alive(st.pids[name]):
            self._terminate(st.pids[name])

    def start_process(self, name: str) -> None:
        """Start a component stopped with stop_process() again, with the same command line."""
        st = self._require_state()
        if not _pid_alive(st.pids[name]):
            self._spawn(st, name, st.commands[name])

    # ----------------------------------------------------------------- lifecycle
    def up(self, gpu_nodes: int = 4, timeout: float = 120.0) -> ClusterState:
        if self.is_up():
            st = self.state
            assert st is not None
            return st
        if self.directory.exists():
            _say(f"found stale state in {self.directory}; cleaning it up first")
            self.down(quiet=True)
        binaries.ensure_all()
        prometheus = shutil.which("prometheus")
        if prometheus is None:
            raise RuntimeError("Prometheus is not installed: `apt-get install prometheus` (make test does this)")

        self.directory.mkdir(parents=True)
        st = ClusterState(
            name=self.name,
            directory=str(self.directory),
            etcd_port=_free_port(),
            apiserver_port=_free_port(),
            kwok_port=_free_port(),
            prometheus_port=_free_port(),
            gpu_nodes=gpu_nodes,
        )
        st.save()
        try:
            self._start(st, prometheus, timeout)
        except BaseException:
            _say(f"start-up failed; logs are in {st.dir / 'logs'}")
            self._print_log_tails(st)
            self.down(quiet=True, keep_logs=True)
            raise
        return st

    def _start(self, st: ClusterState, prometheus: str, timeout: float) -> None:
        d = st.dir
        (d / "logs").mkdir()
        ca = pki.LocalCA(d / "pki")
        serving = ca.issue(
            "apiserver",
            "kube-apiserver",
            server_names=("127.0.0.1", "localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"),
        )
        sa = pki.service_account_keys(d / "pki")
        admin = ca.issue("admin", "voxscale-admin", organization="system:masters")
        write_kubeconfig(st.kubeconfig, st.apiserver_url, ca.pair.cert, admin, "voxscale-admin")
        for component, cn in (
            ("controller-manager", "system:kube-controller-manager"),
            ("scheduler", "system:kube-scheduler"),
            # kwok plays every kubelet; it writes node and pod status for all fake nodes.
            ("kwok", "system:kwok"),
        ):
            org = "system:masters" if component == "kwok" else None
            pair = ca.issue(component, cn, organization=org)
            write_kubeconfig(d / f"{component}.kubeconfig", st.apiserver_url, ca.pair.cert, pair, cn)

        t0 = time.monotonic()
        _say(f"starting etcd on 127.0.0.1:{st.etcd_port}")
        peer = _free_port()
        self._spawn(
            st,
            "etcd",
            [
                str(binaries.binary("etcd")),
                "--name=voxscale",
                f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{st.etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{st.etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
                f"--initial-cluster=voxscale=http://127.0.0.1:{peer}",
                "--unsafe-no-fsync",  # throw-away test data; fsync makes a 2-core VM crawl
                "--log-level=warn",
            ],
        )
        self._wait(st, "etcd", lambda: self._http_ok(f"http://127.0.0.1:{st.etcd_port}/health"), timeout)

        _say(f"starting kube-apiserver on {st.apiserver_url} (RBAC on)")
        self._spawn(
            st,
            "kube-apiserver",
            [
                str(binaries.binary("kube-apiserver")),
                f"--etcd-servers=http://127.0.0.1:{st.etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={st.apiserver_port}",
                f"--tls-cert-file={serving.cert}",
                f"--tls-private-key-file={serving.key}",
                f"--client-ca-file={ca.pair.cert}",
                f"--service-account-key-file={sa.cert}",
                f"--service-account-signing-key-file={sa.key}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                # No kubelet or kube-proxy exists to route the `kubernetes` Service; don't maintain it.
                "--endpoint-reconciler-type=none",
                "--profiling=false",
            ],
        )
        self._wait(st, "kube-apiserver", lambda: self._apiserver_ready(st), timeout)

        _say("starting kube-controller-manager, kube-scheduler and kwok")
        self._spawn(
            st,
            "kube-controller-manager",
            [
                str(binaries.binary("kube-controller-manager")),
                f"--kubeconfig={d / 'controller-manager.kubeconfig'}",
                f"--authentication-kubeconfig={d / 'controller-manager.kubeconfig'}",
                f"--authorization-kubeconfig={d / 'controller-manager.kubeconfig'}",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={sa.key}",
                f"--root-ca-file={ca.pair.cert}",
                "--profiling=false",
            ],
        )
        self._spawn(
            st,
            "kube-scheduler",
            [
                str(binaries.binary("kube-scheduler")),
                f"--kubeconfig={d / 'scheduler.kubeconfig'}",
                f"--authentication-kubeconfig={d / 'scheduler.kubeconfig'}",
                f"--authorization-kubeconfig={d / 'scheduler.kubeconfig'}",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--leader-elect=false",
                "--profiling=false",
            ],
        )
        self._spawn(
            st,
            "kwok",
            [
                str(binaries.binary("kwok")),
                f"--kubeconfig={d / 'kwok.kubeconfig'}",
                f"--config={STAGES_FILE}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
                f"--server-address=127.0.0.1:{st.kwok_port}",
                "--cidr=10.244.0.0/16",
                "--node-ip=10.0.0.1",
                "--node-lease-duration-seconds=0",
            ],
        )

        _say(f"starting Prometheus on {st.prometheus_url} (1 s scrape interval)")
        self._write_prometheus_config(st)
        self._spawn(
            st,
            "prometheus",
            [
                prometheus,
                f"--config.file={d / 'prometheus' / 'prometheus.yml'}",
                f"--storage.tsdb.path={d / 'prometheus' / 'data'}",
                f"--web.listen-address=127.0.0.1:{st.prometheus_port}",
                "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=8d",  # a week of arrival history for the forecast floor
                "--log.level=warn",
            ],
        )

        nodes = [gpu_node_manifest(i) for i in range(st.gpu_nodes)]
        manifest = yaml.safe_dump_all(nodes)
        self._wait(
            st,
            "RBAC bootstrap",
            lambda: self.kubectl("apply", "-f", "-", input=manifest, check=False).returncode == 0,
            timeout,
        )
        _say(f"registered {st.gpu_nodes} fake GPU nodes ({GPU_PRODUCT}); waiting for them to be Ready")
        self._wait(st, "GPU nodes Ready", lambda: self._nodes_ready(st.gpu_nodes), timeout)
        self._wait(st, "Prometheus", lambda: self._http_ok(f"{st.prometheus_url}/-/ready"), timeout)
        self._wait(
            st,
            "default ServiceAccount",
            lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
            timeout,
        )
        _say(f"cluster {self.name!r} is up in {time.monotonic() - t0:.0f}s; `voxscale cluster env` prints its settings")

    def down(self, quiet: bool = False, keep_logs: bool = False) -> list[str]:
        """Stop exactly the processes `up` recorded, newest first, then remove the state folder."""
        st = self.state
        stopped: list[str] = []
        if st is not None:
            for proc, pid in reversed(list(st.pids.items())):
                if not _pid_alive(pid):
                    continue
                if proc.split("-")[0] not in _cmdline(pid) and proc not in _cmdline(pid):
                    continue  # the pid was reused by something that is not ours
                self._terminate(pid)
                stopped.append(proc)
        if self.directory.exists():
            if keep_logs and (self.directory / "logs").exists():
                dest = Path(tempfile.mkdtemp(prefix=f"voxscale-{self.name}-logs-"))
                shutil.copytree(self.directory / "logs", dest, dirs_exist_ok=True)
                _say(f"logs kept in {dest}")
            shutil.rmtree(self.directory, ignore_errors=True)
        if not quiet:
            _say(f"stopped {', '.join(stopped) if stopped else 'nothing (no cluster was running)'}")
        return stopped

    # ----------------------------------------------------------------- internals
    def _require_state(self) -> ClusterState:
        st = self.state
        if st is None:
            raise RuntimeError(f"cluster {self.name!r} is not up")
        return st

    def _spawn(self, st: ClusterState, name: str, cmd: list[str]) -> None:
        log = (st.dir / "logs" / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        st.pids[name] = proc.pid
        st.commands[name] = cmd
        st.save()

    @staticmethod
    def _terminate(pid: int, grace: float = 10.0) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not _pid_alive(pid):
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    def _wait(self, st: ClusterState, what: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [p for p, alive in self.running().items() if not alive]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}; see {st.dir / 'logs'}")
            with contextlib.suppress(Exception):
                if ready():
                    return
            time.sleep(0.25)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; see {st.dir / 'logs'}")

    @staticmethod
    def _http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _apiserver_ready(self, st: ClusterState) -> bool:
        pki_dir = st.dir / "pki"
        if not (pki_dir / "admin.crt").exists():
            return False
        ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
        ctx.load_cert_chain(str(pki_dir / "admin.crt"), str(pki_dir / "admin.key"))
        return self._http_ok(f"{st.apiserver_url}/readyz", ctx)

    def _nodes_ready(self, count: int) -> bool:
        out = self.kubectl("get", "nodes", "-o", "json").stdout
        ready = 0
        for node in json.loads(out)["items"]:
            conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            ready += conds.get("Ready") == "True"
        return ready >= count

    @staticmethod
    def _write_prometheus_config(st: ClusterState) -> None:
        st.scrape_targets_dir.mkdir(parents=True)
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {
                    "job_name": "voxscale-file-sd",
                    # Exporters here speak for pods (dcgm-exporter style): keep their pod/namespace labels.
                    "honor_labels": True,
                    "file_sd_configs": [{"files": [str(st.scrape_targets_dir / "*.json")], "refresh_interval": "1s"}],
                },
                {
                    "job_name": "voxscale-file-sd-default-labels",
                    # A ServiceMonitor's default: clashing exporter labels become exported_<name>.
                    "honor_labels": False,
                    "file_sd_configs": [
                        {"files": [str(st.scrape_targets_dir / _NO_HONOR_DIR / "*.json")], "refresh_interval": "1s"}
                    ],
                },
            ],
        }
        (st.dir / "prometheus" / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))

    @staticmethod
    def _print_log_tails(st: ClusterState, lines: int = 15) -> None:
        for log in sorted((st.dir / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            if tail:
                print(f"--- {log.name} (last {len(tail)} lines)", file=sys.stderr)
                print("\n".join(tail), file=sys.stderr)


@contextlib.contextmanager
def running_cluster(name: str = "default", gpu_nodes: int = 4) -> Iterator[ClusterState]:
    """Bring a cluster up for the duration of a block, and down afterwards if this block started it."""
    cluster = LocalCluster(name)
    started_here = not cluster.is_up()
    st = cluster.up(gpu_nodes=gpu_nodes)
    try:
        yield st
    finally:
        if started_here:
            cluster.down(quiet=True)

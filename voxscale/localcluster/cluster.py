"""Start and stop a real Kubernetes control plane plus Prometheus on 127.0.0.1, for tests and the demo.

etcd, kube-apiserver (TLS, client-cert auth, RBAC), kube-controller-manager, kube-scheduler and
kwok (fake GPU nodes, pods with a model-loading cold start) run as plain processes from the binaries
built by `binaries.py`; Prometheus is Debian's. Each process is one `Component` in `COMPONENTS`, so
adding a process is adding an entry. Everything a cluster writes lives in one state folder, and
`down` stops exactly the pids that `up` recorded there, then removes the folder.
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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from voxscale.localcluster import binaries, pki, realnode
from voxscale.localcluster.procs import cmdline as _cmdline
from voxscale.localcluster.procs import http_ok as _http_ok
from voxscale.localcluster.procs import pid_alive as _pid_alive

STAGES_FILE = Path(__file__).with_name("kwok-stages.yaml")

# Labels that NVIDIA's GPU feature discovery puts on real GPU nodes; workloads select on them.
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
_NO_HONOR_DIR = "default-labels"  # file-sd targets scraped with honor_labels: false


OWNER_ENV = "VOXSCALE_CLUSTER_OWNER"


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
    real_node: bool = False  # a real kubelet node besides kwok's fake ones (components enabled on it)
    # kube-controller-manager's and kube-scheduler's client QPS (burst twice it); 0: their defaults
    # (20 and 50 QPS), which make a bench creating thousands of pods wait on client-side throttling.
    api_qps: int = 0
    # The real node's local ports (0 without one).
    kubelet_port: int = 0
    kubelet_healthz_port: int = 0
    kube_proxy_healthz_port: int = 0
    kube_proxy_metrics_port: int = 0
    pids: dict[str, int] = field(default_factory=dict)
    commands: dict[str, list[str]] = field(default_factory=dict)
    # Who started it ($VOXSCALE_CLUSTER_OWNER, inherited by subprocesses): a test session finds the
    # clusters it left behind by this, and never mistakes a neighbour's cluster for its own.
    owner: str = ""
    # Processes `down` stopped with SIGTERM alone (not SIGKILL after the grace period): a cleanup
    # may trust what such a process left on disk.
    stopped_cleanly: list[str] = field(default_factory=list)

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
        known = {f.name for f in fields(cls)}
        # A state.json from another version may lack newer fields (defaults apply) or carry unknown ones.
        return cls(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})


def _apiserver_ready(st: ClusterState) -> bool:
    pki_dir = st.dir / "pki"
    if not (pki_dir / "admin.crt").exists():
        return False
    ctx = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
    ctx.load_cert_chain(str(pki_dir / "admin.crt"), str(pki_dir / "admin.key"))
    return _http_ok(f"{st.apiserver_url}/readyz", ctx)


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


# ===================================================================== the component table
@dataclass(frozen=True)
class ClusterContext:
    """What a component's start-up hooks need: the cluster, its state, and the PKI `up` made for it."""

    cluster: LocalCluster
    state: ClusterState
    ca: pki.LocalCA
    serving: pki.KeyPair  # the API server's TLS certificate
    service_account: pki.KeyPair  # signs and verifies ServiceAccount tokens
    prometheus: str  # the Prometheus binary `up` found on PATH
    timeout: float  # for each readiness wait

    def kubeconfig(self, stem: str) -> Path:
        return self.state.dir / f"{stem}.kubeconfig"

    def issue_kubeconfig(self, stem: str, user: str, organization: str | None = None, path: Path | None = None) -> Path:
        """Issue a client cert for `user` (RBAC subject) and write the kubeconfig that presents it."""
        pair = self.ca.issue(stem, user, organization=organization)
        path = path or self.kubeconfig(stem)
        write_kubeconfig(path, self.state.apiserver_url, self.ca.pair.cert, pair, user)
        return path

    def wait(self, what: str, ready: Callable[[], bool]) -> None:
        self.cluster._wait(self.state, what, ready, self.timeout)


def always(st: ClusterState) -> bool:
    """The default `Component.enabled`: part of every cluster."""
    return True


def _has_real_node(st: ClusterState) -> bool:
    return st.real_node


@dataclass(frozen=True)
class Component:
    """One process of the local cluster: how `up` starts it and what `down` undoes after stopping it.

    `up` takes the enabled components in table order and, for each: logs `describe`, runs `prepare`
    (config files the command reads), spawns `command` (recorded in the state, so `start_process`
    can rerun it), polls `ready`, then runs `after_ready` (one-off work that needs it running).
    `down` goes through them in reverse order: it stops the process, then calls `cleanup`, even when
    the process had already died or was never started, so `cleanup` must be idempotent; it is for
    what outlives a process (mounts, network interfaces, iptables rules).
    """

    name: str  # key in ClusterState.pids/commands and the log file's name
    command: Callable[[ClusterContext], list[str]]
    describe: Callable[[ClusterContext], str] | None = None  # the "starting ..." line; default names it
    # Hooks; what prepare, after_ready and cleanup return is ignored.
    prepare: Callable[[ClusterContext], object] | None = None
    ready: Callable[[ClusterContext], bool] | None = None  # None: nothing to wait for
    after_ready: Callable[[ClusterContext], object] | None = None
    cleanup: Callable[[ClusterState], object] | None = None
    enabled: Callable[[ClusterState], bool] = always


def _etcd_command(ctx: ClusterContext) -> list[str]:
    client = f"http://127.0.0.1:{ctx.state.etcd_port}"
    peer = f"http://127.0.0.1:{_free_port()}"
    return [
        str(binaries.binary("etcd")),
        "--name=voxscale",
        f"--data-dir={ctx.state.dir / 'etcd'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=voxscale={peer}",
        "--unsafe-no-fsync",  # throw-away test data; fsync makes a 2-core VM crawl
        "--log-level=warn",
    ]


def _apiserver_command(ctx: ClusterContext) -> list[str]:
    return [
        str(binaries.binary("kube-apiserver")),
        f"--etcd-servers=http://127.0.0.1:{ctx.state.etcd_port}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        f"--secure-port={ctx.state.apiserver_port}",
        f"--tls-cert-file={ctx.serving.cert}",
        f"--tls-private-key-file={ctx.serving.key}",
        f"--client-ca-file={ctx.ca.pair.cert}",
        f"--service-account-key-file={ctx.service_account.cert}",
        f"--service-account-signing-key-file={ctx.service_account.key}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        "--service-cluster-ip-range=10.96.0.0/16",
        "--authorization-mode=RBAC",
        "--allow-privileged=true",
        # No kubelet or kube-proxy exists to route the `kubernetes` Service; don't maintain it.
        "--endpoint-reconciler-type=none",
        # A real node's kubelet (cluster up --real-node) is reached at its InternalIP (no DNS here)
        # and admits the API server by this client certificate (for kubectl logs/exec).
        "--kubelet-preferred-address-types=InternalIP",
        f"--kubelet-client-certificate={ctx.state.dir / 'pki' / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={ctx.state.dir / 'pki' / 'apiserver-kubelet-client.key'}",
        *_aggregation_flags(ctx),
        "--profiling=false",
    ]


def _aggregation_flags(ctx: ClusterContext) -> list[str]:
    """The aggregation layer, so an APIService (metrics-server's v1beta1.metrics.k8s.io) is served
    through this API server: it forwards the caller's identity in X-Remote-* headers, presenting the
    front-proxy client cert (pki.front_proxy, made by `_setup_pki`).

    Aggregator routing sends a request to the APIService's endpoint address itself instead of its
    Service's ClusterIP: this API server is a host process, and a ClusterIP is reachable from the host
    only through kube-proxy's rules, which a cluster without a real node does not have. The endpoint is
    the real node's bridge address (metricsserver.py) or a pod on it, both local to this machine; it
    also applies to webhooks, which no component here registers."""
    fp = pki.front_proxy_files(ctx.state.dir / "pki")
    headers = [f"--requestheader-{flag}={value}" for flag, value in pki.REQUEST_HEADERS.items()]
    return [
        f"--requestheader-client-ca-file={fp.ca}",
        f"--requestheader-allowed-names={pki.FRONT_PROXY_CLIENT}",
        *headers,
        f"--proxy-client-cert-file={fp.client.cert}",
        f"--proxy-client-key-file={fp.client.key}",
        "--enable-aggregator-routing=true",
    ]


def _kubeconfig_flags(kubeconfig: Path) -> list[str]:
    """A controller's API client and its delegated authn/authz all use its own identity."""
    return [
        f"--{flag}={kubeconfig}" for flag in ("kubeconfig", "authentication-kubeconfig", "authorization-kubeconfig")
    ]


def _controller_manager_command(ctx: ClusterContext) -> list[str]:
    return [
        str(binaries.binary("kube-controller-manager")),
        *_kubeconfig_flags(ctx.kubeconfig("controller-manager")),
        "--bind-address=127.0.0.1",
        "--secure-port=0",
        "--leader-elect=false",
        "--use-service-account-credentials=true",
        f"--service-account-private-key-file={ctx.service_account.key}",
        f"--root-ca-file={ctx.ca.pair.cert}",
        "--profiling=false",
        *_api_qps_flags(ctx.state),
    ]


def _scheduler_command(ctx: ClusterContext) -> list[str]:
    return [
        str(binaries.binary("kube-scheduler")),
        *_kubeconfig_flags(ctx.kubeconfig("scheduler")),
        "--bind-address=127.0.0.1",
        "--secure-port=0",
        "--leader-elect=false",
        "--profiling=false",
        *_api_qps_flags(ctx.state),
    ]


def _api_qps_flags(st: ClusterState) -> list[str]:
    """A controller's client rate limit when `up(api_qps=...)` raised it (opt-in: the defaults otherwise)."""
    return [f"--kube-api-qps={st.api_qps}", f"--kube-api-burst={2 * st.api_qps}"] if st.api_qps > 0 else []


def _kwok_command(ctx: ClusterContext) -> list[str]:
    return [
        str(binaries.binary("kwok")),
        f"--kubeconfig={ctx.kubeconfig('kwok')}",
        f"--config={STAGES_FILE}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
        f"--server-address=127.0.0.1:{ctx.state.kwok_port}",
        "--cidr=10.244.0.0/16",
        "--node-ip=10.0.0.1",
        "--node-lease-duration-seconds=0",
    ]


def _register_gpu_nodes(ctx: ClusterContext) -> None:
    manifest = yaml.safe_dump_all([gpu_node_manifest(i) for i in range(ctx.state.gpu_nodes)])
    ctx.wait(
        "RBAC bootstrap",
        lambda: ctx.cluster.kubectl("apply", "-f", "-", input=manifest, check=False).returncode == 0,
    )
    _say(f"registered {ctx.state.gpu_nodes} fake GPU nodes ({GPU_PRODUCT}); waiting for them to be Ready")


def _prometheus_command(ctx: ClusterContext) -> list[str]:
    d = ctx.state.dir / "prometheus"
    return [
        ctx.prometheus,
        f"--config.file={d / 'prometheus.yml'}",
        f"--storage.tsdb.path={d / 'data'}",
        f"--web.listen-address=127.0.0.1:{ctx.state.prometheus_port}",
        "--web.enable-lifecycle",
        "--storage.tsdb.retention.time=8d",  # a week of arrival history for the forecast floor
        "--log.level=warn",
    ]


def _write_prometheus_config(ctx: ClusterContext) -> None:
    targets = ctx.state.scrape_targets_dir
    targets.mkdir(parents=True)
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [
            {
                "job_name": "voxscale-file-sd",
                # Exporters here speak for pods (dcgm-exporter style): keep their pod/namespace labels.
                "honor_labels": True,
                "file_sd_configs": [{"files": [str(targets / "*.json")], "refresh_interval": "1s"}],
            },
            {
                "job_name": "voxscale-file-sd-default-labels",
                # A ServiceMonitor's default: clashing exporter labels become exported_<name>.
                "honor_labels": False,
                "file_sd_configs": [{"files": [str(targets / _NO_HONOR_DIR / "*.json")], "refresh_interval": "1s"}],
            },
        ],
    }
    if ctx.state.real_node:
        # Pods on the real node are found as a cluster's Prometheus finds them: Kubernetes SD.
        ctx.ca.issue("prometheus", realnode.PROMETHEUS_USER)
        config["scrape_configs"].append(realnode.scrape_config(ctx.state))
    (ctx.state.dir / "prometheus" / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))


COMPONENTS: tuple[Component, ...] = (
    Component(
        "etcd",
        _etcd_command,
        describe=lambda ctx: f"starting etcd on 127.0.0.1:{ctx.state.etcd_port}",
        ready=lambda ctx: _http_ok(f"http://127.0.0.1:{ctx.state.etcd_port}/health"),
    ),
    Component(
        "kube-apiserver",
        _apiserver_command,
        describe=lambda ctx: f"starting kube-apiserver on {ctx.state.apiserver_url} (RBAC on)",
        ready=lambda ctx: _apiserver_ready(ctx.state),
    ),
    Component(
        "kube-controller-manager",
        _controller_manager_command,
        prepare=lambda ctx: ctx.issue_kubeconfig("controller-manager", "system:kube-controller-manager"),
    ),
    Component(
        "kube-scheduler",
        _scheduler_command,
        prepare=lambda ctx: ctx.issue_kubeconfig("scheduler", "system:kube-scheduler"),
    ),
    Component(
        "kwok",
        _kwok_command,
        describe=lambda ctx: f"starting kwok on 127.0.0.1:{ctx.state.kwok_port} (it plays every fake node's kubelet)",
        # kwok writes node and pod status for every fake node, so it gets cluster-admin.
        prepare=lambda ctx: ctx.issue_kubeconfig("kwok", "system:kwok", "system:masters"),
        after_ready=_register_gpu_nodes,
    ),
    Component(
        "prometheus",
        _prometheus_command,
        describe=lambda ctx: f"starting Prometheus on {ctx.state.prometheus_url} (1 s scrape interval)",
        prepare=_write_prometheus_config,
        ready=lambda ctx: _http_ok(f"{ctx.state.prometheus_url}/-/ready"),
    ),
    # The real worker node (`up(real_node=True)`); see realnode.py.
    Component(
        "containerd",
        realnode.containerd_command,
        describe=lambda ctx: f"starting containerd for the real node (images kept in {realnode.containerd_root()})",
        prepare=realnode.prepare_containerd,
        ready=realnode.containerd_ready,
        after_ready=realnode.load_pause_image,
        cleanup=realnode.cleanup_containerd,
        enabled=_has_real_node,
    ),
    Component(
        "kubelet",
        realnode.kubelet_command,
        describe=lambda ctx: f"starting a kubelet: node {realnode.NODE_NAME}, real containers on {realnode.POD_CIDR}",
        prepare=realnode.prepare_kubelet,
        ready=realnode.kubelet_ready,
        cleanup=realnode.cleanup_kubelet,
        enabled=_has_real_node,
    ),
    Component(
        "kube-proxy",
        realnode.kube_proxy_command,
        describe=lambda ctx: "starting kube-proxy (iptables mode) so Services reach the real node's pods",
        prepare=realnode.prepare_kube_proxy,
        ready=realnode.kube_proxy_ready,
        cleanup=realnode.cleanup_kube_proxy,
        enabled=_has_real_node,
    ),
)


def enabled_components(st: ClusterState, table: tuple[Component, ...] | None = None) -> list[Component]:
    """The entries of `table` (default: COMPONENTS) that this cluster runs, in start order."""
    return [c for c in (COMPONENTS if table is None else table) if c.enabled(st)]


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
        return st is not None and bool(st.pids) and all(self.running().values()) and _apiserver_ready(st)

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

    def load_images(self, refs: list[str]) -> list[str]:
        """Copy images from podman's store into the real node's containerd (as `kind load` does);
        returns those actually copied (an image already there under the same ID is skipped)."""
        st = self._require_state()
        if not st.real_node:
            raise RuntimeError(f"cluster {self.name!r} has no real node to load images into; `cluster up --real-node`")
        return realnode.load_images(st, refs, say=_say)

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
    def up(self, gpu_nodes: int = 4, timeout: float = 120.0, real_node: bool = False, api_qps: int = 0) -> ClusterState:
        """`api_qps` > 0: kube-controller-manager and kube-scheduler send up to that many requests a
        second (burst twice it) instead of their defaults; for benches that create thousands of pods."""
        if self.is_up():
            st = self.state
            assert st is not None
            return st
        if self.directory.exists():
            _say(f"found stale state in {self.directory}; cleaning it up first")
            self.down(quiet=True)
        binaries.ensure_all(binaries.needed(real_node))
        # A real node's pods are found by Kubernetes service discovery, which Debian's build lacks.
        prometheus = str(binaries.binary("prometheus")) if real_node else shutil.which("prometheus")
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
            real_node=real_node,
            api_qps=api_qps,
            owner=os.environ.get(OWNER_ENV, ""),
        )
        if real_node:
            st.kubelet_port, st.kubelet_healthz_port = _free_port(), _free_port()
            st.kube_proxy_healthz_port, st.kube_proxy_metrics_port = _free_port(), _free_port()
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
        (st.dir / "logs").mkdir()
        ctx = self._setup_pki(st, prometheus, timeout)
        t0 = time.monotonic()
        for component in enabled_components(st):
            self._launch(ctx, component)
        ctx.wait("GPU nodes Ready", lambda: self._nodes_ready(st.gpu_nodes))
        ctx.wait(
            "default ServiceAccount",
            lambda: self.kubectl("get", "serviceaccount", "default", check=False).returncode == 0,
        )
        _say(f"cluster {self.name!r} is up in {time.monotonic() - t0:.0f}s; `voxscale cluster env` prints its settings")

    def _setup_pki(self, st: ClusterState, prometheus: str, timeout: float) -> ClusterContext:
        """The CA, the API server's serving cert, the ServiceAccount keys and the admin kubeconfig."""
        ca = pki.LocalCA(st.dir / "pki")
        # A real node's pods reach the API server at the node's bridge address (realnode.api_server_env).
        names: tuple[str, ...] = (
            "127.0.0.1",
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
        )
        names += (realnode.NODE_IP,) if st.real_node else ()
        ctx = ClusterContext(
            cluster=self,
            state=st,
            ca=ca,
            serving=ca.issue(
                "apiserver",
                "kube-apiserver",
                server_names=names,
            ),
            service_account=pki.service_account_keys(st.dir / "pki"),
            prometheus=prometheus,
            timeout=timeout,
        )
        ctx.issue_kubeconfig("admin", "voxscale-admin", "system:masters", path=st.kubeconfig)
        ca.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client")  # what a kubelet admits
        pki.front_proxy(st.dir / "pki")  # the aggregation layer's own CA and client cert
        return ctx

    def _launch(self, ctx: ClusterContext, component: Component) -> None:
        """prepare -> spawn -> wait until ready -> after_ready, for one component."""
        _say(component.describe(ctx) if component.describe else f"starting {component.name}")
        if component.prepare:
            component.prepare(ctx)
        self._spawn(ctx.state, component.name, component.command(ctx))
        if component.ready:
            ctx.wait(component.name, partial(component.ready, ctx))
        if component.after_ready:
            component.after_ready(ctx)

    def down(self, quiet: bool = False, keep_logs: bool = False) -> list[str]:
        """Stop exactly the processes `up` recorded and clean up after them, newest first, then remove
        the state folder."""
        st = self.state
        stopped = self._stop_components(st) if st is not None else []
        if self.directory.exists():
            if keep_logs and (self.directory / "logs").exists():
                dest = Path(tempfile.mkdtemp(prefix=f"voxscale-{self.name}-logs-"))
                shutil.copytree(self.directory / "logs", dest, dirs_exist_ok=True)
                _say(f"logs kept in {dest}")
            shutil.rmtree(self.directory, ignore_errors=True)
        if not quiet:
            _say(f"stopped {', '.join(stopped) if stopped else 'nothing (no cluster was running)'}")
        return stopped

    def _stop_components(self, st: ClusterState) -> list[str]:
        """Each enabled component in reverse start order: stop its process, then run its cleanup,
        whether or not the process was still running. Returns the names of the processes stopped."""
        components = enabled_components(st)
        known = {c.name for c in components}
        # Processes no enabled entry names (a state.json written by another version) go first.
        stopped = [name for name in reversed(list(st.pids)) if name not in known and self._stop_ours(st, name)]
        for component in reversed(components):
            if component.name in st.pids and self._stop_ours(st, component.name):
                stopped.append(component.name)
            if component.cleanup:
                try:
                    component.cleanup(st)
                except Exception as exc:  # one failed cleanup must not leave the others' processes running
                    _say(f"cleanup of {component.name} failed: {exc}")
        return stopped

    def _stop_ours(self, st: ClusterState, name: str) -> bool:
        """Stop the process recorded as `name` if it still runs and is still ours; True if it was stopped."""
        pid = st.pids[name]
        if not _pid_alive(pid):
            return False
        if name.split("-")[0] not in _cmdline(pid) and name not in _cmdline(pid):
            return False  # the pid was reused by something that is not ours
        if self._terminate(pid):
            st.stopped_cleanly.append(name)
        return True

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
    def _terminate(pid: int, grace: float = 30.0) -> bool:
        """SIGTERM, then SIGKILL after `grace` seconds. True when SIGTERM alone stopped it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            if not _pid_alive(pid):
                return True
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        return False

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

    def _nodes_ready(self, count: int) -> bool:
        out = self.kubectl("get", "nodes", "-o", "json").stdout
        ready = 0
        for node in json.loads(out)["items"]:
            conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
            ready += conds.get("Ready") == "True"
        return ready >= count

    @staticmethod
    def _print_log_tails(st: ClusterState, lines: int = 15) -> None:
        for log in sorted((st.dir / "logs").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            if tail:
                print(f"--- {log.name} (last {len(tail)} lines)", file=sys.stderr)
                print("\n".join(tail), file=sys.stderr)


@contextlib.contextmanager
def running_cluster(name: str = "default", gpu_nodes: int = 4, real_node: bool = False) -> Iterator[ClusterState]:
    """Bring a cluster up for the duration of a block, and down afterwards if this block started it."""
    cluster = LocalCluster(name)
    started_here = not cluster.is_up()
    st = cluster.up(gpu_nodes=gpu_nodes, real_node=real_node)
    try:
        yield st
    finally:
        if started_here:
            cluster.down(quiet=True)

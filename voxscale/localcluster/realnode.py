"""A real worker node beside the fake GPU nodes: containerd, a kubelet and kube-proxy on this machine.

Pods scheduled on it are real containers (runc) on a CNI bridge, reachable from the host on their
pod IPs and through Services (kube-proxy's iptables rules). It is what `voxscale cluster up
--real-node` adds; the kwok nodes stay for the big-fleet view.

Limits that shape the choices here:
- The control plane and Prometheus listen on 127.0.0.1 only, which a pod on the bridge cannot
  reach by itself. The node forwards exactly those two ports from its bridge address to loopback
  (`_forward_to_loopback`: the bridge's route_localnet and a nat DNAT for pod-CIDR sources, as
  kube-proxy does for localhost NodePorts), and the API server's certificate names that address.
  So the operator runs on the pod network like any pod (two replicas on one node do not clash) and is
  told the API server's and Prometheus' addresses (`api_server_env`, `prometheus_url`). Nothing
  listens on another interface: only packets that enter on the bridge from a pod are forwarded.
- No outside registry is reachable: images are copied from podman's store into containerd's
  (`load_images`, like `kind load`), the sandbox ("pause") image included, which is built here.
  A registry on 127.0.0.1 (registry.py) can be added for what must be a real pull (the image
  pre-pull bench): containerd reads per-registry hosts.toml files from `hosts_dir`, where
  `allow_plain_http_registry` declares that one's plain-HTTP address.
- One real node per machine: the bridge, the iptables rules and containerd's image store are
  machine-wide. The image store lives in the cache (~/.cache/voxscale/containerd) so a 6 GB
  inference image is copied once, not once per cluster.
- Root here has no CAP_SYS_RESOURCE: containerd must not lower oom_score_adj
  (`restrict_oom_score_adj`), and the kubelet must accept the host's hybrid cgroup v1 layout
  (`failCgroupV1: false`).

`down` leaves nothing behind: containers killed, mounts under the state folder unmounted, the
bridge deleted (its route_localnet with it), kube-proxy's, the kubelet's and the forwarding's
iptables chains removed, the kubepods cgroups removed, and the sysctls the bridge plugin changes
restored.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import yaml

from voxscale.localcluster import binaries
from voxscale.localcluster.procs import cmdline as _cmdline
from voxscale.localcluster.procs import http_ok, pid_alive

if TYPE_CHECKING:
    from voxscale.localcluster.cluster import ClusterContext, ClusterState

NODE_NAME = "real-node-0"
NODE_LABEL = "voxscale.dev/real-node"  # value "true"; pods meant for real containers select it
BRIDGE = "vxs0"
POD_CIDR = "10.233.0.0/24"
NODE_IP = "10.233.0.1"  # the bridge's (the pods' gateway): the node's InternalIP and the kubelet's address
PAUSE_IMAGE = f"localhost/voxscale/pause:{binaries.pinned_versions()['pause']}"
CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
CNI_PLUGINS = ("bridge", "host-local", "loopback")
# Host settings the CNI bridge plugin (ip_forward) or kube-proxy may change; restored by `down`.
SYSCTLS = (
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/netfilter/nf_conntrack_max",
)
# Chains the kubelet makes (kube-proxy --cleanup removes its own).
KUBELET_CHAINS = ("KUBE-KUBELET-CANARY", "KUBE-FIREWALL", "KUBE-IPTABLES-HINT")
PROMETHEUS_USER = "voxscale-local:prometheus"  # its client certificate, ClusterRole and binding
# nat chain of the DNAT rules that let pods reach the API server and Prometheus on loopback.
FORWARD_CHAIN = "VOXSCALE-LOOPBACK"


def containerd_root() -> Path:
    """containerd's content and snapshots: kept across clusters so images are imported once."""
    return binaries.cache_root() / "containerd"


def _node_dir(st: ClusterState) -> Path:
    return st.dir / "node"


def socket_path(st: ClusterState) -> Path:
    return _node_dir(st) / "containerd.sock"


def ctr(
    st: ClusterState, *args: str, check: bool = True, stdin: IO[bytes] | None = None
) -> subprocess.CompletedProcess[str]:
    """containerd's own CLI against this cluster's containerd, in the namespace the CRI uses."""
    cmd = ["ctr", "--address", str(socket_path(st)), "--namespace", "k8s.io", *args]
    return subprocess.run(cmd, stdin=stdin, capture_output=True, text=True, check=check, timeout=900)


def missing_host_tools() -> list[str]:
    """What `--real-node` needs from Debian's packages (hack/install-system-deps.sh installs them)."""
    tools = ["containerd", "ctr", "runc", "podman", "iptables", "ip"]
    missing = [t for t in tools if shutil.which(t) is None and not Path("/usr/sbin", t).exists()]
    missing += [f"{CNI_BIN_DIR}/{p}" for p in CNI_PLUGINS if not Path(CNI_BIN_DIR, p).exists()]
    return missing


def other_real_node(st: ClusterState) -> str | None:
    """The name of another local cluster whose real node is still up (there can be one per machine)."""
    from voxscale.localcluster.cluster import ClusterState, state_root

    for path in state_root().glob("*/state.json"):
        with contextlib.suppress(Exception):
            other = ClusterState.load(path.parent.name)
            if other and other.name != st.name and other.real_node and pid_alive(other.pids.get("containerd", -1)):
                return other.name
    return None


# ===================================================================== containerd
def prepare_containerd(ctx: ClusterContext) -> None:
    st = ctx.state
    missing = missing_host_tools()
    if missing:
        raise RuntimeError(f"--real-node needs {', '.join(missing)}: run hack/install-system-deps.sh (make test does)")
    if (other := other_real_node(st)) is not None:
        raise RuntimeError(
            f"cluster {other!r} already runs this machine's real node; `voxscale cluster down --name {other}` first"
        )
    node = _node_dir(st)
    (node / "cni" / "net.d").mkdir(parents=True, exist_ok=True)
    _owner_mark(st).touch()  # from here on, the machine-wide pieces are this cluster's to clean up
    _open_image_store()
    _save_sysctls(st)
    _make_bridge()
    (node / "containerd.toml").write_text(_containerd_config(st))
    (node / "cni" / "net.d" / "10-voxscale.conflist").write_text(json.dumps(_cni_config(st), indent=1))


# In containerd's root while no containerd uses it and the last one stopped on SIGTERM alone.
CLEAN_STOP_MARK = ".voxscale-stopped-cleanly"


def _open_image_store() -> None:
    """Start from an empty image store unless the last containerd stopped cleanly. containerd keeps
    its metadata and the overlay snapshotter's in two databases; a containerd killed mid-import (a
    run interrupted, SIGKILL after the grace period) can leave them disagreeing, and every later
    import then fails with "parent snapshot ... does not exist". The store is a cache: re-importing
    costs minutes, a corrupt one costs every real-node run after it."""
    root = containerd_root()
    mark = root / CLEAN_STOP_MARK
    if root.exists() and not mark.exists() and any(root.iterdir()):
        print(
            f"[voxscale cluster] containerd's image store {root} was not stopped cleanly last time "
            "(an interrupted run); starting it empty, images are copied again",
            file=sys.stderr,
            flush=True,
        )
        _unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    mark.unlink(missing_ok=True)


def _make_bridge() -> None:
    """The pods' bridge with its gateway address, made before the CNI plugin would make it, so the
    kubelet can use that address as the node's: local to this machine, not loopback (which a
    kubelet refuses), and reachable from the API server for `kubectl logs/exec` and from pods."""
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)  # a stale one
    for cmd in (
        ["ip", "link", "add", BRIDGE, "type", "bridge"],
        ["ip", "addr", "add", f"{NODE_IP}/{POD_CIDR.split('/')[1]}", "dev", BRIDGE],
        ["ip", "link", "set", BRIDGE, "up"],
    ):
        subprocess.run(cmd, capture_output=True, text=True, check=True)


def _forward_to_loopback(st: ClusterState) -> None:
    """Let pods reach the API server and Prometheus, which listen on 127.0.0.1 only, at the node's
    bridge address: a DNAT of pod-CIDR traffic that enters on the bridge for NODE_IP:<port> to
    127.0.0.1:<port> (those two ports only), and route_localnet on the bridge alone, without which
    the kernel drops a packet routed to loopback from another interface as a martian (kube-proxy's
    localhost NodePorts do the same). The replies are un-NATed by conntrack, so a pod sees NODE_IP
    answer. The kubelet's KUBE-FIREWALL drop of non-loopback sources to 127/8 exempts DNATed
    connections. The sysctl goes with the bridge; `cleanup_kubelet` removes the chain."""
    delete_chains((FORWARD_CHAIN,))  # a stale one from a run killed before its clean-up
    Path("/proc/sys/net/ipv4/conf", BRIDGE, "route_localnet").write_text("1")
    nat = ["iptables", "-w", "-t", "nat"]
    rules = [[*nat, "-N", FORWARD_CHAIN]]
    for port in (st.apiserver_port, st.prometheus_port):
        dnat = ["-p", "tcp", "--dport", str(port), "-j", "DNAT", "--to-destination", f"127.0.0.1:{port}"]
        rules.append([*nat, "-A", FORWARD_CHAIN, *dnat])
    pods_to_node = ["-i", BRIDGE, "-s", POD_CIDR, "-d", NODE_IP, "-p", "tcp", "-j", FORWARD_CHAIN]
    rules.append([*nat, "-I", "PREROUTING", *pods_to_node])
    for cmd in rules:
        subprocess.run(cmd, capture_output=True, text=True, check=True)


def _containerd_config(st: ClusterState) -> str:
    node = _node_dir(st)
    cri = {
        "sandbox_image": PAUSE_IMAGE,
        "disable_apparmor": True,
        "restrict_oom_score_adj": True,  # no CAP_SYS_RESOURCE: a negative oom_score_adj fails runc
        "netns_mounts_under_state_dir": True,  # so `down` finds them under the state folder
        "stream_server_address": "127.0.0.1",
        "stream_server_port": "0",
        "containerd": {
            "snapshotter": "overlayfs",
            "default_runtime_name": "runc",
            "runtimes": {
                "runc": {
                    "runtime_type": "io.containerd.runc.v2",
                    "options": {"SystemdCgroup": False, "BinaryName": shutil.which("runc") or "/usr/sbin/runc"},
                }
            },
        },
        "cni": {"bin_dir": CNI_BIN_DIR, "conf_dir": str(node / "cni" / "net.d")},
        # Read at each pull, so a registry started after containerd is found (allow_plain_http_registry).
        "registry": {"config_path": str(hosts_dir(st))},
    }
    config = {
        "version": 2,
        "root": str(containerd_root()),
        "state": str(node / "containerd-state"),
        "grpc": {"address": str(socket_path(st))},
        "ttrpc": {"address": str(node / "containerd-ttrpc.sock")},
        "debug": {"level": "warn"},
        "plugins": {"io.containerd.grpc.v1.cri": cri},
    }
    return _toml(config)


def hosts_dir(st: ClusterState) -> Path:
    """containerd's registry hosts folder: <registry host:port>/hosts.toml for each registry it may use."""
    return _node_dir(st) / "certs.d"


def registry_hosts_toml(address: str) -> str:
    """A hosts.toml that sends pulls of `<address>/...` images to that registry over plain HTTP (a
    registry on loopback serves no TLS; containerd otherwise speaks HTTPS to every registry)."""
    url = f"http://{address}"
    return f'server = "{url}"\n\n[host."{url}"]\n  capabilities = ["pull", "resolve"]\n'


def allow_plain_http_registry(st: ClusterState, address: str) -> Path:
    """Let the real node's containerd (so the kubelet) pull from the registry at `address`
    (127.0.0.1:<port>). Image pulls are made by containerd on the host, so loopback is reachable
    although the pods' network is not. Returns the hosts.toml written."""
    path = hosts_dir(st) / address / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(registry_hosts_toml(address))
    return path


def images(st: ClusterState) -> dict[str, str]:
    """Every image name containerd's CRI namespace holds (tags, repo@digest and the CRI's sha256:<id>
    names) -> the manifest digest it points at."""
    out = {}
    for line in ctr(st, "images", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3:
            out[fields[0]] = fields[2]
    return out


def snapshot_keys(st: ClusterState) -> set[str]:
    """The overlayfs snapshots containerd holds; an unpacked layer stack's keys are its chain IDs."""
    return {line.split()[0] for line in ctr(st, "snapshots", "ls").stdout.splitlines()[1:] if line.split()}


def remove_exited_containers(st: ClusterState) -> list[str]:
    """Delete the containers with no running task (those of deleted pods, which the kubelet's own
    garbage collection would remove within a minute); their snapshots hold their image's layers."""
    running = {line.split()[0] for line in ctr(st, "tasks", "ls").stdout.splitlines()[1:] if line.split()}
    gone = [c for c in ctr(st, "containers", "ls", "--quiet").stdout.split() if c not in running]
    for container in gone:
        ctr(st, "containers", "delete", container, check=False)
    return gone


def forget_images(st: ClusterState, refs: list[str]) -> None:
    """Remove images from the node and collect what nothing else uses (content and snapshots), as if the
    node had never pulled them. `--sync` waits for containerd's garbage collection; with nothing to
    remove, a throwaway tag of the sandbox image is removed instead, which collects all the same."""
    present = images(st)
    gone = [r for r in refs if r in present] or [_gc_tag(st)]
    ctr(st, "images", "rm", "--sync", *gone)


def _gc_tag(st: ClusterState) -> str:
    tag = "localhost/voxscale/gc-trigger:latest"
    ctr(st, "images", "tag", "--force", PAUSE_IMAGE, tag)
    return tag


def _toml(table: dict[str, object], prefix: str = "") -> str:
    """Enough TOML for containerd's config: scalars first, then sub-tables with dotted, quoted names."""
    lines: list[str] = []
    subtables: list[tuple[str, dict[str, object]]] = []
    for key, value in table.items():
        name = f'"{key}"' if "." in key else key
        if isinstance(value, dict):
            subtables.append((f"{prefix}.{name}" if prefix else name, value))
        else:
            lines.append(f"{name} = {json.dumps(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for path, sub in subtables:
        out += f"\n[{path}]\n" + _toml(sub, path)
    return out


def _cni_config(st: ClusterState) -> dict[str, Any]:
    ipam = {
        "type": "host-local",
        "dataDir": str(_node_dir(st) / "cni" / "ipam"),
        "ranges": [[{"subnet": POD_CIDR}]],
        "routes": [{"dst": "0.0.0.0/0"}],
    }
    # No ipMasq: pods here talk only to the host and to each other, and masquerading would leave
    # per-pod iptables rules behind if a pod's teardown were ever skipped.
    bridge = {"type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True, "ipam": ipam}
    return {"cniVersion": "1.0.0", "name": "voxscale", "plugins": [bridge, {"type": "loopback"}]}


def _owner_mark(st: ClusterState) -> Path:
    return _node_dir(st) / "owns-the-real-node"


def owns_the_node(st: ClusterState) -> bool:
    """Whether this cluster set up the machine's real node. A cluster refused because another one
    runs it must not clean up: the bridge, the iptables rules and kubepods are the other's."""
    return _owner_mark(st).exists()


def containerd_command(ctx: ClusterContext) -> list[str]:
    return ["containerd", "--config", str(_node_dir(ctx.state) / "containerd.toml")]


def containerd_ready(ctx: ClusterContext) -> bool:
    return ctr(ctx.state, "version", check=False).returncode == 0


def load_pause_image(ctx: ClusterContext) -> None:
    """The sandbox image every pod starts with: a static Go `pause` built here, no registry needed."""
    if not _podman_has(PAUSE_IMAGE):
        pause = binaries.build(binaries.components()["pause"]) / "pause"
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(pause, Path(tmp) / "pause")
            Path(tmp, "Containerfile").write_text(
                'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n'
            )
            subprocess.run(
                ["podman", "build", "--quiet", "--pull=never", "-t", PAUSE_IMAGE, tmp], check=True, capture_output=True
            )
    load_images(ctx.state, [PAUSE_IMAGE])


def cleanup_containerd(st: ClusterState) -> None:
    """After containerd stopped: its shims and any container left, mounts, the bridge, sysctls."""
    if not owns_the_node(st):
        return
    if "containerd" in st.stopped_cleanly:
        (containerd_root() / CLEAN_STOP_MARK).touch()
    _kill_where(lambda pid: str(socket_path(st)) in _cmdline(pid) or _in_kubepods(pid))
    _unmount_under(st.dir)
    subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)
    _remove_kubepods_cgroups()
    _restore_sysctls(st)


# ===================================================================== images
def _podman_has(ref: str) -> bool:
    return subprocess.run(["podman", "image", "exists", ref], capture_output=True, check=False).returncode == 0


def _podman_id(ref: str) -> str:
    out = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", ref], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"podman has no image {ref!r}; build it first (`make images`)")
    return out.stdout.strip()


def load_images(st: ClusterState, refs: list[str], say: Callable[[str], None] | None = None) -> list[str]:
    """Copy images from podman's store into the real node's containerd (skipped when the same image
    ID is already there: the store is kept across clusters). Returns the refs actually copied."""
    copied = []
    for ref in refs:
        image_id = _podman_id(ref)
        if _copied_id(st, ref) == image_id:
            continue
        started = time.monotonic()
        if say:
            say(f"copying {ref} from podman into the real node's containerd (a 6 GB image takes ~3 min)")
        save = subprocess.Popen(["podman", "save", "--format", "docker-archive", ref], stdout=subprocess.PIPE)
        imported = ctr(st, "images", "import", "-", stdin=save.stdout, check=False)
        if save.wait() != 0 or imported.returncode != 0:
            raise RuntimeError(f"could not copy {ref} into containerd: {imported.stderr.strip()}")
        ctr(st, "images", "label", ref, f"{COPIED_FROM_LABEL}={image_id}")
        copied.append(ref)
        if say:
            say(f"copied {ref} in {time.monotonic() - started:.0f}s")
    return copied


COPIED_FROM_LABEL = "voxscale.dev/podman-image-id"


def _copied_id(st: ClusterState, ref: str) -> str | None:
    """The podman image ID `ref` was copied from, from the label `load_images` leaves on it (the
    CRI's own sha256:<id> names are made lazily, so they cannot tell)."""
    for line in ctr(st, "images", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == ref:
            labels = dict(pair.split("=", 1) for pair in fields[-1].split(",") if "=" in pair)
            return labels.get(COPIED_FROM_LABEL)
    return None


# ===================================================================== kubelet
def prepare_kubelet(ctx: ClusterContext) -> None:
    st = ctx.state
    node = _node_dir(st)
    for sub in ("kubelet", "pod-logs"):
        (node / sub).mkdir(parents=True, exist_ok=True)
    # The Node authorizer is off; RBAC's system:node role grants what a kubelet needs.
    ctx.issue_kubeconfig("kubelet", f"system:node:{NODE_NAME}", "system:nodes")
    ctx.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(_node_rbac()))
    (node / "kubelet.yaml").write_text(yaml.safe_dump(_kubelet_config(ctx), sort_keys=False))
    _forward_to_loopback(st)  # the node's pods reach the control plane (the operator pod)


def _node_rbac() -> list[dict[str, Any]]:
    """The kubelet's permissions (RBAC's own system:node role) and Prometheus' pod discovery."""
    discovery = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": PROMETHEUS_USER},
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["pods", "services", "endpoints", "nodes"],
                "verbs": ["get", "list", "watch"],
            }
        ],
    }
    return [
        _binding("voxscale-local:nodes", "system:node", "Group", "system:nodes"),
        discovery,
        _binding(PROMETHEUS_USER, PROMETHEUS_USER, "User", PROMETHEUS_USER),
    ]


def _binding(name: str, role: str, kind: str, subject: str) -> dict[str, Any]:
    group = "rbac.authorization.k8s.io"
    return {
        "apiVersion": f"{group}/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": group, "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": group, "kind": kind, "name": subject}],
    }


def _kubelet_config(ctx: ClusterContext) -> dict[str, object]:
    node = _node_dir(ctx.state)
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": NODE_IP,  # the API server reaches it here (kubectl logs/exec); not on any outside interface
        "port": ctx.state.kubelet_port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ctx.state.kubelet_healthz_port,
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,  # this host has the hybrid cgroup v1 layout
        "failSwapOn": False,
        "containerRuntimeEndpoint": f"unix://{socket_path(ctx.state)}",
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(ctx.ca.pair.cert)},
        },
        "authorization": {"mode": "AlwaysAllow"},  # only client certs from this cluster's CA get in
        "podLogsDir": str(node / "pod-logs"),
        "resolvConf": "",  # no cluster DNS here; pods get the Default DNS policy
        "enforceNodeAllocatable": [],
        "evictionHard": {},  # a busy test machine must not evict the pods under test
        # Images are copied in (or pulled from registry.py, by what removes them itself): never collect them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "serializeImagePulls": False,
        "maxPods": 30,
        "localStorageCapacityIsolation": False,
    }


def kubelet_command(ctx: ClusterContext) -> list[str]:
    node = _node_dir(ctx.state)
    return [
        str(binaries.binary("kubelet")),
        f"--config={node / 'kubelet.yaml'}",
        f"--kubeconfig={ctx.kubeconfig('kubelet')}",
        f"--root-dir={node / 'kubelet'}",
        f"--hostname-override={NODE_NAME}",
        f"--node-ip={NODE_IP}",
        f"--node-labels={NODE_LABEL}=true",
        "-v=1",
    ]


def kubelet_ready(ctx: ClusterContext) -> bool:
    out = ctx.cluster.kubectl("get", "node", NODE_NAME, "-o", "json", check=False)
    if out.returncode != 0:
        return False
    conditions = json.loads(out.stdout).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def cleanup_kubelet(st: ClusterState) -> None:
    """After the kubelet stopped, while containerd still runs: kill and remove every container."""
    if not owns_the_node(st):
        return
    delete_chains((*KUBELET_CHAINS, FORWARD_CHAIN))
    if not socket_path(st).exists():
        return
    for task in ctr(st, "tasks", "ls", "--quiet", check=False).stdout.split():
        ctr(st, "tasks", "kill", "--signal", "SIGKILL", task, check=False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        tasks = ctr(st, "tasks", "ls", "--quiet", check=False).stdout.split()
        for task in tasks:
            ctr(st, "tasks", "delete", "--force", task, check=False)
        if not tasks:
            break
        time.sleep(0.2)
    for container in ctr(st, "containers", "ls", "--quiet", check=False).stdout.split():
        ctr(st, "containers", "delete", container, check=False)


# ===================================================================== kube-proxy
def prepare_kube_proxy(ctx: ClusterContext) -> None:
    ctx.issue_kubeconfig("kube-proxy", "system:kube-proxy")  # bound to system:node-proxier by RBAC
    config = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(ctx.kubeconfig("kube-proxy"))},
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": POD_CIDR,
        "bindAddress": "127.0.0.1",
        "healthzBindAddress": f"127.0.0.1:{ctx.state.kube_proxy_healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{ctx.state.kube_proxy_metrics_port}",
        "nodePortAddresses": ["primary"],
        # Leave the host's conntrack table and route_localnet as they are.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "iptables": {"localhostNodePorts": False},
    }
    (_node_dir(ctx.state) / "kube-proxy.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def kube_proxy_command(ctx: ClusterContext) -> list[str]:
    return [str(binaries.binary("kube-proxy")), f"--config={_node_dir(ctx.state) / 'kube-proxy.yaml'}", "-v=1"]


def kube_proxy_ready(ctx: ClusterContext) -> bool:
    return http_ok(f"http://127.0.0.1:{ctx.state.kube_proxy_healthz_port}/healthz")


def cleanup_kube_proxy(st: ClusterState) -> None:
    """kube-proxy's own clean-up mode removes its iptables (and nftables/IPVS) rules."""
    if not owns_the_node(st):
        return
    with contextlib.suppress(KeyError):
        subprocess.run(
            [str(binaries.binary("kube-proxy")), "--cleanup", "-v=0"], capture_output=True, check=False, timeout=60
        )


# ===================================================================== Prometheus
def scrape_config(st: ClusterState) -> dict[str, Any]:
    """How a cluster's Prometheus finds pods: Kubernetes service discovery and the pods'
    prometheus.io/* annotations (which the operator puts on every inference pod)."""
    pki = st.dir / "pki"
    meta = "__meta_kubernetes_pod_annotation_prometheus_io_"
    return {
        "job_name": "kubernetes-pods",
        "kubernetes_sd_configs": [
            {
                "role": "pod",
                "api_server": st.apiserver_url,
                "tls_config": {
                    "ca_file": str(pki / "ca.crt"),
                    "cert_file": str(pki / "prometheus.crt"),
                    "key_file": str(pki / "prometheus.key"),
                },
                # Only the real node's pods: kwok's have addresses nothing answers on.
                "selectors": [{"role": "pod", "field": f"spec.nodeName={NODE_NAME}"}],
            }
        ],
        "relabel_configs": [
            {"source_labels": [f"{meta}scrape"], "regex": "true", "action": "keep"},
            {"source_labels": ["__meta_kubernetes_pod_phase"], "regex": "Running", "action": "keep"},
            {"source_labels": [f"{meta}path"], "regex": "(.+)", "target_label": "__metrics_path__"},
            {
                "source_labels": ["__address__", f"{meta}port"],
                "regex": r"([^:]+)(?::\d+)?;(\d+)",
                "replacement": "$1:$2",
                "target_label": "__address__",
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": ["__meta_kubernetes_pod_container_id"], "target_label": "container_id"},
        ],
    }


def api_server_env(st: ClusterState, *, pod_network: bool = False) -> dict[str, str]:
    """What a pod needs to find this API server: it listens on 127.0.0.1 only, so the `kubernetes`
    Service has no endpoints a pod could use. A pod on the pod network reaches it at the node's
    bridge address (`_forward_to_loopback`; its certificate names NODE_IP); a hostNetwork pod at
    127.0.0.1 (nothing forwards traffic a host process sends to NODE_IP)."""
    host = NODE_IP if pod_network else "127.0.0.1"
    return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": str(st.apiserver_port)}


def prometheus_url(st: ClusterState, *, pod_network: bool = False) -> str:
    """The cluster's Prometheus as a pod reaches it (see `api_server_env`)."""
    return f"http://{NODE_IP}:{st.prometheus_port}" if pod_network else st.prometheus_url


# ===================================================================== host clean-up helpers
def _in_kubepods(pid: int) -> bool:
    try:
        return "/kubepods" in Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return False


def _kill_where(match: Callable[[int], bool]) -> None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid() and match(int(entry.name)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(int(entry.name), signal.SIGKILL)
    time.sleep(0.2)


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest (latest) first."""
    prefix = str(root.resolve())
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point == prefix or point.startswith(prefix + "/"):
            points.append(point)
    return list(reversed(points))


def _unmount_under(root: Path) -> None:
    for _ in range(3):  # a mount can hide another at the same point
        points = mounts_under(root)
        if not points:
            return
        for point in points:
            if subprocess.run(["umount", point], capture_output=True, check=False).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def iptables_chains(names: tuple[str, ...] = ("KUBE-",)) -> list[str]:
    """Lines of iptables-save naming chains that start with any of `names` (empty when clean)."""
    found = []
    for tool in ("iptables-save", "ip6tables-save"):
        out = subprocess.run([tool], capture_output=True, text=True, check=False).stdout
        found += [line for line in out.splitlines() if line.startswith(":") and line[1:].startswith(names)]
    return found


def delete_chains(chains: tuple[str, ...]) -> None:
    """Remove these iptables chains from every table, the rules that jump to them first."""
    for save, tool in (("iptables-save", "iptables"), ("ip6tables-save", "ip6tables")):
        table = ""
        for line in subprocess.run([save], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith("-A ") and line.split(" -j ")[-1].split()[0] in chains:
                subprocess.run([tool, "-t", table, "-D", *shlex.split(line[3:])], capture_output=True, check=False)
        for table in ("filter", "nat", "mangle"):
            for chain in chains:
                subprocess.run([tool, "-t", table, "-F", chain], capture_output=True, check=False)
                subprocess.run([tool, "-t", table, "-X", chain], capture_output=True, check=False)


def kubepods_cgroups() -> list[Path]:
    return sorted(Path("/sys/fs/cgroup").glob("*/kubepods")) + sorted(Path("/sys/fs/cgroup").glob("kubepods"))


def _remove_kubepods_cgroups() -> None:
    for top in kubepods_cgroups():
        for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir()
        with contextlib.suppress(OSError):
            top.rmdir()


def _save_sysctls(st: ClusterState) -> None:
    saved = {}
    for key in SYSCTLS:
        with contextlib.suppress(OSError):
            saved[key] = Path("/proc/sys", key).read_text().strip()
    (_node_dir(st) / "sysctls.json").write_text(json.dumps(saved))


def _restore_sysctls(st: ClusterState) -> None:
    path = _node_dir(st) / "sysctls.json"
    if not path.exists():
        return
    for key, value in json.loads(path.read_text()).items():
        with contextlib.suppress(OSError):
            Path("/proc/sys", key).write_text(value)
    path.unlink()


def leftovers(st: ClusterState) -> list[str]:
    """What a stopped real node left on this machine (empty when `down` cleaned up fully): its
    processes, mounts under the state folder, the bridge and veth links, the kubelet's,
    kube-proxy's and the loopback forwarding's iptables chains, the kubepods cgroups."""
    found = [
        f"process {pid}: {_cmdline(pid)[:80]}"
        for pid in (int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit())
        if pid != os.getpid() and (str(st.dir) in _cmdline(pid) or _in_kubepods(pid))
    ]
    found += [f"mount {point}" for point in mounts_under(st.dir)]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=False).stdout
    found += [f"link {line.split(':')[1].strip()}" for line in links.splitlines() if BRIDGE in line]
    found += [f"iptables chain {line[1:].split()[0]}" for line in iptables_chains(("KUBE-", FORWARD_CHAIN))]
    found += [f"cgroup {path}" for path in kubepods_cgroups()]
    return found

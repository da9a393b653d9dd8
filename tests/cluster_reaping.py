"""Nothing a test starts outlives it.

A local cluster's daemons run in sessions of their own, so neither killing a test's subprocess nor
its process group stops them: a killed `voxscale demo --real-pods` left etcd, the API server,
containerd, kubelet and its pods running, and the next real-node test was refused the node.
Three layers, each catching what the one before cannot:

- `run_interruptible` runs a command in its own process group and, when the test is interrupted
  (pytest-timeout's signal, Ctrl-C), interrupts the command the way Ctrl-C would, so its own
  cleanup runs, before killing the group;
- the `reap_clusters` fixture runs `cluster down` for every cluster name the test registered,
  whatever ended the test;
- `unexpected_leftovers` is the session-end check in conftest: a cluster this session started
  (its state says so: `VOXSCALE_CLUSTER_OWNER`, set at session start and inherited by every
  subprocess) or registered, still there with a state folder, a process, a mount, a link, an iptables
  chain or a cgroup, fails the run (after cleaning it up, so the next run starts clean). Clusters of
  other sessions on the same machine are not this session's business.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from voxscale.localcluster import realnode
from voxscale.localcluster.cluster import OWNER_ENV, ClusterState, LocalCluster, state_root

INTERRUPT_GRACE_S = 120.0  # a real-node demo needs ~10 s to tear its cluster down; generous
SESSION_OWNER = f"pytest-{os.getpid()}"
_registered: set[str] = set()  # every name a test registered with the reap_clusters fixture


def claim_clusters_for_this_session() -> None:
    """Clusters started from here on, by this process or its subprocesses, carry this session's tag."""
    os.environ[OWNER_ENV] = SESSION_OWNER


def register(name: str) -> None:
    _registered.add(name)


def run_interruptible(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """subprocess.run(capture_output=True, text=True) whose interruption stops the command cleanly:
    SIGINT to its process group, a grace period for its `finally` blocks, then SIGKILL."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        _stop_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _stop_group(proc: subprocess.Popen[str]) -> None:
    """Interrupt, wait for the command's own cleanup, kill what is left; its output goes to stderr,
    where pytest shows it beside the interruption."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    out, err = "", ""
    with contextlib.suppress(subprocess.TimeoutExpired):
        out, err = proc.communicate(timeout=INTERRUPT_GRACE_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    print(f"interrupted {proc.args!r}; its output:\n{out[-3000:]}\n{err[-3000:]}", file=sys.stderr)


def tear_down(name: str) -> None:
    """`voxscale cluster down` for one cluster, if anything of it is left."""
    if (state_root() / name).exists():
        LocalCluster(name).down(quiet=True)


def cluster_names() -> set[str]:
    root = state_root()
    return {p.name for p in root.iterdir() if p.is_dir()} if root.exists() else set()


def _ours(name: str) -> bool:
    try:
        st = ClusterState.load(name)
    except (OSError, ValueError):  # another session's state.json, half written
        return False
    return st is not None and st.owner == SESSION_OWNER


def _real_node_elsewhere(name: str) -> bool:
    """Another cluster runs this machine's real node: the bridge, chains and kubepods are its own."""
    for other in cluster_names() - {name}:
        try:
            st = ClusterState.load(other)
        except (OSError, ValueError):
            continue
        if st is not None and st.real_node:
            return True
    return False


def leftovers_of(name: str) -> list[str]:
    """What a cluster that should be gone left on this machine: its state folder, and what its real
    node (if it had one) left (processes, mounts, the bridge, iptables chains, kubepods cgroups) -
    unless another cluster runs the real node now, whose traces those are."""
    directory = state_root() / name
    found = [f"state folder {directory}"] if directory.exists() else []
    if _real_node_elsewhere(name):
        return found
    gone = ClusterState(name, str(directory), 0, 0, 0, 0, 0)
    return found + realnode.leftovers(gone)


def unexpected_leftovers() -> dict[str, list[str]]:
    """This session's clusters (by owner tag or registration) still there, each with what it left;
    and the real node's machine-wide traces (bridge, chains, cgroups) when no cluster at all is left
    that could own them."""
    names = {name for name in cluster_names() if _ours(name)} | _registered
    found = {name: leftovers_of(name) for name in sorted(names)}
    if not cluster_names():
        found["(real node)"] = realnode.leftovers(ClusterState("-", str(Path("/nonexistent")), 0, 0, 0, 0, 0))
    return {name: items for name, items in found.items() if items}

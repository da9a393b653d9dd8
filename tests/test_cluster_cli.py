"""The documented CLI flow: `voxscale cluster up`, kubectl with `cluster env`, `voxscale cluster down`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from voxscale.localcluster.cluster import ClusterState

VOXSCALE = [sys.executable, "-m", "voxscale.cli"]


def _env_from_exports(lines: str) -> dict[str, str]:
    env = dict(os.environ)
    for line in lines.splitlines():
        assert line.startswith("export "), line
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip('"').replace("$PATH", env.get("PATH", ""))
        env[key] = value
    return env


@pytest.mark.cluster
def test_up_env_kubectl_down_leaves_no_process_behind(tmp_path: Path) -> None:
    name = "pytest-cli"
    up = subprocess.run(
        [*VOXSCALE, "cluster", "up", "--name", name, "--gpu-nodes", "2"], capture_output=True, text=True, timeout=300
    )
    state = ClusterState.load(name)
    try:
        assert up.returncode == 0, up.stderr
        assert state is not None
        env_out = subprocess.run(
            [*VOXSCALE, "cluster", "env", "--name", name], capture_output=True, text=True, check=True
        ).stdout
        assert f"export KUBECONFIG={state.kubeconfig}" in env_out
        assert f"export VOXSCALE_PROMETHEUS_URL={state.prometheus_url}" in env_out
        env = _env_from_exports(env_out)
        kubectl = shutil.which("kubectl", path=env["PATH"])
        assert kubectl is not None, "cluster env must put kubectl on PATH"
        nodes = json.loads(
            subprocess.run(
                [kubectl, "get", "nodes", "-o", "json"], env=env, capture_output=True, text=True, check=True
            ).stdout
        )["items"]
        assert sorted(n["metadata"]["name"] for n in nodes) == ["gpu-node-0", "gpu-node-1"]
        assert all(n["status"]["capacity"]["nvidia.com/gpu"] == "8" for n in nodes)
        status = subprocess.run([*VOXSCALE, "cluster", "status", "--name", name], capture_output=True, text=True)
        assert status.returncode == 0 and "gpu-node-1" in status.stdout
    finally:
        down = subprocess.run(
            [*VOXSCALE, "cluster", "down", "--name", name], capture_output=True, text=True, timeout=120
        )
    assert down.returncode == 0, down.stderr
    pids = state.pids.values() if state else []
    assert len(pids) == 6
    still_running = [
        pid
        for pid in pids
        if Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    ]
    assert still_running == [], f"processes left behind: {still_running}"
    assert state is not None and not state.dir.exists()
    after = subprocess.run([*VOXSCALE, "cluster", "status", "--name", name], capture_output=True, text=True)
    assert after.returncode == 1 and "down" in after.stdout

"""The manifests for TTS servers nobody here wrote (examples/servers/, issue 23): each is what a team
applies - the server's Deployment with the door by hand, its Service, a TTSDeployment attached - and
each must hold together the way the door needs, and pass the real API server's validation (CRD schema
and CEL rules included) in a server-side dry run. Only Piper's run end to end here
(tests/test_piper_e2e.py); the others say NOT RUN HERE in their header."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import REPO
from voxscale.simulator.cli import load_manifest

SERVERS = REPO / "examples" / "servers"
# piper and triton: their own e2e (triton has no door: tests/test_triton_e2e.py)
ATTACHED = sorted(p for p in SERVERS.glob("*/*.yaml") if p.parent.name not in ("piper", "triton"))


def docs(path: Path) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_every_server_the_readme_names_has_a_manifest() -> None:
    names = {p.parent.name for p in SERVERS.glob("*/*.yaml")}
    assert {"piper", "kokoro-fastapi", "gpt-sovits", "cosyvoice"} <= names
    readme = (REPO / "README.md").read_text()
    for path in ATTACHED:
        assert str(path.relative_to(REPO)) in readme, f"README does not point to {path.relative_to(REPO)}"
        assert "NOT RUN HERE" in path.read_text().split("\n---", 1)[0], f"{path.name}: say it was not run"


@pytest.mark.parametrize("path", ATTACHED, ids=lambda p: p.parent.name)
def test_the_door_in_front_of_the_server_holds_together(path: Path) -> None:
    found = docs(path)
    assert set(found) == {"Deployment", "Service", "TTSDeployment"}
    dep, svc = found["Deployment"], found["Service"]
    pod = dep["spec"]["template"]
    door = next(c for c in pod["spec"]["containers"] if c.get("command") == ["voxscale", "proxy"])
    server = next(c for c in pod["spec"]["containers"] if c is not door)
    args = door["args"]
    metrics_port = int(flag(args, "--metrics-port"))
    # Prometheus scrapes the door; the Service reaches the server only through it.
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics_port)
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    listen_port = int(flag(args, "--listen").rsplit(":", 1)[1])
    assert {"name": "http", "containerPort": listen_port} in door["ports"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    # The server's own port is the door's upstream, where its command names one.
    upstream_port = flag(args, "--upstream").rsplit(":", 1)[1]
    command = server.get("command", [])
    if command:
        assert upstream_port in command, f"--upstream :{upstream_port} is not the port in {command}"
    # The server's SIGTERM waits for the door's drain, inside the grace period.
    assert server["lifecycle"]["preStop"]["httpGet"] == {"path": "/wait-for-drain", "port": metrics_port}
    assert pod["spec"]["terminationGracePeriodSeconds"] > float(flag(args, "--drain-timeout-s"))
    # The TTSDeployment attaches to this Deployment and validates against the CRD.
    ttsd = load_manifest(path)
    assert ttsd["spec"]["targetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}


@pytest.mark.parametrize("path", ATTACHED, ids=lambda p: p.parent.name)
def test_the_api_server_accepts_the_manifest(path: Path, cluster: LocalCluster, namespace: str) -> None:
    cluster.kubectl("apply", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "crd/ttsdeployments.voxscale.io", "--timeout=60s")
    res = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("(server dry run)") == 3, res.stdout

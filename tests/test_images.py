"""Both images, built from their Dockerfiles by `make images`' script (podman, no Docker engine),
run for real: non-root; the operator says its version and, started against the local cluster under
the chart's RBAC, wins its Lease and stops on SIGTERM; the TTS server listens on the port the
operator would set, turns ready and synthesises (issue 13, item 1)."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from voxscale import __version__
from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import free_port, install_operator_rbac, wait_for
from voxscale.operator.children import SERVER_UID


def podman_run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", "run", "--rm", *args], capture_output=True, text=True, timeout=timeout)


def test_the_operator_image_runs_as_the_unprivileged_user_and_says_its_version(operator_image: str) -> None:
    who = podman_run("--network", "none", "--entrypoint", "id", operator_image, "-u")
    assert who.stdout.strip() == str(SERVER_UID), who.stderr
    version = podman_run("--network", "none", "--entrypoint", "voxscale", operator_image, "--version")
    assert version.stdout.strip() == f"voxscale {__version__}", version.stderr


def self_contained(kubeconfig: Path, into: Path) -> Path:
    """The kubeconfig with its CA inlined, readable by the image's user."""
    config = yaml.safe_load(kubeconfig.read_text())
    for entry in config["clusters"]:
        ca = Path(entry["cluster"].pop("certificate-authority"))
        entry["cluster"]["certificate-authority-data"] = base64.b64encode(ca.read_bytes()).decode()
    out = into / "kubeconfig"
    out.write_text(yaml.safe_dump(config))
    out.chmod(0o644)
    return out


@pytest.mark.cluster
def test_the_operator_image_starts_and_takes_its_lease_under_the_charts_rbac(
    cluster: LocalCluster, operator_image: str, tmp_path: Path
) -> None:
    release = f"img-{uuid.uuid4().hex[:6]}"
    kubeconfig = self_contained(install_operator_rbac(cluster, release), tmp_path)
    name = f"voxscale-{release}"
    lease = f"{release}-voxscale"  # the chart's fullname: its Role grants that Lease only
    proc = subprocess.Popen(
        [
            "podman",
            "run",
            "--rm",
            "--name",
            name,
            "--network",
            "host",
            "-v",
            f"{kubeconfig}:/kube/config:ro",
            "-e",
            "KUBECONFIG=/kube/config",
            "-e",
            "POD_NAMESPACE=voxscale-system",
            operator_image,
            "--lease-name",
            lease,
            "--metrics-port",
            "0",
            "--health-port",
            "0",
            "--identity",
            name,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def holder() -> str | None:
            found = cluster.kubectl("get", "lease", lease, "-n", "voxscale-system", "-o", "json", check=False)
            record = json.loads(found.stdout) if found.returncode == 0 else {}
            return (record.get("spec") or {}).get("holderIdentity")

        wait_for("the image's operator holds the lease", lambda: holder() == name, timeout=90)
    finally:
        started = time.monotonic()
        subprocess.run(["podman", "stop", "-t", "20", name], capture_output=True, timeout=60)
        stopped_in = time.monotonic() - started
        out, _ = proc.communicate(timeout=60)
    # As PID 1 a process ignores SIGTERM unless it handles it: the kubelet would wait out the grace period.
    assert stopped_in < 15, f"SIGTERM took {stopped_in:.0f}s (killed?)"
    assert f"voxscale operator {__version__} starting" in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


def test_the_inference_image_listens_where_told_turns_ready_and_speaks(inference_image: str) -> None:
    port = free_port()
    name = f"tts-{uuid.uuid4().hex[:6]}"
    env = ["-e", f"VOXSCALE_PORT={port}", "-e", "VOXSCALE_DEVICE=cpu"]
    subprocess.run(["podman", "run", "-d", "--name", name, "--network", "host", *env, inference_image], check=True)
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return requests.get(f"{url}/readyz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for("the server in the image is ready", ready, timeout=240, interval=1)
        body = {"input": "Hello from a real container.", "voice": "alloy", "response_format": "wav"}
        speech = requests.post(f"{url}/v1/audio/speech", json=body, timeout=120)
        assert speech.status_code == 200 and speech.content[:4] == b"RIFF", speech.text[:300]
        uid = subprocess.run(["podman", "exec", name, "id", "-u"], capture_output=True, text=True, timeout=60)
        assert uid.stdout.strip() == str(SERVER_UID)
        # The image installs voxscale[inference] only: the CLI must still build (it crashed importing
        # the simulator's and the operator's dependencies), and the other commands say what they need.
        usage = podman_run("--network", "none", inference_image, "--help")
        assert usage.returncode == 0 and "VOXSCALE_PORT" in usage.stdout, usage.stderr[-2000:]
        sim = podman_run("--network", "none", "--entrypoint", "voxscale", inference_image, "simulate")
        assert sim.returncode == 2 and "pip install 'voxscale[sim]'" in sim.stderr, sim.stderr[-2000:]
        started = time.monotonic()
        subprocess.run(["podman", "stop", "-t", "30", name], capture_output=True, timeout=90)
        assert time.monotonic() - started < 25, "SIGTERM did not stop the server (killed after the timeout?)"
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, timeout=90)


def test_an_up_to_date_image_is_not_rebuilt_whoever_asks(operator_image: str) -> None:
    """`make test` builds the images by a relative path, the fixtures (operator_image) ask again by an
    absolute one: the inputs' hash must not depend on how the script was called (it once hashed the script's own path,
    so every run relabelled both images, new IDs, and the real node copied 6 GB again)."""
    from voxscale.localcluster.harness import REPO

    env = {"VOXSCALE_IMAGE_TAG": "test", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    before = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", operator_image], capture_output=True, text=True
    )
    again = subprocess.run(["hack/build-images.sh", "operator"], capture_output=True, text=True, env=env, cwd=REPO)

    assert again.returncode == 0 and again.stderr == "", again.stderr  # silent: nothing built
    after = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Id}}", operator_image], capture_output=True, text=True
    )
    assert before.stdout == after.stdout

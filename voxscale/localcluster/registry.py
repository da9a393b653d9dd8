"""An OCI registry on 127.0.0.1 for the real node to pull from, so that an image pull is a real one.

The real node normally gets its images copied from podman's store (realnode.load_images): nothing is
ever pulled, so the image-pull part of a pod's start cannot be measured or shortened there. This is
distribution's own registry (github.com/distribution/distribution/v3, built from its Go module like
the control plane, binaries.py), serving plain HTTP on loopback from a folder in the cluster's state.
podman pushes to it (`--tls-verify=false`); the node's containerd is told to pull from it over HTTP
(realnode.allow_plain_http_registry); image pulls are made by containerd on the host, so loopback is
reachable even though the pods' network is not.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from voxscale.localcluster import binaries, realnode
from voxscale.localcluster.harness import free_port, wait_for
from voxscale.localcluster.procs import HostProcess, http_ok

if TYPE_CHECKING:
    from voxscale.localcluster.cluster import ClusterState

MANIFEST_TYPES = (
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)


def component() -> binaries.GoComponent:
    return binaries.components()["registry"]


def build() -> Path:
    """The `registry` binary, built from its Go module unless cached (a few minutes when cold)."""
    return binaries.build(component()) / "registry"


def config(root: Path, port: int) -> dict[str, Any]:
    """The registry's configuration: loopback only, plain HTTP, blobs in `root`, deletes allowed."""
    return {
        "version": 0.1,
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(root / "data")}, "delete": {"enabled": True}},
        # One instance: the secret only signs its own upload state (unset, it logs a warning each start).
        "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16)},
    }


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The chain IDs of an image's layers (the OCI image spec's definition): the names containerd's
    snapshotter gives the unpacked layer stack. One of them on a node means that layer is cached."""
    out: list[str] = []
    for diff in diff_ids:
        out.append(diff if not out else "sha256:" + hashlib.sha256(f"{out[-1]} {diff}".encode()).hexdigest())
    return out


@dataclass(frozen=True)
class Pushed:
    """An image in the registry: its reference, manifest digest, total compressed size (what a node
    downloads) and layers' diff IDs (what it unpacks)."""

    ref: str
    digest: str
    size_bytes: int
    diff_ids: tuple[str, ...]


@dataclass
class Registry(HostProcess):
    root: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log_path: Path = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.log_path = self.root / "registry.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> Registry:
        binary = build()
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        path = self.root / "config.yml"
        path.write_text(yaml.safe_dump(config(self.root, self.port)))
        self.launch([str(binary), "serve", str(path)])
        try:
            url = f"http://{self.address}/v2/"
            wait_for("the registry to answer /v2/", lambda: self._alive() and http_ok(url), timeout)
        except AssertionError:
            self.stop()
            raise
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.log()[-2000:]
            raise RuntimeError(f"the registry exited ({self.proc.returncode}): {tail}")
        return True

    def stop(self) -> None:
        super().stop()
        self.proc = None

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_node(self, st: ClusterState) -> None:
        """Let the cluster's real node pull from this registry."""
        realnode.allow_plain_http_registry(st, self.address)

    def push(self, local_ref: str, repository: str, tag: str = "test") -> Pushed:
        """Push an image from podman's store as <address>/<repository>:<tag>."""
        ref = f"{self.address}/{repository}:{tag}"
        res = subprocess.run(
            ["podman", "push", "--quiet", "--tls-verify=false", local_ref, ref],
            capture_output=True, text=True, check=False, timeout=1800,
        )  # fmt: skip
        if res.returncode != 0:
            raise RuntimeError(f"podman push {local_ref} -> {ref} failed: {res.stderr.strip()[-2000:]}")
        return self.inspect(repository, tag)

    def inspect(self, repository: str, tag: str) -> Pushed:
        """What the registry holds for <repository>:<tag> (from its manifest and config)."""
        url = f"http://{self.address}/v2/{repository}/manifests/{tag}"
        req = urllib.request.Request(url, headers={"Accept": ", ".join(MANIFEST_TYPES)})
        with urllib.request.urlopen(req, timeout=30) as resp:
            digest = resp.headers["Docker-Content-Digest"]
            manifest = json.loads(resp.read())
        blob = f"http://{self.address}/v2/{repository}/blobs/{manifest['config']['digest']}"
        with urllib.request.urlopen(blob, timeout=30) as resp:
            image_config = json.loads(resp.read())
        size = int(manifest["config"]["size"]) + sum(int(layer["size"]) for layer in manifest["layers"])
        ref = f"{self.address}/{repository}:{tag}"
        return Pushed(ref, digest, size, tuple(image_config["rootfs"]["diff_ids"]))

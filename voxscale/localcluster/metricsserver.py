"""metrics-server on a local cluster with a real node: the resource metrics API (metrics.k8s.io) that a
real HorizontalPodAutoscaler scales on, read from the real node's kubelet (/metrics/resource).

It runs as a host process, not as a pod, because:
- no registry is reachable here, so a pod needs an image built and copied into containerd first; the
  binary (built from its Go module, binaries.py, ON_DEMAND) runs as it is;
- the API server is a host process too: with aggregator routing (cluster.py `_aggregation_flags`) it
  calls the APIService's endpoint address directly, and a host process on the real node's bridge
  address is that endpoint without kube-proxy or a pod IP in between.
Nothing else differs from a cluster install: it authenticates with its own client certificate as
`system:metrics-server` under the RBAC its chart grants (delegated authentication and authorization,
the kubelet's stats), is registered as the v1beta1.metrics.k8s.io APIService, and believes the API
server's X-Remote-* headers only from the front-proxy client cert (pki.front_proxy).

What listens: metrics-server on the bridge address only (realnode.NODE_IP), never another interface.
The kubelet serves a self-signed certificate that does not name the bridge address, so the kubelet's
certificate is not verified (--kubelet-insecure-tls, as kind and minikube set it); the kubelet still
authenticates metrics-server by its client certificate. Only the real node is scraped (kwok's fake
nodes have no kubelet behind their addresses).
"""

from __future__ import annotations

import base64
import json
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from voxscale.localcluster import binaries, pki, realnode
from voxscale.localcluster.cluster import LocalCluster, write_kubeconfig
from voxscale.localcluster.procs import HostProcess

NAME = "metrics-server"
NAMESPACE = "kube-system"
USER = "system:metrics-server"  # its client cert's CN: the RBAC subject
API_SERVICE = "v1beta1.metrics.k8s.io"
PORT_NAME = "https"  # aggregator routing matches the Service port to the endpoint port by name
# How often the kubelet is scraped (10 s is metrics-server's minimum). The HPA needs two scrapes of a
# pod before its CPU rate exists; 15 s keeps a test's first scale-up within a minute of the load.
RESOLUTION = "15s"


def component() -> binaries.GoComponent:
    return binaries.components()[NAME]


def build() -> Path:
    """The `metrics-server` binary, built from its Go module unless cached (minutes when cold)."""
    return binaries.build(component()) / NAME


def bridge_port() -> int:
    """A free port on the real node's bridge address (where metrics-server listens)."""
    with socket.socket() as s:
        s.bind((realnode.NODE_IP, 0))
        port: int = s.getsockname()[1]
        return port


def serving_names() -> tuple[str, ...]:
    """What its serving certificate names: the aggregator checks `<service>.<namespace>.svc`, and the
    address it dials is the bridge's."""
    return (f"{NAME}.{NAMESPACE}.svc", f"{NAME}.{NAMESPACE}.svc.cluster.local", realnode.NODE_IP)


def command(binary: Path, port: int, kubeconfig: Path, serving: pki.KeyPair) -> list[str]:
    """The command line (pure): serving on the bridge address, reading the real node's kubelet."""
    return [
        str(binary),
        f"--bind-address={realnode.NODE_IP}",
        f"--secure-port={port}",
        f"--tls-cert-file={serving.cert}",
        f"--tls-private-key-file={serving.key}",
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--kubelet-preferred-address-types=InternalIP",
        "--kubelet-use-node-status-port",  # the kubelet's port is a free one, not 10250
        "--kubelet-insecure-tls",  # see the module docstring
        f"--node-selector={realnode.NODE_LABEL}=true",
        f"--metric-resolution={RESOLUTION}",
        "--profiling=false",
        "-v=1",
    ]


def manifests(port: int, ca_bundle: bytes) -> list[dict[str, Any]]:
    """RBAC as metrics-server's own chart grants it, a selectorless Service whose Endpoints are the
    bridge address, and the APIService (pure)."""
    rbac = "rbac.authorization.k8s.io"
    user = {"apiGroup": rbac, "kind": "User", "name": USER}
    reader = {
        "apiVersion": f"{rbac}/v1",
        "kind": "ClusterRole",
        "metadata": {"name": USER},
        "rules": [
            {"apiGroups": [""], "resources": ["nodes/metrics"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["pods", "nodes"], "verbs": ["get", "list", "watch"]},
        ],
    }

    def cluster_binding(name: str, role: str) -> dict[str, Any]:
        return {
            "apiVersion": f"{rbac}/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": rbac, "kind": "ClusterRole", "name": role},
            "subjects": [user],
        }

    auth_reader = {  # the front-proxy CA and header names, from kube-system/extension-apiserver-authentication
        "apiVersion": f"{rbac}/v1",
        "kind": "RoleBinding",
        "metadata": {"name": f"{NAME}-auth-reader", "namespace": NAMESPACE},
        "roleRef": {"apiGroup": rbac, "kind": "Role", "name": "extension-apiserver-authentication-reader"},
        "subjects": [user],
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "spec": {"ports": [{"name": PORT_NAME, "port": 443, "targetPort": port, "protocol": "TCP"}]},
    }
    endpoints = {  # mirrored into an EndpointSlice by the controller-manager (a Service without selector)
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {"name": NAME, "namespace": NAMESPACE},
        "subsets": [
            {"addresses": [{"ip": realnode.NODE_IP}], "ports": [{"name": PORT_NAME, "port": port, "protocol": "TCP"}]}
        ],
    }
    api_service = {
        "apiVersion": "apiregistration.k8s.io/v1",
        "kind": "APIService",
        "metadata": {"name": API_SERVICE},
        "spec": {
            "group": "metrics.k8s.io",
            "version": "v1beta1",
            "service": {"name": NAME, "namespace": NAMESPACE, "port": 443},
            "caBundle": base64.b64encode(ca_bundle).decode(),
            "groupPriorityMinimum": 100,
            "versionPriority": 100,
        },
    }
    return [
        reader,
        cluster_binding(USER, USER),
        cluster_binding(f"{NAME}:auth-delegator", "system:auth-delegator"),
        auth_reader,
        service,
        endpoints,
        api_service,
    ]


def api_service_available(cluster: LocalCluster) -> bool:
    out = cluster.kubectl("get", "apiservice", API_SERVICE, "-o", "json", check=False)
    if out.returncode != 0:
        return False
    conditions = json.loads(out.stdout).get("status", {}).get("conditions", [])
    return any(c["type"] == "Available" and c["status"] == "True" for c in conditions)


@dataclass
class MetricsServerProcess(HostProcess):
    """metrics-server as a host process for one local cluster with a real node; `start` registers it."""

    cluster: LocalCluster
    log_path: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> MetricsServerProcess:
        st = self.cluster.state
        if st is None or not st.real_node:
            up = f"voxscale cluster up --real-node --name {self.cluster.name}"
            raise RuntimeError(f"metrics-server reads a real node's kubelet, and this cluster has none: `{up}`")
        binary = build()
        ca = pki.LocalCA(st.dir / "pki")
        serving = ca.issue(f"{NAME}-serving", NAME, server_names=serving_names())
        client = ca.issue(NAME, USER)
        kubeconfig = st.dir / f"{NAME}.kubeconfig"
        write_kubeconfig(kubeconfig, st.apiserver_url, ca.pair.cert, client, USER)
        self.port = bridge_port()
        docs = manifests(self.port, ca.pair.cert.read_bytes())
        self.cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        self.launch(command(binary, self.port, kubeconfig, serving))
        return self

    def stop(self) -> None:
        """Stop the process and unregister the APIService (an unavailable one would fail discovery)."""
        super().stop()
        if self.cluster.state is not None:
            self.cluster.kubectl("delete", "apiservice", API_SERVICE, "--ignore-not-found", check=False)

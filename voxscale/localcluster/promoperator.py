"""The real prometheus-operator against a local cluster: what turns the chart's ServiceMonitor,
PodMonitor and PrometheusRule into a Prometheus configuration, as kube-prometheus-stack does.

The operator (built from its Go module, binaries.py) runs as a host process with the cluster's admin
kubeconfig; its CRDs are the ones its own module ships. It writes the configuration it generated for a
Prometheus object to a Secret (gzipped) and the rules to ConfigMaps, and would run Prometheus in a
StatefulSet: that pod is kept off every node here (there is no registry to pull its image from) and
the configuration is run by the cluster's own Prometheus build instead: as the config-reloader
sidecar would hand it over (`substitute`), with the cluster's kubeconfig (`outside_the_cluster`).
"""

from __future__ import annotations

import base64
import copy
import gzip
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from voxscale.localcluster import binaries
from voxscale.localcluster.cluster import LocalCluster
from voxscale.localcluster.harness import free_port
from voxscale.localcluster.procs import HostProcess

CRD_DIR = "example/prometheus-operator-crd"  # inside the module, one file per CRD
CONFIG_KEY = "prometheus.yaml.gz"  # the key of the generated Secret `prometheus-<name>`
RULES_DIR = "/etc/prometheus/rules"  # where the generated config expects the rule ConfigMaps
# The config-reloader sidecar substitutes `$(VAR)` from its environment before Prometheus reads the
# file (Thanos' reloader, which prometheus-config-reloader runs); an unset variable is an error there.
RELOADER_VAR = re.compile(r"\$\(([a-zA-Z_0-9]+)\)")
# A node label no node has: the operator's Prometheus StatefulSet stays Pending instead of pulling.
NOWHERE = {"voxscale.dev/no-such-node": "true"}


def component() -> binaries.GoComponent:
    return binaries.components()["prometheus-operator"]


def build() -> Path:
    """The `operator` binary, built from its Go module unless cached (minutes when cold)."""
    return binaries.build(component()) / "operator"


def module_dir() -> Path:
    """The operator's module source (the CRDs), from the Go module cache (downloaded if missing)."""
    info = binaries._go_mod_download(f"{binaries.PROMETHEUS_OPERATOR_MODULE}@{component().version}")
    return Path(info["Dir"])


def apply_crds(cluster: LocalCluster) -> list[str]:
    """Apply the module's CRDs (server-side: the Prometheus CRD is too large for the last-applied
    annotation) and wait until the API server serves them; returns their names."""
    # (Not read with PyYAML: the CRDs hold `=` as a plain scalar, which it takes for YAML's value tag.)
    applied = cluster.kubectl("apply", "--server-side", "-o", "name", "-f", str(module_dir() / CRD_DIR)).stdout
    names = [line.rsplit("/", 1)[1] for line in applied.split()]
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names))
    return names


def prometheus_cr(name: str, namespace: str, select: dict[str, str], version: str) -> dict[str, Any]:
    """A Prometheus object that picks monitors and rules as kube-prometheus-stack's does: by labels
    (its `release` label), from every namespace."""
    selector = {"matchLabels": select}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "Prometheus",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "version": version,
            "replicas": 1,
            "scrapeInterval": "5s",
            "evaluationInterval": "5s",
            "serviceMonitorSelector": selector,
            "serviceMonitorNamespaceSelector": {},
            "podMonitorSelector": selector,
            "podMonitorNamespaceSelector": {},
            "ruleSelector": selector,
            "ruleNamespaceSelector": {},
            "nodeSelector": NOWHERE,
        },
    }


def decode_config(secret: dict[str, Any]) -> dict[str, Any]:
    """The Prometheus configuration the operator generated, from its Secret."""
    raw = gzip.decompress(base64.b64decode(secret["data"][CONFIG_KEY]))
    config: dict[str, Any] = yaml.safe_load(raw)
    return config


def reloader_env(prometheus: str, shard: int = 0) -> dict[str, str]:
    """What the StatefulSet gives its config-reloader (pkg/operator/config_reloader.go): the shard
    number and the pod's name, prometheus-<name>-<ordinal> for the first replica of a shard."""
    pod = f"prometheus-{prometheus}-{shard}" if shard == 0 else f"prometheus-{prometheus}-shard-{shard}-0"
    return {"SHARD": str(shard), "POD_NAME": pod}


def substitute(value: Any, env: dict[str, str]) -> Any:
    """The generated configuration as the config-reloader writes it for Prometheus: every `$(VAR)`
    in a string replaced from `env` (the operator's sharding relabelings read `$(SHARD)`)."""
    if isinstance(value, dict):
        return {k: substitute(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute(v, env) for v in value]
    if isinstance(value, str):

        def one(match: re.Match[str]) -> str:
            if match.group(1) not in env:
                raise KeyError(f"the configuration reads $({match.group(1)}), which the config-reloader is not given")
            return env[match.group(1)]

        return RELOADER_VAR.sub(one, value)
    return value


def outside_the_cluster(config: dict[str, Any], kubeconfig: Path, rules_dir: Path) -> dict[str, Any]:
    """The generated configuration, for a Prometheus that runs on the host rather than in a pod: the
    in-cluster service account it assumes is not there, so every Kubernetes discovery gets the
    cluster's kubeconfig, and rule files are read from `rules_dir` instead of the mounted ConfigMaps.
    Nothing else changes: jobs, relabelings and selectors are the operator's."""
    out = copy.deepcopy(config)
    for job in out.get("scrape_configs", []):
        for sd in job.get("kubernetes_sd_configs", []):
            if "api_server" in sd:
                raise ValueError(f"job {job['job_name']} names api_server {sd['api_server']}; expected in-cluster")
            sd["kubeconfig_file"] = str(kubeconfig)
    out["rule_files"] = [str(rules_dir / Path(pattern).relative_to(RULES_DIR)) for pattern in out.get("rule_files", [])]
    return out


def write_rule_files(configmaps: list[dict[str, Any]], rules_dir: Path) -> list[Path]:
    """The rule ConfigMaps as the StatefulSet mounts them: one folder per ConfigMap."""
    written = []
    for cm in configmaps:
        folder = rules_dir / cm["metadata"]["name"]
        folder.mkdir(parents=True, exist_ok=True)
        for key, text in cm.get("data", {}).items():
            (folder / key).write_text(text)
            written.append(folder / key)
    return written


@dataclass
class PrometheusOperatorProcess(HostProcess):
    """`operator` (prometheus-operator) as a host process with the given kubeconfig."""

    binary: Path  # build(): the built `operator`
    kubeconfig: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrometheusOperatorProcess:
        cmd = [str(self.binary), f"--web.listen-address=127.0.0.1:{free_port()}", "--log-level=info"]
        self.launch(cmd, dict(os.environ, KUBECONFIG=str(self.kubeconfig)))
        return self

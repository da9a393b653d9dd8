"""Pure builders of the objects a TTSDeployment owns: Deployment, Service, PodDisruptionBudget and,
when spec.networkPolicy.enabled, a NetworkPolicy.

They take the (defaulted) TTSDeployment and return manifests for server-side apply. The Deployment
never carries `spec.replicas`: the replica count belongs to the scaling engine, which writes it through
the scale subresource under its own field manager, so re-applying the spec can never reset it.
"""

from __future__ import annotations

import math
from typing import Any

from voxscale.metrics_contract import POD_LABEL_TTSDEPLOYMENT
from voxscale.operator import crd
from voxscale.operator.crd import GROUP, KIND, VERSION
from voxscale.operator.policy import parse_duration

MANAGED_BY = "voxscale"
CONTAINER = "tts"
PORT_NAME = "http"
# The pod's grace period covers the preStop pause, the server's drain of accepted requests
# (drain_seconds) and a margin for the process to exit.
PRESTOP_PAUSE_SECONDS = 5
EXIT_MARGIN_SECONDS = 5
DRAIN_FLOOR_SECONDS = 60
# The inference image's user (Dockerfile.inference); as fsGroup it makes a claimed voice store writable.
SERVER_UID = 10001
VOICE_STORE_PATH = "/var/lib/voxscale/voices"
VOICE_STORE_VOLUME = "voices"
API_KEYS_PATH = "/etc/voxscale/api-keys"  # the Secret's directory (never a subPath: Kubernetes updates it)
API_KEYS_VOLUME = "api-keys"
# The root filesystem is read-only; what the server writes goes to the pod's own emptyDirs: /tmp
# (multipart uploads spooled past 1 MB, torch/inductor scratch) and the image user's HOME
# (Dockerfile.inference: useradd --create-home; ~/.cache, ~/.nv (CUDA's JIT cache), ~/.triton, ~/.config).
# Disk-backed, so they do not count against the memory limit. The voice store is the third volume.
SCRATCH_VOLUMES = {"tmp": "/tmp", "home": "/home/voxscale"}
SCRATCH_SIZE_LIMIT = "1Gi"


def selector_labels(name: str) -> dict[str, str]:
    return {POD_LABEL_TTSDEPLOYMENT: name}


def common_labels(name: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "voxscale-inference",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **selector_labels(name),
    }


def owner_reference(ttsd: dict[str, Any]) -> dict[str, Any]:
    meta = ttsd["metadata"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(ttsd: dict[str, Any]) -> dict[str, Any]:
    meta = ttsd["metadata"]
    return {
        "name": meta["name"],
        "namespace": meta["namespace"],
        "labels": common_labels(meta["name"]),
        "ownerReferences": [owner_reference(ttsd)],
    }


def drain_seconds(spec: dict[str, Any]) -> int:
    """How long a stopping pod may take to answer what it accepted: spec.model.drainTimeout, or a full
    queue served twice over at the replica capacity the spec assumes (at least DRAIN_FLOOR_SECONDS).

    From the spec, not from the capacity measured on the pods: the grace period is part of the pod
    template, and a template that followed a measurement would roll every pod each time it moved.
    """
    full = crd.default_spec(spec)
    model = full["model"]
    if "drainTimeout" in model:
        return math.ceil(parse_duration(model["drainTimeout"], "spec.model.drainTimeout").total_seconds())
    return max(DRAIN_FLOOR_SECONDS, math.ceil(2 * int(model["maxQueueLength"]) / _assumed_capacity(full)))


def _assumed_capacity(full_spec: dict[str, Any]) -> float:
    """The slo trigger's replicaCapacity, or else spec.scaling.slo's (which the CRD's default fills in)."""
    scaling = full_spec["scaling"]
    for trigger in scaling.get("triggers", []):
        if trigger.get("type") == "slo" and "replicaCapacity" in (trigger.get("slo") or {}):
            return float(trigger["slo"]["replicaCapacity"])
    return float(scaling["slo"]["replicaCapacity"])


def termination_grace_seconds(spec: dict[str, Any]) -> int:
    return PRESTOP_PAUSE_SECONDS + drain_seconds(spec) + EXIT_MARGIN_SECONDS


def server_env(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The pipeline settings handed to the inference server, then the user's own variables.

    Names come from the settings contract the server reads, values from the spec with the CRD's
    defaults filled in, so no default is typed twice.
    """
    from voxscale import settings_contract as sc

    full = crd.default_spec(spec)
    drain = str(drain_seconds(spec))
    ours: list[dict[str, Any]] = [
        {"name": s.env, "value": str(s.spec_value(full))} for s in sc.SETTINGS if s.spec_path
    ] + [
        {"name": sc.VOICE_STORE.env, "value": VOICE_STORE_PATH},
        # Inside the grace period: a request never outlives the drain, the drain never outlives the pod.
        {"name": sc.REQUEST_TIMEOUT_S.env, "value": drain},
        {"name": sc.DRAIN_TIMEOUT_S.env, "value": drain},
    ]
    ours += [{"name": s.env, "valueFrom": {"fieldRef": {"fieldPath": s.pod_field}}} for s in sc.SETTINGS if s.pod_field]
    if _api_keys_secret(spec):
        ours.append({"name": sc.API_KEYS.env, "value": API_KEYS_PATH})
    user = list(full["model"].get("env", []))
    user_names = {e["name"] for e in user}
    return [e for e in ours if e["name"] not in user_names] + user


_QUANTITY_SUFFIXES = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def quantity(value: Any, field: str) -> float:
    """A Kubernetes quantity (8Gi, 512Mi, 1.5G, 1000) as a number; ValueError names `field`."""
    text = str(value).strip()
    number = text.rstrip("".join({c for s in _QUANTITY_SUFFIXES for c in s}))
    suffix = text[len(number) :]
    try:
        return float(number) * _QUANTITY_SUFFIXES[suffix]
    except (ValueError, KeyError):
        raise ValueError(f"{field}: {text!r} is not a quantity; write e.g. 8Gi or 512Mi") from None


def container_resources(spec: dict[str, Any]) -> dict[str, Any]:
    """Requests and limits: the spec's own, GPUs as the nvidia.com/gpu limit, memory on both sides
    (spec.resources.memory where requests.memory / limits.memory are not given) and a CPU request
    (spec.resources.cpu where requests.cpu is not); the CRD holds the defaults of both."""
    res = crd.default_spec(spec)["resources"]
    requests = dict(res.get("requests", {}))
    limits = dict(res.get("limits", {}))
    memory = res["memory"]
    requests.setdefault("memory", memory)
    requests.setdefault("cpu", res["cpu"])
    if "memory" not in limits:
        # Never below the request (the API server refuses such a pod): the larger of the two.
        request = quantity(requests["memory"], "spec.resources.requests.memory")
        limits["memory"] = requests["memory"] if request > quantity(memory, "spec.resources.memory") else memory
    gpus = int(res.get("gpus", 1))
    if gpus > 0:
        # Extended resources are set as limits; the API server copies them to requests.
        limits["nvidia.com/gpu"] = str(gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = {k: str(v) for k, v in requests.items()}
    if limits:
        out["limits"] = {k: str(v) for k, v in limits.items()}
    return out


def voice_store_volume(spec: dict[str, Any]) -> dict[str, Any]:
    """The claim shared by every replica when one is named; otherwise the pod's own emptyDir."""
    claim = spec["model"].get("voiceStore", {}).get("claimName")
    if claim:
        return {"name": VOICE_STORE_VOLUME, "persistentVolumeClaim": {"claimName": claim}}
    return {"name": VOICE_STORE_VOLUME, "emptyDir": {"sizeLimit": "1Gi"}}


def _api_keys_secret(spec: dict[str, Any]) -> str | None:
    return spec.get("service", {}).get("apiKeysSecret") or None


def volumes(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The voice store, then the scratch emptyDirs the read-only root filesystem leaves writable, then
    the API keys Secret when spec.service.apiKeysSecret names one."""
    scratch = [{"name": n, "emptyDir": {"sizeLimit": SCRATCH_SIZE_LIMIT}} for n in SCRATCH_VOLUMES]
    secret = _api_keys_secret(spec)
    keys = [{"name": API_KEYS_VOLUME, "secret": {"secretName": secret}}] if secret else []
    return [voice_store_volume(spec), *scratch, *keys]


def volume_mounts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    mounts = {VOICE_STORE_VOLUME: VOICE_STORE_PATH, **SCRATCH_VOLUMES}
    keys = [{"name": API_KEYS_VOLUME, "mountPath": API_KEYS_PATH, "readOnly": True}] if _api_keys_secret(spec) else []
    return [{"name": name, "mountPath": path} for name, path in mounts.items()] + keys


def deployment(ttsd: dict[str, Any]) -> dict[str, Any]:
    name = ttsd["metadata"]["name"]
    spec = ttsd["spec"]
    model = spec["model"]
    port = int(spec.get("service", {}).get("port", 8000))
    probe_base = {"httpGet": {"path": "/readyz", "port": PORT_NAME}}
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        # The server never calls the Kubernetes API: no ServiceAccount token in its filesystem.
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": SERVER_UID,
            "runAsGroup": SERVER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
            "fsGroup": SERVER_UID,
            "fsGroupChangePolicy": "OnRootMismatch",
        },
        "volumes": volumes(spec),
        "containers": [
            {
                "name": CONTAINER,
                "image": model["image"],
                "imagePullPolicy": model.get("imagePullPolicy", "IfNotPresent"),
                "ports": [{"name": PORT_NAME, "containerPort": port, "protocol": "TCP"}],
                "env": server_env(spec),
                "resources": container_resources(spec),
                "volumeMounts": volume_mounts(spec),
                # Model loading can take minutes: the startup probe holds the others off until it is done.
                "startupProbe": {
                    "httpGet": {"path": "/healthz", "port": PORT_NAME},
                    "periodSeconds": 5,
                    "failureThreshold": 120,
                },
                "readinessProbe": {**probe_base, "periodSeconds": 2, "failureThreshold": 2},
                "livenessProbe": {
                    "httpGet": {"path": "/healthz", "port": PORT_NAME},
                    "periodSeconds": 10,
                    "failureThreshold": 3,
                },
                # Give Endpoints time to drop the pod before SIGTERM; the server then drains accepted work.
                "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_PAUSE_SECONDS}}},
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
    }
    for key in ("nodeSelector", "tolerations", "affinity"):
        if spec.get(key):
            pod_spec[key] = spec[key]
    annotations = {
        **spec.get("podAnnotations", {}),
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }
    pod_labels = {**spec.get("podLabels", {}), **common_labels(name)}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(ttsd),
        "spec": {
            "selector": {"matchLabels": selector_labels(name)},
            # GPUs are scarce: surge one pod at a time and never drop below the current capacity.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": annotations},
                "spec": pod_spec,
            },
        },
    }


def service(ttsd: dict[str, Any]) -> dict[str, Any]:
    port = int(ttsd["spec"].get("service", {}).get("port", 8000))
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ttsd),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(ttsd["metadata"]["name"]),
            "ports": [{"name": PORT_NAME, "port": port, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }


def pod_disruption_budget(ttsd: dict[str, Any]) -> dict[str, Any] | None:
    """A PDB only when at least two replicas are promised: one voluntary eviction at a time."""
    if int(ttsd["spec"].get("replicas", {}).get("min", 1)) < 2:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(ttsd),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(ttsd["metadata"]["name"])}},
    }


def network_policy(ttsd: dict[str, Any]) -> dict[str, Any] | None:
    """With spec.networkPolicy.enabled: ingress to the pods on the serving port only (clients, probes,
    Prometheus' scrape all use it), and no egress (the server calls nothing). None when off."""
    full = crd.default_spec(ttsd["spec"])
    if not full["networkPolicy"]["enabled"]:
        return None
    port = int(full["service"]["port"])
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(ttsd),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(ttsd["metadata"]["name"])},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": port}]}],
            "egress": [],
        },
    }


def expected_kinds(ttsd: dict[str, Any]) -> set[str]:
    """The kinds of child a TTSDeployment should have now (a PDB only with min >= 2, a NetworkPolicy
    only when spec.networkPolicy.enabled)."""
    kinds = {"Deployment", "Service"}
    if pod_disruption_budget(ttsd) is not None:
        kinds.add("PodDisruptionBudget")
    if network_policy(ttsd) is not None:
        kinds.add("NetworkPolicy")
    return kinds

"""Pure builders of the objects a TTSDeployment owns: Deployment, Service, PodDisruptionBudget and,
when spec.networkPolicy.enabled, a NetworkPolicy.

They take the (defaulted) TTSDeployment and return manifests for server-side apply. The Deployment
never carries `spec.replicas`: the replica count belongs to the scaling engine, which writes it through
the scale subresource under its own field manager, so re-applying the spec can never reset it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from voxscale.metrics_contract import POD_LABEL_TTSDEPLOYMENT
from voxscale.operator import crd
from voxscale.operator.crd import GROUP, KIND, VERSION
from voxscale.operator.policy import parse_duration

MANAGED_BY = "voxscale"
CONTAINER = "tts"
PORT_NAME = "http"
# With spec.proxy: the door sidecar's container, its admin port's name and the user's server's port name.
DOOR_CONTAINER = "door"
DOOR_METRICS_PORT_NAME = "door-metrics"
SERVER_PORT_NAME = "server"
# The door is a small asyncio process (bench/proxy_bench.py: about 1 ms of CPU per request).
DOOR_RESOURCES = {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}
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
    if proxied(spec):  # a server of the user's own: only /tmp is ours to offer
        return scratch[:1]
    secret = _api_keys_secret(spec)
    keys = [{"name": API_KEYS_VOLUME, "secret": {"secretName": secret}}] if secret else []
    return [voice_store_volume(spec), *scratch, *keys]


def volume_mounts(spec: dict[str, Any]) -> list[dict[str, Any]]:
    mounts = {VOICE_STORE_VOLUME: VOICE_STORE_PATH, **SCRATCH_VOLUMES}
    keys = [{"name": API_KEYS_VOLUME, "mountPath": API_KEYS_PATH, "readOnly": True}] if _api_keys_secret(spec) else []
    return [{"name": name, "mountPath": path} for name, path in mounts.items()] + keys


def _restricted() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _get(path: str, port: int | str = PORT_NAME) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}}


def _own_server(spec: dict[str, Any], port: int) -> dict[str, Any]:
    """voxscale's inference server: its settings from the spec, its own probes and metrics."""
    model = spec["model"]
    return {
        "name": CONTAINER,
        "image": model["image"],
        "imagePullPolicy": model.get("imagePullPolicy", "IfNotPresent"),
        "ports": [{"name": PORT_NAME, "containerPort": port, "protocol": "TCP"}],
        "env": server_env(spec),
        "resources": container_resources(spec),
        "volumeMounts": volume_mounts(spec),
        # Model loading can take minutes: the startup probe holds the others off until it is done.
        "startupProbe": {**_get("/healthz"), "periodSeconds": 5, "failureThreshold": 120},
        "readinessProbe": {**_get("/readyz"), "periodSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {**_get("/healthz"), "periodSeconds": 10, "failureThreshold": 3},
        # Give Endpoints time to drop the pod before SIGTERM; the server then drains accepted work.
        "lifecycle": {"preStop": {"sleep": {"seconds": PRESTOP_PAUSE_SECONDS}}},
        "securityContext": _restricted(),
    }


def proxied(spec: dict[str, Any]) -> bool:
    """Whether spec.model.image is a server of the user's own, behind the door sidecar (spec.proxy)."""
    return bool(spec.get("proxy", {}).get("enabled"))


def metrics_port(spec: dict[str, Any]) -> int:
    """Where Prometheus scrapes the pod: the door's metrics port when proxied, else the serving port."""
    from voxscale.proxy.settings import METRICS_PORT

    return METRICS_PORT.default if proxied(spec) else int(crd.default_spec(spec)["service"]["port"])


def _foreign_server(spec: dict[str, Any]) -> dict[str, Any]:
    """The user's own TTS server behind the door: only the user's env (our settings mean nothing to it)
    and a preStop that holds its SIGTERM until the door has answered everything it accepted (the
    kubelet signals every container at once).

    No kubelet probes: a server that listens on 127.0.0.1 (so that nothing bypasses the door) cannot be
    reached from the kubelet, which probes the pod's IP. The door polls the health path (or the port)
    from inside the pod, and its readiness, the pod's, follows it."""
    from voxscale.proxy.settings import METRICS_PORT

    full = crd.default_spec(spec)
    return {
        "name": CONTAINER,
        "image": full["model"]["image"],
        "imagePullPolicy": full["model"]["imagePullPolicy"],
        "ports": [{"name": SERVER_PORT_NAME, "containerPort": int(full["proxy"]["serverPort"]), "protocol": "TCP"}],
        "env": list(full["model"].get("env", [])),
        "resources": container_resources(spec),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "lifecycle": {"preStop": {"httpGet": {"path": "/wait-for-drain", "port": METRICS_PORT.default}}},
        "securityContext": _restricted(),
    }


def door_env(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The door's VOXSCALE_PROXY_* variables (names and defaults from voxscale/proxy/settings.py): it
    listens on the Service's port, forwards to the server's, queues spec.model.maxQueueLength and drains
    within the pod's drain time; concurrency and the health path only where the spec names them."""
    from voxscale.proxy import settings as ps

    full = crd.default_spec(spec)
    door = full["proxy"]
    drain = str(drain_seconds(spec))
    values: dict[Any, Any] = {
        ps.LISTEN: f"0.0.0.0:{int(full['service']['port'])}",
        ps.UPSTREAM: f"127.0.0.1:{int(door['serverPort'])}",
        ps.QUEUE: int(full["model"]["maxQueueLength"]),
        ps.METRICS_PORT: ps.METRICS_PORT.default,
        ps.REQUEST_TIMEOUT_S: drain,
        ps.DRAIN_TIMEOUT_S: drain,
    }
    if door.get("healthPath"):
        values[ps.HEALTH_PATH] = door["healthPath"]
    if "concurrency" in door:
        values[ps.CONCURRENCY] = int(door["concurrency"])
    return [{"name": setting.env, "value": str(value)} for setting, value in values.items()]


def _door(spec: dict[str, Any], port: int) -> dict[str, Any]:
    """`voxscale proxy` from spec.proxy.image: the Service's port and the pod's readiness are its."""
    from voxscale.proxy.settings import METRICS_PORT

    admin = METRICS_PORT.default
    return {
        "name": DOOR_CONTAINER,
        "image": spec["proxy"]["image"],
        "imagePullPolicy": spec["model"].get("imagePullPolicy", "IfNotPresent"),
        "command": ["voxscale", "proxy"],
        "ports": [
            {"name": PORT_NAME, "containerPort": port, "protocol": "TCP"},
            {"name": DOOR_METRICS_PORT_NAME, "containerPort": admin, "protocol": "TCP"},
        ],
        "env": door_env(spec),
        "resources": DOOR_RESOURCES,
        "readinessProbe": {"httpGet": {"path": "/ready", "port": admin}, "periodSeconds": 2, "failureThreshold": 2},
        "livenessProbe": {"httpGet": {"path": "/live", "port": admin}, "periodSeconds": 10, "failureThreshold": 3},
        "securityContext": _restricted(),
    }


def deployment(ttsd: dict[str, Any]) -> dict[str, Any]:
    name = ttsd["metadata"]["name"]
    spec = ttsd["spec"]
    port = int(spec.get("service", {}).get("port", 8000))
    containers = [_foreign_server(spec), _door(spec, port)] if proxied(spec) else [_own_server(spec, port)]
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
        "containers": containers,
    }
    for key in ("nodeSelector", "tolerations", "affinity"):
        if spec.get(key):
            pod_spec[key] = spec[key]
    annotations = {
        **spec.get("podAnnotations", {}),
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(metrics_port(spec)),
        "prometheus.io/path": "/metrics",
        # `kubectl logs` and `exec` go to the server, not the door, when no container is named.
        "kubectl.kubernetes.io/default-container": CONTAINER,
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
    Prometheus' scrape all use it; with the door sidecar its metrics port too), and no egress (the
    server calls nothing). None when off."""
    full = crd.default_spec(ttsd["spec"])
    if not full["networkPolicy"]["enabled"]:
        return None
    ports = sorted({int(full["service"]["port"]), metrics_port(ttsd["spec"])})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata(ttsd),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(ttsd["metadata"]["name"])},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"ports": [{"protocol": "TCP", "port": port} for port in ports]}],
            "egress": [],
        },
    }


def expected_kinds(ttsd: dict[str, Any]) -> set[str]:
    """The kinds of child a TTSDeployment should have now (a PDB only with min >= 2, a NetworkPolicy
    only when spec.networkPolicy.enabled; none when it is attached to a workload through spec.targetRef)."""
    if target_ref(ttsd) is not None:
        return set()
    kinds = {"Deployment", "Service"}
    if pod_disruption_budget(ttsd) is not None:
        kinds.add("PodDisruptionBudget")
    if network_policy(ttsd) is not None:
        kinds.add("NetworkPolicy")
    return kinds


@dataclass(frozen=True)
class TargetRef:
    """spec.targetRef: a workload voxscale did not create, in the TTSDeployment's namespace, that it scales
    through the scale subresource (and nothing else)."""

    namespace: str
    api_version: str
    kind: str
    name: str

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What identifies the workload, whatever refers to it (the API version may differ)."""
        return (self.namespace, self.group, self.kind, self.name)

    @property
    def ordinal_pods(self) -> bool:
        """Pods named <name>-<ordinal> (a StatefulSet), rather than <name>-<hash>-<5 characters>."""
        return self.kind == "StatefulSet"

    @property
    def replica_set_pods(self) -> bool:
        """Pods of a ReplicaSet (an apps/v1 Deployment): pod-deletion-cost ranks them for a scale-down."""
        return self.group == "apps" and self.kind == "Deployment"

    def describe(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def target_ref(ttsd: dict[str, Any]) -> TargetRef | None:
    """The workload a TTSDeployment is attached to (None: it runs its own, from spec.model)."""
    ref = (ttsd.get("spec") or {}).get("targetRef")
    if not isinstance(ref, dict) or not ref:
        return None
    fields = (str(ref.get(k) or "") for k in ("apiVersion", "kind", "name"))
    return TargetRef(ttsd["metadata"]["namespace"], *fields)


def created_by_voxscale(labels: dict[str, str] | None, owners: list[tuple[str, str, str]]) -> str | None:
    """The TTSDeployment that created a workload, from its labels and owners ((apiVersion, kind, name)
    each); None if none did. A workload a TTSDeployment created is scaled by that one already."""
    for api_version, kind, name in owners:
        if kind == KIND and api_version.startswith(f"{GROUP}/"):
            return name
    labels = labels or {}
    if labels.get("app.kubernetes.io/managed-by") == MANAGED_BY and labels.get(POD_LABEL_TTSDEPLOYMENT):
        return labels[POD_LABEL_TTSDEPLOYMENT]
    return None


def attached_writers(ttsds: list[dict[str, Any]], writes: dict[tuple[str, str], bool]) -> dict[tuple[str, str], str]:
    """(namespace, name) of each attached TTSDeployment that another one, attached earlier to the same
    workload and writing its scale (`writes`: not advisory), keeps from writing -> that one, named for a
    person. The oldest writer keeps the workload (creation time, then name), so exactly one scales it."""
    by_target: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
    for body in ttsds:
        ref = target_ref(body)
        if ref is not None:
            by_target.setdefault(ref.key, []).append(body)
    out: dict[tuple[str, str], str] = {}
    for bodies in by_target.values():
        metas = sorted((b["metadata"] for b in bodies), key=lambda m: (str(m.get("creationTimestamp", "")), m["name"]))
        keys = [(m["namespace"], m["name"]) for m in metas]
        first = next((k for k in keys if writes.get(k)), None)
        if first is None:
            continue
        for key in keys:
            if key != first:
                out[key] = f"{KIND} {first[0]}/{first[1]} (attached first)"
    return out


# ---------------------------------------------------------------- image pre-pull (spec.prePull)
PREPULL_SUFFIX = "-prepull"
PREPULL_LABEL = "voxscale.io/prepull-for"  # on the DaemonSet and its pods: the TTSDeployment they pull for
PREPULL_HOLD_CONTAINER = "hold"
# What keeps each pre-pull pod running once its images are pulled: the pod sandbox ("pause") image,
# which every node already holds because every pod's sandbox runs it - so it adds no pull of its own.
# A cluster whose runtime uses another sandbox image sets the operator's VOXSCALE_PREPULL_HOLD_IMAGE.
PREPULL_HOLD_IMAGE = "registry.k8s.io/pause:3.10"
PREPULL_NOOP_COMMAND = ("true",)
# A pre-pull pod does nothing but exist: the least the scheduler and the kubelet accept.
PREPULL_RESOURCES = {"requests": {"cpu": "1m", "memory": "8Mi"}, "limits": {"memory": "32Mi"}}
# The pod keys copied from the server's pod template: where its pods can land, and how its images are pulled.
PREPULL_PLACEMENT_KEYS = ("nodeSelector", "affinity", "tolerations", "imagePullSecrets", "priorityClassName")


def prepull_enabled(ttsd: dict[str, Any]) -> bool:
    """spec.prePull.enabled (the CRD's default, false, when spec.prePull is absent)."""
    return bool(crd.default_spec(ttsd.get("spec") or {}).get("prePull", {}).get("enabled"))


def prepull_name(name: str) -> str:
    return f"{name}{PREPULL_SUFFIX}"


def prepull_images(pod_spec: dict[str, Any]) -> list[str]:
    """Every distinct image of a pod template's init containers and containers, in order: the server's
    and, behind the door sidecar, the door's too - whichever a new pod would wait for."""
    out: list[str] = []
    for container in [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]:
        image = container.get("image")
        if image and image not in out:
            out.append(image)
    return out


def prepull_labels(name: str) -> dict[str, str]:
    """Never the inference pods' selector label: a pre-pull pod must not join the Service, the pod-start
    samples or the $pods of a query."""
    return {
        "app.kubernetes.io/name": "voxscale-prepull",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        PREPULL_LABEL: name,
    }


def prepull_daemonset(
    ttsd: dict[str, Any],
    pod_spec: dict[str, Any],
    hold_image: str = PREPULL_HOLD_IMAGE,
    command: tuple[str, ...] | None = None,
) -> dict[str, Any]:
    """The DaemonSet `<name>-prepull` that pulls the server's images on every node its pods can land on.

    `pod_spec`: the server's pod template spec (spec.model's Deployment, or the attached workload's).
    Its nodeSelector, affinity, tolerations, imagePullSecrets and priorityClassName are copied, so the
    DaemonSet covers exactly the nodes the scheduler could give a new server pod, pulling as it would.

    The no-op: each image runs as an init container whose command is spec.prePull.command (default
    `true`), which exits at once; a pod is Ready only after its init containers succeeded, so
    numberReady counts the nodes that hold every image. The kubelet pulls an image before it creates
    the container, so the pull happens whatever the command does - but an init container that fails
    is restarted forever and its pod never turns Ready, so the command must exist in the image (an
    image without `true` - distroless, scratch - names one it has). The alternatives were worse: the
    server's own entrypoint would load the model (and ask for a GPU); a main container whose command
    fails keeps the pod unready and restarting; an image volume needs containerd >= 2.1. Then a
    `hold` container of the sandbox image (every node has it already) keeps the pod, and so the
    exited init containers, alive: the kubelet's image garbage collector leaves an image alone while
    a container that used it exists, so the pulled images stay on the node until pre-pull is off.
    """
    meta = ttsd["metadata"]
    name = meta["name"]
    full = crd.default_spec(ttsd.get("spec") or {})
    noop = list(command or full.get("prePull", {}).get("command") or PREPULL_NOOP_COMMAND)
    restricted = {**_restricted(), "runAsNonRoot": True}
    pull = [
        {
            "name": f"pull-{i}",
            "image": image,
            # Never `Never` (nothing would be pulled) and never `Always` (each restart would pull again).
            "imagePullPolicy": "IfNotPresent",
            "command": noop,
            "resources": PREPULL_RESOURCES,
            "securityContext": restricted,
        }
        for i, image in enumerate(prepull_images(pod_spec))
    ]
    hold = {
        "name": PREPULL_HOLD_CONTAINER,
        "image": hold_image,
        "imagePullPolicy": "IfNotPresent",
        "resources": PREPULL_RESOURCES,
        "securityContext": restricted,
    }
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 1,
        # Any user: `true` and pause run as anyone, and a namespace under the restricted policy admits it.
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65535,
            "runAsGroup": 65535,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": pull,
        "containers": [hold],
    }
    for key in PREPULL_PLACEMENT_KEYS:
        if pod_spec.get(key):
            spec[key] = pod_spec[key]
    labels = prepull_labels(name)
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": prepull_name(name),
            "namespace": meta["namespace"],
            "labels": labels,
            "ownerReferences": [owner_reference(ttsd)],
        },
        "spec": {
            "selector": {"matchLabels": {PREPULL_LABEL: name}},
            # Nothing serves from these pods: replacing all at once starts every node's pull of a new image at once.
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "100%"}},
            "template": {"metadata": {"labels": labels}, "spec": spec},
        },
    }

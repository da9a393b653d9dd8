"""Image pre-pull (spec.prePull): the shell that keeps each TTSDeployment's `<name>-prepull` DaemonSet
as its spec asks, and the pure reading of that DaemonSet's status as the ImagePrePulled condition.

The DaemonSet itself is built by `children.prepull_daemonset` (pure). It is kept by the scaling round,
not by the create/update handler alone: an attached workload's pod template (spec.targetRef) changes
without any event of ours - a rollout to a new image - and the pre-pull must follow it. So each round
LISTs the pre-pull DaemonSets once (one call per namespace scope, only while some TTSDeployment has
pre-pull on or a DaemonSet of ours may be left over) and applies one only when its rendering changed
(a hash of it in an annotation), or deletes one whose TTSDeployment turned pre-pull off.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kubernetes.client.exceptions import ApiException

from voxscale.operator import children
from voxscale.operator.kube import APPLY_MANAGER, Kube, retrying
from voxscale.operator.status import Condition

log = logging.getLogger("voxscale.operator")

HASH_ANNOTATION = "voxscale.io/prepull-hash"
CONDITION = "ImagePrePulled"
# The sandbox image of the cluster's runtime, when it is not registry.k8s.io/pause (children.PREPULL_HOLD_IMAGE).
HOLD_IMAGE_ENV = "VOXSCALE_PREPULL_HOLD_IMAGE"

Key = tuple[str, str]


def hold_image() -> str:
    return os.environ.get(HOLD_IMAGE_ENV) or children.PREPULL_HOLD_IMAGE


@dataclass(frozen=True)
class Observed:
    """What a pre-pull DaemonSet's status says (the fields the DaemonSet controller keeps)."""

    images: tuple[str, ...]
    generation: int
    observed_generation: int
    desired: int  # desiredNumberScheduled: the nodes the server's pods can land on
    ready: int  # numberReady: of those, the nodes whose pod pulled every image
    updated: int  # updatedNumberScheduled: of those, the nodes running the current template
    spec_hash: str


def observed(ds: dict[str, Any]) -> Observed:
    meta, spec, status = ds.get("metadata") or {}, ds.get("spec") or {}, ds.get("status") or {}
    pod = (spec.get("template") or {}).get("spec") or {}
    images = tuple(c.get("image", "") for c in pod.get("initContainers") or [])
    return Observed(
        images=images,
        generation=int(meta.get("generation") or 0),
        observed_generation=int(status.get("observedGeneration") or 0),
        desired=int(status.get("desiredNumberScheduled") or 0),
        ready=int(status.get("numberReady") or 0),
        updated=int(status.get("updatedNumberScheduled") or 0),
        spec_hash=str((meta.get("annotations") or {}).get(HASH_ANNOTATION, "")),
    )


def condition(name: str, seen: Observed | None, problem: str | None = None) -> Condition:
    """ImagePrePulled: True once every node the pods can land on holds the current images."""
    ds = children.prepull_name(name)
    if problem is not None:
        return Condition(CONDITION, "False", "PrePullFailed", f"DaemonSet {ds}: {problem}")
    if seen is None:
        return Condition(CONDITION, "Unknown", "Creating", f"creating DaemonSet {ds}")
    images = ", ".join(seen.images)
    if seen.observed_generation < seen.generation:
        return Condition(CONDITION, "Unknown", "Updating", f"DaemonSet {ds} is taking its new template ({images})")
    if seen.desired == 0:
        message = f"DaemonSet {ds} matches no node: no node fits the pods' nodeSelector, affinity and tolerations yet"
        return Condition(CONDITION, "False", "NoNodes", message)
    nodes = f"{min(seen.ready, seen.updated)}/{seen.desired} nodes"
    if seen.ready >= seen.desired and seen.updated >= seen.desired:
        return Condition(CONDITION, "True", "Pulled", f"{nodes} hold {images} (DaemonSet {ds})")
    return Condition(CONDITION, "False", "Pulling", f"{nodes} hold {images} so far (DaemonSet {ds})")


def spec_hash(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


class PrePuller:
    """Keeps the pre-pull DaemonSets of the TTSDeployments the scaler evaluates (one per round)."""

    def __init__(self, kube: Kube, namespaces: list[str] | None) -> None:
        self.kube = kube
        self.namespaces = namespaces
        self._maybe_left = True  # until the first LIST: a DaemonSet of ours from before a restart

    def round(self, bodies: Iterable[dict[str, Any]]) -> dict[Key, Condition]:
        """Apply or delete each due TTSDeployment's DaemonSet; its ImagePrePulled condition (absent: off)."""
        bodies = list(bodies)
        wanted = {_key(b) for b in bodies if _enabled(b)}
        if not wanted and not self._maybe_left:
            return {}
        self._maybe_left = bool(wanted)  # (a LIST that fails is not retried for leftovers alone)
        existing = self._list()
        self._maybe_left = bool(wanted or existing)  # keep listing until what is there is settled
        out: dict[Key, Condition] = {}
        for body in bodies:
            key = _key(body)
            found = existing.get(key)
            try:
                if key in wanted:
                    out[key] = self._keep(body, found)
                elif found is not None:
                    self._delete(key)
            except ApiException as exc:
                why = f"HTTP {exc.status}: {exc.reason}"
                if exc.status in (401, 403):
                    why += "; the operator's RBAC must allow get, list, create, patch and delete on apps daemonsets"
                log.warning("pre-pull of %s/%s: %s", *key, why)
                if key in wanted:
                    out[key] = condition(key[1], None, why)
            except (KeyError, TypeError, ValueError) as exc:  # a spec the builders cannot render: said, not raised
                out[key] = condition(key[1], None, f"cannot render it from the spec: {exc}")
        return out

    def _keep(self, body: dict[str, Any], found: dict[str, Any] | None) -> Condition:
        ns, name = _key(body)
        pod_spec, problem = self.pod_spec(body)
        if pod_spec is None:
            return condition(name, None, problem)
        ds = children.prepull_daemonset(body, pod_spec, hold_image())
        digest = spec_hash(ds)
        ds["metadata"]["annotations"] = {HASH_ANNOTATION: digest}
        if found is None or observed(found).spec_hash != digest:
            apply = functools.partial(
                self.kube.apps.patch_namespaced_daemon_set,
                ds["metadata"]["name"],
                ns,
                ds,
                field_manager=APPLY_MANAGER,
                force=True,
                _content_type="application/apply-patch+yaml",
            )
            applied = retrying(apply, f"apply DaemonSet {ns}/{ds['metadata']['name']}")
            found = _plain(self.kube, applied)
            if found is None or not found.get("status"):
                return condition(name, None)
        return condition(name, observed(found))

    def pod_spec(self, body: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
        """The server's pod template spec: spec.model's Deployment as rendered, or the attached
        workload's as stored (None and why when it cannot be read)."""
        ref = children.target_ref(body)
        if ref is None:
            return children.deployment(body)["spec"]["template"]["spec"], None
        try:
            if ref.group == "apps" and ref.kind in ("Deployment", "StatefulSet"):
                read: Callable[..., Any] = (
                    self.kube.apps.read_namespaced_deployment
                    if ref.kind == "Deployment"
                    else self.kube.apps.read_namespaced_stateful_set
                )
                obj = _plain(self.kube, retrying(lambda: read(ref.name, ref.namespace), f"read {ref.describe()}"))
            else:
                path = self.kube._scale_path(ref).rpartition("/scale")[0]
                obj = retrying(lambda: self.kube._call(path, "GET"), f"read {ref.describe()}")
        except ApiException as exc:
            if exc.status == 404:
                return None, f"{ref.describe()} (spec.targetRef) does not exist: nothing to pre-pull"
            raise
        template = ((obj.get("spec") or {}).get("template") or {}).get("spec")
        if not isinstance(template, dict) or not template.get("containers"):
            return None, f"{ref.describe()} has no spec.template.spec.containers to take the images from"
        return template, None

    def _list(self) -> dict[Key, dict[str, Any]]:
        apps = self.kube.apps
        calls: list[Callable[[], Any]] = (
            [functools.partial(apps.list_namespaced_daemon_set, ns, label_selector=children.PREPULL_LABEL)
             for ns in self.namespaces]
            if self.namespaces
            else [functools.partial(apps.list_daemon_set_for_all_namespaces, label_selector=children.PREPULL_LABEL)]
        )  # fmt: skip
        out: dict[Key, dict[str, Any]] = {}
        for call in calls:
            for item in retrying(call, "list pre-pull DaemonSets").items:
                ds = _plain(self.kube, item)
                labels = ds["metadata"].get("labels") or {}
                if labels.get("app.kubernetes.io/managed-by") == children.MANAGED_BY:
                    out[(ds["metadata"]["namespace"], labels[children.PREPULL_LABEL])] = ds
        return out

    def _delete(self, key: Key) -> None:
        ns, name = key
        ds = children.prepull_name(name)
        try:
            retrying(lambda: self.kube.apps.delete_namespaced_daemon_set(ds, ns), f"delete DaemonSet {ns}/{ds}")
        except ApiException as exc:
            if exc.status != 404:
                raise
            return
        log.info("%s/%s: spec.prePull is off, deleted DaemonSet %s", ns, name, ds)


def _enabled(body: dict[str, Any]) -> bool:
    """spec.prePull.enabled; False for a spec too malformed to read (its other conditions say why)."""
    try:
        return children.prepull_enabled(body)
    except (KeyError, TypeError, ValueError, AttributeError):
        return False


def _key(body: dict[str, Any]) -> Key:
    return (body["metadata"]["namespace"], body["metadata"]["name"])


def _plain(kube: Kube, obj: Any) -> Any:
    """A client object as the API's JSON (camelCase keys), as the builders and `observed` read it."""
    return kube.api.sanitize_for_serialization(obj)  # type: ignore[no-untyped-call]

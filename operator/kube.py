"""The operator's Kubernetes calls, in one thin layer: server-side apply of children, the scale
subresource, status patches and Events. Every call is retried with backoff on conflicts, timeouts and
a restarting API server; anything else is raised for the caller to report."""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from prometheus_client import Counter

from voxscale.metrics_contract import POD_LABEL_TTSDEPLOYMENT
from voxscale.operator import children
from voxscale.operator.crd import GROUP, PLURAL, VERSION
from voxscale.operator.informers import Index, Informer

log = logging.getLogger("voxscale.operator")
T = TypeVar("T")

APPLY_MANAGER = "voxscale-operator"  # owns everything in the children except the replica count
SCALE_MANAGER = "voxscale-scaler"  # owns spec.replicas, through the scale subresource
RETRYABLE_STATUS = {409, 429, 500, 502, 503, 504}
DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
API_REQUESTS = Counter(
    "voxscale_operator_api_requests",
    "Kubernetes API requests sent, by HTTP method (WATCH: a watch stream opened).",
    ["method"],
)


def _counted(api: client.ApiClient) -> client.ApiClient:
    """Count every request this client sends (voxscale_operator_api_requests): the operator bench
    reads it to show the requests per round do not grow with the number of objects."""
    if getattr(api, "_voxscale_counted", False):
        return api
    call_api = api.call_api

    def counted(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        API_REQUESTS.labels("WATCH" if "watch=true" in url.lower() else method).inc()
        return call_api(method, url, *args, **kwargs)

    api.call_api = counted  # type: ignore[method-assign]
    api._voxscale_counted = True  # type: ignore[attr-defined]
    return api


def load_config() -> None:
    """In-cluster credentials when running in a pod, otherwise KUBECONFIG."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]


def retrying(call: Callable[[], T], what: str, attempts: int = 6) -> T:
    delay = 0.2
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except ApiException as exc:
            if exc.status not in RETRYABLE_STATUS or attempt == attempts:
                raise
            log.info("%s: HTTP %s, retrying in %.1fs", what, exc.status, delay)
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as exc:
            if attempt == attempts:
                raise
            log.info("%s: %s, retrying in %.1fs", what, exc.__class__.__name__, delay)
        time.sleep(delay * (1 + random.random() / 2))
        delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class _Child:
    """One object a TTSDeployment owns: how to render it from the spec (None: the spec does not ask
    for it), apply it, and - for optional ones - find and remove it."""

    kind: str
    render: Callable[[dict[str, Any]], dict[str, Any] | None]
    patch: Callable[..., Any]
    read: Callable[..., Any] | None = None
    delete: Callable[..., Any] | None = None
    removed_when: str = ""


class Kube:
    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api = _counted(api_client or client.ApiClient())
        self.apps = client.AppsV1Api(self.api)
        self.core = client.CoreV1Api(self.api)
        self.policy = client.PolicyV1Api(self.api)
        self.networking = client.NetworkingV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)
        self._plurals: dict[tuple[str, str], str] = {}  # (apiVersion, kind) -> resource, from discovery
        self._informers: dict[str, list[Informer]] = {}  # kind -> one per namespace scope (start_watches)
        self._starts: Index[PodStarts] | None = None

    # ------------------------------------------------------------------ watch-fed caches
    def start_watches(self, namespaces: list[str] | None) -> list[Informer]:
        """Serve the round's reads (Deployments, children, HPAs, pods) from watches instead of a LIST
        per kind per round (issue 24): one informer per kind and namespace scope. Until an informer's
        first LIST has answered, the reads LIST as before."""
        managed = f"app.kubernetes.io/managed-by={children.MANAGED_BY}"
        autoscaling = client.AutoscalingV2Api(self.api)
        kinds: list[tuple[str, Callable[..., Any], Callable[..., Any], str]] = [
            ("Deployment", self.apps.list_namespaced_deployment, self.apps.list_deployment_for_all_namespaces, managed),
            ("Service", self.core.list_namespaced_service, self.core.list_service_for_all_namespaces, managed),
            (
                "PodDisruptionBudget",
                self.policy.list_namespaced_pod_disruption_budget,
                self.policy.list_pod_disruption_budget_for_all_namespaces,
                managed,
            ),
            (
                "NetworkPolicy",
                self.networking.list_namespaced_network_policy,
                self.networking.list_network_policy_for_all_namespaces,
                managed,
            ),
            (
                "HorizontalPodAutoscaler",
                autoscaling.list_namespaced_horizontal_pod_autoscaler,
                autoscaling.list_horizontal_pod_autoscaler_for_all_namespaces,
                "",
            ),
            ("Pod", self.core.list_namespaced_pod, self.core.list_pod_for_all_namespaces, POD_LABEL_TTSDEPLOYMENT),
        ]
        scopes: list[tuple[str, ...]] = [(ns,) for ns in namespaces] if namespaces else [()]
        for kind, namespaced, everywhere, selector in kinds:
            self._informers[kind] = [
                Informer(
                    f"{kind}s {scope[0] if scope else '(all namespaces)'}",
                    namespaced if scope else everywhere,
                    *scope,
                    label_selector=selector,
                    transform=_SLIM.get(kind),
                )
                for scope in scopes
            ]
        self._starts = Index(_pod_owner, starts_of)
        for informer in self._informers["Pod"]:
            self._starts.attach(informer)
        started = [i.start() for group in self._informers.values() for i in group]
        return started

    def stop_watches(self) -> None:
        for group in self._informers.values():
            for informer in group:
                informer.stop()
        self._informers, self._starts = {}, None

    def _cached(self, kind: str) -> list[Any] | None:
        """Every cached object of `kind`, or None when it is not watched or not synced yet."""
        group = self._informers.get(kind)
        if not group or not all(i.synced.is_set() for i in group):
            return None
        return [o for i in group for o in i.values()]

    def informer_lists(self) -> int:
        """LIST calls the informers made so far (the first ones, and one per broken watch)."""
        return sum(i.lists for group in self._informers.values() for i in group)

    # ------------------------------------------------------------------ children
    def apply_children(self, ttsd: dict[str, Any]) -> list[str]:
        """Create or update the Deployment, Service, PDB and NetworkPolicy; returns what was applied or
        removed. A child the spec no longer asks for is deleted, but only if voxscale made it. A
        TTSDeployment attached to a workload (spec.targetRef) has no children: nothing is applied."""
        if children.target_ref(ttsd) is not None:
            return []
        ns, name = ttsd["metadata"]["namespace"], ttsd["metadata"]["name"]
        done = []
        for child in self._children():
            body = child.render(ttsd)
            if body is not None:
                apply = functools.partial(self._apply, child.patch, name, ns, body)
                retrying(apply, f"apply {child.kind} {ns}/{name}")
                done.append(child.kind)
            elif child.delete is not None and self._delete_if_ours(child, ns, name):
                done.append(f"{child.kind} (removed: {child.removed_when})")
        return done

    def _children(self) -> tuple[_Child, ...]:
        return (
            _Child("Deployment", children.deployment, self.apps.patch_namespaced_deployment),
            _Child("Service", children.service, self.core.patch_namespaced_service),
            _Child(
                "PodDisruptionBudget",
                children.pod_disruption_budget,
                self.policy.patch_namespaced_pod_disruption_budget,
                self.policy.read_namespaced_pod_disruption_budget,
                self.policy.delete_namespaced_pod_disruption_budget,
                "min < 2",
            ),
            _Child(
                "NetworkPolicy",
                children.network_policy,
                self.networking.patch_namespaced_network_policy,
                self.networking.read_namespaced_network_policy,
                self.networking.delete_namespaced_network_policy,
                "spec.networkPolicy.enabled is false",
            ),
        )

    @staticmethod
    def _apply(patch: Callable[..., Any], name: str, ns: str, body: dict[str, Any]) -> Any:
        return patch(
            name,
            ns,
            body,
            field_manager=APPLY_MANAGER,
            force=True,
            _content_type="application/apply-patch+yaml",
        )

    @staticmethod
    def _delete_if_ours(child: _Child, ns: str, name: str) -> bool:
        """Delete the child if it exists and carries voxscale's managed-by label (never a user's own)."""
        assert child.read is not None and child.delete is not None
        try:
            found = child.read(name, ns)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        labels = (found.metadata.labels if found.metadata else None) or {}
        if labels.get("app.kubernetes.io/managed-by") != children.MANAGED_BY:
            return False
        delete = child.delete
        retrying(lambda: delete(name, ns), f"delete {child.kind} {ns}/{name}")
        return True

    # ------------------------------------------------------------------ scaling
    def list_deployments(self, namespaces: list[str] | None) -> dict[tuple[str, str], Any]:
        """Every voxscale-managed Deployment in one list call per namespace scope (not per object)."""
        cached = self._cached("Deployment")
        if cached is not None:
            return {(d.metadata.namespace, d.metadata.name): d for d in cached}
        selector = f"app.kubernetes.io/managed-by={children.MANAGED_BY}"
        calls: list[Callable[[], Any]] = (
            [functools.partial(self.apps.list_namespaced_deployment, ns, label_selector=selector) for ns in namespaces]
            if namespaces
            else [functools.partial(self.apps.list_deployment_for_all_namespaces, label_selector=selector)]
        )
        items: list[Any] = []
        for call in calls:
            items += retrying(call, "list Deployments").items
        return {(d.metadata.namespace, d.metadata.name): d for d in items}

    def list_children(self, namespaces: list[str] | None) -> dict[tuple[str, str], set[str]]:
        """Which of its Service, PodDisruptionBudget and NetworkPolicy each TTSDeployment has, one list call per
        kind and scope: a child deleted by hand is noticed at the next round, not the next spec edit."""
        selector = f"app.kubernetes.io/managed-by={children.MANAGED_BY}"
        per_kind: list[tuple[str, Callable[..., Any], Callable[..., Any]]] = [
            ("Service", self.core.list_namespaced_service, self.core.list_service_for_all_namespaces),
            (
                "PodDisruptionBudget",
                self.policy.list_namespaced_pod_disruption_budget,
                self.policy.list_pod_disruption_budget_for_all_namespaces,
            ),
            (
                "NetworkPolicy",
                self.networking.list_namespaced_network_policy,
                self.networking.list_network_policy_for_all_namespaces,
            ),
        ]
        out: dict[tuple[str, str], set[str]] = {}
        for kind, namespaced, everywhere in per_kind:
            cached = self._cached(kind)
            if cached is not None:
                for item in cached:
                    out.setdefault((item.metadata.namespace, item.metadata.name), set()).add(kind)
                continue
            calls = (
                [functools.partial(namespaced, ns, label_selector=selector) for ns in namespaces]
                if namespaces
                else [functools.partial(everywhere, label_selector=selector)]
            )
            for call in calls:
                for item in retrying(call, f"list {kind}s").items:
                    out.setdefault((item.metadata.namespace, item.metadata.name), set()).add(kind)
        return out

    def foreign_autoscalers(self, namespaces: list[str] | None) -> dict[WorkloadKey, str]:
        """(namespace, API group, kind, name) of every workload an HorizontalPodAutoscaler scales -> that
        HPA, named for a person (KEDA's ScaledObject shows as the owner of the HPA it creates). A
        TTSDeployment's own Deployment is (namespace, "apps", "Deployment", its name)."""
        hpas = self._cached("HorizontalPodAutoscaler")
        if hpas is None:
            autoscaling = client.AutoscalingV2Api(self.api)
            calls: list[Callable[[], Any]] = (
                [functools.partial(autoscaling.list_namespaced_horizontal_pod_autoscaler, ns) for ns in namespaces]
                if namespaces
                else [autoscaling.list_horizontal_pod_autoscaler_for_all_namespaces]
            )
            hpas = [hpa for call in calls for hpa in retrying(call, "list HorizontalPodAutoscalers").items]
        out: dict[WorkloadKey, str] = {}
        for hpa in hpas:
            ref = hpa.spec.scale_target_ref
            ns = hpa.metadata.namespace
            group = (ref.api_version or "apps/v1").rpartition("/")[0]
            owners = [f"{o.kind} {ns}/{o.name}" for o in hpa.metadata.owner_references or []]
            owned = f" (created by {', '.join(owners)})" if owners else ""
            out[(ns, group, ref.kind, ref.name)] = f"HorizontalPodAutoscaler {ns}/{hpa.metadata.name}{owned}"
        return out

    def pod_starts(self, namespaces: list[str] | None) -> dict[tuple[str, str], PodStarts]:
        """Each TTSDeployment's pod starts (see `starts_of`), one list call per scope."""
        if self._starts is not None and self._cached("Pod") is not None:
            return cast(dict[tuple[str, str], PodStarts], self._starts.views())  # keys: _pod_owner's
        selector = POD_LABEL_TTSDEPLOYMENT
        calls: list[Callable[[], Any]] = (
            [functools.partial(self.core.list_namespaced_pod, ns, label_selector=selector) for ns in namespaces]
            if namespaces
            else [functools.partial(self.core.list_pod_for_all_namespaces, label_selector=selector)]
        )
        by_owner: dict[tuple[str, str], list[Any]] = {}
        for call in calls:
            for pod in retrying(call, "list pods").items:
                owner = (pod.metadata.labels or {}).get(selector)
                if owner:
                    by_owner.setdefault((pod.metadata.namespace, owner), []).append(pod)
        return {k: starts_of(pods) for k, pods in by_owner.items()}

    # ------------------------------------------------------------------ attached workloads (spec.targetRef)
    def read_target(self, ref: children.TargetRef) -> Workload | None:
        """The replica count, ready pods and pod selector of a workload voxscale did not create (None: it
        does not exist). apps/v1 Deployments and StatefulSets are read as themselves (get, which the
        chart grants); any other kind through its scale subresource (status.selector), its ready pods
        counted from that selector."""
        what = f"read {ref.describe()}"
        try:
            if ref.group == "apps" and ref.kind in ("Deployment", "StatefulSet"):
                read = (
                    self.apps.read_namespaced_deployment
                    if ref.kind == "Deployment"
                    else self.apps.read_namespaced_stateful_set
                )
                obj = retrying(lambda: read(ref.name, ref.namespace), what)
                return Workload(
                    replicas=int(obj.spec.replicas if obj.spec.replicas is not None else 1),
                    ready=int((obj.status.ready_replicas if obj.status else None) or 0),
                    selector=selector_string(obj.spec.selector),
                    created_by=children.created_by_voxscale(
                        obj.metadata.labels if obj.metadata else None,
                        [
                            (o.api_version, o.kind, o.name)
                            for o in (obj.metadata and obj.metadata.owner_references) or []
                        ],
                    ),
                )
            path = self._scale_path(ref)
            scale = retrying(lambda: self._call(path, "GET"), what)
            meta = retrying(lambda: self._call(path.rpartition("/scale")[0], "GET"), what).get("metadata", {})
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        selector = str((scale.get("status") or {}).get("selector") or "")
        spec_replicas = (scale.get("spec") or {}).get("replicas")
        ready = sum(1 for pod in self.pods_of(ref.namespace, selector) if _is_ready(pod)) if selector else 0
        owners = [
            (o.get("apiVersion", ""), o.get("kind", ""), o.get("name", "")) for o in meta.get("ownerReferences") or []
        ]
        created_by = children.created_by_voxscale(meta.get("labels"), owners)
        return Workload(int(spec_replicas if spec_replicas is not None else 1), ready, selector, created_by)

    def pods_of(self, ns: str, selector: str) -> list[Any]:
        """The pods a label selector matches in one namespace (an attached workload's)."""
        if not selector:
            return []
        items: list[Any] = retrying(
            lambda: self.core.list_namespaced_pod(ns, label_selector=selector).items, f"list pods {ns} {selector}"
        )
        return items

    def scale_target(self, ref: children.TargetRef, replicas: int) -> None:
        """Write an attached workload's replica count through its scale subresource, under the scaler's
        field manager: nothing else of the workload is written."""
        body = {"spec": {"replicas": replicas}}
        what = f"scale {ref.describe()}"
        if ref.group == "apps" and ref.kind == "Deployment":
            self.scale(ref.namespace, ref.name, replicas)
        elif ref.group == "apps" and ref.kind == "StatefulSet":
            retrying(
                lambda: self.apps.patch_namespaced_stateful_set_scale(
                    ref.name, ref.namespace, body, field_manager=SCALE_MANAGER
                ),
                what,
            )
        else:
            path = self._scale_path(ref)
            retrying(lambda: self._call(path, "PATCH", body), what)

    def _scale_path(self, ref: children.TargetRef) -> str:
        """/apis/<group>/<version>/namespaces/<ns>/<plural>/<name>/scale, the plural found by discovery
        (a kind without a scale subresource is an ApiException 422 naming it)."""
        plural = self._plural(ref.api_version, ref.kind)
        root = f"/apis/{ref.api_version}" if ref.group else f"/api/{ref.api_version}"
        return f"{root}/namespaces/{ref.namespace}/{plural}/{ref.name}/scale"

    def _plural(self, api_version: str, kind: str) -> str:
        cached = self._plurals.get((api_version, kind))
        if cached is not None:
            return cached
        root = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
        listed = retrying(lambda: self._call(root, "GET"), f"discover {api_version}")
        names = {r["name"] for r in listed.get("resources", [])}
        for res in listed.get("resources", []):
            if res.get("kind") == kind and "/" not in res["name"]:
                if f"{res['name']}/scale" not in names:
                    break
                self._plurals[(api_version, kind)] = res["name"]
                return str(res["name"])
        raise ApiException(
            status=422, reason=f"{api_version} {kind} has no scale subresource; voxscale cannot scale it"
        )

    def _call(self, path: str, method: str, body: Any = None) -> Any:
        """One request to a path the typed client has no method for (another group's /scale); the
        answer as plain JSON. A failure is the ApiException the typed calls raise."""
        headers: dict[str, str | None] = {"Accept": "application/json"}
        query: list[tuple[str, str]] = []
        if method == "PATCH":
            headers["Content-Type"] = "application/merge-patch+json"
            query.append(("fieldManager", SCALE_MANAGER))
        request = self.api.param_serialize(
            method, path, query_params=query, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        response = self.api.call_api(*request)
        response.read()  # type: ignore[no-untyped-call]
        if not 200 <= int(response.status) <= 299:
            raise ApiException(http_resp=response)
        return json.loads(response.data or b"{}")

    def secret_data(self, ns: str, name: str) -> dict[str, str]:
        """A Secret's data, base64-encoded as the API holds it (raises ApiException)."""
        secret = self.core.read_namespaced_secret(name, ns)
        return {k: str(v) for k, v in (secret.data or {}).items()}

    def set_deletion_costs(self, ns: str, costs: dict[str, int]) -> None:
        """Annotate pods with `controller.kubernetes.io/pod-deletion-cost`: on a scale-down the
        ReplicaSet removes the Ready pods with the lowest cost first, so idle pods go before busy ones."""
        for pod, cost in costs.items():
            body = {"metadata": {"annotations": {DELETION_COST: str(cost)}}}
            patch = functools.partial(self.core.patch_namespaced_pod, pod, ns, body)
            try:
                retrying(patch, f"annotate pod {ns}/{pod}")
            except ApiException as exc:
                if exc.status != 404:  # a pod that is already gone costs nothing to remove
                    raise

    def scale(self, ns: str, name: str, replicas: int) -> None:
        body = {"spec": {"replicas": replicas}}
        retrying(
            lambda: self.apps.patch_namespaced_deployment_scale(name, ns, body, field_manager=SCALE_MANAGER),
            f"scale Deployment {ns}/{name}",
        )

    # ------------------------------------------------------------------ status and events
    def replace_status(self, ns: str, name: str, status: dict[str, Any]) -> None:
        """Replace the whole status (a JSON patch `add` of /status): keys this status lacks are gone
        afterwards, which a merge patch would have kept."""
        patch = [{"op": "add", "path": "/status", "value": status}]
        retrying(
            lambda: self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, ns, PLURAL, name, patch, _content_type="application/json-patch+json"
            ),
            f"replace status {ns}/{name}",
        )

    def event(self, ttsd: dict[str, Any], kind: str, reason: str, message: str) -> None:
        """Post a core/v1 Event on the TTSDeployment (best effort: an Event is never worth a failure)."""
        meta = ttsd["metadata"]
        now = dt.datetime.now(dt.UTC)
        body = client.CoreV1Event(
            metadata=client.V1ObjectMeta(name=f"{meta['name']}.{uuid.uuid4().hex[:12]}", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(
                api_version=f"{GROUP}/{VERSION}",
                kind="TTSDeployment",
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
            ),
            reason=reason,
            message=message[:1024],
            type=kind,
            first_timestamp=now,
            last_timestamp=now,
            count=1,
            source=client.V1EventSource(component="voxscale-operator"),
            reporting_component="voxscale-operator",
            reporting_instance="voxscale-operator",
        )
        try:
            self.core.create_namespaced_event(meta["namespace"], body)
        except (ApiException, urllib3.exceptions.HTTPError) as exc:
            log.warning("could not post Event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], exc)


WorkloadKey = tuple[str, str, str, str]  # (namespace, API group, kind, name)


@dataclass(frozen=True)
class Workload:
    """What the scaler reads of an attached workload (spec.targetRef) each round."""

    replicas: int  # its spec.replicas
    ready: int
    selector: str  # a label selector string for its pods ("" when it reports none)
    created_by: str | None = None  # the TTSDeployment that created it, when one did


def selector_string(selector: Any) -> str:
    """A kubernetes client V1LabelSelector as the string `list ... label_selector=` takes."""
    if selector is None:
        return ""
    parts = [f"{k}={v}" for k, v in sorted((selector.match_labels or {}).items())]
    for expr in selector.match_expressions or []:
        values = ",".join(sorted(expr.values or []))
        op = expr.operator
        if op == "In":
            parts.append(f"{expr.key} in ({values})")
        elif op == "NotIn":
            parts.append(f"{expr.key} notin ({values})")
        elif op == "Exists":
            parts.append(expr.key)
        elif op == "DoesNotExist":
            parts.append(f"!{expr.key}")
    return ",".join(parts)


def _slim_metadata(obj: Any) -> Any:
    obj.metadata.managed_fields = None
    obj.metadata.annotations = None
    return obj


def _slim_pod(pod: Any) -> Any:
    """What starts_of reads of a pod: metadata (labels, times) and status; not its spec."""
    pod.spec = None
    return _slim_metadata(pod)


def _slim_deployment(dep: Any) -> Any:
    """What the round reads of its own Deployment: replicas and ready replicas."""
    if dep.spec is not None and dep.spec.template is not None:
        dep.spec.template.spec = None
    return _slim_metadata(dep)


def _keys_only(obj: Any) -> Any:
    """Children the round only needs to know exist."""
    obj.spec = None
    if getattr(obj, "status", None) is not None:  # a NetworkPolicy has none
        obj.status = None
    return _slim_metadata(obj)


_SLIM: dict[str, Callable[[Any], Any]] = {
    "Deployment": _slim_deployment,
    "Service": _keys_only,
    "PodDisruptionBudget": _keys_only,
    "NetworkPolicy": _keys_only,
    "HorizontalPodAutoscaler": _slim_metadata,  # its spec names the target; its owners name KEDA
    "Pod": _slim_pod,
}


def _pod_owner(pod: Any) -> tuple[str, str] | None:
    """The TTSDeployment a pod belongs to, by the label its template carries."""
    owner = (pod.metadata.labels or {}).get(POD_LABEL_TTSDEPLOYMENT)
    return (pod.metadata.namespace, owner) if owner else None


def _is_ready(pod: Any) -> bool:
    if pod.metadata.deletion_timestamp is not None:
        return False
    condition = _ready_condition(pod)
    return condition is not None and condition.status == "True"


@dataclass(frozen=True)
class NotReady:
    """A pod of the fleet that is not Ready: since when, and what its containers wait on."""

    name: str
    since: dt.datetime  # its creation, or its Ready condition's last turn to False
    why: str  # a container's waiting reason (ImagePullBackOff, CrashLoopBackOff...) or the pod's phase


@dataclass(frozen=True)
class PodStarts:
    """What a TTSDeployment's pods say about starting: the learnt cold start's samples, and the
    pods on their way (the scaler decides which of them are stuck)."""

    ready_seconds: tuple[float, ...] = ()  # creation -> first Ready of the pods Ready now
    not_ready: tuple[NotReady, ...] = ()
    phases: tuple[StartPhases, ...] = ()  # where those starts' time went, per pod (where the pod says)


@dataclass(frozen=True)
class StartPhases:
    """One pod's start, from its own conditions and container states: waiting for a node (creation ->
    PodScheduled), pulling the image and creating the containers (-> the last container's start), and
    loading until Ready (-> Ready: model loading, warm-up, probes)."""

    scheduling: float
    pull_and_start: float
    loading: float


def start_phases(pod: Any) -> StartPhases | None:
    """The three phases of a Ready pod without restarts, or None where a timestamp is missing or the
    order is impossible (clock skew between the API server and the node)."""
    status = pod.status
    created = pod.metadata.creation_timestamp
    conds = {c.type: c for c in (status.conditions if status else None) or []}
    started = [
        s.state.running.started_at
        for s in (status.container_statuses if status else None) or []
        if s.state is not None and s.state.running is not None and s.state.running.started_at is not None
    ]
    scheduled, ready = conds.get("PodScheduled"), conds.get("Ready")
    if not created or not started or scheduled is None or ready is None:
        return None
    times = [created, scheduled.last_transition_time, max(started), ready.last_transition_time]
    if any(t is None for t in times) or any(b < a for a, b in itertools.pairwise(times)):
        return None
    gaps = [float((b - a).total_seconds()) for a, b in itertools.pairwise(times)]
    return StartPhases(*gaps)


def starts_of(pods: list[Any]) -> PodStarts:
    """The start samples and the not-Ready pods among `pods` (kubernetes client V1Pod objects).
    Pods on their way out (deleted, Succeeded, Failed) are neither."""
    ready: list[float] = []
    phases: list[StartPhases] = []
    not_ready: list[NotReady] = []
    for pod in pods:
        if pod.metadata.deletion_timestamp is not None or (pod.status and pod.status.phase in ("Succeeded", "Failed")):
            continue
        condition = _ready_condition(pod)
        if condition is not None and condition.status == "True":
            started = _first_ready_after(pod, condition)
            if started is not None:
                ready.append(started)
                phases += [p for p in [start_phases(pod)] if p is not None]
            continue
        since = condition.last_transition_time if condition is not None else None
        created = pod.metadata.creation_timestamp
        if since or created:
            not_ready.append(NotReady(pod.metadata.name, since or created, _waiting_on(pod)))
    return PodStarts(tuple(ready), tuple(not_ready), tuple(phases))


def _ready_condition(pod: Any) -> Any:
    for cond in (pod.status.conditions if pod.status else None) or []:
        if cond.type == "Ready":
            return cond
    return None


def _first_ready_after(pod: Any, ready: Any) -> float | None:
    """Seconds from the pod's creation to its FIRST Ready (None: not known).

    Kubernetes keeps only the Ready condition's last transition: after a container restart that is
    the restart, and the sample would be the pod's age (one such pod of ten becomes the learnt P90,
    hours of look-ahead). A pod whose containers restarted has no honest sample: it is skipped. The
    server's readiness turns False only while loading or draining, so without a restart the last
    transition is the first."""
    statuses = (pod.status.container_statuses if pod.status else None) or []
    if any((s.restart_count or 0) > 0 for s in statuses):
        return None
    created = pod.metadata.creation_timestamp
    if not created or not ready.last_transition_time:
        return None
    seconds = float((ready.last_transition_time - created).total_seconds())
    return seconds if seconds >= 0 else None


def _waiting_on(pod: Any) -> str:
    """Why a pod is not Ready, in Kubernetes' own words: a container's waiting reason, else the phase."""
    statuses = [
        *((pod.status.init_container_statuses if pod.status else None) or []),
        *((pod.status.container_statuses if pod.status else None) or []),
    ]
    for status in statuses:
        waiting = status.state.waiting if status.state else None
        if waiting is not None and waiting.reason:
            return str(waiting.reason)
    return str(pod.status.phase if pod.status and pod.status.phase else "Pending")

"""kopf handlers: thin glue between watch events and the reconcile/scale shells.

Imported for its side effect of registering handlers; `runner.run()` starts kopf after this process
has won leader election.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from voxscale.operator import children
from voxscale.operator.crd import GROUP, PLURAL, VERSION
from voxscale.operator.kube import Kube
from voxscale.operator.scaler import Scaler


@dataclass
class Runtime:
    """What the handlers share: built by runner before kopf starts and handed to kopf as its `memo`
    (kopf gives each object a shallow copy, so all of them share this kube and scaler)."""

    kube: Kube
    scaler: Scaler
    watch_reads: bool = True  # the round reads watch-fed caches (issue 24); False: a LIST per kind per round
    task: asyncio.Task[None] | None = None


@kopf.on.startup()
async def _startup(settings: kopf.OperatorSettings, memo: Runtime, **_: Any) -> None:
    # Our status schema is strict: keep kopf's own bookkeeping in annotations, not in status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="voxscale.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="voxscale.io", key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING  # the scaler posts its own, more useful, Events
    settings.watching.server_timeout = 120
    settings.networking.error_backoffs = [1, 2, 5, 10, 20]
    if memo.watch_reads:
        memo.kube.start_watches(memo.scaler.namespaces)
    memo.task = asyncio.create_task(memo.scaler.run_forever())


@kopf.on.cleanup()
async def _cleanup(memo: Runtime, **_: Any) -> None:
    if memo.task is not None:
        memo.task.cancel()
    memo.kube.stop_watches()


@kopf.on.event(GROUP, VERSION, PLURAL)
def _track(type: str, body: kopf.Body, memo: Runtime, **_: Any) -> None:
    obj = dict(body)
    if type == "DELETED":
        memo.scaler.remove((obj["metadata"]["namespace"], obj["metadata"]["name"]))
    else:
        memo.scaler.upsert(_plain(obj))


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def _reconcile(body: kopf.Body, reason: str, memo: Runtime, **_: Any) -> None:
    """Make the children match the spec (never touching the replica count); an attached TTSDeployment
    (spec.targetRef) has none."""
    obj = _plain(dict(body))
    try:
        applied = memo.kube.apply_children(obj)
    except ApiException as exc:
        if exc.status in (400, 403, 422):
            msg = f"cannot apply children: HTTP {exc.status}: {_api_message(exc)}"
            memo.kube.event(obj, "Warning", "ReconcileFailed", msg)
            raise kopf.PermanentError(msg) from exc
        raise kopf.TemporaryError(f"API error {exc.status}; retrying", delay=5) from exc
    ref = children.target_ref(obj)
    if ref is not None and reason in ("create", "update"):
        # Attached (spec.targetRef): nothing is created; say what voxscale will and will not touch.
        message = (
            f"attached to {ref.describe()}: voxscale creates nothing and writes only its scale subresource "
            "(the replica count); deleting this TTSDeployment leaves it as it is"
        )
        memo.kube.event(obj, "Normal", "Attached", message)
    elif reason == "create":
        memo.kube.event(obj, "Normal", "Created", f"created {', '.join(applied)}")
    elif reason == "update":
        memo.kube.event(obj, "Normal", "Updated", f"applied the new spec to {', '.join(applied)}")
    memo.scaler.upsert(obj)
    memo.scaler.mark_due((obj["metadata"]["namespace"], obj["metadata"]["name"]))


def _plain(obj: Any) -> Any:
    """kopf bodies are views; the builders want plain dicts and lists."""
    if isinstance(obj, dict) or hasattr(obj, "items"):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _api_message(exc: ApiException) -> str:
    import json

    try:
        return str(json.loads(exc.body or "{}").get("message", exc.reason))
    except ValueError:
        return str(exc.reason)

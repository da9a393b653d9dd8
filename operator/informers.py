"""Watch-fed caches of the objects a scaling round reads (Deployments, pods, children, HPAs).

A round used to LIST every kind it needed: with thousands of TTSDeployments that is megabytes parsed
per round and a round time growing with the fleet (issue 24). An informer LISTs once, then WATCHes
from that resourceVersion and keeps a dict of the objects up to date; the round reads the dict.
A watch that breaks (410 Gone after compaction, a restarting API server, a network error) LISTs
again, so the cache converges to the API server's view; until the first LIST has answered the cache
says it is not synced and the caller LISTs itself (a new leader's first round never sees an empty
cache as "nothing exists").

Derived views (e.g. pod start statistics per TTSDeployment) are recomputed only for the keys that
changed since they were last read: see `Index`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

from kubernetes import watch

log = logging.getLogger("voxscale.operator")
V = TypeVar("V")
ObjectKey = tuple[str, str]  # (namespace, name)
WATCH_TIMEOUT_SECONDS = 300  # the API server ends a watch after this; the informer resumes from its resourceVersion
RELIST_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0, 10.0)


class Informer:
    """One kind in one scope (a namespace or all), optionally label-selected, as a live dict.

    `list_call` is a kubernetes client list function (namespaced ones take the namespace through
    `args`); the objects are the client's typed models, as the LIST returned them."""

    def __init__(
        self,
        what: str,
        list_call: Callable[..., Any],
        *args: Any,
        label_selector: str = "",
        key: Callable[[Any], Hashable] | None = None,
        transform: Callable[[Any], Any] | None = None,
    ) -> None:
        self.what = what
        self._list = list_call
        self._args = args
        self._selector = label_selector
        self._key = key or (lambda o: (o.metadata.namespace, o.metadata.name))
        # What is kept of each object (as client-go's TransformFunc): thousands of full pods with their
        # managed fields cost hundreds of MiB the round never reads.
        self._transform = transform or (lambda o: o)
        self._lock = threading.Lock()
        self._objects: dict[Hashable, Any] = {}
        self._listeners: list[Callable[[Hashable], None]] = []
        self.synced = threading.Event()
        self.lists = 0  # LIST calls made (the first, and one after each broken watch)
        self.events = 0  # watch events applied
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None

    # ------------------------------------------------------------------ reading
    def values(self) -> list[Any]:
        with self._lock:
            return list(self._objects.values())

    def get(self, key: Hashable) -> Any:
        with self._lock:
            return self._objects.get(key)

    def subscribe(self, listener: Callable[[Hashable], None]) -> None:
        """Call `listener(key)` for every object added, changed or removed (from the watch thread)."""
        self._listeners.append(listener)

    # ------------------------------------------------------------------ running
    def start(self) -> Informer:
        threading.Thread(target=self._run, name=f"informer {self.what}", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()  # type: ignore[no-untyped-call]

    def _kwargs(self) -> dict[str, Any]:
        return {"label_selector": self._selector} if self._selector else {}

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                version = self._relist()
                failures = 0
                self._follow(version)
            except Exception as exc:  # a broken watch or LIST: start over from a fresh LIST
                delay = RELIST_BACKOFF_SECONDS[min(failures, len(RELIST_BACKOFF_SECONDS) - 1)]
                failures += 1
                log.info("watch of %s broke (%s); listing again in %.1fs", self.what, exc.__class__.__name__, delay)
                self._stop.wait(delay)

    def _relist(self) -> str:
        listed = self._list(*self._args, **self._kwargs())
        self.lists += 1
        fresh = {self._key(o): self._transform(o) for o in listed.items}
        with self._lock:
            changed = set(fresh) ^ set(self._objects)
            changed |= {k for k, o in fresh.items() if k in self._objects and _version(self._objects[k]) != _version(o)}
            self._objects = fresh
        self._notify(changed)
        self.synced.set()
        return str(listed.metadata.resource_version)

    def _follow(self, version: str) -> None:
        self._watch = watch.Watch()  # type: ignore[no-untyped-call]
        stream = self._watch.stream(  # type: ignore[no-untyped-call]
            self._list,
            *self._args,
            resource_version=version,
            timeout_seconds=WATCH_TIMEOUT_SECONDS,
            allow_watch_bookmarks=True,
            **self._kwargs(),
        )
        for event in stream:
            if self._stop.is_set():
                return
            obj = event["object"]
            if event["type"] not in ("ADDED", "MODIFIED", "DELETED") or not hasattr(obj, "metadata"):
                continue
            key = self._key(obj)
            with self._lock:
                if event["type"] == "DELETED":
                    self._objects.pop(key, None)
                else:
                    self._objects[key] = self._transform(obj)
            self.events += 1
            self._notify({key})
        # The server closed the watch after WATCH_TIMEOUT_SECONDS: the loop LISTs again. Cheap next
        # to the per-round LISTs this replaces, and it heals anything a watch could have missed.

    def _notify(self, keys: set[Hashable]) -> None:
        for key in keys:
            for listener in self._listeners:
                listener(key)


class Index(Generic[V]):
    """A view derived from informers, per group key (e.g. a TTSDeployment's pod start statistics),
    recomputed only for groups whose objects changed since it was last read."""

    def __init__(self, group_of: Callable[[Any], Hashable | None], derive: Callable[[list[Any]], V]) -> None:
        self._group_of = group_of
        self._derive = derive
        self._lock = threading.Lock()
        self._members: dict[Hashable, dict[Hashable, Any]] = {}  # group -> object key -> object
        self._group_by_object: dict[Hashable, Hashable] = {}
        self._dirty: set[Hashable] = set()
        self._views: dict[Hashable, V] = {}
        self.recomputed = 0

    def attach(self, informer: Informer) -> None:
        informer.subscribe(lambda key: self._changed(informer, key))

    def _changed(self, informer: Informer, key: Hashable) -> None:
        obj = informer.get(key)
        group = self._group_of(obj) if obj is not None else None
        with self._lock:
            old = self._group_by_object.pop(key, None)
            if old is not None:
                self._members.get(old, {}).pop(key, None)
                self._dirty.add(old)
            if group is not None:
                self._members.setdefault(group, {})[key] = obj
                self._group_by_object[key] = group
                self._dirty.add(group)

    def views(self) -> dict[Hashable, V]:
        with self._lock:
            for group in self._dirty:
                members = self._members.get(group)
                if members:
                    self._views[group] = self._derive(list(members.values()))
                    self.recomputed += 1
                else:
                    self._members.pop(group, None)
                    self._views.pop(group, None)
            self._dirty.clear()
            return dict(self._views)


def _version(obj: Any) -> str | None:
    return getattr(getattr(obj, "metadata", None), "resource_version", None)


def wait_synced(informers: list[Informer], timeout: float) -> bool:
    """Whether every informer answered its first LIST within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    return all(i.synced.wait(max(0.0, deadline - time.monotonic())) for i in informers)

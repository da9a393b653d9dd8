"""Leader election on a coordination.k8s.io Lease, so two operator replicas never act at once.

The rule (a pure function) is the one client-go uses: the holder renews well inside the lease
duration; anyone may take over a lease whose renewTime is older than its duration. Writes carry the
resourceVersion they read, so two candidates racing for an expired lease cannot both win. A leader
that cannot renew in time exits the process: crash-only, its replacement (or the standby) takes over.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from dataclasses import dataclass

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("voxscale.operator.leader")


@dataclass(frozen=True)
class LeaseView:
    holder: str | None
    renew_time: dt.datetime | None
    duration: dt.timedelta


def may_acquire(lease: LeaseView | None, identity: str, now: dt.datetime) -> bool:
    """Whether `identity` may hold the lease at `now` (absent, ours, or expired)."""
    if lease is None or lease.holder in (None, "", identity):
        return True
    if lease.renew_time is None:
        return True
    return now - lease.renew_time > lease.duration


class LeaseElector:
    def __init__(
        self,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: int = 15,
        renew_seconds: float = 5.0,
        api: client.CoordinationV1Api | None = None,
    ) -> None:
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
        self.api = api or client.CoordinationV1Api()
        self.is_leader = False
        self._stop = threading.Event()

    def _try(self) -> bool:
        now = dt.datetime.now(dt.UTC)
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(
                    holder_identity=self.identity,
                    lease_duration_seconds=self.lease_seconds,
                    acquire_time=now,
                    renew_time=now,
                    lease_transitions=0,
                ),
            )
            try:
                self.api.create_namespaced_lease(self.namespace, body)
                return True
            except ApiException as create_exc:
                if create_exc.status == 409:  # someone else created it first
                    return False
                raise
        spec = lease.spec
        assert spec is not None, "a Lease always has a spec"
        view = LeaseView(
            spec.holder_identity,
            spec.renew_time,
            dt.timedelta(seconds=spec.lease_duration_seconds or self.lease_seconds),
        )
        if not may_acquire(view, self.identity, now):
            return False
        if spec.holder_identity != self.identity:
            spec.holder_identity = self.identity
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.renew_time = now
        spec.lease_duration_seconds = self.lease_seconds
        try:
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)  # carries resourceVersion
            return True
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise

    def acquire(self, poll_seconds: float = 1.0) -> None:
        """Block until this process holds the lease."""
        announced = False
        while not self._stop.is_set():
            try:
                if self._try():
                    self.is_leader = True
                    log.info("leader election: %s now holds lease %s/%s", self.identity, self.namespace, self.name)
                    return
            except Exception as exc:  # the API server may be restarting; keep trying
                log.warning("leader election: %s", exc)
            if not announced:
                log.info("leader election: standing by; another replica holds %s/%s", self.namespace, self.name)
                announced = True
            self._stop.wait(poll_seconds)

    def keep_renewing(self) -> threading.Thread:
        """Renew in a daemon thread; exit the process if the lease cannot be kept."""

        def loop() -> None:
            last_ok = time.monotonic()
            while not self._stop.wait(self.renew_seconds):
                try:
                    if self._try():
                        last_ok = time.monotonic()
                        continue
                    log.error("leader election: lease %s/%s was taken over; exiting", self.namespace, self.name)
                    os._exit(3)
                except Exception as exc:
                    log.warning("leader election: renewal failed: %s", exc)
                if time.monotonic() - last_ok > self.lease_seconds - self.renew_seconds / 2:
                    log.error("leader election: could not renew within the lease duration; exiting")
                    os._exit(3)

        thread = threading.Thread(target=loop, name="lease-renewal", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def release(self) -> None:
        """Stop renewing and give the lease up, so a standby can take over without waiting."""
        self.stop()
        if not self.is_leader:
            return
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec is not None and lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                self.api.replace_namespaced_lease(self.name, self.namespace, lease)
                log.info("leader election: released lease %s/%s", self.namespace, self.name)
        except Exception as exc:  # best effort: expiry covers it
            log.warning("leader election: could not release the lease: %s", exc)
        self.is_leader = False

"""Leader election on a coordination.k8s.io Lease, so two operator replicas never act at once.

The rule (a pure function) is client-go's: a candidate never compares another replica's renewTime
with its own clock (two clocks, any skew). It remembers the lease record as it last saw it and when,
on its own monotonic clock, that record last changed; the holder is presumed dead only once the
record has stood still for the lease duration. Writes carry the resourceVersion they read, so two
candidates racing for an expired lease cannot both win. A leader that cannot renew in time exits the
process: crash-only, its replacement (or the standby) takes over.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes import client
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("voxscale.operator.leader")
RENEW_STEP = dt.timedelta(milliseconds=1)  # the API server keeps renewTime to the microsecond


@dataclass(frozen=True)
class LeaseRecord:
    """A Lease's spec as the election compares it: any change of any field is a sign of life.

    The times are written for people reading the Lease; the election only asks whether they changed.
    """

    holder: str | None
    duration_seconds: int
    acquire_time: dt.datetime | None = None
    renew_time: dt.datetime | None = None
    transitions: int = 0

    @classmethod
    def from_spec(cls, spec: client.V1LeaseSpec, default_seconds: int) -> LeaseRecord:
        return cls(
            holder=spec.holder_identity or None,
            duration_seconds=spec.lease_duration_seconds or default_seconds,
            acquire_time=spec.acquire_time,
            renew_time=spec.renew_time,
            transitions=spec.lease_transitions or 0,
        )


@dataclass(frozen=True)
class Observation:
    """The record this replica last saw, and its own monotonic time when it first saw it so."""

    record: LeaseRecord
    since: float


def observe(last: Observation | None, record: LeaseRecord, mono: float) -> Observation:
    """Restart the clock whenever the record differs in any field from the one last seen."""
    if last is None or last.record != record:
        return Observation(record, mono)
    return last


def may_acquire(seen: Observation, identity: str, mono: float) -> bool:
    """Whether `identity` may write the lease now: it is free, ours, or has stood still for its duration
    as measured on this replica's clock since it last changed (client-go's observedTime rule)."""
    holder = seen.record.holder
    if holder is None or holder == identity:
        return True
    return mono - seen.since >= seen.record.duration_seconds


def next_renew_time(previous: dt.datetime | None, now: dt.datetime) -> dt.datetime:
    """The renewTime to write: `now`, but always after the previous one, so that a renewal is always a
    visible change even when the holder's clock stepped back (an unchanged write would look dead)."""
    if previous is not None and now <= previous:
        return previous + RENEW_STEP
    return now


class LeaseConflict(RuntimeError):
    """A write of the Lease met a newer version (HTTP 409)."""


class LeaseElector:
    def __init__(
        self,
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: int = 15,
        renew_seconds: float = 5.0,
        api: client.CoordinationV1Api | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_seconds, self.renew_seconds = lease_seconds, renew_seconds
        self.api = api or client.CoordinationV1Api()
        self.is_leader = False
        self._stop = threading.Event()
        self._monotonic = monotonic
        self._seen: Observation | None = None  # the record as last read or written here

    def _try(self) -> bool:
        """One round of the election: read, judge by what this replica observed, write if allowed."""
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            return self._create()
        spec = lease.spec
        assert spec is not None, "a Lease always has a spec"
        self._seen = observe(self._seen, LeaseRecord.from_spec(spec, self.lease_seconds), self._monotonic())
        if not may_acquire(self._seen, self.identity, self._monotonic()):
            return False
        now = dt.datetime.now(dt.UTC)
        if spec.holder_identity == self.identity:
            spec.renew_time = next_renew_time(spec.renew_time, now)
        else:  # taking over: holder and transitions change, so the record changes whatever the clock
            spec.holder_identity = self.identity
            spec.acquire_time = spec.renew_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.lease_duration_seconds = self.lease_seconds
        try:
            written = self.api.replace_namespaced_lease(self.name, self.namespace, lease)  # carries resourceVersion
        except ApiException as exc:
            if exc.status == 409:
                # Someone wrote the Lease since our read: another candidate, or any client touching its
                # metadata. Not a verdict on who holds it - the next read says that.
                raise LeaseConflict(f"lease {self.namespace}/{self.name} changed while we wrote it") from exc
            raise
        self._remember(written)
        return True

    def _create(self) -> bool:
        now = dt.datetime.now(dt.UTC)
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
            self._remember(self.api.create_namespaced_lease(self.namespace, body))
            return True
        except ApiException as exc:
            if exc.status == 409:  # someone else created it first
                return False
            raise

    def _remember(self, written: client.V1Lease) -> None:
        """What we wrote is what we observed (as the server stored it), as of now."""
        assert written.spec is not None
        self._seen = Observation(LeaseRecord.from_spec(written.spec, self.lease_seconds), self._monotonic())

    def acquire(self, poll_seconds: float = 1.0) -> None:
        """Block until this process holds the lease."""
        announced = False
        while not self._stop.is_set():
            try:
                if self._try():
                    self.is_leader = True
                    log.info("leader election: %s now holds lease %s/%s", self.identity, self.namespace, self.name)
                    return
            except LeaseConflict as exc:
                log.debug("leader election: %s; reading it again", exc)
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
                except LeaseConflict as exc:
                    log.warning("leader election: %s; renewing again", exc)
                    held = self._retry_once()
                    if held:
                        last_ok = time.monotonic()
                        continue
                    if held is False:
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

    def _retry_once(self) -> bool | None:
        """Renew again at once after a conflict: True held, False taken over, None still unknown
        (another conflict or an API error; the lease-duration deadline decides)."""
        try:
            return self._try()
        except (LeaseConflict, ApiException):
            return None

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

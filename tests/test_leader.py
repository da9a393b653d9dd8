"""Leader election's rule: a standby judges the lease by its own clock since it last saw the record change.

The holder's renewTime is another machine's wall clock; comparing it with the local one (the old
rule) let a standby steal a lease being renewed by a holder whose clock runs behind, and never take
over from a dead holder whose clock ran ahead. These tests hold the rule to client-go's.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from voxscale.operator.leader import (
    LeaseConflict,
    LeaseElector,
    LeaseRecord,
    Observation,
    may_acquire,
    next_renew_time,
    observe,
)

T = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)
D = 6  # lease seconds
HELD = LeaseRecord("other", D, T, T, 1)


@pytest.mark.parametrize(
    ("why", "seen", "now", "may"),
    [
        ("free: never held", Observation(replace(HELD, holder=None), 100.0), 100.0, True),
        ("free: released by a clean stop", Observation(replace(HELD, holder=None, renew_time=None), 0.0), 0.0, True),
        ("ours: renew", Observation(replace(HELD, holder="me"), 0.0), 1000.0, True),
        ("held, just seen", Observation(HELD, 100.0), 100.0, False),
        ("held, unchanged a little less than its duration", Observation(HELD, 100.0), 100.0 + D - 0.001, False),
        ("held, unchanged for its duration", Observation(HELD, 100.0), 100.0 + D, True),
        # Another clock's renewTime says nothing: far in the past or future, only the observed age counts.
        ("holder clock 1 h behind, seen 1 s ago", Observation(replace(HELD, renew_time=T - HOUR), 99.0), 100.0, False),
        ("holder clock 1 h ahead, unchanged for D", Observation(replace(HELD, renew_time=T + HOUR), 94.0), 100.0, True),
        ("the record's own duration counts", Observation(replace(HELD, duration_seconds=60), 0.0), 30.0, False),
    ],
)
def test_may_acquire(why: str, seen: Observation, now: float, may: bool) -> None:
    assert may_acquire(seen, "me", now) is may, why


@pytest.mark.parametrize(
    ("why", "record", "since"),
    [
        ("unchanged: the clock keeps running", HELD, 10.0),
        ("renewed", replace(HELD, renew_time=T + dt.timedelta(seconds=2)), 50.0),
        ("renewed by a clock that stepped back", replace(HELD, renew_time=T - HOUR), 50.0),
        ("another holder", replace(HELD, holder="third", transitions=2), 50.0),
        ("only the transitions changed", replace(HELD, transitions=7), 50.0),
        ("only the duration changed", replace(HELD, duration_seconds=30), 50.0),
    ],
)
def test_observe_restarts_the_clock_on_any_change(why: str, record: LeaseRecord, since: float) -> None:
    assert observe(Observation(HELD, 10.0), record, 50.0).since == since, why


def test_renew_time_always_moves_forward_so_a_renewal_is_always_seen() -> None:
    assert next_renew_time(None, T) == T
    assert next_renew_time(T - HOUR, T) == T
    assert next_renew_time(T, T) > T  # same reading twice
    assert next_renew_time(T + HOUR, T) > T + HOUR  # the clock stepped back


# ---------------------------------------------------------------- properties: a holder and a standby, simulated
gaps = st.floats(min_value=0.05, max_value=D - 0.05)  # a live holder renews more often than the lease lasts
skews = st.floats(min_value=-86_400, max_value=86_400)  # the holder's wall clock, off by up to a day either way
polls = st.floats(min_value=0.05, max_value=3.0)


def _renewals(renew_gaps: list[float], clock_skews: list[float]) -> list[tuple[float, LeaseRecord]]:
    """(true time, record) of each renewal; renewTime is the holder's skewed, jumping wall clock."""
    out: list[tuple[float, LeaseRecord]] = []
    t, stamp = 0.0, None
    for gap, skew in zip(renew_gaps, clock_skews, strict=False):
        t += gap
        stamp = next_renew_time(stamp, T + dt.timedelta(seconds=t + skew))
        out.append((t, LeaseRecord("holder", D, T, stamp, 1)))
    return out


def _standby(renewals: list[tuple[float, LeaseRecord]], poll_gaps: list[float], until: float) -> float | None:
    """Poll with the given gaps (cycled) until `until`; the true time the standby may first take over."""
    seen: Observation | None = None
    t, i = 0.0, 0
    while t <= until:
        t += poll_gaps[i % len(poll_gaps)]
        i += 1
        current = [r for at, r in renewals if at <= t]
        if not current:
            continue
        seen = observe(seen, current[-1], t)
        if may_acquire(seen, "standby", t):
            return t
    return None


@settings(max_examples=300, deadline=None)
@given(st.lists(gaps, min_size=2, max_size=40), st.lists(skews, min_size=40, max_size=40), st.lists(polls, min_size=1))
def test_a_lease_being_renewed_is_never_stolen_whatever_the_holders_clock(
    renew_gaps: list[float], clock_skews: list[float], poll_gaps: list[float]
) -> None:
    renewals = _renewals(renew_gaps, clock_skews)
    assert _standby(renewals, poll_gaps, until=renewals[-1][0]) is None


@settings(max_examples=300, deadline=None)
@given(st.lists(gaps, min_size=1, max_size=20), st.lists(skews, min_size=20, max_size=20), polls)
def test_a_dead_holder_is_replaced_within_the_lease_and_two_polls(
    renew_gaps: list[float], clock_skews: list[float], poll: float
) -> None:
    renewals = _renewals(renew_gaps, clock_skews)
    last = renewals[-1][0]  # the holder dies right after this renewal
    took = _standby(renewals, [poll], until=last + D + 3 * poll)
    assert took is not None and last + D <= took <= last + D + 2 * poll


# ---------------------------------------------------------------- the elector against a fake Lease API
@dataclass
class FakeLeases:
    """One Lease with resourceVersion checks, as the API server keeps it."""

    lease: client.V1Lease | None = None
    version: int = 0
    writes: list[str] = field(default_factory=list)

    def read_namespaced_lease(self, name: str, namespace: str) -> client.V1Lease:
        if self.lease is None:
            raise ApiException(status=404)
        return copy.deepcopy(self.lease)

    def create_namespaced_lease(self, namespace: str, body: client.V1Lease) -> client.V1Lease:
        return self._store(body)

    def replace_namespaced_lease(self, name: str, namespace: str, body: client.V1Lease) -> client.V1Lease:
        if body.metadata.resource_version != str(self.version):
            raise ApiException(status=409)
        return self._store(body)

    def _store(self, body: client.V1Lease) -> client.V1Lease:
        self.version += 1
        body.metadata.resource_version = str(self.version)
        self.lease = copy.deepcopy(body)
        self.writes.append(body.spec.holder_identity)
        return copy.deepcopy(body)


def test_the_elector_waits_the_lease_on_its_own_clock_whatever_renewtime_says() -> None:
    api = FakeLeases()
    mono = [0.0]
    holder = LeaseElector("ns", "l", "holder", lease_seconds=D, api=api, monotonic=lambda: mono[0])
    standby = LeaseElector("ns", "l", "standby", lease_seconds=D, api=api, monotonic=lambda: mono[0])
    assert holder._try()
    assert api.lease is not None and api.lease.spec is not None
    api.lease.spec.renew_time = T - 30 * HOUR  # as if the holder's clock were a day behind: the old rule stole it
    for _ in range(10):
        mono[0] += 1.0
        assert not standby._try()
        if mono[0] % 2 == 0:
            assert holder._try()  # renewing every 2 s
    mono[0] += 1.0
    assert not standby._try()  # the holder died after its last renewal; the standby sees that renewal now
    mono[0] += D - 0.5
    assert not standby._try()  # not yet a full lease since it last saw the record change
    mono[0] += 0.5
    assert standby._try() and api.writes[-1] == "standby"
    assert api.lease.spec.lease_transitions == 1


@dataclass
class TouchedOnce(FakeLeases):
    """Another client writes the Lease (its labels, say) between our read and our write, once."""

    touched: bool = False

    def replace_namespaced_lease(self, name: str, namespace: str, body: client.V1Lease) -> client.V1Lease:
        if not self.touched and self.lease is not None:
            self.touched = True
            self.version += 1  # the other client's write
            self.lease.metadata.resource_version = str(self.version)
            raise ApiException(status=409)
        return super().replace_namespaced_lease(name, namespace, body)


def test_a_conflict_on_renewal_is_not_a_takeover() -> None:
    """The fault bench found a leader exiting on any 409 of its renewal, leaving no leader for a
    lease duration. A conflict only says the record changed; reading it again says who holds it."""
    api = TouchedOnce()
    holder = LeaseElector("ns", "l", "holder", lease_seconds=D, api=api, monotonic=lambda: 0.0)
    assert holder._try()  # created
    with pytest.raises(LeaseConflict):
        holder._try()  # the renewal meets the other client's write
    assert holder._retry_once() is True and api.writes[-1] == "holder"
    api.lease.spec.holder_identity = "other"  # now someone else really holds it (and renews)
    api.lease.spec.renew_time = T
    assert holder._retry_once() is False

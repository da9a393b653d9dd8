"""Endpoint resolution out of the round (issue 12, item 10): Secrets read once per cache period,
failures retried with back-off, the last good endpoint kept through a transient API error."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException

from voxscale.operator.endpoints import CACHE_SECONDS, EndpointResolver
from voxscale.operator.policy import SpecError

B64 = base64.b64encode(b"s3cret\n").decode()


class Secrets:
    """Secret data by (namespace, name); counts reads; `failing` makes reads raise that HTTP status."""

    def __init__(self) -> None:
        self.data = {("team-a", "prom"): {"token": B64}}
        self.reads = 0
        self.failing: int | None = None

    def __call__(self, ns: str, name: str) -> dict[str, str]:
        self.reads += 1
        if self.failing is not None:
            raise ApiException(status=self.failing)
        if (ns, name) not in self.data:
            raise ApiException(status=404)
        return self.data[(ns, name)]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def body(prometheus: dict[str, Any]) -> dict[str, Any]:
    return {"metadata": {"namespace": "team-a", "name": "app"}, "spec": {"scaling": {"prometheus": prometheus}}}


BEARER = {"url": "http://prom:9090", "auth": {"bearerTokenSecretRef": {"name": "prom", "key": "token"}}}


def resolver() -> tuple[EndpointResolver, Secrets, Clock]:
    secrets, clock = Secrets(), Clock()
    return EndpointResolver(secrets, "http://prom:9090", clock=clock), secrets, clock


def test_a_secret_is_read_once_per_cache_period_not_once_per_round() -> None:
    res, secrets, clock = resolver()
    for _ in range(100):
        ep = res.resolve(body(BEARER))
    assert ep.headers == (("Authorization", "Bearer s3cret"),) and secrets.reads == 1
    clock.now += CACHE_SECONDS
    res.resolve(body(BEARER))
    assert secrets.reads == 2  # a rotated Secret is picked up


def test_a_changed_spec_is_resolved_at_once() -> None:
    res, _, _ = resolver()
    res.resolve(body(BEARER))
    assert res.resolve(body({"url": "http://other:9090"})).url == "http://other:9090"
    assert res.resolve(body({})).url == "http://prom:9090"


def test_a_transient_api_error_keeps_the_last_good_endpoint_and_backs_off() -> None:
    res, secrets, clock = resolver()
    good = res.resolve(body(BEARER))
    clock.now += CACHE_SECONDS
    secrets.failing = 503
    assert res.resolve(body(BEARER)) == good  # the API server restarting is not "no metrics"
    reads = secrets.reads
    clock.now += 0.5
    res.resolve(body(BEARER))
    assert secrets.reads == reads  # no read before the first back-off (1 s) has passed
    clock.now += 1
    res.resolve(body(BEARER))
    assert secrets.reads == reads + 1


@pytest.mark.parametrize(("status", "said"), [(404, "HTTP 404"), (403, "HTTP 403")])
def test_a_missing_or_forbidden_secret_is_a_spec_error_naming_the_field(status: int, said: str) -> None:
    res, secrets, clock = resolver()
    res.resolve(body(BEARER))
    clock.now += CACHE_SECONDS
    secrets.failing = status
    with pytest.raises(SpecError) as err:
        res.resolve(body(BEARER))  # not transient: the last good token is not used any more
    assert err.value.field == "spec.scaling.prometheus.auth.bearerTokenSecretRef" and said in str(err.value)


def test_a_secret_without_the_key_says_which_key() -> None:
    res, secrets, _ = resolver()
    secrets.data[("team-a", "prom")] = {"other": B64}
    with pytest.raises(SpecError, match="Secret team-a/prom has no key 'token'"):
        res.resolve(body(BEARER))


def test_basic_auth_reads_username_and_password() -> None:
    res, secrets, _ = resolver()
    secrets.data[("team-a", "basic")] = {"username": base64.b64encode(b"u").decode(), "password": B64}
    ep = res.resolve(body({"auth": {"basicAuthSecretRef": {"name": "basic"}}}))
    assert ep.basic_auth == ("u", "s3cret")

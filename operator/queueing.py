"""Queueing arithmetic for sizing a fleet against a latency SLO: M/M/c response-time tails.

A replica has `slots` service slots (its batch) and serves `capacity_rps` requests per second when
they are all busy, so one slot takes `slots / capacity_rps` seconds per request. Requests arrive as a
Poisson stream and wait in one FIFO queue in front of every slot (the Service balances load). The
response time of M/M/c with FIFO has a closed form built on Erlang C; exponential service is the
conservative choice for p95 when the SLO is a few service times (a TTS request's time grows with its
text, so service times do vary). Pure functions, no state.
"""

from __future__ import annotations

import math


def erlang_c(servers: int, offered_erlangs: float) -> float:
    """Probability that an arrival waits (Erlang C), via the stable Erlang B recursion."""
    if servers <= 0 or offered_erlangs >= servers:
        return 1.0
    if offered_erlangs <= 0:
        return 0.0
    b = 1.0
    for k in range(1, servers + 1):
        b = offered_erlangs * b / (k + offered_erlangs * b)
    rho = offered_erlangs / servers
    return b / (1 - rho * (1 - b))


def response_time_tail(arrival_rps: float, service_seconds: float, servers: int, t: float) -> float:
    """P(response time > t) for M/M/c FIFO: waiting (Erlang C) plus an exponential service."""
    if arrival_rps <= 0:
        return math.exp(-t / service_seconds)
    mu = 1.0 / service_seconds
    a = arrival_rps * service_seconds
    if servers <= 0 or a >= servers:
        return 1.0
    c = erlang_c(servers, a)
    drain = servers * mu - arrival_rps  # rate at which the queue empties
    if abs(drain - mu) < 1e-9:  # the two exponentials coincide: the limit of the general form
        return math.exp(-mu * t) * (1 + c * mu * t)
    k = c * mu / (drain - mu)
    return max(0.0, min(1.0, (1 + k) * math.exp(-mu * t) - k * math.exp(-drain * t)))


def mean_wait(arrival_rps: float, service_seconds: float, servers: int) -> float:
    """Mean time in queue of M/M/c (Erlang C)."""
    a = arrival_rps * service_seconds
    if a >= servers:
        return math.inf
    return erlang_c(servers, a) / (servers / service_seconds - arrival_rps)


def replicas_for_slo(
    arrival_rps: float,
    capacity_rps: float,
    slots: int,
    slo_seconds: float,
    quantile: float = 0.95,
    max_replicas: int = 10_000,
) -> int:
    """The fewest replicas whose `quantile` response time is within `slo_seconds` at `arrival_rps`.

    When even an idle replica misses the SLO (one service time is longer than the SLO allows at that
    quantile), it sizes for waiting to be as rare as the quantile permits instead, and never returns
    fewer replicas than the load needs to be stable. Returns at most `max_replicas`.
    """
    if arrival_rps <= 0:
        return 0
    service = slots / capacity_rps
    stable = math.floor(arrival_rps / capacity_rps) + 1  # strictly more capacity than load
    miss = 1.0 - quantile
    feasible = math.exp(-slo_seconds / service) <= miss
    for n in range(stable, max_replicas + 1):
        servers = n * slots
        if feasible:
            if response_time_tail(arrival_rps, service, servers, slo_seconds) <= miss:
                return n
        elif erlang_c(servers, arrival_rps * service) <= miss:
            return n
    return max_replicas

"""The forecast floor's arrival history, read outside the scaling round.

A 7-day `query_range` can take seconds on a healthy Prometheus and a whole timeout on a hung one; read
inside the round it held every tenant's decision. Here each endpoint's read runs in a background
worker, the round takes whatever history has arrived (none yet: the forecast says it has no
history), and an endpoint whose read failed is asked again after a growing back-off, not every round.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from voxscale.operator.forecast import RateHistory
from voxscale.operator.prometheus import (
    HISTORY_STEP_SECONDS,
    Backoff,
    Endpoint,
    Key,
    PrometheusSource,
    QueryError,
    Target,
)

log = logging.getLogger("voxscale.operator.history")

REFRESH_SECONDS = 300.0  # re-read an object's arrival history this often
RETRY_BACKOFF_SECONDS = (10.0, 30.0, 60.0, 120.0, 300.0)  # after a failed read of an endpoint


class HistoryReader:
    def __init__(
        self,
        source: PrometheusSource,
        refresh_seconds: float = REFRESH_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        max_parallel: int = 2,
    ) -> None:
        self.source = source
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self.backoff = Backoff(RETRY_BACKOFF_SECONDS, clock)
        # Its own workers: a hung range query never takes a worker the round's instant queries need.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_parallel, thread_name_prefix="history")
        self._lock = threading.Lock()
        self._read: dict[Key, tuple[float, RateHistory]] = {}  # (when read, history)
        self._reading: set[Endpoint] = set()

    def get(self, key: Key) -> RateHistory | None:
        """The latest history read for `key` (None: none has arrived yet)."""
        with self._lock:
            got = self._read.get(key)
        return got[1] if got else None

    def forget(self, key: Key) -> None:
        with self._lock:
            self._read.pop(key, None)

    def request(self, targets: Sequence[Target], now: dt.datetime) -> None:
        """Start a read, one range query per endpoint, for the forecast objects whose history is older
        than `refresh_seconds`; returns at once."""
        mono = self.clock()
        by_endpoint: dict[Endpoint, list[Target]] = {}
        with self._lock:
            for t in targets:
                if t.policy.slo is None or not t.policy.predictive.enabled:
                    continue
                if mono - self._read.get(t.key, (-math.inf, None))[0] >= self.refresh_seconds:
                    by_endpoint.setdefault(t.endpoint, []).append(t)
            start = [ep for ep in by_endpoint if ep not in self._reading and self.backoff.waiting(ep) is None]
            self._reading.update(start)
        for ep in start:
            self._pool.submit(self._read_endpoint, ep, by_endpoint[ep], now)

    def _read_endpoint(self, ep: Endpoint, group: list[Target], now: dt.datetime) -> None:
        """One endpoint's read (a worker thread)."""
        try:
            lookback = max(t.policy.predictive.lookback for t in group)
            window = max(t.policy.slo.rate_window.total_seconds() for t in group if t.policy.slo)
            namespaces = sorted({t.namespace for t in group})
            try:
                found = self.source.arrival_history(ep, namespaces, window, lookback, now)
            except QueryError as exc:
                self.backoff.failed(ep, str(exc))
                log.warning("arrival history unavailable (%s); forecasts use what was read before", exc)
                return
            self.backoff.succeeded(ep)
            mono = self.clock()
            # No series at all is an answer too: no history yet (the forecast says how much it needs).
            empty = RateHistory(now, HISTORY_STEP_SECONDS, np.full(0, np.nan))
            with self._lock:
                self._read.update({t.key: (mono, found.get(t.key, empty)) for t in group})
        except Exception as exc:  # a bug or an odd answer: logged, and not retried every round either
            self.backoff.failed(ep, repr(exc))
            log.exception("reading the arrival history from %s failed", ep.url)
        finally:
            with self._lock:
                self._reading.discard(ep)

"""Status writes off the scaling round's path, and within a budget (issue 24).

A round decides for every due object; writing each one's status inside the round made the round as
long as the writes (thousands of objects: minutes for the first round, when every status is new).
`StatusWriter` takes the latest status per object and writes it from one thread: a status replaced
before it was written is written once, in its newest form, so a slow API server costs staleness, not
a backlog. `TokenBucket` is the budget the scaler refreshes unchanged statuses under.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("voxscale.operator")
Key = tuple[str, str]


class TokenBucket:
    """At most `rate` takes per second on average, in bursts of up to `burst`."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.at = burst, clock()

    def take(self) -> bool:
        if not self.available():
            return False
        self.tokens -= 1
        return True

    def available(self) -> bool:
        """Whether a take() now would succeed (it takes nothing): the caller can skip the work a
        refused take() would throw away."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        return self.tokens >= 1


class StatusWriter:
    """The newest status per object, written in the order objects were first queued, by one thread."""

    def __init__(self, write: Callable[[str, str, dict[str, Any]], None]) -> None:
        self._write = write
        self._pending: dict[Key, dict[str, Any]] = {}  # insertion-ordered: oldest first
        self._cv = threading.Condition()
        self._busy = False
        self._stopped = False
        self.written = 0
        self.coalesced = 0  # statuses replaced by a newer one before they were written

    def put(self, key: Key, status: dict[str, Any]) -> None:
        with self._cv:
            if key in self._pending:
                self.coalesced += 1
            self._pending[key] = status
            self._cv.notify()

    def forget(self, key: Key) -> None:
        """Drop a queued status (its object was deleted: writing it would only fail)."""
        with self._cv:
            self._pending.pop(key, None)

    def start(self) -> StatusWriter:
        threading.Thread(target=self._run, name="status writer", daemon=True).start()
        return self

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until everything queued so far is written (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._pending and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    return
                key = next(iter(self._pending))
                status = self._pending.pop(key)
                self._busy = True
            try:
                self._write(key[0], key[1], status)
                self.written += 1
            except Exception:  # an object deleted meanwhile, RBAC: said, and the next round writes again
                log.exception("writing the status of %s/%s failed", *key)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

"""The door's pure logic: who goes to the server now, who waits, who is refused, and what it all adds up to.

No I/O and no event loop: the shell (app.py) asks `Door` what to do with each request and tells it
what happened, with a clock passed in, so admission and accounting are tested without sockets and the
hot path is a few integer operations (Prometheus reads the tallies only when it scrapes).
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

from voxscale import metrics_contract as mc

T = TypeVar("T")

# Who answered a request: the server behind the door, or the door itself (429, 502, 503, 504).
BY_SERVER, BY_DOOR = "server", "door"
# A response whose status was sent but whose body never reached the client in full.
ABORTED = "aborted"

# RFC 9110 7.6.1 hop-by-hop fields, plus those the HTTP stack recomputes for the next hop (length, framing,
# the target's Host is kept on purpose: a server may route on it).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)


class Admission(Enum):
    RUN = "run"  # a slot at the server is free: send it now
    WAIT = "wait"  # queued: `Door.finish` hands the ticket a slot when one frees
    FULL = "full"  # every slot and the queue are taken: 429 with Retry-After
    CLOSED = "closed"  # draining and the listener is shut: 503, the client retries on another pod


@dataclass(frozen=True)
class Limits:
    """How many requests the server is sent at once, and how many may wait at the door for a slot."""

    concurrency: int
    queue: int

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency}: the server must be sent at least 1 request at once")
        if self.queue < 0:
            raise ValueError(f"queue={self.queue}: use 0 to refuse at once when every slot is taken, or more")


@dataclass
class Histogram:
    """Prometheus-style buckets (`le` upper bounds) kept as plain counts, turned cumulative when scraped."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count) pairs ending with +Inf, as the exposition format lists them."""
        running, out = 0, []
        for bound, n in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += n
            out.append((bound, running))
        return out


@dataclass
class Tally:
    """Everything the door counts; every field only grows, so each is a Prometheus counter or histogram."""

    received: int = 0
    input_characters: int = 0
    completed: int = 0
    responses: dict[tuple[str, str], int] = field(default_factory=dict)  # (status class, by) -> count
    busy_seconds: float = 0.0
    seconds_at: dict[int, float] = field(default_factory=dict)  # requests at the server -> seconds spent so
    latency: Histogram = field(default_factory=lambda: Histogram(mc.REQUEST_LATENCY.buckets))
    queue_wait: Histogram = field(default_factory=lambda: Histogram(mc.QUEUE_WAIT.buckets))


def status_class(status: int) -> str:
    """`2xx`-style class of a status code; anything outside 100-599 (a broken server) is `other`."""
    return f"{status // 100}xx" if 100 <= status <= 599 else "other"


class Door(Generic[T]):
    """Bounded concurrency with a FIFO queue, and the door signals: arrivals, answers, busy time.

    Busy time is wall-clock time with at least one request at the server, counted once however many
    run together (it is the replica's time, set against completions for its capacity); `seconds_at`
    splits it by how many ran at once, so the concurrency the busy time ran at is known too.
    """

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits, self.clock = limits, clock
        self.inflight = 0
        self.waiting: deque[T] = deque()
        self.closed = False
        self.tally = Tally()
        self._mark = clock()

    def _advance(self) -> None:
        now = self.clock()
        if self.inflight:
            elapsed = now - self._mark
            self.tally.busy_seconds += elapsed
            self.tally.seconds_at[self.inflight] = self.tally.seconds_at.get(self.inflight, 0.0) + elapsed
        self._mark = now

    def arrive(self, ticket: T, characters: int = 0) -> Admission:
        """Count an arrival (refused ones too: demand stays visible when full) and decide its fate."""
        self.tally.received += 1
        self.tally.input_characters += characters
        if self.closed:
            return Admission.CLOSED
        if self.inflight < self.limits.concurrency and not self.waiting:
            self._advance()
            self.inflight += 1
            return Admission.RUN
        if len(self.waiting) < self.limits.queue:
            self.waiting.append(ticket)
            return Admission.WAIT
        return Admission.FULL

    def abandon(self, ticket: T) -> bool:
        """A waiting client went away: drop its ticket. False when it had already been handed a slot,
        which the caller must then `finish` so the slot passes on instead of leaking."""
        try:
            self.waiting.remove(ticket)
        except ValueError:
            return False
        return True

    def finish(self) -> T | None:
        """A request left the server; returns the waiting ticket that takes over its slot, if any."""
        self._advance()
        if self.waiting:
            return self.waiting.popleft()
        self.inflight -= 1
        return None

    def answered(self, status: int | str, by: str, latency: float | None = None, waited: float | None = None) -> None:
        """Record how a request ended: its status (or ABORTED), who answered, and for admitted requests
        their latency (arrival to last byte) and time in the queue."""
        cls = status if isinstance(status, str) else status_class(status)
        key = (cls, by)
        self.tally.responses[key] = self.tally.responses.get(key, 0) + 1
        if by == BY_SERVER and cls in ("2xx", "3xx"):
            self.tally.completed += 1
        if latency is not None:
            self.tally.latency.observe(latency)
        if waited is not None:
            self.tally.queue_wait.observe(waited)

    def read(self) -> Tally:
        """The tallies with busy time brought up to now (a long request counts before it ends)."""
        self._advance()
        return self.tally

    @property
    def idle(self) -> bool:
        return self.inflight == 0 and not self.waiting

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the queue ahead of it served at the mean latency seen
        so far (1 s before any), between 1 and 60 s."""
        lat = self.tally.latency
        mean = lat.total / lat.count if lat.count else 1.0
        ahead = len(self.waiting) + self.inflight
        return int(min(60, max(1, math.ceil(mean * ahead / self.limits.concurrency))))


@dataclass
class Readiness:
    """Whether the pod should get traffic: the server answered its health path (or a request) and the
    door is not draining. The reason is prose, for `kubectl describe pod`."""

    server_ok: bool = False
    detail: str = "the server has not answered yet"
    draining: bool = False

    def saw(self, ok: bool, detail: str) -> None:
        self.server_ok, self.detail = ok, detail

    def state(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: the pod is shutting down and finishing what it accepted"
        return self.server_ok, self.detail


# Where TTS servers take their text: the OpenAI speech API and Kokoro-FastAPI `input`; Piper's HTTP
# server, GPT-SoVITS api_v2, fish-speech and XTTS `text`; CosyVoice's FastAPI runtime `tts_text`.
TEXT_FIELDS = ("input", "text", "tts_text")


def input_characters(body: bytes, content_type: str) -> int:
    """Characters of a JSON body's text (the first string among TEXT_FIELDS); 0 otherwise.

    Never raises: a body the door cannot read is the server's to reject, with its own message."""
    if not body or "json" not in content_type:
        return 0
    try:
        doc = json.loads(body)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both
        return 0
    if not isinstance(doc, dict):
        return 0
    text = next((doc[f] for f in TEXT_FIELDS if isinstance(doc.get(f), str)), "")
    return len(text)


def forward_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Headers for the next hop: all but hop-by-hop ones and those `Connection` names (RFC 9110 7.6.1),
    so request ids, `traceparent`, auth and content headers pass through unchanged."""
    pairs = list(headers)
    named = {
        token.strip().lower() for k, v in pairs if k.lower() == "connection" for token in v.split(",") if token.strip()
    }
    return [(k, v) for k, v in pairs if k.lower() not in HOP_BY_HOP and k.lower() not in named]


def parse_hostport(text: str, field_name: str) -> tuple[str, int]:
    """`host:port` (IPv6 as `[::1]:8000`) -> (host, port); the error names the flag and the form."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{field_name}={text!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    return host, int(port)

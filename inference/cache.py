"""A small thread-safe LRU bounded both in entries and in bytes, with hit/miss counts.

The pipeline keeps two: phonemes per sentence and audio per deterministic synthesis. NPC lines and
course prompts repeat, and a hit skips an espeak-ng process or a whole VITS pass. Both bounds hold
at once: many short entries are capped by count, a few long recordings by bytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    def __init__(self, max_entries: int, max_bytes: int, size: Callable[[V], int]) -> None:
        self.max_entries, self.max_bytes, self._size = max_entries, max_bytes, size
        self._data: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()  # prepare() and synthesize() run on worker threads
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        """Whether `key` is stored; neither a hit nor a miss, and its recency unchanged."""
        return key in self._data

    def get(self, key: K) -> V | None:
        """The value (now the most recently used), counting a hit or a miss."""
        with self._lock:
            found = self._data.get(key)
            if found is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return found[0]

    def put(self, key: K, value: V) -> None:
        """Store, evicting the least recently used until both bounds hold; a value over the byte
        bound on its own is not stored (it would only evict everything else)."""
        nbytes = self._size(value)
        if nbytes > self.max_bytes or self.max_entries <= 0:
            return
        with self._lock:
            old = self._data.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._data[key] = (value, nbytes)
            self.bytes += nbytes
            while len(self._data) > self.max_entries or self.bytes > self.max_bytes:
                _, (_, dropped) = self._data.popitem(last=False)
                self.bytes -= dropped

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self.bytes = 0

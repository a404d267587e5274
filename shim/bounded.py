"""A dict for keys that clients choose (model names, conversation ids, identities):
bounded in entries, and optionally in age, so that no stream of distinct keys grows it.

``BoundedDict(max_entries, ttl_s)`` keeps insertion (or last-set) order; setting a key
moves it to the end; past ``max_entries`` the oldest entries go; entries set more than
``ttl_s`` seconds ago (``time.monotonic``) are gone on read and pruned on every write,
oldest first, so each write costs O(1) amortized.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class BoundedDict(Generic[K, V]):
    """At most ``max_entries`` entries, none older than ``ttl_s`` (None: no age limit)."""

    def __init__(self, max_entries: int, ttl_s: float | None = None) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._data: OrderedDict[K, tuple[float, V]] = OrderedDict()
        #: Entries pushed out by the size bound (not by age), for a metric or a log line.
        self.evicted = 0

    def __setitem__(self, key: K, value: V) -> None:
        now = time.monotonic()
        self._data[key] = (now, value)
        self._data.move_to_end(key)
        self._prune(now)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
            self.evicted += 1

    def get(self, key: K, default: V | None = None) -> V | None:
        item = self._data.get(key)
        if item is None:
            return default
        if self.ttl_s is not None and time.monotonic() - item[0] > self.ttl_s:
            del self._data[key]
            return default
        return item[1]

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None  # type: ignore[arg-type]

    def __delitem__(self, key: K) -> None:
        del self._data[key]

    def pop(self, key: K, default: V | None = None) -> V | None:
        item = self._data.pop(key, None)
        return default if item is None else item[1]

    def __len__(self) -> int:
        return len(self._data)

    def __iter__(self) -> Iterator[K]:
        return iter(list(self._data))

    def _prune(self, now: float) -> None:
        if self.ttl_s is None:
            return
        cutoff = now - self.ttl_s
        data = self._data
        while data:
            key, (at, _) = next(iter(data.items()))
            if at >= cutoff:
                break
            del data[key]

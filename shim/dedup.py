"""Re-sent duplicates join the request in flight instead of running it again.

``model_client`` (protocol.md) is a Lazy Pirate client: after 5 s without a reply it
closes its socket and sends the same bytes again on a new one, up to 3 times; newer
clients carry a ``request_id``. A duplicate that arrives while the first copy is still
in flight is answered from that one backend execution: the same reply frames go to every
copy's envelope (copies whose sockets have closed are counted as unroutable). Counted in
``shim_duplicate_joins_total{kind=request_id|bytes}``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable

from prometheus_client import Counter

Reply = list[bytes]
"""The reply frames (after the client's envelope) that every joined copy gets."""


class Joins:
    """Requests in flight by payload bytes and by ``request_id``; entries leave when done."""

    def __init__(self, bytes_window_s: float, joins: Counter) -> None:
        self._window_s = bytes_window_s
        self._by_bytes: dict[tuple[bytes, ...], tuple[float, asyncio.Future[Reply]]] = {}
        self._by_id: dict[Hashable, asyncio.Future[Reply]] = {}
        self._joined_bytes = joins.labels("bytes")
        self._joined_id = joins.labels("request_id")

    def __len__(self) -> int:
        return len(self._by_bytes) + len(self._by_id)

    def by_bytes(self, body: tuple[bytes, ...],
                 future: asyncio.Future[Reply]) -> asyncio.Future[Reply] | None:
        """The reply future of an identical request in flight (a join), else None after
        registering ``future`` as the one later copies join."""
        now = time.monotonic()
        found = self._by_bytes.get(body)
        if found is not None and not found[1].done() and now - found[0] <= self._window_s:
            self._joined_bytes.inc()
            return found[1]
        self._by_bytes[body] = (now, future)
        future.add_done_callback(lambda f: self._drop_bytes(body, f))
        return None

    def by_request_id(self, request_id: Hashable,
                      future: asyncio.Future[Reply]) -> asyncio.Future[Reply] | None:
        """Like ``by_bytes`` for the caller's ``request_id`` (no window: while in flight)."""
        found = self._by_id.get(request_id)
        if found is not None and found is not future and not found.done():
            self._joined_id.inc()
            return found
        self._by_id[request_id] = future
        future.add_done_callback(lambda f: self._drop_id(request_id, f))
        return None

    def _drop_bytes(self, body: tuple[bytes, ...], future: asyncio.Future[Reply]) -> None:
        found = self._by_bytes.get(body)
        if found is not None and found[1] is future:
            del self._by_bytes[body]

    def _drop_id(self, request_id: Hashable, future: asyncio.Future[Reply]) -> None:
        if self._by_id.get(request_id) is future:
            del self._by_id[request_id]

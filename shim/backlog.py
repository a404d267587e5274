"""Replies that a client's send queue could not take yet, bounded in bytes and time.

The frontend's per-client libzmq queue is small (``shim.peer_send_hwm`` messages), so a
client that does not read costs little. But a client that reads, only more slowly than
a burst of replies arrives (a pipelining DEALER on a loaded machine), must not lose
replies to that small queue. A reply refused with EAGAIN is parked here, in order, and
retried every few milliseconds; later replies to that client queue behind it. Bounds:

- per client: ``peer_bytes`` parked (then the reply is dropped: a client that does not
  read is a client that will not read);
- in total: ``total_bytes`` parked across all clients;
- in time: a parked reply older than ``ttl_s`` is dropped (the client is not reading).

Dropped replies are reported through ``on_dropped(reason)``; replies later sent through
``on_sent()``; replies to a client that has gone (EHOSTUNREACH) through
``on_unroutable()``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

import zmq

from shim.sockets import Frames, send_frames


class _Peer:
    __slots__ = ("bytes", "queue")

    def __init__(self) -> None:
        self.queue: deque[tuple[Frames, int, float]] = deque()
        self.bytes = 0


class Backlog:
    """Parked replies per client identity (the envelope's first frame)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket[bytes], *,
                 peer_bytes: int, total_bytes: int, ttl_s: float,
                 on_sent: Callable[[], None], on_dropped: Callable[[str], None],
                 on_unroutable: Callable[[], None], retry_s: float = 0.002,
                 on_tried: Callable[[], None] | None = None) -> None:
        """``on_tried``: after a retry that tried to send (sent or not): a send may take
        the socket's read edge (libzmq processes its commands), so its reader must read
        it again (``BatchReader.kick``)."""
        self._loop = loop
        self._sock = sock
        self._peer_bytes = peer_bytes
        self._total_bytes = total_bytes
        self._ttl_s = ttl_s
        self._retry_s = retry_s
        self._on_sent = on_sent
        self._on_dropped = on_dropped
        self._on_unroutable = on_unroutable
        self._on_tried = on_tried
        self._peers: dict[bytes, _Peer] = {}
        self.bytes = 0
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return sum(len(p.queue) for p in self._peers.values())

    def holds(self, identity: bytes) -> bool:
        """True while replies to this client wait here (a new one must queue behind)."""
        return identity in self._peers

    def park(self, frames: Frames) -> None:
        """Keep ``frames`` for a retry, or drop it (counted) when over a bound."""
        size = sum(len(f) for f in frames)
        peer = self._peers.get(frames[0])
        held = peer.bytes if peer is not None else 0
        if held + size > self._peer_bytes and held > 0:
            self._on_dropped("slow_reader")
            return
        if self.bytes + size > self._total_bytes and self.bytes > 0:
            self._on_dropped("backlog_full")
            return
        if peer is None:
            peer = self._peers[frames[0]] = _Peer()
        peer.queue.append((frames, size, time.monotonic()))
        peer.bytes += size
        self.bytes += size
        self._arm()

    def _arm(self) -> None:
        if self._timer is None and self._peers:
            self._timer = self._loop.call_later(self._retry_s, self._flush)

    def _flush(self) -> None:
        self._timer = None
        expired = time.monotonic() - self._ttl_s
        tried = False
        for identity, peer in list(self._peers.items()):
            queue = peer.queue
            while queue:
                frames, size, parked_at = queue[0]
                if parked_at < expired:
                    self._on_dropped("slow_reader")
                else:
                    tried = True
                    try:
                        send_frames(self._sock, frames)
                        self._on_sent()
                    except zmq.Again:
                        break  # still full: try again later
                    except zmq.ZMQError:
                        self._on_unroutable()
                queue.popleft()
                peer.bytes -= size
                self.bytes -= size
            if not queue:
                del self._peers[identity]
        if tried and self._on_tried is not None:
            self._on_tried()
        self._arm()

    def drop_all(self) -> int:
        """At shutdown: forget every parked reply (counted as dropped); returns how many."""
        dropped = 0
        for peer in self._peers.values():
            for _ in peer.queue:
                self._on_dropped("shutdown")
                dropped += 1
        self._peers.clear()
        self.bytes = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return dropped

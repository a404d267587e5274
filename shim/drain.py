"""A drain that wedges no persistent REQ client: the listening socket is handed back to
the kernel at once, and each client connection is closed only right after its reply.

Why: a REQ client (VRAMOptimizer's one persistent socket, protocol.md) whose request is
on a connection when the shim closes it waits forever; libzmq never resends it. Closing
at a moment that merely looks quiet is a race with the client's next send. Two facts
make a drain without that race possible:

1. The frontend listens on a TCP socket that the shim made itself and handed to libzmq
   (``ZMQ_USE_FD``, zmq_setsockopt(3)). On SIGTERM that descriptor is replaced by an
   unconnected socket (``dup2``): the kernel closes the listener, the port is free for
   the next shim at once, and libzmq, which never sees the descriptor become readable
   again, accepts nothing more. (``zmq_unbind`` would also close every connection the
   endpoint accepted, with the replies queued on them.) libzmq would fail an assertion
   if it later tried to deregister that descriptor, so a shim that did this never closes
   the frontend: it exits once drained (shim.cli).
2. libzmq's socket monitor reports each accepted connection's descriptor
   (``ZMQ_EVENT_ACCEPTED``) and each message carries the descriptor it came on
   (``ZMQ_SRCFD``). So the shim knows, per connection, what is in flight, and the kernel
   (``TCP_INFO.tcpi_bytes_acked``) says when the replies sent on it have reached the
   client. Then, and only then, ``shutdown(2)`` closes it: the client has its reply and
   is thinking; its libzmq sees the FIN long before it sends again, and keeps the next
   request queued until it has reconnected, to the next shim.

A connection that sends nothing during the whole drain is closed at ``drain_timeout_s``;
that is the one remaining race, for clients that poll less often than the drain lasts.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import struct
import termios
from collections.abc import Mapping

import zmq
from zmq.utils.monitor import parse_monitor_message

from shim.sockets import BatchReader, Frames

log = logging.getLogger("mmshim.drain")

#: Offset of ``tcpi_bytes_acked`` (u64) in Linux's ``struct tcp_info`` (since 4.1).
_BYTES_ACKED = 120
_TCP_INFO_LEN = 128


class Connections:
    """The frontend's accepted connections, by descriptor, and the drain's bookkeeping."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket[bytes]) -> None:
        self.fds: set[int] = set()
        self._sock = sock
        #: While draining: fd -> (duplicate socket, bytes acked at the baseline, bytes of
        #: replies sent since the baseline).
        self._drain: dict[int, tuple[socket.socket, int, int]] | None = None
        self.hung_up = 0
        self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._reader = BatchReader(loop, self._monitor, self._on_event, batch=64)
        self._reader.start()

    def _on_event(self, frames: Frames) -> None:
        try:
            event = parse_monitor_message(frames)
        except Exception:  # pragma: no cover - libzmq's own format
            return
        fd = int(event["value"])
        if self._drain is not None:
            log.debug("drain: %s fd %d", event["event"], fd)
        if event["event"] == zmq.EVENT_ACCEPTED:
            self.fds.add(fd)
            if self._drain is not None:  # accepted just before the listener went
                self._track(fd)
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            self.fds.discard(fd)
            if self._drain is not None and fd in self._drain:
                self._drain.pop(fd)[0].close()

    def _catch_up(self) -> None:
        with contextlib.suppress(zmq.ZMQError):
            while self._monitor.poll(0):
                self._on_event(self._monitor.recv_multipart())

    # -- the drain -----------------------------------------------------------------

    def start_drain(self) -> None:
        """Take every connection's baseline: what the kernel has acked so far."""
        self._catch_up()
        self._drain = {}
        for fd in self.fds:
            self._track(fd)

    def _track(self, fd: int) -> None:
        assert self._drain is not None
        if fd in self._drain:
            return
        try:
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            return
        self._drain[fd] = (sock, _bytes_acked(sock), 0)

    def received(self, fd: int) -> None:
        """A request came in on ``fd`` (while draining): move its baseline to now, so
        that what is acked from here on is measured against replies sent from here on
        (replies still unacked carry over). Without this, the late ACK of a reply sent
        before the baseline could pass for the ACK of the next one."""
        if self._drain is None or fd < 0:
            return
        self._track(fd)
        if fd in self._drain:
            sock, base, pending = self._drain[fd]
            now = _bytes_acked(sock)
            self._drain[fd] = (sock, now, max(0, pending - (now - base)))

    def sent(self, fd: int, nbytes: int) -> None:
        """A reply of ``nbytes`` went out on ``fd`` (while draining)."""
        if self._drain is not None and fd >= 0:
            self._track(fd)  # a connection whose ACCEPTED event is still queued
        if self._drain is not None and fd in self._drain:
            sock, base, pending = self._drain[fd]
            self._drain[fd] = (sock, base, pending + nbytes)

    def hang_up_answered(self, in_flight: Mapping[int, int]) -> None:
        """Close each connection that got a reply during the drain, has all its replies
        acked by the client's kernel, nothing in flight and nothing unread."""
        self._catch_up()
        assert self._drain is not None
        for fd, (sock, base, pending) in list(self._drain.items()):
            if (pending and not in_flight.get(fd) and _unread(sock) == 0
                    and _bytes_acked(sock) - base >= pending):
                self._hang_up(fd)

    def hang_up_all(self) -> None:
        """At the drain's deadline: close what is left."""
        self._catch_up()
        for fd in list(self._drain or ()):
            self._hang_up(fd)

    @property
    def open(self) -> int:
        """Connections the drain has not closed yet."""
        return len(self._drain) if self._drain is not None else len(self.fds)

    def _hang_up(self, fd: int) -> None:
        assert self._drain is not None
        sock, base, pending = self._drain.pop(fd)
        log.debug("drain: hang up fd %d (acked %d of %d)", fd, _bytes_acked(sock) - base, pending)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
            self.hung_up += 1
        sock.close()  # our duplicate only; libzmq sees the hang-up and cleans up
        self.fds.discard(fd)

    def close(self) -> None:
        self._reader.stop()
        for sock, _, _ in (self._drain or {}).values():
            sock.close()
        self._drain = None
        with contextlib.suppress(zmq.ZMQError):
            if not self._sock.closed:
                self._sock.disable_monitor()
            self._monitor.close(0)


def listen_socket(endpoint: str, backlog: int = 100) -> socket.socket | None:
    """A listening TCP socket for ``tcp://host:port`` (``*``: every address), for
    ``ZMQ_USE_FD``; None for other transports. Raises OSError as bind(2) does."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[6:].rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if host in ("*", ""):
        host = "0.0.0.0"
    elif family == socket.AF_INET and not host.replace(".", "").isdigit():
        host = socket.gethostbyname(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as libzmq does
        sock.bind((host, int(port)))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def release_listener(fd: int) -> None:
    """Close the listening socket ``fd`` under libzmq's feet, keeping the descriptor
    number taken (by an unconnected socket) so that libzmq never touches another file."""
    placeholder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    os.dup2(placeholder.fileno(), fd)
    placeholder.close()


def _bytes_acked(sock: socket.socket) -> int:
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except OSError:
        return 0
    if len(info) < _BYTES_ACKED + 8:
        return 0
    return int(struct.unpack_from("Q", info, _BYTES_ACKED)[0])


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in the kernel's receive buffer (ioctl FIONREAD)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    except OSError:
        return 0
    return buf[0]

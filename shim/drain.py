"""The frontend's client connections, so that a drain can hang up on all of them at once.

Why: a REQ client (VRAMOptimizer's one persistent socket) whose request is on a
connection when the shim closes it waits forever; libzmq never resends. The drain
(shim.proxy.Proxy.drain) closes only at a quiet moment, when every client has its reply.
What remains is the instant between that check and the close: a request sent then is
lost. ``zmq_close`` hands the close to libzmq's I/O thread, which on a loaded machine
can take milliseconds; ``shutdown(2)`` on each connection sends the FIN at once, so the
clients stop sending to us (their libzmq queues the next request until it has
reconnected, to the next shim) within the time a FIN takes on the wire.

libzmq has no call to close one peer of a ROUTER, but its socket monitor reports every
accepted connection's file descriptor (``ZMQ_EVENT_ACCEPTED``, value = fd; see
zmq_socket_monitor(3)), and libzmq cleans up after a peer that hung up as for any
disconnect. Before a shutdown each descriptor is checked to still be a connection on our
listening address (descriptors are reused).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import os
import socket
import termios

import zmq
from zmq.utils.monitor import parse_monitor_message

from shim.sockets import BatchReader, Frames


class Connections:
    """The descriptors of the frontend's accepted connections, from its socket monitor."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket[bytes]) -> None:
        self.fds: set[int] = set()
        self._sock = sock
        self._listen: str | tuple[str, int] | None = None
        self._monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._reader = BatchReader(loop, self._monitor, self._on_event, batch=64)
        self._reader.start()

    def listening_on(self, last_endpoint: str) -> None:
        """The bound address (``ZMQ_LAST_ENDPOINT``) a descriptor must still have."""
        if last_endpoint.startswith("tcp://"):
            host, _, port = last_endpoint[6:].rpartition(":")
            self._listen = (host.strip("[]"), int(port))
        elif last_endpoint.startswith("ipc://"):
            self._listen = last_endpoint[6:]

    def _on_event(self, frames: Frames) -> None:
        try:
            event = parse_monitor_message(frames)
        except Exception:  # pragma: no cover - libzmq's own format
            return
        fd = int(event["value"])
        if event["event"] == zmq.EVENT_ACCEPTED:
            self.fds.add(fd)
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            self.fds.discard(fd)

    def hang_up_if_nothing_unread(self) -> bool:
        """``shutdown(SHUT_RDWR)`` every connection still ours, unless one of them has
        bytes the shim has not read yet (``FIONREAD``: a request that libzmq's I/O thread
        has not picked up; it must be served first). Data already handed to the kernel
        is still delivered before the FIN. Returns whether it hung up."""
        with contextlib.suppress(zmq.ZMQError):  # connection events queued: read them
            while self._monitor.poll(0):
                self._on_event(self._monitor.recv_multipart())
        socks = []
        try:
            for fd in sorted(self.fds):
                try:
                    sock = socket.socket(fileno=os.dup(fd))
                except OSError:
                    continue
                socks.append(sock)
                if self._is_ours(sock) and _unread(sock) > 0:
                    return False
            for sock in socks:
                if self._is_ours(sock):
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
            self._reader.stop()
            self.fds.clear()
            return True
        finally:
            for sock in socks:
                sock.close()  # our duplicates only

    def _is_ours(self, sock: socket.socket) -> bool:
        try:
            name = sock.getsockname()
            peer = sock.getpeername()
        except OSError:
            return False
        if isinstance(self._listen, tuple):
            host, port = self._listen
            return (isinstance(name, tuple) and bool(peer) and name[1] == port
                    and (host in ("0.0.0.0", "::", "*") or name[0] == host))
        return self._listen is not None and name == self._listen

    def close(self) -> None:
        self._reader.stop()
        with contextlib.suppress(zmq.ZMQError):
            if not self._sock.closed:
                self._sock.disable_monitor()
            self._monitor.close(0)


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in the kernel's receive buffer (ioctl FIONREAD)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    except OSError:
        return 0
    return buf[0]

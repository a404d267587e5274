"""Plain zmq sockets driven by the asyncio loop, read in batches.

zmq.asyncio wraps every recv in a Future; on the hot path that costs more than the
proxying itself. Instead the socket's file descriptor is registered with the loop and
each wake-up drains up to ``batch`` messages with NOBLOCK. The descriptor is
edge-triggered (it signals "something changed", not "readable"), so after every send on
the socket we re-check ZMQ_EVENTS, otherwise a message that arrived meanwhile could sit
unread until the next edge.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import zmq

Frames = list[bytes]


class BatchReader:
    """Calls ``on_message(frames)`` for every multipart message the socket receives."""

    __slots__ = ("_armed", "_batch", "_fd", "_loop", "_on_message", "_scheduled", "sock")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket[bytes],
                 on_message: Callable[[Frames], None], batch: int = 256) -> None:
        self.sock = sock
        self._fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._loop = loop
        self._on_message = on_message
        self._batch = batch
        self._armed = False
        self._scheduled = False

    def start(self) -> None:
        """Begin reading; messages already queued are read on the next loop pass."""
        if not self._armed:
            self._loop.add_reader(self._fd, self._drain)
            self._armed = True
        self.kick()

    def stop(self) -> None:
        """Stop reading; queued messages stay in the socket."""
        if self._armed:
            self._loop.remove_reader(self._fd)
            self._armed = False

    def kick(self) -> None:
        """Re-check the socket after a send (the edge may have been consumed)."""
        if self._armed and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        if not self._armed:
            return
        recv, on_message = self.sock.recv_multipart, self._on_message
        for _ in range(self._batch):
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return  # socket closed under us during shutdown
            on_message(frames)
        # More may be queued: yield to other sockets, then continue.
        self.kick()


def send_frames(sock: zmq.Socket[bytes], frames: Frames) -> None:
    """Send a multipart message without blocking (raises zmq.Again / ZMQError)."""
    sock.send_multipart(frames, zmq.NOBLOCK)


def bind_or_explain(sock: zmq.Socket[bytes], endpoint: str, role: str) -> None:
    """Bind, turning 'address in use' into a message that names the endpoint.

    On failure the socket is closed, so that the context can still terminate.
    """
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(0)
        if exc.errno == zmq.EADDRINUSE:
            raise EndpointInUse(
                f"{role} endpoint {endpoint} is already in use "
                "(is the old model manager still holding it?)") from None
        raise EndpointInUse(f"cannot bind {role} endpoint {endpoint}: {exc}") from None


class EndpointInUse(RuntimeError):
    """A listen, health or admin endpoint could not be bound."""

"""Plain zmq sockets driven by the asyncio loop, read in batches.

zmq.asyncio wraps every recv in a Future; on the hot path that costs more than the
proxying itself. Instead the socket's file descriptor is registered with the loop and
each wake-up drains up to ``batch`` messages with NOBLOCK. The descriptor is
edge-triggered (it signals "something changed", not "readable"), so a send on the
socket (which may consume the edge) schedules a drain pass, which re-checks ZMQ_EVENTS;
otherwise a message that arrived meanwhile could sit unread until the next edge.

Per frame, pyzmq's convenience layer costs more than libzmq: frames are sent with the
compiled base class's ``send`` (the subclass's only adds DRAFT-socket arguments), and
received as ``zmq.Frame`` whose ``more`` flag saves a ZMQ_RCVMORE lookup per frame
(every ``getsockopt`` converts its option to an enum in Python).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import zmq
import zmq.backend

from shim.errors import EndpointInUse

Frames = list[bytes]

_base_send = zmq.backend.Socket.send


# pyzmq's flag constants are enums; combining them per frame costs more than the send.
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_SRCFD = int(zmq.SRCFD)


def recv_frames(sock: zmq.Socket[bytes]) -> Frames:
    """One whole multipart message from a socket known to be readable."""
    recv = sock.recv
    frame = recv(_NOBLOCK, copy=False)
    frames = [frame.bytes]
    while frame.more:
        frame = recv(_NOBLOCK, copy=False)
        frames.append(frame.bytes)
    return frames


def recv_frames_fd(sock: zmq.Socket[bytes]) -> tuple[Frames, int]:
    """Like recv_frames, with the descriptor of the connection the message came in on
    (``ZMQ_SRCFD``, zmq_msg_get(3)); -1 when libzmq does not say."""
    recv = sock.recv
    frame = recv(_NOBLOCK, copy=False)
    fd = frame.get(_SRCFD)
    frames = [frame.bytes]
    while frame.more:
        frame = recv(_NOBLOCK, copy=False)
        frames.append(frame.bytes)
    return frames, fd if isinstance(fd, int) else -1


def split_envelope(frames: Sequence[bytes]) -> tuple[Frames, Frames] | None:
    """A ROUTER's message ``[identity, ..., b"", body...]`` -> (envelope, body).

    The one rule, for the frontend, the admin socket and the reference backends: the
    envelope runs up to and including the FIRST empty frame after the routing id (the
    REQ/DEALER delimiter, ZeroMQ guide ch. 3 "The Extended Reply Envelope"); everything
    after it is the body, which may itself hold empty frames. None when there is no
    delimiter: each caller answers such a DEALER in the way it can read (the frontend
    with a SHIM_BAD_REQUEST under ``[identity, b""]``, the admin socket and the backends
    a ``[identity, payload]`` message under ``[identity]``).
    """
    try:
        i = frames.index(b"", 1)  # in C: this runs for every request
    except ValueError:
        return None
    return list(frames[: i + 1]), list(frames[i + 1:])


def send_frames(sock: zmq.Socket[bytes], frames: Frames | tuple[bytes, ...]) -> None:
    """Send a multipart message without blocking (raises zmq.Again / ZMQError).

    libzmq accepts or refuses a multipart message as a whole at its first frame, so a
    refusal never leaves half a message behind.
    """
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _base_send(sock, frame, _SNDMORE_NOBLOCK if i < last else _NOBLOCK)


def readable(sock: zmq.Socket[bytes]) -> bool:
    """Whether a message is waiting (this also lets libzmq process its commands)."""
    return bool(sock.get(_EVENTS) & _POLLIN)  # type: ignore[operator]


class BatchReader:
    """Calls ``on_message(frames)`` for every multipart message the socket receives."""

    __slots__ = ("_armed", "_batch", "_fd", "_loop", "_on_message", "_recv", "_scheduled",
                 "sock")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: zmq.Socket[bytes],
                 on_message: Callable[[Any], None], batch: int = 256,
                 recv: Callable[[zmq.Socket[bytes]], Any] = recv_frames) -> None:
        """``recv`` reads one message (default ``recv_frames``); ``on_message`` gets what
        it returns."""
        self.sock = sock
        self._recv = recv
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
        self._schedule()

    def stop(self) -> None:
        """Stop reading; queued messages stay in the socket."""
        if self._armed:
            self._loop.remove_reader(self._fd)
            self._armed = False

    def kick(self) -> None:
        """Re-check the socket after a send (the edge may have been consumed): one drain
        pass on the next loop iteration, however many sends there were."""
        if self._armed:
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        if not self._armed:
            return
        sock, on_message, recv = self.sock, self._on_message, self._recv
        try:
            for _ in range(self._batch):
                if not readable(sock):
                    return
                on_message(recv(sock))
        except zmq.ZMQError:
            return  # socket closed under us during shutdown
        # More may be queued: yield to other sockets, then continue.
        self._schedule()


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



"""The data path, top to bottom: frontend -> decode -> route -> translate -> backend -> reply.

Every request that comes in through the frontend ROUTER leaves through it exactly once:
with the backend's reply, or with the shim's own error reply, before the request's
deadline. Behaviour beyond moving requests (model ownership, shadowing) plugs in as
addons with four hooks (``Addon``), so the core stays readable.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Awaitable
from typing import Any, Protocol

import msgspec
import zmq

from shim import dialects
from shim.backlog import Backlog
from shim.config import ShimConfig
from shim.dialects.ops import Form, Op, Result
from shim.drain import Connections, listen_socket, release_listener
from shim.metrics import Metrics
from shim.pool import BackendBadReply, BackendError, BackendPool
from shim.routing import bucket_of, random_bucket
from shim.runtime import Rule, Runtime, runtime_from_config
from shim.sockets import (
    BatchReader,
    EndpointInUse,
    Frames,
    bind_or_explain,
    readable,
    recv_frames_fd,
    send_frames,
)

log = logging.getLogger("mmshim.proxy")

_decode = msgspec.json.decode
_encode = msgspec.json.encode
#: What msgspec raises on bad JSON: deep nesting and invalid UTF-8 escape DecodeError.
_BAD_JSON = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


class _AnyObject(msgspec.Struct):
    """Decoding into this checks "a JSON object" without building its values."""


_check_object = msgspec.json.Decoder(_AnyObject).decode


def _json_object(reply: bytes, backend: str) -> bytes:
    """A passed-through reply, checked to be a JSON object (else BackendBadReply)."""
    try:
        _check_object(reply)
    except (*_BAD_JSON, msgspec.ValidationError):
        raise BackendBadReply(f"backend {backend} sent a reply that is not a JSON object") \
            from None
    return reply


class Addon(Protocol):
    """A behaviour plugged into the data path (see shim.ownership, shim.shadow)."""

    def route(self, op: Op, candidates: list[str], rt: Runtime) -> list[str]:
        """Reorder or narrow the backends a request may go to."""
        ...

    def before_send(self, op: Op, backend: str) -> Awaitable[None] | None:
        """Something to wait for before the request goes out (bounded by its deadline)."""
        ...

    def after_send(self, op: Op, backend: str, reply: bytes | None) -> None:
        """One attempt on ``backend`` ended: with the caller-dialect reply, or None."""
        ...

    def after_reply(self, op: Op, backend: str, request: bytes, reply: bytes,
                    rt: Runtime) -> None:
        """See a successful exchange, after the client has its reply."""
        ...


class ShimReply(Exception):
    """Answer the client with the shim's own error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Proxy:
    """Owns the frontend socket, the backend pool and the runtime config."""

    def __init__(self, cfg: ShimConfig, loop: asyncio.AbstractEventLoop,
                 ctx: zmq.Context[zmq.Socket[bytes]], metrics: Metrics) -> None:
        self.cfg = cfg
        self.policy = cfg.policy
        self.runtime: Runtime = runtime_from_config(cfg)
        self.metrics = metrics
        self.addons: list[Addon] = []
        self._loop = loop
        self._max_bytes = cfg.shim.max_request_bytes
        self._forward_opaque = cfg.shim.opaque == "forward"
        self._sticky_key = cfg.routing.sticky_key
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepting = True
        #: Once nothing is in flight: requests == replies + unroutable (vanished clients).
        self.counts = {"requests": 0, "replies": 0, "unroutable": 0}

        #: Requests in flight per client connection (descriptor), for the drain.
        self._open: dict[int, int] = {}
        self.draining = False
        #: True once the listening socket was handed back to the kernel (shim.drain): the
        #: frontend must then never be closed; the process exits instead.
        self.listener_released = False
        #: Whether a drain may release the listener (only a process that exits after the
        #: drain: ``mmshim run``); otherwise it closes at a quiet moment.
        self.release_on_drain = False
        #: While draining: when a request last came in or a reply went out (monotonic).
        self._last_activity = 0.0

        # Ours, so that a drain can release it (shim.drain); first, so that an endpoint
        # in use leaves no socket behind.
        listener = _listen(cfg.shim.listen)
        self.frontend = ctx.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Bounded memory per client: a few replies queued (then dropped and counted), a
        # bounded inbound queue, and no frame above the hard cap ever buffered whole.
        self.frontend.setsockopt(zmq.SNDHWM, cfg.shim.peer_send_hwm)
        self.frontend.setsockopt(zmq.RCVHWM, cfg.shim.peer_recv_hwm)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, cfg.shim.max_frame_bytes)
        #: The listening descriptor, owned by libzmq from the bind on (never closed here).
        self._listen_fd: int | None = None
        if listener is not None:
            self.frontend.setsockopt(zmq.USE_FD, listener.fileno())
        try:
            bind_or_explain(self.frontend, cfg.shim.listen, "listen")  # closes it on failure
        except BaseException:
            if listener is not None:
                listener.close()
            raise
        if listener is not None:
            self._listen_fd = listener.detach()  # libzmq closes it with the frontend
        self.connections = Connections(loop, self.frontend)
        self._reader = BatchReader(loop, self.frontend, self._on_frames, recv=recv_frames_fd)
        self.backlog = Backlog(loop, self.frontend, peer_bytes=cfg.shim.peer_backlog_bytes,
                               total_bytes=cfg.shim.backlog_bytes, ttl_s=cfg.shim.backlog_ttl_s,
                               on_sent=self._sent_late, on_dropped=self._dropped,
                               on_unroutable=self._unroutable)
        self.pool = BackendPool(loop, ctx, cfg.backends, cfg.health, metrics,
                                max_reply_bytes=cfg.shim.max_reply_bytes,
                                max_frame_bytes=cfg.shim.max_frame_bytes)
        metrics.export_counts(lambda: self.counts)
        self.set_runtime(self.runtime)

    def start(self) -> None:
        self._reader.start()

    def set_runtime(self, rt: Runtime) -> None:
        """Swap the runtime config; requests already routed keep what they had."""
        self.runtime = rt
        for name in self.pool.backends:
            self.metrics.weight.labels(name).set(rt.weights.get(name, 0.0))

    # -- 1. frontend -----------------------------------------------------------------

    def _on_frames(self, message: tuple[Frames, int]) -> None:
        """One multipart message from a client: ``[identity..., b"", payload]``, and the
        descriptor of the connection it came on (for the drain: shim.drain)."""
        frames, fd = message
        self.counts["requests"] += 1
        if self.draining:
            self._last_activity = time.monotonic()
            self.connections.received(fd)
        try:
            split = frames.index(b"", 1)
        except ValueError:
            # A DEALER that sent no delimiter: answer it the way it can read.
            self._bad_request([*frames[:1], b""], "envelope", "missing empty delimiter frame",
                              fd)
            return
        envelope, body = frames[: split + 1], frames[split + 1 :]
        if len(body) != 1:
            self._bad_request(envelope, "frames", f"expected one payload frame, got {len(body)}",
                              fd)
        elif len(body[0]) > self._max_bytes:
            self._bad_request(envelope, "too_large",
                              f"request of {len(body[0])} bytes exceeds {self._max_bytes}", fd)
        elif not self.accepting:
            self._reply_error(envelope, None, "SHIM_SHUTTING_DOWN", "the shim is shutting down",
                              fd)
        else:
            self._open[fd] = self._open.get(fd, 0) + 1
            task = self._loop.create_task(self._handle(envelope, body[0], fd))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _send(self, envelope: Frames, reply: bytes, fd: int = -1) -> None:
        frames = [*envelope, reply]
        if self.draining:
            self._last_activity = time.monotonic()
            self.connections.sent(fd, len(reply))
        if self.backlog.holds(envelope[0]):  # behind its earlier replies, in order
            self.backlog.park(frames)
            return
        try:
            send_frames(self.frontend, frames)
            self.counts["replies"] += 1
        except zmq.Again:
            # Its send queue is full (shim.peer_send_hwm): wait in the bounded backlog.
            self.backlog.park(frames)
        except zmq.ZMQError:
            # ROUTER_MANDATORY: the client has gone; count, move on.
            self._unroutable()
        self._reader.kick()

    def _sent_late(self) -> None:
        self.counts["replies"] += 1
        self._reader.kick()

    def _dropped(self, reason: str) -> None:
        self.counts["unroutable"] += 1
        self.metrics.dropped_replies.labels(reason).inc()

    def _unroutable(self) -> None:
        self.counts["unroutable"] += 1
        self.metrics.unroutable.inc()

    def _bad_request(self, envelope: Frames, reason: str, message: str, fd: int = -1) -> None:
        self.metrics.bad_requests.labels(reason).inc()
        self._reply_error(envelope, None, "SHIM_BAD_REQUEST", message, fd)

    def _reply_error(self, envelope: Frames, msg: object, code: str, message: str,
                     fd: int = -1) -> None:
        form = dialects.form_of(msg)
        self._send(envelope, _encode(dialects.error_reply(form, code, message, _as_dict(msg))),
                   fd)

    # -- 2..5. one request -----------------------------------------------------------

    async def _handle(self, envelope: Frames, payload: bytes, fd: int = -1) -> None:
        started = time.perf_counter()
        rt = self.runtime  # read once: a concurrent change applies to the next request
        msg: object = None
        backend, action, outcome = "none", "unknown", "ok"
        try:
            try:
                msg = _decode(payload)
            except _BAD_JSON:
                if not self._forward_opaque:
                    self.metrics.bad_requests.labels("not_json").inc()
                    raise ShimReply("SHIM_BAD_REQUEST", "request is not valid JSON") from None
                backend, reply = await self._forward_opaque_bytes(rt, payload, started)
                self._send(envelope, reply, fd)
                return
            if not isinstance(msg, dict):
                self.metrics.bad_requests.labels("not_object").inc()
                raise ShimReply("SHIM_BAD_REQUEST", "request must be a JSON object")
            try:
                op = dialects.parse_request(msg, self.policy)
            except dialects.BadRequest as exc:
                self.metrics.bad_requests.labels("unparsable").inc()
                raise ShimReply("SHIM_BAD_REQUEST", str(exc)) from None
            action = op.kind.value
            rule = rt.rules[action]
            deadline = started + rule.timeout_ms / 1000
            candidates = self._route(rt, op, msg, rule)
            backend, reply = await self._forward(op, payload, candidates, rule, deadline)
            self._send(envelope, reply, fd)
            self._after_reply(op, backend, payload, reply, rt)  # never raises
        except ShimReply as exc:
            outcome = exc.code
            self._reply_error(envelope, msg, exc.code, exc.message, fd)
        except asyncio.CancelledError:
            outcome = "SHIM_SHUTTING_DOWN"
            self._reply_error(envelope, msg, outcome, "the shim shut down before a reply came",
                              fd)
            raise
        except Exception as exc:  # a bug must cost one error reply, never the shim
            log.exception("internal error handling a request")
            outcome = "SHIM_INTERNAL"
            self._reply_error(envelope, msg, outcome, f"internal error: {exc}", fd)
        finally:
            self.metrics.record_request(backend, action, outcome, time.perf_counter() - started)
            left = self._open.get(fd, 1) - 1
            if left > 0:
                self._open[fd] = left
            else:
                self._open.pop(fd, None)

    def _after_reply(self, op: Op, backend: str, request: bytes, reply: bytes,
                     rt: Runtime) -> None:
        """The addons' look at a finished exchange; the client has its one reply already,
        so a failing addon is logged, never answered a second time."""
        for addon in self.addons:
            try:
                addon.after_reply(op, backend, request, reply, rt)
            except Exception:
                log.exception("addon %s failed after a reply", type(addon).__name__)

    def _route(self, rt: Runtime, op: Op, msg: dict[str, Any], rule: Rule) -> list[str]:
        """Backends to try, in order: pin, else weights (sticky), then failover."""
        backends = self.pool.backends
        if rule.pin:
            return [rule.pin]
        key = msg.get(self._sticky_key) if self._sticky_key else None
        bucket = bucket_of(str(key)) if key is not None else random_bucket()
        primary = rt.table.backend_for(bucket)
        candidates = [primary, *(n for n in rt.table.names if n != primary)]
        if op.dialect != "mma":  # clients already on the new dialect go to it unchanged
            candidates.sort(key=lambda n: backends[n].dialect != op.dialect)
        for addon in self.addons:
            candidates = addon.route(op, candidates, rt)
        if rule.failover and not all(backends[n].healthy for n in candidates):
            # healthy backends first, the others only as a last resort
            candidates.sort(key=lambda n: not backends[n].healthy)
        return candidates

    async def _forward(self, op: Op, payload: bytes, candidates: list[str], rule: Rule,
                       deadline: float) -> tuple[str, bytes]:
        """Send to the first candidate that can serve the request; fail over if allowed.

        A candidate whose dialect has no equivalent of the operation is skipped whatever
        the rule says; one that fails is left for the next only when failover is allowed.
        """
        last: ShimReply | None = None
        for i, name in enumerate(candidates):
            backend = self.pool.backends[name]
            translate = rule.translate and op.dialect != backend.dialect
            if translate:
                try:
                    requests = [_encode(r) for r in
                                dialects.render_request(op, backend.dialect, self.policy)]
                except dialects.Unsupported as exc:
                    last = ShimReply("SHIM_UNSUPPORTED", f"{name} cannot serve this: {exc}")
                    continue
            else:
                requests = [payload]
            reply: bytes | None = None
            try:
                for addon in self.addons:
                    waiting = addon.before_send(op, name)
                    if waiting is not None:
                        await _bounded(waiting, deadline)
                last_chance = not (rule.failover and i + 1 < len(candidates))
                if last_chance and not backend.connected:
                    # Nothing else to try: a restarting backend has until the deadline.
                    await self.pool.wait_connected(name, deadline - time.perf_counter())
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise ShimReply("SHIM_TIMEOUT", "deadline passed before a backend was free")
                timeout = min(remaining, backend.config.timeout_ms / 1000)
                if len(requests) == 1:  # the common case, without gather's extra Future
                    replies = [await self.pool.request(name, requests[0], timeout)]
                else:
                    replies = await asyncio.gather(
                        *[self.pool.request(name, r, timeout) for r in requests])
                reply = (self._translate_reply(op, backend.dialect, replies) if translate
                         else _json_object(replies[0], name))
                return name, reply
            except BackendError as exc:
                last = ShimReply(exc.code, str(exc))
                if rule.failover and i + 1 < len(candidates):
                    self.metrics.failovers.labels(name, candidates[i + 1]).inc()
                    continue
                raise last from None
            finally:
                for addon in self.addons:
                    addon.after_send(op, name, reply)
        raise last or ShimReply("SHIM_NO_BACKEND", "no backend is available")

    def _translate_reply(self, op: Op, dialect: str, replies: list[bytes]) -> bytes:
        """The backend's replies, read in its dialect and rendered in the caller's.

        An unusable reply raises BackendBadReply, so that the request can fail over.
        """
        decoded: list[Any] = []
        for raw in replies:
            try:
                decoded.append(_decode(raw))
            except _BAD_JSON:
                raise BackendBadReply(f"{dialect} backend reply is not valid JSON") from None
        result = dialects.parse_reply(op, dialect, decoded)
        if not result.ok and result.error_code == BackendBadReply.code:
            raise BackendBadReply(result.message or "unusable backend reply")
        return _encode(dialects.render_reply(op, result))

    async def call(self, backend: str, msg: dict[str, Any], timeout_s: float) -> Result:
        """An internal request (ownership polls, hand-overs) in the MMA dialect, sent to
        ``backend`` in its own dialect, read back as a canonical Result."""
        op = dialects.parse_request(msg, self.policy)
        dialect = self.pool.backends[backend].dialect
        requests = dialects.render_request(op, dialect, self.policy)
        raw = await asyncio.gather(*(self.pool.request(backend, _encode(r), timeout_s)
                                     for r in requests))
        replies = []
        for item in raw:
            try:
                replies.append(_decode(item))
            except _BAD_JSON:
                replies.append({"error": "reply is not valid JSON"})
        return dialects.parse_reply(op, dialect, replies)

    async def _forward_opaque_bytes(self, rt: Runtime, payload: bytes,
                                    started: float) -> tuple[str, bytes]:
        """``opaque = "forward"``: undecodable bytes go to the weighted primary as they are."""
        name = rt.table.backend_for(random_bucket())
        timeout = self.cfg.shim.default_timeout_ms / 1000 - (time.perf_counter() - started)
        try:
            return name, _json_object(await self.pool.request(name, payload, timeout), name)
        except BackendError as exc:
            raise ShimReply(exc.code, str(exc)) from None

    # -- lifecycle -------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._tasks)

    async def drain(self, timeout_s: float, quiet_s: float = 0.05) -> int:
        """Stop accepting connections, answer every request received (in flight or
        arriving on a connection already made), close each connection right after its
        replies have reached the client (shim.drain), and stop when none is left.

        A frontend on ipc:// (no listening socket of ours to release) is closed instead
        at the first moment when nothing is in flight and nothing came in or went out for
        ``quiet_s``. At ``timeout_s`` whatever is still in flight is answered
        SHIM_SHUTTING_DOWN. Returns how many requests had to be cut short.
        """
        self.draining = True
        self._last_activity = time.monotonic()
        deadline = self._last_activity + timeout_s
        if self._listen_fd is not None and self.release_on_drain:
            release_listener(self._listen_fd)
            self.listener_released = True
            _RELEASED.append(self.frontend)  # never garbage-collected, so never closed
            self.connections.start_drain()
        while time.monotonic() < deadline:
            if self.listener_released:
                self.connections.hang_up_answered(self._open)
                if self.connections.open == 0 and not self._tasks and not self.backlog.bytes:
                    log.info("drained: every client connection closed after its reply")
                    return 0
            elif (not self._tasks and not self.backlog.bytes and not readable(self.frontend)
                    and time.monotonic() - self._last_activity >= quiet_s):
                self.close_frontend()
                return 0
            await asyncio.sleep(0.005)
        self.accepting = False  # from now on: SHIM_SHUTTING_DOWN
        cut = list(self._tasks)
        for task in cut:
            task.cancel()
        if cut:
            await asyncio.wait(cut, timeout=1.0)
        if self.listener_released:  # give the last replies a moment to reach the clients
            flush_by = time.monotonic() + 1.0
            while self.connections.open and time.monotonic() < flush_by:
                self.connections.hang_up_answered(self._open)
                await asyncio.sleep(0.005)
            self.connections.hang_up_all()
        self.close_frontend()
        return len(cut)

    def close_frontend(self, linger_ms: int = 1000) -> None:
        """Stop reading and close the frontend; queued replies get ``linger_ms`` to go.
        After the listener was released the socket is left open (see shim.drain)."""
        self._reader.stop()
        if not self.frontend.closed and not self.listener_released:
            self.frontend.close(linger_ms)

    def close(self, linger_ms: int = 0) -> None:
        """Close the sockets; replies still queued get ``linger_ms`` to be sent."""
        self.backlog.drop_all()
        self.connections.close()
        self.close_frontend(linger_ms)
        self.pool.close()


#: Frontends whose listener was released (shim.drain): libzmq must never close them.
_RELEASED: list[zmq.Socket[bytes]] = []


def _listen(endpoint: str) -> socket.socket | None:
    try:
        return listen_socket(endpoint)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise EndpointInUse(f"listen endpoint {endpoint} is already in use "
                                "(is the old model manager still holding it?)") from None
        raise EndpointInUse(f"cannot bind listen endpoint {endpoint}: {exc}") from None


def _as_dict(msg: object) -> dict[str, Any] | None:
    return msg if isinstance(msg, dict) else None


async def _bounded(waiting: Awaitable[None], deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    try:
        await asyncio.wait_for(waiting, max(0.0, remaining))
    except TimeoutError:
        raise ShimReply("SHIM_TIMEOUT", "timed out waiting for a model hand-over") from None


__all__ = ["Addon", "Form", "Proxy", "ShimReply"]

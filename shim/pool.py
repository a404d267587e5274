"""Backend pool: DEALER sockets, correlation ids, deadlines.

Per backend endpoint one DEALER socket carries many requests at once. Each request goes
out as ``[correlation id, b"", payload]``; a REP or ROUTER backend hands the envelope
back untouched, so the reply finds its waiting Future by id. A reply that finds no
Future (it came after its deadline, or from a confused backend) is dropped and counted.
A socket monitor notices a backend that went away and fails its requests at once
instead of letting them run into their deadline.

Deadlines cost no timer per request: a request's id goes into the bucket of its deadline
(to the millisecond, rounded up: the loop's timers are no finer), settling takes it out
again (O(1)), and one timer is armed for the earliest bucket, which the sweep expires
whole. Nothing lingers for settled requests, however long another one is stuck.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from heapq import heappop, heappush

import zmq
from zmq.utils.monitor import parse_monitor_message

from shim.config import BackendConfig, HealthSection
from shim.errors import (
    BackendBadReply,
    BackendLost,
    BackendTimeout,
    BackendUnavailable,
)
from shim.metrics import Metrics
from shim.sockets import BatchReader, Frames, send_frames

log = logging.getLogger("mmshim.pool")

#: Deadline buckets per second: the loop's timers have millisecond resolution.
_TICKS = 1000


@dataclass(slots=True)
class Pending:
    future: asyncio.Future[bytes]
    endpoint: Endpoint
    tick: int  # its deadline bucket
    #: Set for ``request_frames``: the reply is every frame after the delimiter.
    frames: asyncio.Future[list[bytes]] | None = None


@dataclass(eq=False, slots=True)
class Endpoint:
    """One connected DEALER socket and what is outstanding on it."""

    address: str
    backend: Backend
    sock: zmq.Socket[bytes]
    reader: BatchReader | None = None
    monitor: zmq.Socket[bytes] | None = None
    monitor_reader: BatchReader | None = None
    connected: bool = False
    outstanding: int = 0


@dataclass(eq=False, slots=True)
class Backend:
    """A model manager as the pool sees it: endpoints and health."""

    name: str
    config: BackendConfig
    endpoints: list[Endpoint] = field(default_factory=list)
    #: Set by the active health prober.
    probe_ok: bool = True
    #: Request failures in a row (timeouts, lost connections); reset by any reply.
    failures: int = 0
    failure_limit: int = 3
    last_failure: float = 0.0  # time.monotonic()
    connected_endpoints: int = 0
    #: Set while at least one endpoint is connected.
    connected_event: asyncio.Event = field(default_factory=asyncio.Event)
    #: Outlier ejection (shim.ejection): no traffic before this time.monotonic(); then,
    #: while ``trial_inflight`` is set, at most that many requests at once (a trickle).
    ejected_until: float = 0.0
    trial_inflight: int = 0
    #: Told of each request's outcome (backend name, True when a reply came), when set.
    on_result: Callable[[str, bool], None] | None = None
    #: time.monotonic() when the last endpoint went (or the pool started): a backend gone
    #: for less than the reconnect grace counts as restarting (see ``restart_wait_s``).
    down_since: float = field(default_factory=time.monotonic)

    def restart_wait_s(self, grace_s: float) -> float:
        """How long a request that only this backend can serve may wait for it to come
        back: what is left of ``grace_s`` since it went (0 when connected, or gone for
        longer: a retired backend is not waited for)."""
        if self.connected:
            return 0.0
        return max(0.0, grace_s - (time.monotonic() - self.down_since))

    def record_failure(self) -> None:
        self.failures += 1
        self.last_failure = time.monotonic()
        if self.on_result is not None:
            self.on_result(self.name, False)

    def record_success(self) -> None:
        self.failures = 0
        if self.on_result is not None:
            self.on_result(self.name, True)

    @property
    def dialect(self) -> str:
        return self.config.dialect

    @property
    def inflight(self) -> int:
        return sum(e.outstanding for e in self.endpoints)

    @property
    def connected(self) -> bool:
        return self.connected_endpoints > 0

    @property
    def healthy(self) -> bool:
        """Worth sending to: probes pass, requests are not failing, a peer is connected."""
        return (self.probe_ok and self.failures < self.failure_limit
                and self.connected_endpoints > 0
                and (not self.ejected_until or self._admitted()))

    def _admitted(self) -> bool:
        if time.monotonic() < self.ejected_until:
            return False
        return not self.trial_inflight or self.inflight < self.trial_inflight


class BackendPool:
    """Sends requests to backends and matches their replies."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ctx: zmq.Context[zmq.Socket[bytes]],
                 backends: dict[str, BackendConfig], health: HealthSection,
                 metrics: Metrics, *, max_reply_bytes: int = 32 << 20,
                 max_frame_bytes: int = 64 << 20) -> None:
        """``max_reply_bytes``: larger replies are refused (BackendBadReply);
        ``max_frame_bytes``: libzmq drops a backend connection that sends a larger frame
        (ZMQ_MAXMSGSIZE) rather than buffer it."""
        self._loop = loop
        self._max_reply = max_reply_bytes
        self._max_frame = max_frame_bytes
        self._ctx = ctx
        self._metrics = metrics
        self._ids = itertools.count(1)
        self._pending: dict[bytes, Pending] = {}
        #: Deadline tick -> ids of the pending requests due then (a dict: ordered, O(1) del).
        self._due: dict[int, dict[bytes, None]] = {}
        #: Heap of ticks with a bucket (ticks of buckets emptied since are skipped).
        self._ticks: list[int] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweep_at: float = math.inf  # tick the sweeper fires at: never after a bucket's
        self.backends: dict[str, Backend] = {}
        for name, cfg in backends.items():
            backend = Backend(name, cfg, failure_limit=health.request_failures)
            for address in cfg.endpoints:
                backend.endpoints.append(self._connect(backend, address))
            self.backends[name] = backend

    def _connect(self, backend: Backend, address: str) -> Endpoint:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a peer that is not there
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, self._max_frame)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        endpoint = Endpoint(address, backend, sock)
        endpoint.monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(address)
        endpoint.reader = BatchReader(self._loop, sock, lambda f: self._on_reply(endpoint, f))
        endpoint.monitor_reader = BatchReader(
            self._loop, endpoint.monitor, lambda f: self._on_monitor(endpoint, f), batch=16)
        endpoint.reader.start()
        endpoint.monitor_reader.start()
        return endpoint

    # -- sending ---------------------------------------------------------------------

    def request(self, backend_name: str, payload: bytes, timeout_s: float) -> asyncio.Future[bytes]:
        """Send ``payload`` to the least busy connected endpoint; the Future gets the reply.

        Raises BackendUnavailable at once when nothing could be sent, so the caller can
        fail over without waiting.
        """
        backend = self.backends[backend_name]
        endpoints = backend.endpoints
        if len(endpoints) == 1:
            endpoint: Endpoint | None = endpoints[0] if endpoints[0].connected else None
        else:
            endpoint = min((e for e in endpoints if e.connected),
                           key=lambda e: e.outstanding, default=None)
        if endpoint is None:
            raise BackendUnavailable(f"backend {backend_name} is not connected")
        return self._send(endpoint, backend_name, (payload,), timeout_s)

    def request_frames(self, backend_name: str, frames: list[bytes],
                       timeout_s: float) -> asyncio.Future[list[bytes]]:
        """Like ``request`` for opaque traffic: any number of frames out, and the reply's
        frames (every frame after the delimiter, however many) back, unchanged."""
        backend = self.backends[backend_name]
        endpoint = min((e for e in backend.endpoints if e.connected),
                       key=lambda e: e.outstanding, default=None)
        if endpoint is None:
            raise BackendUnavailable(f"backend {backend_name} is not connected")
        multi: asyncio.Future[list[bytes]] = self._loop.create_future()
        self._send(endpoint, backend_name, tuple(frames), timeout_s, multi)
        return multi

    def _send(self, endpoint: Endpoint, backend_name: str, body: tuple[bytes, ...],
              timeout_s: float, multi: asyncio.Future[list[bytes]] | None = None,
              ) -> asyncio.Future[bytes]:
        corr = next(self._ids).to_bytes(8, "big")
        try:
            send_frames(endpoint.sock, (corr, b"", *body))
        except zmq.ZMQError as exc:
            raise BackendUnavailable(f"backend {backend_name}: cannot send ({exc})") from None
        assert endpoint.reader is not None
        endpoint.reader.kick()
        future: asyncio.Future[bytes] = self._loop.create_future()
        tick = math.ceil((self._loop.time() + timeout_s) * _TICKS)
        bucket = self._due.get(tick)
        if bucket is None:
            bucket = self._due[tick] = {}
            heappush(self._ticks, tick)
            if tick < self._sweep_at:
                self._arm(tick)
        bucket[corr] = None
        self._pending[corr] = Pending(future, endpoint, tick, multi)
        if multi is not None:  # errors reach the frames future; the bytes one is unused
            future.add_done_callback(lambda f: _relay(f, multi))
        endpoint.outstanding += 1
        return future

    @property
    def inflight(self) -> int:
        return len(self._pending)

    async def wait_connected(self, backend_name: str, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until the backend has a connected endpoint."""
        event = self.backends[backend_name].connected_event
        if not event.is_set() and timeout_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout_s)
        return event.is_set()

    # -- receiving -------------------------------------------------------------------

    def _on_reply(self, endpoint: Endpoint, frames: Frames) -> None:
        pending = self._pending.pop(frames[0], None) if frames else None
        if pending is None:
            self._metrics.late_replies.labels(endpoint.backend.name).inc()
            return
        self._settle(frames[0], pending)
        endpoint.backend.record_success()
        if pending.future.done():  # its caller gave up (cancelled)
            return
        if pending.frames is not None and len(frames) >= 3 and not frames[1]:
            if not pending.frames.done():
                pending.frames.set_result(list(frames[2:]))
            pending.future.set_result(b"")
        elif len(frames) != 3 or frames[1]:
            pending.future.set_exception(BackendBadReply(
                f"backend {endpoint.backend.name} sent {len(frames)} frames, expected 3"))
        elif len(frames[2]) > self._max_reply:
            self._metrics.dropped_replies.labels("backend_too_large").inc()
            pending.future.set_exception(BackendBadReply(
                f"backend {endpoint.backend.name} sent a reply of {len(frames[2])} bytes, "
                f"over the {self._max_reply} byte cap (shim.max_reply_bytes)"))
        else:
            pending.future.set_result(frames[2])

    # -- deadlines ------------------------------------------------------------------

    def _arm(self, tick: int) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._sweep_at = tick
        self._sweeper = self._loop.call_at(tick / _TICKS, self._sweep)

    def _sweep(self) -> None:
        """Expire the buckets whose time has come, earliest first; re-arm for the next."""
        self._sweeper, self._sweep_at = None, math.inf
        # A timer may fire up to a tick early (the loop rounds to milliseconds).
        now = self._loop.time() * _TICKS + 1
        ticks = self._ticks
        while ticks and (ticks[0] <= now or ticks[0] not in self._due):
            for corr in self._due.pop(heappop(ticks), ()):
                self._expire(corr)
        if ticks:
            self._arm(ticks[0])

    def _expire(self, corr: bytes) -> None:
        pending = self._pending.pop(corr, None)
        if pending is None:
            return
        self._settle(corr, pending)
        backend = pending.endpoint.backend
        backend.record_failure()
        self._metrics.timeouts.labels(backend.name).inc()
        if not pending.future.done():
            pending.future.set_exception(
                BackendTimeout(f"backend {backend.name} did not answer in time"))

    def _settle(self, corr: bytes, pending: Pending) -> None:
        pending.endpoint.outstanding -= 1
        bucket = self._due.get(pending.tick)
        if bucket is not None:  # (None: the sweep has taken the bucket)
            del bucket[corr]
            if not bucket:
                del self._due[pending.tick]

    def _on_monitor(self, endpoint: Endpoint, frames: Frames) -> None:
        event = parse_monitor_message(frames)["event"]
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED and not endpoint.connected:
            endpoint.connected = True
            endpoint.backend.connected_endpoints += 1
            endpoint.backend.connected_event.set()
            log.info("backend %s connected at %s", endpoint.backend.name, endpoint.address)
        elif event == zmq.EVENT_DISCONNECTED:
            if endpoint.connected:
                endpoint.connected = False
                endpoint.backend.connected_endpoints -= 1
                if not endpoint.backend.connected_endpoints:
                    endpoint.backend.connected_event.clear()
                    endpoint.backend.down_since = time.monotonic()
            log.warning("backend %s disconnected at %s", endpoint.backend.name, endpoint.address)
            self._fail_endpoint(endpoint)

    def _fail_endpoint(self, endpoint: Endpoint) -> None:
        """The peer is gone: its requests will never be answered, fail them now."""
        lost = [corr for corr, p in self._pending.items() if p.endpoint is endpoint]
        if lost:
            endpoint.backend.record_failure()
        for corr in lost:
            pending = self._pending.pop(corr)
            self._settle(corr, pending)
            if not pending.future.done():
                pending.future.set_exception(BackendLost(
                    f"backend {endpoint.backend.name} went away with the request in flight"))

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        """Fail what is pending and close every socket."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper, self._sweep_at = None, math.inf
        self._ticks.clear()
        for corr in list(self._pending):
            pending = self._pending.pop(corr)
            self._settle(corr, pending)
            if not pending.future.done():
                pending.future.set_exception(BackendUnavailable("shim shutting down"))
        for backend in self.backends.values():
            for endpoint in backend.endpoints:
                for reader in (endpoint.reader, endpoint.monitor_reader):
                    if reader is not None:
                        reader.stop()
                endpoint.sock.disable_monitor()
                if endpoint.monitor is not None:
                    endpoint.monitor.close(0)
                endpoint.sock.close(0)


def _relay(source: asyncio.Future[bytes], target: asyncio.Future[list[bytes]]) -> None:
    """A failed (or cancelled) opaque request fails its frames future the same way."""
    if target.done():
        return
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]

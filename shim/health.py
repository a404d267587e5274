"""Backend health: active probes of each backend's health socket, and the shim's own.

Each backend is probed in its own dialect (``Dialect.health_request``, read back with
``Dialect.read_health``; shim.dialects.base). Probing is Lazy Pirate: a REQ socket, a
bounded wait, and on silence the socket is thrown away (a REQ that missed its reply can
never send again) and a new one made. A backend is marked down after ``probe_failures``
silent probes in a row and up again on the first answer. The last health reply is kept:
its VRAM figures feed the combined view in the shim's own health reply and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from shim import dialects
from shim.config import HealthSection
from shim.dialects.base import HealthView
from shim.metrics import Metrics
from shim.pool import Backend, BackendPool
from shim.sockets import bind_or_explain

log = logging.getLogger("mmshim.health")


class HealthProber:
    """Probes every backend that has a health endpoint, forever, until stopped."""

    def __init__(self, ctx: zmq.asyncio.Context, pool: BackendPool, cfg: HealthSection,
                 metrics: Metrics) -> None:
        self._ctx = ctx
        self._pool = pool
        self._cfg = cfg
        self._metrics = metrics
        self.last_reply: dict[str, dict[str, Any]] = {}
        #: The last health reply of each backend, read in the backend's dialect.
        self.views: dict[str, HealthView] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for backend in self._pool.backends.values():
            if backend.config.health:
                self._tasks.append(asyncio.create_task(self._probe_forever(backend)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _probe_forever(self, backend: Backend) -> None:
        misses = 0
        dialect = dialects.get(backend.config.dialect)
        sock = self._socket(backend)
        try:
            while True:
                started = time.monotonic()
                reply = await self._probe(sock, dialect.health_request)
                if reply is None:
                    sock.close(0)
                    sock = self._socket(backend)
                    misses += 1
                    if misses >= self._cfg.probe_failures and backend.probe_ok:
                        log.warning("backend %s failed %d health probes: marked down",
                                    backend.name, misses)
                        backend.probe_ok = False
                else:
                    if not backend.probe_ok:
                        log.info("backend %s answers its health probe again", backend.name)
                    misses = 0
                    backend.probe_ok = True
                    # Half-open: a backend tripped by failing requests gets traffic again
                    # once its probes have passed for a few intervals without new failures.
                    if time.monotonic() - backend.last_failure > 3 * self._cfg.interval_ms / 1000:
                        backend.failures = 0
                    self.last_reply[backend.name] = reply
                    view = self.views[backend.name] = dialect.read_health(reply)
                    self._record_vram(backend.name, view)
                self._metrics.backend_up.labels(backend.name).set(1 if backend.healthy else 0)
                elapsed = time.monotonic() - started
                await asyncio.sleep(max(0.0, self._cfg.interval_ms / 1000 - elapsed))
        finally:
            sock.close(0)

    def _socket(self, backend: Backend) -> zmq.asyncio.Socket:
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(backend.config.health)
        return sock

    async def _probe(self, sock: zmq.asyncio.Socket, request: bytes) -> dict[str, Any] | None:
        await sock.send(request)
        if not await sock.poll(self._cfg.timeout_ms):
            return None
        try:
            reply = msgspec.json.decode(await sock.recv())
        except msgspec.DecodeError:
            return {}
        return reply if isinstance(reply, dict) else {}

    def _record_vram(self, name: str, view: HealthView) -> None:
        if view.vram_used_mb is not None:
            self._metrics.vram_used.labels(name).set(view.vram_used_mb)
        if view.vram_budget_mb is not None:
            self._metrics.vram_budget.labels(name).set(view.vram_budget_mb)


def vram_of(reply: dict[str, Any]) -> tuple[float | None, float | None]:
    """VRAM used/budget MB from an MMA or MMS health reply, when present. Kept for callers
    that hold only the reply; ``HealthProber.views`` has them read in each backend's own
    dialect (any registered one)."""
    found = reply.get("details")
    details: dict[str, Any] = found if isinstance(found, dict) else {}
    used = reply.get("vram_used_mb", details.get("vram_used_mb"))
    budget = reply.get("vram_budget_mb", details.get("vram_budget_mb"))
    return (float(used) if isinstance(used, int | float) else None,
            float(budget) if isinstance(budget, int | float) else None)


class HealthServer:
    """The shim's health socket, in the MMA health shape: any bytes get the reply."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, describe: Any, *,
                 max_frame_bytes: int = 64 << 20) -> None:
        self._sock = ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)  # faces the network
        bind_or_explain(self._sock, endpoint, "health")  # type: ignore[arg-type]
        self._describe = describe
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            await self._sock.recv_multipart()
            await self._sock.send(msgspec.json.encode(self._describe()))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sock.close(0)

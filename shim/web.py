"""The shim's HTTP listener: ``/metrics``, the status page and ``/api/status``.

One aiohttp server (https://docs.aiohttp.org/en/stable/web_reference.html) running in the
shim's own event loop (uvloop works: aiohttp only needs an asyncio loop), on
``shim.metrics`` (``host:port``; loopback by default). Read-only: only GET and HEAD are
routed, every other method gets 405; changes stay on the admin socket.

Routes:
- ``GET /metrics``: the Prometheus text format (``prometheus_client.generate_latest``).
- ``GET /`` (and ``/status``): the status page, a static HTML file with its own script
  (no CDN) that polls ``/api/status`` every second and draws its charts on canvas.
- ``GET /api/status``: ``shim.status.StatusBoard.describe()`` as JSON.

Bounded: at most ``MAX_CONCURRENT`` requests are handled at once (more get 503 at once),
request bodies are refused beyond ``MAX_BODY_BYTES``, idle keep-alive connections close
after ``KEEPALIVE_S`` and the listen backlog is ``BACKLOG``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from importlib import resources

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from shim.errors import EndpointInUse
from shim.status import StatusBoard

log = logging.getLogger("mmshim.web")

MAX_CONCURRENT = 16
MAX_BODY_BYTES = 1024
KEEPALIVE_S = 5.0
BACKLOG = 64

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def split_address(address: str) -> tuple[str, int]:
    """``"127.0.0.1:9570"`` -> ``("127.0.0.1", 9570)``; no host means loopback.
    Raises ValueError for a missing or bad port."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    return host, int(port)


def page_html() -> bytes:
    """The status page, shipped as package data (shim/static/status.html)."""
    return resources.files("shim").joinpath("static/status.html").read_bytes()


class WebServer:
    """The HTTP listener; ``start()`` binds (EndpointInUse when it cannot), ``stop()``."""

    def __init__(self, registry: CollectorRegistry, address: str, board: StatusBoard) -> None:
        """``registry``: what ``/metrics`` exposes; ``board``: what ``/api/status`` shows
        (both providers, built by shim.app); ``address``: ``host:port``."""
        self._registry = registry
        self.address = address
        self.board = board
        self._runner: web.AppRunner | None = None
        self._busy = 0
        self._page = page_html()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._bounded])
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._status_page)
        app.router.add_get("/status", self._status_page)
        app.router.add_get("/api/status", self._api_status)
        return app

    async def start(self) -> None:
        host, port = split_address(self.address)
        self._runner = web.AppRunner(self.app(), access_log=None, keepalive_timeout=KEEPALIVE_S,
                                     handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, backlog=BACKLOG, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise EndpointInUse(f"metrics address {self.address} is already in use or not "
                                f"bindable ({exc.strerror})") from None
        self.board.start()

    async def stop(self) -> None:
        await self.board.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _bounded(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._busy >= MAX_CONCURRENT:
            return web.Response(status=503, text="busy\n", headers={"Retry-After": "1"})
        self._busy += 1
        try:
            return await handler(request)
        finally:
            self._busy -= 1

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _status_page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-cache"})

    async def _api_status(self, request: web.Request) -> web.Response:
        doc = self.board.describe()
        return web.Response(body=msgspec.json.encode(doc, enc_hook=str),
                            content_type="application/json",
                            headers={"Cache-Control": "no-store"})

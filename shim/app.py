"""The composition root: builds a running shim (the proxy, its health socket, probes,
metrics, addons, the control plane) and is the process entry point (``mmshim``,
``python -m shim``). Nothing imports this module; it imports the rest.

The control plane (shim.control) never sees the ``Shim``: it gets the ``RuntimeStore``,
the ``AddonManager`` and narrow providers built here (``_DataPlaneView``).
"""

from __future__ import annotations

import sys

from shim import signals

# `mmshim run` (the console script enters here): a SIGHUP or SIGTERM while the imports
# below load must not kill us (shim.signals).
if sys.argv[1:2] == ["run"]:
    signals.hold()

import argparse
import asyncio
import ctypes
import ctypes.util
import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from shim.addons.base import Addon, AddonManager
from shim.addons.loaded import LoadedModels
from shim.addons.metrics import RequestMetrics
from shim.addons.ownership import Ownership
from shim.addons.record import Recorder
from shim.addons.shadow import Shadow
from shim.admin import AdminServer, audit_path, resolve_token
from shim.audit import AuditLog
from shim.cli import _load, _setup_logging
from shim.cli import main as cli_main
from shim.config import ShimConfig
from shim.control import Controller
from shim.curve import resolve_server
from shim.ejection import Ejector
from shim.errors import ConfigError, EndpointInUse
from shim.health import HealthProber, HealthServer
from shim.metrics import Metrics
from shim.proxy import Proxy
from shim.rollout import RolloutEngine
from shim.runtime import Runtime, RuntimeStore, runtime_from_config
from shim.state import StateFile, clean_stale
from shim.status import StatusBoard
from shim.web import WebServer

log = logging.getLogger("mmshim")


class Shim:
    """Everything ``mmshim run`` starts, with one ``serve`` coroutine that owns it."""

    def __init__(self, cfg: ShimConfig, config_path: Path | None = None, *,
                 serve_metrics: bool = True, reset_state: bool = False) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.started = time.time()
        self.metrics = Metrics()
        #: The Runtime in force (the control plane swaps it; the proxy follows it).
        self.store = RuntimeStore(runtime_from_config(cfg))
        #: The addons, in hook order: the proxy calls their data-path hooks, the
        #: Controller their control-plane hooks.
        self.addons = AddonManager(on_error=self.metrics.addon_failed)
        self.loaded: LoadedModels | None = None
        self._serve_metrics = serve_metrics
        self._reset_state = reset_state
        self._stop = asyncio.Event()
        self._reload_requested = False
        self._ready = False
        #: Set by ``mmshim run``: the process exits after the drain, so the drain may hand
        #: the listening socket back at once (shim.drain).
        self.exit_after_drain = False
        self._gc_task: asyncio.Task[None] | None = None
        self.ctx = zmq.asyncio.Context()
        self._sync_ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(self.ctx.underlying)
        self.proxy: Proxy | None = None
        self.prober: HealthProber | None = None
        self.health: HealthServer | None = None
        self.ownership: Ownership | None = None
        self.ejector: Ejector | None = None
        self.shadow: Shadow | None = None
        self.recorder: Recorder | None = None
        self.web: WebServer | None = None
        #: The rollout engine (shim.rollout), added by build_shim.
        self.rollout: RolloutEngine | None = None
        #: The control plane (shim.control), added by build_shim.
        self.controller: Controller | None = None
        self.extras: list[Any] = []  # admin server, ownership, shadow: started and stopped with us
        self.audit: AuditLog | None = None
        #: Called on SIGHUP (set by add_control_plane: reload the config file).
        self.on_reload: Callable[[], None] | None = None

    async def serve(self) -> int:
        """Bind everything, serve until SIGTERM/SIGINT, drain, close. Returns an exit code."""
        loop = asyncio.get_running_loop()
        self._install_signals(loop)
        for sig in signals.take():  # arrived during start-up (shim.signals)
            self._on_sighup() if sig == signal.SIGHUP else self.stop()
        try:
            self.proxy = Proxy(self.cfg, loop, self._sync_ctx, self.metrics, store=self.store,
                               addons=self.addons)
            self.proxy.release_on_drain = self.exit_after_drain
            self.health = HealthServer(self.ctx, self.cfg.shim.health, self.health_reply,
                                       max_frame_bytes=self.cfg.shim.max_frame_bytes)
            self.prober = HealthProber(self.ctx, self.proxy.pool, self.cfg.health, self.metrics)
            if self.cfg.ejection.enabled:
                self.ejector = Ejector(self.proxy.pool.backends, self.cfg.ejection,
                                       self.metrics)
            self._plug_addons(self.proxy)
            await self._start_extras()
            if self._serve_metrics and self.cfg.shim.metrics:
                # /metrics, the status page and /api/status, in this loop (shim.web).
                self.web = WebServer(self.metrics.registry, self.cfg.shim.metrics,
                                     StatusBoard(self))
                await self.web.start()
        except Exception:
            await self._close()
            raise
        # Everything built so far lives as long as the process: keep it out of the
        # collector's scans, which otherwise grow with every request's garbage.
        gc.collect()
        gc.freeze()
        self.prober.start()
        self.health.start()
        self.proxy.start()
        if self.cfg.shim.gc_interval_s > 0:
            self._gc_task = loop.create_task(self._collect_forever(self.cfg.shim.gc_interval_s))
        self._ready = True
        if self._reload_requested:
            self._reload_requested = False
            self._on_sighup()
        log.info("mmshim listening on %s (health %s, metrics %s); weights %s, mode %s",
                 self.cfg.shim.listen, self.cfg.shim.health, self.cfg.shim.metrics,
                 self.proxy.runtime.weights, self.proxy.runtime.mode)
        await self._stop.wait()
        log.info("shutting down: draining %d requests in flight", self.proxy.inflight)
        cut = await self.proxy.drain(self.cfg.shim.drain_timeout_s,
                                     self.cfg.shim.drain_quiet_ms / 1000)
        if cut:
            log.warning("%d requests did not finish in time and got an error reply", cut)
        await self._close(linger_ms=1000)
        return 0

    async def _collect_forever(self, interval_s: float) -> None:
        """A full collection now and then: memory held only by reference cycles (an
        exception, its traceback, the frames and the large payloads they reference) is
        freed within ``interval_s`` instead of whenever generation 2 next runs. Then the
        C allocator gives its free memory back (glibc ``malloc_trim``: after a large
        frame is freed, glibc raises its mmap threshold and keeps later large buffers
        on the heap, where freeing them does not shrink the process)."""
        trim = _malloc_trim()
        while True:
            await asyncio.sleep(interval_s)
            gc.collect()
            if trim is not None:
                trim(0)

    def _plug_addons(self, proxy: Proxy) -> None:
        """Behaviour beyond moving requests, in hook order: ownership routes first; the
        shared loaded-models poller starts before the addons that read it."""
        cfg, store, transport = self.cfg, self.store, proxy.transport
        self.addons.add(RequestMetrics(self.metrics, store, proxy.pool.backends))
        ownership_on = cfg.ownership.enabled
        self.loaded = LoadedModels(
            transport, cfg.ownership.poll_interval_ms / 1000, metrics=self.metrics,
            active=lambda: ownership_on or store.current.mode == "shadow",
            first_poll_s=min(2.0, max(b.timeout_ms for b in cfg.backends.values()) / 1000
                             + 1.0))
        self.addons.add(self.loaded)
        self.extras.insert(0, self.loaded)
        if ownership_on:
            self.ownership = Ownership(transport, cfg.ownership, store=store,
                                       loaded=self.loaded, metrics=self.metrics)
            self.ownership.audit = self.audit  # duplicate repairs leave an audit line
            self.addons.add(self.ownership)
            self.extras.insert(1, self.ownership)
        # Shadow last: it only looks at exchanges that are over (after_reply).
        self.shadow = Shadow(transport, cfg, store=store, metrics=self.metrics,
                             loaded=self.loaded, ownership=self.ownership, ctx=self._sync_ctx)
        self.addons.add(self.shadow)
        self.addons.add(_ShadowSettings(self.shadow, self))
        self.extras.append(self.shadow)
        # Recording: only looks at finished exchanges too (off unless started).
        self.recorder = Recorder(cfg.record, self.metrics, cfg.routing.sticky_key)
        self.addons.add(self.recorder)
        self.extras.append(self.recorder)
        if self.ejector is not None:
            self.addons.add(_Described("ejector", self.ejector))
        if self.rollout is not None:
            self.addons.add(self.rollout)

    @property
    def sync_ctx(self) -> zmq.Context[zmq.Socket[bytes]]:
        """A synchronous context sharing the asyncio one's I/O threads."""
        return self._sync_ctx

    async def _start_extras(self) -> None:
        """Hook for addons and the admin socket (see build_shim)."""
        for extra in self.extras:
            start = getattr(extra, "start", None)
            if start is not None:
                result = start()
                if asyncio.iscoroutine(result):
                    await result

    async def _close(self, linger_ms: int = 0) -> None:
        if self._gc_task is not None:
            self._gc_task.cancel()
        if self.web is not None:
            await self.web.stop()
        for extra in reversed(self.extras):
            stop = getattr(extra, "stop", None)
            if stop is not None:
                result = stop()
                if asyncio.iscoroutine(result):
                    await result
        if self.prober is not None:
            await self.prober.stop()
        if self.health is not None:
            await self.health.stop()
        if self.proxy is not None:
            self.proxy.close(linger_ms)  # replies still queued get linger_ms to go out
        if self.proxy is not None and self.proxy.listener_released:
            return  # libzmq must not close the frontend (shim.drain): the process exits
        self.ctx.destroy(linger=0)

    def stop(self) -> None:
        self._stop.set()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_sighup(self) -> None:
        if not self._ready:  # start-up is not finished: reload once it is
            self._reload_requested = True
            return
        if self.on_reload is None:
            log.warning("SIGHUP ignored: nothing to reload")
        else:
            log.info("SIGHUP: reloading %s", self.config_path)
            self.on_reload()

    def health_reply(self) -> dict[str, Any]:
        """What the health socket answers anyone: the legacy MMA health fields only
        (protocol.md, MMA dialect, health), unless ``shim.health_details`` is on.
        Weights, mode, per-backend state and VRAM are in the admin ``status``."""
        full = self.describe_health()
        if self.cfg.shim.health_details:
            return full
        details = full["details"]
        return {"status": full["status"],
                "details": {"status_message": details["status_message"],
                            "uptime_seconds": details["uptime_seconds"]}}

    def describe_health_if_probing(self) -> dict[str, Any] | None:
        """``describe_health()`` once the prober runs, else None (for ``status``)."""
        return self.describe_health() if self.prober is not None else None

    def describe_health(self) -> dict[str, Any]:
        """The shim's health reply, in the MMA health shape, backends under ``details``."""
        assert self.proxy is not None and self.prober is not None
        rt = self.proxy.runtime
        backends: dict[str, Any] = {}
        used_total = budget_total = 0.0
        for name, backend in self.proxy.pool.backends.items():
            view = self.prober.views.get(name)  # read in the backend's own dialect
            used, budget = (view.vram_used_mb, view.vram_budget_mb) if view else (None, None)
            if self.ownership is not None and name in self.ownership.vram:
                used, budget = self.ownership.vram[name]  # from the loaded-models poll
            used_total += used or 0.0
            budget_total += budget or 0.0
            backends[name] = {
                "healthy": backend.healthy,
                "weight": rt.weights.get(name, 0.0),
                "inflight": backend.inflight,
                "vram_used_mb": used,
                "vram_budget_mb": budget,
            }
        serving = any(b["healthy"] for b in backends.values())
        return {
            "status": "ok" if serving and self.proxy.accepting and not self.proxy.draining
            else "error",
            "details": {
                "status_message": "mmshim is proxying the model manager." if serving
                else "No backend can serve requests.",
                "uptime_seconds": round(time.time() - self.started, 3),
                "mode": rt.mode,
                "backends": backends,
                "vram": {"used_mb": used_total, "budget_mb": budget_total},
            },
        }


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on another C library."""
    try:
        fn: Callable[[int], int] = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6",
                                               use_errno=True).malloc_trim
    except (OSError, AttributeError):
        return None
    return fn


class _DataPlaneView:
    """shim.control's ``DataPlane`` over this shim's proxy (None until it starts)."""

    def __init__(self, shim: Shim) -> None:
        self._shim = shim

    def inflight_of(self, backend: str) -> int:
        proxy = self._shim.proxy
        b = proxy.pool.backends.get(backend) if proxy is not None else None
        return b.inflight if b is not None else 0

    def describe(self) -> dict[str, Any]:
        proxy = self._shim.proxy
        if proxy is None:
            return {"backends": {}, "inflight": 0, "accepting": False, "counts": {}}
        proxy.metrics.refresh()
        return {
            "backends": {name: {"dialect": b.dialect, "healthy": b.healthy,
                                "inflight": b.inflight}
                         for name, b in proxy.pool.backends.items()},
            "inflight": proxy.inflight,
            "accepting": proxy.accepting,
            "counts": dict(proxy.counts),
        }


class _Described(Addon):
    """A component that is not on the data path but shows in ``status`` (the ejector)."""

    def __init__(self, name: str, component: Ejector) -> None:
        self.name = name
        self._component = component

    def describe(self) -> dict[str, Any]:
        return dict(self._component.describe())


class _ShadowSettings(Addon):
    """A reload's diff-log settings for the shadow addon (its compare rules come with
    the Runtime, ``flow.rt.compare``; the diff log's path and rotation are file
    settings the Controller keeps in ``file_cfg``)."""

    name = "shadow_settings"

    def __init__(self, shadow: Shadow, shim: Shim) -> None:
        self._shadow = shadow
        self._shim = shim
        self._settings = shim.cfg.shadow

    def runtime_changed(self, old: Runtime, new: Runtime) -> None:
        controller = self._shim.controller
        settings = controller.file_cfg.shadow if controller is not None else self._settings
        if settings != self._settings:
            self._settings = settings
            self._shadow.reload(settings)


def add_control_plane(shim: Shim, *, reset_state: bool = False,
                      env: Mapping[str, str] = os.environ) -> Controller:
    """Give a Shim its control plane: the Controller (saved state, SIGHUP reload) always,
    and the admin socket when ``shim.admin`` is set. Raises ConfigError when the admin
    socket would be open to the network without a token, or without CURVE (shim.curve)."""
    section = shim.cfg.shim
    for stale in clean_stale(Path(section.state_file).parent):
        log.warning("removed %s, left by an interrupted write", stale)
    audit = AuditLog(audit_path(section))
    controller = Controller(shim.store, shim.addons, StateFile(Path(section.state_file)),
                            audit, cfg=shim.cfg, dataplane=_DataPlaneView(shim),
                            metrics=shim.metrics, config_path=shim.config_path,
                            health=shim.describe_health_if_probing, started=shim.started,
                            reset_state=reset_state)
    shim.controller = controller
    shim.audit = audit
    shim.extras.append(controller)
    shim.on_reload = controller.reload_from_signal
    if section.admin:
        token = resolve_token(section, env)
        curve = resolve_server(section)
        shim.extras.append(AdminServer(shim.ctx, section.admin, token, controller,
                                       shim.metrics, curve))
    return controller


def build_shim(cfg: ShimConfig, config_path: Path | None = None, *,
               reset_state: bool = False, serve_metrics: bool = True) -> Shim:
    """A Shim with every addon this config asks for.

    Raises ConfigError when the admin socket would be open to the network without a token.
    """
    shim = Shim(cfg, config_path, reset_state=reset_state, serve_metrics=serve_metrics)
    controller = add_control_plane(shim, reset_state=reset_state)
    engine = RolloutEngine(shim, controller)
    shim.extras.append(engine)
    shim.rollout = engine  # added to the addons with the others (Shim._plug_addons)
    return shim


def run_shim(shim: Shim) -> int:
    """Run a Shim on uvloop when it is installed, else on the default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(shim.serve())
    return uvloop.run(shim.serve())


def cmd_run(args: argparse.Namespace) -> int:
    """``mmshim run``: serve until SIGTERM/SIGINT. Exit codes: 2 bad config or refused
    start, 3 an endpoint in use."""
    _setup_logging(args.log_level)
    cfg = _load(args.config)
    try:
        shim = build_shim(cfg, Path(args.config), reset_state=args.reset_state)
    except ConfigError as exc:  # e.g. a non-loopback admin socket without a token
        print(f"mmshim: refusing to start: {exc}", file=sys.stderr)
        return 2
    shim.exit_after_drain = True  # see below
    try:
        code = run_shim(shim)
    except EndpointInUse as exc:
        print(f"mmshim: {exc}", file=sys.stderr)
        return 3
    if shim.proxy is not None and shim.proxy.listener_released:
        # Drained with the listener handed back (shim.drain): libzmq must not tear the
        # frontend down, so exit here, everything else closed and flushed.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    """The ``mmshim`` command: shim.cli's subcommands, with ``run`` served from here."""
    return cli_main(argv, run=cmd_run)


if __name__ == "__main__":
    raise SystemExit(main())

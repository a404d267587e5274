"""Service plumbing both backends share: sockets, envelopes, decoding, CLI and shutdown.

The main socket is a ROUTER, so REQ clients, DEALER clients sending ``["", payload]`` and
a proxy adding a correlation frame (``[id, corr, "", payload]``) are all answered with the
envelope they sent, and many requests can be in flight at once. Each request is one
asyncio task; blocking work (loads, generation) goes to the ledger's executor, so a status
query is answered while a model loads. Health is a separate REP socket that answers any
bytes. A dialect (``backends.mma``, ``backends.mms``) only maps a decoded request to a
reply; everything about transport lives here, stated once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Protocol

import msgspec
import zmq
import zmq.asyncio

from backends.ledger import (
    LEDGER_THREAD_PREFIX,
    ModelState,
    NotLoaded,
    OnFull,
    VramLedger,
    detect_budget,
)
from backends.registry import Registry, RegistryError
from shim.sockets import split_envelope as _split

log = logging.getLogger(__name__)

#: Payloads larger than this are answered with an error instead of being parsed.
MAX_REQUEST_BYTES = 4 * 1024 * 1024
#: Requests being handled at once; beyond this new ones are answered "overloaded" at once.
MAX_IN_FLIGHT = 1024
#: On shutdown, how long requests in flight may finish before being answered with an error.
DRAIN_S = 0.3
#: After the loop ends, how long to wait for executor threads (a load cannot be interrupted).
THREAD_EXIT_S = 0.5
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODELS = Path("config/models.toml")
#: A request field that forbids loading: set by the shim on mirrored (shadow) copies, so
#: that a copy never loads a model, keeps a conversation or counts as usage.
NO_LOAD_FIELD = "shim_no_load"


def no_load(request: dict[str, Any]) -> bool:
    """Does the request carry ``NO_LOAD_FIELD`` = true?"""
    return request.get(NO_LOAD_FIELD) is True


# -- requests ----------------------------------------------------------------------------


class BadRequest(ValueError):
    """A payload that is not a JSON object within the size limit; ``str()`` says why."""


class NotAnObject(BadRequest):
    """Valid JSON, but not an object (each dialect has its own words for this)."""


def decode_request(payload: bytes, limit: int = MAX_REQUEST_BYTES) -> dict[str, Any]:
    """Parse one request frame into a dict, or raise ``BadRequest``."""
    if len(payload) > limit:
        raise BadRequest(f"Request too large: {len(payload)} bytes (limit {limit})")
    try:
        value = msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"Invalid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise NotAnObject(f"Request must be a JSON object, got {type(value).__name__}")
    return value


def split_envelope(frames: Sequence[bytes]) -> tuple[list[bytes], list[bytes]] | None:
    """ROUTER frames -> (envelope up to and including the empty delimiter, body frames).

    Without a delimiter, ``[identity, payload]`` (a bare DEALER) is answerable with the
    envelope ``[identity]``; anything longer cannot be split reliably: None (drop it).
    """
    split = _split(frames)  # the one rule (shim.sockets.split_envelope)
    if split is not None:
        return split
    if len(frames) == 2:
        return [frames[0]], [frames[1]]
    return None


class GenParams(msgspec.Struct, kw_only=True):
    """Generation parameters as both dialects accept them (unknown keys are ignored)."""

    max_tokens: Annotated[int, msgspec.Meta(ge=0)] = 256
    temperature: Annotated[float, msgspec.Meta(ge=0)] = 0.7
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.95
    stop: list[str] | str | None = None
    seed: int | None = None

    def stops(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def parse_params(raw: Any, **defaults: Any) -> GenParams:
    """Validate generation parameters; the ``BadRequest`` message names the bad field."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise BadRequest("Invalid params: expected an object")
    fields = set(GenParams.__struct_fields__)
    merged = {**defaults, **{k: v for k, v in raw.items() if k in fields and v is not None}}
    try:
        return msgspec.convert(merged, GenParams)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"Invalid params: {exc}") from exc


# -- the shared core of a backend --------------------------------------------------------


class Counters(msgspec.Struct, kw_only=True):
    """Request counters a dialect reports in its health and stats replies."""

    requests_total: int = 0
    errors_total: int = 0
    bad_requests: int = 0
    dropped_frames: int = 0
    generations: int = 0
    tokens_generated: int = 0


class ServiceCore:
    """What both dialects share: registry, ledger, device, uptime and counters."""

    def __init__(
        self,
        registry: Registry,
        *,
        on_full: OnFull,
        vram_mb: int | None = None,
        idle_unload_s: float | None = None,
        ledger: VramLedger | None = None,
    ) -> None:
        self.registry = registry
        budget, self.device = detect_budget(registry.budget, vram_mb)
        self.ledger = ledger or VramLedger(
            registry, budget_mb=budget, on_full=on_full, idle_unload_s=idle_unload_s
        )
        self.counters = Counters()
        self._started = time.monotonic()

    def uptime(self) -> float:
        """Seconds since start."""
        return round(time.monotonic() - self._started, 3)

    async def generate(self, model: str, prompt: str, params: GenParams,
                       *, no_load: bool = False) -> tuple[str, int]:
        """Load ``model`` if needed (per the ledger's policy) and generate in the executor.

        ``no_load`` (a request carrying ``NO_LOAD_FIELD``, as the shim's shadow copies do):
        never load, and leave no usage record; raises ``LedgerError`` when the model is not
        online already.
        """
        if no_load and self.ledger.entry(model).state is not ModelState.ONLINE:
            raise NotLoaded(f"Model {model} is not loaded and this request may not load it")
        async with self.ledger.use(model) as handle:
            text, tokens = await self.ledger.run_in_executor(
                handle.generate,
                prompt,
                params.max_tokens,
                params.temperature,
                params.top_p,
                params.stops(),
                params.seed,
            )
        if not no_load:
            self.counters.generations += 1
            self.counters.tokens_generated += tokens
        return str(text), int(tokens)


class Dialect(Protocol):
    """One wire dialect: maps request bytes to a reply object."""

    core: ServiceCore

    async def handle(self, payload: bytes) -> dict[str, Any]:
        """Answer one request frame; must not raise for bad input."""
        ...

    def error_reply(self, message: str) -> dict[str, Any]:
        """The dialect's generic error reply (framing errors, internal errors)."""
        ...

    def health(self) -> dict[str, Any]:
        """The health socket's reply."""
        ...


# -- serving -----------------------------------------------------------------------------


class Server:
    """Binds a dialect to its main (ROUTER) and health (REP) sockets and serves it."""

    def __init__(self, dialect: Dialect, *, host: str, port: int, health_port: int) -> None:
        self.dialect = dialect
        self.endpoint = f"tcp://{host}:{port}"
        self.health_endpoint = f"tcp://{host}:{health_port}"
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self, stop: asyncio.Event, *, handle_signals: bool = False) -> None:
        """Serve until ``stop`` is set (or SIGTERM/SIGINT if ``handle_signals``), then clean
        up: cancel requests, unload models, close sockets with linger 0."""
        ctx = zmq.asyncio.Context()
        router = ctx.socket(zmq.ROUTER)
        health = ctx.socket(zmq.REP)
        loop = asyncio.get_running_loop()
        core = self.dialect.core
        try:
            for sock in (router, health):
                sock.setsockopt(zmq.LINGER, 0)
            router.bind(self.endpoint)
            health.bind(self.health_endpoint)
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, stop.set)
            log.info("serving on %s (health %s); budget %d MB on %s",
                     self.endpoint, self.health_endpoint, core.ledger.budget_mb, core.device)
            workers = [
                loop.create_task(self._main_loop(router)),
                loop.create_task(self._health_loop(health)),
                loop.create_task(core.ledger.run_idle_reaper()),
            ]
            await stop.wait()
            log.info("shutting down")
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            await self._drain()
        finally:
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            await core.ledger.close()
            router.close(linger=0)
            health.close(linger=0)
            ctx.term()

    async def _drain(self) -> None:
        """Let requests in flight finish briefly; the rest answer "shutting down"."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=DRAIN_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await asyncio.sleep(0.02)  # let the I/O thread flush the last replies

    async def _main_loop(self, router: zmq.asyncio.Socket) -> None:
        while True:
            frames = await router.recv_multipart()
            split = split_envelope(frames)
            if split is None:
                self.dialect.core.counters.dropped_frames += 1
                log.warning("dropped a %d-frame message without an empty delimiter", len(frames))
                continue
            envelope, body = split
            task = asyncio.get_running_loop().create_task(self._answer(router, envelope, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(
        self, router: zmq.asyncio.Socket, envelope: list[bytes], body: list[bytes]
    ) -> None:
        counters = self.dialect.core.counters
        counters.requests_total += 1
        started = time.perf_counter()
        try:
            if len(self._tasks) > MAX_IN_FLIGHT:
                reply = self.dialect.error_reply("Backend overloaded: too many requests in flight")
            elif len(body) != 1:
                counters.bad_requests += 1
                reply = self.dialect.error_reply(
                    f"Invalid request format: expected one payload frame, got {len(body)}"
                )
            else:
                reply = await self.dialect.handle(body[0])
        except asyncio.CancelledError:
            reply = self.dialect.error_reply("Backend is shutting down")
            router.send_multipart([*envelope, msgspec.json.encode(reply)], flags=zmq.NOBLOCK)
            raise
        except Exception as exc:
            log.exception("request handler raised")
            counters.errors_total += 1
            reply = self.dialect.error_reply(f"Internal error: {exc}")
        await router.send_multipart([*envelope, msgspec.json.encode(reply)])
        log.debug("answered %d-byte request in %.1f ms: status %s", sum(map(len, body)),
                  (time.perf_counter() - started) * 1000, reply.get("status"))

    async def _health_loop(self, health: zmq.asyncio.Socket) -> None:
        while True:
            await health.recv_multipart()
            await health.send(msgspec.json.encode(self.dialect.health()))


# -- command line ------------------------------------------------------------------------


def _env_int(env: dict[str, str], name: str | None) -> int | None:
    if not name or not env.get(name):
        return None
    try:
        return int(env[name])
    except ValueError:
        raise SystemExit(f"error: environment variable {name} must be an integer") from None


def make_parser(
    prog: str,
    description: str,
    *,
    port: int,
    health_port: int,
    port_env: str | None,
    health_env: str | None,
    env: dict[str, str] | None = None,
) -> argparse.ArgumentParser:
    """The options both services take; environment variables give defaults, CLI wins."""
    env = dict(os.environ) if env is None else env
    parser = argparse.ArgumentParser(prog=prog, description=description)
    # Every log line names its process ("mma" or "mms"): `make run` shares one terminal.
    parser.set_defaults(process_name=prog.rsplit(".", 1)[-1])
    env_port = _env_int(env, port_env)
    env_health = _env_int(env, health_env)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind, e.g. 127.0.0.1 or * (default: 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=env_port if env_port is not None else port,
        help=f"main (ROUTER) port (default: {port}" + (f"; env {port_env})" if port_env else ")"),
    )
    parser.add_argument(
        "--health-port", type=int, default=env_health if env_health is not None else health_port,
        help=f"health (REP) port (default: {health_port}"
        + (f"; env {health_env})" if health_env else ")"),
    )
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS,
                        help="models file (default: config/models.toml)")
    parser.add_argument("--vram-mb", type=int, default=None,
                        help="VRAM budget in MB, overriding the GPU probe and the models file")
    parser.add_argument("--idle-unload-s", type=float, default=None,
                        help="unload models idle this long (default: from the models file)")
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity")
    return parser


def resolve_models_path(path: Path) -> Path:
    """A relative models path that does not exist from the cwd is tried from the repo root."""
    if path.is_absolute() or path.exists():
        return path
    fallback = REPO_ROOT / path
    return fallback if fallback.exists() else path


def run(
    args: argparse.Namespace,
    on_full: OnFull,
    make_dialect: Callable[[ServiceCore, argparse.Namespace], Dialect],
) -> int:
    """Load the registry, build the dialect and serve until a signal; the exit code."""
    logging.basicConfig(
        level=args.log_level,
        stream=sys.stderr,
        format=f"%(asctime)s {getattr(args, 'process_name', 'backend')} %(name)s "
               "%(levelname)s %(message)s",
    )
    try:
        registry = Registry.load(resolve_models_path(args.models))
    except RegistryError as exc:
        log.error("%s", exc)
        return 2
    if args.vram_mb is not None and args.vram_mb < 0:
        log.error("--vram-mb must be >= 0")
        return 2
    if args.idle_unload_s is not None and args.idle_unload_s <= 0:
        log.error("--idle-unload-s must be > 0")
        return 2
    core = ServiceCore(
        registry, on_full=on_full, vram_mb=args.vram_mb, idle_unload_s=args.idle_unload_s
    )
    server = Server(
        make_dialect(core, args), host=args.host, port=args.port, health_port=args.health_port
    )

    async def main() -> None:
        await server.serve(asyncio.Event(), handle_signals=True)

    try:
        _run_loop(main)
    except zmq.ZMQError as exc:
        log.error("cannot serve on %s / %s: %s", server.endpoint, server.health_endpoint, exc)
        return 1
    log.info("stopped")
    _exit_if_threads_stuck()
    return 0


def _exit_if_threads_stuck() -> None:
    """A load in progress cannot be interrupted and would hold the interpreter's exit
    (executor threads are joined at exit): give it ``THREAD_EXIT_S``, then leave now."""
    deadline = time.monotonic() + THREAD_EXIT_S
    for thread in threading.enumerate():
        if thread.name.startswith(LEDGER_THREAD_PREFIX):
            thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.name.startswith(LEDGER_THREAD_PREFIX) and t.is_alive()
           for t in threading.enumerate()):
        log.warning("a model load is still running; exiting without waiting for it")
        logging.shutdown()
        os._exit(0)


def _run_loop(main: Callable[[], Any]) -> None:
    """Run ``main`` on uvloop when it is installed, else on the default loop."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())

"""The admin socket: operators' JSON commands, each one carrying the admin token.

Wire protocol: one JSON frame each way, to a ROUTER (clients use REQ, or DEALER with or
without an empty delimiter frame; the envelope comes back as it went out)::

    request  {"token": "...", "command": "set_weights", "weights": {"mma": 90}, "id": 7}
    reply    {"status": "ok", "command": "set_weights", "id": 7, "changes": {...}, ...}
    error    {"status": "error", "error": "<code>", "message": "...", "command": ..., "id": 7}

``id`` is optional and echoed. Error codes: ``unauthorized`` (missing or wrong token,
never a change), ``bad_request`` (not JSON, not an object, bad arguments),
``unknown_command``, ``invalid`` (a value out of range, an unknown backend), ``refused``,
``invalid_config`` (a reload of a broken file; nothing changed), ``drain_timeout``,
``busy``, ``read_only`` (the state directory cannot be written: no change is made),
``internal``. The commands themselves are in shim.control.

The token comes from ``shim.admin_token_file`` or ``MMSHIM_TOKEN``. Without either the
shim will not bind the admin socket to a non-loopback address; on loopback it makes a
random token and writes it (mode 0600) next to the state file, where ``mmshim ctl``
finds it, so only local users who can read that file get in.

Beyond loopback the socket is also a CURVE server (shim.curve): only clients whose public
keys are in ``shim.admin_curve_clients_dir`` complete the handshake, and every frame is
encrypted; the token is still checked inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import msgspec
import zmq
import zmq.asyncio
import zmq.auth.asyncio

from shim.config import ShimSection, is_loopback
from shim.control import Controller
from shim.curve import ZAP_DOMAIN, CurveServer, make_server_socket
from shim.errors import CommandError, ConfigError
from shim.metrics import Metrics
from shim.sockets import bind_or_explain, split_envelope
from shim.state import atomic_write

log = logging.getLogger("mmshim.admin")

TOKEN_ENV = "MMSHIM_TOKEN"
#: An admin request is a small JSON object; anything bigger is cut off by libzmq.
MAX_REQUEST_BYTES = 64 * 1024
#: Commands answered at once (a drain waits); more get a ``busy`` reply.
MAX_CONCURRENT = 32


def generated_token_path(shim: ShimSection) -> Path:
    """Where a shim without a configured token writes the one it made up."""
    return Path(shim.state_file).with_suffix(".token")


def audit_path(shim: ShimSection) -> Path:
    return Path(shim.state_file).with_suffix(".audit.jsonl")


@dataclass(frozen=True, slots=True)
class AdminToken:
    """The shared secret, and where it came from (for the log, never the secret)."""

    secret: bytes
    source: str

    def matches(self, candidate: object) -> bool:
        """Constant-time comparison, so response timing leaks nothing about the token."""
        given = candidate.encode() if isinstance(candidate, str) else b""
        return hmac.compare_digest(given, self.secret) and bool(given)


def read_token_file(path: Path) -> str:
    """The token in a file (surrounding whitespace ignored); ValueError if unusable."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read admin token file {path}: {exc.strerror}") from None
    if not token:
        raise ValueError(f"admin token file {path} is empty")
    return token


def resolve_token(shim: ShimSection, env: Mapping[str, str] = os.environ) -> AdminToken:
    """The admin token, or ConfigError when the admin socket may not be opened."""
    if shim.admin_token_file:
        path = Path(shim.admin_token_file)
        try:
            token = read_token_file(path)
        except ValueError as exc:
            raise ConfigError(f"shim.admin_token_file: {exc}") from None
        with contextlib.suppress(OSError):
            if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                log.warning("admin token file %s is readable by other users (chmod 600)", path)
        return AdminToken(token.encode(), f"file {path}")
    if env.get(TOKEN_ENV, "").strip():
        return AdminToken(env[TOKEN_ENV].strip().encode(), f"${TOKEN_ENV}")
    if not is_loopback(shim.admin):
        raise ConfigError(
            f"shim.admin is {shim.admin}, which is not a loopback address, and no admin "
            f"token is configured (set shim.admin_token_file or {TOKEN_ENV}); refusing to "
            "open the admin socket to the network")
    path = generated_token_path(shim)
    with contextlib.suppress(OSError, ValueError):  # made by an earlier start: keep it
        if not path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            return AdminToken(read_token_file(path).encode(), f"generated earlier, in {path}")
    token = secrets.token_urlsafe(32)
    try:
        atomic_write(path, token.encode() + b"\n", mode=0o600)
    except OSError as exc:
        # A read-only or full state directory must not stop the data path: serve, and
        # let operators in with MMSHIM_TOKEN or shim.admin_token_file after a restart.
        log.warning("cannot write the generated admin token to %s (%s): admin requests are "
                    "refused until a token is configured (%s or shim.admin_token_file)",
                    path, exc.strerror, TOKEN_ENV)
        return AdminToken(b"", f"none: {path} not writable")
    return AdminToken(token.encode(), f"generated, in {path}")


class AdminServer:
    """A ROUTER on ``shim.admin`` that authenticates each request and runs its command.

    Each request is answered by its own task, so a ``drain`` that waits does not hold up a
    ``status``; a request that fails in any way costs one error reply, never the socket.
    """

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, token: AdminToken,
                 controller: Controller, metrics: Metrics,
                 curve: CurveServer | None = None) -> None:
        self.endpoint = endpoint
        self._ctx = ctx
        self._curve = curve
        #: With CURVE: a context of its own, so its ZAP handler judges only this socket.
        self._own_ctx: zmq.asyncio.Context | None = None
        self._auth: zmq.auth.asyncio.AsyncioAuthenticator | None = None
        self._token = token
        self._controller = controller
        self._metrics = metrics
        self._sock: zmq.asyncio.Socket | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        ctx = self._ctx
        if self._curve is not None:
            ctx = self._own_ctx = zmq.asyncio.Context()
            self._auth = zmq.auth.asyncio.AsyncioAuthenticator(ctx)
            self._auth.start()
            self._auth.configure_curve(domain=ZAP_DOMAIN, location=self._curve.clients_dir)
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        if self._curve is not None:
            make_server_socket(sock, self._curve)
        bind_or_explain(cast("zmq.Socket[bytes]", sock), self.endpoint, "admin")
        self._sock = sock
        self._loop_task = asyncio.get_running_loop().create_task(self._serve())
        security = "none" if self._curve is None else \
            f"CURVE, {self._curve.clients} client keys in {self._curve.clients_dir}"
        log.info("admin socket on %s (token: %s; transport security: %s)", self.endpoint,
                 self._token.source, security)

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._sock is not None:
            self._sock.close(0)
        if self._auth is not None:
            self._auth.stop()
        if self._own_ctx is not None:
            self._own_ctx.term()

    async def _serve(self) -> None:
        assert self._sock is not None
        while True:
            frames: list[zmq.Frame] = await self._sock.recv_multipart(copy=False)
            if len(self._tasks) >= MAX_CONCURRENT:
                await self._send(frames, _error("busy", "too many admin requests at once"))
                continue
            task = asyncio.get_running_loop().create_task(self._answer(frames))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _answer(self, frames: list[zmq.Frame]) -> None:
        try:
            reply = await self._reply_to(frames)
        except Exception as exc:  # a bug costs one error reply, never the admin socket
            log.exception("admin request failed")
            reply = _error("internal", f"internal error: {exc}")
        await self._send(frames, reply)

    async def _send(self, frames: list[zmq.Frame], reply: dict[str, Any]) -> None:
        assert self._sock is not None
        envelope, _ = _split(frames)
        with contextlib.suppress(zmq.ZMQError):  # the client went away
            await self._sock.send_multipart([*envelope, msgspec.json.encode(reply)])

    async def _reply_to(self, frames: list[zmq.Frame]) -> dict[str, Any]:
        _, body = _split(frames)
        if len(body) != 1:
            return self._refuse("bad_request", f"expected one JSON frame, got {len(body)}")
        try:
            request = msgspec.json.decode(body[0])
        except msgspec.DecodeError:
            return self._refuse("bad_request", "request is not valid JSON")
        if not isinstance(request, dict):
            return self._refuse("bad_request", "request must be a JSON object")
        echo = {"id": request["id"]} if "id" in request else {}
        client = _client(frames)
        if not self._token.matches(request.pop("token", None)):
            log.warning("admin request from %s refused: missing or wrong token", client)
            return {**self._refuse("unauthorized", "missing or wrong admin token"), **echo}
        command = request.pop("command", None)
        request.pop("id", None)
        if not isinstance(command, str):
            return {**self._refuse("bad_request", "request has no \"command\""), **echo}
        try:
            reply = await self._controller.execute(command, request, client)
        except CommandError as exc:
            return {**exc.detail, **_error(exc.code, exc.message), "command": command, **echo}
        return {**reply, "status": "ok", "command": command, **echo}

    def _refuse(self, reason: str, message: str) -> dict[str, Any]:
        self._metrics.admin_denied.labels(reason).inc()
        return _error(reason, message)


def _error(code: str, message: str) -> dict[str, Any]:
    return {"status": "error", "error": code, "message": message}


def _split(frames: list[zmq.Frame]) -> tuple[list[bytes], list[bytes]]:
    """``[identity, ..., b"", payload]`` -> (envelope to send back, body)."""
    raw = [f.bytes for f in frames]
    split = split_envelope(raw)  # the one rule (shim.sockets)
    return split if split is not None else (raw[:1], raw[1:])  # no delimiter: none back


def _client(frames: list[zmq.Frame]) -> str:
    """The peer's address for the audit trail, else the routing id ZMQ gave it."""
    with contextlib.suppress(Exception):
        address = frames[-1].get("Peer-Address")
        if address:
            return str(address)
    return f"routing-id:{frames[0].bytes.hex()}"

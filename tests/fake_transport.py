"""A typed fake of the transport interface (shim.transport.TransportLike): the proxy's
data path and the addons run on it without sockets.

Each backend has a ``handler`` that answers what is sent to it: given the operation and
the payload, it returns the caller-dialect reply (bytes, a JSON object; a ``Result``
for a translated request or an internal ``call``), or raises (a ``BackendError`` to
fail the attempt). Every exchange is kept in ``sent`` for the test to read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import msgspec

from shim import dialects
from shim.config import BackendConfig
from shim.dialects.ops import Kind, Op, Result
from shim.errors import Unsupported
from shim.transport import Answer, BackendState

#: A backend's behaviour: (op, payload or None for internal calls) -> reply or Result.
Handler = Callable[[Op, bytes | None], "bytes | Result"]


def ok_handler(op: Op, payload: bytes | None) -> bytes | Result:
    """Answers everything: ``{"status": "ok"}`` (Result(ok) for internal calls)."""
    if payload is None:
        return Result(ok=True, loaded_models={} if op.kind is Kind.LOADED_STATUS else None)
    return b'{"status": "ok"}'


@dataclass
class FakeBackend:
    """One backend as the proxy sees it (implements ``shim.transport.BackendState``)."""

    config: BackendConfig
    handler: Handler = ok_handler
    connected: bool = True
    healthy: bool = True
    inflight: int = 0

    @property
    def dialect(self) -> str:
        return self.config.dialect

    def restart_wait_s(self, grace_s: float) -> float:
        return 0.0


@dataclass
class Sent:
    backend: str
    op: Op
    payload: bytes | None
    mirror: bool = False


@dataclass
class FakeTransport:
    """``{name: dialect}`` backends answering through their handlers."""

    dialects_by_backend: Mapping[str, str]
    policy: Mapping[str, str] = field(default_factory=dict)
    sent: list[Sent] = field(default_factory=list)
    _backends: dict[str, FakeBackend] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, dialect in self.dialects_by_backend.items():
            self._backends[name] = FakeBackend(BackendConfig(
                dialect=dialect, endpoints=["tcp://127.0.0.1:1"]))  # type: ignore[arg-type]

    @property
    def backends(self) -> Mapping[str, BackendState]:
        return self._backends

    def backend(self, name: str) -> FakeBackend:
        return self._backends[name]

    def can_serve(self, op: Op, backend: str) -> bool:
        dialect = self._backends[backend].dialect
        if dialect == op.dialect:
            return True
        try:
            dialects.render_request(op, dialect, self.policy)
        except Unsupported:
            return False
        return True

    async def wait_connected(self, backend: str, timeout_s: float) -> bool:
        return self._backends[backend].connected

    async def send(self, op: Op, backend: str, payload: bytes | None, timeout_s: float, *,
                   translate: bool = True, sent: Op | None = None,
                   mirror: bool = False) -> Answer:
        self.sent.append(Sent(backend, op, payload, mirror))
        await asyncio.sleep(0)  # a real send yields to the loop
        answer = self._backends[backend].handler(op, payload)
        if isinstance(answer, Result):
            return Answer(msgspec.json.encode(dialects.render_reply(op, answer)), answer)
        return Answer(answer, None)

    async def call(self, backend: str, op: Op, timeout_s: float) -> Result:
        self.sent.append(Sent(backend, op, None))
        await asyncio.sleep(0)
        answer = self._backends[backend].handler(op, None)
        if isinstance(answer, Result):
            return answer
        return Result(ok=True)

    async def send_frames(self, backend: str, frames: list[bytes],
                          timeout_s: float) -> list[bytes]:
        await asyncio.sleep(0)
        return list(frames)  # an echo: opaque replies come back unchanged

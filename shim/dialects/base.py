"""The ``Dialect`` protocol and the registry of dialects, by name.

A dialect is one module (``shim.dialects.mma``, ``shim.dialects.mms``, or one of a
deployment's own) that describes one wire dialect of model manager: how its callers' requests
read as canonical operations (``shim.dialects.ops.Op``), how a canonical operation is
asked of a backend that speaks it, how that backend's replies read as a ``Result``, how a
``Result`` is answered to one of its callers, its error shapes, and its health probe. The
module builds one object satisfying :class:`Dialect` and calls :func:`register` on it at
import time; a backend's ``dialect`` in the config names it (``shim.config`` validates the
name against :func:`names`). The shim imports ``shim.dialects.mma`` and
``shim.dialects.mms`` itself; other dialect modules are named in the config's
``[dialects] modules`` list (imported when the config is loaded). Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import msgspec

from shim.dialects.ops import Form, Kind, Op, Result
from shim.errors import Unsupported

__all__ = ["Dialect", "HealthView", "get", "names", "register", "registered", "unregister"]


class HealthView(msgspec.Struct, frozen=True, kw_only=True):
    """What the shim reads from a backend's health-socket reply (any field may be absent).

    ``status`` is the backend's own word (``"ok"``, ``"healthy"``, ``"error"``...);
    ``vram_used_mb`` / ``vram_budget_mb`` are megabytes, as the backend reported them.
    """

    status: str | None = None
    vram_used_mb: float | None = None
    vram_budget_mb: float | None = None


class Dialect(Protocol):
    """One wire dialect. Implementations are plain objects; see ``mma.py``, ``mms.py``.

    Methods that read a backend's replies raise ``shim.errors.Malformed`` (or
    ``Unsupported``) for a reply they cannot read; ``shim.dialects.parse_reply`` turns both
    into a failed ``Result`` with a ``SHIM_*`` error code, so a dialect never has to.
    """

    #: The registry key and the value of ``backends.<name>.dialect`` in the config.
    name: str
    #: The caller forms this dialect answers in (``Form``); empty for a dialect only
    #: backends speak (its requests are never detected on the frontend).
    forms: frozenset[Form]
    #: Canonical kinds a caller of ANOTHER dialect may have served by a backend of this one
    #: (``render_request`` is only called for these).
    kinds: frozenset[Kind]
    #: Whether the dialect keeps conversation history and has its own clear; when False
    #: the shim answers clear_conversation itself and renames the conversation on the
    #: backend (``shim.conversations``).
    clears_conversations: bool
    #: The generate default of this dialect's own manager (tokens), which a backend of
    #: another dialect is sent explicitly for its callers; None: no default to carry.
    default_max_tokens: int | None
    #: The bytes the health prober sends to a backend's health socket.
    health_request: bytes

    def claims(self, msg: Mapping[str, Any]) -> bool:
        """Whether a request object received on the frontend is in this dialect.

        The legacy dialect (``shim.dialects.LEGACY``) is the fallback and is not asked."""
        ...

    def form_of(self, msg: object) -> Form:
        """The reply form of a request in this dialect (for error replies); never raises."""
        ...

    def parse_request(self, msg: dict[str, Any], policy: Mapping[str, str]) -> Op:
        """A request in this dialect as an ``Op`` (``BadRequest`` when unreadable)."""
        ...

    def precheck(self, op: Op) -> Result | None:
        """The failure this dialect's own manager gives ``op`` (one of its callers' requests)
        without any backend, when a backend of another dialect is asked in its stead;
        None when the request must go to that backend."""
        ...

    def render_request(self, op: Op, policy: Mapping[str, str]) -> list[dict[str, Any]]:
        """The requests, in order, that serve another dialect's ``op`` on a backend of this
        one (``op.kind`` is in ``kinds``; ``Unsupported`` when there is still no way)."""
        ...

    def parse_reply(self, op: Op, replies: list[Any]) -> Result:
        """This dialect's backend replies (decoded JSON, 1:1 with the requests sent) as a
        ``Result``; ``op`` may be of this dialect (sent as it came) or of another."""
        ...

    def render_reply(self, op: Op, result: Result) -> dict[str, Any]:
        """``result`` as the reply to one of this dialect's callers' ``op``."""
        ...

    def error_reply(self, form: Form, code: str, message: str,
                    request: dict[str, Any] | None) -> dict[str, Any]:
        """The shim's own error reply (``error_code`` ``code``) in ``form`` (one of
        ``forms``); ``request`` is the caller's request when it was a JSON object."""
        ...

    def read_health(self, reply: object) -> HealthView:
        """A health-socket reply (decoded JSON, any shape) read; never raises."""
        ...


_REGISTRY: dict[str, Dialect] = {}


def register(dialect: Dialect) -> Dialect:
    """Add ``dialect`` under ``dialect.name`` (registering the same object again is a no-op;
    another object under a taken name is ``ValueError``). Returns it."""
    known = _REGISTRY.get(dialect.name)
    if known is not None and known is not dialect:
        raise ValueError(f"a dialect named {dialect.name!r} is already registered")
    _REGISTRY[dialect.name] = dialect
    return dialect


def unregister(name: str) -> None:
    """Remove a dialect (for tests that register toy dialects); unknown names are ignored."""
    _REGISTRY.pop(name, None)


def get(name: str) -> Dialect:
    """The dialect registered as ``name``; ``Unsupported`` naming the known ones if none."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise Unsupported(f"unknown dialect {name!r} (known: {', '.join(names())})") from None


def names() -> tuple[str, ...]:
    """The registered dialects' names, in registration order."""
    return tuple(_REGISTRY)


def registered() -> tuple[Dialect, ...]:
    """The registered dialects, in registration order."""
    return tuple(_REGISTRY.values())

"""A toy third dialect, "v3": one module plus one registration, nothing else in shim/.

Its wire shapes are deliberately unlike MMA's and MMS's (so a test sees translation):

- generate: ``{"op": "complete", "model": id, "input": prompt, "limits": {"max_tokens": N}}``
  -> ``{"ok": true, "output": text, "model": id}``
- load / unload: ``{"op": "load"|"unload", "model": id}`` -> ``{"ok": true}``
- failure: ``{"ok": false, "why": "..."}``
- health socket: ``{"op": "ping"}`` -> ``{"state": "up", "memory": {"used_mb", "total_mb"}}``

Only backends speak it (no caller form): an MMA agent's generate / LOAD_MODEL /
UNLOAD_MODEL reaches a v3 backend translated, and its reply comes back in MMA's shape.
Loaded in a shim process by the config: ``[dialects] modules = ["tests.toy_dialect"]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from shim import dialects
from shim.dialects import Form, Kind, Op, Result
from shim.dialects.base import HealthView
from shim.errors import Malformed, Unsupported

NAME = "v3"
HEALTH_REQUEST = b'{"op": "ping"}'


class Limits(msgspec.Struct, omit_defaults=True):
    max_tokens: int | None = None


class Complete(msgspec.Struct, tag_field="op", tag="complete"):
    model: str
    input: str
    limits: Limits = msgspec.field(default_factory=Limits)


class Reply(msgspec.Struct):
    """Every v3 reply: ``ok``, then the fields of the operation."""

    ok: bool
    output: str | None = None
    model: str | None = None
    why: str | None = None


class Memory(msgspec.Struct):
    used_mb: float | None = None
    total_mb: float | None = None


class Health(msgspec.Struct):
    state: str | None = None
    memory: Memory = msgspec.field(default_factory=Memory)


class V3:
    """The v3 dialect (``shim.dialects.base.Dialect``)."""

    name = NAME
    forms: frozenset[Form] = frozenset()
    kinds = frozenset({Kind.GENERATE, Kind.LOAD, Kind.UNLOAD})
    clears_conversations = False
    default_max_tokens: int | None = None
    health_request = HEALTH_REQUEST

    def claims(self, msg: Mapping[str, Any]) -> bool:
        return False  # no caller speaks v3: it is a backend dialect only

    def form_of(self, msg: object) -> Form:
        raise Unsupported("v3 has no callers")

    def parse_request(self, msg: dict[str, Any], policy: Mapping[str, str]) -> Op:
        raise Unsupported("v3 has no callers")

    def precheck(self, op: Op) -> Result | None:
        return None

    def render_request(self, op: Op, policy: Mapping[str, str]) -> list[dict[str, Any]]:
        if op.model_id is None:
            raise Unsupported("v3 needs a model")
        if op.kind is Kind.GENERATE:
            # Without a limit, the caller's own manager's default (MMA's 256), explicitly.
            max_tokens = op.params.max_tokens
            if max_tokens is None:
                max_tokens = dialects.get(op.dialect).default_max_tokens
            req = Complete(model=op.model_id, input=op.prompt or "",
                           limits=Limits(max_tokens=max_tokens))
            return [msgspec.to_builtins(req)]
        return [{"op": op.kind.value, "model": op.model_id}]

    def parse_reply(self, op: Op, replies: list[Any]) -> Result:
        if len(replies) != 1:
            raise Malformed(f"expected 1 v3 reply, got {len(replies)}")
        try:
            reply = msgspec.convert(replies[0], Reply)
        except msgspec.ValidationError as exc:
            raise Malformed(str(exc)) from None
        if not reply.ok:
            return Result(ok=False, source=NAME, raw=replies, message=reply.why or "v3 failed")
        result = Result(ok=True, source=NAME, raw=replies, model_id=reply.model or op.model_id)
        if op.kind is Kind.GENERATE:
            if reply.output is None:
                raise Malformed("v3 completion without 'output'")
            result.text = reply.output
        else:
            result.loaded = True
        return result

    def render_reply(self, op: Op, result: Result) -> dict[str, Any]:
        raise Unsupported("v3 has no callers")

    def error_reply(self, form: Form, code: str, message: str,
                    request: dict[str, Any] | None) -> dict[str, Any]:
        return {"ok": False, "why": message, "code": code}

    def read_health(self, reply: object) -> HealthView:
        try:
            health = msgspec.convert(reply, Health)
        except msgspec.ValidationError:
            return HealthView()
        return HealthView(status=health.state, vram_used_mb=health.memory.used_mb,
                          vram_budget_mb=health.memory.total_mb)


DIALECT = dialects.register(V3())

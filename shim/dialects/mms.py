"""The MMS dialect (ModelManagerSuite): parse its requests, speak it to MMS, answer in it.

Every MMS request is ``{"action": ...}`` and every reply ``{"status": "success"|"error"}``
(``healthy``/``degraded`` for health_check; the deployed MMS also answered failures as
``{"error": "..."}`` with no status at all). An MMA operation that MMS has no single
action for becomes a short plan of MMS actions whose replies are composed back into one
result (e.g. MMA status = get_loaded_models_status + health_check).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec

from shim.dialects import base
from shim.dialects.base import HealthView, register
from shim.dialects.ops import (
    AccessInfo,
    Form,
    Kind,
    ModelInfo,
    Op,
    Params,
    Result,
    error_text,
    loose_str,
    request_id_of,
    wire,
)
from shim.errors import Code, Malformed, Unsupported

NAME = "mms"
"""This dialect's registered name (``backends.<name>.dialect = "mms"``)."""

ONLY_ACTIONS = frozenset({
    "generate_text", "load_model", "unload_model", "list_models", "health_check",
    "get_loaded_models_status", "select_model", "predict_models", "record_usage",
    "preload_models", "log_performance_metric", "log_model_evaluation",
    "get_performance_metrics", "get_stats",
})
"""Actions only MMS knows: a request naming one is an MMS caller's. ``generate`` is
known to both and is read as the legacy dialect's."""

DEFAULT_MAX_TOKENS = 1024
"""generate_text's default (protocol.md): sent explicitly when another dialect's backend
serves an MMS caller, so the caller keeps MMS's semantics."""

ACCESS_MESSAGE = "MMS approved model loading"
"""access_info.message of a MODEL_READY served by MMS (MMA says "MMA approved ...")."""

_KINDS = {
    "generate_text": Kind.GENERATE,
    "load_model": Kind.LOAD,
    "unload_model": Kind.UNLOAD,
    "get_loaded_models_status": Kind.LOADED_STATUS,
    "health_check": Kind.HEALTH,
    "list_models": Kind.LIST_MODELS,
}
# The MMS actions that serve an MMA caller's operation, in order. For model access,
# list_models only supplies access_info.vram_allocated_mb (MMS's load reply has no size).
_PLANS: dict[Kind, tuple[str, ...]] = {
    Kind.GENERATE: ("generate_text",),
    Kind.LOAD: ("load_model",),
    Kind.UNLOAD: ("unload_model",),
    Kind.LOADED_STATUS: ("get_loaded_models_status", "health_check"),
    Kind.STATUS: ("get_loaded_models_status", "health_check"),
    Kind.HEALTH: ("health_check",),
    Kind.MODEL_ACCESS: ("load_model", "list_models"),
}
_AUXILIARY = frozenset({(Kind.MODEL_ACCESS, "list_models")})
"""(kind, action) pairs whose failure does not fail the operation: the model is loaded."""


# --- requests -----------------------------------------------------------------------


def parse_request(msg: dict[str, Any], policy: Mapping[str, str]) -> Op:
    """Parse an MMS request; actions without a canonical equivalent become OTHER.

    Lenient like the MMA parser (loose types; ``model_name`` accepted for ``model_id``, as
    migration tooling sends it); never raises BadRequest.
    """
    name = msg["action"]
    kind = _KINDS.get(name, Kind.OTHER)
    op = Op(kind=kind, form=Form.MMS, dialect=NAME, raw=msg, policy=policy, name=name,
            request_id=request_id_of(msg))
    if kind is Kind.GENERATE:
        op.prompt = loose_str(msg, "prompt")
        op.conversation_id = loose_str(msg, "conversation_id") or None
        try:  # the generation parameters are top-level fields in MMS
            op.params = msgspec.convert(
                {k: v for k, v in msg.items() if k in Params.__struct_fields__}, Params,
                strict=False)
        except (msgspec.ValidationError, TypeError, ValueError):
            op.params = Params()
    op.model_id = loose_str(msg, "model_id") or loose_str(msg, "model_name") or None
    return op


_NEEDS_MODEL = frozenset({Kind.GENERATE, Kind.LOAD, Kind.UNLOAD})


def precheck(op: Op) -> Result | None:
    """The failure an MMS caller's request without a model id gets when a backend of
    another dialect serves it: MMA names models by preference only, so there is nothing to
    send, and MMS's own word for it is used. None when the backend must be asked."""
    if op.model_id is None and op.kind in _NEEDS_MODEL:
        return Result(ok=False, message="Missing 'model_id' field")
    return None


def _plan(op: Op) -> tuple[str, ...]:
    if op.dialect == NAME:
        return (op.name or "",)
    plan = _PLANS.get(op.kind)
    if plan is None:
        what = op.name if op.kind is Kind.OTHER else op.kind.value
        raise Unsupported(f"MMS has no equivalent of {op.dialect.upper()} {what!r}")
    return plan


def render_request(op: Op) -> list[dict[str, Any]]:
    """The MMS requests serving another dialect's caller's ``op`` (an MMS caller's
    request goes as it came, without coming here)."""
    if op.dialect == NAME:
        return [op.raw]
    return [_request(op, action) for action in _plan(op)]


def _request(op: Op, action: str) -> dict[str, Any]:
    if action == "generate_text":
        p = op.params
        req: dict[str, Any] = {
            "action": action, "model_id": op.model_id, "prompt": op.prompt,
        }
        # The caller's own manager's default, explicitly: MMS's (1024) may differ from it.
        max_tokens = p.max_tokens if p.max_tokens is not None else \
            base.get(op.dialect).default_max_tokens
        if max_tokens is not None:
            req["max_tokens"] = max_tokens
        for key in ("temperature", "top_p", "stop", "system_prompt"):
            value = getattr(p, key)
            if value is not None:
                req[key] = value
        if op.conversation_id is not None:
            req["conversation_id"] = op.conversation_id
        return req
    if action in ("load_model", "unload_model"):
        return {"action": action, "model_id": op.model_id}
    return {"action": action}


# --- replies ------------------------------------------------------------------------


def parse_reply(op: Op, replies: list[Any]) -> Result:
    """Compose MMS's replies to ``render_request``'s requests into one result.

    Raises Malformed (or Unsupported) for replies that cannot be read; the caller turns
    those into a failed Result.
    """
    plan = _plan(op)
    if len(replies) != len(plan):
        raise Malformed(f"expected {len(plan)} MMS replies, got {len(replies)}")
    if op.kind is Kind.OTHER:
        reply = replies[0]
        ok = isinstance(reply, dict) and reply.get("status") == "success"
        return Result(ok=ok, source=NAME, raw=replies)
    result = Result(ok=True, source=NAME, raw=replies)
    for action, reply in zip(plan, replies, strict=True):
        try:
            failure = _failure_of(action, reply) or _READERS[action](op, reply, result)
        except Malformed:
            if (op.kind, action) in _AUXILIARY:
                continue
            raise
        if failure is not None and (op.kind, action) not in _AUXILIARY:
            return Result(ok=False, source=NAME, raw=replies, message=failure,
                          request_id=op.request_id, model_id=op.model_id)
    if op.kind is Kind.MODEL_ACCESS:
        model = (result.models or {}).get(op.model_id or "")
        result.request_id = op.request_id
        result.model_id = op.model_id
        result.access_info = AccessInfo(
            message=ACCESS_MESSAGE,
            model_path_from_config="",  # MMS does not expose model paths
            vram_allocated_mb=model.vram_mb if model is not None else 0,
            quantization_level=op.quantization or "default",
            priority=op.priority or "normal",
        )
    return result


def _failure_of(action: str, reply: object) -> str | None:
    """The error message when ``reply`` reports a failure; Malformed when unreadable."""
    if not isinstance(reply, dict):
        raise Malformed(f"{action} reply is not a JSON object")
    status = reply.get("status")
    if status == "success" or (action == "health_check" and status in ("healthy", "degraded")):
        return None
    if status == "error" or (status is None and "error" in reply):
        return error_text(reply, f"MMS {action} failed")
    raise Malformed(f"{action} reply has unexpected status {status!r}")


def _mb(value: int | float | None) -> int | None:
    """Megabytes as a whole number, the type the MMA dialect uses."""
    if value is None or isinstance(value, int):
        return value
    if not math.isfinite(value):
        raise Malformed(f"not a finite number of megabytes: {value}")
    return round(value)


def _seconds(value: int | float | None) -> float | None:
    return None if value is None else float(value)


# MMS's replies as it sends them (protocol.md "MMS dialect"): only the fields the shim
# reads, each of the JSON type MMS documents (null reads as absent); anything else is
# skipped here and carried over as it came by ``render_reply``. A present field of
# another type makes the reply unusable (Malformed, via ``wire``).

Number = int | float


class GenerateTextReply(msgspec.Struct):
    text: str | None = None
    model_id: str | None = None
    tokens_generated: int | None = None
    conversation_id: str | None = None


class LoadReply(msgspec.Struct):
    """load_model (``loaded``) and unload_model (``unloaded``)."""

    message: str | None = None
    loaded: bool | None = None
    unloaded: bool | None = None


class LoadedEntry(msgspec.Struct):
    """One get_loaded_models_status ``loaded_models`` entry."""

    status: str | None = None
    vram_usage: Number | None = None
    last_used: Number | None = None


class LoadedReply(msgspec.Struct):
    loaded_models: dict[str, LoadedEntry] | None = None


class HealthCheckReply(msgspec.Struct):
    """health_check on the main socket (``loaded_models`` is a count here)."""

    total_models: int | None = None
    online_models: int | None = None
    loaded_models: int | None = None
    vram_used_mb: Number | None = None
    vram_budget_mb: Number | None = None
    model_details: dict[str, Any] | None = None
    timestamp: Number | str | None = None
    uptime: Number | None = None


class ListEntry(msgspec.Struct):
    """One list_models entry."""

    model_id: str
    type: str | None = None
    estimated_vram_mb: Number | None = None
    loaded: bool | None = None
    status: str | None = None
    last_used: Number | None = None


class ListReply(msgspec.Struct):
    models: list[ListEntry] | None = None


def _read_generate(op: Op, reply: dict[str, Any], r: Result) -> str | None:
    g = wire(reply, GenerateTextReply)
    if g.text is None:
        raise Malformed("generate_text reply has no 'text'")
    r.text = g.text
    r.model_id = g.model_id or op.model_id
    r.tokens_generated = g.tokens_generated
    r.conversation_id = g.conversation_id
    return None


def _reader_load(flag: str) -> Callable[[Op, dict[str, Any], Result], str | None]:
    def read(op: Op, reply: dict[str, Any], r: Result) -> str | None:
        rep = wire(reply, LoadReply)
        r.message = rep.message
        if getattr(rep, flag) is False:
            return r.message or f"{flag} is false for model {op.model_id!r}"
        r.loaded = True
        r.model_id = op.model_id
        return None

    return read


def _read_loaded(op: Op, reply: dict[str, Any], r: Result) -> str | None:
    rep = wire(reply, LoadedReply)
    if rep.loaded_models is None:
        raise Malformed("get_loaded_models_status reply has no 'loaded_models'")
    loaded: dict[str, ModelInfo] = {}
    for model_id, entry in rep.loaded_models.items():
        status = entry.status or "online"
        loaded[model_id] = ModelInfo(
            vram_mb=_mb(entry.vram_usage) or 0,
            last_used=_seconds(entry.last_used) or 0.0,
            status=status,
            is_active=status == "online",
        )
    r.loaded_models = loaded
    return None


def _read_health(op: Op, reply: dict[str, Any], r: Result) -> str | None:
    h = wire(reply, HealthCheckReply)
    r.health = "ok" if reply.get("status") == "healthy" else "degraded"
    r.total_models = h.total_models
    r.online_models = h.online_models
    r.loaded_count = h.loaded_models
    r.vram_used_mb = _mb(h.vram_used_mb)
    r.vram_budget_mb = _mb(h.vram_budget_mb)
    r.model_details = h.model_details
    r.timestamp = h.timestamp
    # health_check carries no uptime (only MMS's health socket does); 0.0 keeps the
    # figure MMA callers expect in a HEALTH_CHECK reply.
    r.uptime_s = 0.0 if h.uptime is None else float(h.uptime)
    return None


def _read_list(op: Op, reply: dict[str, Any], r: Result) -> str | None:
    rep = wire(reply, ListReply)
    if rep.models is None:
        raise Malformed("list_models reply has no 'models' list")
    models: dict[str, ModelInfo] = {}
    for entry in rep.models:
        loaded = entry.loaded if entry.loaded is not None else entry.status == "online"
        models[entry.model_id] = ModelInfo(
            vram_mb=_mb(entry.estimated_vram_mb) or 0,
            last_used=_seconds(entry.last_used),
            type=entry.type or "unknown",
            loaded=loaded,
            status=entry.status or ("online" if loaded else "available_not_loaded"),
            is_active=loaded,
        )
    r.models = models
    return None


_READERS: dict[str, Callable[[Op, dict[str, Any], Result], str | None]] = {
    "generate_text": _read_generate,
    "load_model": _reader_load("loaded"),
    "unload_model": _reader_load("unloaded"),
    "get_loaded_models_status": _read_loaded,
    "health_check": _read_health,
    "list_models": _read_list,
}


def render_reply(op: Op, r: Result) -> dict[str, Any]:
    """``r`` as the MMS reply to an MMS caller's ``op``.

    When MMS itself produced the result, keys of its reply that the canonical model does
    not cover are carried over, so MMS -> MMS loses nothing.
    """
    if op.kind is Kind.OTHER:
        reply = r.raw[0] if len(r.raw) == 1 else None
        if r.source == NAME and isinstance(reply, dict):
            return reply
        return error_body(op, r.error_code or Code.BAD_REPLY,
                          r.message or "backend reply is not a JSON object")
    if not r.ok:
        return error_body(op, r.error_code, r.message or "request failed")
    out = _RENDERERS[op.kind](op, r)
    if r.source == NAME and len(r.raw) == 1 and isinstance(r.raw[0], dict):
        for key, value in r.raw[0].items():
            if key not in out:
                out[key] = value
    return out


def error_body(op: Op | None, code: str | None, message: str) -> dict[str, Any]:
    """An MMS error reply (with ``loaded``/``unloaded`` false for a failed (un)load)."""
    out: dict[str, Any] = {"status": "error", "message": message}
    if op is not None and op.kind is Kind.LOAD:
        out["loaded"] = False
    elif op is not None and op.kind is Kind.UNLOAD:
        out["unloaded"] = False
    if code is not None:
        out["error_code"] = code
    return out


def _render_generate(op: Op, r: Result) -> dict[str, Any]:
    text = r.text or ""
    out: dict[str, Any] = {
        "status": "success", "text": text, "model_id": r.model_id or op.model_id or "",
        # MMA does not count tokens: whitespace-separated words stand in for them.
        "tokens_generated": r.tokens_generated if r.tokens_generated is not None
        else len(text.split()),
    }
    cid = r.conversation_id or op.conversation_id
    if cid is not None:
        out["conversation_id"] = cid
    return out


def _render_load(op: Op, r: Result) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "success",
                           "loaded" if op.kind is Kind.LOAD else "unloaded": True}
    if r.message is not None:
        out["message"] = r.message
    return out


def _render_loaded(op: Op, r: Result) -> dict[str, Any]:
    return {"status": "success", "loaded_models": {
        model_id: {"status": m.status, "last_used": m.last_used if m.last_used is not None
                   else 0.0, "vram_usage": m.vram_mb}
        for model_id, m in (r.loaded_models or {}).items()}}


def _render_health(op: Op, r: Result) -> dict[str, Any]:
    loaded = r.loaded_models or {}
    details = r.model_details
    if details is None:  # from MMA: it only tells about the loaded models
        details = {m: {"status": "online", "message": "Model is loaded"} for m in loaded}
    return {
        "status": "healthy" if r.health in (None, "ok") else "degraded",
        "total_models": r.total_models if r.total_models is not None else len(loaded),
        "online_models": r.online_models if r.online_models is not None else len(loaded),
        "loaded_models": r.loaded_count if r.loaded_count is not None else len(loaded),
        "vram_used_mb": r.vram_used_mb if r.vram_used_mb is not None
        else sum(m.vram_mb for m in loaded.values()),
        "vram_budget_mb": r.vram_budget_mb if r.vram_budget_mb is not None else 0,
        "model_details": details,
        "timestamp": r.timestamp if r.timestamp is not None else time.time(),
    }


def _catalogue(op: Op, r: Result) -> dict[str, ModelInfo]:
    """list_models from MMA's status: its loaded models, then the policy's other models.

    MMA reports no size for a model it has not loaded: those are listed with 0 MB.
    """
    models = dict(r.loaded_models or {})
    policy = r.routing_policy if r.routing_policy is not None else op.policy
    for model_id in policy.values():
        if isinstance(model_id, str) and model_id not in models:
            models[model_id] = ModelInfo(loaded=False, status="available_not_loaded",
                                         is_active=False)
    return models


def _render_list(op: Op, r: Result) -> dict[str, Any]:
    models = r.models if r.models is not None else _catalogue(op, r)
    out = []
    for model_id, m in models.items():
        entry: dict[str, Any] = {"model_id": model_id, "type": m.type,
                                 "estimated_vram_mb": m.vram_mb, "loaded": m.loaded,
                                 "status": m.status}
        if m.last_used is not None:
            entry["last_used"] = m.last_used
        out.append(entry)
    return {"status": "success", "models": out}


_RENDERERS: dict[Kind, Callable[[Op, Result], dict[str, Any]]] = {
    Kind.GENERATE: _render_generate,
    Kind.LOAD: _render_load,
    Kind.UNLOAD: _render_load,
    Kind.LOADED_STATUS: _render_loaded,
    Kind.HEALTH: _render_health,
    Kind.LIST_MODELS: _render_list,
}


# --- health ------------------------------------------------------------------------


class _HealthReply(msgspec.Struct):
    """MMS's health-socket reply (protocol.md): only the fields the shim reads."""

    status: str | None = None
    vram_used_mb: float | None = None
    vram_budget_mb: float | None = None


def read_health(reply: object) -> HealthView:
    """MMS's health reply read: its status and VRAM figures; unreadable: no figures."""
    try:
        r = msgspec.convert(reply, _HealthReply)
    except msgspec.ValidationError:
        return HealthView()
    return HealthView(status=r.status, vram_used_mb=r.vram_used_mb,
                      vram_budget_mb=r.vram_budget_mb)


# --- the dialect -------------------------------------------------------------------


class MMS:
    """The MMS dialect as a ``shim.dialects.base.Dialect``."""

    name = NAME
    forms = frozenset({Form.MMS})
    kinds = frozenset(_PLANS)
    clears_conversations = False  # MMS has no clear_conversation (protocol.md)
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS
    health_request = b'{"action": "health_check"}'

    def claims(self, msg: Mapping[str, Any]) -> bool:
        """A request naming an MMS-only action (``ONLY_ACTIONS``)."""
        action = msg.get("action")
        return isinstance(action, str) and action in ONLY_ACTIONS

    def form_of(self, msg: object) -> Form:
        return Form.MMS

    def parse_request(self, msg: dict[str, Any], policy: Mapping[str, str]) -> Op:
        return parse_request(msg, policy)

    def precheck(self, op: Op) -> Result | None:
        return precheck(op)

    def render_request(self, op: Op, policy: Mapping[str, str]) -> list[dict[str, Any]]:
        return render_request(op)

    def parse_reply(self, op: Op, replies: list[Any]) -> Result:
        return parse_reply(op, replies)

    def render_reply(self, op: Op, result: Result) -> dict[str, Any]:
        return render_reply(op, result)

    def error_reply(self, form: Form, code: str, message: str,
                    request: dict[str, Any] | None) -> dict[str, Any]:
        """``{"status": "error", "message", "error_code"}`` (MMS's own error shape)."""
        return error_body(None, code, message)

    def read_health(self, reply: object) -> HealthView:
        return read_health(reply)


DIALECT = register(MMS())

"""The MMA dialect (legacy ModelManagerAgent): parse its requests, speak it to MMA, answer in it.

MMA has three request forms with three reply styles: ``{"action": ...}`` (lower-case
``ok``/``error``), ``{"command": ...}`` (upper-case ``SUCCESS``/``ERROR``) and the model
access request with neither key (``MODEL_READY``/``ERROR_LOADING_MODEL``). An MMA caller's
request goes to an MMA backend unchanged; this module also renders MMS callers' requests
for an MMA backend where MMA has an equivalent.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import msgspec

from shim.dialects import base
from shim.dialects.base import HealthView, register
from shim.dialects.ops import (
    NO_PARAMS,
    AccessInfo,
    Form,
    Kind,
    ModelInfo,
    Op,
    Params,
    Result,
    error_text,
    loose_dict,
    loose_id,
    loose_str,
    request_id_of,
    wire,
)
from shim.errors import Code, Malformed, Unsupported

NAME = "mma"
"""This dialect's registered name (``backends.<name>.dialect = "mma"``)."""

DEFAULT_MAX_TOKENS = 256
"""generate's default (the deployed MMA's): sent explicitly when another dialect's backend
serves an MMA caller, so the caller keeps MMA's semantics."""

_ACTIONS = {
    "generate": Kind.GENERATE,
    "clear_conversation": Kind.CLEAR_CONVERSATION,
    "status": Kind.STATUS,
}
_COMMANDS = {
    "GET_LOADED_MODELS_STATUS": Kind.LOADED_STATUS,
    "LOAD_MODEL": Kind.LOAD,
    "UNLOAD_MODEL": Kind.UNLOAD,
    "HEALTH_CHECK": Kind.HEALTH,
}
# The MMA request another dialect's caller's operation (e.g. MMS's) becomes. MMA's
# HEALTH_CHECK says only "ok"; its status action carries the totals that MMS
# health_check and list_models report.
_FROM_OTHERS = {
    Kind.GENERATE: Kind.GENERATE,
    Kind.LOAD: Kind.LOAD,
    Kind.UNLOAD: Kind.UNLOAD,
    Kind.LOADED_STATUS: Kind.LOADED_STATUS,
    Kind.HEALTH: Kind.STATUS,
    Kind.LIST_MODELS: Kind.STATUS,
}
# Actions answer "ok", commands "SUCCESS"; either is read as success wherever it comes,
# and the reply rendered for the caller uses the one its form documents.
_SUCCESS = frozenset({"ok", "SUCCESS", "success"})


def resolve_pref(pref: str, policy: Mapping[str, str]) -> str | None:
    """The model for a load policy name; an unknown name falls back to ``fast``, as in MMA."""
    model = policy.get(pref)
    return model if model is not None else policy.get("fast")


# --- requests -----------------------------------------------------------------------


def parse_request(msg: dict[str, Any], policy: Mapping[str, str]) -> Op:
    """Parse an MMA request (``action`` first, then ``command``, else model access).

    Lenient, as the legacy endpoint was (protocol.md, "Field types are loose"): only what
    routing and translation need is read, with loose types (an int ``conversation_id``,
    a null ``model_pref``, an int ``quantization_level``, a string ``context``); the
    request itself goes to an MMA backend untouched. Never raises BadRequest.
    """
    if "action" in msg:
        name = loose_str(msg, "action") or repr(msg["action"])
        kind = _ACTIONS.get(name, Kind.OTHER)
        op = Op(kind=kind, form=Form.ACTION, dialect=NAME, raw=msg, policy=policy, name=name,
                request_id=request_id_of(msg))
        if kind is Kind.GENERATE:
            pref = loose_str(msg, "model_pref") or "fast"  # null or missing: fast, as MMA
            op.model_pref = pref
            op.model_id = resolve_pref(pref, policy)
            op.prompt = loose_str(msg, "prompt")
            op.params = _params(msg)
            op.conversation_id = loose_str(msg, "conversation_id") or None
        elif kind is Kind.CLEAR_CONVERSATION:
            op.conversation_id = loose_str(msg, "conversation_id") or None
        return op
    if "command" in msg:
        name = loose_str(msg, "command") or repr(msg["command"])
        kind = _COMMANDS.get(name, Kind.OTHER)
        op = Op(kind=kind, form=Form.COMMAND, dialect=NAME, raw=msg, policy=policy, name=name,
                request_id=request_id_of(msg))
        if kind is Kind.LOAD or kind is Kind.UNLOAD:
            # Agents send model_name; some send model_id instead.
            op.model_id = loose_str(msg, "model_name") or loose_str(msg, "model_id")
            op.quantization = loose_str(msg, "quantization_level")
        elif kind is Kind.OTHER:
            op.model_id = loose_str(msg, "model_id") or loose_str(msg, "model_name")
        return op
    context = loose_dict(msg, "context")
    return Op(kind=Kind.MODEL_ACCESS, form=Form.MODEL_ACCESS, dialect=NAME, raw=msg,
              policy=policy, request_id=request_id_of(msg),
              model_id=loose_str(msg, "model_id") or None,  # "" is as missing, as in MMA
              quantization=loose_str(context, "quantization_level"),
              priority=loose_str(context, "priority"))


def _params(msg: Mapping[str, Any]) -> Params:
    """Generation parameters for translation; ``params`` keys the shim does not know, or
    of a type it cannot read, are left out (they still reach an MMA backend untouched).
    A top-level ``max_tokens`` counts when ``params`` has none."""
    raw = loose_dict(msg, "params")
    fields = {k: v for k, v in raw.items() if k in Params.__struct_fields__}
    if "max_tokens" not in fields and "max_tokens" in msg:
        fields["max_tokens"] = msg["max_tokens"]
    if not fields:
        return NO_PARAMS
    try:
        return msgspec.convert(fields, Params, strict=False)
    except (msgspec.ValidationError, TypeError, ValueError):
        good = {}
        for key, value in fields.items():
            try:
                msgspec.convert({key: value}, Params, strict=False)
            except (msgspec.ValidationError, TypeError, ValueError):
                continue
            good[key] = value
        return msgspec.convert(good, Params, strict=False)


def precheck(op: Op) -> Result | None:
    """The failure MMA itself gives an MMA caller's request whatever its state, when a
    backend of another dialect serves it in MMA's stead (the same words and codes MMA
    answers with, protocol.md "MMA dialect"); None when the backend must be asked."""
    if op.kind is Kind.MODEL_ACCESS and op.model_id is None:
        return Result(ok=False, message="model_id is required", error_code="MISSING_MODEL_ID",
                      request_id=op.request_id)
    if op.kind is Kind.GENERATE:
        if op.prompt is None:
            return Result(ok=False, message="Missing 'prompt' field")
        if op.model_id is None:
            return Result(ok=False, message=f"No model found for preference: {op.model_pref}")
    if op.kind in (Kind.LOAD, Kind.UNLOAD) and op.model_id is None:
        return Result(ok=False, message="Missing 'model_name' field")
    return None


def _shape(op: Op) -> Kind:
    """Which MMA request serves ``op``: its own kind for an MMA caller."""
    if op.dialect == NAME:
        return op.kind
    shape = _FROM_OTHERS.get(op.kind)
    if shape is None:
        raise Unsupported(f"MMA has no equivalent of {op.dialect.upper()} action {op.name!r}")
    return shape


def render_request(op: Op, policy: Mapping[str, str]) -> list[dict[str, Any]]:
    """The MMA request for another dialect's caller's operation (an MMA caller's goes as
    it came, without coming here)."""
    if op.dialect == NAME:
        return [op.raw]
    shape = _shape(op)
    if shape is Kind.GENERATE:
        pref = next((p for p, model in policy.items() if model == op.model_id), None)
        if pref is None:
            raise Unsupported(f"MMA picks models by preference and no preference maps to "
                              f"{op.model_id!r}")
        p = op.params
        params: dict[str, Any] = {}
        # The caller's own manager's default, explicitly: MMA's (256) may differ from it.
        max_tokens = p.max_tokens if p.max_tokens is not None else \
            base.get(op.dialect).default_max_tokens
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        if p.temperature is not None:
            params["temperature"] = p.temperature
        if p.top_p is not None:
            params["top_p"] = p.top_p
        if p.stop is not None:
            params["stop"] = p.stop
        req: dict[str, Any] = {"action": "generate", "model_pref": pref, "params": params}
        if op.prompt is not None:  # else MMA answers "Missing 'prompt' field" itself
            # MMA has no system prompt: it leads the prompt, as a chat template would put it.
            req["prompt"] = (f"{p.system_prompt}\n\n{op.prompt}" if p.system_prompt
                             else op.prompt)
        if op.conversation_id is not None:
            req["conversation_id"] = op.conversation_id
        return [req]
    if shape is Kind.LOAD:
        return [{"command": "LOAD_MODEL", "model_name": op.model_id}]
    if shape is Kind.UNLOAD:
        return [{"command": "UNLOAD_MODEL", "model_name": op.model_id}]
    if shape is Kind.LOADED_STATUS:
        return [{"command": "GET_LOADED_MODELS_STATUS"}]
    return [{"action": "status"}]


# --- replies ------------------------------------------------------------------------


def parse_reply(op: Op, replies: list[Any]) -> Result:
    """Read MMA's reply to the request ``render_request`` made for ``op``.

    Raises Malformed (or Unsupported) for a reply that cannot be read; the caller turns
    those into a failed Result.
    """
    shape = _shape(op)
    if len(replies) != 1:
        raise Malformed(f"expected 1 MMA reply, got {len(replies)}")
    reply = replies[0]
    if not isinstance(reply, dict):
        raise Malformed("MMA reply is not a JSON object")
    status = reply.get("status")
    if shape is Kind.OTHER:
        return Result(ok=status in _SUCCESS, source=NAME, raw=replies)
    if shape is Kind.MODEL_ACCESS:
        return _access(op, reply, replies)
    if status in _SUCCESS:
        result = Result(ok=True, source=NAME, raw=replies)
        _READERS[shape](op, reply, result)
        return result
    if status in ("error", "ERROR") or "error_message" in reply:
        return Result(ok=False, source=NAME, raw=replies,
                      message=error_text(reply, "MMA reported an error"))
    raise Malformed(f"unexpected status {status!r}")


# MMA's replies as it sends them (protocol.md "MMA dialect"): only the fields the shim
# reads, each of the JSON type MMA documents (null reads as absent); anything else in a
# reply is skipped here and carried over as it came by ``render_reply``. A present field
# of another type makes the reply unusable (Malformed, via ``wire``).

Number = int | float
Timestamp = int | float | str  # epoch floats and ISO strings, depending on the reply


class GenerateReply(msgspec.Struct):
    response_text: str | None = None
    model_used: str | None = None
    conversation_id: str | None = None
    timestamp: Timestamp | None = None


class ClearReply(msgspec.Struct):
    message: str | None = None
    conversation_id: str | None = None


class LoadedEntry(msgspec.Struct):
    """One ``loaded_models`` entry."""

    vram_usage_mb: Number | None = None
    last_used: Number | None = None
    device: str | None = None
    quantization: str | None = None
    is_active: bool | None = None


class LoadedReply(msgspec.Struct):
    """GET_LOADED_MODELS_STATUS, and the first half of ``status``."""

    loaded_models: dict[str, LoadedEntry] | None = None
    total_models: int | None = None
    total_vram_used_mb: Number | None = None
    total_vram_mb: Number | None = None


class StatusReply(LoadedReply):
    routing_policy: dict[str, Any] | None = None
    health: str | None = None
    timestamp: Timestamp | None = None


class LoadReply(msgspec.Struct):
    message: str | None = None


class HealthCheckReply(msgspec.Struct):
    """HEALTH_CHECK on the main socket (``loaded_models`` is a count here)."""

    health: str | None = None
    uptime_seconds: Number | None = None
    loaded_models: int | None = None
    total_vram_used_mb: Number | None = None
    total_vram_mb: Number | None = None
    timestamp: Timestamp | None = None


class AccessInfoReply(msgspec.Struct):
    message: str | None = None
    model_path_from_config: str | None = None
    vram_allocated_mb: Number | None = None
    quantization_level: str | None = None
    priority: str | None = None


class AccessReply(msgspec.Struct):
    """MODEL_READY / ERROR_LOADING_MODEL. ``request_id`` is echoed loosely (string or
    integer); ``error_code`` is taken when it is a string."""

    status: Any = None
    request_id: Any = None
    model_id: str | None = None
    timestamp: Timestamp | None = None
    access_info: AccessInfoReply | None = None
    error_code: Any = None


def _read_generate(op: Op, reply: dict[str, Any], r: Result) -> None:
    g = wire(reply, GenerateReply)
    if g.response_text is None:
        raise Malformed("generate reply has no 'response_text'")
    r.text = g.response_text
    r.model_id = g.model_used or op.model_id
    r.conversation_id = g.conversation_id
    r.timestamp = g.timestamp


def _read_clear(op: Op, reply: dict[str, Any], r: Result) -> None:
    c = wire(reply, ClearReply)
    r.message = c.message
    r.conversation_id = c.conversation_id


def _loaded(rep: LoadedReply, r: Result) -> None:
    if rep.loaded_models is None:
        raise Malformed("reply has no 'loaded_models'")
    r.loaded_models = {
        model_id: ModelInfo(
            vram_mb=e.vram_usage_mb or 0,
            last_used=e.last_used,
            device=e.device or "unknown",
            quantization=e.quantization or "unknown",
            is_active=True if e.is_active is None else e.is_active,
        )
        for model_id, e in rep.loaded_models.items()}
    r.total_models = rep.total_models
    r.vram_used_mb = rep.total_vram_used_mb
    r.vram_budget_mb = rep.total_vram_mb


def _read_loaded(op: Op, reply: dict[str, Any], r: Result) -> None:
    _loaded(wire(reply, LoadedReply), r)


def _read_status(op: Op, reply: dict[str, Any], r: Result) -> None:
    s = wire(reply, StatusReply)
    _loaded(s, r)
    r.routing_policy = s.routing_policy
    r.health = s.health
    r.timestamp = s.timestamp


def _read_load(op: Op, reply: dict[str, Any], r: Result) -> None:
    r.loaded = True
    r.model_id = op.model_id
    r.message = wire(reply, LoadReply).message


def _read_health(op: Op, reply: dict[str, Any], r: Result) -> None:
    h = wire(reply, HealthCheckReply)
    r.health = h.health
    r.uptime_s = None if h.uptime_seconds is None else float(h.uptime_seconds)
    r.loaded_count = h.loaded_models
    r.vram_used_mb = h.total_vram_used_mb
    r.vram_budget_mb = h.total_vram_mb
    r.timestamp = h.timestamp


_READERS = {
    Kind.GENERATE: _read_generate,
    Kind.CLEAR_CONVERSATION: _read_clear,
    Kind.STATUS: _read_status,
    Kind.LOADED_STATUS: _read_loaded,
    Kind.LOAD: _read_load,
    Kind.UNLOAD: _read_load,
    Kind.HEALTH: _read_health,
}


def _access(op: Op, reply: dict[str, Any], replies: list[Any]) -> Result:
    a = wire(reply, AccessReply)
    rid = loose_id(a.request_id)
    result = Result(ok=a.status == "MODEL_READY", source=NAME, raw=replies,
                    request_id=rid if rid is not None else op.request_id,
                    model_id=a.model_id or op.model_id, timestamp=a.timestamp)
    if result.ok:
        info = a.access_info or AccessInfoReply()
        result.access_info = AccessInfo(
            message=info.message,
            model_path_from_config=info.model_path_from_config,
            vram_allocated_mb=info.vram_allocated_mb,
            quantization_level=info.quantization_level,
            priority=info.priority,
        )
    elif a.status in ("ERROR_LOADING_MODEL", "ERROR", "error"):
        result.message = error_text(reply, "MMA could not load the model")
        result.error_code = a.error_code if isinstance(a.error_code, str) \
            else "PROCESSING_ERROR"
    else:
        raise Malformed(f"unexpected status {a.status!r}")
    return result


def render_reply(op: Op, r: Result) -> dict[str, Any]:
    """``r`` as the MMA reply to ``op``, in the form the caller used.

    When MMA itself produced the result, keys of its reply that the canonical model does
    not cover are carried over, so MMA -> MMA loses nothing.
    """
    if op.kind is Kind.OTHER and r.source == NAME:
        reply = r.raw[0] if len(r.raw) == 1 else None
        if isinstance(reply, dict):
            return reply
    if not r.ok:
        return _failure(op, r)
    out = _RENDERERS[op.kind](op, r)
    if r.source == NAME and len(r.raw) == 1 and isinstance(r.raw[0], dict):
        for key, value in r.raw[0].items():
            if key not in out:
                out[key] = value
    return out


def _failure(op: Op, r: Result) -> dict[str, Any]:
    message = r.message or "request failed"
    if op.form is Form.MODEL_ACCESS:
        return error_body(op.form, r.error_code or access_error_code(message), message,
                          r.request_id if r.request_id is not None else op.request_id,
                          r.model_id or op.model_id, _iso(r.timestamp))
    return error_body(op.form, r.error_code, message)


def access_error_code(message: str) -> str:
    """MMA's model-access ``error_code`` (protocol.md, MMA 5) for a failure another
    dialect's backend reported only in words (e.g. MMS's load_model message)."""
    text = message.lower()
    if any(s in text for s in ("unknown model", "not found", "no such model", "not in config",
                               "not configured")):
        return "MODEL_NOT_FOUND"
    if any(s in text for s in ("vram", "memory", "insufficient", "budget")):
        return "INSUFFICIENT_VRAM"
    return "PROCESSING_ERROR"


def error_body(form: Form, code: str | None, message: str, request_id: object = None,
               model_id: object = None, timestamp: str | None = None) -> dict[str, Any]:
    """An error reply in an MMA form; ``error_code`` only when there is one."""
    if form is Form.MODEL_ACCESS:
        return {"status": "ERROR_LOADING_MODEL", "request_id": request_id, "model_id": model_id,
                "error_message": message, "error_code": code or "PROCESSING_ERROR",
                "timestamp": timestamp or _iso(None)}
    out: dict[str, Any] = {"status": "ERROR" if form is Form.COMMAND else "error",
                           "message": message}
    if code is not None:
        out["error_code"] = code
    return out


def _epoch(ts: float | str | None) -> float:
    return ts if isinstance(ts, int | float) else time.time()


def _iso(ts: float | str | None) -> str:
    return ts if isinstance(ts, str) else datetime.now().isoformat()


def _models(r: Result) -> dict[str, dict[str, Any]]:
    return {
        model_id: {
            "vram_usage_mb": m.vram_mb,
            "device": m.device,
            "last_used": m.last_used if m.last_used is not None else 0.0,
            "is_active": m.is_active,
            "quantization": m.quantization,
        }
        for model_id, m in (r.loaded_models or {}).items()
    }


def _render_loaded(op: Op, r: Result, status: str = "SUCCESS") -> dict[str, Any]:
    loaded = r.loaded_models or {}
    used = r.vram_used_mb
    if used is None:
        used = sum(m.vram_mb for m in loaded.values())
    return {
        "status": status,
        "loaded_models": _models(r),
        "total_models": r.total_models if r.total_models is not None else len(loaded),
        "total_vram_used_mb": used,
        "total_vram_mb": r.vram_budget_mb if r.vram_budget_mb is not None else 0,
    }


def _render_status(op: Op, r: Result) -> dict[str, Any]:
    out = _render_loaded(op, r, "ok")
    out["routing_policy"] = r.routing_policy if r.routing_policy is not None else dict(op.policy)
    out["health"] = r.health or "ok"
    out["timestamp"] = _epoch(r.timestamp)
    return out


def _render_generate(op: Op, r: Result) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "ok", "response_text": r.text or "",
                           "model_used": r.model_id or op.model_id or "",
                           "timestamp": _epoch(r.timestamp)}
    if op.conversation_id is not None:
        out["conversation_id"] = r.conversation_id or op.conversation_id
        out["using_kv_cache"] = True
    return out


def _render_clear(op: Op, r: Result) -> dict[str, Any]:
    cid = r.conversation_id or op.conversation_id
    return {"status": "ok", "message": r.message or f"Conversation {cid} cleared",
            "conversation_id": cid}


def _render_load(op: Op, r: Result) -> dict[str, Any]:
    verb = "loaded" if op.kind is Kind.LOAD else "unloaded"
    return {"status": "SUCCESS", "message": r.message or f"Model {op.model_id} {verb}"}


def _render_health(op: Op, r: Result) -> dict[str, Any]:
    """MMA's HEALTH_CHECK reply: status and health, then the figures the backend gave."""
    reply: dict[str, Any] = {"status": "SUCCESS", "health": r.health or "ok"}
    extras = (("uptime_seconds", r.uptime_s), ("loaded_models", r.loaded_count),
              ("total_vram_used_mb", r.vram_used_mb), ("total_vram_mb", r.vram_budget_mb),
              ("timestamp", None if r.timestamp is None else _epoch(r.timestamp)))
    reply.update((key, value) for key, value in extras if value is not None)
    return reply


def _render_access(op: Op, r: Result) -> dict[str, Any]:
    info = r.access_info or AccessInfo()
    return {
        "status": "MODEL_READY",
        "request_id": r.request_id if r.request_id is not None else op.request_id,
        "model_id": r.model_id or op.model_id,
        "access_info": {
            "message": info.message,
            "model_path_from_config": info.model_path_from_config,
            "vram_allocated_mb": info.vram_allocated_mb,
            "quantization_level": info.quantization_level,
            "priority": info.priority,
        },
        "timestamp": _iso(r.timestamp),
    }


def _render_other(op: Op, r: Result) -> dict[str, Any]:
    # Only reached when the backend's reply was not an object.
    return _failure(op, Result(ok=False, message="backend reply is not a JSON object",
                               error_code=Code.BAD_REPLY))


_RENDERERS = {
    Kind.GENERATE: _render_generate,
    Kind.CLEAR_CONVERSATION: _render_clear,
    Kind.STATUS: _render_status,
    Kind.LOADED_STATUS: _render_loaded,
    Kind.LOAD: _render_load,
    Kind.UNLOAD: _render_load,
    Kind.HEALTH: _render_health,
    Kind.MODEL_ACCESS: _render_access,
    Kind.OTHER: _render_other,
}


# --- health ------------------------------------------------------------------------


class _HealthDetails(msgspec.Struct):
    vram_used_mb: float | None = None
    vram_budget_mb: float | None = None


class _HealthReply(msgspec.Struct):
    """MMA's health-socket reply: ``{"status": "ok", "details": {...}}`` (protocol.md)."""

    status: str | None = None
    details: _HealthDetails | None = None
    vram_used_mb: float | None = None
    vram_budget_mb: float | None = None


def read_health(reply: object) -> HealthView:
    """MMA's health reply read: its status, and VRAM figures when it reports any (at the
    top level or under ``details``); an unreadable reply reads as no figures."""
    try:
        r = msgspec.convert(reply, _HealthReply)
    except msgspec.ValidationError:
        return HealthView()
    details = r.details or _HealthDetails()
    return HealthView(
        status=r.status,
        vram_used_mb=r.vram_used_mb if r.vram_used_mb is not None else details.vram_used_mb,
        vram_budget_mb=r.vram_budget_mb if r.vram_budget_mb is not None
        else details.vram_budget_mb)


# --- the dialect -------------------------------------------------------------------


def form_of(msg: object) -> Form:
    """ACTION for ``{"action"}`` (and anything that is not an object), COMMAND for
    ``{"command"}``, else MODEL_ACCESS."""
    if not isinstance(msg, dict) or "action" in msg:
        return Form.ACTION
    return Form.COMMAND if "command" in msg else Form.MODEL_ACCESS


def error_reply(form: Form, code: str, message: str,
                request: dict[str, Any] | None) -> dict[str, Any]:
    """The shim's own error in an MMA form: ``{"status": "error"|"ERROR", "message",
    "error_code"}``; MODEL_ACCESS: MMA's ERROR_LOADING_MODEL shape, echoing the request's
    ``request_id`` and ``model_id`` (null when absent)."""
    if form is Form.MODEL_ACCESS:
        req = request if isinstance(request, dict) else {}
        return error_body(form, code, message, req.get("request_id"), req.get("model_id"),
                          datetime.now().isoformat())
    return error_body(form, code, message)


class MMA:
    """The MMA dialect as a ``shim.dialects.base.Dialect``."""

    name = NAME
    forms = frozenset({Form.ACTION, Form.COMMAND, Form.MODEL_ACCESS})
    kinds = frozenset(_FROM_OTHERS)
    clears_conversations = True
    default_max_tokens: int | None = DEFAULT_MAX_TOKENS
    #: MMA's health socket answers any bytes; its own word for the probe is HEALTH_CHECK.
    health_request = b'{"command": "HEALTH_CHECK"}'

    def claims(self, msg: Mapping[str, Any]) -> bool:
        """MMA reads any object (one with neither action nor command is model access)."""
        return True

    def form_of(self, msg: object) -> Form:
        return form_of(msg)

    def parse_request(self, msg: dict[str, Any], policy: Mapping[str, str]) -> Op:
        return parse_request(msg, policy)

    def precheck(self, op: Op) -> Result | None:
        return precheck(op)

    def render_request(self, op: Op, policy: Mapping[str, str]) -> list[dict[str, Any]]:
        return render_request(op, policy)

    def parse_reply(self, op: Op, replies: list[Any]) -> Result:
        return parse_reply(op, replies)

    def render_reply(self, op: Op, result: Result) -> dict[str, Any]:
        return render_reply(op, result)

    def error_reply(self, form: Form, code: str, message: str,
                    request: dict[str, Any] | None) -> dict[str, Any]:
        return error_reply(form, code, message, request)

    def read_health(self, reply: object) -> HealthView:
        return read_health(reply)


DIALECT = register(MMA())

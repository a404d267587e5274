"""Canonical operations and results: the one vocabulary both dialects translate through.

A request in either dialect parses into an :class:`Op`; the backend replies to it parse
into a :class:`Result`; the reply the caller gets is rendered from the ``Result`` in the
caller's own dialect and form. Every documented field of either dialect has a home here,
so that MMA -> canonical -> MMA and MMS -> canonical -> MMS keep every documented key and
value type. Numbers are kept as received (``int`` stays ``int``); only the MMS parser
normalises megabyte figures to whole numbers, because the MMA dialect carries them as
integers.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any, TypeVar

import msgspec

from shim.errors import Malformed

Dialect = str
"""A wire dialect's registered name (``shim.dialects.base``): ``"mma"`` (legacy
ModelManagerAgent), ``"mms"`` (ModelManagerSuite), or a deployment's own."""


class Kind(StrEnum):
    """What a request asks for, independent of dialect."""

    GENERATE = "generate"
    LOAD = "load"
    UNLOAD = "unload"
    LOADED_STATUS = "loaded_status"  # MMA GET_LOADED_MODELS_STATUS, MMS get_loaded_models_status
    STATUS = "status"  # MMA {"action": "status"}: the full status
    HEALTH = "health"  # MMA HEALTH_CHECK, MMS health_check
    MODEL_ACCESS = "model_access"  # MMA {model_id, request_id, context}, no action/command
    CLEAR_CONVERSATION = "clear_conversation"
    LIST_MODELS = "list_models"  # MMS list_models
    OTHER = "other"  # opaque: only ever passed through to a backend of the caller's dialect


class Form(StrEnum):
    """How the caller asked; decides the shape of its replies and errors."""

    ACTION = "action"  # MMA {"action": ...}: lower-case "ok"/"error"
    COMMAND = "command"  # MMA {"command": ...}: upper-case "SUCCESS"/"ERROR"
    MODEL_ACCESS = "model_access"  # MMA {model_id, ...}: MODEL_READY/ERROR_LOADING_MODEL
    MMS = "mms"  # an MMS-dialect caller: "success"/"error"


class Params(msgspec.Struct, frozen=True, omit_defaults=True):
    """Generation parameters. ``None`` means "not given": the backend's default applies."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    system_prompt: str | None = None


NO_PARAMS = Params()


class Op(msgspec.Struct, kw_only=True):
    """One parsed request.

    ``raw`` is the request as received (never mutated): it is what goes to a backend of
    the caller's own dialect. ``policy`` is the model_pref -> model map in force when the
    request was parsed (a reference, not a copy); MMA's status reply reports it.
    """

    kind: Kind
    form: Form
    dialect: Dialect
    raw: dict[str, Any]
    policy: Mapping[str, str]
    name: str | None = None  # the action or command as sent (the only identity of OTHER)
    model_id: str | None = None  # resolved from model_pref through the policy when needed
    model_pref: str | None = None
    prompt: str | None = None
    params: Params = NO_PARAMS
    conversation_id: str | None = None
    request_id: str | int | None = None
    quantization: str | None = None  # MMA model access context.quantization_level
    priority: str | None = None  # MMA model access context.priority


class ModelInfo(msgspec.Struct, kw_only=True):
    """One model as either dialect describes it (loaded entry or catalogue entry)."""

    vram_mb: int | float = 0  # MMA vram_usage_mb, MMS vram_usage / estimated_vram_mb
    last_used: float | None = None
    device: str = "unknown"  # MMS does not report a device per model
    quantization: str = "unknown"  # MMS does not report a quantization
    is_active: bool = True
    status: str = "online"  # MMS ledger state: online, available_not_loaded, loading, error
    type: str = "unknown"  # MMS model type (MMA does not report one)
    loaded: bool = True


class AccessInfo(msgspec.Struct, kw_only=True):
    """The ``access_info`` of an MMA MODEL_READY reply (values kept as MMA sent them)."""

    message: str | None = None
    model_path_from_config: str | None = None
    vram_allocated_mb: int | float | None = None
    #: As the caller or backend sent them: the legacy endpoint echoed ints too.
    quantization_level: str | int | None = None
    priority: str | int | None = None


class Result(msgspec.Struct, kw_only=True):
    """The canonical outcome of one operation.

    ``ok`` False means the caller gets an error reply carrying ``message`` (and
    ``error_code`` when set: MMA model-access codes, or ``SHIM_*`` when the shim itself
    judged the backend's reply unusable). ``source`` names who produced the data
    (``"mma"``, ``"mms"`` or ``"shim"``); ``raw`` holds the backend replies as received.
    Fields a backend did not report stay ``None`` and are defaulted at rendering.
    """

    ok: bool
    source: str = "shim"
    message: str | None = None
    error_code: str | None = None
    raw: list[Any] = msgspec.field(default_factory=list)
    # generate
    text: str | None = None
    model_id: str | None = None
    tokens_generated: int | None = None
    conversation_id: str | None = None
    # load / unload: did the state change happen
    loaded: bool | None = None
    # status
    loaded_models: dict[str, ModelInfo] | None = None
    models: dict[str, ModelInfo] | None = None  # the full catalogue (MMS list_models)
    total_models: int | None = None
    online_models: int | None = None
    loaded_count: int | None = None  # MMS health_check "loaded_models" (a count)
    vram_used_mb: int | float | None = None
    vram_budget_mb: int | float | None = None
    health: str | None = None  # canonical: "ok" or "degraded" (MMA's value kept as sent)
    uptime_s: float | None = None  # MMA HEALTH_CHECK uptime_seconds (MMS does not report it)
    model_details: dict[str, Any] | None = None
    routing_policy: dict[str, Any] | None = None
    # model access
    request_id: str | int | None = None
    access_info: AccessInfo | None = None
    timestamp: float | str | None = None  # the backend's own, when it sent one


# --- reading wire messages ------------------------------------------------------------

T = TypeVar("T")


def wire(reply: object, shape: type[T]) -> T:
    """A backend reply (decoded JSON) read as the dialect's msgspec Struct ``shape``
    (strict types: msgspec's ``convert``); Malformed, naming the field, when it is not."""
    try:
        return msgspec.convert(reply, shape)
    except msgspec.ValidationError as exc:
        raise Malformed(str(exc)) from None


# --- loose request fields -----------------------------------------------------------
# Requests are read as loosely as the legacy endpoint read them (protocol.md, "Field
# types are loose"): only what routing and translation need, the request itself goes on
# untouched, so an odd type reads as absent rather than refusing the request.


def loose_str(msg: Mapping[str, Any], key: str) -> str | None:
    """``msg[key]`` read as loosely as the legacy endpoint did (protocol.md, "Field types
    are loose"): a string as it is, a number as its text (``123`` -> ``"123"``), anything
    else as absent. Never raises: only what routing needs is decoded, the request itself
    goes on untouched."""
    value = msg.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def loose_dict(msg: Mapping[str, Any], key: str) -> dict[str, Any]:
    """``msg[key]`` when it is an object, else ``{}`` (a string ``context`` is accepted)."""
    value = msg.get(key)
    return value if isinstance(value, dict) else {}


def loose_id(value: object) -> str | int | None:
    """A ``request_id`` when it is a string or an integer (echoed as sent), else None."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return None


def request_id_of(msg: Mapping[str, Any]) -> str | int | None:
    """The caller's ``request_id`` when it is a string or an integer (echoed as sent)."""
    return loose_id(msg.get("request_id"))


def error_text(reply: Mapping[str, Any], default: str) -> str:
    """The error message of a failure reply, whichever key the backend used.

    MMA uses ``message`` (``error_message`` when an exception escaped), MMS ``message``
    (``error`` in the deployed generate_text bug). Any type is accepted: the caller gets an
    error either way, better with the backend's words in it.
    """
    for key in ("message", "error_message", "error"):
        value = reply.get(key)
        if isinstance(value, str) and value:
            return value
        if value is not None and not isinstance(value, str):
            return str(value)
    return default

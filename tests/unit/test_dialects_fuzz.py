"""Robustness of shim.dialects on arbitrary input (hypothesis).

parse_request may only raise BadRequest, render_request only Unsupported; parse_reply and
render_reply never raise and always give a sendable reply with a ``status``.
"""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from shim.dialects import Kind, parse_reply, parse_request, render_reply, render_request
from shim.errors import BadRequest, Unsupported

POLICY = {"fast": "phi-2", "quality": "mistral-7b", "stt": "whisper-small"}

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
KEYS = ["action", "command", "model_id", "model_name", "model_pref", "prompt", "params",
        "conversation_id", "request_id", "context", "max_tokens", "temperature", "top_p",
        "stop", "system_prompt", "status", "text", "response_text", "model_used", "loaded",
        "unloaded", "loaded_models", "models", "message", "error", "error_message",
        "error_code", "access_info", "timestamp", "health", "total_models", "vram_used_mb",
        "vram_budget_mb", "total_vram_mb", "total_vram_used_mb", "routing_policy",
        "tokens_generated", "model_details", "online_models"]
NAMES = ["generate", "generate_text", "status", "clear_conversation", "load_model",
         "unload_model", "list_models", "health_check", "get_loaded_models_status",
         "get_stats", "select_model", "GET_LOADED_MODELS_STATUS", "LOAD_MODEL",
         "UNLOAD_MODEL", "HEALTH_CHECK", "ok", "success", "SUCCESS", "error", "ERROR",
         "healthy", "degraded", "MODEL_READY", "ERROR_LOADING_MODEL", "phi-2", "fast"]
values = st.sampled_from(NAMES) | json_values
model_entry = st.dictionaries(
    st.sampled_from(["vram_usage", "vram_usage_mb", "last_used", "status", "device",
                     "is_active", "quantization", "model_id", "estimated_vram_mb", "loaded",
                     "type"]), values, max_size=6)
messages = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6),
                           values | st.dictionaries(st.sampled_from(NAMES), model_entry,
                                                    max_size=2)
                           | st.lists(model_entry, max_size=2),
                           max_size=8)
replies = st.lists(messages | json_values, max_size=3)


def _check(op: Any, out: Any) -> None:
    assert isinstance(out, dict)
    assert "status" in out or op.kind is Kind.OTHER
    msgspec.json.encode(out)


def _op(msg: dict[str, Any]) -> Any:
    try:
        return parse_request(msg, POLICY)
    except BadRequest:
        return None


@settings(max_examples=200, deadline=None)
@given(messages)
def test_parse_and_render_request_raise_only_documented_errors(msg: dict[str, Any]) -> None:
    op = _op(msg)
    if op is None:
        return
    for target in ("mma", "mms"):
        try:
            out = render_request(op, target, POLICY)
        except Unsupported:
            continue
        assert all(isinstance(r, dict) for r in out)
        msgspec.json.encode(out)


@settings(max_examples=300, deadline=None)
@given(messages, replies, st.sampled_from(["mma", "mms"]))
def test_any_reply_gives_a_sendable_reply(msg: dict[str, Any], got: list[Any],
                                          target: str) -> None:
    op = _op(msg)
    if op is None:
        return
    result = parse_reply(op, target, got)
    out = render_reply(op, result)
    _check(op, out)


@settings(max_examples=200, deadline=None)
@given(messages, st.data())
def test_replies_of_the_right_count(msg: dict[str, Any], data: st.DataObject) -> None:
    op = _op(msg)
    if op is None:
        return
    for target in ("mma", "mms"):
        try:
            requests = render_request(op, target, POLICY)
        except Unsupported:
            continue
        got = data.draw(st.lists(messages, min_size=len(requests), max_size=len(requests)))
        _check(op, render_reply(op, parse_reply(op, target, got)))

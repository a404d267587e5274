"""Translation between the MMA and MMS dialects (shim.dialects), table-driven.

Sample replies are copied from protocol.md (MMA) or shaped after its MMS table. Where a
translated reply stands in for a backend's own, its keys and value types are compared
with that backend's sample, field by field.
"""

from __future__ import annotations

import copy
from datetime import datetime
from typing import Any

import msgspec
import pytest

from shim.dialects import (
    Form,
    Kind,
    detect_dialect,
    error_reply,
    form_of,
    parse_reply,
    parse_request,
    render_reply,
    render_request,
)
from shim.errors import BadRequest, Unsupported

POLICY = {"fast": "phi-2", "quality": "mistral-7b", "fallback": "tinyllama",
          "stt": "whisper-small", "tts": "piper"}
T = 1764400000.123


def shape(value: Any) -> Any:
    """Keys and value types, recursively: what "same shape" means for replies."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


def roundtrip(msg: dict[str, Any], target: str, replies: list[Any]) -> dict[str, Any]:
    op = parse_request(msg, POLICY)
    out = render_reply(op, parse_reply(op, target, replies))
    msgspec.json.encode(out)  # always sendable
    return out


# --- samples ----------------------------------------------------------------------------

MMA_GENERATE = {"action": "generate", "model_pref": "fast", "prompt": "hi there",
                "params": {"max_tokens": 256, "temperature": 0.7, "top_p": 0.95},
                "conversation_id": "c1"}
MMA_GENERATE_OK = {"status": "ok", "response_text": "hello you", "model_used": "phi-2",
                   "timestamp": T, "conversation_id": "c1", "using_kv_cache": True}
MMA_CLEAR = {"action": "clear_conversation", "conversation_id": "c1"}
MMA_CLEAR_OK = {"status": "ok", "message": "Conversation c1 cleared", "conversation_id": "c1"}
LOADED = {"phi-2": {"vram_usage_mb": 2250, "device": "cuda:0", "last_used": 1764400000.0,
                    "is_active": True, "quantization": "int8"}}
MMA_STATUS_OK = {"status": "ok", "loaded_models": LOADED, "total_models": 4,
                 "total_vram_used_mb": 2250, "total_vram_mb": 19660,
                 "routing_policy": {"fast": "phi-2", "quality": "mistral-7b"}, "health": "ok",
                 "timestamp": 1764400000.0}
MMA_LOADED_OK = {"status": "SUCCESS", "loaded_models": LOADED, "total_models": 4,
                 "total_vram_used_mb": 2250, "total_vram_mb": 19660}
MMA_LOAD = {"command": "LOAD_MODEL", "model_name": "phi-2", "device": "MainPC",
            "quantization_level": "FP16"}
MMA_UNLOAD = {"command": "UNLOAD_MODEL", "model_name": "phi-2"}
MMA_CMD_OK = {"status": "SUCCESS", "message": "Model phi-2 loaded"}
MMA_CMD_ERR = {"status": "ERROR", "message": "Model phi-9 not found"}
MMA_HEALTH_OK = {"status": "SUCCESS", "health": "ok"}
MMA_ACCESS = {"model_id": "whisper-small", "request_id": "r1",
              "context": {"quantization_level": "int8"}}
MMA_ACCESS_OK = {"status": "MODEL_READY", "request_id": "r1", "model_id": "whisper-small",
                 "access_info": {"message": "MMA approved model loading",
                                 "model_path_from_config": "models/whisper-small",
                                 "vram_allocated_mb": 1000, "quantization_level": "int8",
                                 "priority": "normal"},
                 "timestamp": "2026-11-29T10:00:00"}
MMA_ACCESS_ERR = {"status": "ERROR_LOADING_MODEL", "request_id": "r1",
                  "model_id": "whisper-small", "error_message": "Not enough VRAM",
                  "error_code": "INSUFFICIENT_VRAM", "timestamp": "2026-11-29T10:00:00"}

MMS_GENERATE_OK = {"status": "success", "text": "hello you", "model_id": "phi-2",
                   "tokens_generated": 2, "conversation_id": "c1"}
MMS_LOAD_OK = {"status": "success", "loaded": True, "message": "Model phi-2 loaded"}
MMS_UNLOAD_OK = {"status": "success", "unloaded": True}
MMS_LOADED_OK = {"status": "success", "loaded_models": {
    "phi-2": {"status": "online", "last_used": 1764400000.0, "vram_usage": 2250}}}
MMS_HEALTH_OK = {"status": "healthy", "total_models": 4, "online_models": 1,
                 "loaded_models": 1, "vram_used_mb": 2250, "vram_budget_mb": 19660,
                 "model_details": {"phi-2": {"status": "online", "message": "Model is loaded"}},
                 "timestamp": 1764400000.0}
MMS_LIST_OK = {"status": "success", "models": [
    {"model_id": "phi-2", "type": "llm", "estimated_vram_mb": 2250, "loaded": True,
     "status": "online", "last_used": 1764400000.0},
    {"model_id": "whisper-small", "type": "stt", "estimated_vram_mb": 1000, "loaded": False,
     "status": "available_not_loaded"}]}


# --- detection and parsing --------------------------------------------------------------


@pytest.mark.parametrize(("msg", "dialect", "form"), [
    (MMA_GENERATE, "mma", Form.ACTION),
    ({"action": "status"}, "mma", Form.ACTION),
    ({"action": "whatever"}, "mma", Form.ACTION),
    ({"action": 5}, "mma", Form.ACTION),
    (MMA_LOAD, "mma", Form.COMMAND),
    (MMA_ACCESS, "mma", Form.MODEL_ACCESS),
    ({}, "mma", Form.MODEL_ACCESS),
    ({"action": "generate_text", "model_id": "phi-2"}, "mms", Form.MMS),
    ({"action": "get_stats"}, "mms", Form.MMS),
    ({"action": "health_check"}, "mms", Form.MMS),
])
def test_detect_dialect_and_form(msg: dict[str, Any], dialect: str, form: Form) -> None:
    assert detect_dialect(msg) == dialect
    assert form_of(msg) is form


@pytest.mark.parametrize("msg", [None, 3, "x", [1], b"raw"])
def test_form_of_non_object_is_action(msg: object) -> None:
    assert form_of(msg) is Form.ACTION


@pytest.mark.parametrize(("msg", "kind", "form", "model_id"), [
    (MMA_GENERATE, Kind.GENERATE, Form.ACTION, "phi-2"),
    ({"action": "generate", "model_pref": "quality", "prompt": "x"}, Kind.GENERATE,
     Form.ACTION, "mistral-7b"),
    ({"action": "generate", "model_pref": "nope", "prompt": "x"}, Kind.GENERATE, Form.ACTION,
     "phi-2"),  # unknown pref falls back to fast
    ({"action": "generate", "prompt": "x"}, Kind.GENERATE, Form.ACTION, "phi-2"),
    (MMA_CLEAR, Kind.CLEAR_CONVERSATION, Form.ACTION, None),
    ({"action": "status"}, Kind.STATUS, Form.ACTION, None),
    ({"action": "reboot"}, Kind.OTHER, Form.ACTION, None),
    ({"command": "GET_LOADED_MODELS_STATUS"}, Kind.LOADED_STATUS, Form.COMMAND, None),
    (MMA_LOAD, Kind.LOAD, Form.COMMAND, "phi-2"),
    ({"command": "LOAD_MODEL", "model_id": "piper", "priority": "high", "source": "tts"},
     Kind.LOAD, Form.COMMAND, "piper"),
    (MMA_UNLOAD, Kind.UNLOAD, Form.COMMAND, "phi-2"),
    ({"command": "HEALTH_CHECK"}, Kind.HEALTH, Form.COMMAND, None),
    ({"command": "DEFRAG"}, Kind.OTHER, Form.COMMAND, None),
    (MMA_ACCESS, Kind.MODEL_ACCESS, Form.MODEL_ACCESS, "whisper-small"),
    ({"request_id": "r1"}, Kind.MODEL_ACCESS, Form.MODEL_ACCESS, None),
    ({"action": "generate_text", "model_id": "phi-2", "prompt": "x"}, Kind.GENERATE, Form.MMS,
     "phi-2"),
    ({"action": "load_model", "model_id": "phi-2"}, Kind.LOAD, Form.MMS, "phi-2"),
    ({"action": "unload_model", "model_id": "phi-2"}, Kind.UNLOAD, Form.MMS, "phi-2"),
    ({"action": "get_loaded_models_status"}, Kind.LOADED_STATUS, Form.MMS, None),
    ({"action": "health_check"}, Kind.HEALTH, Form.MMS, None),
    ({"action": "list_models"}, Kind.LIST_MODELS, Form.MMS, None),
    ({"action": "select_model", "task_type": "chat"}, Kind.OTHER, Form.MMS, None),
])
def test_parse_request(msg: dict[str, Any], kind: Kind, form: Form,
                       model_id: str | None) -> None:
    op = parse_request(msg, POLICY)
    assert (op.kind, op.form, op.model_id) == (kind, form, model_id)
    assert op.raw is msg


def test_parse_request_fields() -> None:
    op = parse_request(MMA_GENERATE, POLICY)
    assert (op.prompt, op.model_pref, op.conversation_id) == ("hi there", "fast", "c1")
    assert (op.params.max_tokens, op.params.temperature, op.params.top_p) == (256, 0.7, 0.95)
    op = parse_request({"action": "generate_text", "model_id": "m", "prompt": "p",
                        "max_tokens": 9, "temperature": 1, "stop": ["\n"],
                        "system_prompt": "be brief", "request_id": "q"}, POLICY)
    assert op.params.max_tokens == 9 and op.params.temperature == 1.0
    assert op.params.stop == ["\n"] and op.params.system_prompt == "be brief"
    assert op.request_id == "q" and op.name == "generate_text"
    op = parse_request(MMA_ACCESS, POLICY)
    assert (op.request_id, op.quantization, op.priority) == ("r1", "int8", None)


@pytest.mark.parametrize("msg", [
    {"action": ["generate"]},
    {"command": 7},
    {"action": "generate", "model_pref": 3, "prompt": "x"},
    {"action": "generate", "prompt": {"text": "x"}},
    {"action": "generate", "prompt": "x", "params": [256]},
    {"action": "generate", "prompt": "x", "params": {"max_tokens": "lots"}},
    {"action": "generate", "prompt": "x", "params": {"temperature": True}},
    {"action": "generate", "prompt": "x", "conversation_id": 12},
    {"command": "LOAD_MODEL", "model_name": ["phi-2"]},
    {"model_id": 42, "request_id": "r"},
    {"model_id": "m", "context": "int8"},
    {"action": "generate_text", "model_id": "m", "prompt": "x", "max_tokens": 2.5},
    {"action": "load_model", "model_id": {"id": 1}},
])
def test_loose_requests_parse_and_stay_untouched(msg: dict[str, Any]) -> None:
    """protocol.md, "Field types are loose": the legacy endpoint accepted these, so the
    shim reads only what routing needs and passes the request on as it came."""
    before = copy.deepcopy(msg)
    op = parse_request(msg, POLICY)
    assert op.raw is msg and msg == before


def test_loose_fields_read_as_the_legacy_endpoint_did() -> None:
    op = parse_request({"action": "generate", "prompt": "hi", "conversation_id": 123}, POLICY)
    assert op.conversation_id == "123" and op.model_id == POLICY["fast"]
    op = parse_request({"action": "generate", "model_pref": None, "prompt": "hi"}, POLICY)
    assert op.model_pref == "fast" and op.model_id == POLICY["fast"]
    op = parse_request({"action": "generate", "prompt": "hi", "max_tokens": 7}, POLICY)
    assert op.params.max_tokens == 7  # a top-level max_tokens, no params
    op = parse_request({"model_id": "m", "context": {"quantization_level": 8,
                                                     "priority": 5}}, POLICY)
    assert (op.quantization, op.priority) == ("8", "5")
    op = parse_request({"action": "load_model", "model_name": "phi-2"}, POLICY)
    assert op.kind is Kind.LOAD and op.model_id == "phi-2"


def test_parse_request_rejects_non_objects() -> None:
    with pytest.raises(BadRequest):
        parse_request([1, 2], POLICY)  # type: ignore[arg-type]


# --- MMA caller, MMA backend: identity -------------------------------------------------


@pytest.mark.parametrize(("msg", "reply"), [
    (MMA_GENERATE, MMA_GENERATE_OK),
    ({"action": "generate", "prompt": "x"},
     {"status": "ok", "response_text": "y", "model_used": "phi-2", "timestamp": T}),
    ({"action": "generate", "model_pref": "X"},
     {"status": "error", "message": "Missing 'prompt' field"}),
    (MMA_CLEAR, MMA_CLEAR_OK),
    (MMA_CLEAR, {"status": "error", "message": "Unknown conversation c1"}),
    ({"action": "status"}, MMA_STATUS_OK),
    ({"command": "GET_LOADED_MODELS_STATUS"}, MMA_LOADED_OK),
    (MMA_LOAD, MMA_CMD_OK),
    (MMA_LOAD, MMA_CMD_ERR),
    (MMA_UNLOAD, MMA_CMD_OK),
    ({"command": "HEALTH_CHECK"}, MMA_HEALTH_OK),
    ({"command": "HEALTH_CHECK"}, {**MMA_HEALTH_OK, "uptime_seconds": 12.5, "models": 3}),
    (MMA_ACCESS, MMA_ACCESS_OK),
    (MMA_ACCESS, MMA_ACCESS_ERR),
    ({"request_id": "r2"}, {**MMA_ACCESS_ERR, "request_id": "r2", "model_id": None,
                            "error_code": "MISSING_MODEL_ID"}),
    ({"action": "reboot"}, {"status": "error", "message": "Unknown action: reboot"}),
    ({"command": "DEFRAG"}, {"anything": [1, 2]}),
])
def test_mma_to_mma_roundtrip(msg: dict[str, Any], reply: dict[str, Any]) -> None:
    op = parse_request(msg, POLICY)
    requests = render_request(op, "mma", POLICY)
    assert len(requests) == 1 and requests[0] is msg
    sent = copy.deepcopy(reply)
    assert roundtrip(msg, "mma", [sent]) == reply
    assert sent == reply  # not mutated


# --- MMA caller, MMS backend ------------------------------------------------------------


@pytest.mark.parametrize(("msg", "expected"), [
    (MMA_GENERATE, [{"action": "generate_text", "model_id": "phi-2", "prompt": "hi there",
                     "max_tokens": 256, "temperature": 0.7, "top_p": 0.95,
                     "conversation_id": "c1"}]),
    ({"action": "generate", "model_pref": "quality", "prompt": "x"},
     [{"action": "generate_text", "model_id": "mistral-7b", "prompt": "x", "max_tokens": 256}]),
    ({"action": "generate", "model_pref": "stt", "prompt": "x", "params": {"max_tokens": 9}},
     [{"action": "generate_text", "model_id": "whisper-small", "prompt": "x",
       "max_tokens": 9}]),
    (MMA_LOAD, [{"action": "load_model", "model_id": "phi-2"}]),
    ({"command": "LOAD_MODEL", "model_id": "piper", "priority": "high"},
     [{"action": "load_model", "model_id": "piper"}]),
    (MMA_UNLOAD, [{"action": "unload_model", "model_id": "phi-2"}]),
    ({"command": "GET_LOADED_MODELS_STATUS"},
     [{"action": "get_loaded_models_status"}, {"action": "health_check"}]),
    ({"action": "status"}, [{"action": "get_loaded_models_status"}, {"action": "health_check"}]),
    ({"command": "HEALTH_CHECK"}, [{"action": "health_check"}]),
    (MMA_ACCESS, [{"action": "load_model", "model_id": "whisper-small"},
                  {"action": "list_models"}]),
])
def test_mma_to_mms_requests(msg: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    assert render_request(parse_request(msg, POLICY), "mms", POLICY) == expected


@pytest.mark.parametrize(("msg", "replies", "expected"), [
    (MMA_GENERATE, [MMS_GENERATE_OK], MMA_GENERATE_OK),
    ({"command": "GET_LOADED_MODELS_STATUS"}, [MMS_LOADED_OK, MMS_HEALTH_OK], MMA_LOADED_OK),
    (MMA_LOAD, [MMS_LOAD_OK], MMA_CMD_OK),
    (MMA_UNLOAD, [MMS_UNLOAD_OK], MMA_CMD_OK),
    ({"command": "HEALTH_CHECK"}, [MMS_HEALTH_OK],
     {**MMA_HEALTH_OK, "uptime_seconds": 0.0, "loaded_models": 1, "total_vram_used_mb": 2250,
      "total_vram_mb": 19660, "timestamp": 1764400000.0}),
    (MMA_ACCESS, [MMS_LOAD_OK, MMS_LIST_OK], MMA_ACCESS_OK),
])
def test_mma_from_mms_replies_match_mma_shapes(msg: dict[str, Any], replies: list[Any],
                                               expected: dict[str, Any]) -> None:
    out = roundtrip(msg, "mms", replies)
    assert shape(out) == shape(expected)


def test_mma_generate_from_mms_values() -> None:
    out = roundtrip(MMA_GENERATE, "mms", [MMS_GENERATE_OK])
    assert out["response_text"] == "hello you" and out["model_used"] == "phi-2"
    assert out["conversation_id"] == "c1" and out["using_kv_cache"] is True
    assert abs(out["timestamp"] - datetime.now().timestamp()) < 60
    # no conversation_id in the request: neither conversation_id nor using_kv_cache back
    out = roundtrip({"action": "generate", "prompt": "x"}, "mms",
                    [{"status": "success", "text": "y", "model_id": "phi-2",
                      "tokens_generated": 1}])
    assert set(out) == {"status", "response_text", "model_used", "timestamp"}


def test_mma_status_from_mms() -> None:
    out = roundtrip({"action": "status"}, "mms", [MMS_LOADED_OK, MMS_HEALTH_OK])
    assert shape(out) == shape({**MMA_STATUS_OK, "routing_policy": {}}) | {
        "routing_policy": shape(POLICY)}
    assert out["routing_policy"] == POLICY  # the shim's own policy
    assert out["loaded_models"]["phi-2"] == {"vram_usage_mb": 2250, "device": "unknown",
                                             "last_used": 1764400000.0, "is_active": True,
                                             "quantization": "unknown"}
    assert (out["total_models"], out["total_vram_used_mb"], out["total_vram_mb"]) == (
        4, 2250, 19660)
    assert out["health"] == "ok"
    degraded = roundtrip({"action": "status"}, "mms",
                         [MMS_LOADED_OK, {**MMS_HEALTH_OK, "status": "degraded"}])
    assert degraded["health"] == "degraded" and degraded["status"] == "ok"


def test_mms_float_megabytes_become_mma_integers() -> None:
    loaded = {"status": "success", "loaded_models": {
        "phi-2": {"status": "online", "last_used": 17644, "vram_usage": 2250.4}}}
    health = {**MMS_HEALTH_OK, "vram_used_mb": 2250.4, "vram_budget_mb": 19660.8}
    out = roundtrip({"command": "GET_LOADED_MODELS_STATUS"}, "mms", [loaded, health])
    assert shape(out) == shape(MMA_LOADED_OK)
    assert out["total_vram_mb"] == 19661 and out["loaded_models"]["phi-2"]["last_used"] == 17644.0


def test_mma_access_from_mms_values() -> None:
    out = roundtrip(MMA_ACCESS, "mms", [MMS_LOAD_OK, MMS_LIST_OK])
    assert (out["status"], out["request_id"], out["model_id"]) == (
        "MODEL_READY", "r1", "whisper-small")
    assert out["access_info"]["vram_allocated_mb"] == 1000
    assert out["access_info"]["quantization_level"] == "int8"
    assert out["access_info"]["priority"] == "normal"
    datetime.fromisoformat(out["timestamp"])
    # list_models only sizes the model: its failure does not undo a successful load
    out = roundtrip(MMA_ACCESS, "mms", [MMS_LOAD_OK, {"status": "error", "message": "x"}])
    assert out["status"] == "MODEL_READY" and out["access_info"]["vram_allocated_mb"] == 0


@pytest.mark.parametrize(("message", "code"), [
    ("Unknown model: whisper-huge", "MODEL_NOT_FOUND"),
    ("Model whisper-huge not found in config", "MODEL_NOT_FOUND"),
    ("Insufficient VRAM: need 1000 MB, 200 MB free", "INSUFFICIENT_VRAM"),
    ("Not enough memory on cuda:0", "INSUFFICIENT_VRAM"),
    ("loader crashed", "PROCESSING_ERROR"),
])
def test_mma_access_errors_from_mms(message: str, code: str) -> None:
    out = roundtrip(MMA_ACCESS, "mms",
                    [{"status": "error", "loaded": False, "message": message}, MMS_LIST_OK])
    assert shape(out) == shape(MMA_ACCESS_ERR)
    assert (out["error_code"], out["error_message"], out["request_id"]) == (code, message, "r1")


@pytest.mark.parametrize(("msg", "reply", "expected"), [
    (MMA_GENERATE, {"error": "model not loaded"},
     {"status": "error", "message": "model not loaded"}),
    (MMA_GENERATE, {"status": "error", "message": "boom"}, {"status": "error", "message": "boom"}),
    (MMA_LOAD, {"status": "error", "loaded": False, "message": "Insufficient VRAM"},
     {"status": "ERROR", "message": "Insufficient VRAM"}),
    (MMA_LOAD, {"status": "success", "loaded": False},
     {"status": "ERROR", "message": "loaded is false for model 'phi-2'"}),
    (MMA_UNLOAD, {"status": "error", "unloaded": False, "message": "not loaded"},
     {"status": "ERROR", "message": "not loaded"}),
    ({"command": "HEALTH_CHECK"}, {"status": "error", "message": "down"},
     {"status": "ERROR", "message": "down"}),
])
def test_mms_failures_in_mma_forms(msg: dict[str, Any], reply: dict[str, Any],
                                   expected: dict[str, Any]) -> None:
    assert roundtrip(msg, "mms", [reply]) == expected


@pytest.mark.parametrize(("msg", "expected"), [
    ({"model_id": "", "request_id": "r9"},
     {"status": "ERROR_LOADING_MODEL", "request_id": "r9", "model_id": None,
      "error_message": "model_id is required", "error_code": "MISSING_MODEL_ID"}),
    ({"action": "generate", "model_pref": "fast"},
     {"status": "error", "message": "Missing 'prompt' field"}),
    ({"command": "LOAD_MODEL"}, {"status": "ERROR", "message": "Missing 'model_name' field"}),
])
def test_mma_answers_known_without_mms(msg: dict[str, Any], expected: dict[str, Any]) -> None:
    op = parse_request(msg, POLICY)
    assert render_request(op, "mms", POLICY) == []
    out = render_reply(op, parse_reply(op, "mms", []))
    out.pop("timestamp", None)
    assert out == expected
    assert render_request(op, "mma", POLICY) == [msg]  # MMA answers these itself


def test_generate_without_any_policy_model() -> None:
    op = parse_request({"action": "generate", "model_pref": "odd", "prompt": "x"},
                       {"quality": "m"})
    assert op.model_id is None and render_request(op, "mms", {}) == []
    out = render_reply(op, parse_reply(op, "mms", []))
    assert out == {"status": "error", "message": "No model found for preference: odd"}


@pytest.mark.parametrize("msg", [
    MMA_CLEAR,
    {"action": "reboot"},
    {"command": "DEFRAG"},
])
def test_mma_unsupported_on_mms(msg: dict[str, Any]) -> None:
    with pytest.raises(Unsupported):
        render_request(parse_request(msg, POLICY), "mms", POLICY)


# --- MMS caller ---------------------------------------------------------------------------


MMS_GEN = {"action": "generate_text", "model_id": "mistral-7b", "prompt": "hi",
           "system_prompt": "be brief", "temperature": 0.2, "stop": ["\n"],
           "conversation_id": "c7"}


@pytest.mark.parametrize(("msg", "expected"), [
    (MMS_GEN, [{"action": "generate", "model_pref": "quality", "prompt": "be brief\n\nhi",
                "params": {"max_tokens": 1024, "temperature": 0.2, "stop": ["\n"]},
                "conversation_id": "c7"}]),
    ({"action": "generate_text", "model_id": "phi-2", "prompt": "x", "max_tokens": 5},
     [{"action": "generate", "model_pref": "fast", "prompt": "x",
       "params": {"max_tokens": 5}}]),
    ({"action": "load_model", "model_id": "phi-2"},
     [{"command": "LOAD_MODEL", "model_name": "phi-2"}]),
    ({"action": "unload_model", "model_id": "phi-2"},
     [{"command": "UNLOAD_MODEL", "model_name": "phi-2"}]),
    ({"action": "get_loaded_models_status"}, [{"command": "GET_LOADED_MODELS_STATUS"}]),
    ({"action": "health_check"}, [{"action": "status"}]),
    ({"action": "list_models"}, [{"action": "status"}]),
])
def test_mms_to_mma_requests(msg: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    assert render_request(parse_request(msg, POLICY), "mma", POLICY) == expected


@pytest.mark.parametrize(("msg", "reply", "expected"), [
    (MMS_GEN, MMA_GENERATE_OK, MMS_GENERATE_OK),
    ({"action": "load_model", "model_id": "phi-2"}, MMA_CMD_OK, MMS_LOAD_OK),
    ({"action": "unload_model", "model_id": "phi-2"}, {"status": "SUCCESS", "message": "ok"},
     {**MMS_UNLOAD_OK, "message": "ok"}),
    ({"action": "get_loaded_models_status"}, MMA_LOADED_OK, MMS_LOADED_OK),
    ({"action": "health_check"}, MMA_STATUS_OK, MMS_HEALTH_OK),
])
def test_mms_from_mma_replies_match_mms_shapes(msg: dict[str, Any], reply: dict[str, Any],
                                               expected: dict[str, Any]) -> None:
    assert shape(roundtrip(msg, "mma", [reply])) == shape(expected)


def test_mms_values_from_mma() -> None:
    out = roundtrip(MMS_GEN, "mma", [MMA_GENERATE_OK])
    assert out == {"status": "success", "text": "hello you", "model_id": "phi-2",
                   "tokens_generated": 2, "conversation_id": "c1"}
    health = roundtrip({"action": "health_check"}, "mma", [MMA_STATUS_OK])
    assert (health["status"], health["loaded_models"], health["vram_budget_mb"]) == (
        "healthy", 1, 19660)
    listing = roundtrip({"action": "list_models"}, "mma", [MMA_STATUS_OK])
    assert listing["models"][0] == {"model_id": "phi-2", "type": "unknown",
                                    "estimated_vram_mb": 2250, "loaded": True,
                                    "status": "online", "last_used": 1764400000.0}
    assert listing["models"][1] == {"model_id": "mistral-7b", "type": "unknown",
                                    "estimated_vram_mb": 0, "loaded": False,
                                    "status": "available_not_loaded"}
    assert shape(listing["models"][0]) == shape(MMS_LIST_OK["models"][0])  # type: ignore[index]


@pytest.mark.parametrize(("msg", "reply", "expected"), [
    ({"action": "load_model", "model_id": "phi-2"}, MMA_CMD_ERR,
     {"status": "error", "message": "Model phi-9 not found", "loaded": False}),
    (MMS_GEN, {"status": "error", "message": "No model found for preference: quality"},
     {"status": "error", "message": "No model found for preference: quality"}),
    ({"action": "health_check"},
     {"status": "ERROR", "error_message": "boom", "timestamp": "2026-11-29T10:00:00"},
     {"status": "error", "message": "boom"}),
])
def test_mma_failures_in_mms_form(msg: dict[str, Any], reply: dict[str, Any],
                                  expected: dict[str, Any]) -> None:
    assert roundtrip(msg, "mma", [reply]) == expected


@pytest.mark.parametrize("msg", [
    {"action": "generate_text", "model_id": "llama-70b", "prompt": "x"},  # no pref names it
    {"action": "select_model", "task_type": "chat"},
    {"action": "get_stats"},
])
def test_mms_unsupported_on_mma(msg: dict[str, Any]) -> None:
    with pytest.raises(Unsupported):
        render_request(parse_request(msg, POLICY), "mma", POLICY)


def test_mms_without_model_id_answered_locally_for_mma() -> None:
    op = parse_request({"action": "load_model"}, POLICY)
    assert render_request(op, "mma", POLICY) == []
    assert render_reply(op, parse_reply(op, "mma", [])) == {
        "status": "error", "message": "Missing 'model_id' field", "loaded": False}


@pytest.mark.parametrize(("msg", "reply"), [
    (MMS_GEN, MMS_GENERATE_OK),
    ({"action": "generate_text", "model_id": "phi-2", "prompt": "x"},
     {"status": "success", "text": "y", "model_id": "phi-2", "tokens_generated": 1}),
    ({"action": "load_model", "model_id": "phi-2"}, MMS_LOAD_OK),
    ({"action": "load_model", "model_id": "phi-2"},
     {"status": "error", "loaded": False, "message": "Insufficient VRAM"}),
    ({"action": "unload_model", "model_id": "phi-2"}, MMS_UNLOAD_OK),
    ({"action": "get_loaded_models_status"}, MMS_LOADED_OK),
    ({"action": "health_check"}, MMS_HEALTH_OK),
    ({"action": "health_check"}, {**MMS_HEALTH_OK, "status": "degraded"}),
    ({"action": "list_models"}, MMS_LIST_OK),
    ({"action": "get_stats"}, {"status": "success", "stats": {"requests": 3}}),
    ({"action": "select_model"}, {"status": "error", "message": "Missing task_type"}),
])
def test_mms_to_mms_roundtrip(msg: dict[str, Any], reply: dict[str, Any]) -> None:
    op = parse_request(msg, POLICY)
    assert render_request(op, "mms", POLICY) == [msg]
    assert roundtrip(msg, "mms", [copy.deepcopy(reply)]) == reply


# --- unusable replies -------------------------------------------------------------------


@pytest.mark.parametrize(("msg", "target", "replies", "status"), [
    (MMA_GENERATE, "mms", [{"status": "success", "model_id": "phi-2"}], "error"),
    (MMA_GENERATE, "mms", [{"status": "success", "text": 5}], "error"),
    (MMA_GENERATE, "mms", [["not", "an", "object"]], "error"),
    (MMA_GENERATE, "mms", [], "error"),
    (MMA_GENERATE, "mms", [MMS_GENERATE_OK, MMS_GENERATE_OK], "error"),
    (MMA_GENERATE, "mma", [{"status": "ok"}], "error"),
    (MMA_GENERATE, "mma", [{"status": "maybe"}], "error"),
    ({"action": "status"}, "mms", [MMS_LOADED_OK, {"status": "healthy", "total_models": "4"}],
     "error"),
    ({"action": "status"}, "mms", [{"status": "success", "loaded_models": {"a": 1}},
                                   MMS_HEALTH_OK], "error"),
    ({"action": "status"}, "mma", [{**MMA_STATUS_OK, "total_vram_mb": "lots"}], "error"),
    ({"command": "GET_LOADED_MODELS_STATUS"}, "mms", [{"status": "success"}, MMS_HEALTH_OK],
     "ERROR"),
    ({"command": "GET_LOADED_MODELS_STATUS"}, "mms",
     [{"status": "success", "loaded_models": {"x": {"vram_usage": float("nan")}}},
      MMS_HEALTH_OK], "ERROR"),
    (MMA_LOAD, "mms", [{"status": "success", "loaded": "yes"}], "ERROR"),
    (MMA_LOAD, "mms", [None], "ERROR"),
    (MMA_LOAD, "mma", [{"status": "SUCCESS", "message": 3}], "ERROR"),
    (MMA_ACCESS, "mms", [MMS_LOAD_OK, {"status": "success", "models": {}}], "MODEL_READY"),
    (MMA_ACCESS, "mms", [{"status": "done"}, MMS_LIST_OK], "ERROR_LOADING_MODEL"),
    (MMA_ACCESS, "mma", [{"status": "MODEL_READY", "access_info": []}], "ERROR_LOADING_MODEL"),
    (MMS_GEN, "mma", [{"status": "ok", "response_text": None}], "error"),
    ({"action": "list_models"}, "mms", [{"status": "success", "models": [{"type": "llm"}]}],
     "error"),
    ({"action": "get_stats"}, "mms", ["text"], "error"),
])
def test_unusable_replies_become_errors_in_the_callers_form(
        msg: dict[str, Any], target: str, replies: list[Any], status: str) -> None:
    out = roundtrip(msg, target, replies)
    assert out["status"] == status
    if status != "MODEL_READY":
        assert out["error_code"] == "SHIM_BAD_REPLY"
        assert out.get("message") or out.get("error_message")


def test_parse_reply_unknown_target() -> None:
    op = parse_request(MMA_GENERATE, POLICY)
    result = parse_reply(op, "grpc", [{}])
    assert not result.ok and result.error_code == "SHIM_UNSUPPORTED"
    with pytest.raises(Unsupported):
        render_request(op, "grpc", POLICY)


# --- the shim's own errors --------------------------------------------------------------


def test_error_reply_shapes() -> None:
    assert error_reply(Form.ACTION, "SHIM_TIMEOUT", "late") == {
        "status": "error", "message": "late", "error_code": "SHIM_TIMEOUT"}
    assert error_reply(Form.MMS, "SHIM_OVERLOADED", "busy") == {
        "status": "error", "message": "busy", "error_code": "SHIM_OVERLOADED"}
    assert error_reply(Form.COMMAND, "SHIM_NO_BACKEND", "none") == {
        "status": "ERROR", "message": "none", "error_code": "SHIM_NO_BACKEND"}
    out = error_reply(Form.MODEL_ACCESS, "SHIM_TIMEOUT", "late", MMA_ACCESS)
    assert shape(out) == shape(MMA_ACCESS_ERR)
    assert (out["request_id"], out["model_id"], out["error_message"]) == (
        "r1", "whisper-small", "late")
    out = error_reply(Form.MODEL_ACCESS, "SHIM_BAD_REQUEST", "bad")
    assert out["request_id"] is None and out["model_id"] is None
    datetime.fromisoformat(out["timestamp"])


def test_mma_status_case_is_normalised_for_the_form() -> None:
    op = parse_request({"action": "load_model", "model_id": "phi-2"}, POLICY)
    out = render_reply(op, parse_reply(op, "mma", [{"status": "ok", "message": "done"}]))
    assert out == {"status": "success", "loaded": True, "message": "done"}


def test_opaque_reply_from_wrong_target_is_not_passed_on() -> None:
    op = parse_request({"action": "reboot"}, POLICY)
    out = render_reply(op, parse_reply(op, "mms", [{"status": "success"}]))
    assert out["status"] == "error" and out["error_code"] == "SHIM_UNSUPPORTED"


def test_integer_request_id_is_echoed_as_sent() -> None:
    msg = {"request_id": 17, "model_id": "piper"}
    out = roundtrip(msg, "mms", [MMS_LOAD_OK, MMS_LIST_OK])
    assert out["request_id"] == 17 and out["model_id"] == "piper"
    assert error_reply(Form.MODEL_ACCESS, "SHIM_TIMEOUT", "late", msg)["request_id"] == 17

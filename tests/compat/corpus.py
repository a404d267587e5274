"""The compatibility corpus: every request shape of protocol.md, with what its client reads.

One ``Entry`` per request shape, in both dialect sections and in "What the deployed agents
really send". ``expect`` maps a reply path (``a.b`` for nested keys) to what the real
client reads there: a literal value, a type, or a matcher below. The corpus runs in order
(entries share backend state: loads, conversations) at five settings:

- ``direct``: the reference MMA itself, the legacy endpoint;
- ``100/0``, ``50/50``, ``0/100``: through the shim, both reference backends up;
- ``retired``: through the shim at 0/100 with MMA stopped.

The rule: where the legacy endpoint answered, the shim answers the same shape. Where a
setting answers differently on purpose, the entry says so in ``exceptions`` (setting ->
expectations replacing ``expect``, and why); README.md lists the same exceptions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SETTINGS = ("direct", "100/0", "50/50", "0/100", "retired")
SHIM_SETTINGS = SETTINGS[1:]


class Matcher:
    """A predicate on one reply value, with a name for failure messages."""

    def __init__(self, name: str, check: Any) -> None:
        self.name = name
        self.check = check

    def __repr__(self) -> str:
        return self.name


NUMBER = Matcher("number", lambda v: isinstance(v, int | float) and not isinstance(v, bool))
FLOAT = Matcher("float", lambda v: isinstance(v, float))  # last_used/timestamp arithmetic
TEXT = Matcher("non-empty string", lambda v: isinstance(v, str) and v != "")
ABSENT = Matcher("absent", None)


def one_of(*values: Any) -> Matcher:
    return Matcher(f"one of {values}", lambda v: v in values)


def not_equal(value: Any) -> Matcher:
    return Matcher(f"not {value!r}", lambda v: v != value)


def ends_with(suffix: str) -> Matcher:
    return Matcher(f"ends with {suffix!r}", lambda v: isinstance(v, str) and v.endswith(suffix))


def every_entry(**fields: Any) -> Matcher:
    """Every value of an object (e.g. each ``loaded_models`` entry) has these fields."""
    def check(value: Any) -> bool:
        return isinstance(value, dict) and all(
            isinstance(e, dict) and all(matches(e.get(k, ABSENT) if k in e else ABSENT, m)
                                        for k, m in fields.items())
            for e in value.values())
    return Matcher(f"every entry with {fields}", check)


def matches(value: Any, expected: Any) -> bool:
    if expected is ABSENT:
        return value is ABSENT
    if isinstance(expected, Matcher):
        return value is not ABSENT and bool(expected.check(value))
    if isinstance(expected, type):
        return isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    return bool(value == expected)


def lookup(reply: Any, path: str) -> Any:
    node = reply
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return ABSENT
        node = node[part]
    return node


@dataclass
class Entry:
    """One request shape: the request (a JSON value, or raw frames), what is read back."""

    name: str
    section: str  # protocol.md section
    request: Any  # dict/list/int/str -> JSON; bytes -> one raw frame; list[bytes] -> frames
    expect: dict[str, Any]
    #: setting -> (expectations replacing ``expect``, why): the deliberate exceptions.
    exceptions: dict[str, tuple[dict[str, Any], str]] = field(default_factory=dict)
    #: What the real client waits (s), protocol.md; the reply must come within it.
    client_wait_s: float = 5.0

    def expected(self, setting: str) -> dict[str, Any]:
        override = self.exceptions.get(setting)
        return override[0] if override is not None else self.expect


LOADED_ENTRY = every_entry(vram_usage_mb=NUMBER, device=TEXT, last_used=FLOAT)
# MMA-only shapes with MMA retired: answered at once by the shim, in the caller's form.
NO_BACKEND_ACTION = ({"status": "error", "error_code": "SHIM_NO_BACKEND", "message": TEXT},
                     "MMA is the only backend that serves it and it is stopped: the shim "
                     "answers at once in the caller's shape instead of a timeout")
NO_BACKEND_COMMAND = ({"status": "ERROR", "error_code": "SHIM_NO_BACKEND", "message": TEXT},
                      NO_BACKEND_ACTION[1])
OWNED_BY_MMS = ({"status": "ERROR"},
                "an MMA-only command naming a model: when MMS owns the model (MMS has no "
                "equivalent and MMA may not load a model MMS holds) the shim refuses it with "
                "SHIM_MODEL_OWNED_ELSEWHERE naming the owner; when nobody owns it yet, MMA "
                "answers; with MMA retired, SHIM_NO_BACKEND. Always the command's ERROR shape")
MMS_SERVED = "legacy MMA does not know MMS actions (\"Unknown action\"); the shim serves " \
             "them on MMS (migration tooling sends them to 5570)"
AUDIO = [0.1 * math.sin(i / 7.0) for i in range(64_000)]  # 4 s of 16 kHz audio, ~1.3 MB


CORPUS: list[Entry] = [
    # --- MMA dialect (protocol.md "MMA dialect") -------------------------------------
    Entry("health check", "MMA 4", {"command": "HEALTH_CHECK"},
          {"status": "SUCCESS", "health": "ok"}),
    Entry("load by model_name", "MMA 4",
          {"command": "LOAD_MODEL", "model_name": "phi-2", "device": "MainPC",
           "quantization_level": "FP16"},
          {"status": "SUCCESS", "message": TEXT}),
    Entry("loaded models status", "MMA 4", {"command": "GET_LOADED_MODELS_STATUS"},
          {"status": "SUCCESS", "loaded_models": LOADED_ENTRY, "loaded_models.phi-2": dict,
           "total_models": int, "total_vram_used_mb": NUMBER, "total_vram_mb": NUMBER}),
    Entry("status", "MMA 3", {"action": "status"},
          {"status": "ok", "loaded_models": LOADED_ENTRY, "total_models": int,
           "total_vram_used_mb": NUMBER, "total_vram_mb": NUMBER, "routing_policy": dict,
           "health": "ok", "timestamp": FLOAT}),
    Entry("generate", "MMA 1",
          {"action": "generate", "model_pref": "fast", "prompt": "hi there",
           "params": {"max_tokens": 8, "temperature": 0.7, "top_p": 0.95}},
          {"status": "ok", "response_text": str, "model_used": TEXT, "timestamp": FLOAT,
           "conversation_id": ABSENT}, client_wait_s=30.0),
    Entry("generate in a conversation", "MMA 1",
          {"action": "generate", "model_pref": "fast", "prompt": "hi there",
           "params": {"max_tokens": 8}, "conversation_id": "c1"},
          {"status": "ok", "response_text": str, "conversation_id": "c1",
           "using_kv_cache": True}, client_wait_s=30.0),
    Entry("clear the conversation", "MMA 2", {"action": "clear_conversation",
                                             "conversation_id": "c1"},
          {"status": "ok", "message": TEXT, "conversation_id": "c1"}),
    Entry("clear an unknown conversation", "MMA 2",
          {"action": "clear_conversation", "conversation_id": "never-seen"},
          {"status": "error", "message": TEXT},
          exceptions={"retired": NO_BACKEND_ACTION}),
    Entry("generate without prompt", "MMA 1", {"action": "generate", "model_pref": "fast"},
          {"status": "error", "message": "Missing 'prompt' field"}),
    Entry("generate, unknown pref falls back to fast", "MMA 1",
          {"action": "generate", "model_pref": "nope", "prompt": "if the",
           "params": {"max_tokens": 4}},
          {"status": "ok", "response_text": str, "model_used": TEXT}, client_wait_s=30.0),
    Entry("model access", "MMA 5",
          {"model_id": "whisper-small", "request_id": "r1",
           "context": {"quantization_level": "int8"}},
          {"status": "MODEL_READY", "request_id": "r1", "model_id": "whisper-small",
           "access_info.model_path_from_config": ends_with(".ngram"),
           "access_info.vram_allocated_mb": NUMBER, "access_info.quantization_level": "int8",
           "timestamp": str}, client_wait_s=10.0),
    Entry("model access without model_id", "MMA 5", {"request_id": "r2", "context": {}},
          {"status": "ERROR_LOADING_MODEL", "request_id": "r2",
           "error_code": "MISSING_MODEL_ID", "error_message": TEXT}, client_wait_s=10.0),
    Entry("model access, unknown model", "MMA 5",
          {"model_id": "ghost-13b", "request_id": "r3", "context": {}},
          {"status": "ERROR_LOADING_MODEL", "request_id": "r3", "error_code": "MODEL_NOT_FOUND"},
          client_wait_s=10.0),
    Entry("unload", "MMA 4", {"command": "UNLOAD_MODEL", "model_name": "phi-2"},
          {"status": "SUCCESS", "message": TEXT}),
    Entry("unknown command", "MMA 6", {"command": "NO_SUCH_COMMAND"},
          {"status": "ERROR", "message": TEXT},
          exceptions={"retired": NO_BACKEND_COMMAND}),
    # --- MMS dialect sent to the legacy endpoint (protocol.md "MMS dialect") -----------
    Entry("MMS health_check", "MMS", {"action": "health_check"},
          {"status": one_of("healthy", "degraded"), "total_models": int,
           "loaded_models": int, "vram_used_mb": NUMBER, "vram_budget_mb": NUMBER},
          exceptions={"direct": ({"status": "error", "message": TEXT}, MMS_SERVED)}),
    Entry("MMS list_models", "MMS", {"action": "list_models"},
          {"status": "success", "models": list},
          exceptions={"direct": ({"status": "error", "message": TEXT}, MMS_SERVED)}),
    Entry("MMS load_model", "MMS", {"action": "load_model", "model_id": "tinyllama"},
          {"status": "success", "loaded": True},
          exceptions={"direct": ({"status": "error", "message": TEXT}, MMS_SERVED)}),
    Entry("MMS generate_text", "MMS",
          {"action": "generate_text", "model_id": "tinyllama", "prompt": "hi",
           "max_tokens": 8},
          {"status": "success", "text": str, "model_id": "tinyllama",
           "tokens_generated": int},
          exceptions={"direct": ({"status": "error", "message": TEXT}, MMS_SERVED)},
          client_wait_s=30.0),
    Entry("MMS get_loaded_models_status", "MMS", {"action": "get_loaded_models_status"},
          {"status": "success", "loaded_models": dict},
          exceptions={"direct": ({"status": "error", "message": TEXT}, MMS_SERVED)}),
    Entry("MMS unload_model", "MMS", {"action": "unload_model", "model_id": "tinyllama"},
          {"status": "success", "unloaded": True},
          exceptions={"direct": ({"status": "error", "message": TEXT}, MMS_SERVED)}),
    *[Entry(f"MMS {action}", "MMS", {"action": action, **extra},
            {"status": "success"},
            exceptions={"direct": ({"status": "error", "message": TEXT}, MMS_SERVED)})
      for action, extra in (
          ("select_model", {"task_type": "chat", "context_size": 512}),
          ("predict_models", {}),
          ("record_usage", {"model_id": "phi-2"}),
          ("log_performance_metric", {"model_id": "phi-2", "metric_name": "latency_ms",
                                      "value": 12.5}),
          ("log_model_evaluation", {"model_id": "phi-2", "score": 0.9}),
          ("get_performance_metrics", {}),
          ("get_stats", {}),
      )],
    Entry("MMS preload_models", "MMS", {"action": "preload_models", "model_ids": ["tinyllama"]},
          {"status": "success", "message": TEXT},
          exceptions={"direct": ({"status": "error", "message": TEXT}, MMS_SERVED)}),
    Entry("MMS load_model by model_name", "deployed agents",
          {"action": "load_model", "model_name": "tinyllama"},
          {"status": one_of("success", "error")},
          exceptions={"direct": ({"status": "error", "message": TEXT}, MMS_SERVED)}),
    Entry("MMS unload_model by model_name", "deployed agents",
          {"action": "unload_model", "model_name": "tinyllama"},
          {"status": one_of("success", "error")},
          exceptions={"direct": ({"status": "error", "message": TEXT}, MMS_SERVED)}),
    Entry("generate_text without model_id (the manager picks)", "deployed agents",
          {"action": "generate_text", "prompt": "hi", "max_tokens": 4},
          {"status": str},
          exceptions={"direct": ({"status": "error", "message": TEXT}, MMS_SERVED)},
          client_wait_s=30.0),
    Entry("generate_text without prompt (speech to text)", "deployed agents",
          {"action": "generate_text", "model_id": "whisper-small", "audio_data": AUDIO[:1600],
           "sample_rate": 16000, "task": "transcribe", "language": "en",
           "return_timestamps": False},
          {"status": str},
          exceptions={"direct": ({"status": "error", "message": TEXT}, MMS_SERVED)},
          client_wait_s=30.0),
    # --- What the deployed agents really send ------------------------------------------
    Entry("generate with extra params keys", "deployed agents",
          {"action": "generate", "model_pref": "fast", "prompt": "translate this",
           "params": {"max_tokens": 4, "quality": "high", "model_name": "nllb",
                      "target_lang": "fr", "num_beams": 2, "input_ids": [1, 2, 3],
                      "batch_size": 1}},
          {"status": "ok", "response_text": str}, client_wait_s=30.0),
    Entry("generate in batch mode", "deployed agents",
          {"action": "generate", "model_pref": "fast", "prompt": "x",
           "params": {"max_tokens": 4, "batch_mode": True, "batch_data": ["a", "b"]}},
          {"status": one_of("ok", "success")}, client_wait_s=30.0),
    Entry("generate with top-level max_tokens", "deployed agents",
          {"action": "generate", "model_pref": "fast", "prompt": "the", "max_tokens": 4},
          {"status": "ok", "response_text": str}, client_wait_s=30.0),
    Entry("generate with a model name as model_pref", "deployed agents",
          {"action": "generate", "model_pref": "phi-2", "prompt": "the",
           "params": {"max_tokens": 4}},
          {"status": "ok", "model_used": TEXT}, client_wait_s=30.0),
    Entry("generate with request_id, timestamp, source keys", "deployed agents",
          {"action": "generate", "model_pref": "fast", "prompt": "the",
           "params": {"max_tokens": 4}, "request_id": "4f1c2a9e-1b7d-4c1e-9f59-3c7a1e2b9d10",
           "timestamp": 1764400000.5, "source_agent": "ChitchatAgent", "source": "x",
           "agent": "y"},
          {"status": "ok", "response_text": str}, client_wait_s=30.0),
    Entry("int request_id, ISO timestamp", "deployed agents",
          {"command": "HEALTH_CHECK", "request_id": 42, "timestamp": "2026-11-29T10:00:00"},
          {"status": "SUCCESS", "health": "ok"}, client_wait_s=3.0),
    Entry("generate with an int conversation_id", "deployed agents",
          {"action": "generate", "prompt": "hi", "conversation_id": 123,
           "params": {"max_tokens": 4}},
          {"status": "ok", "response_text": str}, client_wait_s=30.0),
    Entry("generate with a null model_pref", "deployed agents",
          {"action": "generate", "model_pref": None, "prompt": "hi",
           "params": {"max_tokens": 4}},
          {"status": "ok", "response_text": str}, client_wait_s=30.0),
    Entry("LOAD_MODEL by model_id with priority and source", "deployed agents",
          {"command": "LOAD_MODEL", "model_id": "tinyllama", "priority": "high",
           "source": "StreamingSpeechRecognition"},
          {"status": one_of("SUCCESS", "success"), "message": TEXT}),
    Entry("LOAD_MODEL with an int quantization_level", "deployed agents",
          {"command": "LOAD_MODEL", "model_name": "tinyllama", "quantization_level": 8},
          {"status": one_of("SUCCESS", "success")}),
    Entry("model access with int priority", "deployed agents",
          {"model_id": "whisper-small", "request_id": "r4",
           "context": {"quantization_level": 8, "priority": 5}},
          {"status": "MODEL_READY", "request_id": "r4",
           "access_info.model_path_from_config": ends_with(".ngram")}, client_wait_s=10.0),
    Entry("model access with a string context", "deployed agents",
          {"model_id": "whisper-small", "request_id": "r5", "context": "stt"},
          {"status": "MODEL_READY", "request_id": "r5"}, client_wait_s=10.0),
    Entry("TRANSCRIBE_AUDIO, 4 s of audio as floats", "deployed agents",
          {"command": "TRANSCRIBE_AUDIO", "request_id": "r6", "model_id": "whisper-small",
           "language": "en", "audio_data": AUDIO, "timestamp": 1764400000.0,
           "source": "StreamingSpeechRecognition"},
          # The reference MMA has no speech recognition: its own "Unknown command" error
          # passes through; never the shim's size refusal.
          {"status": "ERROR", "error_code": ABSENT},
          exceptions={"0/100": OWNED_BY_MMS, "retired": OWNED_BY_MMS}, client_wait_s=10.0),
    Entry("UPDATE_MODEL_USAGE", "deployed agents",
          {"command": "UPDATE_MODEL_USAGE", "model_id": "phi-2", "timestamp": 1764400000.0,
           "agent": "VRAMOptimizer", "model_type": "llm"},
          {"status": str},
          exceptions={"retired": NO_BACKEND_COMMAND}),
    Entry("generate_speech", "deployed agents",
          {"action": "generate_speech", "model_id": "piper-tts", "text": "hello",
           "voice_settings": {"speed": 1.0}, "streaming": True, "sample_rate": 22050,
           "request_id": "r7"},
          {"status": "error", "message": TEXT},
          exceptions={"retired": NO_BACKEND_ACTION}, client_wait_s=30.0),
    Entry("bare integer payload (Lazy Pirate)", "deployed agents", 1,
          {"status": "ERROR", "error_message": TEXT},
          exceptions={"retired": NO_BACKEND_ACTION}, client_wait_s=3.0),
    Entry("bare string payload (health probe)", "deployed agents", b"ping",
          {"status": "ERROR", "error_message": TEXT},
          exceptions={"retired": NO_BACKEND_ACTION}, client_wait_s=3.0),
    Entry("JSON list payload", "deployed agents", [1, 2, 3],
          {"status": "ERROR", "error_message": TEXT},
          exceptions={"retired": NO_BACKEND_ACTION}, client_wait_s=3.0),
    Entry("two payload frames", "transport", [b'{"command": "HEALTH_CHECK"}', b"extra"],
          {"status": "ERROR", "error_message": TEXT},
          exceptions={"retired": NO_BACKEND_ACTION}, client_wait_s=3.0),
    # After all of the above: the merged view still reads like MMA's.
    Entry("status after", "MMA 3", {"action": "status"},
          {"status": "ok", "loaded_models": LOADED_ENTRY, "timestamp": FLOAT}),
    Entry("loaded models status after", "MMA 4", {"command": "GET_LOADED_MODELS_STATUS"},
          {"status": "SUCCESS", "loaded_models": LOADED_ENTRY}),
]

"""The dialect registry (shim.dialects.base): lookup, registration, dispatch, config.

The toy "v3" dialect (tests/toy_dialect.py) stands for a deployment's own: everything it
needs goes through the registry, nothing in shim/ names it.
"""

from __future__ import annotations

from typing import Any

import pytest

import tests.toy_dialect as toy
from shim import dialects
from shim.config import decode_config
from shim.dialects import Form, mma, mms
from shim.dialects.base import Dialect, HealthView
from shim.errors import ConfigError, Unsupported

POLICY = {"fast": "phi-2", "quality": "mistral-7b"}


def test_the_builtin_dialects_are_registered_and_satisfy_the_protocol() -> None:
    assert {"mma", "mms", "v3"} <= set(dialects.names())
    builtin: list[Dialect] = [mma.DIALECT, mms.DIALECT, toy.DIALECT]  # mypy: Protocol
    for dialect in builtin:
        assert dialects.get(dialect.name) is dialect
    assert dialects.LEGACY in dialects.names()


def test_unknown_dialect_names_the_known_ones() -> None:
    with pytest.raises(Unsupported, match=r"unknown dialect 'nope' \(known: mma, mms"):
        dialects.get("nope")


def test_a_name_is_registered_once() -> None:
    assert dialects.register(toy.DIALECT) is toy.DIALECT  # the same object again: no-op
    with pytest.raises(ValueError, match="already registered"):
        dialects.register(toy.V3())
    assert dialects.get("v3") is toy.DIALECT


def test_a_registered_dialect_can_be_removed_and_added_back() -> None:
    dialects.base.unregister("v3")
    try:
        assert "v3" not in dialects.names()
        with pytest.raises(Unsupported):
            dialects.render_request(dialects.parse_request(
                {"action": "generate", "prompt": "x"}, POLICY), "v3", POLICY)
    finally:
        dialects.register(toy.DIALECT)
    assert "v3" in dialects.names()


def test_detection_asks_each_dialect_and_falls_back_to_legacy() -> None:
    assert dialects.detect_dialect({"action": "list_models"}) == "mms"
    assert dialects.detect_dialect({"action": "generate"}) == dialects.LEGACY
    assert dialects.detect_dialect({"op": "complete"}) == dialects.LEGACY  # v3 claims none
    assert dialects.detect_dialect([1, 2]) == dialects.LEGACY


@pytest.mark.parametrize(("form", "status"), [
    (Form.ACTION, "error"), (Form.COMMAND, "ERROR"), (Form.MMS, "error"),
    (Form.MODEL_ACCESS, "ERROR_LOADING_MODEL")])
def test_error_replies_come_from_the_dialect_that_owns_the_form(form: Form,
                                                                status: str) -> None:
    reply = dialects.error_reply(form, "SHIM_X", "boom", {"request_id": "r", "model_id": "m"})
    assert reply["status"] == status
    assert reply["error_code"] == "SHIM_X"


def test_mma_caller_to_a_v3_backend_there_and_back() -> None:
    op = dialects.parse_request({"action": "generate", "model_pref": "quality",
                                 "prompt": "hi", "params": {"max_tokens": 9}}, POLICY)
    sent = dialects.render_request(op, "v3", POLICY)
    assert sent == [{"op": "complete", "model": "mistral-7b", "input": "hi",
                     "limits": {"max_tokens": 9}}]
    result = dialects.parse_reply(op, "v3", [{"ok": True, "output": "yo",
                                              "model": "mistral-7b"}])
    assert result.ok and result.text == "yo" and result.source == "v3"
    reply = dialects.render_reply(op, result)
    assert reply["status"] == "ok"
    assert reply["response_text"] == "yo"
    assert reply["model_used"] == "mistral-7b"
    # Without a limit the caller keeps its own manager's default (MMA: 256), on v3 too.
    bare = dialects.parse_request({"action": "generate", "prompt": "hi"}, POLICY)
    assert dialects.render_request(bare, "v3", POLICY)[0]["limits"] == {"max_tokens": 256}


def test_v3_failures_and_unreadable_replies_reach_the_caller_in_its_shape() -> None:
    op = dialects.parse_request({"command": "LOAD_MODEL", "model_name": "phi-2"}, POLICY)
    assert dialects.render_request(op, "v3", POLICY) == [{"op": "load", "model": "phi-2"}]
    failed = dialects.parse_reply(op, "v3", [{"ok": False, "why": "no room"}])
    assert dialects.render_reply(op, failed) == {"status": "ERROR", "message": "no room"}
    garbled = dialects.parse_reply(op, "v3", [{"ok": "maybe"}])
    assert garbled.error_code == "SHIM_BAD_REPLY"
    assert dialects.render_reply(op, garbled)["status"] == "ERROR"


def test_kinds_a_dialect_lacks_are_unsupported_there() -> None:
    clear = dialects.parse_request({"action": "clear_conversation", "conversation_id": "c"},
                                   POLICY)
    with pytest.raises(Unsupported, match="V3 has no equivalent of MMA 'clear_conversation'"):
        dialects.render_request(clear, "v3", POLICY)
    result = dialects.parse_reply(clear, "v3", [{"ok": True}])
    assert not result.ok and result.error_code == "SHIM_UNSUPPORTED"


def test_the_callers_own_dialect_answers_what_it_would_answer_without_a_backend() -> None:
    # MMA's "Missing 'prompt' field" is MMA's text, whichever backend stands in for it.
    op = dialects.parse_request({"action": "generate", "model_pref": "fast"}, POLICY)
    for target in ("mms", "v3"):
        assert dialects.render_request(op, target, POLICY) == []
        result = dialects.parse_reply(op, target, [])
        assert dialects.render_reply(op, result) == {"status": "error",
                                                     "message": "Missing 'prompt' field"}
    # MMS's own word for a generate without a model id, when MMA stands in for it.
    mms_op = dialects.parse_request({"action": "generate_text", "prompt": "x"}, POLICY)
    assert dialects.render_request(mms_op, "mma", POLICY) == []
    assert dialects.parse_reply(mms_op, "mma", []).message == "Missing 'model_id' field"


@pytest.mark.parametrize(("dialect", "reply", "view"), [
    ("mma", {"status": "ok", "details": {"status_message": "x", "uptime_seconds": 1}},
     HealthView(status="ok")),
    ("mma", {"status": "ok", "details": {"vram_used_mb": 5, "vram_budget_mb": 10}},
     HealthView(status="ok", vram_used_mb=5.0, vram_budget_mb=10.0)),
    ("mms", {"status": "ok", "vram_used_mb": 2250, "vram_budget_mb": 19660.5},
     HealthView(status="ok", vram_used_mb=2250.0, vram_budget_mb=19660.5)),
    ("v3", {"state": "up", "memory": {"used_mb": 1, "total_mb": 2}},
     HealthView(status="up", vram_used_mb=1.0, vram_budget_mb=2.0)),
    ("mma", {"status": 5}, HealthView()),
    ("mms", "not an object", HealthView()),
    ("v3", {"memory": []}, HealthView()),
])
def test_health_replies_are_read_in_each_dialect(dialect: str, reply: Any,
                                                 view: HealthView) -> None:
    assert dialects.get(dialect).read_health(reply) == view


def test_each_dialect_probes_health_in_its_own_words() -> None:
    assert dialects.get("mma").health_request == b'{"command": "HEALTH_CHECK"}'
    assert dialects.get("mms").health_request == b'{"action": "health_check"}'
    assert dialects.get("v3").health_request == b'{"op": "ping"}'


def _config(dialect: str, **extra: Any) -> dict[str, Any]:
    return {"backends": {"a": {"dialect": "mma", "endpoints": ["tcp://127.0.0.1:5580"]},
                         "b": {"dialect": dialect, "endpoints": ["tcp://127.0.0.1:7211"]}},
            "policy": {"fast": "phi-2"}, **extra}


def test_config_validates_the_dialect_against_the_registry() -> None:
    with pytest.raises(ConfigError) as info:
        decode_config(_config("v4"))
    message = str(info.value)
    assert "`$.backends.b.dialect`" in message
    assert "unknown dialect 'v4'" in message and "mma, mms" in message
    assert decode_config(_config("v3")).backends["b"].dialect == "v3"


def test_config_imports_dialect_modules() -> None:
    cfg = decode_config(_config("v3", dialects={"modules": ["tests.toy_dialect"]}))
    assert cfg.dialects.modules == ["tests.toy_dialect"]
    with pytest.raises(ConfigError, match=r"cannot import 'tests\.no_such_dialect'.*"
                                          r"`\$\.dialects\.modules\[0\]`"):
        decode_config(_config("mms", dialects={"modules": ["tests.no_such_dialect"]}))

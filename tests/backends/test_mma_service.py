"""The reference MMA over real sockets: every request and reply shape of its dialect."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import zmq

from backends.registry import Registry
from tests.procs import (
    DEFAULT_MODELS_TOML,
    MODELS_DIR,
    Backend,
    Proc,
    free_port,
    req,
    start_backend,
)

POLICY = Registry.load(DEFAULT_MODELS_TOML).policy
N_MODELS = len(Registry.load(DEFAULT_MODELS_TOML).models)
LOADED_KEYS = {"vram_usage_mb", "device", "last_used", "is_active", "quantization"}


@pytest.fixture(scope="module")
def mma() -> Iterator[Backend]:
    """One MMA for the stateless shape tests (budget big enough for everything)."""
    backend = start_backend("mma", extra_args=["--vram-mb", "20000"])
    yield backend
    assert backend.stop() == 0


def is_iso(value: Any) -> bool:
    return isinstance(value, str) and bool(datetime.fromisoformat(value))


def check_status(reply: dict[str, Any], budget: int) -> dict[str, int]:
    """Field-by-field check of an ``action: status`` reply; returns charges by model."""
    assert set(reply) == {"status", "loaded_models", "total_models", "total_vram_used_mb",
                          "total_vram_mb", "routing_policy", "health", "timestamp"}
    assert reply["status"] == "ok"
    assert reply["health"] == "ok"
    assert isinstance(reply["timestamp"], float)
    assert reply["total_models"] == N_MODELS
    assert reply["total_vram_mb"] == budget
    assert reply["routing_policy"] == POLICY
    charges = {}
    for name, info in reply["loaded_models"].items():
        assert set(info) == LOADED_KEYS
        assert info["device"] == "cpu"
        assert info["is_active"] is True
        assert isinstance(info["last_used"], float)
        assert isinstance(info["quantization"], str)
        charges[name] = info["vram_usage_mb"]
    assert reply["total_vram_used_mb"] == sum(charges.values())
    assert reply["total_vram_used_mb"] <= budget
    return charges


def test_load_generate_evict_sequence(backend_factory: Callable[..., Backend]) -> None:
    """Small budget: two models fit, a third evicts the LRU one, a fourth cannot fit."""
    budget = 3500
    be = backend_factory("mma", extra_args=["--vram-mb", str(budget)])

    def status() -> dict[str, int]:
        return check_status(req(be.endpoint, {"action": "status"}), budget)

    assert status() == {}

    reply = req(be.endpoint, {"action": "generate", "model_pref": "fast", "prompt": "Return the",
                              "params": {"max_tokens": 12, "temperature": 0.7, "top_p": 0.95},
                              "conversation_id": "c1"})
    assert set(reply) == {"status", "response_text", "model_used", "timestamp",
                          "conversation_id", "using_kv_cache"}
    assert reply["status"] == "ok"
    assert reply["model_used"] == "phi-2"
    assert isinstance(reply["response_text"], str) and reply["response_text"]
    assert isinstance(reply["timestamp"], float)
    assert reply["conversation_id"] == "c1"
    assert reply["using_kv_cache"] is True
    assert status() == {"phi-2": 2250}

    reply = req(be.endpoint, {"command": "LOAD_MODEL", "model_name": "tinyllama",
                              "device": "MainPC", "quantization_level": "FP16"})
    assert reply == {"status": "SUCCESS", "message": "Model tinyllama loaded (1100 MB)"}
    assert status() == {"phi-2": 2250, "tinyllama": 1100}

    # tinyllama becomes the most recently used: phi-2 is now the LRU model.
    reply = req(be.endpoint, {"action": "generate", "model_pref": "fallback", "prompt": "x",
                              "params": {"max_tokens": 3}})
    assert set(reply) == {"status", "response_text", "model_used", "timestamp"}
    assert reply["model_used"] == "tinyllama"

    reply = req(be.endpoint, {"action": "generate", "model_pref": "stt", "prompt": "Return",
                              "params": {"max_tokens": 3}})
    assert reply["model_used"] == "whisper-small"
    assert status() == {"tinyllama": 1100, "whisper-small": 1000}  # phi-2 evicted

    reply = req(be.endpoint, {"model_id": "mistral-7b", "request_id": "r9"})
    assert reply["status"] == "ERROR_LOADING_MODEL"
    assert reply["error_code"] == "INSUFFICIENT_VRAM"
    assert reply["error_message"] == "Insufficient VRAM: need 7000 MB, 1400 MB free of 3500 MB"
    assert status() == {"tinyllama": 1100, "whisper-small": 1000}

    reply = req(be.endpoint, {"action": "generate", "model_pref": "quality", "prompt": "x"})
    assert reply == {"status": "error",
                     "message": "Insufficient VRAM: need 7000 MB, 1400 MB free of 3500 MB"}

    reply = req(be.endpoint, {"command": "GET_LOADED_MODELS_STATUS"})
    assert set(reply) == {"status", "loaded_models", "total_models", "total_vram_used_mb",
                          "total_vram_mb"}
    assert reply["status"] == "SUCCESS"
    assert set(reply["loaded_models"]) == {"tinyllama", "whisper-small"}
    assert all(set(v) == LOADED_KEYS for v in reply["loaded_models"].values())
    assert (reply["total_models"], reply["total_vram_used_mb"], reply["total_vram_mb"]) == (
        N_MODELS, 2100, budget)

    reply = req(be.endpoint, {"command": "UNLOAD_MODEL", "model_id": "tinyllama",
                              "priority": "high", "source": "VRAMOptimizer"})
    assert reply == {"status": "SUCCESS", "message": "Model tinyllama unloaded"}
    assert status() == {"whisper-small": 1000}
    reply = req(be.endpoint, {"command": "UNLOAD_MODEL", "model_name": "tinyllama"})
    assert reply == {"status": "ERROR", "message": "Model tinyllama is not loaded"}

    reply = req(be.endpoint, {"model_id": "phi-2", "request_id": "r10",
                              "context": {"quantization_level": "int8", "priority": "high"}})
    assert set(reply) == {"status", "request_id", "model_id", "access_info", "timestamp"}
    assert (reply["status"], reply["request_id"], reply["model_id"]) == (
        "MODEL_READY", "r10", "phi-2")
    assert reply["access_info"] == {
        "message": "MMA approved model loading",
        "model_path_from_config": str(MODELS_DIR / "tiny.ngram"),
        "vram_allocated_mb": 2250,
        "quantization_level": "int8",
        "priority": "high",
    }
    assert is_iso(reply["timestamp"])
    assert status() == {"whisper-small": 1000, "phi-2": 2250}


def test_generate_is_reproducible_and_params_apply(mma: Backend) -> None:
    def gen(**params: Any) -> str:
        reply = req(mma.endpoint, {"action": "generate", "model_pref": "fast",
                                   "prompt": "Return the", "params": params})
        assert reply["status"] == "ok", reply
        return str(reply["response_text"])

    base = {"max_tokens": 20, "temperature": 0.9, "top_p": 0.95, "seed": 5}
    assert gen(**base) == gen(**base)
    assert gen(**base) != gen(**{**base, "seed": 6})
    assert len(gen(**{**base, "max_tokens": 3}).split()) <= 3
    assert gen(**{**base, "temperature": 0}) == gen(**{**base, "temperature": 0, "seed": 9})


def test_generate_errors(mma: Backend) -> None:
    assert req(mma.endpoint, {"action": "generate", "model_pref": "fast"}) == {
        "status": "error", "message": "Missing 'prompt' field"}
    reply = req(mma.endpoint, {"action": "generate", "prompt": "x",
                               "params": {"max_tokens": "many"}})
    assert reply["status"] == "error"
    assert "$.max_tokens" in reply["message"]
    # An unknown pref falls back to fast.
    reply = req(mma.endpoint, {"action": "generate", "model_pref": "turbo", "prompt": "x",
                               "params": {"max_tokens": 2}})
    assert reply["model_used"] == "phi-2"


def test_clear_conversation(mma: Backend) -> None:
    reply = req(mma.endpoint, {"action": "generate", "prompt": "Return the",
                               "conversation_id": "conv-7", "params": {"max_tokens": 2}})
    assert reply["conversation_id"] == "conv-7"
    assert req(mma.endpoint, {"action": "clear_conversation", "conversation_id": "conv-7"}) == {
        "status": "ok", "message": "Conversation conv-7 cleared", "conversation_id": "conv-7"}
    assert req(mma.endpoint, {"action": "clear_conversation", "conversation_id": "conv-7"}) == {
        "status": "error", "message": "Unknown conversation: conv-7", "conversation_id": "conv-7"}
    assert req(mma.endpoint, {"action": "clear_conversation"}) == {
        "status": "error", "message": "Missing 'conversation_id' field"}


def test_commands(mma: Backend) -> None:
    reply = req(mma.endpoint, {"command": "HEALTH_CHECK"})
    assert set(reply) == {"status", "health", "uptime_seconds", "loaded_models",
                          "total_vram_used_mb", "total_vram_mb", "timestamp"}
    assert (reply["status"], reply["health"], reply["total_vram_mb"]) == ("SUCCESS", "ok", 20000)
    assert req(mma.endpoint, {"command": "LOAD_MODEL"}) == {
        "status": "ERROR", "message": "Missing 'model_name' field"}
    assert req(mma.endpoint, {"command": "LOAD_MODEL", "model_name": "gpt-9"}) == {
        "status": "ERROR", "message": "Unknown model: gpt-9"}
    assert req(mma.endpoint, {"command": "UNLOAD_MODEL", "model_name": "gpt-9"}) == {
        "status": "ERROR", "message": "Unknown model: gpt-9"}
    assert req(mma.endpoint, {"command": "LOAD_MODEL", "model_id": "piper-tts"})["status"] == (
        "SUCCESS")
    assert req(mma.endpoint, {"command": "LOAD_MODEL", "model_id": "piper-tts"}) == {
        "status": "SUCCESS", "message": "Model piper-tts already loaded (300 MB)"}
    assert req(mma.endpoint, {"command": "REBOOT"}) == {
        "status": "ERROR", "message": "Unknown command: REBOOT"}


def test_unknown_action(mma: Backend) -> None:
    assert req(mma.endpoint, {"action": "list_models"}) == {
        "status": "error", "message": "Unknown action: list_models"}


def test_model_access_errors(mma: Backend) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"request_id": "r1", "context": {}}, "MISSING_MODEL_ID"),
        ({"model_id": "", "request_id": "r2"}, "MISSING_MODEL_ID"),
        ({"model_id": "gpt-9", "request_id": "r3"}, "MODEL_NOT_FOUND"),
    ]
    for request, code in cases:
        reply = req(mma.endpoint, request)
        assert set(reply) == {"status", "request_id", "model_id", "error_message", "error_code",
                              "timestamp"}
        assert reply["status"] == "ERROR_LOADING_MODEL"
        assert reply["error_code"] == code
        assert reply["request_id"] == request["request_id"]
        assert is_iso(reply["timestamp"])


def test_errors_needing_their_own_models_file(
    tmp_path: Path, models_toml: Callable[..., Path], backend_factory: Callable[..., Backend]
) -> None:
    """No ``fast`` policy, a model without a VRAM estimate, a model whose file is broken."""
    (tmp_path / "broken.ngram").write_bytes(b"not a model")
    toml = models_toml(
        {
            "good": {"loader": "ngram", "path": "tiny.ngram", "estimated_vram_mb": 100},
            "novram": {"loader": "ngram", "path": "tiny.ngram"},
            "broken": {"loader": "ngram", "path": str(tmp_path / "broken.ngram"),
                       "estimated_vram_mb": 100},
        },
        policy={"quality": "good"},
    )
    be = backend_factory("mma", toml)
    assert req(be.endpoint, {"action": "generate", "model_pref": "turbo", "prompt": "x"}) == {
        "status": "error", "message": "No model found for preference: turbo"}
    assert req(be.endpoint, {"action": "generate", "model_pref": "quality", "prompt": "x",
                             "params": {"max_tokens": 1}})["model_used"] == "good"
    reply = req(be.endpoint, {"model_id": "novram", "request_id": "a"})
    assert (reply["error_code"], reply["error_message"]) == (
        "UNKNOWN_VRAM", "Unknown VRAM requirement for model novram")
    reply = req(be.endpoint, {"model_id": "broken", "request_id": "b"})
    assert reply["error_code"] == "PROCESSING_ERROR"
    assert "bad magic" in reply["error_message"]
    reply = req(be.endpoint, {"command": "LOAD_MODEL", "model_name": "broken"})
    assert reply["status"] == "ERROR"
    assert reply["message"].startswith("Failed to load model broken:")
    status = req(be.endpoint, {"action": "status"})
    assert status["total_vram_used_mb"] == 100
    assert status["total_vram_mb"] == 12000  # from the file's defaults (no --vram-mb)


def test_health_socket_answers_any_bytes(mma: Backend) -> None:
    for payload in (b"ping", b"\xff\xfe", b"", json.dumps({"action": "status"}).encode()):
        reply = req(mma.health_endpoint, payload)
        assert set(reply) == {"status", "details"}
        assert reply["status"] == "ok"
        assert reply["details"]["status_message"] == "Agent is operational."
        assert isinstance(reply["details"]["uptime_seconds"], float)


def test_dealer_envelopes_come_back_exactly(mma: Backend) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(mma.endpoint)
    try:
        dealer.send_multipart([b"", json.dumps({"action": "status"}).encode()])
        assert dealer.poll(5000)
        empty, payload = dealer.recv_multipart()
        assert empty == b""
        assert json.loads(payload)["status"] == "ok"
        # A proxy's correlation frames before the delimiter; many requests in flight.
        for i in range(50):
            body = {"action": "generate", "prompt": f"Return {i}", "params": {"max_tokens": 2}}
            dealer.send_multipart([f"corr-{i}".encode(), b"", json.dumps(body).encode()])
        seen = set()
        for _ in range(50):
            assert dealer.poll(5000)
            corr, empty, payload = dealer.recv_multipart()
            assert empty == b""
            assert json.loads(payload)["status"] == "ok"
            seen.add(corr)
        assert seen == {f"corr-{i}".encode() for i in range(50)}
    finally:
        dealer.close(linger=0)


def test_port_from_environment_and_cli_wins(tmp_path: Path) -> None:
    env_port, cli_port, health = free_port(), free_port(), free_port()
    argv = ["-m", "backends.mma", "--health-port", str(health)]
    for extra, expect in (([], env_port), (["--port", str(cli_port)], cli_port)):
        with Proc([sys.executable, *argv, *extra],
                  env={"MODEL_MANAGER_PORT": str(env_port)}) as proc:
            reply = req_retry(f"tcp://127.0.0.1:{health}")
            assert reply["status"] == "ok", proc.log()
            assert req(f"tcp://127.0.0.1:{expect}", {"action": "status"})["status"] == "ok"
            assert proc.stop() == 0


def req_retry(endpoint: str, attempts: int = 40) -> dict[str, Any]:
    for _ in range(attempts):
        try:
            return req(endpoint, b"ping", timeout=0.25)
        except TimeoutError:
            continue
    raise TimeoutError(endpoint)

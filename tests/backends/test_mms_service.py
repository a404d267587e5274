"""The reference MMS over real sockets: every action of its table, and what it lacks."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from backends.registry import Registry
from tests.procs import DEFAULT_MODELS_TOML, Backend, Proc, free_port, req, start_backend
from tests.reliability.helpers import wait_until

REGISTRY = Registry.load(DEFAULT_MODELS_TOML)
N_MODELS = len(REGISTRY.models)


@pytest.fixture(scope="module")
def mms() -> Iterator[Backend]:
    """One MMS for the stateless shape tests (budget big enough for everything)."""
    backend = start_backend("mms", extra_args=["--vram-mb", "20000"])
    yield backend
    assert backend.stop() == 0


def loaded(be: Backend, budget: int) -> dict[str, int]:
    """Cross-check get_loaded_models_status, health_check and the health socket."""
    status = req(be.endpoint, {"action": "get_loaded_models_status"})
    assert set(status) == {"status", "loaded_models"}
    assert status["status"] == "success"
    charges = {}
    for name, info in status["loaded_models"].items():
        assert set(info) == {"status", "last_used", "vram_usage"}
        assert info["status"] == "online"
        assert isinstance(info["last_used"], float)
        charges[name] = info["vram_usage"]
    health = req(be.endpoint, {"action": "health_check"})
    assert set(health) == {"status", "total_models", "online_models", "loaded_models",
                           "vram_used_mb", "vram_budget_mb", "model_details", "timestamp"}
    assert health["vram_used_mb"] == sum(charges.values())
    assert health["vram_budget_mb"] == budget
    assert health["loaded_models"] == health["online_models"] == len(charges)
    assert health["total_models"] == len(health["model_details"])
    sock = req(be.health_endpoint, b"anything")
    assert (sock["vram_used_mb"], sock["loaded_models"]) == (sum(charges.values()), len(charges))
    return charges


def test_load_refuse_generate_sequence(backend_factory: Callable[..., Backend]) -> None:
    budget = 3500
    be = backend_factory("mms", extra_args=["--vram-mb", str(budget)])
    assert loaded(be, budget) == {}

    assert req(be.endpoint, {"action": "load_model", "model_id": "phi-2"}) == {
        "status": "success", "loaded": True, "message": "Model phi-2 loaded"}
    assert loaded(be, budget) == {"phi-2": 2250}
    assert req(be.endpoint, {"action": "load_model", "model_id": "tinyllama"})["loaded"] is True
    assert loaded(be, budget) == {"phi-2": 2250, "tinyllama": 1100}

    refusal = "Insufficient VRAM: need 1000 MB, 150 MB free of 3500 MB"
    assert req(be.endpoint, {"action": "load_model", "model_id": "whisper-small"}) == {
        "status": "error", "loaded": False, "message": refusal}
    assert req(be.endpoint, {"action": "generate_text", "model_id": "whisper-small",
                             "prompt": "x"}) == {"status": "error", "message": refusal}
    assert loaded(be, budget) == {"phi-2": 2250, "tinyllama": 1100}  # MMS never evicts

    reply = req(be.endpoint, {"action": "generate_text", "model_id": "phi-2",
                              "prompt": "Return the", "system_prompt": "Be brief.",
                              "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                              "stop": ["zzz"], "conversation_id": "c1"})
    assert set(reply) == {"status", "text", "model_id", "tokens_generated", "conversation_id"}
    assert (reply["status"], reply["model_id"], reply["tokens_generated"]) == (
        "success", "phi-2", 7)
    assert reply["conversation_id"] == "c1"
    assert isinstance(reply["text"], str) and reply["text"]

    assert req(be.endpoint, {"action": "unload_model", "model_id": "tinyllama"}) == {
        "status": "success", "unloaded": True, "message": "Model tinyllama unloaded"}
    assert req(be.endpoint, {"action": "unload_model", "model_id": "tinyllama"}) == {
        "status": "error", "unloaded": False, "message": "Model tinyllama is not loaded"}
    assert loaded(be, budget) == {"phi-2": 2250}

    # Not loaded, but fits now: generate_text loads it on demand.
    reply = req(be.endpoint, {"action": "generate_text", "model_id": "whisper-small",
                              "prompt": "Return"})
    assert set(reply) == {"status", "text", "model_id", "tokens_generated"}
    assert reply["tokens_generated"] == REGISTRY.models["whisper-small"].context_length
    assert loaded(be, budget) == {"phi-2": 2250, "whisper-small": 1000}

    models = req(be.endpoint, {"action": "list_models"})
    assert models["status"] == "success"
    by_id = {m["model_id"]: m for m in models["models"]}
    assert list(by_id) == list(REGISTRY.models)
    for name, m in by_id.items():
        spec = REGISTRY.models[name]
        assert (m["type"], m["estimated_vram_mb"]) == (spec.type, spec.estimated_vram_mb)
        is_loaded = name in ("phi-2", "whisper-small")
        assert m["loaded"] is is_loaded
        assert m["status"] == ("online" if is_loaded else "available_not_loaded")
        expected = {"model_id", "type", "estimated_vram_mb", "loaded", "status"}
        if name in ("phi-2", "whisper-small", "tinyllama"):
            expected.add("last_used")
        assert set(m) == expected

    health = req(be.endpoint, {"action": "health_check"})
    assert health["status"] == "healthy"
    assert health["model_details"]["phi-2"] == {"status": "online", "message": "Loaded"}
    assert health["model_details"]["mistral-7b"] == {
        "status": "available_not_loaded", "message": "Not loaded"}


def test_generate_text_failures_and_legacy_shape(backend_factory: Callable[..., Backend]) -> None:
    for legacy in (False, True):
        be = backend_factory("mms", extra_args=["--legacy-error-shape"] if legacy else [])
        cases = [
            ({"action": "generate_text", "prompt": "x"}, "Missing 'model_id' field"),
            ({"action": "generate_text", "model_id": "phi-2"}, "Missing 'prompt' field"),
            ({"action": "generate_text", "model_id": "gpt-9", "prompt": "x"},
             "Unknown model: gpt-9"),
            ({"action": "generate", "model_pref": "fast"}, "Missing 'prompt' field"),
        ]
        for request, message in cases:
            reply = req(be.endpoint, request)
            assert reply == ({"error": message} if legacy else
                             {"status": "error", "message": message})
        reply = req(be.endpoint, {"action": "generate_text", "model_id": "phi-2", "prompt": "x",
                                  "max_tokens": -1})
        assert "$.max_tokens" in (reply["error"] if legacy else reply["message"])
        # Other actions keep the normal error shape even with the flag.
        assert req(be.endpoint, {"action": "load_model"}) == {
            "status": "error", "loaded": False, "message": "Missing 'model_id' field"}


def test_legacy_generate_action(mms: Backend) -> None:
    reply = req(mms.endpoint, {"action": "generate", "prompt": "Return the",
                               "model_pref": "fallback",
                               "params": {"max_tokens": 4, "temperature": 0.0}})
    assert reply["status"] == "success"
    assert (reply["model_id"], reply["tokens_generated"]) == ("tinyllama", 4)
    same = req(mms.endpoint, {"action": "generate_text", "model_id": "tinyllama",
                              "prompt": "Return the", "max_tokens": 4, "temperature": 0.0})
    assert same["text"] == reply["text"]
    # Unknown pref falls back to fast.
    reply = req(mms.endpoint, {"action": "generate", "prompt": "x", "model_pref": "turbo",
                               "params": {"max_tokens": 1}})
    assert reply["model_id"] == "phi-2"


def test_seed_makes_generate_text_reproducible(mms: Backend) -> None:
    body = {"action": "generate_text", "model_id": "phi-2", "prompt": "Return the",
            "max_tokens": 15, "temperature": 1.0, "seed": 3}
    assert req(mms.endpoint, body)["text"] == req(mms.endpoint, body)["text"]
    assert req(mms.endpoint, body)["text"] != req(mms.endpoint, {**body, "seed": 4})["text"]


def test_selection_usage_and_prediction(mms: Backend) -> None:
    def select(task: str, size: int) -> dict[str, Any]:
        return req(mms.endpoint, {"action": "select_model", "task_type": task,
                                  "context_size": size})

    assert select("chat", 1000) == {"status": "success", "selected_model": "phi-2"}
    assert select("code", 1000) == {"status": "success", "selected_model": "mistral-7b"}
    assert select("stt", 100) == {"status": "success", "selected_model": "whisper-small"}
    assert select("chat", 4096) == {"status": "success", "selected_model": "mistral-7b"}
    assert select("chat", 10**6)["status"] == "error"
    assert select("chat", -1)["status"] == "error"

    assert req(mms.endpoint, {"action": "record_usage", "model_id": "piper-tts"}) == {
        "status": "success", "message": "Usage recorded for piper-tts"}
    assert req(mms.endpoint, {"action": "record_usage", "model_id": "gpt-9"}) == {
        "status": "error", "message": "Unknown model: gpt-9"}
    assert req(mms.endpoint, {"action": "record_usage"})["status"] == "error"
    for _ in range(5):
        req(mms.endpoint, {"action": "record_usage", "model_id": "piper-tts"})
    reply = req(mms.endpoint, {"action": "predict_models"})
    assert set(reply) == {"status", "predicted_models"}
    assert reply["status"] == "success"
    assert reply["predicted_models"][0] == "piper-tts"
    assert len(reply["predicted_models"]) <= 3


def test_preload_models(mms: Backend) -> None:
    reply = req(mms.endpoint, {"action": "preload_models",
                               "model_ids": ["piper-tts", "tinyllama", "gpt-9"]})
    assert reply["status"] == "success"
    assert reply["message"] == "Preloaded 2 models"
    assert reply["failed"] == {"gpt-9": "Unknown model: gpt-9"}
    assert req(mms.endpoint, {"action": "preload_models", "model_ids": "phi-2"}) == {
        "status": "error", "message": "'model_ids' must be a list of model ids"}


def test_performance_bookkeeping(mms: Backend) -> None:
    for value in (100, 300):
        assert req(mms.endpoint, {"action": "log_performance_metric", "model_id": "phi-2",
                                  "metric_name": "latency_ms", "value": value}) == {
            "status": "success", "message": "Metric latency_ms recorded for phi-2"}
    assert req(mms.endpoint, {"action": "log_performance_metric", "model_id": "phi-2",
                              "metric_name": "latency_ms", "value": "fast"})["status"] == "error"
    assert req(mms.endpoint, {"action": "log_model_evaluation", "model_id": "phi-2",
                              "score": 0.75, "evaluation": {"task": "qa"}}) == {
        "status": "success", "message": "Evaluation recorded for phi-2"}
    assert req(mms.endpoint, {"action": "log_model_evaluation", "model_id": "gpt-9",
                              "score": 1})["status"] == "error"
    reply = req(mms.endpoint, {"action": "get_performance_metrics", "model_id": "phi-2"})
    assert reply["status"] == "success"
    assert reply["metrics"]["phi-2"]["latency_ms"] == {
        "count": 2, "mean": 200.0, "min": 100.0, "max": 300.0, "last": 300.0}
    assert reply["evaluations"]["phi-2"][0]["score"] == 0.75
    everything = req(mms.endpoint, {"action": "get_performance_metrics"})
    assert "phi-2" in everything["metrics"]

    stats = req(mms.endpoint, {"action": "get_stats"})
    assert stats["status"] == "success"
    s = stats["stats"]
    for key in ("requests_total", "generations", "tokens_generated", "loads", "refusals",
                "requests_by_action", "uptime_seconds", "vram_used_mb", "vram_budget_mb"):
        assert key in s, key
    assert s["requests_by_action"]["log_performance_metric"] == 3
    assert s["total_models"] == N_MODELS


def test_what_mms_does_not_have(mms: Backend) -> None:
    for action in ("status", "clear_conversation", "nonsense"):
        assert req(mms.endpoint, {"action": action, "conversation_id": "c1"}) == {
            "status": "error", "message": f"Unknown action: {action}"}
    for request in ({"command": "GET_LOADED_MODELS_STATUS"}, {"command": "HEALTH_CHECK"},
                    {"model_id": "whisper-small", "request_id": "r1"}, {}):
        assert req(mms.endpoint, request) == {"status": "error", "message": "Missing action field"}
    assert req(mms.endpoint, [1, 2]) == {"status": "error", "message": "Invalid request format"}
    assert req(mms.endpoint, "load_model") == {
        "status": "error", "message": "Invalid request format"}
    assert req(mms.endpoint, {"action": 7}) == {"status": "error", "message": "Unknown action: 7"}


def test_health_socket(mms: Backend) -> None:
    for payload in (b"ping", b"\x00\xff", b"{}"):
        reply = req(mms.health_endpoint, payload)
        assert set(reply) == {"status", "agent", "uptime", "timestamp", "loaded_models",
                              "vram_used_mb", "vram_budget_mb", "device", "metrics"}
        assert (reply["status"], reply["agent"], reply["device"]) == (
            "ok", "ModelManagerSuite", "cpu")
        assert reply["vram_budget_mb"] == 20000
        assert isinstance(reply["metrics"], dict)
        assert "requests_total" in reply["metrics"]


def test_degraded_when_a_model_fails(
    tmp_path: Path, models_toml: Callable[..., Path], backend_factory: Callable[..., Backend]
) -> None:
    (tmp_path / "broken.ngram").write_bytes(b"MMNGRAM\x01junk")
    toml = models_toml(
        {"good": {"loader": "ngram", "path": "tiny.ngram", "estimated_vram_mb": 10},
         "broken": {"loader": "ngram", "path": str(tmp_path / "broken.ngram"),
                    "estimated_vram_mb": 10}},
        policy={"fast": "good"},
    )
    be = backend_factory("mms", toml)
    reply = req(be.endpoint, {"action": "load_model", "model_id": "broken"})
    assert reply["status"] == "error"
    assert reply["loaded"] is False
    assert reply["message"].startswith("Failed to load model broken:")
    health = req(be.endpoint, {"action": "health_check"})
    assert health["status"] == "degraded"
    assert health["model_details"]["broken"]["status"] == "error"
    assert "broken.ngram" in health["model_details"]["broken"]["message"]
    assert health["vram_used_mb"] == 0
    models = {m["model_id"]: m for m in req(be.endpoint, {"action": "list_models"})["models"]}
    assert models["broken"]["status"] == "error"


def test_idle_models_are_unloaded(backend_factory: Callable[..., Backend]) -> None:
    be = backend_factory("mms", extra_args=["--idle-unload-s", "0.3"])
    assert req(be.endpoint, {"action": "load_model", "model_id": "piper-tts"})["loaded"]
    assert req(be.endpoint, {"action": "health_check"})["vram_used_mb"] == 300
    health = wait_until(lambda: (h := req(be.endpoint, {"action": "health_check"}))[
        "vram_used_mb"] == 0 and h, 10.0, "the idle model unloaded")
    assert (health["vram_used_mb"], health["loaded_models"]) == (0, 0)
    assert req(be.endpoint, {"action": "get_stats"})["stats"]["idle_unloads"] == 1


def test_dealer_client(mms: Backend) -> None:
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(mms.endpoint)
    try:
        dealer.send_multipart([b"", json.dumps({"action": "list_models"}).encode()])
        assert dealer.poll(5000)
        empty, payload = dealer.recv_multipart()
        assert (empty, json.loads(payload)["status"]) == (b"", "success")
    finally:
        dealer.close(linger=0)


def test_ports_from_environment() -> None:
    port, health = free_port(), free_port()
    env = {"AGENT_PORT": str(port), "HEALTH_PORT": str(health)}
    with Proc([sys.executable, "-m", "backends.mms"], env=env) as proc:
        for _ in range(40):
            try:
                assert req(f"tcp://127.0.0.1:{health}", b"x", timeout=0.25)["status"] == "ok"
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError(proc.log())
        reply = req(f"tcp://127.0.0.1:{port}", {"action": "list_models"})
        assert reply["status"] == "success"
        assert proc.stop() == 0

"""Every legacy request shape through the shim, to MMA alone and to MMS alone.

The same sequence runs against a fresh pair of real reference backends twice: weights
100/0 (MMA serves, no translation) and 0/100 (MMS serves, translated both ways). The
replies must have the same MMA shape both ways: the same keys, the same value types and
the same status; text, timestamps and figures may differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import req, start_backend
from tests.shimproc import shim_config, start_shim

SEQUENCE: list[tuple[str, dict[str, Any]]] = [
    ("health check", {"command": "HEALTH_CHECK"}),
    ("load by model_name", {"command": "LOAD_MODEL", "model_name": "phi-2", "device": "MainPC",
                            "quantization_level": "FP16"}),
    ("loaded status", {"command": "GET_LOADED_MODELS_STATUS"}),
    ("status", {"action": "status"}),
    ("generate", {"action": "generate", "model_pref": "fast", "prompt": "the value of",
                  "params": {"max_tokens": 8, "temperature": 0.7, "top_p": 0.95}}),
    ("generate in a conversation", {"action": "generate", "model_pref": "fast",
                                    "prompt": "return the", "conversation_id": "c1",
                                    "params": {"max_tokens": 8}}),
    ("generate, unknown pref", {"action": "generate", "model_pref": "nope", "prompt": "if the",
                                "params": {"max_tokens": 4}}),
    ("generate, no prompt", {"action": "generate", "model_pref": "fast"}),
    ("model access", {"model_id": "whisper-small", "request_id": "r1",
                      "context": {"quantization_level": "int8"}}),
    ("model access, no model_id", {"request_id": "r2", "context": {}}),
    ("model access, unknown model", {"model_id": "ghost-13b", "request_id": "r3",
                                     "context": {}}),
    ("load by model_id", {"command": "LOAD_MODEL", "model_id": "tinyllama", "priority": "high",
                          "source": "agent"}),
    ("load unknown model", {"command": "LOAD_MODEL", "model_name": "ghost-13b"}),
    ("unload", {"command": "UNLOAD_MODEL", "model_name": "phi-2"}),
    ("clear unknown conversation", {"action": "clear_conversation",
                                    "conversation_id": "never-seen"}),
    ("status after", {"action": "status"}),
    ("loaded status after", {"command": "GET_LOADED_MODELS_STATUS"}),
]

#: Objects keyed by model name: their entries are compared, not their keys.
KEYED_BY_MODEL = {"loaded_models", "routing_policy", "model_details"}


def shape(value: Any, key: str = "") -> Any:
    """Keys and JSON types, recursively; numbers are one type (JSON has one)."""
    if isinstance(value, dict):
        if key in KEYED_BY_MODEL:
            return {"<model>": shape(next(iter(value.values()))) if value else None}
        return {k: shape(v, k) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    return type(value).__name__


def run_sequence(weights: dict[str, float], tmp_path: Path) -> list[dict[str, Any]]:
    mma, mms = start_backend("mma"), start_backend("mms")
    shim = None
    try:
        cfg = shim_config({"mma": mma, "mms": mms}, tmp_path,
                          routing={"weights": weights},
                          ownership={"enabled": True, "poll_interval_ms": 500})
        shim = start_shim(cfg, tmp_path)
        return [req(shim.endpoint, request, timeout=10.0) for _, request in SEQUENCE]
    finally:
        if shim is not None:
            shim.stop()
        mma.stop()
        mms.stop()


@pytest.fixture(scope="module")
def replies(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list[dict]]]:
    yield {
        "mma": run_sequence({"mma": 100, "mms": 0}, tmp_path_factory.mktemp("to-mma")),
        "mms": run_sequence({"mma": 0, "mms": 100}, tmp_path_factory.mktemp("to-mms")),
    }


@pytest.mark.parametrize("index", range(len(SEQUENCE)), ids=[name for name, _ in SEQUENCE])
def test_same_mma_shape_from_either_backend(replies: dict[str, list[dict]], index: int) -> None:
    via_mma, via_mms = replies["mma"][index], replies["mms"][index]
    assert via_mma.get("status") == via_mms.get("status"), (via_mma, via_mms)
    assert via_mma.get("error_code") == via_mms.get("error_code"), (via_mma, via_mms)
    assert shape(via_mma) == shape(via_mms), (via_mma, via_mms)


def test_sequence_outcomes_are_the_documented_ones(replies: dict[str, list[dict]]) -> None:
    by_name = dict(zip([n for n, _ in SEQUENCE], replies["mms"], strict=True))
    assert by_name["health check"]["status"] == "SUCCESS"
    assert by_name["load by model_name"]["status"] == "SUCCESS"
    assert "phi-2" in by_name["loaded status"]["loaded_models"]
    assert by_name["generate"]["status"] == "ok" and by_name["generate"]["response_text"]
    assert by_name["generate in a conversation"]["using_kv_cache"] is True
    assert by_name["generate, no prompt"]["status"] == "error"
    assert by_name["model access"]["status"] == "MODEL_READY"
    assert by_name["model access, no model_id"]["error_code"] == "MISSING_MODEL_ID"
    assert by_name["model access, unknown model"]["error_code"] == "MODEL_NOT_FOUND"
    assert by_name["load unknown model"]["status"] == "ERROR"
    assert by_name["unload"]["status"] == "SUCCESS"
    assert "phi-2" not in by_name["loaded status after"]["loaded_models"]


def test_mms_dialect_clients_pass_through(tmp_path: Path) -> None:
    mma, mms = start_backend("mma"), start_backend("mms")
    try:
        shim = start_shim(shim_config({"mma": mma, "mms": mms}, tmp_path), tmp_path)
        try:
            reply = req(shim.endpoint, {"action": "list_models"})
            direct = req(mms.endpoint, {"action": "list_models"})
            assert reply["status"] == "success"
            assert [m["model_id"] for m in reply["models"]] == \
                [m["model_id"] for m in direct["models"]]
            unknown = req(shim.endpoint, {"action": "get_stats"})
            assert unknown["status"] == "success"
        finally:
            shim.stop()
    finally:
        mma.stop()
        mms.stop()



"""One owner per model under the faults issue 10 reported, with the real reference
backends: a stalled owner keeps its models (requests that would load them elsewhere get
an error naming it), preload_models cannot bypass it, unsafe admin rules are refused,
``ctl release`` frees a model, a request after ``rollback`` goes to the rollback target,
and a mirrored copy leaves no conversation and loads nothing on the shadow backend."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import procs
from tests.procs import Backend, req, start_backend
from tests.reliability.helpers import wait_until
from tests.shimproc import ROOT, ShimProc, shim_config, start_reference_stack, start_shim

TOKEN = "test-token-ownership-faults"


def admin(shim: ShimProc, command: str, **args: object) -> dict[str, Any]:
    return req(shim.admin_endpoint, {"token": TOKEN, "command": command, **args}, timeout=15.0)


def loaded_on(backend: Backend) -> set[str]:
    """What the backend says it holds (tests/procs.loaded_on); it must answer."""
    models = procs.loaded_on(backend, timeout=5.0)
    assert models is not None, f"{backend.kind} did not say what it holds"
    return models


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Backend, Backend, ShimProc]]:
    mma, mms, shim = start_reference_stack(
        tmp_path, TOKEN, health={"interval_ms": 100, "timeout_ms": 100, "probe_failures": 2},
        ownership={"poll_interval_ms": 200, "handover_timeout_ms": 2000})
    yield mma, mms, shim
    shim.stop()
    os.kill(mma.proc.pid, signal.SIGCONT)
    mma.stop()
    mms.stop()


def test_a_stalled_owner_keeps_its_models(stack) -> None:
    mma, mms, shim = stack
    for model in ("whisper-small", "tinyllama"):
        reply = req(shim.endpoint, {"model_id": model, "request_id": "warm"}, timeout=10.0)
        assert reply["status"] == "MODEL_READY", reply
    assert {"whisper-small", "tinyllama"} <= loaded_on(mma)
    assert admin(shim, "set_weights", weights={"mma": 0, "mms": 100})["status"] == "ok"
    os.kill(mma.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: not admin(shim, "status")["backends"]["mma"]["healthy"], 10,
                   "the shim to see MMA down")
        status = admin(shim, "status")
        assert "whisper-small" in status["ownership"]["suspect"], status["ownership"]
        access = req(shim.endpoint, {"model_id": "whisper-small", "request_id": "r"},
                     timeout=10.0)
        assert access["status"] == "ERROR_LOADING_MODEL", access
        assert access["error_code"] == "PROCESSING_ERROR" and access["request_id"] == "r"
        assert "owned by mma" in access["error_message"], access
        load = req(shim.endpoint, {"command": "LOAD_MODEL", "model_name": "tinyllama"},
                   timeout=10.0)
        assert load["status"] == "ERROR" and "owned by mma" in load["message"], load
        preload = req(shim.endpoint, {"action": "preload_models", "model_ids": ["tinyllama"]},
                      timeout=10.0)
        assert preload["status"] == "error" and "owned by mma" in preload["message"], preload
        # Read-only requests still fail over.
        health = req(shim.endpoint, {"action": "health_check"}, timeout=10.0)
        assert health["status"] == "healthy", health
        assert loaded_on(mms) == set()
    finally:
        os.kill(mma.proc.pid, signal.SIGCONT)
    # Back: the model moves (unload on MMA first), and is then served by MMS.
    wait_until(lambda: admin(shim, "status")["backends"]["mma"]["healthy"], 15,
               "MMA to be healthy again")
    reply: dict[str, Any] = {}

    def served_by_mms() -> bool:
        nonlocal reply
        reply = req(shim.endpoint, {"model_id": "whisper-small", "request_id": "again"},
                    timeout=10.0)
        return reply["status"] == "MODEL_READY"

    wait_until(served_by_mms, 20, "whisper-small to be served again", interval=0.2)
    assert "whisper-small" in loaded_on(mms) and "whisper-small" not in loaded_on(mma)


def test_preload_cannot_load_a_model_owned_elsewhere(stack) -> None:
    _, mms, shim = stack
    assert req(shim.endpoint, {"action": "generate", "model_pref": "fast", "prompt": "a",
                               "params": {"max_tokens": 2}}, timeout=10.0)["status"] == "ok"
    reply = req(shim.endpoint, {"action": "preload_models", "model_ids": ["phi-2"]},
                timeout=10.0)
    assert reply["status"] == "error" and reply["error_code"] == "SHIM_MODEL_OWNED_ELSEWHERE"
    assert "phi-2 is owned by mma" in reply["message"]
    # MMS load_model naming the model by model_name goes to the owner, never to MMS.
    req(shim.endpoint, {"action": "load_model", "model_name": "phi-2"}, timeout=10.0)
    assert "phi-2" not in loaded_on(mms)
    # An unowned model is claimed by the backend the preload reaches.
    reply = req(shim.endpoint, {"action": "preload_models", "model_ids": ["piper-tts"]},
                timeout=10.0)
    assert reply["status"] == "success", reply
    assert admin(shim, "status")["ownership"]["owners"]["piper-tts"] == "mms"


def test_unsafe_rules_are_refused_naming_the_rule(stack) -> None:
    _, _, shim = stack
    for command, args in (("set_action", {"action": "generate", "pin": "mms"}),
                          ("set_action", {"action": "model_access", "pin": "mma"}),
                          ("set_shadow", {"mirror": {"generate": "always"}})):
        reply = admin(shim, command, **args)
        assert reply["status"] == "error" and reply["error"] == "refused", reply
        assert "one owner per model" in reply["message"], reply
    assert admin(shim, "set_action", action="status", pin="mms")["status"] == "ok"
    assert admin(shim, "status")["actions"]["generate"]["pin"] == ""


def test_release_frees_a_model_and_is_audited(stack, tmp_path: Path) -> None:
    mma, _, shim = stack
    assert req(shim.endpoint, {"model_id": "piper-tts", "request_id": "x"},
               timeout=10.0)["status"] == "MODEL_READY"
    refused = admin(shim, "release", model="piper-tts", from_backend="mms")
    assert refused["status"] == "error" and "owned by mma" in refused["message"], refused
    # Its owner stalls; the operator, who knows better, releases the model.
    os.kill(mma.proc.pid, signal.SIGSTOP)
    done = subprocess.run(  # as an operator runs it
        [sys.executable, "-m", "shim.cli", "ctl", "--json", "--admin", shim.admin_endpoint,
         "release", "piper-tts", "--from", "mma"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "MMSHIM_TOKEN": TOKEN}, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    reply = json.loads(done.stdout)
    assert reply["status"] == "ok" and reply["released_from"] == "mma", reply
    assert "piper-tts" not in admin(shim, "status")["ownership"]["owners"]
    os.kill(mma.proc.pid, signal.SIGCONT)
    audit = (tmp_path / "state.audit.jsonl").read_text()
    assert '"command":"release"' in audit


def test_a_request_after_rollback_goes_to_the_rollback_target(stack) -> None:
    mma, mms, shim = stack
    gen = {"action": "generate", "model_pref": "fast", "prompt": "a",
           "params": {"max_tokens": 2}}
    assert req(shim.endpoint, gen, timeout=10.0)["status"] == "ok"  # phi-2 on MMA
    for _ in range(3):
        assert admin(shim, "set_weights", weights={"mma": 0, "mms": 100})["status"] == "ok"
        assert req(shim.endpoint, gen, timeout=10.0)["status"] == "ok"  # moves to MMS
        rollback = admin(shim, "rollback")
        assert rollback["status"] == "ok" and rollback["ownership"]["moving"] == {}, rollback
        reply = req(shim.endpoint, gen, timeout=10.0)
        assert reply["status"] == "ok", reply
        assert "phi-2" in loaded_on(mma) and "phi-2" not in loaded_on(mms)


def test_mirrored_copies_leave_no_conversation_and_load_nothing(tmp_path: Path) -> None:
    mma, mms = start_backend("mma"), start_backend("mms")
    try:
        assert req(mma.endpoint, {"command": "LOAD_MODEL", "model_name": "phi-2"},
                   timeout=10.0)["status"] == "SUCCESS"
        cfg = shim_config({"mma": mma, "mms": mms}, tmp_path,
                          routing={"weights": {"mma": 0, "mms": 100}, "mode": "shadow",
                                   "safe_backend": "mma"},
                          ownership={"enabled": True, "poll_interval_ms": 200,
                                     "shared_models": ["phi-2"]})
        shim = start_shim(cfg, tmp_path, env={"MMSHIM_TOKEN": TOKEN})
        try:
            for i in range(3):
                reply = req(shim.endpoint, {"action": "generate", "model_pref": "fast",
                                            "prompt": f"turn {i}", "conversation_id": "conv-A",
                                            "params": {"max_tokens": 2}}, timeout=10.0)
                assert reply["status"] == "ok", reply
            wait_until(lambda: admin(shim, "status")["shadow_activity"].get("inflight") == 0,
                       10, "the shadow copies to finish")
            assert admin(shim, "rollback")["status"] == "ok"
            # Through the shim the clear is answered "ok" (MMS served conv-A; the shim makes
            # the clear real for it: tests/compat). MMA itself must hold no conv-A at all:
            # only the mirrored copies ever reached it.
            cleared = req(shim.endpoint, {"action": "clear_conversation",
                                          "conversation_id": "conv-A"}, timeout=10.0)
            assert cleared["status"] == "ok", cleared
            direct = req(mma.endpoint, {"action": "clear_conversation",
                                        "conversation_id": "conv-A"}, timeout=10.0)
            assert direct["status"] == "error" and "Unknown conversation" in direct["message"]
        finally:
            shim.stop()
        # A no-load copy of a model the shadow side does not hold: an error, no load.
        reply = req(mma.endpoint, {"action": "generate", "model_pref": "fallback",
                                   "prompt": "x", "shim_no_load": True}, timeout=10.0)
        assert reply["status"] == "error" and "may not load" in reply["message"], reply
        reply = req(mms.endpoint, {"action": "generate_text", "model_id": "tinyllama",
                                   "prompt": "x", "shim_no_load": True}, timeout=10.0)
        assert reply["status"] == "error" and "may not load" in reply["message"], reply
        assert "tinyllama" not in loaded_on(mma) | loaded_on(mms)
    finally:
        mma.stop()
        mms.stop()


def test_duplicate_repair_is_on_by_default_and_audited(tmp_path: Path) -> None:
    mma, mms = start_backend("mma"), start_backend("mms")
    try:
        assert req(mma.endpoint, {"command": "LOAD_MODEL", "model_name": "tinyllama"},
                   timeout=10.0)["status"] == "SUCCESS"
        assert req(mms.endpoint, {"action": "load_model", "model_id": "tinyllama"},
                   timeout=10.0)["status"] == "success"
        cfg = shim_config({"mma": mma, "mms": mms}, tmp_path,
                          ownership={"enabled": True, "poll_interval_ms": 200})
        cfg["ownership"].pop("repair", None)
        shim = start_shim(cfg, tmp_path, env={"MMSHIM_TOKEN": TOKEN})
        try:
            wait_until(lambda: len([b for b in (mma, mms)
                                    if "tinyllama" in loaded_on(b)]) == 1,
                       15, "the duplicate to be repaired")
            text = shim.metrics()
            assert "shim_duplicate_repairs_total{" in text
            wait_until(lambda: "duplicate_repair" in (
                (tmp_path / "state.audit.jsonl").read_text()
                if (tmp_path / "state.audit.jsonl").exists() else ""), 10, "the audit line")
        finally:
            shim.stop()
    finally:
        mma.stop()
        mms.stop()

"""One owner per model, with real reference backends: a weight sweep from all-MMA to
all-MMS under continuous generate traffic never has a model loaded on both backends, and
every request is answered successfully."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.procs import Backend, req, start_backend
from tests.shimproc import ShimProc, shim_config, start_shim

TOKEN = "test-token-ownership"
PREFS = ["fast", "quality", "fallback", "stt", "tts"]  # five models through the policy


def admin(shim: ShimProc, command: str, **args: object) -> dict:
    return req(shim.admin_endpoint, {"token": TOKEN, "command": command, **args}, timeout=10.0)


def loaded_on(backend: Backend) -> set[str] | None:
    """What the backend itself says it has loaded (asked directly, not through the shim)."""
    request = ({"command": "GET_LOADED_MODELS_STATUS"} if backend.kind == "mma"
               else {"action": "get_loaded_models_status"})
    try:
        return set(req(backend.endpoint, request, timeout=3.0)["loaded_models"])
    except TimeoutError:
        return None


@pytest.fixture
def stack(tmp_path: Path):
    mma, mms = start_backend("mma"), start_backend("mms")
    cfg = shim_config({"mma": mma, "mms": mms}, tmp_path,
                      routing={"weights": {"mma": 100, "mms": 0}},
                      ownership={"enabled": True, "poll_interval_ms": 300,
                                 "handover_timeout_ms": 3000})
    shim = start_shim(cfg, tmp_path, env={"MMSHIM_TOKEN": TOKEN})
    yield mma, mms, shim
    shim.stop()
    mma.stop()
    mms.stop()


def test_weight_sweep_never_loads_a_model_twice(stack) -> None:
    mma, mms, shim = stack
    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    failures: list[dict] = []
    duplicates: list[tuple[str, float]] = []

    def traffic(worker: int) -> None:
        i = 0
        while not stop.is_set():
            pref = PREFS[(i + worker) % len(PREFS)]
            reply = req(shim.endpoint, {"action": "generate", "model_pref": pref,
                                        "prompt": "the default value", "params": {"max_tokens": 4}},
                        timeout=10.0)
            outcomes[reply.get("status", "?")] += 1
            if reply.get("status") != "ok":
                failures.append(reply)
            i += 1

    def watch() -> None:
        # A model counts as on both only if seen on MMA before AND after seeing it on MMS:
        # a hand-over between two polls is not a duplicate.
        while not stop.is_set():
            first, middle, last = loaded_on(mma), loaded_on(mms), loaded_on(mma)
            if first is not None and middle is not None and last is not None:
                for model in first & middle & last:
                    duplicates.append((model, time.monotonic()))
            time.sleep(0.02)

    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(3)]
    threads.append(threading.Thread(target=watch))
    for t in threads:
        t.start()
    try:
        time.sleep(1.5)
        for mms_weight in range(0, 101, 10):
            reply = admin(shim, "set_weights", weights={"mma": 100 - mms_weight, "mms": mms_weight})
            assert reply["status"] == "ok", reply
            time.sleep(0.8)
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    handovers = sum(float(line.rsplit(" ", 1)[1]) for line in shim.metrics().splitlines()
                    if line.startswith("shim_model_handovers_total{"))
    print(f"\n[sweep] {dict(outcomes)}, {int(handovers)} hand-overs, "
          f"{len(duplicates)} duplicates seen by the watcher")
    assert not duplicates, duplicates
    assert not failures, failures[:3]
    assert outcomes["ok"] > 100
    # After the sweep every model that is loaded lives on MMS, and MMA holds none.
    assert loaded_on(mma) == set()
    assert len(loaded_on(mms) or ()) >= 4
    status = admin(shim, "status")
    owners = status.get("ownership", {}).get("owners", {})
    assert owners and set(owners.values()) == {"mms"}, status.get("ownership")
    assert "shim_model_handovers_total" in shim.metrics()


def test_duplicate_found_by_polling_is_counted_and_repaired(tmp_path: Path) -> None:
    mma, mms = start_backend("mma"), start_backend("mms")
    shim = None
    try:
        # Load the same model on both behind the shim's back.
        assert req(mma.endpoint, {"command": "LOAD_MODEL", "model_name": "tinyllama"})["status"] \
            == "SUCCESS"
        assert req(mms.endpoint, {"action": "load_model", "model_id": "tinyllama"})["status"] \
            == "success"
        cfg = shim_config({"mma": mma, "mms": mms}, tmp_path,
                          ownership={"enabled": True, "poll_interval_ms": 200, "repair": True})
        shim = start_shim(cfg, tmp_path)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if ("tinyllama" in (loaded_on(mma) or set())) != \
                    ("tinyllama" in (loaded_on(mms) or set())):
                break
            time.sleep(0.1)
        on_mma = "tinyllama" in (loaded_on(mma) or set())
        on_mms = "tinyllama" in (loaded_on(mms) or set())
        assert on_mma != on_mms, "the duplicate was not repaired"
        assert 'shim_duplicate_models_total{model="tinyllama"}' in shim.metrics()
    finally:
        if shim is not None:
            shim.stop()
        mma.stop()
        mms.stop()


def test_model_requests_follow_their_owner_whatever_the_weights(tmp_path: Path) -> None:
    mma, mms = start_backend("mma"), start_backend("mms")
    shim = None
    try:
        cfg = shim_config({"mma": mma, "mms": mms}, tmp_path,
                          routing={"weights": {"mma": 50, "mms": 50}},
                          ownership={"enabled": True, "poll_interval_ms": 300})
        shim = start_shim(cfg, tmp_path)
        for _ in range(20):
            reply = req(shim.endpoint, {"action": "generate", "model_pref": "fast",
                                        "prompt": "x", "params": {"max_tokens": 2}})
            assert reply["status"] == "ok"
        # phi-2 was loaded on exactly one backend, and every request went there.
        where = [b.kind for b in (mma, mms) if "phi-2" in (loaded_on(b) or set())]
        assert len(where) == 1
        text = shim.metrics()
        served = [line for line in text.splitlines()
                  if line.startswith("shim_requests_total{") and 'action="generate"' in line]
        assert len(served) == 1 and f'backend="{where[0]}"' in served[0], served
    finally:
        if shim is not None:
            shim.stop()
        mma.stop()
        mms.stop()

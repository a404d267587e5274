"""One owner per model, with real reference backends: a weight sweep from all-MMA to
all-MMS under continuous generate traffic never has a model loaded on both backends, and
every request is answered successfully."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import Backend, loaded_on, req, start_backend
from tests.reliability.helpers import OverlapWatcher, wait_until
from tests.shimproc import ShimProc, shim_config, start_reference_stack, start_shim

TOKEN = "test-token-ownership"
PREFS = ["fast", "quality", "fallback", "stt", "tts"]  # five models through the policy


def admin(shim: ShimProc, command: str, **args: object) -> dict:
    return req(shim.admin_endpoint, {"token": TOKEN, "command": command, **args}, timeout=10.0)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[Backend, Backend, ShimProc]]:
    mma, mms, shim = start_reference_stack(tmp_path, TOKEN)
    yield mma, mms, shim
    shim.stop()
    mma.stop()
    mms.stop()


def answered(outcomes: Counter[str]) -> int:
    return sum(outcomes.values())


def test_weight_sweep_never_loads_a_model_twice(stack) -> None:
    mma, mms, shim = stack
    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    failures: list[dict] = []

    def traffic(worker: int) -> None:
        i = 0
        while not stop.is_set() and i < 20_000:
            pref = PREFS[(i + worker) % len(PREFS)]
            reply = req(shim.endpoint, {"action": "generate", "model_pref": pref,
                                        "prompt": "the default value", "params": {"max_tokens": 4}},
                        timeout=10.0)
            outcomes[reply.get("status", "?")] += 1
            if reply.get("status") != "ok":
                failures.append(reply)
            i += 1

    # The watcher asks both backends directly; a model counts as on both only if seen on
    # MMA before AND after seeing it on MMS (a hand-over between two polls is not one).
    watcher = OverlapWatcher(mma, mms, ask_timeout=3.0, pause_s=0.02)
    threads = [threading.Thread(target=traffic, args=(w,)) for w in range(3)]
    watcher.start()
    for t in threads:
        t.start()
    try:
        # Progress, not time: every step of the sweep runs under traffic that reached
        # each of the five models at least once more (15 replies over 3 workers).
        wait_until(lambda: answered(outcomes) >= 15, 60, "the first replies")
        for mms_weight in range(0, 101, 10):
            reply = admin(shim, "set_weights", weights={"mma": 100 - mms_weight, "mms": mms_weight})
            assert reply["status"] == "ok", reply
            target = answered(outcomes) + 15
            wait_until(lambda: answered(outcomes) >= target, 60,  # noqa: B023 - used at once
                       f"15 replies at mms={mms_weight}")
        # At mms=100 every model that is loaded moves to MMS, and MMA ends up with none.
        wait_until(lambda: loaded_on(mma) == set() and len(loaded_on(mms) or ()) >= 4, 60,
                   lambda: f"every model on MMS: mma={loaded_on(mma)} mms={loaded_on(mms)}")
        watcher.wait_looks(5)  # the watcher has looked at the settled system too
    finally:
        stop.set()
        for t in threads:
            t.join(15)
        watcher.stop()
    handovers = sum(float(line.rsplit(" ", 1)[1]) for line in shim.metrics().splitlines()
                    if line.startswith("shim_model_handovers_total{"))
    print(f"\n[sweep] {dict(outcomes)}, {int(handovers)} hand-overs, "
          f"{len(watcher.overlaps)} duplicates seen by the watcher in {watcher.looks} looks")
    assert not watcher.overlaps, watcher.overlaps
    assert not failures, failures[:3]
    assert outcomes["ok"] > 100
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
        wait_until(lambda: ("tinyllama" in (loaded_on(mma) or set()))
                   != ("tinyllama" in (loaded_on(mms) or set())), 20,
                   "the duplicate tinyllama repaired (on one backend only)", interval=0.1)
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

"""Ownership soak: randomized faults against the real reference backends, with an
independent watcher asking both backends directly (never through the shim) what they
have loaded.

Faults, drawn at random (seeded; the seed is printed): weight sweeps 0 -> 100 -> 0 in
10 % steps every 100 ms; the owner SIGSTOPped for 1-3 s; a backend SIGKILLed and
restarted on its ports; a weight change followed at once by ``rollback`` (mid
hand-over); preload_models / LOAD_MODEL / model access / generate_text naming models
through the shim; admin attempts to pin a model-bound action or to mirror generate
``always`` (must be refused). Traffic: closed-loop clients (tests/reliability/helpers
``Load``) over four models in both dialects.

Asserted: the watcher never sees a model on both backends (longest overlap 0), every
request is answered exactly once (no wedged client), the shim is alive at the end.
Duration: ``MMSHIM_SOAK_S`` seconds (default 25, within ``make test``); ``make soak``
runs it for 5 minutes. The figures (faults, moves, requests, overlaps, longest
hand-over) are printed and, with ``MMSHIM_SOAK_REPORT``, written as JSON to that path.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.procs import Backend, req, start_backend
from tests.reliability.helpers import Load, OverlapWatcher
from tests.shimproc import ShimProc, start_reference_stack

TOKEN = "test-token-soak"
MODELS = ["phi-2", "tinyllama", "whisper-small", "piper-tts"]
PREFS = {"fast": "phi-2", "fallback": "tinyllama", "stt": "whisper-small", "tts": "piper-tts"}
SOAK_S = float(os.environ.get("MMSHIM_SOAK_S", "25"))


def admin(shim: ShimProc, command: str, **args: object) -> dict[str, Any]:
    return req(shim.admin_endpoint, {"token": TOKEN, "command": command, **args}, timeout=15.0)


def payload(rng: random.Random) -> Any:
    """A request naming a model, in one of the forms the deployed agents send."""
    def make(client: int, seq: int) -> bytes:
        pref = rng.choice(list(PREFS))
        model = PREFS[pref]
        kind = rng.random()
        if kind < 0.45:
            msg: dict[str, Any] = {"action": "generate", "model_pref": pref, "prompt": "the",
                                   "params": {"max_tokens": 3}}
        elif kind < 0.6:
            msg = {"model_id": model, "request_id": f"r{client}-{seq}"}
        elif kind < 0.7:
            msg = {"command": "LOAD_MODEL", "model_name": model}
        elif kind < 0.85:
            msg = {"action": "generate_text", "model_id": model, "prompt": "the",
                   "max_tokens": 3}
        else:
            msg = {"action": "preload_models", "model_ids": [model]}
        return json.dumps(msg).encode()
    return make


class Faults:
    """Injects faults until told to stop; counts what it did."""

    def __init__(self, shim: ShimProc, backends: dict[str, Backend], rng: random.Random,
                 tmp_path: Path) -> None:
        self.shim, self.backends, self.rng = shim, backends, rng
        self.done: Counter[str] = Counter()
        self.refusals: list[str] = []
        self.stop = threading.Event()
        self.stopped: Backend | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        kinds = ["sweep", "sigstop", "kill", "rollback", "unsafe_rules", "shadow"]
        # Every kind once first (in a seeded order), so that even a short soak tries them
        # all; then at random, sweeps twice as often.
        first = self.rng.sample(kinds, len(kinds))
        try:
            while not self.stop.is_set():
                fault = first.pop() if first else self.rng.choice(["sweep", *kinds])
                getattr(self, fault)()
                self.done[fault] += 1
                self.stop.wait(self.rng.uniform(0.2, 1.0))
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            if self.stopped is not None:
                os.kill(self.stopped.proc.pid, signal.SIGCONT)

    def _weights(self, mms: int) -> None:
        reply = admin(self.shim, "set_weights", weights={"mma": 100 - mms, "mms": mms})
        assert reply["status"] == "ok", reply

    def sweep(self) -> None:
        steps = [*range(0, 101, 10), *range(90, -1, -10)]
        if self.rng.random() < 0.5:
            steps = [100 - s for s in steps]
        for mms in steps:
            if self.stop.is_set():
                return
            self._weights(mms)
            self.stop.wait(0.1)  # the fault's own pace: one change per 100 ms

    def sigstop(self) -> None:
        victim = self.backends[self.rng.choice(["mma", "mms"])]
        self.stopped = victim
        os.kill(victim.proc.pid, signal.SIGSTOP)
        try:
            self._weights(self.rng.choice([0, 50, 100]))
            self.stop.wait(self.rng.uniform(1.0, 3.0))
        finally:
            os.kill(victim.proc.pid, signal.SIGCONT)
            self.stopped = None

    def kill(self) -> None:
        name = self.rng.choice(["mma", "mms"])
        old = self.backends[name]
        old.proc.kill()
        fresh = start_backend(name, port=old.port, health_port=old.health_port, timeout=20.0)
        old.proc, old.port = fresh.proc, fresh.port

    def rollback(self) -> None:
        self._weights(self.rng.choice([50, 100]))
        self.stop.wait(self.rng.uniform(0.0, 0.3))
        reply = admin(self.shim, "rollback")
        assert reply["status"] == "ok", reply

    def unsafe_rules(self) -> None:
        pin = admin(self.shim, "set_action", action="generate", pin="mms")
        mirror = admin(self.shim, "set_shadow", mirror={"generate": "always"})
        for reply in (pin, mirror):
            assert reply.get("status") == "error", reply
            self.refusals.append(str(reply.get("message")))

    def shadow(self) -> None:
        admin(self.shim, "set_mode", mode="shadow")
        self.stop.wait(self.rng.uniform(0.5, 1.5))
        admin(self.shim, "set_mode", mode="split")


@pytest.fixture
def stack(tmp_path: Path):
    mma, mms, shim = start_reference_stack(tmp_path, TOKEN,
                                           ejection={"base_ejection_ms": 1000})
    yield {"mma": mma, "mms": mms}, shim
    shim.stop()
    for backend in (mma, mms):
        if backend.proc.poll() is None:
            os.kill(backend.proc.pid, signal.SIGCONT)
        backend.stop()


@pytest.mark.timeout(SOAK_S + 150)  # the suite's 120 s default is for ordinary tests
def test_ownership_soak_never_two_owners(stack, tmp_path: Path) -> None:
    backends, shim = stack
    seed = int(os.environ.get("MMSHIM_SOAK_SEED", str(random.randrange(1 << 30))))
    print(f"soak seed {seed}, {SOAK_S:g} s")
    rng = random.Random(seed)
    watcher = OverlapWatcher(backends["mma"], backends["mms"])
    faults = Faults(shim, backends, random.Random(seed + 1), tmp_path)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    load = Load(ctx, shim.endpoint, clients=6, deadline_s=20.0, payload=payload(rng),
                kind="mix", max_requests=10_000_000, duration_s=SOAK_S,
                hard_limit_s=SOAK_S + 60, grace_s=0.5)
    fault_thread = threading.Thread(target=faults.run, daemon=True)
    watcher.start()
    load.start()
    fault_thread.start()
    try:
        result = load.join()
    finally:
        faults.stop.set()
        fault_thread.join(30)
        # After the faults: the watcher looks at the settled system too (rounds, not time).
        watcher.wait_looks(20)
        watcher.stop()
        ctx.destroy(linger=0)
    status = admin(shim, "status")
    own = status.get("ownership", {})
    report = {
        "seed": seed, "duration_s": SOAK_S, "requests_sent": result.sent,
        "requests_answered": result.answered, "wedged": len(result.wedged),
        "second_replies": len(result.extras), "outcomes": dict(result.outcomes),
        "faults": dict(faults.done), "moves": own.get("moves_done"),
        "moves_cancelled": own.get("moves_cancelled"), "refused": own.get("refused"),
        "longest_handover_s": own.get("longest_handover_s"),
        "overlap_sightings": len(watcher.overlaps),
        "longest_overlap_s": round(watcher.longest_overlap_s, 3),
        "watcher_looks": watcher.looks, "duplicates_seen": own.get("duplicates_seen"),
    }
    print("soak report:", json.dumps(report, sort_keys=True))
    if os.environ.get("MMSHIM_SOAK_REPORT"):
        Path(os.environ["MMSHIM_SOAK_REPORT"]).write_text(json.dumps(report, indent=2))
    assert faults.error is None, f"fault injection failed: {faults.error!r}"
    assert not watcher.overlaps, f"a model was on both backends: {watcher.overlaps[:5]}"
    assert own.get("duplicates_seen") == 0, own
    result.check()
    assert result.answered > 50, result.summary()
    assert watcher.looks > 50
    assert sum(faults.done.values()) >= 3, faults.done
    assert faults.refusals and all("one owner per model" in m for m in faults.refusals)

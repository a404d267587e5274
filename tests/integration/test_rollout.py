"""Rollouts on the reference backends: a healthy plan completes to 0/100 with every
request answered and no model on both backends; MMS failing one model rolls its stage
back within the bake time; a restart resumes the bake without re-applying the stage."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import Backend, req
from tests.reliability.helpers import OverlapWatcher, wait_until
from tests.shimproc import ShimProc, shim_config, start_reference_stack, start_shim

TOKEN = "test-token-rollout"
PREFS = ["fast", "quality", "fallback", "stt", "tts"]  # five models through the policy
ALL = ["piper-tts", "mistral-7b", "phi-2", "tinyllama", "whisper-small", "llama-3-8b"]
LLMS = ALL[:4]
#: Both reference backends get room for every model at once, so that a refused load for
#: want of VRAM (a real MMS behaviour, which the gates would rightly catch) is not what
#: these tests measure.
VRAM = ["--vram-mb", "24000"]
ROOT = Path(__file__).resolve().parents[2]


def admin(shim: ShimProc, command: str, **args: Any) -> dict[str, Any]:
    return req(shim.admin_endpoint, {"token": TOKEN, "command": command, **args}, timeout=10.0)


def rollout(shim: ShimProc) -> dict[str, Any]:
    reply = admin(shim, "rollout_status")
    assert reply["status"] == "ok", reply
    return dict(reply["rollout"])


def plan(name: str, stages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"name": name, "min_bake_s": 2, "max_bake_s": 45, "tick_s": 0.2,
            "gates": ["errors", "timeouts", "latency", "vram"],
            # Latency on a loaded 2-core test machine is noise; the statistics of the
            # latency gate are tested on a simulated clock (tests/unit).
            "thresholds": {"min_sample": 8, "max_p50_ratio": 20, "max_p99_ratio": 100},
            "probes": {"rate_per_s": 5}, "stages": stages, **extra}


class Traffic:
    """Legacy generates over the five policy models from a few threads, until stopped."""

    def __init__(self, shim: ShimProc, workers: int = 3) -> None:
        self.shim = shim
        self.stop = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.failures: list[dict[str, Any]] = []
        self.threads = [threading.Thread(target=self._run, args=(w,)) for w in range(workers)]

    def _run(self, worker: int) -> None:
        i = 0
        while not self.stop.is_set() and i < 20_000:
            pref = PREFS[(i + worker) % len(PREFS)]
            try:
                reply = req(self.shim.endpoint, {"action": "generate", "model_pref": pref,
                                                 "prompt": "the default value",
                                                 "params": {"max_tokens": 4}}, timeout=10.0)
            except TimeoutError:
                reply = {"status": "no reply"}
            self.outcomes[str(reply.get("status"))] += 1
            if reply.get("status") != "ok":
                self.failures.append({"pref": pref, **reply})
            i += 1

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)


def make_stack(tmp_path: Path, mms_args: list[str]) -> tuple[Backend, Backend, ShimProc]:
    return start_reference_stack(tmp_path, TOKEN, mma_args=tuple(VRAM),
                                 mms_args=(*VRAM, *mms_args), models_file=True)


def watcher(mma: Backend, mms: Backend) -> OverlapWatcher:
    """The independent watcher (asks both backends directly, never the shim)."""
    return OverlapWatcher(mma, mms, ask_timeout=3.0, pause_s=0.05)


@pytest.fixture
def healthy(tmp_path: Path) -> Iterator[tuple[Backend, Backend, ShimProc]]:
    mma, mms, shim = make_stack(tmp_path, [])
    yield mma, mms, shim
    shim.stop()
    mma.stop()
    mms.stop()


@pytest.fixture
def broken_phi(tmp_path: Path) -> Iterator[tuple[Backend, Backend, ShimProc]]:
    mma, mms, shim = make_stack(tmp_path, ["--fault-model", "phi-2",
                                           "--fault-error-rate", "0.5", "--fault-seed", "7"])
    yield mma, mms, shim
    shim.stop()
    mma.stop()
    mms.stop()


def warm_up(shim: ShimProc) -> None:
    """Some MMA answers first: the latency baseline of the same models."""
    for i in range(3 * len(PREFS)):
        reply = req(shim.endpoint, {"action": "generate", "model_pref": PREFS[i % len(PREFS)],
                                    "prompt": "the default value",
                                    "params": {"max_tokens": 4}}, timeout=10.0)
        assert reply["status"] == "ok", reply


@pytest.mark.slow
def test_healthy_plan_completes_to_all_mms(healthy) -> None:
    mma, mms, shim = healthy
    warm_up(shim)
    stages = [{"name": "tts", "models": ["piper-tts"]},
              {"name": "llms", "models": LLMS},
              {"name": "stt", "models": [*LLMS, "whisper-small"]},
              {"name": "all", "models": ALL, "model_free_percent": 100}]
    with watcher(mma, mms) as seen, Traffic(shim) as traffic:
        started = admin(shim, "rollout_start", plan=plan("healthy", stages))
        assert started["status"] == "ok", started
        done = wait_until(lambda: (r := rollout(shim))["status"] != "running" and r, 240,
                          "the rollout to finish", interval=0.1)
        assert done["status"] == "completed", done
    assert admin(shim, "status")["weights"] == {"mma": 0.0, "mms": 100.0}
    assert seen.duplicates == []
    assert traffic.failures == [], traffic.failures[:5]
    assert traffic.outcomes["ok"] > 0
    events = [h["event"] for h in done["history"]]
    assert events.count("stage") == 4 and events.count("passed") == 4, events
    metrics = shim.metrics()
    assert re.search(r'shim_rollout_stage\{plan="healthy"\} 4\.0', metrics)
    assert 'shim_rollout_gate_total{gate="errors",verdict="pass"} 4.0' in metrics


@pytest.mark.slow
def test_failing_model_rolls_back_its_stage_within_the_bake(broken_phi) -> None:
    mma, mms, shim = broken_phi
    warm_up(shim)
    stages = [{"name": "tts", "models": ["piper-tts"]},
              {"name": "llms", "models": LLMS, "min_bake_s": 30, "max_bake_s": 60}]
    with watcher(mma, mms) as seen, Traffic(shim):
        assert admin(shim, "rollout_start", plan=plan("broken", stages))["status"] == "ok"
        wait_until(lambda: rollout(shim)["stage"]["number"] == 2, 120, "stage 2", interval=0.1)
        at_stage_2 = time.monotonic()
        done = wait_until(lambda: (r := rollout(shim))["status"] != "running" and r, 90,
                          "the rollback", interval=0.1)
        took = time.monotonic() - at_stage_2  # printed only: the bake is the shim's clock
    assert done["status"] == "rolled_back", done
    rb = done["rollback"]
    assert rb["stage"] == 2 and rb["gate"] == "errors", rb
    assert "phi-2" in rb["reason"], rb
    assert rb["baked_s"] < 60, rb
    tts_weights = {"mma": 85.41, "mms": 14.59}
    assert rb["weights"] == tts_weights
    assert admin(shim, "status")["weights"] == tts_weights
    assert seen.duplicates == []
    assert 'shim_rollout_rollbacks_total{plan="broken"} 1.0' in shim.metrics()
    print(f"\nrolled back stage 2 after {rb['baked_s']:.1f} s baked ({took:.1f} s wall): "
          f"{rb['reason']}")


@pytest.mark.slow
def test_restart_resumes_the_bake_and_never_reapplies_a_stage(healthy, tmp_path) -> None:
    _, _, shim = healthy
    plan_file = tmp_path / "slow.toml"
    plan_file.write_text('name = "slow"\ntick_s = 0.2\nmin_bake_s = 600\nmax_bake_s = 900\n'
                         '[[stages]]\nname = "tts"\nmodels = ["piper-tts"]\n')
    started = ctl(shim, "rollout", "start", str(plan_file))
    assert started.returncode == 0, started.stderr
    assert "stage 1/1 tts: weights mma=85.41 mms=14.59" in started.stdout, started.stdout
    baked = wait_until(lambda: (b := rollout(shim)["stage"]["baked_s"]) > 2 and b, 30,
                       "some bake", interval=0.1)
    code = shim.stop()
    assert code == 0
    again = start_shim({**_config_of(shim)}, tmp_path, env={"MMSHIM_TOKEN": TOKEN},
                       path=shim.config_path)
    try:
        r = rollout(again)
        assert r["status"] == "running" and r["stage"]["number"] == 1
        assert r["stage"]["baked_s"] >= baked
        events = [h["event"] for h in r["history"]]
        assert events.count("stage") == 1 and "resumed" in events, events
        assert admin(again, "status")["weights"] == {"mma": 85.41, "mms": 14.59}
        # Bake time goes on from where it was.
        wait_until(lambda: rollout(again)["stage"]["baked_s"] > baked + 1, 30, "more bake",
                   interval=0.1)
        paused = admin(again, "rollout_pause")
        assert paused["rollout"]["status"] == "paused"
        aborted = admin(again, "rollout_abort")
        assert aborted["rollout"]["status"] == "aborted"
        assert admin(again, "status")["weights"] == {"mma": 100.0, "mms": 0.0}
        shown = ctl(again, "rollout", "status")
        assert shown.returncode == 0 and "ABORTED" in shown.stdout, shown
        refused = admin(again, "rollout_resume")
        assert refused["status"] == "error" and refused["error"] == "refused"
    finally:
        again.stop()


def ctl(shim: ShimProc, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shim.cli", "ctl", *argv, "--admin",
                           shim.admin_endpoint], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "MMSHIM_TOKEN": TOKEN}, cwd=ROOT)


def test_rollout_check_prints_the_moves_and_refuses_a_bad_plan(tmp_path: Path) -> None:
    good = subprocess.run([sys.executable, "-m", "shim.cli", "rollout", "check",
                           "config/rollouts/default.toml", "--config", "config/shim.toml"],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert good.returncode == 0, good.stderr
    assert "moves to mms: piper-tts" in good.stdout
    assert "weights mma=0 mms=100" in good.stdout
    bad_plan = tmp_path / "bad.toml"
    bad_plan.write_text('[[stages]]\nmodels = ["whisper-small"]\n')
    bad = subprocess.run([sys.executable, "-m", "shim.cli", "rollout", "check", str(bad_plan),
                          "--config", "config/shim.toml"], capture_output=True, text=True,
                         timeout=30, cwd=ROOT)
    assert bad.returncode == 2
    assert "no weight gives mms exactly ['whisper-small']" in bad.stderr


def _config_of(shim: ShimProc) -> dict[str, Any]:
    import json

    return dict(json.loads(shim.config_path.read_text()))


def test_bad_rollout_commands_get_clear_refusals_and_a_manual_change_pauses(
        fakes, tmp_path: Path) -> None:
    cfg = shim_config(fakes, tmp_path)  # ownership off: only 0/100 stages are possible
    shim = start_shim(cfg, tmp_path, env={"MMSHIM_TOKEN": TOKEN})
    try:
        assert rollout(shim) == {"status": "none"}
        no_plan = admin(shim, "rollout_start")
        assert no_plan["status"] == "error" and no_plan["error"] == "bad_request"
        splits = admin(shim, "rollout_start", plan={"name": "x", "stages": [
            {"models": [], "model_free_percent": 10}]})
        assert splits["error"] == "invalid" and "loads it on both" in splits["message"]
        typo = admin(shim, "rollout_start", plan={"name": "x", "stagez": []})
        assert typo["error"] == "invalid" and "stagez" in typo["message"]
        for verb in ("pause", "resume", "abort", "promote"):
            refused = admin(shim, f"rollout_{verb}")
            assert refused["error"] == "refused" and "no rollout" in refused["message"]
        ok = admin(shim, "rollout_start", plan={"name": "shadow-only", "tick_s": 0.2,
                                                "min_bake_s": 600, "max_bake_s": 900,
                                                "stages": [{"models": [], "shadow": True}]})
        assert ok["status"] == "ok", ok
        again = admin(shim, "rollout_start", plan={"name": "y", "stages": [{"models": []}]})
        assert again["error"] == "refused" and "abort it first" in again["message"]
        assert admin(shim, "status")["mode"] == "shadow"
        # An operator's change wins: the rollout pauses instead of fighting it.
        assert admin(shim, "set_weights", weights={"mma": 50, "mms": 50})["status"] == "ok"
        paused = wait_until(lambda: (r := rollout(shim))["status"] == "paused" and r, 20,
                            "the pause", interval=0.1)
        assert "changed outside the rollout" in paused["paused_reason"]
        resumed = admin(shim, "rollout_resume")["rollout"]
        assert resumed["status"] == "running"
        assert admin(shim, "status")["weights"] == {"mma": 100.0, "mms": 0.0}
        promoted = admin(shim, "rollout_promote")["rollout"]
        assert promoted["status"] == "completed"
        assert [h["event"] for h in promoted["history"]][-2:] == ["skipped", "completed"]
    finally:
        shim.stop()

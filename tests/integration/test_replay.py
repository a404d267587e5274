"""Recording live traffic through the shim and replaying it against the reference MMS.

Real processes throughout: the reference MMA and MMS (tests.procs.start_backend), the
shim at weights mma=100/mms=0 (``mmshim run``), ``mmshim ctl record``, ``mmshim demo``
for the traffic and ``mmshim replay`` for the parity report.
"""

from __future__ import annotations

import json
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.procs import REPO_ROOT, Backend, req, start_backend
from tests.reliability.helpers import wait_until
from tests.shimproc import ShimProc, shim_config, start_shim

DEMO_PROMPT = "The return value of the function"  # what shim.demo's generates send


def mmshim(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shim.cli", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)


def ctl(shim: ShimProc, *args: str) -> subprocess.CompletedProcess[str]:
    return mmshim("ctl", "--config", str(shim.config_path), *args)


def record_status(shim: ShimProc) -> dict[str, Any]:
    run = ctl(shim, "--json", "record", "status")
    assert run.returncode == 0, run.stderr
    status: dict[str, Any] = json.loads(run.stdout)
    return status


def wait_written(shim: ShimProc, count: int, timeout: float = 20.0) -> dict[str, Any]:
    """The record status once ``count`` exchanges are in the capture file."""
    last: dict[str, Any] = {}

    def written() -> dict[str, Any] | None:
        last.update(record_status(shim))
        return dict(last) if last["written"] >= count else None

    return wait_until(written, timeout, lambda: f"{count} written (only {last.get('written')})")


def seeded_models(tmp_path: Path) -> Path:
    """A models file that charges every model 100 MB more than config/models.toml."""
    models = (REPO_ROOT / "config" / "models.toml").read_text()
    models = models.replace("../models/", str(REPO_ROOT / "models") + "/")
    seeded = re.sub(r"estimated_vram_mb = (\d+)",
                    lambda m: f"estimated_vram_mb = {int(m.group(1)) + 100}", models)
    assert seeded != models
    path = tmp_path / "models-seeded.toml"
    path.write_text(seeded)
    return path


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The demo's traffic recorded through a shim at 100/0 (MMA answers everything)."""
    tmp = tmp_path_factory.mktemp("record")
    mma, mms = start_backend("mma"), start_backend("mms")
    capture = tmp / "captures" / "capture.jsonl"
    cfg = shim_config({"mma": mma, "mms": mms}, tmp,
                      routing={"weights": {"mma": 100, "mms": 0}},
                      record={"path": str(capture)})
    shim = start_shim(cfg, tmp)
    try:
        started = ctl(shim, "record", "start", "--percent", "100")
        assert started.returncode == 0, started.stderr
        assert "recording: 100%" in started.stdout
        demo = mmshim("demo", "--config", str(shim.config_path), "--count", "40")
        assert demo.returncode == 0, demo.stdout + demo.stderr
        status = wait_written(shim, 40)
        stopped = ctl(shim, "record", "stop")
        assert stopped.returncode == 0, stopped.stderr
        yield {"capture": capture, "shim": shim, "status": status, "tmp": tmp,
               "metrics": shim.metrics()}
    finally:
        shim.stop()
        mma.stop()
        mms.stop()


def test_capture_is_private_and_holds_no_payloads_by_default(recorded: dict[str, Any]) -> None:
    capture: Path = recorded["capture"]
    assert stat.S_IMODE(capture.stat().st_mode) == 0o600
    assert stat.S_IMODE(capture.parent.stat().st_mode) == 0o700  # created by the recorder
    text = capture.read_text()
    assert DEMO_PROMPT not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 40 and recorded["status"]["shed"] == 0
    assert all(r["v"] == 1 and r["kind"] == "exchange" and r["redacted"] for r in lines)
    generates = [r for r in lines if r["action"] == "generate"]
    assert len(generates) == 35
    for r in generates:
        assert r["backend"] == "mma" and r["model"] in ("phi-2", "mistral-7b", "tinyllama")
        assert r["request"]["prompt"]["length"] == len(DEMO_PROMPT)
        assert r["request"]["prompt"]["redacted"].startswith("sha256:")
        assert set(r["reply"]["response_text"]) == {"redacted", "type", "length"}
        assert r["latency_ms"] > 0 and r["form"] == "action" and r["dialect"] == "mma"
    assert {r["action"] for r in lines} >= {"status", "loaded_status", "health",
                                            "model_access", "clear_conversation"}
    assert 'shim_record_total{outcome="written"} 40.0' in recorded["metrics"]


def test_bad_record_settings_are_refused_and_change_nothing(recorded: dict[str, Any]) -> None:
    shim: ShimProc = recorded["shim"]
    for args in (("--percent", "0"), ("--percent", "101"), ("--max-bytes", "10")):
        run = ctl(shim, "record", "start", *args)
        assert run.returncode == 1, (args, run.stdout, run.stderr)
        assert "record_start: invalid" in run.stderr
    assert ctl(shim, "record", "stop", "--percent", "5").returncode == 2  # usage
    assert record_status(shim)["active"] is False
    raw = ctl(shim, "call", "record_start", '{"path": "/etc/passwd"}')
    assert raw.returncode == 1 and "come from the config file" in raw.stdout + raw.stderr


def test_demo_capture_replays_against_mms_with_a_parity_report(
        recorded: dict[str, Any]) -> None:
    mms = start_backend("mms")
    try:
        run = mmshim("replay", str(recorded["capture"]), "--to", mms.endpoint,
                     "--dialect", "mms", "--speed", "10x", "--threshold", "5", "--json")
    finally:
        mms.stop()
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    verdict = report["verdict"]
    print(f"\nreplay of the demo capture against MMS: {verdict}\nlatency: "
          f"{report['latency']['total']}")
    assert verdict["requests"] == 40 and verdict["attempted"] == 39
    assert verdict["mismatch_rate_percent"] <= 5 and verdict["passed"]
    for action in ("generate", "status", "loaded_status", "health", "model_access"):
        assert report["actions"][action]["compared"] >= 1, action
    assert report["actions"]["clear_conversation"]["skipped"] == 1  # MMS has none
    assert report["latency"]["total"]["n"] == 39 and report["latency"]["total"]["ratio"] > 0


def test_a_seeded_mms_difference_is_found_and_named(recorded: dict[str, Any],
                                                    tmp_path: Path) -> None:
    mms = start_backend("mms", seeded_models(tmp_path))
    try:
        run = mmshim("replay", str(recorded["capture"]), "--to", mms.endpoint,
                     "--threshold", "0", "--log", str(tmp_path / "diffs.jsonl"))
    finally:
        mms.stop()
    print("\n" + run.stdout)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "replay FAILED" in run.stdout
    assert "access_info.vram_allocated_mb" in run.stdout  # whisper-small: 1000 vs 1100 MB
    again = mmshim("diffs", "--log", str(tmp_path / "diffs.jsonl"))
    assert "access_info.vram_allocated_mb" in again.stdout


def test_calibration_turns_what_the_reference_twin_also_differs_in_into_noise(
        recorded: dict[str, Any], tmp_path: Path) -> None:
    # The twin of the reference (an MMA) has the same seeded config as the candidate, so
    # the candidate's difference from the recording is one the reference side has too.
    seeded = seeded_models(tmp_path)
    mms, twin = start_backend("mms", seeded), start_backend("mma", seeded)
    try:
        run = mmshim("replay", str(recorded["capture"]), "--to", mms.endpoint,
                     "--calibrate", twin.endpoint, "--calibrate-dialect", "mma",
                     "--threshold", "0", "--json")
    finally:
        mms.stop()
        twin.stop()
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    assert report["verdict"]["mismatch_rate_percent"] == 0.0
    assert report["actions"]["model_access"]["noise"] == {"access_info.vram_allocated_mb": 1}


def test_unreadable_capture_and_unreachable_candidate_exit_clearly(tmp_path: Path) -> None:
    missing = mmshim("replay", str(tmp_path / "nope.jsonl"), "--to", "tcp://127.0.0.1:9")
    assert missing.returncode == 2 and "no such capture" in missing.stderr
    newer = tmp_path / "newer.jsonl"
    newer.write_text(json.dumps({"v": 99, "kind": "exchange", "request": {}}) + "\n")
    assert mmshim("replay", str(newer), "--to", "tcp://127.0.0.1:9").returncode == 2
    converted = tmp_path / "corpus.jsonl"
    assert mmshim("capture", "convert", "-o", str(converted)).returncode == 0
    dead = mmshim("replay", str(converted), "--to", "tcp://127.0.0.1:9")
    assert dead.returncode == 3 and "cannot reach" in dead.stderr


# -- state-changing sequences ------------------------------------------------------------

LOAD = {"command": "LOAD_MODEL", "model_name": "{m}"}
UNLOAD = {"command": "UNLOAD_MODEL", "model_name": "{m}"}
LOADED = {"command": "GET_LOADED_MODELS_STATUS"}


def sequence(models: dict[str, str]) -> list[dict[str, Any]]:
    """Per model: load, three generates (one conversation per model), loaded status,
    unload; the models interleaved so an unordered replay would overlap them."""
    out: list[dict[str, Any]] = []
    for step in range(6):
        for pref, model in models.items():
            if step == 0:
                out.append({"command": "LOAD_MODEL", "model_name": model})
            elif step <= 3:
                out.append({"action": "generate", "model_pref": pref, "prompt": "hello world",
                            "conversation_id": f"conv-{pref}", "params": {"max_tokens": 4}})
            elif step == 4:
                out.append(LOADED)
            else:
                out.append({"command": "UNLOAD_MODEL", "model_name": model})
    return out


def test_load_generate_unload_replays_in_order(tmp_path: Path) -> None:
    mma, mms = start_backend("mma"), start_backend("mms")
    capture = tmp_path / "seq.jsonl"
    cfg = shim_config({"mma": mma, "mms": mms}, tmp_path,
                      routing={"weights": {"mma": 100, "mms": 0}},
                      record={"enabled": True, "path": str(capture), "payloads": True})
    shim = start_shim(cfg, tmp_path)
    requests = sequence({"fast": "phi-2", "fallback": "tinyllama"})
    try:
        for msg in requests:
            reply = req(shim.endpoint, msg, timeout=10.0)
            assert reply.get("status") in ("ok", "SUCCESS", "success"), (msg, reply)
        wait_written(shim, len(requests))
    finally:
        shim.stop()
        mma.stop()
        mms.stop()
    lines = [json.loads(line) for line in capture.read_text().splitlines()]
    assert [r["request"] for r in lines] == requests  # recorded in order, payloads kept
    assert not any(r["redacted"] for r in lines)
    reports = {}
    for mode in ("--ordered", "--speed=max"):
        fresh: Backend = start_backend("mms")
        try:
            run = mmshim("replay", str(capture), "--to", fresh.endpoint, mode, "--json",
                         "--verbose")
        finally:
            fresh.stop()
        assert run.returncode == 0, run.stdout + run.stderr
        body = run.stdout[run.stdout.index("\n{") + 1:]  # after the per-request lines
        reports[mode] = json.loads(body)
    for mode, report in reports.items():
        actions = report["actions"]
        # Out of order, a generate before its load or an unload before its generates
        # would fail or differ; the loaded status would list another set of models.
        assert actions["load"]["match"] == 2, (mode, actions["load"])
        assert actions["generate"]["match"] == 6, (mode, actions["generate"])
        assert actions["loaded_status"]["match"] == 2, (mode, actions["loaded_status"])
        assert actions["unload"]["match"] == 2, (mode, actions["unload"])
        assert report["verdict"]["mismatch_rate_percent"] == 0.0


def test_a_converted_corpus_replayed_with_a_reference_is_the_parity_run(
        tmp_path: Path) -> None:
    mma, mms = start_backend("mma"), start_backend("mms")
    try:
        cfg = {"backends": {"mma": {"dialect": "mma", "endpoints": [mma.endpoint]},
                            "mms": {"dialect": "mms", "endpoints": [mms.endpoint]}},
               "models_file": str(REPO_ROOT / "config" / "models.toml")}
        config = tmp_path / "parity.json"
        config.write_text(json.dumps(cfg))
        parity = mmshim("parity", "--config", str(config), "--json", "--threshold", "100")
        capture = tmp_path / "corpus-capture.jsonl"
        convert = mmshim("capture", "convert", "--config", str(config), "-o", str(capture))
        assert convert.returncode == 0, convert.stderr
        replayed = mmshim("replay", str(capture), "--config", str(config), "--to",
                          mms.endpoint, "--reference", mma.endpoint, "--ordered", "--json",
                          "--threshold", "100")
    finally:
        mma.stop()
        mms.stop()
    assert parity.returncode == 0 and replayed.returncode == 0, replayed.stderr
    a, b = json.loads(parity.stdout), json.loads(replayed.stdout)
    # Fresh backends in both runs (parity left its models unloaded): the same outcomes.
    counts = {k: {o: v[o] for o in ("compared", "mismatch", "skipped") if o in v}
              for k, v in a["actions"].items()}
    assert counts == {k: {o: v[o] for o in ("compared", "mismatch", "skipped") if o in v}
                      for k, v in b["actions"].items()}
    assert a["verdict"]["attempted"] == b["verdict"]["attempted"] >= 25

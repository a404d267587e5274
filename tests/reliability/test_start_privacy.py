"""Start-up that nothing on disk or in the air can stop, and data kept private (issue 12).

- a state directory the shim cannot write: it starts, warns, serves, and refuses runtime
  changes with a clear error (nothing it could not persist is changed);
- SIGHUP right after the process starts (before the event loop is up) is not fatal;
- temporary files left by an interrupted write are removed at start;
- the diff log, state, audit and token files are 0600 in a 0700 directory, the diff log
  holds no prompt or generated text unless ``shadow.log_payloads`` is on, and the health
  socket tells anyone only the legacy health fields.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
from pathlib import Path

import zmq

from shim.ctl import AdminClient
from tests.procs import REPO_ROOT as ROOT
from tests.procs import Proc, req
from tests.reliability.helpers import (
    GEN,
    assert_clean_exit,
    assert_serving,
    start_ready,
    wait_until,
)
from tests.shimproc import ShimProc, shim_config, start_fake, start_shim

TOKEN = "test-token-0123456789"


def admin(shim: ShimProc, token: str = TOKEN) -> AdminClient:
    return AdminClient(shim.admin_endpoint, token, timeout_s=10.0)


def test_unwritable_state_dir_starts_serves_and_refuses_changes(tmp_path: Path) -> None:
    fake = start_fake("mma", "mma")
    # A state "directory" that is a regular file: nothing can be created in it, for root
    # too (chmod would not stop root). The same OSError path as a read-only or full disk.
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    cfg = shim_config({"mma": fake}, tmp_path)
    cfg["shim"]["state_file"] = str(blocker / "shim-state.json")
    cfg["shadow"]["diff_log"] = str(blocker / "diffs.jsonl")
    shim = start_shim(cfg, tmp_path, env={**os.environ, "MMSHIM_TOKEN": TOKEN})
    client = admin(shim)
    try:
        assert_serving(shim, tries=3)
        reply = client.call("set_weights", weights={"mma": 50})
        assert reply["status"] == "error" and reply["error"] == "read_only", reply
        assert "cannot be written" in reply["message"]
        status = client.call("status")
        assert status["status"] == "ok" and status["weights"] == {"mma": 100.0}
        assert "not writable" in shim.proc.log()
        assert_clean_exit(shim)
    finally:
        client.close()
        shim.kill()
        fake.kill()


def test_sighup_during_start_is_not_fatal(tmp_path: Path) -> None:
    fake = start_fake("mma", "mma")
    cfg = shim_config({"mma": fake}, tmp_path)
    path = tmp_path / "shim.json"
    path.write_text(json.dumps(cfg))
    early_seen = 0
    try:
        for _ in range(3):
            proc = Proc([sys.executable, "-m", "shim.cli", "run", "--config", str(path),
                         "--log-level", "info"], cwd=ROOT)
            try:
                # As soon as the process catches SIGHUP at all (before that, the kernel's
                # default action applies to any program): long before the loop is up.
                wait_until(lambda p=proc: catches_sighup(p.pid) or p.poll() is not None,
                           20.0, "a SIGHUP handler")
                early = "mmshim listening" not in proc.log()
                proc.popen.send_signal(signal.SIGHUP)
                wait_until(lambda p=proc: "mmshim listening" in p.log() or p.poll() is not None,
                           30.0, "the shim started or exited")
                proc.popen.send_signal(signal.SIGHUP)  # and once while it runs
                assert proc.poll() is None, proc.log()[-2000:]
                reply = req(cfg["shim"]["listen"].replace("*", "127.0.0.1"), GEN, timeout=10.0)
                assert reply.get("status") == "ok", reply
                wait_until(lambda p=proc: p.log().count("SIGHUP: reloading") >= 1, 10.0,
                           "the reload asked for during start-up")
                assert proc.stop(timeout=10.0) == 0
                early_seen += early
                assert "Traceback" not in proc.log(), proc.log()[-3000:]
            finally:
                proc.kill()
    finally:
        fake.kill()
    assert early_seen >= 1, "no SIGHUP arrived before the shim was listening"


def catches_sighup(pid: int) -> bool:
    """Whether the process has a handler for SIGHUP (``SigCgt`` in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


def test_stale_temp_files_are_removed_at_start(tmp_path: Path) -> None:
    fake = start_fake("mma", "mma")
    # What `kill -9` during atomic_write leaves: .NAME.XXXXXXXX.tmp next to the file.
    stale = [tmp_path / ".state.json.k2j4h1x9.tmp", tmp_path / ".state.token.a8d7f6e5.tmp"]
    for path in stale:
        path.write_text("half a write")
    keep = tmp_path / "notes.tmp"  # not one of ours
    keep.write_text("x")
    shim = start_shim(shim_config({"mma": fake}, tmp_path), tmp_path)
    try:
        assert not any(p.exists() for p in stale)
        assert keep.exists()
        assert_clean_exit(shim)
    finally:
        shim.kill()
        fake.kill()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_files_are_private_and_the_diff_log_holds_no_payloads(
        tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    # MMS drops a field of its generate reply: every mirrored generate is a mismatch.
    fakes = {"mma": start_fake("mma", "mma"),
             "mms": start_fake("mms", "mms", mode="rename_field", rename="text=txt")}
    state_dir = tmp_path / "state"  # made by the shim
    cfg = shim_config(fakes, tmp_path, routing={"mode": "shadow",
                                                "weights": {"mma": 100, "mms": 0}},
                      actions={"generate": {"mirror": "always"}})
    cfg["shim"]["state_file"] = str(state_dir / "shim-state.json")
    cfg["shadow"]["diff_log"] = str(state_dir / "diffs.jsonl")
    shim = start_ready(cfg, tmp_path)
    token = (state_dir / "shim-state.token").read_text().strip()
    client = admin(shim, token)
    secret = "my secret prompt about conversation conv-42"
    try:
        for _ in range(5):
            reply = req(shim.endpoint, {**GEN, "prompt": secret, "conversation_id": "conv-42"})
            assert reply.get("status") == "ok", reply
        assert client.call("set_shadow", percent=50)["status"] == "ok"
        diffs = state_dir / "diffs.jsonl"
        wait_until(lambda: diffs.exists() and "mismatch" in diffs.read_text(), 20.0,
                   "a mismatch record in the diff log")
        text = diffs.read_text()
        assert secret not in text and "conv-42" not in text
        record = next(json.loads(line) for line in text.splitlines() if "mismatch" in line)
        assert set(record["request"]) == {"sha256", "bytes", "shape"}
        assert record["request"]["shape"]["prompt"] == "str"
        assert mode_of(state_dir) == 0o700
        for name in ("diffs.jsonl", "shim-state.json", "shim-state.token",
                     "shim-state.audit.jsonl"):
            assert mode_of(state_dir / name) == 0o600, name
        # The health socket: legacy fields only, for anyone; the rest via admin status.
        health = shim.health()
        assert set(health) == {"status", "details"}
        assert set(health["details"]) == {"status_message", "uptime_seconds"}
        assert "mode" in client.call("status")["health"]["details"]
        assert_clean_exit(shim)
    finally:
        client.close()
        shim.kill()
        for fake in fakes.values():
            fake.kill()

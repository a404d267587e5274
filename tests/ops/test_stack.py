"""``mmshim stack`` (shim.stack): it checks every endpoint before starting anything, and
SIGINT or SIGTERM to it stops all its children; every child's log line names it."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.procs import Proc, free_port, req
from tests.reliability.helpers import wait_until
from tests.shimproc import ROOT, shim_config


def stack_config(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    backends = {name: {"dialect": name, "endpoints": [f"tcp://127.0.0.1:{free_port()}"],
                       "health": f"tcp://127.0.0.1:{free_port()}"} for name in ("mma", "mms")}
    cfg = shim_config(backends, tmp_path, models_file=str(ROOT / "config" / "models.toml"))
    path = tmp_path / "stack.json"
    path.write_text(json.dumps(cfg))
    return path, cfg


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_taken_backend_port_stops_the_stack_before_anything_starts(tmp_path: Path) -> None:
    path, cfg = stack_config(tmp_path)
    port = int(cfg["backends"]["mms"]["endpoints"][0].rsplit(":", 1)[1])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = Proc([sys.executable, "-m", "shim.cli", "stack", "--config", str(path)])
        wait_until(lambda: proc.poll() is not None, 30, "the stack to give up")
    log = proc.log()
    assert proc.poll() == 3, log
    assert f"mms 127.0.0.1:{port} cannot be bound" in log and "nothing started" in log
    assert "starting" not in log
    # The shim's own listen port was never bound: it is free now and was all along.
    listen_port = int(cfg["shim"]["listen"].rsplit(":", 1)[1])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", listen_port))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_stack_stops_every_child(tmp_path: Path, sig: signal.Signals) -> None:
    path, cfg = stack_config(tmp_path)
    proc = Proc([sys.executable, "-m", "shim.cli", "stack", "--config", str(path)])
    kids: list[int] = []
    try:
        health = cfg["shim"]["health"]
        req(health, b"?", timeout=30.0)  # the shim is up
        kids = children(proc.pid)
        assert len(kids) == 3, kids
        os.kill(proc.pid, sig)
        wait_until(lambda: proc.poll() is not None, 30, "the stack to stop")
        assert proc.poll() == 0, proc.log()
        assert not [k for k in kids if alive(k)], "children outlived the stack"
        log = proc.log()
        assert f"got {sig.name}; stopping mma, mms, shim" in log
        # Every line a child logged names its process (one shared terminal).
        lines = [ln for ln in log.splitlines() if ln[:2] == "20"]
        assert lines and all(ln.split()[2] in ("mma", "mms", "shim") for ln in lines), lines
    finally:
        for k in kids:
            if alive(k):
                os.kill(k, signal.SIGKILL)
        proc.kill()

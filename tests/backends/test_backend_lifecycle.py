"""Process life cycle: clean shutdown on signals, and answering while a model loads."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from backends.ledger import VramLedger
from backends.loaders import ModelHandle, load_model
from backends.mma import MMADialect
from backends.mms import MMSDialect
from backends.registry import ModelSpec, Registry
from backends.server import Server, ServiceCore
from tests.procs import REPO_ROOT, Backend, free_port, req


@pytest.mark.parametrize("kind", ["mma", "mms"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_within_2s(
    kind: str, sig: signal.Signals, backend_factory: Callable[..., Backend]
) -> None:
    be = backend_factory(kind)
    load = ({"command": "LOAD_MODEL", "model_name": "phi-2"} if kind == "mma"
            else {"action": "load_model", "model_id": "phi-2"})
    assert req(be.endpoint, load)["status"] in ("SUCCESS", "success")
    # A generation in flight when the signal arrives.
    dealer: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(be.endpoint)
    body = ({"action": "generate", "prompt": "x", "params": {"max_tokens": 2048}}
            if kind == "mma" else
            {"action": "generate_text", "model_id": "phi-2", "prompt": "x", "max_tokens": 2048})
    dealer.send_multipart([b"", json.dumps(body).encode()])
    time.sleep(0.05)
    started = time.monotonic()
    be.proc.popen.send_signal(sig)
    try:
        code = be.proc.popen.wait(timeout=2.0)
        elapsed = time.monotonic() - started
        # The request in flight was answered (finished, or told the backend is stopping).
        assert dealer.poll(1000), "request in flight got no reply"
        empty, payload = dealer.recv_multipart()
        assert empty == b""
        assert json.loads(payload)["status"] in ("ok", "success", "ERROR", "error")
    except subprocess.TimeoutExpired:
        pytest.fail(f"{kind} did not stop within 2 s:\n{be.proc.log()}")
    finally:
        dealer.close(linger=0)
    assert code == 0, be.proc.log()
    assert elapsed < 2.0
    log = be.proc.log()
    assert "unloaded phi-2 (shutdown)" in log
    assert "Traceback" not in log


def test_help_and_bad_config(tmp_path: Path) -> None:
    for kind in ("mma", "mms"):
        out = subprocess.run([sys.executable, "-m", f"backends.{kind}", "--help"],
                             cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        assert out.returncode == 0
        assert "--vram-mb" in out.stdout and "--idle-unload-s" in out.stdout
        assert "--legacy-error-shape" not in out.stdout  # hidden
    bad = tmp_path / "models.toml"
    bad.write_text('[models.phi-2]\nloader = "ngram"\npath = "x"\nestimated_vram_mb = "big"\n')
    out = subprocess.run(
        [sys.executable, "-m", "backends.mma", "--models", str(bad),
         "--port", str(free_port()), "--health-port", str(free_port())],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
    )
    assert out.returncode == 2
    assert "$.models.phi-2.estimated_vram_mb" in out.stderr


class SlowLoader:
    """The real n-gram loader, made slow, counting its calls."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0
        self.started = threading.Event()  # a load is under way

    def __call__(self, spec: ModelSpec) -> ModelHandle:
        self.calls += 1
        self.started.set()
        time.sleep(self.delay)  # the slow load itself (in the ledger's loader thread)
        return load_model(spec)


@pytest.mark.parametrize("kind", ["mma", "mms"])
async def test_answers_while_a_model_loads(kind: str, models_toml: Callable[..., Path]) -> None:
    toml = models_toml(
        {"phi-2": {"loader": "ngram", "path": "tiny.ngram", "estimated_vram_mb": 2250}},
        policy={"fast": "phi-2"},
    )
    registry = Registry.load(toml)
    loader = SlowLoader(1.0)
    ledger = VramLedger(registry, budget_mb=4000, on_full="evict", loader=loader)
    core = ServiceCore(registry, on_full="evict", ledger=ledger)
    dialect = MMADialect(core) if kind == "mma" else MMSDialect(core)
    port, health = free_port(), free_port()
    server = Server(dialect, host="127.0.0.1", port=port, health_port=health)
    stop = asyncio.Event()
    serving = asyncio.create_task(server.serve(stop))
    ctx = zmq.asyncio.Context()

    async def ask(body: dict[str, Any], timeout: float) -> dict[str, Any]:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{port}")
        try:
            await sock.send(json.dumps(body).encode())
            reply: dict[str, Any] = json.loads(await asyncio.wait_for(sock.recv(), timeout))
            return reply
        finally:
            sock.close(linger=0)

    gen: dict[str, Any] = (
        {"action": "generate", "prompt": "Return the", "params": {"max_tokens": 5}}
        if kind == "mma"
        else {"action": "generate_text", "model_id": "phi-2", "prompt": "Return the",
              "max_tokens": 5}
    )
    status: dict[str, Any] = ({"action": "status"} if kind == "mma" else {"action": "health_check"})
    try:
        first = asyncio.create_task(ask(gen, 5.0))
        second = asyncio.create_task(ask(gen, 5.0))
        assert await asyncio.to_thread(loader.started.wait, 10.0), "the load never began"
        during = await ask(status, 0.5)  # answered well inside the 1 s load
        if kind == "mma":
            assert during["loaded_models"] == {"phi-2": {
                "vram_usage_mb": 2250, "device": "cpu", "last_used": None,
                "is_active": False, "quantization": "none"}}
            assert during["total_vram_used_mb"] == 2250
        else:
            assert during["model_details"] == {"phi-2": {"status": "loading",
                                                         "message": "Loading"}}
        assert not first.done()
        replies = await asyncio.gather(first, second)
        assert all(r["status"] in ("ok", "success") for r in replies)
        assert loader.calls == 1  # both requests shared the one load
        ledger.check()
    finally:
        stop.set()
        await serving
        ctx.term()
    assert ledger.used_mb() == 0

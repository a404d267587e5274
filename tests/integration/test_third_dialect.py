"""A third backend of a third dialect, from config alone (issue 13, "Done when").

The toy dialect "v3" (tests/toy_dialect.py) is one module and one registration; the shim
process learns it from its config (``[dialects] modules``), and a third backend that
speaks it (a thread on a real ZeroMQ ROUTER + REP here) is one ``[backends.v3]`` entry.
No file under shim/ names v3. The test shows requests routed to it by weight, translated
there and back, and its health socket probed in its own dialect.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.procs import free_port, req
from tests.reliability.helpers import metric, served_by, wait_until
from tests.shimproc import Fake, shim_config, start_shim

V3_USED_MB, V3_TOTAL_MB = 1234.0, 5678.0


@dataclass
class V3Backend:
    """A backend that speaks only v3: ROUTER for requests, REP for health, one thread."""

    port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    requests: list[Any] = field(default_factory=list)
    probes: list[bytes] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def config(self) -> dict[str, Any]:
        return {"dialect": "v3", "endpoints": [f"tcp://127.0.0.1:{self.port}"],
                "health": f"tcp://127.0.0.1:{self.health_port}"}

    def seen(self) -> tuple[list[Any], list[bytes]]:
        with self._lock:
            return list(self.requests), list(self.probes)

    def serve(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        router, health = ctx.socket(zmq.ROUTER), ctx.socket(zmq.REP)
        for sock in (router, health):
            sock.setsockopt(zmq.LINGER, 0)
        router.bind(f"tcp://127.0.0.1:{self.port}")
        health.bind(f"tcp://127.0.0.1:{self.health_port}")
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(health, zmq.POLLIN)
        try:
            while not self.stop.is_set():
                events = dict(poller.poll(50))
                if health in events:
                    probe = health.recv()
                    with self._lock:
                        self.probes.append(probe)
                    health.send_json({"state": "up", "memory": {"used_mb": V3_USED_MB,
                                                                "total_mb": V3_TOTAL_MB}})
                if router in events:
                    *envelope, payload = router.recv_multipart()
                    request = json.loads(payload)
                    with self._lock:
                        self.requests.append(request)
                    if request.get("op") == "complete":
                        reply = {"ok": True, "output": f"v3 heard {request['input']}",
                                 "model": request["model"]}
                    else:
                        reply = {"ok": True}
                    router.send_multipart([*envelope, json.dumps(reply).encode()])
        finally:
            router.close(0)
            health.close(0)


@pytest.fixture
def v3(ctx: zmq.Context[zmq.Socket[bytes]]) -> Iterator[V3Backend]:
    backend = V3Backend()
    thread = threading.Thread(target=backend.serve, args=(ctx,), daemon=True)
    thread.start()
    yield backend
    backend.stop.set()
    thread.join(timeout=10)


def test_third_backend_of_a_third_dialect_from_config_alone(
        fakes: dict[str, Fake], v3: V3Backend, tmp_path: Path) -> None:
    backends: dict[str, Any] = {**fakes, "v3": v3.config}
    cfg = shim_config(backends, tmp_path,
                      routing={"weights": {"mma": 50.0, "mms": 0.0, "v3": 50.0},
                               "sticky_key": ""},
                      dialects={"modules": ["tests.toy_dialect"]})
    shim = start_shim(cfg, tmp_path)
    try:
        # Health: probed in v3's own words, and its reply read in v3's shape.
        wait_until(lambda: b'{"op": "ping"}' in v3.seen()[1], 20.0, "a v3 health probe")
        assert set(v3.seen()[1]) == {b'{"op": "ping"}'}
        wait_until(lambda: metric(shim.metrics(), "shim_backend_vram_used_mb",
                                  backend="v3") == V3_USED_MB, 20.0, "v3's VRAM figure")
        assert metric(shim.metrics(), "shim_backend_vram_budget_mb",
                      backend="v3") == V3_TOTAL_MB

        # Routing by weight: MMA agents' generate requests split between mma and v3.
        servers: list[str] = []
        for i in range(40):
            reply = req(shim.endpoint, {"action": "generate", "model_pref": "quality",
                                        "prompt": f"hello {i}", "params": {"max_tokens": 7}},
                        timeout=10.0)
            assert reply["status"] == "ok", reply
            if reply["response_text"].startswith("v3 heard"):
                servers.append("v3")
                # Translated back into MMA's generate reply.
                assert reply["response_text"] == f"v3 heard hello {i}"
                assert reply["model_used"] == "mistral-7b"
                assert isinstance(reply["timestamp"], float)
            else:
                servers.append(served_by(reply))
        assert set(servers) == {"mma", "v3"}, servers

        # Translated there: v3 got its own shape, never MMA's.
        generated = [r for r in v3.seen()[0] if r.get("op") == "complete"]
        assert len(generated) == servers.count("v3")
        assert all(r["model"] == "mistral-7b" and r["limits"] == {"max_tokens": 7}
                   and "action" not in r for r in generated)

        # Weights move traffic there entirely (runtime knob, no config change).
        from shim.ctl import AdminClient

        token = (tmp_path / "state.token").read_text().strip()
        admin = AdminClient(shim.admin_endpoint, token, timeout_s=5.0)
        try:
            admin.call("set_weights", weights={"mma": 0, "mms": 0, "v3": 100})
        finally:
            admin.close()
        before = len(v3.seen()[0])
        reply = req(shim.endpoint, {"command": "LOAD_MODEL", "model_name": "phi-2"},
                    timeout=10.0)
        assert reply["status"] == "SUCCESS", reply
        assert v3.seen()[0][before:] == [{"op": "load", "model": "phi-2"}]
    finally:
        shim.stop()

"""Agent behaviours from protocol.md ("What the deployed agents really send") through the
shim, one at a time: re-sent duplicates, deadlines that follow the caller, the merged view
of loaded models, error shapes on every path, ROUTER_HANDOVER, oversized requests, an HTTP
GET on the ZeroMQ port."""

from __future__ import annotations

import contextlib
import json
import socket
import time
import uuid
from pathlib import Path

import zmq

from tests.compat.conftest import backends_of, compat_config
from tests.procs import req, start_backend
from tests.reliability.helpers import wait_until
from tests.shimproc import shim_config, start_fake, start_shim

GEN = {"action": "generate", "model_pref": "fast", "prompt": "hi", "params": {"max_tokens": 4}}


def counts(fake_health_endpoint: str) -> dict[str, int]:
    reply = req(fake_health_endpoint, b"?", timeout=5.0)
    result: dict[str, int] = reply.get("counts", {})
    return result


def metric(text: str, prefix: str) -> float:
    return sum(float(row.rsplit(" ", 1)[1]) for row in text.splitlines()
               if row.startswith(prefix))


def test_lazy_pirate_resends_and_request_ids_join_one_execution(tmp_path: Path) -> None:
    slow = start_fake("mma", "mma", delay_ms=1500)
    shim = start_shim(shim_config({"mma": slow}, tmp_path), tmp_path)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        # model_client (oldest): new REQ per try, gives up after 0.5 s here, re-sends.
        payload = json.dumps({**GEN, "prompt": "lazy pirate"}).encode()
        reply = None
        for _ in range(3):
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(shim.endpoint)
            sock.send(payload)
            if sock.poll(900):
                reply = json.loads(sock.recv())
                sock.close(0)
                break
            sock.close(0)
        assert reply is not None and reply["status"] == "ok"
        # model_client (latest): same request_id, different bytes (a fresh timestamp).
        rid = str(uuid.uuid4())
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(shim.endpoint)
        for i in range(3):
            dealer.send_multipart([b"", json.dumps({**GEN, "prompt": "with id",
                                                    "request_id": rid,
                                                    "timestamp": time.time() + i}).encode()])
        replies = []
        while len(replies) < 3:
            assert dealer.poll(10_000), f"only {len(replies)} of 3 answered"
            replies.append(dealer.recv_multipart()[-1])
        dealer.close(0)
        assert len(set(replies)) == 1  # one execution, the same reply to every copy
        executions = counts(slow.health_endpoint).get("generate:fast", 0)
        text = shim.metrics()
        joins_bytes = metric(text, 'shim_duplicate_joins_total{kind="bytes"}')
        joins_id = metric(text, 'shim_duplicate_joins_total{kind="request_id"}')
        print(f"\n[duplicates] backend executions {executions} for 2 requests; joins: "
              f"bytes {joins_bytes}, request_id {joins_id}")
        assert executions == 2
        assert joins_bytes >= 1 and joins_id == 2
    finally:
        ctx.destroy(0)
        shim.stop()
        slow.kill()


def test_deadlines_follow_the_caller(tmp_path: Path) -> None:
    """generate waits for a 6 s backend (the 30 s client would); a command is answered
    before VRAMOptimizer's 5 s with SHIM_TIMEOUT in the command shape."""
    slow = start_fake("mma", "mma", delay_ms=6000)
    shim = start_shim(shim_config({"mma": slow}, tmp_path), tmp_path)
    try:
        started = time.monotonic()
        reply = req(shim.endpoint, GEN, timeout=30.0)
        took = time.monotonic() - started
        assert reply["status"] == "ok" and "error_code" not in reply
        started = time.monotonic()
        cmd = req(shim.endpoint, {"command": "GET_LOADED_MODELS_STATUS"}, timeout=5.0)
        cmd_took = time.monotonic() - started
        print(f"\n[deadlines] generate from a 6 s backend after {took:.2f} s; command "
              f"answered {cmd['error_code']} after {cmd_took:.2f} s")
        assert cmd["status"] == "ERROR" and cmd["error_code"] == "SHIM_TIMEOUT"
    finally:
        shim.stop()
        slow.kill()


def test_merged_view_of_loaded_models_during_a_split(tmp_path: Path) -> None:
    mma, mms = start_backend("mma"), start_backend("mms")
    cfg = compat_config(mma, mms, tmp_path, (50, 50))
    cfg["backends"]["mms"]["device"] = "PC2"  # type: ignore[index]
    shim = start_shim(cfg, tmp_path)
    try:
        assert req(mma.endpoint, {"command": "LOAD_MODEL", "model_name": "tinyllama"})[
            "status"] == "SUCCESS"
        assert req(mms.endpoint, {"action": "load_model", "model_id": "phi-2"})["loaded"]
        wait_until(lambda: all(b["healthy"] for b in backends_of(shim).values()), 20,
                   "healthy")
        for _ in range(6):  # random buckets: every reply must show both
            for request in ({"command": "GET_LOADED_MODELS_STATUS"}, {"action": "status"}):
                reply = req(shim.endpoint, request)
                loaded = reply["loaded_models"]
                assert set(loaded) == {"tinyllama", "phi-2"}, reply
                assert loaded["phi-2"]["device"] == "PC2"
                assert loaded["tinyllama"]["device"] == mma_device(mma.endpoint)
                assert all(isinstance(m["last_used"], float) for m in loaded.values())
                assert reply["total_vram_used_mb"] == 1100 + 2250
        health = req(shim.endpoint, {"command": "HEALTH_CHECK"})
        assert health["status"] == "SUCCESS" and health["loaded_models"] == 2
    finally:
        shim.stop()
        mms.stop()
        mma.stop()


def mma_device(endpoint: str) -> str:
    status = req(endpoint, {"command": "GET_LOADED_MODELS_STATUS"})
    devices = {m["device"] for m in status["loaded_models"].values()}
    return devices.pop()


def test_error_replies_keep_the_callers_shape_during_shutdown(tmp_path: Path) -> None:
    """Requests still in flight when a graceful drain runs out (``shim.drain_timeout_s``)
    are answered SHIM_SHUTTING_DOWN in their caller's shape: command, model access,
    action. (Requests arriving on open connections during the drain are served normally,
    and new connections wait for the next shim: tests/reliability/test_restarts.py.)"""
    slow = start_fake("mma", "mma", delay_ms=8000)
    long = {"timeout_ms": 20000}
    cfg = shim_config({"mma": slow}, tmp_path, shim={"drain_timeout_s": 1.0},
                      actions={"health": long, "model_access": long, "status": long})
    shim = start_shim(cfg, tmp_path)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    shapes = {"command": {"command": "HEALTH_CHECK"},
              "access": {"model_id": "phi-2", "request_id": "r1", "context": {}},
              "action": {"action": "status"}}
    try:
        socks = {}
        for name, request in shapes.items():
            sock = ctx.socket(zmq.DEALER)
            sock.connect(shim.endpoint)
            sock.send_multipart([b"", json.dumps(request).encode()])
            socks[name] = sock
        wait_until(lambda: backends_of(shim)["mma"]["inflight"] == len(shapes), 10,
                   "the requests in flight")
        shim.proc.popen.send_signal(15)
        got: dict[str, dict[str, object]] = {}
        for name, sock in socks.items():
            assert sock.poll(15_000), f"{name}: no reply after the drain ran out"
            got[name] = json.loads(sock.recv_multipart()[-1])
            sock.close(0)
        assert {r.get("error_code") for r in got.values()} == {"SHIM_SHUTTING_DOWN"}, got
        assert got["command"]["status"] == "ERROR"
        assert got["access"]["status"] == "ERROR_LOADING_MODEL"
        assert got["access"]["request_id"] == "r1" and got["access"]["model_id"] == "phi-2"
        assert got["action"]["status"] == "error"
    finally:
        ctx.destroy(0)
        shim.stop()
        slow.kill()


def test_router_handover_answers_a_reconnected_routing_id(tmp_path: Path) -> None:
    slow = start_fake("mma", "mma", delay_ms=1000)
    shim = start_shim(shim_config({"mma": slow}, tmp_path), tmp_path)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        first = ctx.socket(zmq.REQ)
        first.setsockopt(zmq.ROUTING_ID, b"agent-7")
        first.setsockopt(zmq.LINGER, 0)
        first.connect(shim.endpoint)
        first.send(json.dumps({**GEN, "prompt": "first"}).encode())
        assert not first.poll(200)
        first.close(0)  # gave up while waiting
        second = ctx.socket(zmq.REQ)
        second.setsockopt(zmq.ROUTING_ID, b"agent-7")
        second.setsockopt(zmq.LINGER, 0)
        second.connect(shim.endpoint)
        second.send(json.dumps({**GEN, "prompt": "second"}).encode())
        assert second.poll(10_000), "the second socket with the same routing id was ignored"
        assert json.loads(second.recv())["status"] == "ok"
        second.close(0)
    finally:
        ctx.destroy(0)
        shim.stop()
        slow.kill()


def test_oversized_request_gets_a_clear_error_in_its_shape(tmp_path: Path) -> None:
    fake = start_fake("mma", "mma")
    shim = start_shim(shim_config({"mma": fake}, tmp_path,
                                  shim={"max_request_bytes": 2 << 20}), tmp_path)
    try:
        audio = [0.1] * 600_000  # ~3 MB
        reply = req(shim.endpoint, {"command": "TRANSCRIBE_AUDIO", "audio_data": audio},
                    timeout=10.0)
        assert reply["status"] == "ERROR" and reply["error_code"] == "SHIM_BAD_REQUEST"
        assert "max_request_bytes" in reply["message"]
        assert req(shim.endpoint, {"command": "TRANSCRIBE_AUDIO",
                                   "audio_data": audio[:100_000]})["status"] == "SUCCESS"
    finally:
        shim.stop()
        fake.kill()


def test_http_get_on_the_zeromq_port_leaves_the_shim_serving(tmp_path: Path) -> None:
    fake = start_fake("mma", "mma")
    shim = start_shim(shim_config({"mma": fake}, tmp_path), tmp_path)
    try:
        with socket.create_connection(("127.0.0.1", shim.port), timeout=5) as raw:
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            raw.settimeout(2)
            with contextlib.suppress(OSError):  # timeout or reset: ZMTP refused the peer
                raw.recv(1024)
        assert req(shim.endpoint, {"command": "HEALTH_CHECK"})["status"] == "SUCCESS"
        assert shim.proc.poll() is None
    finally:
        shim.stop()
        fake.kill()

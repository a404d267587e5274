"""The shim's data path with real processes: the shim and fake backends on loopback.

Fake backends (tests/fakes.py) put their own name in each reply, so a test can tell
which backend served a request after translation back into the MMA dialect.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
import zmq

from tests.procs import free_port, req
from tests.reliability.helpers import fake_counts, frontend_counts, served_by, wait_until
from tests.shimproc import ROOT, shim_config, start_fake, start_shim

GEN = {"action": "generate", "model_pref": "fast", "prompt": "hello", "params": {"max_tokens": 4}}
WAIT_S = 15.0  # bound of every wait on a condition (generous: a loaded machine)


def pipeline(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, requests: list[bytes],
             window: int = 200, timeout_s: float = 60.0) -> list[dict]:
    """Send every request over one DEALER with ``window`` in flight; replies in send order."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    replies: dict[int, dict] = {}
    sent = 0
    deadline = time.monotonic() + timeout_s
    try:
        while len(replies) < len(requests):
            while sent < len(requests) and sent - len(replies) < window:
                sock.send_multipart([b"", requests[sent]])
                sent += 1
            assert time.monotonic() < deadline, f"only {len(replies)}/{len(requests)} replies"
            if sock.poll(1000):
                frames = sock.recv_multipart()
                assert frames[0] == b"" and len(frames) == 2
                replies[len(replies)] = json.loads(frames[1])
    finally:
        sock.close(0)
    return [replies[i] for i in range(len(requests))]


def test_req_and_dealer_clients_get_their_envelope_back(fakes, tmp_path, ctx) -> None:
    shim = start_shim(shim_config(fakes, tmp_path), tmp_path)
    try:
        assert served_by(req(shim.endpoint, GEN)) == "mma"
        # A DEALER with an identity of its own and extra envelope frames of its own.
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, b"agent-7")
        sock.connect(shim.endpoint)
        for i in range(20):
            sock.send_multipart([f"tag{i}".encode(), b"", json.dumps(GEN).encode()])
        got = set()
        for _ in range(20):
            assert sock.poll(5000)
            tag, empty, body = sock.recv_multipart()
            assert empty == b""
            assert json.loads(body)["status"] == "ok"
            got.add(tag)
        assert got == {f"tag{i}".encode() for i in range(20)}
        sock.close(0)
    finally:
        shim.stop()


def test_weighted_split_70_30_over_10000_requests(fakes, tmp_path, ctx) -> None:
    cfg = shim_config(fakes, tmp_path, routing={"weights": {"mma": 70, "mms": 30}})
    shim = start_shim(cfg, tmp_path)
    try:
        # Distinct requests: identical bytes in flight would join into one execution.
        payloads = [json.dumps({**GEN, "seq": i}).encode() for i in range(10_000)]
        replies = pipeline(ctx, shim.endpoint, payloads)
        counts = Counter(served_by(r) for r in replies)
        print(f"\n[split 70/30] {dict(counts)}")
        assert counts["mma"] + counts["mms"] == 10_000, counts
        assert abs(counts["mma"] / 10_000 - 0.70) <= 0.02, counts
        # The MMS replies were translated back into the MMA shape.
        mms_reply = next(r for r in replies if served_by(r) == "mms")
        assert set(mms_reply) >= {"status", "response_text", "model_used", "timestamp"}
        assert mms_reply["status"] == "ok"
    finally:
        shim.stop()


def test_sticky_conversations_never_change_backend(fakes, tmp_path, ctx) -> None:
    cfg = shim_config(fakes, tmp_path, routing={"weights": {"mma": 50, "mms": 50}})
    shim = start_shim(cfg, tmp_path)
    try:
        requests = [json.dumps({**GEN, "conversation_id": f"conv-{i % 300}"}).encode()
                    for i in range(3000)]
        replies = pipeline(ctx, shim.endpoint, requests)
        seen: dict[str, set[str]] = {}
        for r in replies:
            seen.setdefault(r["conversation_id"], set()).add(served_by(r))
        assert len(seen) == 300
        assert all(len(backends) == 1 for backends in seen.values())
        spread = Counter(next(iter(b)) for b in seen.values())
        print(f"\n[sticky 50/50] 3,000 requests over 300 conversations: {dict(spread)}")
        assert spread["mma"] > 90 and spread["mms"] > 90  # both get conversations
    finally:
        shim.stop()


def test_backend_sigkill_under_load_every_client_gets_one_reply(tmp_path) -> None:
    slow = {"mma": start_fake("mma", "mma", delay_ms=300),
            "mms": start_fake("mms", "mms", delay_ms=300)}
    cfg = shim_config(slow, tmp_path, routing={"weights": {"mma": 50, "mms": 50}},
                      shim={"default_timeout_ms": 3000})
    shim = start_shim(cfg, tmp_path)
    results: list[dict | None] = [None] * 60
    extra: list[int] = []

    def client(i: int) -> None:
        c: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = c.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(shim.endpoint)
        sock.send_json({**GEN, "request_id": str(i)})
        if sock.poll(4500):
            results[i] = sock.recv_json()
            if sock.poll(500):  # a second reply would be a protocol violation
                extra.append(i)
        sock.close(0)

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(60)]
        for t in threads:
            t.start()
        # Requests are in flight in both backends (each has received some).
        wait_until(lambda: all(sum(fake_counts(f).values()) > 0 for f in slow.values()),
                   WAIT_S, "requests at both backends")
        slow["mms"].kill()
        for t in threads:
            t.join(10)
        assert all(r is not None for r in results), "a client got no reply"
        assert not extra
        outcomes = Counter(r["status"] if r["status"] == "ok" else r.get("error_code")
                           for r in results if r)
        print(f"\n[sigkill] 60 REQ clients, MMS killed mid-load: {dict(outcomes)}")
        assert set(outcomes) <= {"ok", "SHIM_BACKEND_LOST"}, outcomes
        # Once the shim has seen it dead, the dead backend is skipped: MMA serves all.
        wait_until(lambda: not shim.status()["backends"]["mms"]["healthy"], WAIT_S,
                   "mms marked unhealthy")
        for _ in range(10):
            assert served_by(req(shim.endpoint, GEN)) == "mma"
    finally:
        shim.stop()
        for f in slow.values():
            f.kill()


def test_backend_that_stops_answering_gets_shim_timeout_before_deadline(tmp_path) -> None:
    stalled = {"mma": start_fake("mma", "mma", mode="stall")}
    cfg = shim_config(stalled, tmp_path, actions={"generate": {"timeout_ms": 800}})
    shim = start_shim(cfg, tmp_path)
    try:
        started = time.monotonic()
        reply = req(shim.endpoint, GEN, timeout=5.0)
        elapsed = time.monotonic() - started
        print(f"\n[stall] SHIM_TIMEOUT after {elapsed * 1000:.0f} ms (deadline 800 ms)")
        assert reply["status"] == "error" and reply["error_code"] == "SHIM_TIMEOUT"
        # Not before the action's deadline (a lower bound cannot flake); "well before the
        # 29 s default" is the client's own 5 s bound above.
        assert elapsed >= 0.7
        cmd = req(shim.endpoint, {"command": "LOAD_MODEL", "model_name": "phi-2"}, timeout=6.0)
        assert cmd["status"] == "ERROR" and cmd["error_code"] == "SHIM_TIMEOUT"
        # model access waits up to 9.5 s (the speech agents wait 10 s: [deadlines])
        access = req(shim.endpoint, {"model_id": "phi-2", "request_id": "r9", "context": {}},
                     timeout=11.0)
        assert access["status"] == "ERROR_LOADING_MODEL"
        assert access["request_id"] == "r9" and access["error_code"] == "SHIM_TIMEOUT"
        assert "shim_timeouts_total" in shim.metrics()
    finally:
        shim.stop()
        stalled["mma"].kill()


@pytest.mark.parametrize(("payload", "message"), [
    (b"\x00\x01 not json", "not valid JSON"),
    (b"[1, 2, 3]", "JSON object"),
    (b'"just a string"', "JSON object"),
    (b"x" * (1024 * 1024 + 10), "exceeds"),
])
def test_bad_input_is_answered_and_shim_keeps_serving(fakes, tmp_path, payload, message) -> None:
    # opaque = "reject" (the default forwards such bytes: tests/compat)
    shim = start_shim(shim_config(fakes, tmp_path, shim={"opaque": "reject",
                                                         "max_request_bytes": 1 << 20}),
                      tmp_path)
    try:
        reply = req(shim.endpoint, payload)
        assert reply["status"] == "error"
        assert reply["error_code"] == "SHIM_BAD_REQUEST"
        assert message in reply["message"]
        assert served_by(req(shim.endpoint, GEN)) == "mma"
        assert "shim_bad_requests_total" in shim.metrics()
    finally:
        shim.stop()


def test_malformed_envelopes_are_answered(fakes, tmp_path, ctx) -> None:
    shim = start_shim(shim_config(fakes, tmp_path, shim={"opaque": "reject"}), tmp_path)
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.connect(shim.endpoint)
        sock.send_multipart([json.dumps(GEN).encode()])  # no empty delimiter
        assert sock.poll(5000)
        frames = sock.recv_multipart()
        assert json.loads(frames[-1])["error_code"] == "SHIM_BAD_REQUEST"
        sock.send_multipart([b"", b"{}", b"{}"])  # two payload frames
        assert sock.poll(5000)
        assert json.loads(sock.recv_multipart()[-1])["error_code"] == "SHIM_BAD_REQUEST"
        sock.send_multipart([b""])  # no payload at all
        assert sock.poll(5000)
        assert json.loads(sock.recv_multipart()[-1])["error_code"] == "SHIM_BAD_REQUEST"
        sock.close(0)
        assert served_by(req(shim.endpoint, GEN)) == "mma"
    finally:
        shim.stop()


def test_opaque_forward_passes_bytes_to_the_backend(fakes, tmp_path) -> None:
    shim = start_shim(shim_config(fakes, tmp_path, shim={"opaque": "forward"}), tmp_path)
    try:
        # The fake answers anything, so the backend's reply (not the shim's) comes back.
        assert served_by(req(shim.endpoint, b"not json at all")) == "mma"
    finally:
        shim.stop()


def test_health_reply_shape_and_unhealthy_backend(fakes, tmp_path) -> None:
    shim = start_shim(shim_config(fakes, tmp_path, routing={"weights": {"mma": 60, "mms": 40}}),
                      tmp_path)
    try:
        wait_until(lambda: all(b["healthy"] for b in shim.status()["backends"].values()),
                   WAIT_S, "both backends healthy")
        health = shim.health()
        assert health["status"] == "ok"
        # Anyone may ask the health socket: it tells the legacy fields only.
        assert set(health["details"]) == {"status_message", "uptime_seconds"}
        details = shim.status()["health"]["details"]  # the rest is for the admin
        assert set(details) >= {"status_message", "uptime_seconds", "backends"}
        assert details["backends"]["mma"] == {**details["backends"]["mma"], "healthy": True,
                                              "weight": 60.0, "inflight": 0}
        fakes["mma"].kill()
        fakes["mms"].kill()
        wait_until(lambda: shim.health()["status"] == "error", WAIT_S,
                   "the health reply turning to error", interval=0.1)
        reply = req(shim.endpoint, GEN)
        assert reply["error_code"] in {"SHIM_NO_BACKEND", "SHIM_TIMEOUT"}
    finally:
        shim.stop()


def test_shutdown_drains_requests_in_flight(tmp_path) -> None:
    slow = {"mma": start_fake("mma", "mma", delay_ms=800)}
    shim = start_shim(shim_config(slow, tmp_path), tmp_path)
    results: list[dict] = []
    c: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    socks = []
    try:
        for _ in range(5):
            sock = c.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(shim.endpoint)
            sock.send_json(GEN)
            socks.append(sock)
        # All five are in the shim (identical bytes may join into one backend execution,
        # shim.dedup) and the backend is working on them.
        wait_until(lambda: frontend_counts(shim)["requests"] == 5
                   and fake_counts(slow["mma"]).get("generate:fast", 0) > 0, WAIT_S,
                   "five requests in flight")
        shim.proc.popen.send_signal(signal.SIGTERM)
        for sock in socks:
            assert sock.poll(5000), "in-flight request lost on shutdown"
            results.append(sock.recv_json())
        assert [served_by(r) for r in results] == ["mma"] * 5
        assert shim.proc.popen.wait(10) == 0
    finally:
        for sock in socks:
            sock.close(0)
        c.term()
        shim.kill()
        slow["mma"].kill()


def test_listen_endpoint_in_use_stops_run_with_a_message(fakes, tmp_path) -> None:
    holder: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    old_mma = holder.socket(zmq.REP)
    port = free_port()
    old_mma.bind(f"tcp://127.0.0.1:{port}")
    try:
        cfg = shim_config(fakes, tmp_path, shim={"listen": f"tcp://127.0.0.1:{port}"})
        path = tmp_path / "inuse.json"
        path.write_text(json.dumps(cfg))
        out = subprocess.run([sys.executable, "-m", "shim.cli", "run", "--config", str(path)],
                             cwd=ROOT, capture_output=True, text=True, timeout=20)
        assert out.returncode != 0
        assert f"tcp://127.0.0.1:{port}" in out.stderr and "in use" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        old_mma.close(0)
        holder.term()


def test_metrics_count_requests_by_backend_action_outcome(fakes, tmp_path) -> None:
    shim = start_shim(shim_config(fakes, tmp_path), tmp_path)
    try:
        for _ in range(3):
            req(shim.endpoint, GEN)
        text = shim.metrics()
        line = next(row for row in text.splitlines()
                    if row.startswith("shim_requests_total{") and 'backend="mma"' in row
                    and 'action="generate"' in row and 'outcome="ok"' in row)
        assert float(line.rsplit(" ", 1)[1]) == 3.0
        assert 'shim_weight_percent{backend="mma"} 100.0' in text
    finally:
        shim.stop()



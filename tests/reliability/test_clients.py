"""Many clients at once, and clients that go away before their reply.

The shim's frontend is one ROUTER with ROUTER_MANDATORY: a reply to a client that has
gone cannot be delivered and must be counted as unroutable, never crash the shim or
disturb anyone else's reply.
"""

from __future__ import annotations

import json
import time

import pytest
import zmq

from tests.procs import req
from tests.reliability.helpers import (
    GEN,
    Ctx,
    Load,
    assert_clean_exit,
    assert_counters_add_up,
    assert_serving,
    decode_reply,
    fake_counts,
    metric,
    outcome_of,
    raise_fd_limit,
    served_by,
    settled_counts,
    start_ready,
    wait_until,
)
from tests.shimproc import shim_config, start_fake

CLIENTS = 1000


def test_1000_concurrent_req_clients(tmp_path, ctx: Ctx) -> None:
    """1,000 REQ sockets (one thread, one poller) each send a request at once: every one
    is answered exactly once, before the legacy clients' 5 s deadline."""
    # Per client: one TCP connection here, one in the shim, plus a mailbox fd per socket.
    # Raised before the processes start, so the shim and the fakes inherit it.
    limit = raise_fd_limit(4 * CLIENTS + 1024)
    assert limit >= 3 * CLIENTS + 256, f"RLIMIT_NOFILE {limit} is too low for {CLIENTS} clients"
    fakes = {"mma": start_fake("mma", "mma", delay_ms=100),
             "mms": start_fake("mms", "mms", delay_ms=100)}
    cfg = shim_config(fakes, tmp_path, routing={"weights": {"mma": 50, "mms": 50}})
    shim = start_ready(cfg, tmp_path)
    try:
        load = Load(ctx, shim.endpoint, clients=CLIENTS, kind="req", per_client=1,
                    max_requests=CLIENTS, deadline_s=5.0, grace_s=0.2, hard_limit_s=30.0)
        result = load.run()
        print(f"\n[{CLIENTS} REQ clients] all answered in {result.elapsed:.2f}s: "
              f"{result.summary()}")
        result.check()
        assert result.outcomes == {"ok": CLIENTS}, result.outcomes
        assert set(result.served()) == {"mma", "mms"}
        # REQ drops a second reply silently; the shim's own counters would show it.
        assert_counters_add_up(shim, result)
        assert shim.proc.poll() is None
        assert_serving(shim, tries=3)
        assert_clean_exit(shim)
    finally:
        shim.stop()
        for fake in fakes.values():
            fake.kill()


def _open(ctx: Ctx, kind: int, endpoint: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _send(sock: zmq.Socket[bytes], tag: bytes, payload: bytes) -> None:
    if sock.type == zmq.REQ:
        sock.send(payload)
    else:
        sock.send_multipart([tag, b"", payload])


@pytest.mark.parametrize("backend", ["slow", "stall"])
def test_client_disconnects_mid_request(backend, tmp_path, ctx: Ctx) -> None:
    """Half of 40 clients (REQ and DEALER) close their socket while the request is in
    flight, then retry on a new socket (model_client's Lazy Pirate). The reply to each
    vanished client is counted unroutable; everybody else, retries included, gets
    exactly one reply in time; the shim keeps serving.

    ``slow``: the backend's reply finds the client gone. ``stall``: the shim's own
    SHIM_TIMEOUT reply does.
    """
    if backend == "slow":
        fakes = {"mma": start_fake("mma", "mma", delay_ms=700)}
        cfg = shim_config(fakes, tmp_path, shim={"default_timeout_ms": 2000,
                                                 "opaque": "reject"})
        expect, deadline = "ok", 2.0 + 1.0
    else:
        fakes = {"mma": start_fake("mma", "mma", mode="stall")}
        cfg = shim_config(fakes, tmp_path, actions={"generate": {"timeout_ms": 700}},
                          shim={"opaque": "reject"})
        expect, deadline = "SHIM_TIMEOUT", 0.7 + 1.0
    shim = start_ready(cfg, tmp_path)
    # One request per client (identical bytes in flight would join); a retry re-sends
    # its client's bytes, as a Lazy Pirate client does, and joins the request in flight.
    payloads = {f"c{i}".encode(): json.dumps({**GEN, "client": i}).encode() for i in range(40)}
    socks: dict[bytes, zmq.Socket[bytes]] = {}
    try:
        for i in range(40):
            tag = f"c{i}".encode()
            socks[tag] = _open(ctx, zmq.REQ if i % 2 else zmq.DEALER, shim.endpoint)
            _send(socks[tag], tag, payloads[tag])
        sent = 40
        # Every request is in flight: the backend has it, the shim waits for its reply.
        wait_until(lambda: fake_counts(fakes["mma"]).get("generate:fast", 0) == 40, 5.0,
                   "all 40 requests at the backend")
        leavers = [f"c{i}".encode() for i in range(40) if i % 4 < 2]
        for tag in leavers:  # gone before the reply
            socks.pop(tag).close(0)
        abandoned = len(leavers)
        for tag in leavers:  # ... and retrying on a new socket
            retry = tag + b"-retry"
            socks[retry] = _open(ctx, zmq.DEALER if int(tag[1:]) % 2 == 0 else zmq.REQ,
                                 shim.endpoint)
            _send(socks[retry], retry, payloads[tag])
            sent += 1

        replies: dict[bytes, list[dict | None]] = {tag: [] for tag in socks}
        started = time.monotonic()
        end = started + deadline + 0.5  # the last retries went out a little later
        poller = zmq.Poller()
        by_sock = {}
        for tag, sock in socks.items():
            poller.register(sock, zmq.POLLIN)
            by_sock[sock] = tag
        while time.monotonic() < end:
            for sock, _ in poller.poll(20):
                tag = by_sock[sock]
                frames = sock.recv_multipart()
                if sock.type == zmq.DEALER:
                    assert frames[:2] == [tag, b""], frames
                replies[tag].append(decode_reply(frames[-1]))
                if sock.type == zmq.REQ:
                    poller.unregister(sock)  # nothing more can arrive on a REQ
        received = sum(len(r) for r in replies.values())
        print(f"\n[disconnect/{backend}] sent={sent} received={received} "
              f"abandoned={abandoned}")
        missing = [t for t, r in replies.items() if not r]
        doubles = [t for t, r in replies.items() if len(r) > 1]
        assert not missing, f"no reply before the deadline: {missing}"
        assert not doubles, f"more than one reply: {doubles}"
        outcomes = {outcome_of(r[0]) for r in replies.values()}
        assert outcomes == {expect}, outcomes
        # Client side: everything sent was answered, or its client left on purpose.
        assert sent == received + abandoned
        # Shim side: the same, and the vanished clients' replies counted as unroutable.
        counts = settled_counts(shim, requests=sent)
        assert counts == {"requests": sent, "replies": received, "unroutable": abandoned}, \
            counts
        assert metric(shim.metrics(), "shim_unroutable_replies_total") == abandoned
        assert shim.proc.poll() is None, shim.proc.log()
        if backend == "slow":
            assert served_by(req(shim.endpoint, GEN, timeout=5.0)) == "mma"
        else:
            reply = req(shim.endpoint, GEN, timeout=5.0)
            assert reply.get("error_code") == "SHIM_TIMEOUT", reply
        bad = req(shim.endpoint, b"not json", timeout=5.0)
        assert bad.get("error_code") == "SHIM_BAD_REQUEST", bad
        assert_counters_add_up(shim)
        assert_clean_exit(shim)
    finally:
        for sock in socks.values():
            sock.close(0)
        shim.stop()
        for fake in fakes.values():
            fake.kill()


def test_many_clients_vanish_under_load(tmp_path, ctx: Ctx) -> None:
    """Clients that send and leave at once, mixed with clients that wait, over a few
    seconds: the waiting ones are all answered, every vanished client's reply is counted
    unroutable, nothing crashes."""
    fakes = {"mma": start_fake("mma", "mma", delay_ms=200),
             "mms": start_fake("mms", "mms", delay_ms=200)}
    cfg = shim_config(fakes, tmp_path, routing={"weights": {"mma": 50, "mms": 50}},
                      shim={"default_timeout_ms": 1500})
    shim = start_ready(cfg, tmp_path)
    try:
        load = Load(ctx, shim.endpoint, clients=24, deadline_s=1.5 + 1.0, duration_s=2.5,
                    max_requests=3000).start()
        vanished = 0
        end = time.monotonic() + 2.0
        while time.monotonic() < end and vanished < 300:
            for kind in (zmq.REQ, zmq.DEALER):
                sock = _open(ctx, kind, shim.endpoint)
                _send(sock, b"gone", json.dumps({**GEN, "vanished": vanished,
                                                 "kind": kind}).encode())
                # Long enough for the request to leave (usually), far too short for the
                # 200 ms backend to answer.
                time.sleep(0.01)
                sock.close(0)
                vanished += 1
        result = load.join()
        result.check()
        assert result.outcomes == {"ok": result.sent}, result.outcomes
        counts = settled_counts(shim)
        # A request closed before it left the client never reached the shim; every one
        # that did was answered into the void: counted, not lost, not misdelivered.
        reached = counts["requests"] - result.sent
        print(f"\n[vanishing clients] vanished={vanished} reached the shim={reached}: "
              f"{result.summary()}")
        assert counts == {"requests": result.sent + reached, "replies": result.answered,
                          "unroutable": reached}, (counts, vanished, result.summary())
        assert vanished // 2 <= reached <= vanished, (reached, vanished)
        assert shim.proc.poll() is None
        assert_serving(shim, tries=3)
        assert_clean_exit(shim)
    finally:
        shim.stop()
        for fake in fakes.values():
            fake.kill()

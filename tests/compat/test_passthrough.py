"""Opaque traffic through the shim behaves as through libzmq's own ``zmq.proxy``.

Our own Lazy Pirate client (zguide pattern: bare-integer payloads, a bounded wait, then
close the socket, reconnect and re-send the same bytes, 3 tries) and a Hello/World pair
talk to our own REP server (tests/compat/pirate.py), once through ``zmq.proxy``
(ROUTER/DEALER, in a process of its own) and once through the shim with its defaults
(``opaque = "forward"``). The client sees the same replies, with the same frame counts,
both ways. Through the shim a re-send joins the request in flight, so the server does
the slow request once, where behind ``zmq.proxy`` it does every copy.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

from tests.procs import Proc, free_port
from tests.shimproc import ROOT, shim_config, start_shim

REQUEST_TIMEOUT_MS = 1000
RETRIES = 3
SLOW_EVERY, DELAY_MS = 4, 1600  # request 4 and 8 outlast the client's wait once


@dataclass
class Exchange:
    sequence: int
    reply: bytes
    sends: int


def lazy_pirate(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str,
                count: int) -> list[Exchange]:
    """The zguide's Lazy Pirate client, in our own words: send ``1..count`` as bare integer
    payloads; on silence close the socket, reconnect, re-send; give up after RETRIES."""
    out: list[Exchange] = []
    sock = _req(ctx, endpoint)
    try:
        for sequence in range(1, count + 1):
            request = str(sequence).encode()
            for send in range(1, RETRIES + 1):
                sock.send(request)
                if sock.poll(REQUEST_TIMEOUT_MS * (2 if send > 1 else 1)):
                    reply = sock.recv()
                    assert int(reply) == sequence, f"malformed reply {reply!r}"
                    out.append(Exchange(sequence, reply, send))
                    break
                sock.close(0)  # a REQ that missed its reply can never send again
                sock = _req(ctx, endpoint)
            else:
                raise AssertionError(f"server seems to be offline at request {sequence}")
    finally:
        sock.close(0)
    return out


def _req(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def exchange(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str,
             frames: list[bytes]) -> list[bytes]:
    sock = _req(ctx, endpoint)
    try:
        sock.send_multipart(frames)
        assert sock.poll(10_000), f"no reply to {frames!r}"
        return sock.recv_multipart()
    finally:
        sock.close(0)


@dataclass
class Route:
    name: str
    endpoint: str
    server_endpoint: str


@pytest.fixture(params=["zmq.proxy", "shim"])
def route(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Route]:
    server_endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = Proc([sys.executable, "-m", "tests.compat.pirate", "--bind", server_endpoint,
                   "--slow-every", str(SLOW_EVERY), "--delay-ms", str(DELAY_MS)], cwd=ROOT)
    try:
        if request.param == "zmq.proxy":
            front = f"tcp://127.0.0.1:{free_port()}"
            code = ("import sys, zmq; c = zmq.Context(); f = c.socket(zmq.ROUTER); "
                    "f.bind(sys.argv[1]); b = c.socket(zmq.DEALER); b.connect(sys.argv[2]); "
                    "zmq.proxy(f, b)")
            proxy = Proc([sys.executable, "-c", code, front, server_endpoint], cwd=ROOT)
            try:
                yield Route("zmq.proxy", front, server_endpoint)
            finally:
                proxy.kill()
        else:
            cfg = shim_config({"legacy": {"dialect": "mma", "endpoints": [server_endpoint]}},
                              tmp_path)
            shim = start_shim(cfg, tmp_path)
            try:
                yield Route("shim", shim.endpoint, server_endpoint)
            finally:
                shim.stop()
    finally:
        server.kill()


def test_lazy_pirate_client_through_the_route(route: Route,
                                              ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    exchanges = lazy_pirate(ctx, route.endpoint, 10)
    served = int(exchange(ctx, route.server_endpoint, [b"count"])[0])
    resent = [e.sequence for e in exchanges if e.sends > 1]
    print(f"\n[lazy pirate via {route.name}] 10 requests, re-sent: {resent}, "
          f"server executions: {served}")
    assert [e.reply for e in exchanges] == [str(i).encode() for i in range(1, 11)]
    assert resent == [4, 8]  # the slow ones, both ways
    if route.name == "shim":
        assert served == 10  # each re-send joined the request in flight
    else:
        assert served > 10  # zmq.proxy hands the server every copy (each one slow again)


def test_hello_world_and_multi_frame_pass_unchanged(route: Route,
                                                    ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    assert exchange(ctx, route.endpoint, [b"Hello"]) == [b"World"]
    assert exchange(ctx, route.endpoint, [b"a", b"", b"\x00\xff"]) == \
        [b"a", b"", b"\x00\xff", b"end"]
    assert exchange(ctx, route.endpoint, [b'["not", "an", "object"]']) == \
        [b'["not", "an", "object"]', b"end"]

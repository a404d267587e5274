"""Benchmark backends and the ``zmq.proxy`` reference, each meant to run as its own process.

``python -m bench.echo --serve KIND:PORT [--serve ...]`` binds every socket on 127.0.0.1,
prints ``READY`` and serves until SIGTERM. Kinds:

``echo-router``, ``echo-rep``
    A ROUTER (or REP) socket used as both ends of ``zmq.proxy``: libzmq reads each message
    and writes it straight back, envelope included, in C with the GIL released. This is
    the fast echo: it cannot be the bottleneck of a Python proxy.
``mma``, ``mms``
    A ROUTER in a Python loop that drains in batches and answers every request with one
    fixed, valid reply of that dialect (MMA generate, MMS generate_text), whatever the
    request: what the shim's translation and shadow comparison need to see.
``stall``
    A ROUTER that reads every request and never answers (a hung backend).
``proxy:FRONT:BACKEND``
    libzmq's own proxy, the reference: ROUTER bound on FRONT, DEALER connected to the
    BACKEND endpoint, ``zmq.proxy(frontend, backend)``.

The Python kinds answer a single-frame ``__bench_count__`` message (from a DEALER) with
how many requests they have received, so the benchmark can tell whether mirrored
traffic really arrived.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

COUNT_REQUEST = b"__bench_count__"

MMA_REPLY = (b'{"status":"ok","response_text":"echo","model_used":"phi-2",'
             b'"timestamp":1764400000.0}')
MMS_REPLY = b'{"status":"success","text":"echo","model_id":"phi-2","tokens_generated":1}'

HWM = 100_000


def _socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int) -> zmq.Socket[bytes]:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    return sock


def c_echo(sock: zmq.Socket[bytes]) -> None:
    """zmq_proxy with one socket as both ends: libzmq echoes every message as received."""
    with contextlib.suppress(zmq.ContextTerminated):
        zmq.proxy(sock, sock)


def canned(sock: zmq.Socket[bytes], reply: bytes | None, batch: int = 512) -> None:
    """Answer every request with ``reply`` (None: never answer), draining in batches."""
    count = 0
    recv, send = sock.recv_multipart, sock.send_multipart
    while True:
        if not sock.poll(1000):
            continue
        for _ in range(batch):
            try:
                frames = recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            if frames[-1] == COUNT_REQUEST and len(frames) == 2:
                send([frames[0], str(count).encode()])
                continue
            count += 1
            if reply is not None:
                frames[-1] = reply
                send(frames)


def serve(specs: list[str]) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    threads = []
    target: Callable[..., Any]
    args: tuple[Any, ...]
    for spec in specs:
        kind, _, rest = spec.partition(":")
        if kind == "proxy":
            port, _, backend = rest.partition(":")
            front, back = _socket(ctx, zmq.ROUTER), _socket(ctx, zmq.DEALER)
            front.bind(f"tcp://127.0.0.1:{port}")
            back.connect(backend)
            target, args = zmq.proxy, (front, back)
        elif kind in ("echo-router", "echo-rep"):
            sock = _socket(ctx, zmq.ROUTER if kind == "echo-router" else zmq.REP)
            sock.bind(f"tcp://127.0.0.1:{rest}")
            target, args = c_echo, (sock,)
        elif kind in ("mma", "mms", "stall"):
            sock = _socket(ctx, zmq.ROUTER)
            sock.bind(f"tcp://127.0.0.1:{rest}")
            reply = {"mma": MMA_REPLY, "mms": MMS_REPLY, "stall": None}[kind]
            target, args = canned, (sock, reply)
        else:
            raise SystemExit(f"bench.echo: unknown kind {kind!r}")
        threads.append(threading.Thread(target=target, args=args, daemon=True, name=spec))
    for t in threads:
        t.start()
    print("READY", flush=True)
    while True:  # daemon threads serve; SIGTERM ends the process
        time.sleep(3600)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench.echo", description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="append", required=True, metavar="KIND:PORT")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    sys.setswitchinterval(0.001)  # several Python serving threads: keep hand-offs short
    serve(args.serve)


if __name__ == "__main__":
    main()

"""A generic ZeroMQ REP server for the pass-through tests (our own, zguide-style).

``python -m tests.compat.pirate --bind tcp://127.0.0.1:PORT [--slow-every N --delay-ms D]``

- ``Hello`` -> ``World`` (the zguide's first pair);
- a bare integer (the Lazy Pirate client's payload) is echoed, after ``delay_ms`` when
  it is a multiple of ``slow_every`` (so the client times out and re-sends);
- ``count`` -> how many requests were served, as ASCII digits (``count`` not counted);
- anything else (several frames included) comes back with an extra frame ``end``.
"""

from __future__ import annotations

import argparse
import time

import zmq


def serve(bind: str, slow_every: int, delay_ms: int) -> None:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(bind)
    served = 0
    while True:
        frames = sock.recv_multipart()
        if frames == [b"count"]:
            sock.send(str(served).encode())
            continue
        served += 1
        if frames == [b"Hello"]:
            sock.send(b"World")
        elif len(frames) == 1 and frames[0].isdigit():
            if slow_every and int(frames[0]) % slow_every == 0:
                time.sleep(delay_ms / 1000)  # an overloaded server, as in the zguide
            sock.send(frames[0])
        else:
            sock.send_multipart([*frames, b"end"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bind", required=True)
    parser.add_argument("--slow-every", type=int, default=0)
    parser.add_argument("--delay-ms", type=int, default=0)
    args = parser.parse_args()
    serve(args.bind, args.slow_every, args.delay_ms)


if __name__ == "__main__":
    main()

"""``python -m bench --soak``: the shim's memory over a long, hostile mix (issue 12).

One shim (split 90/10 over the canned MMA and MMS echoes, so 10 % is translated) gets
``--soak-requests`` requests (default 1,000,000) from a pipelined driver that cycles
through every request kind: generate (both dialects), load/unload with a distinct model
name each time, loaded-models status, health check, model access, clear conversation
with a distinct conversation id, opaque bytes, non-JSON, a JSON array. Along the way,
every ``--soak-every`` requests: a client that sends and vanishes without reading, a slow
reader (a DEALER that reads a few replies then stops, then closes), a request over the
soft size limit (SHIM_BAD_REQUEST) and a frame over the hard cap (libzmq drops that
connection). RSS (``/proc/PID/status``) is sampled every second: the baseline after a
warm-up, the peak, and the figure after the load, once the shim has idled a few seconds.
Targets: growth < 10 MB, peak < 2x baseline.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import zmq

from bench.procs import ProcGroup, free_port, rss_kb
from bench.shimcfg import shim_config, start_shim

MB = 1 << 20
SOFT_LIMIT = 1 * MB
HARD_CAP = 4 * MB


def _kinds() -> Iterator[bytes]:
    """Every request kind, cycled; model names and conversation ids never repeat."""
    n = itertools.count()
    while True:
        i = next(n)
        yield msgspec.json.encode({"action": "generate", "model_pref": "fast",
                                   "prompt": f"p{i}", "conversation_id": f"conv-{i}",
                                   "params": {"max_tokens": 4}})
        yield msgspec.json.encode({"action": "generate_text", "model_id": "phi-2",
                                   "prompt": "hello"})
        yield msgspec.json.encode({"command": "LOAD_MODEL",
                                   "model_name": f"soak-model-{i}-" + "m" * 64,
                                   "device": "MainPC"})
        yield msgspec.json.encode({"command": "UNLOAD_MODEL",
                                   "model_name": f"soak-model-{i}-" + "m" * 64})
        yield b'{"command": "GET_LOADED_MODELS_STATUS"}'
        yield b'{"command": "HEALTH_CHECK"}'
        yield msgspec.json.encode({"model_id": "whisper-small", "request_id": f"r{i}",
                                   "context": {"quantization_level": "int8"}})
        yield msgspec.json.encode({"action": "clear_conversation",
                                   "conversation_id": f"gone-{i}"})
        yield b"\x00\x01 opaque bytes"
        yield b"not json at all"
        yield b"[1, 2, 3]"


def _dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, **opts: int) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    for name, value in opts.items():
        sock.setsockopt(getattr(zmq, name), value)
    sock.connect(endpoint)
    return sock


def _hostile(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, payload: bytes,
             slow: list[zmq.Socket[bytes]]) -> None:
    """One round of the hostile clients (see the module docstring)."""
    gone = _dealer(ctx, endpoint)
    for _ in range(20):
        gone.send_multipart([b"", payload])
    gone.close(0)  # vanished with 20 replies on their way
    reader = _dealer(ctx, endpoint, RCVHWM=1, RCVBUF=4096)
    for _ in range(100):
        reader.send_multipart([b"", payload])
    slow.append(reader)
    if len(slow) > 4:  # a slow reader reads a little, then is gone
        old = slow.pop(0)
        for _ in range(5):
            if old.poll(10):
                old.recv_multipart()
        old.close(0)
    big = _dealer(ctx, endpoint)
    big.send_multipart([b"", b"{" + b" " * (2 * SOFT_LIMIT) + b"}"])  # soft limit
    big.send_multipart([b"", b"x" * (2 * HARD_CAP)])  # hard cap: dropped connection
    big.close(0)


def run_soak(group: ProcGroup, work: Path, *, requests: int, every: int,
             log: Callable[[str], None], sockets: int = 8, window: int = 64) -> dict[str, Any]:
    """Run the soak; returns the figures (MB) and the verdicts."""
    p = {k: free_port() for k in ("mma", "mms")}
    echo = group.python("soak-echo", "bench.echo", "--serve", f"mma:{p['mma']}",
                        "--serve", f"mms:{p['mms']}", ready_line=True)
    echo.wait_ready()
    cfg = shim_config(work, "soak", {"mma": ("mma", f"tcp://127.0.0.1:{p['mma']}"),
                                     "mms": ("mms", f"tcp://127.0.0.1:{p['mms']}")},
                      {"mma": 90, "mms": 10},
                      extra={"shim": {"max_request_bytes": SOFT_LIMIT,
                                      "max_frame_bytes": HARD_CAP, "opaque": "forward",
                                      "backlog_ttl_s": 2.0, "gc_interval_s": 5.0}})
    shim = start_shim(group, work, "soak", cfg)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    socks = [_dealer(ctx, shim.endpoint, SNDHWM=window * 2, RCVHWM=window * 2)
             for _ in range(sockets)]
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    kinds = _kinds()
    slow: list[zmq.Socket[bytes]] = []
    _wait_serving(ctx, shim.endpoint)
    sent = received = 0
    outstanding = dict.fromkeys(socks, 0)
    samples: list[tuple[int, float]] = []
    warmup = min(20_000, requests // 10)
    baseline = peak = 0.0
    started = last_sample = time.monotonic()
    deadline = started + 3600
    while received < requests and time.monotonic() < deadline:
        for sock in socks:
            while outstanding[sock] < window and sent < requests:
                sock.send_multipart([b"", next(kinds)])
                outstanding[sock] += 1
                sent += 1
                if sent % every == 0:
                    _hostile(ctx, shim.endpoint, next(kinds), slow)
        for sock, _ in poller.poll(1000):
            while sock.poll(0):
                sock.recv_multipart()
                outstanding[sock] -= 1
                received += 1
        now = time.monotonic()
        if now - last_sample >= 1.0:
            last_sample = now
            mb = rss_kb(shim.pid) / 1024
            samples.append((received, mb))
            if received >= warmup and not baseline:
                baseline = mb
            peak = max(peak, mb)
            if len(samples) % 30 == 0:
                log(f"soak: {received:,}/{requests:,} replies, RSS {mb:.1f} MB "
                    f"(baseline {baseline:.1f}, peak {peak:.1f}), "
                    f"{received / (now - started):,.0f}/s")
    elapsed = time.monotonic() - started
    for sock in [*socks, *slow]:
        sock.close(0)
    time.sleep(8.0)  # idle: backlog TTL, the shim's periodic collection
    after = rss_kb(shim.pid) / 1024
    metrics = shim.metrics_text()
    ctx.term()
    growth = after - baseline
    return {
        "requests": requests, "replies": received, "elapsed_s": round(elapsed, 1),
        "rss_baseline_mb": round(baseline, 1), "rss_peak_mb": round(peak, 1),
        "rss_after_mb": round(after, 1), "growth_mb": round(growth, 1),
        "growth_ok": growth < 10, "peak_ok": peak < 2 * baseline,
        "dropped": [line for line in metrics.splitlines()
                    if line.startswith("shim_dropped_replies_total")],
    }


def _wait_serving(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
    sock = _dealer(ctx, endpoint)
    try:
        for _ in range(60):
            sock.send_multipart([b"", b'{"command": "HEALTH_CHECK"}'])
            if sock.poll(1000):
                sock.recv_multipart()
                return
        raise RuntimeError("the soak shim does not answer")
    finally:
        sock.close(0)

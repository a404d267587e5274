"""The load generator: pipelined DEALER clients and a lockstep REQ client.

Both loops stop by themselves: after ``max_requests`` or ``duration_s``, whichever comes
first, then wait at most ``drain_s`` for replies still in flight (counted as lost when
they do not come).

DEALER clients send ``[tag, b"", payload]``. The tag is an 8-byte sequence number in the
envelope, which every hop under test hands back unchanged (a REP or ROUTER echo, libzmq's
proxy, the shim's ROUTER frontend): each reply finds its send time whichever order
replies come back in, even when the shim translated the payload.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from bench.procs import cpu_seconds, rss_kb

HWM = 100_000
#: Replies that count as errors: the shim's own error replies and backend failures.
ERROR_MARKS = (b"SHIM_", b'"status":"error"', b'"status": "error"')


def generate_request(size: int = 200, *, dialect: str = "mma", max_tokens: int = 16) -> bytes:
    """A generate request of exactly ``size`` bytes (the prompt is padded to fit)."""
    if dialect == "mma":
        msg: dict[str, Any] = {"action": "generate", "model_pref": "fast", "prompt": "",
                               "params": {"max_tokens": max_tokens, "temperature": 0.7}}
    else:
        msg = {"action": "generate_text", "model_id": "phi-2", "prompt": "",
               "max_tokens": max_tokens, "temperature": 0.7}
    base = len(msgspec.json.encode(msg))
    words = "the quick brown fox jumps over the lazy dog "
    pad = max(1, size - base)
    msg["prompt"] = (words * (pad // len(words) + 1))[:pad].rstrip() or "hi"
    out = msgspec.json.encode(msg)
    return out + b" " * (size - len(out)) if len(out) < size else out


#: Distinct payloads a pipelined client cycles through: far more than it keeps in flight,
#: so the shim's duplicate joins (shim.dedup: same bytes while in flight) never merge two
#: measured requests into one backend call.
RING = 1024


def payload_ring(payload: bytes, n: int = RING) -> list[bytes]:
    """``n`` variants of ``payload`` of the same size: the first characters of its
    ``"prompt"`` value become a hex counter (a payload without a prompt is repeated)."""
    mark = b'"prompt":"'
    at = payload.find(mark)
    if at < 0 or len(payload) < at + len(mark) + 4:
        return [payload] * n
    at += len(mark)
    return [payload[:at] + b"%04x" % i + payload[at + 4:] for i in range(n)]


def percentile(sorted_values: list[int] | list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (0 when empty)."""
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return float(sorted_values[i])


@dataclass
class LoadResult:
    """One load phase against one endpoint."""

    sent: int = 0
    completed: int = 0
    errors: int = 0
    lost: int = 0
    elapsed_s: float = 0.0
    cpu_s: float | None = None  # of the watched process, over the measured window
    rss_kb: int | None = None  # of the watched process, at the end
    latencies_ns: array[int] = field(default_factory=lambda: array("q"), repr=False)
    sample_error: bytes = b""

    @property
    def rate(self) -> float:
        return self.completed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ns)
        out: dict[str, Any] = {
            "sent": self.sent, "completed": self.completed, "errors": self.errors,
            "lost": self.lost, "elapsed_s": round(self.elapsed_s, 4),
            "rate": round(self.rate, 1),
            "p50_us": percentile(lat, 50) / 1000, "p90_us": percentile(lat, 90) / 1000,
            "p99_us": percentile(lat, 99) / 1000, "max_us": (lat[-1] / 1000) if lat else 0.0,
        }
        if self.cpu_s is not None:
            out["cpu_s"] = round(self.cpu_s, 3)
            out["cpu_us_per_req"] = (self.cpu_s / self.completed * 1e6) if self.completed else None
        if self.rss_kb is not None:
            out["rss_kb"] = self.rss_kb
        if self.sample_error:
            out["sample_error"] = self.sample_error[:300].decode(errors="replace")
        return out


def _dealer(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.connect(endpoint)
    return sock


def pipelined(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, payload: bytes, *,
              sockets: int = 4, window: int = 16, max_requests: int = 1_000_000,
              duration_s: float = 2.0, drain_s: float = 3.0, warmup: int = 200,
              watch_pid: int | None = None,
              error_marks: tuple[bytes, ...] = ERROR_MARKS) -> LoadResult:
    """``sockets`` DEALERs in one zmq.Poller loop, each keeping ``window`` requests in flight.

    ``warmup`` requests per socket go first (connections made, caches warm) and are not
    measured. With ``watch_pid`` the CPU time that process used during the measured
    window, and its RSS at the end, are recorded.
    """
    socks = [_dealer(ctx, endpoint) for _ in range(sockets)]
    try:
        if warmup:
            _warm(socks, payload, warmup, window, timeout_s=10.0)
        return _pipelined(socks, payload, window, max_requests, duration_s, drain_s,
                          watch_pid, error_marks)
    finally:
        for s in socks:
            s.close(0)


def _warm(socks: list[zmq.Socket[bytes]], payload: bytes, per_socket: int, window: int,
          timeout_s: float) -> None:
    """Push ``per_socket`` requests through each socket, ``window`` at a time, bounded."""
    deadline = time.monotonic() + timeout_s
    ring = payload_ring(payload)
    for s in socks:
        left, inflight = per_socket, 0
        while (left or inflight) and time.monotonic() < deadline:
            while left and inflight < window:
                s.send_multipart((b"warmup", b"", ring[left % RING]))
                left -= 1
                inflight += 1
            if s.poll(100):
                while True:
                    try:
                        s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    inflight -= 1
    for s in socks:  # late warm-up replies must not be taken for measured ones
        while s.poll(0):
            s.recv_multipart()


def _pipelined(socks: list[zmq.Socket[bytes]], payload: bytes, window: int,
               max_requests: int, duration_s: float, drain_s: float, watch_pid: int | None,
               error_marks: tuple[bytes, ...]) -> LoadResult:
    res = LoadResult()
    ring = payload_ring(payload)
    mask = RING - 1
    poller = zmq.Poller()
    for s in socks:
        poller.register(s, zmq.POLLIN)
    pending: dict[bytes, int] = {}
    lat = res.latencies_ns
    clock = time.perf_counter_ns
    seq = errors = 0
    cpu0 = cpu_seconds(watch_pid) if watch_pid else 0.0
    t0 = clock()
    stop_sending = t0 + int(duration_s * 1e9)
    hard_stop = stop_sending + int(drain_s * 1e9)
    for s in socks:
        for _ in range(window):
            if seq >= max_requests:
                break
            tag = seq.to_bytes(8, "little")
            seq += 1
            pending[tag] = clock()
            s.send_multipart((tag, b"", ring[seq & mask]))
    sending = True
    end = t0
    while pending:
        if clock() >= hard_stop:
            break
        for s, _ in poller.poll(100):
            recv, send = s.recv_multipart, s.send_multipart
            while True:
                try:
                    frames = recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                t = clock()
                sent_at = pending.pop(frames[0], None)
                if sent_at is None:
                    continue
                end = t
                lat.append(t - sent_at)
                body = frames[-1]
                for mark in error_marks:
                    if mark in body:
                        errors += 1
                        if not res.sample_error:
                            res.sample_error = body
                        break
                if sending:
                    if seq < max_requests and t < stop_sending:
                        tag = seq.to_bytes(8, "little")
                        seq += 1
                        pending[tag] = clock()
                        send((tag, b"", ring[seq & mask]))
                    else:
                        sending = False
    if watch_pid:
        res.cpu_s = cpu_seconds(watch_pid) - cpu0
        res.rss_kb = rss_kb(watch_pid)
    res.sent = seq
    res.completed = len(lat)
    res.lost = len(pending)
    res.errors = errors
    res.elapsed_s = (end - t0) / 1e9
    return res


def lockstep(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, payload: bytes, *,
             max_requests: int = 100_000, duration_s: float = 1.0, timeout_s: float = 2.0,
             warmup: int = 50, error_marks: tuple[bytes, ...] = ERROR_MARKS) -> LoadResult:
    """One REQ client: send, wait for the reply, send the next. A reply that does not come
    within ``timeout_s`` is counted lost and the socket replaced (Lazy Pirate)."""
    res = LoadResult()

    def make() -> zmq.Socket[bytes]:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        sock.connect(endpoint)
        return sock

    sock = make()
    try:
        for _ in range(warmup):
            sock.send(payload)
            try:
                sock.recv()
            except zmq.Again:
                sock.close(0)
                sock = make()
                break
        clock = time.perf_counter_ns
        lat = res.latencies_ns
        t0 = clock()
        stop = t0 + int(duration_s * 1e9)
        end = t0
        for _ in range(max_requests):
            t = clock()
            if t >= stop:
                break
            res.sent += 1
            sock.send(payload)
            try:
                body = sock.recv()
            except zmq.Again:
                res.lost += 1
                sock.close(0)
                sock = make()
                continue
            end = clock()
            lat.append(end - t)
            for mark in error_marks:
                if mark in body:
                    res.errors += 1
                    if not res.sample_error:
                        res.sample_error = body
                    break
        res.completed = len(lat)
        res.elapsed_s = (end - t0) / 1e9
        return res
    finally:
        sock.close(0)


def lockstep_interleaved(ctx: zmq.Context[zmq.Socket[bytes]], endpoints: dict[str, str],
                         payload: bytes, *, duration_s: float = 3.0, max_cycles: int = 100_000,
                         timeout_s: float = 2.0, warmup: int = 20,
                         error_marks: tuple[bytes, ...] = ERROR_MARKS) -> dict[str, LoadResult]:
    """One lockstep REQ client per endpoint, taking turns request by request.

    Each endpoint still sees one client in strict send/recv lockstep, but all of them are
    sampled in the same instants, so a burst of noise from the rest of the machine lands
    on every endpoint alike: their latency percentiles can be compared pairwise. The order
    within each cycle is shuffled: work a process does after it replied (a shadow
    comparison, say) competes with whichever endpoint comes next, and shuffling spreads
    that over all of them instead of always charging the same neighbour.
    """
    import random

    shuffle = random.Random(1).shuffle
    keys = list(endpoints)
    res = {k: LoadResult() for k in keys}

    def make(endpoint: str) -> zmq.Socket[bytes]:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
        sock.connect(endpoint)
        return sock

    socks = {k: make(endpoints[k]) for k in keys}
    clock = time.perf_counter_ns
    try:
        for _ in range(warmup):
            for k in keys:
                socks[k].send(payload)
                try:
                    socks[k].recv()
                except zmq.Again:
                    socks[k].close(0)
                    socks[k] = make(endpoints[k])
        t0 = clock()
        stop = t0 + int(duration_s * 1e9)
        for _ in range(max_cycles):
            if clock() >= stop:
                break
            shuffle(keys)
            for k in keys:
                r, sock = res[k], socks[k]
                r.sent += 1
                t = clock()
                sock.send(payload)
                try:
                    body = sock.recv()
                except zmq.Again:
                    r.lost += 1
                    sock.close(0)
                    socks[k] = make(endpoints[k])
                    continue
                t1 = clock()
                r.latencies_ns.append(t1 - t)
                r.elapsed_s += (t1 - t) / 1e9  # busy time: rate = 1 / mean latency
                for mark in error_marks:
                    if mark in body:
                        r.errors += 1
                        if not r.sample_error:
                            r.sample_error = body
                        break
        for r in res.values():
            r.completed = len(r.latencies_ns)
        return res
    finally:
        for sock in socks.values():
            sock.close(0)


def count_received(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str,
                   timeout_s: float = 2.0) -> int | None:
    """How many requests a bench.echo Python backend has received (None: no answer)."""
    from bench.echo import COUNT_REQUEST

    sock = _dealer(ctx, endpoint)
    try:
        sock.send(COUNT_REQUEST)
        if not sock.poll(int(timeout_s * 1000)):
            return None
        return int(sock.recv())
    finally:
        sock.close(0)


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.loadgen --endpoint E``: pipelined load from a process of its own."""
    import argparse

    p = argparse.ArgumentParser(prog="bench.loadgen", description=main.__doc__)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--sockets", type=int, default=4)
    p.add_argument("--window", type=int, default=16)
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--delay", type=float, default=0.0, help="wait this long before starting")
    p.add_argument("--dialect", choices=["mma", "mms"], default="mma")
    args = p.parse_args(argv)
    time.sleep(args.delay)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    res = pipelined(ctx, args.endpoint, generate_request(200, dialect=args.dialect),
                    sockets=args.sockets, window=args.window, duration_s=args.seconds,
                    max_requests=args.max_requests)
    print(msgspec.json.encode(res.summary()).decode(), flush=True)
    ctx.destroy(linger=0)


if __name__ == "__main__":
    main()

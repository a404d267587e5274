"""Bounded memory (issue 12): clients that never read, huge frames, big garbage replies
from a backend, a stream of distinct model names. Each case measures the shim's RSS
(``/proc/PID/status``: VmRSS now, VmHWM the peak) before, at the peak and after, and
bounds the growth; the figures are printed (``pytest -s``) for the issue's closing note.
"""

from __future__ import annotations

import contextlib
import json
import statistics
from pathlib import Path

import zmq

from tests.reliability.helpers import (
    GEN_BYTES,
    assert_clean_exit,
    assert_serving,
    metric,
    settled_counts,
    start_ready,
    wait_until,
)
from tests.shimproc import ShimProc, dealer, shim_config, start_fake

MB = 1 << 20


def rss(shim: ShimProc) -> tuple[float, float]:
    """(VmRSS, VmHWM) of the shim process, in MB."""
    fields = {}
    for line in Path(f"/proc/{shim.proc.pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def settle_rss(shim: ShimProc, below: float, timeout: float = 20.0) -> float:
    """Wait (bounded) until RSS is under ``below`` MB; returns the last reading, also
    when it never got there (the caller's assertion then shows the figures)."""
    readings: list[float] = []

    def under() -> bool:
        readings.append(rss(shim)[0])
        return readings[-1] < below

    with contextlib.suppress(AssertionError):
        wait_until(under, timeout, f"RSS under {below:.0f} MB", interval=0.2)
    return readings[-1]


def steady_rss(shim: ShimProc, readings: int = 15, spread_mb: float = 2.0,
               timeout: float = 40.0) -> float:
    """RSS once it has stopped moving: ``readings`` readings 0.2 s apart (three of the
    shim's 1 s gc intervals) within ``spread_mb`` of each other; the last of them, or
    the median of the last ``readings`` when it keeps moving until ``timeout``."""
    seen: list[float] = []

    def steady() -> bool:
        seen.append(rss(shim)[0])
        last = seen[-readings:]
        return len(last) == readings and max(last) - min(last) < spread_mb

    try:
        wait_until(steady, timeout, lambda: f"a steady RSS (last {seen[-readings:]})",
                   interval=0.2)
    except AssertionError:  # still moving by a few MB (the allocator): its median then
        return statistics.median(seen[-readings:])
    return seen[-1]


def test_clients_that_never_read_cost_bounded_memory(tmp_path: Path,
                                                     ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    # ~0.5 MB replies, as in the issue: 800 of them unread once cost the shim +400 MB.
    fake = start_fake("mma", "mma", pad_bytes=512 * 1024)
    shim = start_ready(shim_config({"mma": fake}, tmp_path,
                                   shim={"backlog_ttl_s": 1.0, "gc_interval_s": 1.0}),
                       tmp_path)
    try:
        assert_serving(shim, tries=3)
        before, _ = rss(shim)
        socks = []
        for _ in range(4):  # as little queued on the client's side as it can ask for
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 1)
            sock.setsockopt(zmq.RCVBUF, 4096)
            sock.connect(shim.endpoint)
            socks.append(sock)
        for sock in socks:  # send, never read
            for _ in range(200):
                sock.send_multipart([b"", GEN_BYTES])
        wait_until(lambda: metric(shim.metrics(), "shim_frontend_total", kind="requests")
                   >= 800 + 3, 60.0, "every request read")
        wait_until(lambda: metric(shim.metrics(), "shim_dropped_replies_total",
                                  reason="slow_reader") > 0, 60.0, "replies dropped")
        _, peak = rss(shim)
        for sock in socks:
            sock.close(0)
        # Every request answered or dropped once the backend has worked through them.
        counts = settled_counts(shim, requests=800 + 3, timeout=60.0)
        assert counts["requests"] == counts["replies"] + counts["unroutable"], counts
        after = settle_rss(shim, before + 40)
        print(f"\nnon-reading clients (4 x 200 x 0.5 MB replies): RSS before {before:.0f} MB, "
              f"peak {peak:.0f} MB, after {after:.0f} MB")
        # Per client: peer_send_hwm replies in libzmq's queue + peer_backlog_bytes here.
        assert peak - before < 4 * (64 * 0.6 + 4) + 60, (before, peak)
        # Held after the clients left: was +100 MB (+400 MB with 0.5 MB replies); what
        # remains now is the C allocator's, not queued replies.
        assert after - before < 80, (before, after)
        assert_serving(shim, tries=3)
        assert_clean_exit(shim)
    finally:
        shim.kill()
        fake.kill()


def test_huge_frames_are_cut_off_before_they_are_buffered(
        tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    fake = start_fake("mma", "mma")
    shim = start_ready(shim_config({"mma": fake}, tmp_path, shim={
        "max_request_bytes": 1 * MB, "max_frame_bytes": 8 * MB}), tmp_path)
    try:
        before, _ = rss(shim)
        # Over the soft limit, under the hard cap: the caller's clear error.
        sock = dealer(ctx, shim.endpoint)
        sock.send_multipart([b"", b"{" + b" " * (2 * MB) + b"}"])
        assert sock.poll(20_000)
        reply = json.loads(sock.recv_multipart()[-1])
        assert reply["error_code"] == "SHIM_BAD_REQUEST", reply
        sock.close(0)
        # Over the hard cap: libzmq drops the connection without buffering the frame.
        for _ in range(3):
            big = dealer(ctx, shim.endpoint)
            big.send_multipart([b"", b"x" * (128 * MB)], copy=False)
            wait_until(lambda: True, 1.0, "sent")
            big.close(0)
        # The health and admin sockets cap frames too.
        health = dealer(ctx, shim.health_endpoint)
        health.send_multipart([b"", b"x" * (96 * MB)], copy=False)
        health.close(0)
        assert_serving(shim, tries=3)
        _, peak = rss(shim)
        print(f"\nhuge frames (2 MB, 3 x 128 MB, 96 MB to health): RSS before {before:.0f} MB, "
              f"peak {peak:.0f} MB")
        assert peak - before < 60, (before, peak)
        assert shim.health()["status"] == "ok"
        assert_clean_exit(shim)
    finally:
        shim.kill()
        fake.kill()


def test_big_garbage_replies_are_refused_and_not_kept(
        tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    # 20 MB of garbage per reply, as in the issue (160 of them: RSS 36 -> 916 MB, kept).
    fake = start_fake("mma", "mma", mode="garbage", pad_bytes=20 * MB)
    shim = start_ready(shim_config({"mma": fake}, tmp_path, shim={
        "max_reply_bytes": 4 * MB, "gc_interval_s": 1.0}), tmp_path)
    try:
        before, _ = rss(shim)
        sock = dealer(ctx, shim.endpoint)
        codes: dict[str, int] = {}
        for _ in range(40):
            sock.send_multipart([b"", GEN_BYTES])
            assert sock.poll(30_000), "no reply"
            code = json.loads(sock.recv_multipart()[-1]).get("error_code", "ok")
            codes[code] = codes.get(code, 0) + 1
        sock.close(0)
        assert codes == {"SHIM_BAD_REPLY": 40}, codes
        assert metric(shim.metrics(), "shim_dropped_replies_total",
                      reason="backend_too_large") == 40
        _, peak = rss(shim)
        after = settle_rss(shim, before + 30)
        print(f"\ngarbage replies (40 x 20 MB): RSS before {before:.0f} MB, peak {peak:.0f} MB, "
              f"after {after:.0f} MB")
        assert after - before < 30, (before, after)
        assert peak - before < 200, (before, peak)
    finally:
        shim.kill()
        fake.kill()


#: RSS growth allowed after 3 rounds of 1,000 distinct names (the leak was +192 MB).
BOUND_MB = 40


def test_distinct_model_names_do_not_grow_memory(
        tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    fake = start_fake("mma", "mma")
    shim = start_ready(shim_config({"mma": fake}, tmp_path,
                                   ownership={"enabled": True, "poll_interval_ms": 200},
                                   shim={"gc_interval_s": 1.0}),
                       tmp_path)
    try:
        sock = dealer(ctx, shim.endpoint)

        def one_round(tag: int) -> None:
            for i in range(1000):
                name = f"model-{tag}-{i}-" + "n" * 2000
                for command in ("LOAD_MODEL", "UNLOAD_MODEL"):
                    sock.send_multipart([b"", json.dumps(
                        {"command": command, "model_name": name}).encode()])
            for _ in range(2000):
                assert sock.poll(30_000), "no reply"
                sock.recv_multipart()

        one_round(0)  # warm-up: allocator arenas, caches
        base = steady_rss(shim)  # was: 20 s of waiting for an RSS below 0
        readings = []
        for tag in range(1, 4):
            one_round(tag)
            readings.append(rss(shim)[0])
        after = settle_rss(shim, base + BOUND_MB)
        sock.close(0)
        print(f"\ndistinct model names (3 x 1000 loads+unloads, 2 KB names): RSS after warm-up "
              f"{base:.0f} MB, after each round {[round(r) for r in readings]} MB, "
              f"settled {after:.0f} MB")
        # The figure: +64 MB per round, never released (+192 MB here). Now no
        # Python object keeps a name once its poll has passed (the ownership table is
        # pruned: checked in process with gc.get_objects); what stays is allocator
        # fragmentation: +5 to +22 MB after 3,000 distinct 2 KB names over ten runs on a
        # loaded 2-core machine, with and without the compiled core (RSS goes down as
        # well as up between rounds). The bound sits well above that noise and well
        # below the leak it guards against.
        assert after - base < BOUND_MB, (base, readings, after)
        assert_serving(shim, tries=3)
    finally:
        shim.kill()
        fake.kill()

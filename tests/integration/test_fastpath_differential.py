"""One source of truth (issue 17): the compiled data plane (shim._core via shim.fastpath)
and the pure-Python path answer the same request streams with the same bytes and the
same counts and metrics.

Two real shims run on the same config and the same fake backends, one with the core
(``MMSHIM_FASTPATH=auto``), one without (``off``). Every request goes to both; the
replies must be byte-identical once the timestamps the backends and the shim write
themselves are masked. The streams are hypothesis's: valid pass-through generates (the
core's business), every request shape of the reliability fuzzer
(tests/reliability/test_fuzz.py), multipart and envelope oddities, and the nasty
payloads of that suite. Afterwards the shims' metrics must agree, and the core must have
carried part of the traffic (else the comparison proves nothing).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim import fastpath
from tests.reliability.helpers import (
    fake_counts,
    metric,
    settled_counts,
    start_ready,
    sticky_key_for,
    wait_until,
)
from tests.reliability.test_fuzz import FRAMES, REQUESTS
from tests.shimproc import Fake, ShimProc, dealer, shim_config, start_fake

# Skipped where no compiler built the core; under CI (which installs gcc) it must be there.
pytestmark = pytest.mark.skipif(not fastpath.available() and not os.environ.get("CI"),
                                reason="the compiled core is not built (no C compiler)")

EXAMPLES = int(os.environ.get("MMSHIM_DIFF_EXAMPLES", "40"))
#: Generous: the two shims must not differ by one of them running late on a loaded machine
#: (a deadline missed by one only), so deadlines are long and replies awaited longer.
REPLY_S = 15.0
DIFF = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get("MMSHIM_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

#: What the two shims may differ in: wall-clock timestamps written per reply (and the
#: backends' per-model ``last_used`` in a merged loaded-models view).
_TIMESTAMP = re.compile(rb'"(timestamp|last_used)": ?("[^"]*"|-?[0-9.e+-]+)')

#: Metric families that must agree once both shims are quiet.
FAMILIES = ("shim_requests_total", "shim_bad_requests_total", "shim_frontend_total",
            "shim_timeouts_total", "shim_failovers_total", "shim_late_replies_total",
            "shim_duplicate_joins_total", "shim_request_latency_seconds_count",
            "shim_dropped_replies_total", "shim_unroutable_replies_total")

#: The reliability suite's inputs its fuzzers do not reach (test_nasty_json_is_a_bad_request).
NASTY = [b'{"model_id": "phi-2", "request_id": "\xff\xfe"}', b'"\x80"',
         b'{"model_id": "phi-2", "request_id": "\\ud800"}',
         b'{"command": "LOAD_MODEL", "priority": 1e999}',
         b'{"action": "generate", "prompt": NaN}', b'{"action": "generate"', b"\xef\xbb\xbf{}",
         # and ones aimed at the core's scanner: escapes in keys, duplicate keys, nesting
         b'{"\\u0061ction": "generate", "prompt": "x"}',
         b'{"action": "generate", "action": "status"}',
         b'{"action": "gen\\u0065rate", "prompt": "x"}',
         b'{"action": "generate", "prompt": "caf\xc3\xa9 \\n \\"q\\""}',
         b'{"action": "generate", "prompt": "x"} trailing',
         b' {"action": "generate", "prompt": [1, 2.5e3, true, null, {"a": {}}]} ',
         b'{"action": "generate", "params": {"max_tokens": 123456789012345678901234}}',
         b'{"action": "generate", "user": 12, "prompt": "x"}',
         b'{"action": "generate", "user": 1.5, "prompt": "x"}',
         b'{"action": "generate", "user": "\\u00e9", "prompt": "x"}',
         b'{"action": "unknown_thing"}', b'{"action": "status"}', b"{}",
         # last: deep nesting goes on to the backend as opaque bytes, and the fake
         # backend (Python's json) dies of a RecursionError on it
         b'{"action": "generate", "params": ' + b"[" * 2000 + b"]" * 2000 + b"}",
         b"[" * 600 + b"]" * 600]


@dataclass
class Pair:
    """The same config twice: ``fast`` with the compiled core, ``slow`` without."""

    fast: ShimProc
    slow: ShimProc
    backends: dict[str, Fake]
    weights: dict[str, float]


def _start_pair(tmp_path: Path, backends: dict[str, Fake], weights: dict[str, float],
                timeout_ms: int = 5000, **sections: Any) -> Pair:
    shims: list[ShimProc] = []
    try:
        for switch in ("auto", "off"):
            cfg = shim_config(backends, tmp_path / switch, routing={
                "weights": weights, "sticky_key": "user"}, **sections)
            cfg["shim"].update(max_request_bytes=4096, default_timeout_ms=timeout_ms,
                               opaque_backend=next(iter(backends)))
            (tmp_path / switch).mkdir(exist_ok=True)
            os.environ["MMSHIM_FASTPATH"] = switch  # inherited by the shim process
            try:
                shims.append(start_ready(cfg, tmp_path / switch))
            finally:
                os.environ.pop("MMSHIM_FASTPATH", None)
    except BaseException:  # nothing left running when a start fails
        for shim in shims:
            shim.stop()
        for fake in backends.values():
            fake.kill()
        raise
    return Pair(shims[0], shims[1], backends, weights)


def _stop(pair: Pair) -> None:
    for shim in (pair.fast, pair.slow):
        shim.stop()
    for fake in pair.backends.values():
        fake.kill()


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp = tmp_path_factory.mktemp("diff")
    backends = {"mma": start_fake("A"), "mma2": start_fake("B"),
                "mms": start_fake("S", "mms")}
    # All traffic on one backend: a request without a sticky key is routed by a random
    # bucket, which two shims draw differently (test_sticky_routing covers the split).
    p = _start_pair(tmp, backends, {"mma": 100, "mma2": 0, "mms": 0})
    yield p
    _stop(p)


class Clients:
    """One DEALER per shim; each message goes to both, each reply is awaited."""

    def __init__(self, p: Pair) -> None:
        self.ctx = zmq.Context()
        self.fast = dealer(self.ctx, p.fast.endpoint)
        self.slow = dealer(self.ctx, p.slow.endpoint)

    def both(self, frames: list[bytes]) -> tuple[list[bytes], list[bytes]]:
        out = []
        for sock in (self.fast, self.slow):
            sock.send_multipart(frames)
        for sock in (self.fast, self.slow):
            assert sock.poll(int(REPLY_S * 1000)), f"no reply to {frames!r:.300}"
            out.append(sock.recv_multipart())
        return out[0], out[1]

    def close(self) -> None:
        self.fast.close(0)
        self.slow.close(0)
        self.ctx.term()


@contextlib.contextmanager
def compared(p: Pair) -> Iterator[Clients]:
    """Clients on both shims of ``p``; once the block ends, the same metrics in both,
    and in every case both shims and their fakes stopped."""
    try:
        c = Clients(p)
        try:
            yield c
        finally:
            c.close()
        assert_same_metrics(p)
    finally:
        _stop(p)


def masked(frames: list[bytes]) -> list[bytes]:
    return [_TIMESTAMP.sub(rb'"\1": 0', f) for f in frames]


def assert_same(c: Clients, frames: list[bytes]) -> None:
    fast, slow = c.both(frames)
    assert masked(fast) == masked(slow), (frames, fast, slow)


def assert_same_metrics(p: Pair) -> None:
    fast_counts = settled_counts(p.fast)
    slow_counts = settled_counts(p.slow)
    assert fast_counts == slow_counts
    fast, slow = p.fast.metrics(), p.slow.metrics()
    for family in FAMILIES:
        assert _samples(fast, family) == _samples(slow, family), family
    assert metric(fast, "shim_fastpath_requests_total") > 0, "the core carried nothing"
    assert metric(slow, "shim_fastpath_requests_total") == 0


def _samples(text: str, family: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(family + "{") or line.startswith(family + " "):
            labels, _, value = line.rpartition(" ")
            out[labels] = float(value)
    return out


GENERATE = st.fixed_dictionaries({"action": st.just("generate")}, optional={
    "prompt": st.text(max_size=40), "model_pref": st.sampled_from(["fast", "quality", ""]),
    "user": st.text(max_size=12) | st.integers(-10**6, 10**6),
    "params": st.fixed_dictionaries({}, optional={"max_tokens": st.integers(1, 500)})})
PAYLOAD = st.one_of(GENERATE.map(lambda m: ("json", m)), GENERATE.map(lambda m: ("json", m)),
                    REQUESTS.map(lambda m: ("json", m)), FRAMES.map(lambda f: ("frames", f)),
                    st.sampled_from(NASTY).map(lambda b: ("raw", b)))


def _frames(kind: str, value: Any, i: int) -> list[bytes]:
    import json

    tag = f"t{i}".encode()
    if kind == "frames":
        return [tag, *value]
    body = value if kind == "raw" else json.dumps(value).encode()
    return [tag, b"", body]


def test_same_replies_and_metrics(pair: Pair) -> None:
    """Every stream: byte-identical replies; afterwards, the same counts and metrics."""
    c = Clients(pair)
    sent = [0]

    @DIFF
    @given(st.lists(PAYLOAD, min_size=1, max_size=8))
    def streams(items: list[tuple[str, Any]]) -> None:
        for kind, value in items:
            sent[0] += 1
            frames = _frames(kind, value, sent[0])
            assert_same(c, frames)

    try:
        streams()
        for i, payload in enumerate(NASTY):
            assert_same(c, [f"n{i}".encode(), b"", payload])
    finally:
        c.close()
    assert_same_metrics(pair)


def test_sticky_routing_and_duplicates(tmp_path: Path) -> None:
    """Sticky keys pick the same backend in both (the core calls shim.routing.bucket_of);
    re-sent bytes in flight join one execution in both."""
    # Slow enough that the first copy is surely still in flight when the second comes.
    backends = {"mma": start_fake("A", delay_ms=300), "mma2": start_fake("B", delay_ms=300)}
    pair = _start_pair(tmp_path, backends, {"mma": 60, "mma2": 40})
    with compared(pair) as c:
        for backend in ("mma", "mma2"):
            user = sticky_key_for(backend, pair.weights, prefix="u")
            frames = [b"s", b"", b'{"action": "generate", "prompt": "hi", "user": "%s"}'
                      % user.encode()]
            fast, slow = c.both(frames)
            assert masked(fast) == masked(slow)
            name = pair.backends[backend].name
            assert f'"response_text": "{name}"'.encode() in fast[2], fast
        # Two copies of the same bytes back to back: in both shims the second joins.
        body = b'{"action": "generate", "prompt": "twice", "user": "dup"}'
        for sock in (c.fast, c.slow):
            sock.send_multipart([b"d1", b"", body])
            sock.send_multipart([b"d2", b"", body])
        for sock in (c.fast, c.slow):
            got = []
            for _ in range(2):
                assert sock.poll(int(REPLY_S * 1000))
                got.append(sock.recv_multipart())
            assert sorted(g[0] for g in got) == [b"d1", b"d2"]


@pytest.mark.parametrize("mode", ["garbage", "extra_frames", "foreign_id", "stall"])
def test_bad_backend_replies(tmp_path: Path, mode: str) -> None:
    """A backend that answers badly (or not at all): the core hands the request back to
    Python, which answers as the Python path does (failover to the good backend for
    generate, whose rule allows it; SHIM_TIMEOUT at the deadline)."""
    backends = {"bad": start_fake("X", mode=mode), "good": start_fake("G")}
    # a short deadline where the bad backend never answers (each request waits it out)
    p = _start_pair(tmp_path, backends, {"bad": 100, "good": 0},
                    timeout_ms=2000 if mode in ("stall", "foreign_id") else 5000)
    with compared(p) as c:
        for i in range(3):
            assert_same(c, [f"b{i}".encode(), b"", b'{"action": "generate", "prompt": "p"}'])


def test_backend_gone_with_requests_in_flight(tmp_path: Path) -> None:
    """A backend that goes away with requests in flight: in both shims they fail over to
    the other backend at once (BackendLost), long before their deadline."""
    backends = {"slow": start_fake("X", delay_ms=60_000), "good": start_fake("G")}
    p = _start_pair(tmp_path, backends, {"slow": 100, "good": 0}, timeout_ms=20_000)
    with compared(p) as c:
        body = b'{"action": "generate", "prompt": "p%d"}'
        for sock in (c.fast, c.slow):
            for i in range(5):
                sock.send_multipart([b"g%d" % i, b"", body % i])
        wait_until(lambda: fake_counts(backends["slow"]).get("generate", 0) >= 10, 10.0,
                   "the slow backend holding all ten requests")
        backends["slow"].kill()
        replies = {}
        for name, sock in (("fast", c.fast), ("slow", c.slow)):
            got = []
            for _ in range(5):
                assert sock.poll(int(REPLY_S * 1000)), f"{name}: no failover reply"
                got.append(masked(sock.recv_multipart()))
            replies[name] = sorted(got)
        assert replies["fast"] == replies["slow"]
        assert all(b'"response_text": "G"' in r[2] for r in replies["fast"]), replies


def test_many_in_flight(tmp_path: Path) -> None:
    """Thousands of distinct requests pipelined through the core (more than its initial
    tables hold: slots, the deadline heap and the duplicate index all grow and reuse
    their entries): every one answered once, the books balance."""
    backends = {"mma": start_fake("A"), "mma2": start_fake("B")}
    pair = _start_pair(tmp_path, backends, {"mma": 50, "mma2": 50})
    ctx = zmq.Context()
    sock = dealer(ctx, pair.fast.endpoint)
    total, window, sent, got = 6000, 200, 0, 0
    seen: set[bytes] = set()
    try:
        while got < total:
            while sent < total and sent - got < window:
                sock.send_multipart([b"m%d" % sent, b"",
                                     b'{"action": "generate", "prompt": "n%d"}' % sent])
                sent += 1
            assert sock.poll(int(REPLY_S * 1000)), f"stuck after {got} replies"
            reply = sock.recv_multipart()
            assert reply[0] not in seen and b'"status": "ok"' in reply[2], reply
            seen.add(reply[0])
            got += 1
        counts = settled_counts(pair.fast)
        assert counts["requests"] == counts["replies"] + counts["unroutable"]
        assert metric(pair.fast.metrics(), "shim_fastpath_requests_total") >= total
    finally:
        sock.close(0)
        ctx.term()
        _stop(pair)


def test_split_with_a_translated_backend(tmp_path: Path) -> None:
    """50/50 between an MMA backend (bytes passed: the core's) and an MMS one
    (translated: Python's), requests without a sticky key: the core draws each one's
    bucket and hands the MMS ones up with it, so both shims split alike (were Python to
    draw again, the MMA share would be 75 %, not 50 %)."""
    backends = {"mma": start_fake("A"), "mms": start_fake("S", "mms")}
    p = _start_pair(tmp_path, backends, {"mma": 50, "mms": 50})
    ctx = zmq.Context()
    ctx.setsockopt(zmq.LINGER, 0)
    total, window = 1200, 50
    try:
        shares = []
        for shim in (p.fast, p.slow):
            before = {n: sum(fake_counts(f).values()) for n, f in backends.items()}
            sock = dealer(ctx, shim.endpoint)
            sent = got = 0
            while got < total:
                while sent < total and sent - got < window:
                    sock.send_multipart([b"", b'{"action": "generate", "prompt": "s%d"}' % sent])
                    sent += 1
                assert sock.poll(int(REPLY_S * 1000)), f"stuck after {got} replies"
                reply = sock.recv_multipart()[1]
                assert json.loads(reply)["status"] == "ok", reply
                got += 1
            sock.close(0)
            wait_until(lambda b=before: sum(sum(fake_counts(f).values()) - b[n]
                                            for n, f in backends.items()) >= total,
                       10.0, "every request counted at a backend")
            mma = sum(fake_counts(backends["mma"]).values()) - before["mma"]
            shares.append(mma / total)
        # 1,200 fair coin flips: 50 % +- 6 % is more than 4 standard deviations.
        assert all(0.44 <= s <= 0.56 for s in shares), shares
        assert metric(p.fast.metrics(), "shim_fastpath_requests_total") > 0.3 * total
    finally:
        ctx.destroy(0)
        _stop(p)


@pytest.mark.parametrize(("setting", "env", "fast"), [
    ("off", None, False), ("auto", None, True), ("off", "auto", True), ("auto", "off", False)])
def test_switch(tmp_path: Path, setting: str, env: str | None, fast: bool) -> None:
    """``shim.fastpath`` in the config switches the core; ``MMSHIM_FASTPATH`` overrides it."""
    backends = {"mma": start_fake("A")}
    cfg = shim_config(backends, tmp_path)
    cfg["shim"]["fastpath"] = setting
    old = os.environ.pop("MMSHIM_FASTPATH", None)
    if env is not None:
        os.environ["MMSHIM_FASTPATH"] = env
    try:
        shim = start_ready(cfg, tmp_path)
    finally:
        os.environ.pop("MMSHIM_FASTPATH", None)
        if old is not None:
            os.environ["MMSHIM_FASTPATH"] = old
    ctx = zmq.Context()
    sock = dealer(ctx, shim.endpoint)
    try:
        for i in range(5):
            sock.send_multipart([b"", b'{"action": "generate", "prompt": "w%d"}' % i])
            assert sock.poll(int(REPLY_S * 1000))
            sock.recv_multipart()
        settled_counts(shim, requests=5)
        carried = metric(shim.metrics(), "shim_fastpath_requests_total")
        assert carried == (5 if fast else 0), carried
    finally:
        sock.close(0)
        ctx.term()
        shim.stop()
        backends["mma"].kill()

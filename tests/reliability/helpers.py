"""Shared machinery for the reliability suite: a bounded load driver, counter scraping,
fd limits. (Fixtures are in conftest.py.)

Every test here runs a real ``mmshim run`` subprocess (tests/shimproc.py) in front of
fake backends (tests/fakes.py) and checks the invariants of design.md from both sides:

- the client side: every request gets exactly one reply (DEALER clients carry a unique
  tag frame in their envelope, which the shim hands back, so a second reply or a reply to
  nobody is noticed), before its deadline (nothing wedged);
- the shim side: once the load has settled, ``shim_frontend_total{kind="requests"}`` ==
  replies + unroutable, and each of them matches what the clients counted.

The load driver runs many sockets in ONE thread with a zmq.Poller, bounded both in the
number of requests and in time, so a test can never hang or run away.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import zmq

from shim.routing import RoutingTable, bucket_of
from tests.procs import Backend, loaded_on, req
from tests.shimproc import Fake, ShimProc, start_shim

GEN = {"action": "generate", "model_pref": "fast", "prompt": "hello", "params": {"max_tokens": 4}}
GEN_BYTES = json.dumps(GEN).encode()


def distinct_gen(client: int, seq: int) -> bytes:
    """A generate request no other client sends: identical bytes in flight would join
    into one backend execution (shim.dedup), as Lazy Pirate re-sends should."""
    return json.dumps({**GEN, "client": client, "seq": seq}).encode()

Ctx = zmq.Context[zmq.Socket[bytes]]
T = TypeVar("T")


# -- process limits ------------------------------------------------------------------


def raise_fd_limit(want: int) -> int:
    """Raise the soft RLIMIT_NOFILE to ``want`` (capped by the hard limit); returns it.

    Subprocesses started afterwards (the shim, the fakes) inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    return soft


# -- replies -------------------------------------------------------------------------


def served_by(reply: dict[str, Any]) -> str:
    """Which fake served a (translated) reply: fakes put their name in it."""
    return str(reply.get("response_text") or reply.get("served_by") or reply.get("message"))


def outcome_of(reply: dict[str, Any] | None) -> str:
    """``ok`` for a backend's success reply, else the shim's error_code (or the status)."""
    if reply is None:
        return "NON_JSON"
    code = reply.get("error_code")
    if code:
        return str(code)
    return "ok" if reply.get("status") in ("ok", "success", "SUCCESS") else str(reply.get("status"))


def decode_reply(body: bytes) -> dict[str, Any] | None:
    """The reply as a JSON object, or None when it is not one (not the caller's dialect)."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# -- metrics -------------------------------------------------------------------------

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? "
                     r"(?P<value>\S+)$")


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m is None or m["name"] != name:
            continue
        have = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m["labels"] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m["value"])
    return total


def frontend_counts(shim: ShimProc) -> dict[str, int]:
    """``shim_frontend_total`` by kind: requests, replies, unroutable."""
    text = shim.metrics()
    return {kind: int(metric(text, "shim_frontend_total", kind=kind))
            for kind in ("requests", "replies", "unroutable")}


def settled_counts(shim: ShimProc, *, requests: int | None = None,
                   timeout: float = 10.0) -> dict[str, int]:
    """The frontend counters once nothing is in flight: requests == replies + unroutable
    (and, when given, requests == ``requests``), the same on two scrapes in a row.

    Returns the last scrape even when it never settled, so the caller's assertion shows
    the numbers.
    """
    scrapes: list[dict[str, int]] = []

    def settled() -> bool:
        scrapes.append(frontend_counts(shim))
        counts = scrapes[-1]
        balanced = counts["requests"] == counts["replies"] + counts["unroutable"]
        return (balanced and (requests is None or counts["requests"] == requests)
                and len(scrapes) > 1 and counts == scrapes[-2])

    with contextlib.suppress(AssertionError):
        wait_until(settled, timeout, "settled frontend counters", interval=0.1)
    return scrapes[-1]


def start_ready(cfg: dict[str, Any], tmp_path: Path) -> ShimProc:
    """``start_shim``, then wait until every backend is connected and healthy.

    start_shim returns once the shim's health socket answers; its backend connections are
    made asynchronously and a request before they are up is (rightly) answered
    SHIM_NO_BACKEND, which these tests would otherwise count against the failure at hand.
    """
    shim = start_shim(cfg, tmp_path)
    try:
        wait_until(lambda: all(b["healthy"] for b in shim.status()["backends"].values()),
                   10.0, "every backend healthy")
    except BaseException:
        shim.kill()
        raise
    return shim


def assert_clean_exit(shim: ShimProc) -> None:
    """SIGTERM: the shim drains and exits 0, and logged no traceback along the way (an
    exception in a loop callback is logged, not raised: the only trace of a bug that
    could leave a client waiting)."""
    code = shim.stop()
    log = shim.proc.log()
    assert code == 0, f"shim exit code {code}:\n{log[-3000:]}"
    assert "Traceback" not in log, log[-5000:]


def fake_counts(fake: Fake) -> dict[str, int]:
    """Requests a fake backend received, by action (its health reply carries them)."""
    counts: dict[str, int] = req(fake.health_endpoint, b"?", timeout=5.0).get("counts", {})
    return counts


def wait_until(predicate: Callable[[], T], timeout: float, what: str | Callable[[], str],
               interval: float = 0.05) -> T:
    """The test suite's one polling helper: call ``predicate`` every ``interval`` s until
    it returns something truthy, and return that. After ``timeout`` s, AssertionError
    naming ``what`` (a callable is called then, to show the last state)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {said}")
        time.sleep(interval)
    return value


class OverlapWatcher(threading.Thread):
    """The independent watcher of "one owner per model" (design.md): polls both reference
    backends directly (tests/procs.loaded_on, never through the shim), in turn. A model
    counts as on both when seen on ``mma``, then on ``mms``, then on ``mma`` again (three
    answers in a row): a hand-over between two looks is not an overlap. ``overlaps``
    records each sighting, ``longest_overlap_s`` how long back-to-back sightings of one
    model lasted, ``looks`` the rounds done. Use as a context manager or start/stop."""

    def __init__(self, mma: Backend, mms: Backend, *, ask_timeout: float = 0.3,
                 pause_s: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.mma, self.mms = mma, mms
        self.ask_timeout, self.pause_s = ask_timeout, pause_s
        self.halt = threading.Event()
        self.overlaps: list[tuple[str, float]] = []
        self.longest_overlap_s = 0.0
        self.looks = 0

    @property
    def duplicates(self) -> list[str]:
        """The models of every overlap sighting, in order."""
        return [model for model, _ in self.overlaps]

    def run(self) -> None:
        since: dict[str, float] = {}
        while not self.halt.is_set():
            first = loaded_on(self.mma, self.ask_timeout)
            middle = loaded_on(self.mms, self.ask_timeout)
            last = loaded_on(self.mma, self.ask_timeout)
            now = time.monotonic()
            both = (first & middle & last) if (
                first is not None and middle is not None and last is not None) else set()
            for model in sorted(both):
                self.overlaps.append((model, now))
                start = since.setdefault(model, now)
                self.longest_overlap_s = max(self.longest_overlap_s, now - start)
            for model in list(since):
                if model not in both:
                    del since[model]
            self.looks += 1
            self.halt.wait(self.pause_s)

    def wait_looks(self, n: int, timeout: float = 30.0) -> None:
        """Until ``n`` more rounds of looks are done (a settled system seen, not a time)."""
        target = self.looks + n
        wait_until(lambda: self.looks >= target or bool(self.overlaps), timeout,
                   f"{n} more looks by the overlap watcher")

    def stop(self) -> None:
        self.halt.set()
        self.join(15)

    def __enter__(self) -> OverlapWatcher:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def wait_until_async(predicate: Callable[[], T], timeout: float,
                           what: str | Callable[[], str], interval: float = 0.01) -> T:
    """``wait_until`` for a test that runs on the event loop: the loop runs meanwhile."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout} s waiting for {said}")
        await asyncio.sleep(interval)
    return value


def sticky_key_for(backend: str, weights: dict[str, float], prefix: str = "conv") -> str:
    """A ``conversation_id`` that the shim's weighted routing sends to ``backend``."""
    table = RoutingTable(weights)
    return next(key for i in range(10_000)
                if table.backend_for(bucket_of(key := f"{prefix}-{i}")) == backend)


def assert_serving(shim: ShimProc, expect: set[str] | None = None, tries: int = 10,
                   request: dict[str, Any] | None = None) -> None:
    """The shim still serves: ``tries`` plain requests each get an ok reply."""
    for _ in range(tries):
        reply = req(shim.endpoint, request or GEN, timeout=5.0)
        assert reply.get("status") == "ok", reply
        if expect is not None:
            assert served_by(reply) in expect, reply


def assert_counters_add_up(shim: ShimProc, load: LoadResult | None = None, *,
                           extra_requests: int = 0, extra_replies: int = 0) -> dict[str, int]:
    """Shim side: requests == replies + unroutable once settled; and, given the client
    side of the only traffic (``load`` plus ``extra_*`` plain requests), that each shim
    counter equals what the clients counted."""
    expected = None if load is None else load.sent + extra_requests
    counts = settled_counts(shim, requests=expected)
    assert counts["requests"] == counts["replies"] + counts["unroutable"], counts
    if load is not None:
        assert counts["requests"] == load.sent + extra_requests, (counts, load.summary())
        assert counts["replies"] == load.answered + extra_replies, (counts, load.summary())
        assert counts["unroutable"] == 0, counts
    return counts


# -- the load driver -----------------------------------------------------------------


@dataclass
class Answer:
    """One reply as a client saw it."""

    client: int
    seq: int  # the client's n-th request (0-based)
    sent_at: float  # seconds since the load started
    latency: float
    outcome: str
    served: str


@dataclass
class LoadResult:
    """What the clients saw; ``sent == answered`` when nothing was lost."""

    sent: int = 0
    answered: int = 0
    answers: list[Answer] = field(default_factory=list)
    #: Replies that matched no outstanding request of their client (a second reply, or
    #: a reply with a tag nobody sent): must stay empty.
    extras: list[tuple[int, list[bytes]]] = field(default_factory=list)
    #: (client, seconds waited) for requests that got no reply before their deadline.
    wedged: list[tuple[int, float]] = field(default_factory=list)
    elapsed: float = 0.0
    error: BaseException | None = None

    @property
    def outcomes(self) -> Counter[str]:
        return Counter(a.outcome for a in self.answers)

    def served(self, after: float = 0.0, outcome: str = "ok") -> Counter[str]:
        """Who served the replies to requests sent ``after`` seconds into the load."""
        return Counter(a.served for a in self.answers if a.sent_at >= after
                       and a.outcome == outcome)

    @property
    def max_latency(self) -> float:
        return max((a.latency for a in self.answers), default=0.0)

    def summary(self) -> str:
        return (f"sent={self.sent} answered={self.answered} wedged={len(self.wedged)} "
                f"extras={len(self.extras)} outcomes={dict(self.outcomes)} "
                f"elapsed={self.elapsed:.2f}s max_latency={self.max_latency:.2f}s")

    def check(self) -> None:
        """Exactly one reply per request, each before its deadline."""
        assert self.error is None, f"load driver failed: {self.error!r}"
        assert not self.wedged, f"clients wedged: {self.wedged[:10]} ({self.summary()})"
        assert not self.extras, f"second/unmatched replies: {self.extras[:5]} ({self.summary()})"
        assert self.sent == self.answered, self.summary()


class _Client:
    """One REQ socket, or a DEALER that talks like one (one request at a time) but puts a
    unique tag frame in its envelope, so every reply says which request it answers."""

    __slots__ = ("idx", "kind", "outstanding", "sent", "sock")

    def __init__(self, ctx: Ctx, endpoint: str, idx: int, kind: str) -> None:
        self.idx = idx
        self.kind = kind
        self.sent = 0
        self.outstanding: tuple[bytes, float] | None = None  # (tag, monotonic sent)
        self.sock = self._open(ctx, endpoint)

    def _open(self, ctx: Ctx, endpoint: str) -> zmq.Socket[bytes]:
        sock = ctx.socket(zmq.REQ if self.kind == "req" else zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    def send(self, payload: bytes, now: float) -> None:
        tag = f"c{self.idx}-r{self.sent}".encode()
        if self.kind == "req":
            self.sock.send(payload)
        else:
            self.sock.send_multipart([tag, b"", payload])
        self.sent += 1
        self.outstanding = (tag, now)

    def reset(self, ctx: Ctx, endpoint: str) -> None:
        """Lazy Pirate: a REQ that missed its reply is stuck; replace it."""
        self.sock.close(0)
        self.sock = self._open(ctx, endpoint)
        self.outstanding = None


class Load:
    """Bounded closed-loop load: ``clients`` sockets in one thread, each sending its next
    request when the previous one is answered (after ``pace_s``), until ``max_requests``
    were sent in all, ``per_client`` by any client, or ``duration_s`` has passed.

    A request with no reply after ``deadline_s`` counts as wedged (its REQ socket is
    replaced). After the last reply, the sockets are watched for ``grace_s`` more: any
    message then is a second reply. ``kind`` is "req", "dealer" or "mix" (alternating).
    """

    def __init__(self, ctx: Ctx, endpoint: str, *, clients: int, deadline_s: float,
                 payload: bytes | Callable[[int, int], bytes] = distinct_gen,
                 kind: str = "mix", max_requests: int = 10_000, per_client: int | None = None,
                 duration_s: float = 10.0, pace_s: float = 0.0, grace_s: float = 0.5,
                 hard_limit_s: float = 60.0) -> None:
        self.ctx, self.endpoint = ctx, endpoint
        self.clients, self.kind = clients, kind
        self.deadline_s, self.payload = deadline_s, payload
        self.max_requests, self.per_client = max_requests, per_client
        self.duration_s, self.pace_s, self.grace_s = duration_s, pace_s, grace_s
        self.hard_limit_s = hard_limit_s
        self.result = LoadResult()
        self.started = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def now(self) -> float:
        """Seconds since the load started."""
        return time.monotonic() - self.started

    # -- running ---------------------------------------------------------------------

    def start(self) -> Load:
        """Run in a background thread (for tests that act on processes meanwhile)."""
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run_safely, daemon=True)
        self._thread.start()
        return self

    def stop_sending(self) -> None:
        self._stop.set()

    def join(self) -> LoadResult:
        assert self._thread is not None
        self._thread.join(self.hard_limit_s + self.grace_s + 5)
        if self._thread.is_alive():
            raise AssertionError("load driver did not finish")
        return self.result

    def run(self) -> LoadResult:
        self.started = time.monotonic()
        self._run_safely()
        return self.result

    def _run_safely(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # surfaced by LoadResult.check()
            self.result.error = exc

    def _payload(self, client: int, seq: int) -> bytes:
        return self.payload(client, seq) if callable(self.payload) else self.payload

    def _run(self) -> None:
        r = self.result
        kinds = {"req": ["req"], "dealer": ["dealer"], "mix": ["req", "dealer"]}[self.kind]
        clients = [_Client(self.ctx, self.endpoint, i, kinds[i % len(kinds)])
                   for i in range(self.clients)]
        by_sock = {c.sock: c for c in clients}
        poller = zmq.Poller()
        for c in clients:
            poller.register(c.sock, zmq.POLLIN)
        next_send = [0.0] * len(clients)
        hard_end = self.started + self.hard_limit_s
        try:
            while True:
                now = time.monotonic()
                sending = (not self._stop.is_set() and now - self.started < self.duration_s
                           and r.sent < self.max_requests)
                if sending:
                    for i, c in enumerate(clients):
                        if c.outstanding is None and now >= next_send[i] and (
                                self.per_client is None or c.sent < self.per_client):
                            if r.sent >= self.max_requests:
                                break
                            c.send(self._payload(i, c.sent), now)
                            r.sent += 1
                busy = [c for c in clients if c.outstanding is not None]
                if not busy and not sending:
                    break
                if not busy and self.per_client is not None and all(
                        c.sent >= self.per_client for c in clients):
                    break
                if now > hard_end:
                    raise AssertionError(f"load ran past its hard limit: {r.summary()}")
                for sock, _ in poller.poll(10):
                    self._read(by_sock[sock], r, time.monotonic(), next_send)
                now = time.monotonic()
                for c in busy:
                    if c.outstanding is not None and now - c.outstanding[1] > self.deadline_s:
                        r.wedged.append((c.idx, now - c.outstanding[1]))
                        poller.unregister(c.sock)
                        del by_sock[c.sock]
                        c.reset(self.ctx, self.endpoint)
                        by_sock[c.sock] = c
                        poller.register(c.sock, zmq.POLLIN)
                        next_send[c.idx] = now + self.pace_s
            r.elapsed = self.now()
            # Grace period: a second reply to anything would show up now.
            grace_end = time.monotonic() + self.grace_s
            while (left := grace_end - time.monotonic()) > 0:
                for sock, _ in poller.poll(int(left * 1000) + 1):
                    self._read(by_sock[sock], r, time.monotonic(), next_send)
        finally:
            for c in clients:
                c.sock.close(0)

    def _read(self, c: _Client, r: LoadResult, now: float, next_send: list[float]) -> None:
        while True:
            if c.kind == "req" and c.outstanding is None:
                return  # REQ: nothing to read in the send state (libzmq drops extras)
            try:
                frames = c.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if c.kind == "req":
                body, tag = frames[-1], None
            else:
                if len(frames) != 3 or frames[1] != b"":
                    r.extras.append((c.idx, frames))
                    continue
                tag, body = frames[0], frames[2]
            if c.outstanding is None or (tag is not None and tag != c.outstanding[0]):
                r.extras.append((c.idx, frames))
                continue
            sent_mono = c.outstanding[1]
            reply = decode_reply(body)
            r.answers.append(Answer(c.idx, c.sent - 1, sent_mono - self.started,
                                    now - sent_mono,
                                    outcome_of(reply), served_by(reply) if reply else ""))
            r.answered += 1
            c.outstanding = None
            next_send[c.idx] = now + self.pace_s
            if c.kind == "req":
                return  # a REQ socket holds one reply; reading on would be EFSM

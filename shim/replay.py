"""The replay engine, shared by ``mmshim replay`` and ``mmshim parity``.

Exchanges (shim.capture: recorded by the shim, or a parity corpus) are sent to a
candidate backend, translated as the shim would (through shim.transport, like live and shadow
traffic), and each candidate reply, rendered in the caller's
dialect, is compared with a reference reply by the shadow compare rules (shim.compare):

- ``mmshim replay CAPTURE --to EP``: the reference is the reply recorded in the capture
  (what the client got); ``--reference EP`` asks a live reference instead (the parity
  setup, and the way to replay a capture converted from a corpus, which has no replies);
- ``mmshim parity``: the reference is the config's safe backend, the candidate the other.

Noise calibration (as in shadow mode): with a twin of the reference (``--calibrate EP``,
or the parity reference's ``secondary``), paths where the reference and its twin
disagree are counted as noise, not as differences.

Order. ``ordered``: one exchange at a time, in capture order (parity always). Otherwise
exchanges start at their recorded times divided by ``speed`` (0: as fast as possible),
at most ``max_inflight`` at once, ordered like readers and writers per chain key
(``chain_keys``): a conversation's turns one after another; per model, load / unload /
model access are writers and generates readers; per backend state, load / unload /
model access / clear are writers and status / loaded models / health / list models
readers. A writer waits for everything before it on its keys, a reader for the last
writer before it. So a load finishes before the generates that follow it start, an
unload starts after the generates before it finished, a status sees the loads recorded
before it, and generates of one model in different conversations overlap.

Redacted captures (shim.capture) are replayed with synthetic payloads of the recorded
length; the candidate's reply is redacted the same way before the comparison, so
generated text compares by hash under ``exact`` and by type under ``shape``.

The report: per action, compared / mismatch / errors and the most frequent differing
paths (shim.difflog.Tally, as ``mmshim diffs``), the latency ratio candidate / reference
(recorded backend round trip, or the live reference's), the replay rate; the verdict's
``mismatch_rate_percent`` (mismatches and candidate failures over compared requests) is
the single figure a gate reads; exit 1 above ``threshold``.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import msgspec
import zmq

from shim import dialects
from shim.addons.shadow import caller_view, diff_record, judge
from shim.capture import Exchange, read_capture, redact, unredact
from shim.catalogue import CatalogueEntry, load_catalogue
from shim.compare import Rules, generalize
from shim.config import BackendConfig, HealthSection, ShimConfig
from shim.dialects import Kind, Op
from shim.dialects.ops import Dialect
from shim.difflog import Tally, dumps
from shim.errors import BackendError, BackendTimeout, CaptureError, UnusableReply
from shim.metrics import Metrics
from shim.pool import BackendPool
from shim.transport import Transport, unusable_view

#: Exit codes: 0 within the threshold, 1 above it, 2 unusable input, 3 unreachable.
PASS, FAIL, BAD_INPUT, UNREACHABLE = 0, 1, 2, 3

#: Outcomes counted against the threshold.
FAILED = ("mismatch", "shadow_error", "shadow_timeout", "primary_error")

#: Requests that read or change what a backend has loaded.
STATEFUL = frozenset({Kind.LOAD, Kind.UNLOAD, Kind.MODEL_ACCESS, Kind.STATUS,
                      Kind.LOADED_STATUS, Kind.HEALTH, Kind.LIST_MODELS,
                      Kind.CLEAR_CONVERSATION})

#: Requests that change what is loaded or a conversation's state (writers of "state").
CHANGING = frozenset({Kind.LOAD, Kind.UNLOAD, Kind.MODEL_ACCESS, Kind.CLEAR_CONVERSATION})

SPEEDS = {"1x": 1.0, "10x": 10.0, "max": 0.0}


def parse_speed(text: str) -> float:
    """``1x``, ``10x``, ``2.5x`` or ``max`` -> a factor (0.0: no pacing). ValueError."""
    if text in SPEEDS:
        return SPEEDS[text]
    if text.endswith("x"):
        factor = float(text[:-1])
        if factor > 0:
            return factor
    raise ValueError(f"speed must be like 1x, 10x or max, got {text!r}")


@dataclass
class Answer:
    """One side's answer to one exchange: the reply in the caller's dialect, or why not."""

    reply: Any = None
    fail: str = ""  # "", "unsupported", "timeout", "error"
    message: str = ""
    latency_ms: float | None = None


@dataclass
class Outcome:
    """What happened to one exchange."""

    line: int
    action: str
    outcome: str  # match, mismatch, shadow_error, shadow_timeout, primary_error, skipped
    detail: str = ""


@dataclass
class Side:
    """A live backend to ask: a name in a pool (its dialect comes from the pool), reached
    through the shim's one transport (shim.transport: the same translation and the same
    bad-reply policy as live traffic)."""

    pool: BackendPool
    name: str
    #: Pass the caller's bytes through unchanged when the dialects match (as the shim
    #: does); False renders every request from the parsed op (the parity run's way).
    passthrough: bool = True
    #: The model config, for what MMS does not report (as the shim fills it).
    catalogue: Mapping[str, CatalogueEntry] | None = None
    _policy: Mapping[str, str] = field(default_factory=dict)
    _transport: Transport | None = None

    @property
    def transport(self) -> Transport:
        if self._transport is None:
            self._transport = Transport(self.pool, self.catalogue, lambda: self._policy)
        return self._transport

    async def ask(self, op: Op, request: dict[str, Any], policy: Mapping[str, str]) -> Answer:
        """The reply as the caller would get it, with the round trip in ms."""
        backend = self.pool.backends[self.name]
        started = time.perf_counter()
        self._policy = policy
        try:
            payload = msgspec.json.encode(request) if self.passthrough else None
            timeout = backend.config.timeout_ms / 1000
            answer = await self.transport.send(op, self.name, payload, timeout)
            reply = caller_view(op, answer)
        except dialects.Unsupported as exc:
            return Answer(fail="unsupported", message=str(exc))
        except BackendTimeout as exc:
            return Answer(fail="timeout", message=str(exc))
        except UnusableReply as exc:  # compared as the caller would have got it
            reply = unusable_view(op, exc)
        except BackendError as exc:
            return Answer(fail="error", message=str(exc))
        return Answer(reply, latency_ms=(time.perf_counter() - started) * 1000)


def pool_for(loop: asyncio.AbstractEventLoop, ctx: zmq.Context[zmq.Socket[bytes]],
             endpoints: Mapping[str, tuple[str, str]], timeout_ms: int) -> BackendPool:
    """A pool of named endpoints ``{name: (endpoint, dialect)}`` with its own metrics."""
    return BackendPool(loop, ctx, {name: BackendConfig(dialect=_dialect(dialect),
                                                        endpoints=[ep],
                                                        timeout_ms=timeout_ms)
                                   for name, (ep, dialect) in endpoints.items()},
                       HealthSection(), Metrics())


def _dialect(name: str) -> Dialect:
    if name in dialects.names():
        return name
    raise ValueError(f"unknown dialect {name!r} (expected one of {', '.join(dialects.names())})")


async def wait_connected(sides: Sequence[Side], timeout_s: float) -> list[str]:
    """Wait until every side's backend is connected; the names still missing."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [s.name for s in sides if not s.pool.backends[s.name].connected]
        if not missing or time.monotonic() >= deadline:
            return missing
        await asyncio.sleep(0.02)


class Engine:
    """Compares answers and keeps the tally, the diff records and the latencies."""

    def __init__(self, rules: Rules, reference: str, candidate: str) -> None:
        self.rules = rules
        self.reference = reference
        self.candidate = candidate
        self.tally = Tally()
        self.records: list[dict[str, Any]] = []
        #: action -> [(reference ms, candidate ms)] for exchanges both answered.
        self.latencies: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.requests = 0
        self.wall_s = 0.0

    def judge(self, line: int, op: Op, ref: Answer, cand: Answer, twin: Answer | None = None,
              *, redacted: bool = False) -> Outcome:
        """Compare one exchange's answers and count the outcome."""
        action = op.kind.value
        if ref.fail == "unsupported" or cand.fail == "unsupported":
            return self._count(Outcome(line, action, "skipped", ref.message or cand.message),
                               op.raw)
        if ref.fail:
            return self._count(Outcome(line, action, "primary_error",
                                       f"{self.reference}: {ref.message}"), op.raw)
        if cand.fail:
            outcome = "shadow_timeout" if cand.fail == "timeout" else "shadow_error"
            return self._count(Outcome(line, action, outcome,
                                       f"{self.candidate}: {cand.message}"), op.raw)
        if ref.latency_ms is not None and cand.latency_ms is not None:
            self.latencies[action].append((ref.latency_ms, cand.latency_ms))
        cand_reply = redact(cand.reply) if redacted else cand.reply
        twin_reply: Any = None
        calibrated = twin is not None and not twin.fail
        if calibrated and twin is not None:
            twin_reply = redact(twin.reply) if redacted else twin.reply
        diffs, noise = judge(self.rules.for_action(action), ref.reply, cand_reply, twin_reply,
                             calibrated)
        for d in noise:
            self.tally.count_noise(action, generalize(d.path))
        if diffs:
            record = diff_record(op, self.reference, self.candidate, ref.reply, cand_reply,
                                 diffs, noise, twin_reply if calibrated else None)
            record["line"] = line
            self.records.append(record)
            self.tally.add(record)
            return self._count(Outcome(line, action, "mismatch",
                                       ", ".join(d["path"] for d in record["diffs"])), None)
        return self._count(Outcome(line, action, "match"), None)

    def unparsable(self, line: int, msg: dict[str, Any], why: str) -> Outcome:
        return self._count(Outcome(line, "unparsable", "skipped", why), msg)

    def _count(self, outcome: Outcome, msg: dict[str, Any] | None) -> Outcome:
        self.tally.count(outcome.action, outcome.outcome)
        if outcome.outcome not in ("match", "mismatch"):
            record = {"kind": "error", "ts": round(time.time(), 3), "action": outcome.action,
                      "outcome": outcome.outcome, "shadow": self.candidate, "request": msg,
                      "error": outcome.detail, "line": outcome.line}
            self.records.append(record)
            self.tally.add(record)
        return outcome

    # -- the report ------------------------------------------------------------------

    def latency(self) -> dict[str, Any]:
        """Latency ratio candidate / reference: overall (sums) and the median of the
        per-request ratios, per action and in total."""
        def summary(pairs: list[tuple[float, float]]) -> dict[str, Any]:
            ref = sum(p[0] for p in pairs)
            cand = sum(p[1] for p in pairs)
            ratios = [c / r for r, c in pairs if r > 0]
            return {"n": len(pairs), "reference_ms_p50": _p50([p[0] for p in pairs]),
                    "candidate_ms_p50": _p50([p[1] for p in pairs]),
                    "ratio": round(cand / ref, 3) if ref > 0 else None,
                    "ratio_p50": round(statistics.median(ratios), 3) if ratios else None}
        everything = [p for pairs in self.latencies.values() for p in pairs]
        return {"total": summary(everything),
                "actions": {a: summary(p) for a, p in sorted(self.latencies.items())}}

    def verdict(self, threshold: float) -> dict[str, Any]:
        total = self.tally.total()
        failed = sum(total.counts[o] for o in FAILED)
        rate = 100.0 * failed / total.attempted if total.attempted else 0.0
        return {"reference": self.reference, "candidate": self.candidate,
                # the parity run's names for the two sides, kept for its readers
                "primary": self.reference,
                "requests": self.requests, "attempted": total.attempted,
                "skipped": total.counts["skipped"], "failed": failed,
                "mismatch_rate_percent": round(rate, 3),
                "failure_rate_percent": round(rate, 3), "threshold_percent": threshold,
                "passed": rate <= threshold,
                "wall_s": round(self.wall_s, 3),
                "rate_per_s": round(self.requests / self.wall_s, 1) if self.wall_s else None}

    def write_log(self, path: str | Path) -> None:
        """The diff records and a final tally, readable by ``mmshim diffs --log``."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tally = self.tally
        counts = {a: dict(s.counts) for a, s in tally.actions.items()}
        with p.open("w", encoding="utf-8") as f:
            for record in self.records:
                f.write(dumps(record) + "\n")
            f.write(dumps({"kind": "tally", "ts": round(time.time(), 3), "counts": counts,
                           "noise": {a: dict(s.noise) for a, s in tally.actions.items()}})
                    + "\n")

    def print_report(self, *, title: str, name: str, threshold: float, as_json: bool,
                     top: int, out: TextIO, latency: bool = True) -> bool:
        """Print the report and the verdict; True when it passed."""
        verdict = self.verdict(threshold)
        if as_json:
            body = {**self.tally.as_json(top), "verdict": verdict}
            if latency:
                body["latency"] = self.latency()
            text = msgspec.json.format(msgspec.json.encode(body, enc_hook=str), indent=2)
            print(text.decode(), file=out)
            return bool(verdict["passed"])
        print(title, file=out)
        print(self.tally.format(top), file=out)
        if latency:
            lat = self.latency()
            rows = [("TOTAL", lat["total"]), *lat["actions"].items()]
            print("\nlatency, candidate / reference (sum ratio, median of ratios, p50 ms "
                  "reference -> candidate):", file=out)
            for action, s in rows:
                if s["n"]:
                    print(f"  {action:<18} {s['ratio']!s:>7} {s['ratio_p50']!s:>7}   "
                          f"{s['reference_ms_p50']} -> {s['candidate_ms_p50']} ms "
                          f"(n={s['n']})", file=out)
            if verdict["rate_per_s"] is not None:
                print(f"replayed {self.requests} requests in {verdict['wall_s']} s "
                      f"({verdict['rate_per_s']}/s)", file=out)
        print(f"\n{name} {'PASSED' if verdict['passed'] else 'FAILED'}: {verdict['failed']} "
              f"of {verdict['attempted']} compared requests differ or failed "
              f"({verdict['mismatch_rate_percent']:.1f}%, threshold {threshold:g}%); "
              f"{verdict['skipped']} skipped", file=out)
        return bool(verdict["passed"])


def _p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


# -- scheduling ---------------------------------------------------------------------------

def chain_keys(op: Op) -> list[tuple[str, bool]]:
    """The orders an exchange belongs to, each as (key, writes): its conversation (every
    turn writes: strictly in order), its model (load, unload and model access write;
    generates read) and the backend's state (load, unload, model access and clears
    write; status, loaded models, health and list models read)."""
    keys = []
    if op.conversation_id is not None:
        keys.append((f"conversation:{op.conversation_id}", True))
    if op.model_id:
        keys.append((f"model:{op.model_id}", op.kind in CHANGING))
    if op.kind in CHANGING or op.kind in STATEFUL:
        keys.append(("state", op.kind in CHANGING))
    return keys


@dataclass
class _Chain:
    """One order: the last writer, and the readers started since it."""

    writer: asyncio.Future[None] | None = None
    readers: list[asyncio.Future[None]] = field(default_factory=list)


async def schedule(items: Sequence[tuple[Exchange, Op | None]],
                   run_one: Callable[[Exchange, Op | None], Awaitable[None]], *,
                   ordered: bool, speed: float, max_inflight: int = 64) -> None:
    """Run ``run_one`` for every item: one at a time when ``ordered``; else paced by the
    recorded times over ``speed`` (0: unpaced), at most ``max_inflight`` at once. Per
    chain key (``chain_keys``) a writer starts after everything before it on that key
    finished; a reader after the last writer before it (readers overlap)."""
    if ordered:
        for exchange, op in items:
            await run_one(exchange, op)
        return
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(max(1, max_inflight))
    chains: dict[str, _Chain] = defaultdict(_Chain)
    tasks: set[asyncio.Task[None]] = set()
    start = loop.time()
    first_ts = next((e.ts for e, _ in items if e.ts is not None), None)

    async def one(exchange: Exchange, op: Op | None, after: list[asyncio.Future[None]],
                  done: asyncio.Future[None]) -> None:
        try:
            if after:
                await asyncio.gather(*after)
            await run_one(exchange, op)
        finally:
            done.set_result(None)
            slots.release()

    for exchange, op in items:
        if speed > 0 and first_ts is not None and exchange.ts is not None:
            delay = start + (exchange.ts - first_ts) / speed - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await slots.acquire()
        done: asyncio.Future[None] = loop.create_future()
        after: list[asyncio.Future[None]] = []
        for key, writes in chain_keys(op) if op is not None else []:
            chain = chains[key]
            if chain.writer is not None and not chain.writer.done():
                after.append(chain.writer)
            if writes:
                after += [r for r in chain.readers if not r.done()]
                chain.writer, chain.readers = done, []
            else:
                chain.readers = [r for r in chain.readers if not r.done()]
                chain.readers.append(done)
        task = loop.create_task(one(exchange, op, after, done))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*tasks)


async def replay(exchanges: Sequence[Exchange], engine: Engine, *, policy: Mapping[str, str],
                 candidate: Side, reference: Side | None = None, twin: Side | None = None,
                 ordered: bool = False, speed: float = 0.0, max_inflight: int = 64,
                 out: TextIO | None = None, verbose: bool = False) -> Engine:
    """Replay ``exchanges`` to ``candidate`` and judge each against the recorded reply
    (or ``reference``'s live one); returns ``engine`` with its tally filled in."""
    items: list[tuple[Exchange, Op | None]] = []
    for exchange in exchanges:
        request = unredact(exchange.request) if exchange.redacted else exchange.request
        try:
            op: Op | None = dialects.parse_request(request, policy)
        except dialects.BadRequest as exc:
            engine.unparsable(exchange.line, exchange.request, str(exc))
            op = None
        if op is not None:
            items.append((Exchange(exchange.line, request, exchange.reply, exchange.ts,
                                   exchange.latency_ms, exchange.backend, exchange.redacted,
                                   exchange.extra), op))
    engine.requests = len(exchanges)

    async def run_one(exchange: Exchange, op: Op | None) -> None:
        assert op is not None
        asks = [candidate.ask(op, exchange.request, policy)]
        if reference is not None:
            asks.append(reference.ask(op, exchange.request, policy))
        if twin is not None:
            asks.append(twin.ask(op, exchange.request, policy))
        answers = await asyncio.gather(*asks)
        cand = answers[0]
        if reference is not None:
            ref = answers[1]
        elif exchange.reply is None:
            ref = Answer(fail="unsupported", message="no reply recorded (give --reference)")
        else:
            ref = Answer(exchange.reply, latency_ms=exchange.latency_ms)
        outcome = engine.judge(exchange.line, op, ref, cand,
                               answers[-1] if twin is not None else None,
                               redacted=exchange.redacted and reference is None)
        if verbose and out is not None:
            print(f"line {outcome.line:>5} {outcome.action:<20} {outcome.outcome:<15} "
                  f"{outcome.detail[:100]}", file=out)

    started = time.perf_counter()
    await schedule([(e, o) for e, o in items], run_one, ordered=ordered, speed=speed,
                   max_inflight=max_inflight)
    engine.wall_s = time.perf_counter() - started
    return engine


# -- mmshim replay ------------------------------------------------------------------------

@dataclass
class ReplayOptions:
    """``mmshim replay``'s command line."""

    capture: list[str]
    to: str
    dialect: str = "mms"
    reference: str = ""
    reference_dialect: str = "mma"
    calibrate: str = ""
    calibrate_dialect: str = "mma"
    speed: str = "max"
    ordered: bool = False
    threshold: float = 0.0
    timeout_ms: int = 4500
    max_inflight: int = 64
    connect_timeout_s: float = 5.0
    as_json: bool = False
    log_path: str = ""
    top: int = 5
    verbose: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


async def _run_replay(cfg: ShimConfig, opts: ReplayOptions, exchanges: list[Exchange],
                      speed: float, out: TextIO) -> Engine:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    loop = asyncio.get_running_loop()
    endpoints = {"candidate": (opts.to, opts.dialect)}
    if opts.reference:
        endpoints["reference"] = (opts.reference, opts.reference_dialect)
    if opts.calibrate:
        endpoints["twin"] = (opts.calibrate, opts.calibrate_dialect)
    pool = pool_for(loop, ctx, endpoints, opts.timeout_ms)
    catalogue = load_catalogue(cfg.models_file)  # filled in as the shim fills it
    sides = {name: Side(pool, name, catalogue=catalogue) for name in endpoints}
    try:
        missing = await wait_connected(list(sides.values()), opts.connect_timeout_s)
        if missing:
            raise ConnectionError("cannot reach " + ", ".join(
                f"{m} ({endpoints[m][0]})" for m in missing))
        engine = Engine(Rules(cfg.shadow.compare, parity=bool(opts.reference)),
                        "reference" if opts.reference else "recorded", "candidate")
        return await replay(exchanges, engine, policy=cfg.policy, candidate=sides["candidate"],
                            reference=sides.get("reference"), twin=sides.get("twin"),
                            ordered=opts.ordered, speed=speed,
                            max_inflight=opts.max_inflight, out=out, verbose=opts.verbose)
    finally:
        pool.close()
        ctx.destroy(linger=0)


def main(cfg: ShimConfig, opts: ReplayOptions, out: TextIO = sys.stdout) -> int:
    """``mmshim replay``: replay, print the report and the verdict; the exit code."""
    try:
        speed = parse_speed(opts.speed)
    except ValueError as exc:
        print(f"mmshim replay: {exc}", file=sys.stderr)
        return BAD_INPUT
    try:
        exchanges = read_capture(opts.capture)
    except (OSError, CaptureError) as exc:
        print(f"mmshim replay: {exc}", file=sys.stderr)
        return BAD_INPUT
    if not exchanges:
        print(f"mmshim replay: {', '.join(opts.capture)}: no exchanges", file=sys.stderr)
        return BAD_INPUT
    try:
        engine = asyncio.run(_run_replay(cfg, opts, exchanges, speed, out))
    except ConnectionError as exc:
        print(f"mmshim replay: {exc}", file=sys.stderr)
        return UNREACHABLE
    if opts.log_path:
        engine.write_log(opts.log_path)
    against = f"live reference {opts.reference}" if opts.reference else "the recorded replies"
    title = (f"replay: {len(exchanges)} exchanges from {', '.join(opts.capture)} to "
             f"{opts.to} ({opts.dialect}), compared with {against}"
             f"{', ordered' if opts.ordered else ''}, speed {opts.speed}")
    passed = engine.print_report(title=title, name="replay", threshold=opts.threshold,
                                 as_json=opts.as_json, top=opts.top, out=out)
    return PASS if passed else FAIL


__all__ = ["Answer", "Engine", "Outcome", "ReplayOptions", "Side", "chain_keys", "main",
           "parse_speed", "pool_for", "replay", "schedule", "wait_connected"]

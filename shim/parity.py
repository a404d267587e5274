"""The offline parity run: replay a corpus of legacy requests to both backends directly,
compare their answers as a client would have seen them, and gate a cutover on the result.

Each request (one JSON object per line; blank lines and ``#`` comments are skipped) goes
to the reference backend (``routing.safe_backend``) and to the candidate (the first other
backend) at the same time, each in its own dialect; the next request goes once both
have answered, so a corpus may load a model, use it, and unload it. Both replies are
rendered in the caller's dialect through the same translation the shim uses, and
compared with shim.compare's rules plus PARITY_RULES (both backends got the same loads, so
what is loaded must agree). State-changing requests are replayed too: this runs against
backends that serve no one else.

The report is the one ``mmshim diffs`` prints. The run fails (exit 1) when the share of
requests that mismatched or that the candidate could not answer exceeds the threshold;
requests the candidate has no equivalent for (e.g. clear_conversation on MMS, which the
shim answers without it) are reported as skipped and do not count.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import zmq

from shim import dialects
from shim.compare import Rules, generalize
from shim.config import BackendConfig, ShimConfig
from shim.dialects import Op
from shim.difflog import Tally, dumps
from shim.metrics import Metrics
from shim.pool import BackendError, BackendPool, BackendTimeout
from shim.shadow import ReplyError, caller_reply, diff_record, judge, requests_for, send_all

#: Exit codes: 0 within the threshold, 1 above it, 2 unusable input, 3 backends unreachable.
PASS, FAIL, BAD_INPUT, UNREACHABLE = 0, 1, 2, 3


class CorpusError(ValueError):
    """A corpus line that is not a JSON object; the message names the line."""


def read_corpus(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, request) for every request in a JSON-lines corpus."""
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                msg = json.loads(text)
            except ValueError as exc:
                raise CorpusError(f"{path}:{number}: not JSON: {exc}") from None
            if not isinstance(msg, dict):
                raise CorpusError(f"{path}:{number}: not a JSON object")
            yield number, msg


@dataclass
class Outcome:
    """What happened to one corpus request."""

    line: int
    action: str
    outcome: str  # match, mismatch, shadow_error, shadow_timeout, primary_error, skipped
    detail: str = ""


class ParityRun:
    """Both backends' pools, the rules, and the running tally."""

    def __init__(self, cfg: ShimConfig, ctx: zmq.Context[zmq.Socket[bytes]],
                 loop: asyncio.AbstractEventLoop, *, primary: str = "",
                 candidate: str = "") -> None:
        self.cfg = cfg
        self.primary = primary or cfg.routing.safe_backend or next(iter(cfg.backends))
        others = [n for n in cfg.backends if n != self.primary]
        self.candidate = candidate or (others[0] if others else "")
        if self.primary not in cfg.backends or self.candidate not in cfg.backends:
            raise ValueError(f"parity needs two backends (primary {self.primary!r}, "
                             f"candidate {self.candidate!r}; configured: "
                             f"{', '.join(cfg.backends)})")
        self.pool = BackendPool(loop, ctx, cfg.backends, cfg.health, Metrics())
        twin = cfg.backends[self.primary].secondary
        self.twins: BackendPool | None = None
        if twin:
            b = cfg.backends[self.primary]
            self.twins = BackendPool(loop, ctx, {self.primary: BackendConfig(
                dialect=b.dialect, endpoints=[twin], timeout_ms=b.timeout_ms)}, cfg.health,
                Metrics())
        self.rules = Rules(cfg.shadow.compare, parity=True)
        self.tally = Tally()
        self.records: list[dict[str, Any]] = []

    async def connected(self, timeout_s: float) -> list[str]:
        """Wait for both backends; the names of those still not connected."""
        deadline = time.monotonic() + timeout_s
        names = [self.primary, self.candidate]
        while time.monotonic() < deadline:
            missing = [n for n in names if not self.pool.backends[n].connected]
            if not missing:
                return []
            await asyncio.sleep(0.02)
        return [n for n in names if not self.pool.backends[n].connected]

    async def _ask(self, pool: BackendPool, name: str, op: Op) -> Any:
        """The backend's reply to ``op`` as the caller would get it; raises Unsupported,
        BackendError or ReplyError."""
        dialect = pool.backends[name].dialect
        frames = requests_for(op, dialect, None, self.cfg.policy)
        timeout = pool.backends[name].config.timeout_ms / 1000
        raw = list(await asyncio.gather(*send_all(pool, name, frames, timeout)))
        return caller_reply(op, dialect, raw)

    async def _try(self, pool: BackendPool, name: str, op: Op) -> tuple[Any, str, str]:
        """(reply, "", "") or (None, outcome kind, message)."""
        try:
            return await self._ask(pool, name, op), "", ""
        except dialects.Unsupported as exc:
            return None, "unsupported", str(exc)
        except BackendTimeout as exc:
            return None, "timeout", str(exc)
        except (BackendError, ReplyError) as exc:
            return None, "error", str(exc)

    async def one(self, line: int, msg: dict[str, Any]) -> Outcome:
        """Replay one request to both backends and record the outcome."""
        try:
            op = dialects.parse_request(msg, self.cfg.policy)
        except dialects.BadRequest as exc:
            return self._count(Outcome(line, "unparsable", "skipped", str(exc)), msg)
        action = op.kind.value
        asks = [self._try(self.pool, self.primary, op), self._try(self.pool, self.candidate, op)]
        if self.twins is not None:
            asks.append(self._try(self.twins, self.primary, op))
        results = await asyncio.gather(*asks)
        (ref, ref_fail, ref_msg), (cand, cand_fail, cand_msg) = results[0], results[1]
        if ref_fail == "unsupported" or cand_fail == "unsupported":
            return self._count(Outcome(line, action, "skipped", ref_msg or cand_msg), msg)
        if ref_fail:
            return self._count(Outcome(line, action, "primary_error",
                                       f"{self.primary}: {ref_msg}"), msg)
        if cand_fail:
            outcome = "shadow_timeout" if cand_fail == "timeout" else "shadow_error"
            return self._count(Outcome(line, action, outcome, f"{self.candidate}: {cand_msg}"),
                               msg)
        twin: Any = None
        calibrated = False
        if len(results) > 2 and not results[2][1]:
            twin, calibrated = results[2][0], True
        diffs, noise = judge(self.rules.for_action(action), ref, cand, twin, calibrated)
        for d in noise:
            self.tally.count_noise(action, generalize(d.path))
        if diffs:
            record = diff_record(op, self.primary, self.candidate, ref, cand, diffs, noise,
                                 twin if calibrated else None)
            record["line"] = line
            self.records.append(record)
            self.tally.add(record)
            return self._count(Outcome(line, action, "mismatch",
                                       ", ".join(d["path"] for d in record["diffs"])), msg)
        return self._count(Outcome(line, action, "match"), msg)

    def _count(self, outcome: Outcome, msg: dict[str, Any]) -> Outcome:
        self.tally.count(outcome.action, outcome.outcome)
        if outcome.outcome not in ("match", "mismatch"):
            record = {"kind": "error", "ts": round(time.time(), 3), "action": outcome.action,
                      "outcome": outcome.outcome, "shadow": self.candidate, "request": msg,
                      "error": outcome.detail, "line": outcome.line}
            self.records.append(record)
            self.tally.add(record)
        return outcome

    def close(self) -> None:
        self.pool.close()
        if self.twins is not None:
            self.twins.close()


async def run(cfg: ShimConfig, corpus: list[tuple[int, dict[str, Any]]], *,
              connect_timeout_s: float = 5.0, out: TextIO | None = None,
              verbose: bool = False) -> ParityRun:
    """Replay ``corpus``; returns the finished run (its ``tally`` holds the report)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    run_ = ParityRun(cfg, ctx, asyncio.get_running_loop())
    try:
        missing = await run_.connected(connect_timeout_s)
        if missing:
            raise ConnectionError(f"cannot reach {', '.join(missing)} "
                                  f"({', '.join(cfg.backends[m].endpoints[0] for m in missing)})")
        for line, msg in corpus:
            outcome = await run_.one(line, msg)
            if verbose and out is not None:
                print(f"line {line:>4} {outcome.action:<20} {outcome.outcome:<15} "
                      f"{outcome.detail[:100]}", file=out)
        return run_
    finally:
        run_.close()
        ctx.destroy(linger=0)


def main(cfg: ShimConfig, requests: str | Path, *, threshold: float, as_json: bool = False,
         log_path: str = "", top: int = 5, verbose: bool = False,
         out: TextIO = sys.stdout) -> int:
    """``mmshim parity``: run, print the report and the verdict; the exit code."""
    try:
        corpus = list(read_corpus(requests))
    except (OSError, CorpusError) as exc:
        print(f"mmshim parity: {exc}", file=sys.stderr)
        return BAD_INPUT
    if not corpus:
        print(f"mmshim parity: {requests}: no requests", file=sys.stderr)
        return BAD_INPUT
    try:
        finished = asyncio.run(run(cfg, corpus, out=out, verbose=verbose))
    except (ConnectionError, ValueError) as exc:
        print(f"mmshim parity: {exc}", file=sys.stderr)
        return UNREACHABLE
    tally = finished.tally
    if log_path:
        path = Path(log_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        counts = {a: dict(s.counts) for a, s in tally.actions.items()}
        with path.open("w", encoding="utf-8") as f:
            for record in finished.records:
                f.write(dumps(record) + "\n")
            f.write(dumps({"kind": "tally", "ts": round(time.time(), 3), "counts": counts,
                           "noise": {a: dict(s.noise) for a, s in tally.actions.items()}})
                    + "\n")
    total = tally.total()
    failed = sum(total.counts[o] for o in ("mismatch", "shadow_error", "shadow_timeout",
                                           "primary_error"))
    rate = 100.0 * failed / total.attempted if total.attempted else 0.0
    passed = rate <= threshold
    verdict = {"primary": finished.primary, "candidate": finished.candidate,
               "requests": len(corpus), "attempted": total.attempted,
               "skipped": total.counts["skipped"], "failed": failed,
               "failure_rate_percent": round(rate, 3), "threshold_percent": threshold,
               "passed": passed}
    if as_json:
        print(json.dumps({**tally.as_json(top), "verdict": verdict}, indent=2, default=str),
              file=out)
    else:
        print(f"parity: {finished.primary} (reference) vs {finished.candidate} (candidate), "
              f"{len(corpus)} requests from {requests}", file=out)
        print(tally.format(top), file=out)
        print(f"\nparity {'PASSED' if passed else 'FAILED'}: {failed} of {total.attempted} "
              f"compared requests differ or failed ({rate:.1f}%, threshold {threshold:g}%); "
              f"{total.counts['skipped']} skipped", file=out)
    return PASS if passed else FAIL


__all__ = ["ParityRun", "main", "read_corpus", "run"]

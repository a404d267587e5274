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

This is the replay engine (shim.replay) with a live reference instead of recorded replies
and the corpus read as exchanges (shim.capture.from_corpus): ``mmshim replay --ordered
--reference MMA --to MMS`` of a corpus converted with ``mmshim capture convert`` is the
same run.

The report is the one ``mmshim diffs`` prints. The run fails (exit 1) when the share of
requests that mismatched or that the candidate could not answer exceeds the threshold;
requests the candidate has no equivalent for (e.g. clear_conversation on MMS, which the
shim answers without it) are reported as skipped and do not count.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any, TextIO

import zmq

from shim.capture import Exchange, from_corpus, read_corpus
from shim.catalogue import load_catalogue
from shim.compare import Rules
from shim.config import BackendConfig, ShimConfig
from shim.errors import CaptureError
from shim.metrics import Metrics
from shim.pool import BackendPool
from shim.replay import BAD_INPUT, FAIL, PASS, UNREACHABLE, Engine, Side, replay, wait_connected

#: A corpus line that is not a JSON object (the message names the line).
CorpusError = CaptureError


class ParityRun:
    """Both backends' pools (and the reference's twin, if configured) as replay sides."""

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
        catalogue = load_catalogue(cfg.models_file)  # filled in as the shim fills it
        self.reference = Side(self.pool, self.primary, passthrough=False, catalogue=catalogue)
        self.candidate_side = Side(self.pool, self.candidate, passthrough=False,
                                   catalogue=catalogue)
        self.twin = Side(self.twins, self.primary, passthrough=False, catalogue=catalogue) \
            if self.twins is not None else None
        self.engine = Engine(Rules(cfg.shadow.compare, parity=True), self.primary,
                             self.candidate)

    @property
    def tally(self) -> Any:
        return self.engine.tally

    @property
    def records(self) -> list[dict[str, Any]]:
        return self.engine.records

    async def connected(self, timeout_s: float) -> list[str]:
        """Wait for both backends; the names of those still not connected."""
        return await wait_connected([self.reference, self.candidate_side], timeout_s)

    def close(self) -> None:
        self.pool.close()
        if self.twins is not None:
            self.twins.close()


async def run(cfg: ShimConfig, corpus: list[Exchange], *, connect_timeout_s: float = 5.0,
              out: TextIO | None = None, verbose: bool = False) -> ParityRun:
    """Replay ``corpus`` in order; returns the finished run (``engine`` holds the report)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    run_ = ParityRun(cfg, ctx, asyncio.get_running_loop())
    try:
        missing = await run_.connected(connect_timeout_s)
        if missing:
            raise ConnectionError(f"cannot reach {', '.join(missing)} "
                                  f"({', '.join(cfg.backends[m].endpoints[0] for m in missing)})")
        await replay(corpus, run_.engine, policy=cfg.policy, candidate=run_.candidate_side,
                     reference=run_.reference, twin=run_.twin, ordered=True, out=out,
                     verbose=verbose)
        return run_
    finally:
        run_.close()
        ctx.destroy(linger=0)


def main(cfg: ShimConfig, requests: str | Path, *, threshold: float, as_json: bool = False,
         log_path: str = "", top: int = 5, verbose: bool = False,
         out: TextIO = sys.stdout) -> int:
    """``mmshim parity``: run, print the report and the verdict; the exit code."""
    try:
        corpus = from_corpus(requests)
    except (OSError, CaptureError) as exc:
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
    engine = finished.engine
    if log_path:
        engine.write_log(log_path)
    title = (f"parity: {finished.primary} (reference) vs {finished.candidate} (candidate), "
             f"{len(corpus)} requests from {requests}")
    passed = engine.print_report(title=title, name="parity", threshold=threshold,
                                 as_json=as_json, top=top, out=out, latency=False)
    return PASS if passed else FAIL


__all__ = ["CorpusError", "ParityRun", "main", "read_corpus", "run"]

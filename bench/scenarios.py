"""The scenarios of one benchmark run, measured in alternating rounds.

Every process under test is started once (on free loopback ports) and stays up for the
whole run; each round then visits every scenario in turn, in a rotated order, so slow
drift of a shared, noisy machine lands on every scenario alike. Each visit has two
phases: pipelined DEALER clients (throughput, latency under load) and one lockstep REQ
client (round-trip latency). Figures are the median over rounds; ratios to ``zmq.proxy``
are taken within a round first, then their median.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from bench import loadgen
from bench.procs import Proc, ProcGroup, free_port, rss_kb
from bench.shimcfg import ShimUnderTest, shim_config, start_shim, wait_serving


@dataclass
class Settings:
    """How long and how hard each phase pushes."""

    rounds: int = 5
    dealer_s: float = 1.2
    req_s: float = 3.0  # all scenarios' REQ clients together, taking turns
    sockets: int = 4
    window: int = 16
    max_requests: int = 200_000
    req_max: int = 50_000
    rss_s: float = 10.0  # the default run's RSS-slope phase
    rss_max: int = 150_000


@dataclass
class Scenario:
    """One way of reaching an echo: directly, through zmq.proxy, through a shim."""

    key: str
    label: str
    endpoint: str
    pid: int | None  # the process under test (CPU, RSS)
    reference: str  # the zmq.proxy scenario its ratios are taken against
    proc: Proc | None = None
    shim: ShimUnderTest | None = None
    shadow_counter: str = ""  # endpoint of the shadow backend, to count mirrored requests
    note: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    served: int = 0  # every request this scenario's process saw (warm-ups included)
    failed: str = ""

    @property
    def is_shim(self) -> bool:
        return self.shim is not None


E = "tcp://127.0.0.1:{}".format


class Bench:
    """Starts the processes, runs the rounds, keeps the raw results."""

    def __init__(self, group: ProcGroup, work: Path, settings: Settings,
                 log: Callable[[str], None]) -> None:
        self.group = group
        self.work = work
        self.s = settings
        self.log = log
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.payload = loadgen.generate_request(200)
        self.scenarios: list[Scenario] = []
        self.rss: dict[str, Any] = {}

    # -- setup -----------------------------------------------------------------------

    def start(self, only: set[str] | None = None) -> None:
        p = {k: free_port() for k in ("echo", "echo2", "rep", "rep2", "mma", "mms",
                                      "mms_shadow", "stall", "zp", "zp_rep")}
        echo = self.group.python(
            "echo-c", "bench.echo", "--serve", f"echo-router:{p['echo']}",
            "--serve", f"echo-router:{p['echo2']}", "--serve", f"echo-rep:{p['rep']}",
            "--serve", f"echo-rep:{p['rep2']}", ready_line=True)
        # Python backends each in a process of their own: no GIL shared between them.
        mma = self.group.python("echo-mma", "bench.echo", "--serve", f"mma:{p['mma']}",
                                ready_line=True)
        mms = self.group.python("echo-mms", "bench.echo", "--serve", f"mms:{p['mms']}",
                                ready_line=True)
        mms_shadow = self.group.python("echo-mms-shadow", "bench.echo",
                                       "--serve", f"mms:{p['mms_shadow']}", ready_line=True)
        stall = self.group.python("echo-stall", "bench.echo", "--serve", f"stall:{p['stall']}",
                                  ready_line=True)
        zp = self.group.python("zmq-proxy", "bench.echo",
                               "--serve", f"proxy:{p['zp']}:{E(p['echo'])}", ready_line=True)
        zp_rep = self.group.python("zmq-proxy-rep", "bench.echo",
                                   "--serve", f"proxy:{p['zp_rep']}:{E(p['rep'])}",
                                   ready_line=True)
        for proc in (echo, mma, mms, mms_shadow, stall, zp, zp_rep):
            proc.wait_ready()

        direct = Scenario("direct", "direct (ROUTER echo)", E(p["echo"]), echo.pid,
                          "zmq.proxy", proc=echo, note="CPU/RSS: the echo process")
        zproxy = Scenario("zmq.proxy", "zmq.proxy -> ROUTER echo", E(p["zp"]), zp.pid,
                          "zmq.proxy", proc=zp)
        direct_rep = Scenario("direct-rep", "direct (REP echo)", E(p["rep"]), echo.pid,
                              "zmq.proxy-rep", proc=echo, note="CPU/RSS: the echo process")
        zproxy_rep = Scenario("zmq.proxy-rep", "zmq.proxy -> REP echo", E(p["zp_rep"]),
                              zp_rep.pid, "zmq.proxy-rep", proc=zp_rep)
        canned = {"mma": ("mma", E(p["mma"]))}
        shadow_cfg = {"mode": "shadow", "shadow": {"percent": 100},
                      "actions": {"generate": {"mirror": "always"}}}
        # key, label, backends, weights, config extras, reference, shadow backend to count
        shims: list[tuple[str, str, dict[str, tuple[str, str]], dict[str, float],
                          dict[str, Any], str, str]] = [
            ("shim-split", "shim split 90/10, mma+mma (bytes passed)",
             {"mma": ("mma", E(p["echo"])), "mma2": ("mma", E(p["echo2"]))},
             {"mma": 90, "mma2": 10}, {}, "zmq.proxy", ""),
            ("shim-xlate", "shim split 90/10, mma+MMS (10% translated)",
             {"mma": ("mma", E(p["echo"])), "mms": ("mms", E(p["mms"]))},
             {"mma": 90, "mms": 10}, {}, "zmq.proxy", ""),
            ("shim-noshadow", "shim split 100% -> canned MMA (no shadow)",
             {**canned, "mms": ("mms", E(p["mms_shadow"]))}, {"mma": 100, "mms": 0}, {},
             "zmq.proxy", ""),
            ("shim-shadow", "shim shadow, 100% mirrored -> MMS",
             {**canned, "mms": ("mms", E(p["mms_shadow"]))}, {"mma": 100, "mms": 0},
             shadow_cfg, "zmq.proxy", E(p["mms_shadow"])),
            ("shim-stalled", "shim shadow, 100% -> STALLED backend",
             {**canned, "mms": ("mms", E(p["stall"]))}, {"mma": 100, "mms": 0},
             shadow_cfg, "zmq.proxy", E(p["stall"])),
            ("shim-split-rep", "shim split 90/10 -> two REP echoes",
             {"mma": ("mma", E(p["rep"])), "mma2": ("mma", E(p["rep2"]))},
             {"mma": 90, "mma2": 10}, {}, "zmq.proxy-rep", ""),
        ]
        wanted = [spec for spec in shims if not only or spec[0] in only]
        shim_scenarios: list[Scenario] = []
        for key, label, backends, weights, extras, ref, counter in wanted:
            cfg = shim_config(self.work, key, backends, weights, mode=extras.get("mode", "split"),
                              shadow=extras.get("shadow"), actions=extras.get("actions"))
            shim = start_shim(self.group, self.work, key, cfg)
            shim_scenarios.append(Scenario(key, label, shim.endpoint, shim.pid, ref,
                                           proc=shim.proc, shim=shim, shadow_counter=counter))
        for sc in shim_scenarios:  # all start together; then wait for each
            assert sc.shim is not None
            try:
                wait_serving(self.ctx, sc.shim, self.payload, timeout_s=30.0)
            except RuntimeError as exc:
                sc.failed = str(exc)
                self.log(f"!! {sc.key} did not start: {exc}")
        listed = [direct, zproxy, *[s for s in shim_scenarios if s.reference == "zmq.proxy"]]
        rep = [s for s in shim_scenarios if s.reference == "zmq.proxy-rep"]
        if rep or not only or {"direct-rep", "zmq.proxy-rep"} & only:
            listed += [direct_rep, zproxy_rep, *rep]
        self.scenarios = listed

    # -- rounds ----------------------------------------------------------------------

    def run_rounds(self) -> None:
        """Each round: every scenario's pipelined phase in turn (rotated order), then one
        lockstep phase in which the REQ clients of all scenarios take turns."""
        for r in range(self.s.rounds):
            live = [s for s in self.scenarios if not s.failed]
            for sc in live:
                if sc.proc is not None and not sc.proc.alive():
                    sc.failed = f"process exited:\n{sc.proc.log_tail()}"
            live = [s for s in live if not s.failed]
            if not live:
                return
            k = r % len(live)
            order = live[k:] + live[:k]
            t0 = time.monotonic()
            visits = {sc.key: self.visit(sc) for sc in order}
            reqs = loadgen.lockstep_interleaved(
                self.ctx, {sc.key: sc.endpoint for sc in order}, self.payload,
                duration_s=self.s.req_s, max_cycles=self.s.req_max)
            for sc in live:
                req = reqs[sc.key]
                sc.served += req.sent + 20
                visits[sc.key]["req"] = req.summary()
                sc.rounds.append(visits[sc.key])
                self.log(f"  {sc.key:15s} {visits[sc.key]['dealer']['rate']:9.0f} req/s  "
                         f"cpu {visits[sc.key]['dealer'].get('cpu_us_per_req') or 0:5.1f} us/req"
                         f"  | REQ p50 {req.summary()['p50_us']:6.0f} us "
                         f"p99 {req.summary()['p99_us']:7.0f} us"
                         + (f"  errors {req.errors} lost {req.lost}"
                            if req.errors + req.lost else ""))
            self.log(f"round {r + 1}/{self.s.rounds} done in {time.monotonic() - t0:.1f} s")

    def visit(self, sc: Scenario) -> dict[str, Any]:
        """The pipelined phase of one scenario."""
        s = self.s
        warm = 100
        dealer = loadgen.pipelined(self.ctx, sc.endpoint, self.payload, sockets=s.sockets,
                                   window=s.window, max_requests=s.max_requests,
                                   duration_s=s.dealer_s, warmup=warm, watch_pid=sc.pid)
        sc.served += dealer.sent + s.sockets * warm
        if dealer.errors or dealer.lost:
            self.log(f"  {sc.key}: pipelined errors {dealer.errors} lost {dealer.lost}")
        return {"dealer": dealer.summary(), "rss_kb": rss_kb(sc.pid) if sc.pid else None}

    # -- shadow accounting -------------------------------------------------------------

    def shadow_counts(self) -> None:
        for sc in self.scenarios:
            if sc.shadow_counter:
                n = loadgen.count_received(self.ctx, sc.shadow_counter)
                sc.note = _shadow_note(n, sc.served)
            if sc.shim is not None:
                share = _core_share(sc.shim.metrics_text())
                if share:
                    sc.note = "; ".join(x for x in (sc.note, share) if x)

    # -- RSS --------------------------------------------------------------------------

    def rss_phase(self, key: str, *, duration_s: float, max_requests: int,
                  chunk_s: float = 0.5, progress: bool = False) -> dict[str, Any]:
        """Drive one shim with pipelined load and sample its RSS between chunks."""
        sc = next((s for s in self.scenarios if s.key == key and not s.failed), None)
        if sc is None or sc.pid is None:
            return {"skipped": f"scenario {key} is not running"}
        samples: list[tuple[int, int]] = []  # (requests served in this phase, RSS kB)
        done = 0
        t0 = time.monotonic()
        errors = lost = 0
        last_print = t0
        while done < max_requests and time.monotonic() - t0 < duration_s:
            r = loadgen.pipelined(self.ctx, sc.endpoint, self.payload, sockets=self.s.sockets,
                                  window=self.s.window, max_requests=max_requests - done,
                                  duration_s=chunk_s, warmup=0 if samples else 500)
            done += r.sent
            errors += r.errors
            lost += r.lost
            samples.append((done, rss_kb(sc.pid)))
            if progress and time.monotonic() - last_print > 10:
                last_print = time.monotonic()
                self.log(f"  rss: {done:,} requests, RSS {samples[-1][1] / 1024:.1f} MB, "
                         f"{time.monotonic() - t0:.0f} s")
        sc.served += done
        elapsed = time.monotonic() - t0
        return {"scenario": key, "requests": done, "elapsed_s": round(elapsed, 1),
                "errors": errors, "lost": lost, "samples": samples,
                **rss_growth(samples)}

    def close(self) -> None:
        self.ctx.destroy(linger=0)


def _core_share(metrics: str) -> str:
    """How much of a shim's traffic the compiled core (shim.fastpath) carried."""
    def total(name: str, suffix: str = "") -> float:
        return sum(float(line.rpartition(" ")[2]) for line in metrics.splitlines()
                   if line.startswith(name) and line[len(name):len(name) + 1] in "{ "
                   and suffix in line)

    requests = total("shim_frontend_total", 'kind="requests"')
    if not requests:
        return ""
    fast = total("shim_fastpath_requests_total")
    return f"compiled core carried {fast / requests:.0%} of {requests:,.0f} requests"


def _shadow_note(received: int | None, served: int) -> str:
    if received is None:
        return "shadow backend did not answer the count query"
    if received == 0:
        return "SHADOW NOT ACTIVE: 0 mirrored requests reached the shadow backend"
    share = received / served if served else 0.0
    shed = (" - the rest shed: a backend that never answers holds shadow.max_inflight "
            "requests until they time out") if share < 0.5 else ""
    return (f"shadow backend received {received:,} mirrored requests "
            f"({share:.1%} of those sent){shed}")


def rss_growth(samples: list[tuple[int, int]]) -> dict[str, Any]:
    """Growth between the first and last sample, and a least-squares slope per request."""
    if len(samples) < 3:
        return {"growth_kb": None, "slope_kb_per_1m": None}
    steady = samples[1:]  # the first chunk carries the warm-up
    n0, r0 = steady[0]
    n1, r1 = steady[-1]
    xs = [x for x, _ in steady]
    ys = [y for _, y in steady]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return {"rss_start_kb": r0, "rss_end_kb": r1, "growth_kb": r1 - r0,
            "over_requests": n1 - n0, "slope_kb_per_1m": slope * 1_000_000,
            "rss_max_kb": max(ys)}


def median(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)

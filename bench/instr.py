"""``python -m bench.instr``: instructions per request of the shim and of ``zmq.proxy``,
counted by callgrind (issue 17's "instruction counts per request before/after").

Wall-clock and CPU-time figures move with the load on a shared 2-core machine; the
number of instructions a process executes for a fixed amount of work hardly does (to
within about 3 % over repeated runs here; the core's lockstep phase is the exception,
see README.md "Instruction counts"). For each subject, only the
process under test runs under ``valgrind --tool=callgrind``; the C echo backends
(``bench.echo``) and this load generator run natively. Per subject:

1. start it with instrumentation off (``--instr-atstart=no``: the shim's imports, about
   2 billion instructions, run at valgrind's uninstrumented speed) and wait, bounded,
   until a 200-byte generate comes back through it (a shim's own ``SHIM_*`` errors while
   its pool connects do not count);
2. ``callgrind_control -i on``, then ``--warmup`` requests (connections made, caches and
   the compiled core's tables warm), not counted;
3. per phase: ``callgrind_control -z`` (zero), exactly ``--requests`` distinct 200-byte
   generates (``bench.loadgen.payload_ring``), ``callgrind_control --dump``; the dump's
   ``totals:`` line (every thread of the process: Python, libzmq's I/O thread, the
   metrics thread) divided by the requests is the figure. Phases: ``pipelined`` (4
   DEALER sockets, 16 in flight each, as ``make bench``'s pipelined phase) and
   ``lockstep`` (one request in flight: what every loop pass costs one request alone).
   Before them an ``idle`` phase (5 s, no requests) gives the subject's Ir per second
   of timers and idle wake-ups: under callgrind a request takes far longer than
   natively, so that per-second work weighs more per request; the table shows it.
   Around each phase the shim's Prometheus counters are read: the share of the requests
   the compiled core forwarded, and, for a phase in which some requests were never
   answered (no reply for 20 s), where they went; such a phase is reported and run
   again (at most 5 attempts; the exit status is then 1).

Subjects: ``zmq.proxy`` (bench.echo's proxy mode in front of a C ROUTER echo, the
yardstick), the shim with the compiled core (``make bench``'s ``shim-split`` config:
90/10 between two MMA-dialect echoes, bytes passed through), the same shim with
``MMSHIM_FASTPATH=off`` (pure Python), and with ``--before DIR`` the shim of another
checkout (its own ``DIR/.venv``; e.g. the code before issue 17, ``git archive 5f07eed``).
For the shim with the core, ``callgrind_annotate`` lists the top functions of the
pipelined phase.

Needs valgrind (``apt-get install valgrind``): without it the tool says so and exits 2.
One run takes a few minutes (most of it the pure-Python shim's phases under callgrind).
Work files (configs, logs, callgrind dumps) go to a temp dir, removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

import tests.procs
from bench import loadgen
from bench.procs import ROOT, ProcGroup, free_port
from bench.shimcfg import shim_config

E = "tcp://127.0.0.1:{}".format
TOOLS = ("valgrind", "callgrind_control", "callgrind_annotate")
ATTEMPTS = 5
IDLE_S = 5.0
PHASES = {"pipelined": (4, 16), "lockstep": (1, 1)}  # name -> (sockets, in flight each)
#: Entries of ``callgrind_annotate``'s function list: "1,234 (12.3%)  file:fn [object]".
_ANNOTATE_LINE = re.compile(r"^\s*([\d,]+)\s+\(\s*[\d.]+%\)\s+(.+?)(?:\s+\[(.+)\])?\s*$")


@dataclass
class Subject:
    """One process to measure: ``argv`` after the interpreter, run from ``cwd``."""

    key: str
    label: str
    python: str
    argv: list[str]
    endpoint: str
    cwd: Path = ROOT
    env: dict[str, str] = field(default_factory=dict)
    shim: bool = True  # a shim answers SHIM_* errors until its pool is connected
    metrics: str = ""  # host:port of a shim's Prometheus endpoint


@dataclass
class Phase:
    """The counters of one measured phase."""

    requests: int
    answered: int
    errors: int
    ir: int
    seconds: float
    dump: Path
    idle_ir: float  # what the subject spends idle (Ir/s) over the phase's seconds
    core_share: float | None  # of the requests, what the compiled core forwarded

    @property
    def per_request(self) -> float:
        return self.ir / self.answered if self.answered else 0.0


class Failed(RuntimeError):
    """A subject that did not start, answer or dump in time."""


def _control(pid: int, *args: str, timeout_s: float = 120.0) -> None:
    """``callgrind_control ARGS PID``; raises Failed unless it says OK. (It reaches the
    process through valgrind's gdbserver, vgdb: a process blocked in a system call is
    woken by ptrace, so an idle subject answers too.)"""
    try:
        r = subprocess.run(["callgrind_control", *args, str(pid)], capture_output=True,
                           text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise Failed(f"callgrind_control {' '.join(args)} {pid}: no answer in "
                     f"{timeout_s:.0f} s") from exc
    if r.returncode != 0 or "OK" not in r.stdout:
        raise Failed(f"callgrind_control {' '.join(args)} {pid} failed ({r.returncode}): "
                     f"{(r.stdout + r.stderr)[-500:]}")


def totals(dump: Path) -> int:
    """The ``totals:`` line of a callgrind dump (Ir over every thread). The ``summary:``
    line above it reads 0 when instrumentation was switched on after start, so it is
    not the figure (bench.instructions of the previous round took it, and divided by 0)."""
    m = re.search(rb"^totals:\s+(\d+)", dump.read_bytes(), re.M)
    if not m:
        raise Failed(f"{dump}: no totals line")
    return int(m.group(1))


def _dumps(out: Path) -> set[Path]:
    return {p for p in out.parent.glob(out.name + ".*") if p.suffix[1:].isdigit()}


def dump(pid: int, out: Path, desc: str, timeout_s: float = 120.0) -> Path:
    """Ask for a dump and return its file (``OUT.N``) once its totals are written."""
    before = _dumps(out)
    _control(pid, f"--dump={desc}", timeout_s=timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for path in sorted(_dumps(out) - before, key=lambda p: int(p.suffix[1:])):
            if re.search(rb"^totals:", path.read_bytes(), re.M):
                return path
        time.sleep(0.2)
    raise Failed(f"no dump file {out}.N appeared in {timeout_s:.0f} s")


def drive(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, ring: list[bytes], n: int, *,
          sockets: int, window: int, stall_s: float = 120.0,
          limit_s: float = 1800.0) -> tuple[int, int, bytes]:
    """Send exactly ``n`` requests (``ring`` in turn) from ``sockets`` DEALERs keeping
    ``window`` each in flight; return (answered, error replies, first error reply).
    Stops early when no reply came for ``stall_s`` or after ``limit_s`` in all."""
    socks = []
    poller = zmq.Poller()
    for _ in range(sockets):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        poller.register(s, zmq.POLLIN)
        socks.append(s)
    sent = answered = errors = 0
    sample = b""

    def send(s: zmq.Socket[bytes]) -> None:
        nonlocal sent
        s.send_multipart((sent.to_bytes(8, "little"), b"", ring[sent % len(ring)]))
        sent += 1

    try:
        for s in socks:
            for _ in range(window):
                if sent < n:
                    send(s)
        start = last = time.monotonic()
        while answered < sent:
            now = time.monotonic()
            if now - last > stall_s or now - start > limit_s:
                break
            for s, _ in poller.poll(1000):
                while True:
                    try:
                        frames = s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    answered += 1
                    last = time.monotonic()
                    if any(mark in frames[-1] for mark in loadgen.ERROR_MARKS):
                        errors += 1
                        sample = sample or frames[-1]
                    if sent < n:
                        send(s)
        return answered, errors, sample
    finally:
        for s in socks:
            s.close(0)


def wait_answering(ctx: zmq.Context[zmq.Socket[bytes]], subject: Subject,
                   proc: tests.procs.Proc, payload: bytes, timeout_s: float) -> float:
    """Seconds until one request came back through ``subject`` (not a shim error)."""
    t0 = time.monotonic()
    while True:
        if not proc.alive():
            raise Failed(f"{subject.key} exited ({proc.poll()}):\n{proc.log_tail(30)}")
        if time.monotonic() - t0 > timeout_s:
            raise Failed(f"{subject.key} not answering after {timeout_s:.0f} s:\n"
                         f"{proc.log_tail(30)}")
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(subject.endpoint)
        try:
            sock.send(payload)
            if sock.poll(5000):  # generous: the first requests are translated by valgrind
                body = sock.recv()
                if not (subject.shim and b"SHIM_" in body):
                    return time.monotonic() - t0
        finally:
            sock.close(0)
        time.sleep(0.5)


#: Counters whose change over a phase is worth showing: how much the core carried, and
#: where replies went that the client never got.
WATCHED = ("shim_frontend_total", "shim_fastpath_requests_total", "shim_dropped_replies_total",
           "shim_timeouts_total", "shim_late_replies_total", "shim_unroutable_replies_total",
           "shim_inflight")


def scrape(address: str) -> dict[str, float]:
    """A shim's watched Prometheus samples, ``name{labels}`` -> value ({} if unreachable:
    the metrics thread is slow under valgrind but answers)."""
    if not address:
        return {}
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=60) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(WATCHED):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def changes(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Samples that moved (gauges: their value after)."""
    return {k: (v if k.startswith("shim_inflight") else v - before.get(k, 0.0))
            for k, v in after.items()
            if v != before.get(k, 0.0) or (k.startswith("shim_inflight") and v)}


def core_share(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Share of a phase's requests the compiled core forwarded (None: a shim without the
    ``shim_fastpath_requests_total`` counter, i.e. code from before the core, or no
    requests counted)."""
    def total(samples: dict[str, float], prefix: str, label: str = "") -> float:
        return sum(v for k, v in samples.items() if k.startswith(prefix) and label in k)

    if not any(k.startswith("shim_fastpath_requests_total") for k in after):
        return None
    requests = (total(after, "shim_frontend_total", 'kind="requests"')
                - total(before, "shim_frontend_total", 'kind="requests"'))
    fast = (total(after, "shim_fastpath_requests_total")
            - total(before, "shim_fastpath_requests_total"))
    return fast / requests if requests else None


def measure(ctx: zmq.Context[zmq.Socket[bytes]], subject: Subject, work: Path, *,
            requests: int, warmup: int, start_timeout_s: float, lost: list[str],
            log: Any, stall_s: float = 20.0) -> tuple[dict[str, Phase], float, float]:
    """Start ``subject`` under callgrind, warm it, measure every phase, stop it.

    A phase in which some requests are never answered (no reply for ``stall_s``; under
    callgrind a reply takes milliseconds) is noted in ``lost`` and run again, at most
    ``ATTEMPTS`` times: its dump would count the idle wait, not requests."""
    out = work / f"{subject.key}.callgrind"
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}", subject.python, *subject.argv]
    proc = tests.procs.Proc(argv, env=subject.env, cwd=subject.cwd,
                            log_path=work / f"{subject.key}.log", die_with_parent=True)
    payload = loadgen.generate_request(200)
    ring = loadgen.payload_ring(payload)
    try:
        started = wait_answering(ctx, subject, proc, payload, start_timeout_s)
        log(f"  {subject.key}: answering after {started:.1f} s under callgrind (pid {proc.pid})")
        _control(proc.pid, "-i", "on")
        answered, errors, sample = drive(ctx, subject.endpoint, ring, warmup,
                                         sockets=4, window=16, stall_s=stall_s)
        if errors:
            raise Failed(f"{subject.key}: warm-up: {errors} error replies {sample[:200]!r}")
        if answered < warmup:  # not measured: noted, and the phases go on
            lost.append(f"warm-up: {warmup - answered} of {warmup} requests never answered "
                        f"(no reply for {stall_s:.0f} s)")
            log(f"  !! {subject.key} {lost[-1]}")
        _control(proc.pid, "-z")  # idle: what timers and idle loop passes cost per second
        t0 = time.monotonic()
        time.sleep(IDLE_S)
        path = dump(proc.pid, out, "idle")
        idle = totals(path) / (time.monotonic() - t0)
        log(f"  {subject.key} idle: {idle:,.0f} Ir/s")
        phases: dict[str, Phase] = {}
        for name, (sockets, window) in PHASES.items():
            for attempt in range(1, ATTEMPTS + 1):
                m0 = scrape(subject.metrics)
                _control(proc.pid, "-z")
                t0 = time.monotonic()
                answered, errors, sample = drive(ctx, subject.endpoint, ring, requests,
                                                 sockets=sockets, window=window,
                                                 stall_s=stall_s)
                seconds = time.monotonic() - t0
                path = dump(proc.pid, out, f"{name}-{attempt}")
                m1 = scrape(subject.metrics)
                delta = changes(m0, m1)
                if answered == requests:
                    break
                lost.append(f"{name} attempt {attempt}: {requests - answered} of {requests} "
                            f"requests never answered (no reply for {stall_s:.0f} s); "
                            f"shim metrics over the attempt: {delta}")
                log(f"  !! {subject.key} {lost[-1]}")
                if not proc.alive():
                    raise Failed(f"{subject.key} exited:\n{proc.log_tail(30)}")
            else:
                raise Failed(f"{subject.key} {name}: replies lost in {ATTEMPTS} attempts")
            phases[name] = Phase(requests, answered, errors, totals(path), seconds, path,
                                 idle * seconds, core_share(m0, m1))
            share = phases[name].core_share
            log(f"  {subject.key} {name}: {phases[name].per_request:,.0f} Ir/request "
                f"({requests} requests in {seconds:.1f} s, {errors} errors"
                f"{'' if share is None else f', core carried {share:.0%}'}"
                f"{' ' + repr(sample[:120]) if errors else ''})")
        return phases, started, idle
    finally:
        proc.stop(timeout=60.0)  # the shim drains, valgrind writes its last dump


#: Objects whose inclusive cost is every loop pass, whatever it does: the interpreter's
#: eval loop and uvloop's poll loop call everything else.
PLUMBING = ("libpython", "loop.cpython", "python3")


def top_functions(dump_file: Path, *, inclusive: bool, n: int = 10) -> list[tuple[int, str]]:
    """The ``n`` costliest functions of a dump by ``callgrind_annotate``, as (Ir, name).

    Inclusive: the entries of recursion cycles (callgrind marks them ``fn'2``; their
    figures exceed the total), functions of the interpreter and of uvloop's loop (every
    one of them includes a whole loop pass), and unnamed code are left out, so the list
    shows what those call; so are Cython's argument wrappers (``__pyx_pw_*``: the same
    figure as the function they wrap). Each function is listed once (callgrind_annotate repeats a
    function per source file it was inlined from)."""
    r = subprocess.run(["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}",
                        "--auto=no", "--threshold=100", str(dump_file)],
                       capture_output=True, text=True, timeout=300, check=False)
    total = totals(dump_file)
    rows: list[tuple[int, str]] = []
    self_ir: dict[str, int] = {}
    seen: set[str] = set()
    for line in r.stdout.split("file:function", 1)[-1].splitlines():
        m = _ANNOTATE_LINE.match(line)
        if not m:
            continue
        ir, name, obj = int(m.group(1).replace(",", "")), m.group(2), Path(m.group(3) or "").name
        where, _, fn = name.rpartition(":")
        if not inclusive:  # a function's self cost is split over its recursion depths
            base = re.sub(r"'\d+$", "", fn)
            if obj or base not in self_ir:
                label = f"{base}  ({obj or Path(where).name or '???'})"
                self_ir[label] = self_ir.get(label, 0) + ir
            continue
        if fn in seen:
            continue
        seen.add(fn)
        if (ir > total or re.search(r"'\d+$", fn) or not obj or obj == "???"
                or obj.startswith(PLUMBING) or fn.startswith("__pyx_pw_")):
            continue
        rows.append((ir, f"{fn}  ({obj})"))
        if len(rows) == n:
            break
    if not inclusive:
        rows = sorted(((v, k) for k, v in self_ir.items()), reverse=True)[:n]
    return rows


def by_object(dump_file: Path) -> list[tuple[int, str]]:
    """Self Ir summed per shared object (libpython, libzmq, the core's .so, ...)."""
    r = subprocess.run(["callgrind_annotate", "--inclusive=no", "--auto=no",
                        "--threshold=100", str(dump_file)],
                       capture_output=True, text=True, timeout=300, check=False)
    sums: dict[str, int] = {}
    for line in r.stdout.split("file:function", 1)[-1].splitlines():
        m = _ANNOTATE_LINE.match(line)
        if m:
            obj = Path(m.group(3)).name if m.group(3) else "???"
            sums[obj] = sums.get(obj, 0) + int(m.group(1).replace(",", ""))
    return sorted(((v, k) for k, v in sums.items()), reverse=True)


def subjects(work: Path, echo_eps: list[str], before: Path | None) -> list[Subject]:
    """The subjects in measuring order, each with its config written under ``work``."""
    py = sys.executable
    front = free_port()
    out = [Subject("zmq.proxy", "zmq.proxy -> C ROUTER echo", py,
                   ["-m", "bench.echo", "--serve", f"proxy:{front}:{echo_eps[0]}"],
                   E(front), shim=False)]
    variants: list[tuple[str, str, str, Path, dict[str, str]]] = [
        ("shim-core", "shim split 90/10, bytes passed, compiled core", py, ROOT,
         {"MMSHIM_FASTPATH": "auto"}),
        ("shim-python", "same shim, MMSHIM_FASTPATH=off (pure Python)", py, ROOT,
         {"MMSHIM_FASTPATH": "off"}),
    ]
    if before is not None:
        variants.append(("shim-before", f"same shim, code of {before}",
                         str(before / ".venv" / "bin" / "python"), before, {}))
    for key, label, python, cwd, env in variants:
        cfg = shim_config(work, key, {"mma": ("mma", echo_eps[0]), "mma2": ("mma", echo_eps[1])},
                          {"mma": 90, "mma2": 10})
        path = work / f"{key}.json"
        path.write_bytes(msgspec.json.format(msgspec.json.encode(cfg), indent=1))
        out.append(Subject(key, label, python, ["-m", "shim.cli", "run", "--config", str(path),
                                                "--log-level", "warning", "--reset-state"],
                           cfg["shim"]["listen"], cwd=cwd, env=env,
                           metrics=cfg["shim"]["metrics"]))
    return out


def _head(commit_of: Path) -> str:
    r = subprocess.run(["git", "-C", str(commit_of), "rev-parse", "--short", "HEAD"],
                       capture_output=True, text=True, check=False)
    return r.stdout.strip() or "?"


def table(results: dict[str, dict[str, Any]], labels: dict[str, str]) -> str:
    """Markdown: subject, Ir/request per phase and its ratio to zmq.proxy's in the same
    phase (and for a shim with the core, the share of the phase's requests it forwarded
    without Python: shim_fastpath_requests_total over shim_frontend_total); then the
    subject's idle Ir/s and what that idle rate comes to per request over
    each phase's duration under callgrind (an estimate of the timer work in the figure:
    under valgrind a request takes far longer than natively, so timers weigh more)."""
    ref = results.get("zmq.proxy", {})
    head = ("| subject | " + " | ".join(f"{p}: Ir/request (x zmq.proxy)" for p in PHASES)
            + " | idle Ir/s | idle share per request (" + " / ".join(PHASES) + ") |")
    lines = [head, "|---|" + "---|" * (len(PHASES) + 2)]
    for key, res in results.items():
        if "failed" in res:
            lines.append(f"| {labels[key]} | " + " | ".join(["failed"] * (len(PHASES) + 2))
                         + " |")
            continue
        cells = []
        for p in PHASES:
            v = res["phases"][p]["ir_per_request"]
            r = ref.get("phases", {}).get(p, {}).get("ir_per_request")
            share = res["phases"][p].get("core_share")
            notes = ([f"{v / r:.2f}x"] if r else []) + (
                [] if share is None else [f"core carried {share:.0%}"])
            cells.append(f"{v:,.0f}" + (f" ({'; '.join(notes)})" if notes else ""))
        cells.append(f"{res['idle_ir_per_s']:,.0f}")
        cells.append(" / ".join(f"{res['phases'][p]['idle_ir_per_request']:,.0f}"
                                for p in PHASES))
        lines.append(f"| {labels[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.instr",
                                description="Instructions per request (callgrind) of the shim "
                                "and of zmq.proxy; see the module docstring.")
    p.add_argument("--requests", type=int, default=3000, help="measured requests per phase")
    p.add_argument("--warmup", type=int, default=500, help="requests before measuring")
    p.add_argument("--before", type=Path, default=None, metavar="DIR",
                   help="also measure the shim of the checkout DIR (run with DIR/.venv)")
    p.add_argument("--only", default="", help="comma-separated subjects (zmq.proxy, "
                   "shim-core, shim-python, shim-before)")
    p.add_argument("--start-timeout", type=float, default=600.0, metavar="S",
                   help="how long a subject may take to answer under valgrind")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="dump raw results")
    p.add_argument("--keep", action="store_true", help="keep the work dir (dumps, logs)")
    return p.parse_args(argv)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks that stop the children


def eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        eprint(f"bench.instr: {', '.join(missing)} not found: install valgrind "
               f"(apt-get install valgrind)")
        return 2
    if args.before is not None and not (args.before / ".venv" / "bin" / "python").exists():
        eprint(f"bench.instr: {args.before}/.venv/bin/python not found")
        return 2
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="mmshim-instr-"))
    group = ProcGroup(work)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    results: dict[str, dict[str, Any]] = {}
    labels: dict[str, str] = {}
    top: dict[str, Any] = {}
    info = {"cpus": os.cpu_count(), "python": platform.python_version(),
            "libzmq": zmq.zmq_version(), "commit": _head(ROOT),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "requests": args.requests, "warmup": args.warmup,
            "phases": {k: {"sockets": s, "window": w} for k, (s, w) in PHASES.items()}}
    eprint(f"bench.instr: {args.requests} requests per phase, commit {info['commit']}, "
           f"work dir {work}")
    ok = False
    try:
        ports = [free_port(), free_port()]
        echo = group.python("echo", "bench.echo", *(f"--serve=echo-router:{p}" for p in ports),
                            ready_line=True)
        echo.wait_ready()
        only = {x.strip() for x in args.only.split(",") if x.strip()}
        for sub in subjects(work, [E(p) for p in ports], args.before):
            if only and sub.key not in only:
                continue
            labels[sub.key] = sub.label
            t0 = time.monotonic()
            eprint(f"{sub.key}: {sub.label}")
            lost: list[str] = []
            try:
                phases, start_s, idle = measure(ctx, sub, work, requests=args.requests,
                                          warmup=args.warmup, lost=lost,
                                          start_timeout_s=args.start_timeout, log=eprint)
            except Failed as exc:
                eprint(f"!! {sub.key}: {exc}")
                results[sub.key] = {"failed": str(exc), "lost": lost}
                continue
            results[sub.key] = {"lost": lost,
                "start_s": round(start_s, 1), "elapsed_s": round(time.monotonic() - t0, 1),
                "idle_ir_per_s": round(idle),
                "phases": {k: {"ir": ph.ir, "answered": ph.answered, "errors": ph.errors,
                               "seconds": round(ph.seconds, 1),
                               "ir_per_request": round(ph.per_request, 1),
                               "idle_ir_per_request": round(ph.idle_ir / ph.answered, 1),
                               "core_share": ph.core_share}
                           for k, ph in phases.items()}}
            if sub.key == "shim-core":
                dump_file = phases["pipelined"].dump
                top = {"inclusive": top_functions(dump_file, inclusive=True),
                       "self": top_functions(dump_file, inclusive=False),
                       "objects": by_object(dump_file)[:8],
                       "total": phases["pipelined"].ir}
        print()
        print(f"Instructions per request (callgrind, every thread of the process under test; "
              f"{args.requests} distinct 200-byte generates per phase; pipelined = 4 DEALER "
              f"x 16 in flight, lockstep = 1 in flight), commit {info['commit']}, "
              f"{info['date']}:")
        print()
        print(table(results, labels))
        if top:
            total = top["total"]
            for kind, what in (("inclusive", "inclusive Ir, outside the interpreter and uvloop"),
                               ("self", "self Ir"), ("objects", "self Ir per object")):
                print()
                print(f"shim-core, pipelined phase: top {len(top[kind])} by {what}, "
                      f"per request and share of {total / args.requests:,.0f}:")
                for ir, name in top[kind]:
                    print(f"  {ir / args.requests:10,.0f}  {ir / total:6.1%}  {name}")
        for key, res in results.items():
            for note in res.get("lost", []):
                print(f"\n{key}: LOST REPLIES, phase run again: {note}")
            if "failed" in res:
                print(f"\n{key} FAILED: {res['failed']}")
        elapsed = time.monotonic() - started
        info["elapsed_s"] = round(elapsed, 1)
        print(f"\nRun took {elapsed:.0f} s.")
        ok = all("failed" not in r and not r["lost"] for r in results.values())
        return 0 if ok else 1
    except KeyboardInterrupt:
        eprint("interrupted: stopping every process")
        return 130
    finally:
        ctx.destroy(linger=0)
        group.close()
        if args.json:
            args.json.write_bytes(msgspec.json.format(msgspec.json.encode(
                {"machine": info, "results": results, "top_shim_core": top},
                enc_hook=str), indent=1))
            eprint(f"raw results in {args.json}")
        if ok and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            eprint(f"work dir kept: {work}")


if __name__ == "__main__":
    sys.exit(main())

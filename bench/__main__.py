"""``python -m bench``: the shim against libzmq's zmq.proxy, on loopback, in one run.

See bench/README.md for the scenarios. ``--quick`` is a ~30 s smoke run, ``--rss`` the
long memory run (1,000,000 requests), ``--json FILE`` dumps the raw results,
``--profile SECONDS`` samples a shim under load with py-spy.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from bench import report
from bench.e2e import e2e_table, run_e2e
from bench.procs import ProcGroup
from bench.scenarios import Bench, Settings, eprint


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # unwinds through the finally blocks that stop the children


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="~30 s smoke run (1 round, short phases)")
    p.add_argument("--rss", action="store_true",
                   help="long run: RSS growth of one shim over 1,000,000 requests")
    p.add_argument("--rss-requests", type=int, default=1_000_000)
    p.add_argument("--soak", action="store_true",
                   help="memory soak: every request kind, slow readers, vanished clients, "
                        "oversized frames (bench/soak.py)")
    p.add_argument("--soak-requests", type=int, default=1_000_000)
    p.add_argument("--soak-every", type=int, default=5_000,
                   help="hostile clients every N requests")
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3)")
    p.add_argument("--only", default="", help="comma-separated shim scenarios to run "
                   "(shim-split,shim-xlate,shim-noshadow,shim-shadow,shim-stalled,"
                   "shim-split-rep); references always run")
    p.add_argument("--no-e2e", action="store_true", help="skip the reference-backend scenario")
    p.add_argument("--profile", type=float, default=0.0, metavar="SECONDS",
                   help="also sample shim-xlate with py-spy under load for SECONDS")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="dump raw results")
    p.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs)")
    return p.parse_args(argv)


def settings_for(args: argparse.Namespace) -> Settings:
    s = Settings()
    if args.quick:
        s = Settings(rounds=1, dealer_s=1.0, req_s=2.0, rss_s=3.0)
    if args.rounds:
        s.rounds = args.rounds
    return s


def machine() -> dict[str, Any]:
    with open("/proc/loadavg") as f:
        load = f.read().split()[:3]
    return {"cpus": os.cpu_count(), "loadavg": load, "python": platform.python_version(),
            "libzmq": zmq.zmq_version(), "pyzmq": zmq.__version__}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    s = settings_for(args)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="mmshim-bench-"))
    group = ProcGroup(work)
    info = machine()
    out: dict[str, Any] = {"machine": info, "settings": vars(s), "work_dir": str(work)}
    eprint(f"mmshim bench: {info['cpus']} CPUs, load {' '.join(info['loadavg'])}, "
           f"Python {info['python']}, libzmq {info['libzmq']}; logs in {work}")
    ok = False
    bench = Bench(group, work, s, eprint)
    try:
        if args.soak:
            from bench.soak import run_soak

            result = run_soak(group, work, requests=args.soak_requests,
                              every=args.soak_every, log=eprint)
            out["soak"] = result
            print(msgspec.json.format(msgspec.json.encode(result), indent=1).decode())
            print(f"[{'PASS' if result['growth_ok'] else 'FAIL'}] RSS growth "
                  f"{result['growth_mb']:+.1f} MB (limit 10): baseline "
                  f"{result['rss_baseline_mb']} MB -> after {result['rss_after_mb']} MB")
            print(f"[{'PASS' if result['peak_ok'] else 'FAIL'}] RSS peak "
                  f"{result['rss_peak_mb']} MB (limit 2x baseline)")
            ok = True
            return 0
        if args.rss:
            code = _rss_only(args, bench, out, started)
            ok = code == 0
            return code
        only = {x.strip() for x in args.only.split(",") if x.strip()} or None
        bench.start(only)
        eprint(f"started {len(group.procs)} processes in {time.monotonic() - started:.1f} s")
        bench.run_rounds()
        bench.shadow_counts()
        rss: dict[str, Any] = {}
        if only is None or "shim-xlate" in only:
            eprint(f"RSS phase: shim-xlate for {s.rss_s:g} s")
            raw = bench.rss_phase("shim-xlate", duration_s=s.rss_s, max_requests=s.rss_max)
            rss = _rss_verdict(raw, extrapolated=True)
        if args.profile:
            out["profile"] = _profile(bench, args.profile, work)
        e2e: dict[str, Any] = {"skipped": "--no-e2e"}
        if not args.no_e2e:
            e2e = run_e2e(group, work, rounds=1 if args.quick else 2,
                          dealer_s=0.8 if args.quick else 1.0,
                          req_s=1.0 if args.quick else 2.0, log=eprint)
        summary = report.summarize(bench.scenarios)
        tg = report.targets(summary, rss, e2e)
        elapsed = time.monotonic() - started
        print()
        print(report.tables(summary, s))
        print()
        print(report.targets_text(tg))
        if rss:
            print(f"  RSS: {rss['detail']}")
        print()
        print(e2e_table(e2e))
        if "profile" in out:
            print()
            print(out["profile"])
        print()
        print(f"Machine: {info['cpus']} cores shared by the load generator (1 process, "
              f"{s.sockets} DEALER sockets in one zmq.Poller loop), the process under test and "
              f"the echo backend - every figure includes that contention; zmq.proxy under the "
              f"same contention is the yardstick. Run took {elapsed:.0f} s.")
        out.update(summary=summary, targets=tg, rss=rss, e2e=e2e, elapsed_s=elapsed,
                   scenarios={sc.key: {"label": sc.label, "rounds": sc.rounds, "note": sc.note,
                                       "failed": sc.failed} for sc in bench.scenarios})
        ok = True
        return 0
    except KeyboardInterrupt:
        eprint("interrupted: stopping every process")
        return 130
    finally:
        bench.close()
        group.close()
        if args.json:
            args.json.write_bytes(msgspec.json.format(
                msgspec.json.encode(out, enc_hook=str), indent=1))
            eprint(f"raw results in {args.json}")
        if ok and not args.keep and not args.profile:
            shutil.rmtree(work, ignore_errors=True)
        else:
            eprint(f"work dir kept: {work}")


def _rss_verdict(raw: dict[str, Any], *, extrapolated: bool) -> dict[str, Any]:
    if "skipped" in raw or raw.get("slope_kb_per_1m") is None:
        return {**raw, "per_1m_mb": None, "how": "not measured",
                "detail": raw.get("skipped", "too few samples")}
    n = raw["over_requests"]
    if extrapolated:
        per_1m = raw["slope_kb_per_1m"] / 1024
        how = f"EXTRAPOLATED from {n:,} requests"
        detail = (f"shim-xlate RSS {raw['rss_start_kb'] / 1024:.1f} -> "
                  f"{raw['rss_end_kb'] / 1024:.1f} MB over {n:,} requests; least-squares slope "
                  f"{per_1m:+.2f} MB per 1M (short run: RSS moves in allocator-sized steps, "
                  f"run `python -m bench --rss` for the real figure)")
    else:
        per_1m = raw["growth_kb"] / 1024 * (1_000_000 / n) if n else None
        how = f"measured over {n:,} requests"
        detail = (f"shim-xlate RSS {raw['rss_start_kb'] / 1024:.1f} -> "
                  f"{raw['rss_end_kb'] / 1024:.1f} MB (max {raw['rss_max_kb'] / 1024:.1f}) over "
                  f"{n:,} requests in {raw['elapsed_s']} s; slope "
                  f"{raw['slope_kb_per_1m'] / 1024:+.2f} MB per 1M")
    return {**raw, "per_1m_mb": per_1m, "how": how, "detail": detail}


def _rss_only(args: argparse.Namespace, bench: Bench, out: dict[str, Any],
              started: float) -> int:
    bench.start({"shim-xlate"})
    if any(sc.failed for sc in bench.scenarios):
        eprint("shim-xlate did not start")
        return 1
    eprint(f"RSS run: {args.rss_requests:,} requests through shim-xlate (at most 15 min)")
    raw = bench.rss_phase("shim-xlate", duration_s=900, max_requests=args.rss_requests + 20_000,
                          chunk_s=2.0, progress=True)
    rss = _rss_verdict(raw, extrapolated=False)
    t = report.targets({}, rss)[-1]
    print(f"[{t['verdict']}] {t['target']}: {rss['per_1m_mb']:.2f} MB (limit 10)"
          if rss["per_1m_mb"] is not None else f"[n/a] {rss['detail']}")
    print(f"  {rss['detail']}; errors {raw.get('errors')}, lost {raw.get('lost')}")
    out["rss"] = rss
    out["elapsed_s"] = time.monotonic() - started
    return 0


def _profile(bench: Bench, seconds: float, work: Path) -> str:
    from bench import loadgen, profile

    sc = next((x for x in bench.scenarios if x.key == "shim-xlate" and not x.failed), None)
    if sc is None or sc.pid is None:
        return "profile: shim-xlate is not running"
    raw = work / "shim-xlate.pyspy.txt"
    try:
        spy = profile.record(sc.pid, seconds, raw)
    except RuntimeError as exc:
        return f"profile: {exc}"
    eprint(f"profiling shim-xlate (pid {sc.pid}) with py-spy for {seconds:g} s under load")
    time.sleep(0.5)
    loadgen.pipelined(bench.ctx, sc.endpoint, bench.payload, sockets=bench.s.sockets,
                      window=bench.s.window, duration_s=seconds + 1.0, warmup=50)
    try:
        _, err = spy.communicate(timeout=30)
    except Exception:
        spy.kill()
        return "profile: py-spy did not finish"
    if spy.returncode != 0 or not raw.exists():
        return f"profile: py-spy failed: {err.decode(errors='replace')[-300:]}"
    return f"Profile of shim-xlate ({raw}):\n" + profile.summarize(raw)


if __name__ == "__main__":
    sys.exit(main())

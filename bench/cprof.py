"""Profile the shim in-process with cProfile (exact call counts) under pipelined load.

``python -m bench.cprof [--seconds 6] [--xlate] [--out FILE]`` starts the C echo (and a
canned MMS backend with ``--xlate``) and a load generator as child processes, runs the
shim's data path in this process under cProfile, then prints the top functions by own
time with calls per request. cProfile slows Python code down (roughly 2x), so use it for
call counts and relative cost; use ``python -m bench --profile`` (py-spy) for time shares.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import tempfile
from pathlib import Path

import msgspec

from bench.procs import ProcGroup, free_port
from bench.shimcfg import shim_config


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench.cprof", description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--xlate", action="store_true", help="90/10 mma + MMS (translated)")
    p.add_argument("--out", type=Path, default=None, help="save pstats here")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--sockets", type=int, default=4, help="load: DEALER sockets")
    p.add_argument("--window", type=int, default=16,
                   help="load: requests in flight per socket (1 socket x 1 = lockstep)")
    args = p.parse_args(argv)

    from shim.app import build_shim
    from shim.config import decode_config

    work = Path(tempfile.mkdtemp(prefix="mmshim-cprof-"))
    group = ProcGroup(work)
    try:
        echo_port, echo2_port, mms_port = free_port(), free_port(), free_port()
        echo = group.python("echo", "bench.echo", "--serve", f"echo-router:{echo_port}",
                            "--serve", f"echo-router:{echo2_port}", "--serve",
                            f"mms:{mms_port}", ready_line=True)
        echo.wait_ready()
        second = ("mms", ("mms", f"tcp://127.0.0.1:{mms_port}")) if args.xlate else \
            ("mma2", ("mma", f"tcp://127.0.0.1:{echo2_port}"))
        raw = shim_config(work, "cprof", {"mma": ("mma", f"tcp://127.0.0.1:{echo_port}"),
                                          second[0]: second[1]},
                          {"mma": 90, second[0]: 10})
        raw["shim"]["metrics"] = ""
        cfg = decode_config(raw)
        shim = build_shim(cfg, serve_metrics=False, reset_state=True)
        load = group.python("loadgen", "bench.loadgen", "--endpoint", raw["shim"]["listen"],
                            "--seconds", str(args.seconds), "--delay", "1.5",
                            "--sockets", str(args.sockets), "--window", str(args.window))

        async def run() -> None:
            loop = asyncio.get_running_loop()
            loop.call_later(args.seconds + 3.0, shim.stop)
            await shim.serve()

        prof = cProfile.Profile()
        prof.enable()
        try:
            import uvloop

            uvloop.run(run())
        except ImportError:
            asyncio.run(run())
        prof.disable()
        load.proc.wait(10)
        lines = load.log().strip().splitlines()
        summary = msgspec.json.decode(lines[-1]) if lines else {}
        n = summary.get("completed", 0) + args.sockets * 200  # + warm-up
        print(f"load: {summary}", file=sys.stderr)
        stats = pstats.Stats(prof)
        if args.out:
            stats.dump_stats(str(args.out))
        rows = []
        for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            rows.append((tt, ct, nc, f"{Path(file).name}:{line}:{func}"))
        rows.sort(reverse=True)
        print(f"{'own s':>7} {'cum s':>7} {'calls/req':>9}  function   ({n:,} requests)")
        for tt, ct, nc, name in rows[: args.top]:
            print(f"{tt:7.3f} {ct:7.3f} {nc / max(n, 1):9.2f}  {name}")
        return 0
    finally:
        group.close()


if __name__ == "__main__":
    raise SystemExit(main())

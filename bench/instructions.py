"""``python -m bench.instructions``: CPU instructions per request in the shim, by callgrind.

Wall-clock and CPU-time figures move with the load on a shared 2-core machine;
instruction counts do not. The shim runs under ``valgrind --tool=callgrind`` with
instrumentation off while it starts (``--instr-atstart=no``), is warmed up, and then
instrumented (``callgrind_control -i on``) for a fixed number of pipelined 200-byte
generates through a 90/10 split between two C echoes (bytes passed through, as
``make bench``'s shim-split); the total instructions of the process (all threads,
libzmq's I/O thread included) divided by the requests answered is the figure. Run once
with the compiled core (``MMSHIM_FASTPATH=auto``) and once without (``off``), and for
``zmq.proxy`` on the same echo as the yardstick. Needs valgrind; takes a few minutes.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from bench import loadgen
from bench.procs import ProcGroup, free_port
from bench.shimcfg import ShimUnderTest, shim_config, wait_serving


def _callgrind(group: ProcGroup, name: str, argv: list[str], out: Path,
               env: dict[str, str] | None = None) -> int:
    proc = group.start(name, ["valgrind", "--tool=callgrind", "--instr-atstart=no",
                              f"--callgrind-out-file={out}", *argv], env=env)
    return proc.pid


def _measure(pid: int, out: Path, run: Callable[[], None]) -> int:
    """Instrument ``pid`` while ``run()`` runs; the instructions it executed."""
    subprocess.run(["callgrind_control", "-i", "on", str(pid)], check=True,
                   capture_output=True, timeout=120)
    run()
    subprocess.run(["callgrind_control", "-i", "off", str(pid)], check=True,
                   capture_output=True, timeout=120)
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True,
                   timeout=120)
    total = 0
    for path in out.parent.glob(out.name + "*"):
        m = re.search(r"^(?:summary|totals): (\d+)", path.read_text(errors="replace"), re.M)
        if m:
            total = max(total, int(m.group(1)))
    return total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.instructions", description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mmshim-callgrind-"))
    group = ProcGroup(work)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    payload = loadgen.generate_request(200)
    results: dict[str, float] = {}
    try:
        ports = [free_port(), free_port()]
        echo = group.python("echo", "bench.echo", *(f"--serve=echo-router:{p}" for p in ports),
                            ready_line=True)
        echo.wait_ready()
        eps = [f"tcp://127.0.0.1:{p}" for p in ports]

        def drive(endpoint: str) -> None:
            r = loadgen.pipelined(ctx, endpoint, payload, sockets=4, window=16,
                                  max_requests=args.requests, duration_s=600, warmup=0)
            results[f"_sent_{endpoint}"] = r.sent

        front = free_port()
        out = work / "proxy.out"
        pid = _callgrind(group, "zmq.proxy", [sys.executable, "-m", "bench.echo",
                                              f"--serve=proxy:{front}:{eps[0]}"], out)
        endpoint = f"tcp://127.0.0.1:{front}"
        loadgen.pipelined(ctx, endpoint, payload, max_requests=200, duration_s=120, warmup=0)
        ir = _measure(pid, out, lambda: drive(endpoint))
        results["zmq.proxy"] = ir / results[f"_sent_{endpoint}"]
        for switch in ("auto", "off"):
            cfg = shim_config(work, f"shim-{switch}", {"a": ("mma", eps[0]), "b": ("mma", eps[1])},
                              {"a": 90, "b": 10})
            path = work / f"shim-{switch}.json"
            path.write_text(json.dumps(cfg))
            out = work / f"shim-{switch}.out"
            pid = _callgrind(group, f"shim-{switch}", [
                sys.executable, "-m", "shim.cli", "run", "--config", str(path),
                "--log-level", "warning", "--reset-state"], out,
                env={"MMSHIM_FASTPATH": switch})
            shim = ShimUnderTest(group.procs[-1], cfg)
            wait_serving(ctx, shim, payload, timeout_s=300)
            loadgen.pipelined(ctx, shim.endpoint, payload, max_requests=500, duration_s=300,
                              warmup=0)
            time.sleep(1.0)
            ir = _measure(pid, out, functools.partial(drive, shim.endpoint))
            results[f"shim split, core {switch}"] = ir / results[f"_sent_{shim.endpoint}"]
    finally:
        ctx.destroy(linger=0)
        group.close()
    ref = results["zmq.proxy"]
    print(f"Instructions per request (callgrind, all threads, {args.requests} pipelined "
          f"200-byte generates, 4 DEALER x 16 in flight):")
    for name, per_request in results.items():
        if not name.startswith("_"):
            print(f"  {name:24} {per_request:12,.0f}  ({per_request / ref:.2f}x zmq.proxy)")


if __name__ == "__main__":
    main()

"""Record and replay figures: capture size per 1,000 requests, replay rate, parity.

``python -m bench.replay [--requests N] [--json OUT]`` (about a minute for 1,000):

1. the reference MMA and MMS (``backends.mma`` / ``backends.mms``, real n-gram
   generation) and a shim at weights mma=100/mms=0 with ``[record] enabled = true``;
2. N requests of the demo mix (shim.demo.legacy_requests: status, loaded models, health,
   a model access, a clear, generates over three preferences and five conversations)
   over 4 DEALER clients, 4 in flight each; once with payloads redacted (the default),
   once with ``record.payloads = true``: bytes of capture per 1,000 requests;
3. ``mmshim replay`` of the redacted capture against a fresh reference MMS at
   ``--speed max`` (unordered, chains kept), ``--ordered`` and ``--speed 10x``: requests
   per second achieved, mismatch rate, latency ratio.

Every child is stopped at the end (bench.procs.ProcGroup). Load loops are bounded by the
request count and a deadline.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from bench.procs import ROOT, ProcGroup, free_port
from bench.shimcfg import shim_config, start_shim, wait_serving
from shim.demo import legacy_requests

CLIENTS, WINDOW = 4, 4


def start_backend(group: ProcGroup, kind: str, name: str) -> str:
    port, health = free_port(), free_port()
    group.python(name, f"backends.{kind}", "--port", str(port), "--health-port", str(health),
                 "--models", str(ROOT / "config" / "models.toml"), "--log-level", "WARNING")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"tcp://127.0.0.1:{health}")
        sock.send(b"ping")
        ok = sock.poll(500)
        sock.close(0)
        if ok:
            return f"tcp://127.0.0.1:{port}"
    raise RuntimeError(f"{name} did not answer its health socket")


def send_all(endpoint: str, requests: list[bytes], deadline_s: float) -> float:
    """Every request over CLIENTS DEALERs with WINDOW in flight each; seconds taken."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    socks = [ctx.socket(zmq.DEALER) for _ in range(CLIENTS)]
    poller = zmq.Poller()
    for s in socks:
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        poller.register(s, zmq.POLLIN)
    queues = [requests[i::CLIENTS] for i in range(CLIENTS)]
    sent, got = [0] * CLIENTS, [0] * CLIENTS
    started = time.perf_counter()
    try:
        while sum(got) < len(requests):
            if time.perf_counter() - started > deadline_s:
                raise RuntimeError(f"only {sum(got)} of {len(requests)} replies in time")
            for i, s in enumerate(socks):
                while sent[i] < len(queues[i]) and sent[i] - got[i] < WINDOW:
                    s.send_multipart([b"", queues[i][sent[i]]])
                    sent[i] += 1
            for s, _ in poller.poll(1000):
                i = socks.index(s)  # type: ignore[arg-type]
                s.recv_multipart()  # type: ignore[union-attr]
                got[i] += 1
    finally:
        for s in socks:
            s.close(0)
    return time.perf_counter() - started


def record(group: ProcGroup, work: Path, name: str, mma: str, mms: str, count: int,
           payloads: bool) -> dict[str, Any]:
    capture = work / f"{name}.jsonl"
    cfg = shim_config(work, name, {"mma": ("mma", mma), "mms": ("mms", mms)},
                      {"mma": 100, "mms": 0},
                      extra={"record": {"enabled": True, "path": str(capture),
                                        "payloads": payloads, "max_bytes": 1 << 30}})
    shim = start_shim(group, work, name, cfg)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    wait_serving(ctx, shim, b'{"action": "status"}')
    requests = [msgspec.json.encode({**r, "request_id": f"bench-{i}"})
                for i, r in enumerate(legacy_requests(count))]
    seconds = send_all(shim.endpoint, requests, 300)
    shim.proc.stop(10)  # SIGTERM: the recorder writes what is queued and closes the file
    lines = capture.read_text().splitlines() if capture.exists() else []
    size = capture.stat().st_size if capture.exists() else 0
    return {"capture": str(capture), "exchanges": len(lines), "bytes": size,
            "bytes_per_1000": round(size * 1000 / max(1, len(lines))),
            "recorded_in_s": round(seconds, 3), "payloads": payloads}


def replay(group: ProcGroup, work: Path, capture: str, mode: list[str],
           name: str) -> dict[str, Any]:
    mms = start_backend(group, "mms", name)
    started = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "shim.cli", "replay", capture, "--to", mms,
                          "--json", "--threshold", "100", *mode], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - started
    if run.returncode not in (0, 1):
        raise RuntimeError(f"replay failed ({run.returncode}): {run.stderr}")
    report = msgspec.json.decode(run.stdout)
    v = report["verdict"]
    return {"mode": " ".join(mode), "exit": run.returncode, "requests": v["requests"],
            "attempted": v["attempted"], "skipped": v["skipped"], "failed": v["failed"],
            "mismatch_rate_percent": v["mismatch_rate_percent"],
            "replay_s": v["wall_s"], "rate_per_s": v["rate_per_s"],
            "process_s": round(wall, 3),
            "latency_ratio": report["latency"]["total"]["ratio"],
            "latency_ratio_p50": report["latency"]["total"]["ratio_p50"],
            "mismatch_by_action": {a: s["mismatch"] for a, s in report["actions"].items()},
            "top_paths": {a: [p["path"] for p in s["paths"]]
                          for a, s in report["actions"].items() if s["paths"]}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.replay", description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    group = ProcGroup(work)
    out: dict[str, Any] = {"requests": args.requests}
    try:
        mma = start_backend(group, "mma", "mma")
        mms = start_backend(group, "mms", "mms")
        out["redacted"] = record(group, work, "rec-redacted", mma, mms, args.requests, False)
        out["payloads"] = record(group, work, "rec-payloads", mma, mms, args.requests, True)
        capture = out["redacted"]["capture"]
        out["replays"] = [replay(group, work, capture, ["--speed", "max"], "mms-max"),
                          replay(group, work, capture, ["--ordered"], "mms-ordered"),
                          replay(group, work, capture, ["--speed", "10x"], "mms-10x")]
    finally:
        group.close()
    text = msgspec.json.format(msgspec.json.encode(out), indent=2).decode()
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""End to end: generate traffic to the reference backends, directly and through the shim.

The reference MMA and MMS (``python -m backends.mma|mms``) do real (n-gram) generation,
so here the backend, not the proxy, sets the pace: the question is how much the shim
adds to a real request, not how fast it can move bytes. Scenarios, alternated in rounds:
MMA direct, shim -> MMA (bytes passed through), MMS direct (MMS-dialect request), shim ->
MMS (an MMA request translated both ways). Skipped with a message when the backends or
the model files are not there yet.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from bench import loadgen
from bench.procs import ROOT, Proc, ProcGroup, free_port
from bench.shimcfg import POLICY, start_shim, wait_serving

MODELS = ROOT / "config" / "models.toml"


def _wait_health(ctx: zmq.Context[zmq.Socket[bytes]], proc: Proc, endpoint: str,
                 timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.log_tail()}")
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        try:
            sock.send(b"?")
            if sock.poll(500):
                sock.recv()
                return
        finally:
            sock.close(0)
    raise RuntimeError(f"{proc.name}: no health reply in {timeout_s:.0f} s:\n{proc.log_tail()}")


def run_e2e(group: ProcGroup, work: Path, *, rounds: int, dealer_s: float, req_s: float,
            log: Callable[[str], None]) -> dict[str, Any]:
    """Start both reference backends and three shims, alternate the five scenarios."""
    missing = [m for m in ("mma", "mms") if not (ROOT / "backends" / f"{m}.py").exists()]
    if missing:
        return {"skipped": f"reference backend module(s) not there yet: "
                           f"{', '.join('backends.' + m for m in missing)}"}
    if not MODELS.exists() or not list((ROOT / "models").glob("*.ngram")):
        return {"skipped": "config/models.toml or models/*.ngram missing (run `make models`)"}
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        ports: dict[str, tuple[int, int]] = {}
        procs: dict[str, Proc] = {}
        for kind in ("mma", "mms"):
            port, health = free_port(), free_port()
            ports[kind] = (port, health)
            procs[kind] = group.python(f"ref-{kind}", f"backends.{kind}", "--port", str(port),
                                       "--health-port", str(health), "--models", str(MODELS),
                                       "--log-level", "WARNING")
        try:
            for kind, proc in procs.items():
                _wait_health(ctx, proc, f"tcp://127.0.0.1:{ports[kind][1]}", 30.0)
        except RuntimeError as exc:
            return {"skipped": f"reference backends did not start: {exc}"}
        backends = {k: {"dialect": k, "endpoints": [f"tcp://127.0.0.1:{p}"],
                        "health": f"tcp://127.0.0.1:{h}"} for k, (p, h) in ports.items()}
        mma_req = loadgen.generate_request(200, dialect="mma")
        mms_req = loadgen.generate_request(200, dialect="mms")
        scenarios: list[tuple[str, str, bytes, int]] = [
            ("MMA direct", f"tcp://127.0.0.1:{ports['mma'][0]}", mma_req, procs["mma"].pid),
            ("MMS direct (MMS request)", f"tcp://127.0.0.1:{ports['mms'][0]}", mms_req,
             procs["mms"].pid),
        ]
        # The defaults keep model ownership on, which sees every generate in Python; the
        # compiled core (issue 17) carries passed-through generates only without it.
        for name, weights, owned in (
                ("shim -> MMA (passed)", {"mma": 100, "mms": 0}, True),
                ("shim -> MMA (passed, no ownership)", {"mma": 100, "mms": 0}, False),
                ("shim -> MMS (translated)", {"mma": 0, "mms": 100}, True)):
            key = "e2e-" + ("mma" if weights["mma"] else "mms") + ("" if owned else "-free")
            cfg = {"shim": {"listen": f"tcp://127.0.0.1:{free_port()}",
                            "health": f"tcp://127.0.0.1:{free_port()}",
                            "metrics": f"127.0.0.1:{free_port()}",
                            "admin": f"tcp://127.0.0.1:{free_port()}",
                            "state_file": str(work / f"{key}-state.json")},
                   "backends": backends, "routing": {"weights": weights},
                   "policy": POLICY, "shadow": {"diff_log": str(work / f"{key}-diffs.jsonl")},
                   "ownership": {"enabled": owned}}
            shim = start_shim(group, work, key, cfg)
            try:
                wait_serving(ctx, shim, mma_req, timeout_s=30.0)
            except RuntimeError as exc:
                return {"skipped": f"shim for the end-to-end scenario did not start: {exc}"}
            scenarios.insert(len(scenarios) - 1 if weights["mma"] else len(scenarios),
                             (name, shim.endpoint, mma_req, shim.pid))
        results: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in scenarios}
        for r in range(rounds):
            order = scenarios[r % len(scenarios):] + scenarios[:r % len(scenarios)]
            dealers = {}
            for name, endpoint, payload, pid in order:
                dealers[name] = loadgen.pipelined(ctx, endpoint, payload, sockets=2, window=4,
                                                  duration_s=dealer_s, warmup=5, watch_pid=pid)
            # REQ clients take turns; the two request dialects need two interleaved runs
            reqs: dict[str, loadgen.LoadResult] = {}
            for payload in (mma_req, mms_req):
                reqs.update(loadgen.lockstep_interleaved(
                    ctx, {n: ep for n, ep, p, _ in order if p is payload}, payload,
                    duration_s=req_s / 2, warmup=5))
            for name in dealers:
                results[name].append({"dealer": dealers[name].summary(),
                                      "req": reqs[name].summary()})
            log(f"e2e round {r + 1}/{rounds} done")
        return {"results": results, "summary": _summary(results)}
    finally:
        ctx.destroy(linger=0)


def _summary(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, rounds in results.items():
        d: dict[str, Any] = {}
        for phase in ("dealer", "req"):
            for key in ("rate", "p50_us", "p99_us"):
                d[f"{phase}_{key}"] = statistics.median(r[phase][key] for r in rounds)
        d["cpu_us_per_req"] = statistics.median(
            r["dealer"].get("cpu_us_per_req") or 0 for r in rounds)
        d["errors"] = sum(r[p]["errors"] + r[p]["lost"] for r in rounds for p in ("dealer", "req"))
        d["sample_error"] = next((r[p]["sample_error"] for r in rounds for p in ("dealer", "req")
                                  if r[p].get("sample_error")), "")
        out[name] = d
    return out


def e2e_table(e2e: dict[str, Any]) -> str:
    if "skipped" in e2e:
        return f"End-to-end (reference backends): SKIPPED - {e2e['skipped']}"
    s = e2e["summary"]
    lines = ["End-to-end, reference backends doing real n-gram generation (max_tokens 16); "
             "pipelined = 2 DEALER x 4 in flight; (Nx) = ratio to direct to the same backend"]
    head = (f"{'scenario':26} | {'req/s':>14} | {'p50 ms':>13} | {'p99 ms':>13} | "
            f"{'REQ p50 ms':>13} | {'REQ p99 ms':>13} | {'CPU us/req':>10} | err")
    lines += [head, "-" * len(head)]
    for name, d in s.items():
        ref = s["MMA direct"] if "MMA" in name else s["MMS direct (MMS request)"]

        def cell(key: str, scale: float = 1.0, digits: int = 2, d: dict[str, Any] = d,
                 ref: dict[str, Any] = ref) -> str:
            v = d[key] / scale
            x = f" ({d[key] / ref[key]:.2f}x)" if d is not ref and ref[key] else ""
            return f"{v:,.{digits}f}{x}"

        lines.append(f"{name:26} | {cell('dealer_rate', 1, 0):>14} | "
                     f"{cell('dealer_p50_us', 1000):>13} | {cell('dealer_p99_us', 1000):>13} | "
                     f"{cell('req_p50_us', 1000):>13} | {cell('req_p99_us', 1000):>13} | "
                     f"{d['cpu_us_per_req']:>10,.0f} | {d['errors']}")
    errs = [f"  {n}: e.g. {d['sample_error'][:160]}" for n, d in s.items() if d["sample_error"]]
    if errs:
        lines += ["Error replies seen:", *errs]
    lines.append("(CPU us/req: the process under test - the backend when direct, the shim "
                 "when through the shim)")
    return "\n".join(lines)

"""``make rollout-demo``: a whole plan, MMA -> MMS, on ``make run``'s stack with demo
traffic, printing the timeline as it goes.

It starts ``mmshim stack`` on the ports of ``config/shim.toml`` (so ``make run`` must not
be running), with its state in ``state/rollout-demo/`` (your own state file is left
alone) and both reference backends given room for every model at once (the default
12 GB budget cannot hold all six on MMS, which refuses loads that do not fit: a real
difference between the two that the gates would catch and roll back). Traffic: legacy
generates over the five policy models and status requests from three threads, bounded
in count and time. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import zmq

from shim.ctl import AdminClient, connectable
from shim.errors import Unreachable
from shim.rollout.cli import show
from shim.rollout.plan import load_plan

ROOT = Path(__file__).resolve().parents[2]
PREFS = ["fast", "quality", "fallback", "stt", "tts"]


def _request(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, body: dict[str, Any],
             timeout_s: float) -> dict[str, Any] | None:
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(msgspec.json.encode(body))
        if not sock.poll(int(timeout_s * 1000)):
            return None
        reply = msgspec.json.decode(sock.recv())
        return reply if isinstance(reply, dict) else {"status": "not an object"}
    finally:
        sock.close(0)


class Traffic:
    """Three threads of legacy requests, about ``rate`` a second in all."""

    def __init__(self, endpoint: str, rate: float, limit_s: float) -> None:
        self.endpoint = endpoint
        self.pause_s = 3 / rate
        self.limit_s = limit_s
        self.stop = threading.Event()
        self.outcomes: Counter[str] = Counter()
        self.threads = [threading.Thread(target=self._run, args=(w,), daemon=True)
                        for w in range(3)]

    def _run(self, worker: int) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        end = time.monotonic() + self.limit_s
        i = worker
        while not self.stop.is_set() and time.monotonic() < end:
            body: dict[str, Any] = ({"action": "status"} if i % 10 == 9 else
                                    {"action": "generate", "model_pref": PREFS[i % len(PREFS)],
                                     "prompt": "The return value of the function",
                                     "params": {"max_tokens": 8}})
            reply = _request(ctx, self.endpoint, body, 10.0)
            status = "no reply" if reply is None else str(reply.get("status"))
            self.outcomes[status] += 1
            i += 1
            self.stop.wait(self.pause_s)

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)


def demo_config(config: Path, out_dir: Path) -> tuple[Path, Path, dict[str, Any]]:
    """A copy of the config (as JSON, absolute paths) keeping its state in ``out_dir``,
    and a models file with room for every model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    raw = tomllib.loads(config.read_text())
    models_path = (config.parent / raw.get("models_file", "models.toml")).resolve()
    models = models_path.read_text()
    roomy = out_dir / "models.toml"
    lines = []
    for line in models.splitlines():
        if line.startswith("vram_mb"):
            line = "vram_mb = 24000"
        lines.append(line.replace('"../models/', f'"{ROOT / "models"}/'))
    roomy.write_text("\n".join(lines) + "\n")
    raw["models_file"] = str(models_path)
    shim = raw.setdefault("shim", {})
    shim["state_file"] = str(out_dir / "shim-state.json")
    shim["admin_token_file"] = ""
    raw.setdefault("shadow", {})["diff_log"] = str(out_dir / "shadow-diffs.jsonl")
    for name in ("shim-state.json", "shim-state.rollout.json"):
        (out_dir / name).unlink(missing_ok=True)
    path = out_dir / "shim.json"
    path.write_bytes(msgspec.json.format(msgspec.json.encode(raw), indent=2))
    return path, roomy, raw


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shim.rollout.demo",
                                     description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--config", default="config/shim.toml")
    parser.add_argument("--plan", default="config/rollouts/demo.toml")
    parser.add_argument("--rate", type=float, default=6.0, help="requests a second in all")
    parser.add_argument("--limit-s", type=float, default=480.0, help="give up after this")
    args = parser.parse_args(argv)
    config_path, models_path, raw = demo_config(Path(args.config),
                                                ROOT / "state" / "rollout-demo")
    _, plan = load_plan(args.plan)
    token = secrets.token_hex(16)
    stack = subprocess.Popen(
        [sys.executable, "-m", "shim.cli", "stack", "--config", str(config_path),
         "--models", str(models_path), "--log-level", "warning"],
        env={**os.environ, "MMSHIM_TOKEN": token}, cwd=ROOT)
    shim = raw["shim"]
    endpoint = connectable(shim.get("listen", "tcp://*:5570"))
    admin = AdminClient(connectable(shim.get("admin", "tcp://127.0.0.1:9571")), token, 10.0)
    traffic = Traffic(endpoint, args.rate, args.limit_s)
    code = 1
    try:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        health = connectable(shim.get("health", "tcp://*:6570"))
        deadline = time.monotonic() + 30
        while _request(ctx, health, {"action": "health"}, 1.0) is None:
            if stack.poll() is not None or time.monotonic() > deadline:
                print("rollout-demo: the stack did not start (is `make run` already "
                      "running on these ports?)", file=sys.stderr)
                return 1
        print(f"rollout-demo: stack up; traffic ~{args.rate:g} req/s; plan {args.plan}")
        traffic.start()
        time.sleep(5)  # a baseline of MMA answers for the latency gate
        reply = admin.call("rollout_start", plan=plan)
        if reply.get("status") != "ok":
            print(f"rollout-demo: start refused: {reply.get('message')}", file=sys.stderr)
            return 1
        code = _watch(admin, time.monotonic() + args.limit_s)
        final = admin.call("status")
        print(f"\nfinal weights {final.get('weights')}; ownership "
              f"{msgspec.json.encode(final.get('ownership', {}).get('owners', {})).decode()}")
    except (Unreachable, KeyboardInterrupt) as exc:
        print(f"rollout-demo: stopped: {exc or 'interrupted'}", file=sys.stderr)
    finally:
        traffic.finish()
        print(f"traffic: {dict(traffic.outcomes)}")
        admin.close()
        if stack.poll() is None:
            stack.send_signal(signal.SIGTERM)
            try:
                stack.wait(20)
            except subprocess.TimeoutExpired:
                stack.kill()
    return code


def _watch(admin: AdminClient, deadline: float) -> int:
    """Print each new event, and the gates every few seconds, until the rollout ends."""
    started = time.monotonic()
    seen = 0
    last_gates = 0.0
    while time.monotonic() < deadline:
        r = admin.call("rollout_status")["rollout"]
        history = r.get("history", [])
        for h in history[seen:]:
            print(f"[{time.monotonic() - started:6.1f} s] stage {h['stage']} "
                  f"{h['event']}: {h['detail']}", flush=True)
        seen = len(history)
        if r["status"] not in ("running", "paused"):
            print("\n" + show({"rollout": r}))
            return 0 if r["status"] == "completed" else 1
        if time.monotonic() - last_gates >= 5 and r.get("gates"):
            last_gates = time.monotonic()
            gates = "  ".join(f"{g['gate']}={g['verdict']}" for g in r["gates"])
            print(f"[{time.monotonic() - started:6.1f} s]   baked "
                  f"{r['stage']['baked_s']:.0f} s  {gates}", flush=True)
        time.sleep(1.0)
    print("rollout-demo: time limit reached", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Start a shim under test: a JSON config on free loopback ports, then wait until it serves.

The bench configs switch off what the echo backends cannot take part in (model
ownership polling, health probes: the echoes have no health socket), so what is
measured is the data path: decode, route, translate, pool, shadow. Duplicate joins are
off too: the load generator sends the same bytes from every client, which would
otherwise join into fewer backend executions than requests.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import zmq

from bench.procs import Proc, ProcGroup, free_port

POLICY = {"fast": "phi-2", "quality": "mistral-7b", "fallback": "tinyllama",
          "stt": "whisper-small", "tts": "piper-tts"}


def shim_config(work: Path, name: str, backends: dict[str, tuple[str, str]],
                weights: dict[str, float], *, mode: str = "split",
                shadow: dict[str, Any] | None = None,
                actions: dict[str, Any] | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``backends``: name -> (dialect, endpoint)."""
    cfg: dict[str, Any] = {
        "shim": {"listen": f"tcp://127.0.0.1:{free_port()}",
                 "health": f"tcp://127.0.0.1:{free_port()}",
                 "metrics": f"127.0.0.1:{free_port()}",
                 "admin": f"tcp://127.0.0.1:{free_port()}",
                 "state_file": str(work / f"{name}-state.json")},
        "backends": {n: {"dialect": d, "endpoints": [ep]} for n, (d, ep) in backends.items()},
        "routing": {"mode": mode, "weights": weights, "safe_backend": next(iter(backends))},
        "ownership": {"enabled": False},
        "dedup": {"enabled": False},
        "policy": POLICY,
        "shadow": {"diff_log": str(work / f"{name}-diffs.jsonl"), **(shadow or {})},
    }
    if actions:
        cfg["actions"] = actions
    for key, value in (extra or {}).items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


class ShimUnderTest:
    """A running ``python -m shim.cli run`` and its endpoints."""

    def __init__(self, proc: Proc, cfg: dict[str, Any]) -> None:
        self.proc = proc
        self.cfg = cfg
        self.endpoint = cfg["shim"]["listen"]
        self.health_endpoint = cfg["shim"]["health"]
        self.metrics_address = cfg["shim"]["metrics"]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics_text(self) -> str:
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://{self.metrics_address}/metrics",
                                        timeout=3) as resp:
                return str(resp.read().decode())
        except OSError:
            return ""


def start_shim(group: ProcGroup, work: Path, name: str, cfg: dict[str, Any]) -> ShimUnderTest:
    path = work / f"{name}.json"
    path.write_bytes(msgspec.json.format(msgspec.json.encode(cfg), indent=1))
    proc = group.python(name, "shim.cli", "run", "--config", str(path),
                        "--log-level", "warning", "--reset-state")
    return ShimUnderTest(proc, cfg)


def wait_serving(ctx: zmq.Context[zmq.Socket[bytes]], shim: ShimUnderTest, payload: bytes,
                 timeout_s: float = 20.0) -> None:
    """Wait for the health socket, then for a data-path reply that is not a shim error
    (the pool's connections to the backends are made asynchronously)."""
    deadline = time.monotonic() + timeout_s
    last = b""
    for endpoint, body, check in ((shim.health_endpoint, b"?", False),
                                  (shim.endpoint, payload, True)):
        while True:
            if not shim.proc.alive():
                raise RuntimeError(f"shim {shim.proc.name} exited "
                                   f"({shim.proc.proc.returncode}):\n{shim.proc.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"shim {shim.proc.name} not serving after {timeout_s:.0f} s; "
                                   f"last reply {last[:200]!r}\n{shim.proc.log_tail()}")
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            try:
                sock.send(body)
                if sock.poll(500):
                    last = sock.recv()
                    if not check or b"SHIM_" not in last:
                        break
            finally:
                sock.close(0)
            time.sleep(0.1)

"""``mmshim stack``: the shim and both reference backends on a config's ports, as one unit.

Before starting anything it checks that every TCP endpoint the stack will bind is free
(the shim's listen, health, admin and metrics addresses; each backend's request and health
ports), so a taken port fails the whole stack up front instead of after the shim has
accepted traffic. Then it starts the backends, then the shim, saying what it does.

Signals: SIGINT and SIGTERM are forwarded, as the same signal, to every child (the shim
drains, the backends stop); a second one, or children still running after
``STOP_TIMEOUT_S``, gets SIGKILL. Children also get SIGTERM if the stack itself dies
(Linux ``PR_SET_PDEATHSIG``), so no orphan keeps a port.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from shim.config import ShimConfig

STOP_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A TCP address the stack binds, and who binds it (for the message)."""

    what: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.what} {self.host}:{self.port}"


def _host_port(address: str) -> tuple[str, int] | None:
    """``tcp://*:5570`` or ``127.0.0.1:9570`` -> (host, port); None for ipc:// etc."""
    if address.startswith(("ipc://", "inproc://")) or not address:
        return None
    host, _, port = address.removeprefix("tcp://").rpartition(":")
    host = host.strip("[]")
    return ("0.0.0.0" if host in ("*", "") else host), int(port)


def endpoints(cfg: ShimConfig) -> list[Endpoint]:
    """Every TCP endpoint ``mmshim stack`` binds for this config, shim's first."""
    out = []
    for what, address in (("shim listen", cfg.shim.listen), ("shim health", cfg.shim.health),
                          ("shim admin", cfg.shim.admin), ("shim metrics", cfg.shim.metrics)):
        hp = _host_port(address)
        if hp is not None:
            out.append(Endpoint(what, *hp))
    for name, backend in cfg.backends.items():
        for what, address in ((f"{name}", backend.endpoints[0]),
                              (f"{name} health", backend.health)):
            hp = _host_port(address)
            if hp is not None:
                # The reference backends bind the port on loopback (their --host default).
                out.append(Endpoint(what, "127.0.0.1" if hp[0] == "0.0.0.0" else hp[0], hp[1]))
    return out


def endpoint_problem(ep: Endpoint) -> str | None:
    """Why ``ep`` cannot be bound now (in use, bad address), or None when it can."""
    family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # As libzmq and aiohttp do: TIME_WAIT leftovers are no reason to refuse.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ep.host, ep.port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def say(message: str) -> None:
    print(f"mmshim stack: {message}", flush=True)


def run_stack(cfg: ShimConfig, config_path: str, models: str, log_level: str) -> int:
    """Check the endpoints, start the backends then the shim, wait; the exit code
    (3: an endpoint is taken, nothing started; else the first child's failure)."""
    eps = endpoints(cfg)
    say(f"checking {len(eps)} endpoints: " + ", ".join(str(e) for e in eps))
    problems = [(ep, why) for ep in eps if (why := endpoint_problem(ep)) is not None]
    if problems:
        for ep, why in problems:
            print(f"mmshim stack: {ep} cannot be bound: {why}", file=sys.stderr)
        print("mmshim stack: nothing started; free these ports or run on others "
              "(make run CONFIG=path/to/shim.toml)", file=sys.stderr)
        return 3
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    for name, backend in cfg.backends.items():
        port = backend.endpoints[0].rsplit(":", 1)[1]
        cmd = [sys.executable, "-m", f"backends.{backend.dialect}", "--port", port,
               "--models", models]
        if backend.health:
            cmd += ["--health-port", backend.health.rsplit(":", 1)[1]]
        say(f"starting {name} ({backend.dialect} reference backend) on port {port}")
        procs.append((name, subprocess.Popen(cmd, preexec_fn=_die_with_parent)))
    say(f"starting the shim on {cfg.shim.listen} (health {cfg.shim.health}, admin "
        f"{cfg.shim.admin}, status page http://{cfg.shim.metrics}/)")
    procs.append(("shim", subprocess.Popen(
        [sys.executable, "-m", "shim.cli", "run", "--config", config_path,
         "--log-level", log_level], preexec_fn=_die_with_parent)))
    say("running; Ctrl-C (or SIGTERM) stops all")

    got: list[int] = []

    def on_signal(signum: int, frame: Any) -> None:
        got.append(signum)
        for _, proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGKILL if len(got) > 1 else signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        while not got:
            for name, proc in procs:
                if proc.poll() is not None and not got:
                    print(f"mmshim stack: {name} exited with {proc.returncode}; stopping all",
                          file=sys.stderr)
                    code = proc.returncode or 1
                    on_signal(signal.SIGTERM, None)
            time.sleep(0.2)
        if not code:
            say(f"got {signal.Signals(got[0]).name}; stopping {', '.join(n for n, _ in procs)}")
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for name, proc in procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"mmshim stack: {name} did not stop in {STOP_TIMEOUT_S:g} s; killing it",
                      file=sys.stderr)
                proc.kill()
                proc.wait()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    say("stopped")
    return code

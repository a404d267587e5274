"""Helpers for tests that run real processes on real sockets.

Small on purpose; every suite may use it:

- ``free_port()``: a TCP port on 127.0.0.1 nobody listens on right now.
- ``Proc``: a subprocess whose output goes to a file (a temp file by default); ``stop()``
  sends SIGTERM then SIGKILL and returns the exit code, ``kill()`` sends SIGKILL,
  ``log()`` returns the output. The one process helper: bench/procs.py builds on it.
- ``start_backend(kind, models, ...)``: start ``backends.mma`` or ``backends.mms`` on free
  ports and wait until its health socket answers; returns a ``Backend``.
- ``req(endpoint, obj_or_bytes, timeout)``: one request on a fresh REQ socket, the reply
  decoded as JSON; raises ``TimeoutError``.
- ``loaded_on(backend)``: the models a reference backend says it holds (asked directly).
- ``ensure_models()``: build ``models/*.ngram`` if missing (what ``make models`` does).

Paths are resolved from the repository root, so tests work from any working directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import zmq

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = REPO_ROOT / "models"
MODEL_FILES = ("tiny.ngram", "base.ngram")
DEFAULT_MODELS_TOML = REPO_ROOT / "config" / "models.toml"


#: Ports below the kernel's ephemeral range (32768+ here): an outgoing connection never
#: takes one of them as its source port between our check and the server's bind.
_PORT_RANGE = (20000, 32000)
_PR_SET_PDEATHSIG = 1
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and not handed out before by this process."""
    rng = random.SystemRandom()
    for _ in range(1000):
        port = rng.randrange(*_PORT_RANGE)
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port found")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class Proc:
    """A subprocess with its stdout and stderr captured to a file (see ``log()``): the
    one process helper of the tests and the benchmarks (bench/procs.py builds on it).

    ``log_path``: keep the output in that file; otherwise a temp file, removed once the
    process is reaped (its text is kept in memory). ``pipe_stdout``: stdout is a pipe
    (``popen.stdout``) instead. ``die_with_parent``: the child gets
    ``PR_SET_PDEATHSIG = SIGKILL``, so it dies even when this process is SIGKILLed.
    Usable as a context manager: leaving the block stops the process.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str = REPO_ROOT,
        log_path: Path | None = None,
        pipe_stdout: bool = False,
        die_with_parent: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        if log_path is None:
            self._log: IO[bytes] = tempfile.NamedTemporaryFile(  # noqa: SIM115 - _reap
                prefix="proc-", suffix=".log", delete=False)
        else:
            self._log = log_path.open("wb")
        self._final_log: str | None = None
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.popen = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe_stdout else self._log,
            stderr=self._log,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def poll(self) -> int | None:
        """The exit code, or None while running."""
        return self.popen.poll()

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 2.0) -> int:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL; returns the exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._reap()
        return self.popen.returncode

    def kill(self) -> int:
        """SIGKILL now; returns the exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
        self.popen.wait()
        self._reap()
        return self.popen.returncode

    def log(self) -> str:
        """Everything the process wrote to its log so far (kept after it stops)."""
        if self._final_log is not None:
            return self._final_log
        with contextlib.suppress(ValueError):  # closed already
            self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of ``log()``."""
        try:
            return "\n".join(self.log().splitlines()[-lines:])
        except OSError:
            return ""

    def _reap(self) -> None:
        """Close the log and the pipe; a temp log is kept in memory and removed."""
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        if self._final_log is None and self.log_path is None:
            self._final_log = self.log()
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
        else:
            self._log.close()

    def __enter__(self) -> Proc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@dataclass
class Backend:
    """A running reference backend and where to reach it."""

    kind: str
    proc: Proc
    port: int
    health_port: int

    @property
    def endpoint(self) -> str:
        """Main (ROUTER) socket, e.g. ``tcp://127.0.0.1:5580``."""
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def health_endpoint(self) -> str:
        """Health (REP) socket."""
        return f"tcp://127.0.0.1:{self.health_port}"

    def stop(self, timeout: float = 2.0) -> int:
        """Stop the process (see ``Proc.stop``)."""
        return self.proc.stop(timeout)

    def __enter__(self) -> Backend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.proc.stop()


def req(endpoint: str, obj_or_bytes: Any, timeout: float = 5.0) -> dict[str, Any]:
    """Send one request on a new REQ socket and return the decoded JSON reply.

    ``bytes`` are sent as they are; anything else is JSON-encoded. Raises ``TimeoutError``
    when no reply arrives within ``timeout`` seconds.
    """
    payload = obj_or_bytes if isinstance(obj_or_bytes, bytes) else json.dumps(obj_or_bytes).encode()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(payload)
        if not sock.poll(int(timeout * 1000), zmq.POLLIN):
            raise TimeoutError(f"no reply from {endpoint} within {timeout} s")
        reply: dict[str, Any] = json.loads(sock.recv())
        return reply
    finally:
        sock.close(linger=0)


def loaded_on(backend: Backend, timeout: float = 3.0) -> set[str] | None:
    """What a reference backend itself says it has loaded (asked directly, in its own
    dialect, never through the shim); None when it does not answer in ``timeout`` s or
    answers something else."""
    request = ({"command": "GET_LOADED_MODELS_STATUS"} if backend.kind == "mma"
               else {"action": "get_loaded_models_status"})
    try:
        return set(req(backend.endpoint, request, timeout=timeout)["loaded_models"])
    except (TimeoutError, KeyError, TypeError, ValueError):
        return None


def _wait_health(backend: Backend, deadline_s: float) -> bool:
    """Lazy Pirate: poll the health socket, new socket per try; False if the process died."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if backend.proc.poll() is not None:
            return False
        try:
            req(backend.health_endpoint, b"ping", timeout=0.25)
            return True
        except TimeoutError:
            continue
    return False


def start_backend(
    kind: str,
    models: Path | str = "config/models.toml",
    *,
    port: int | None = None,
    health_port: int | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Backend:
    """Start ``python -m backends.<kind>`` (kind: ``"mma"`` or ``"mms"``) on free ports.

    ``models`` is relative to the repository root unless absolute. Returns once the health
    socket answers; raises ``RuntimeError`` with the process log if it does not. When the
    ports were picked here and another process took one first, it retries on new ports.
    """
    if kind not in ("mma", "mms"):
        raise ValueError(f"unknown backend kind {kind!r}")
    models_path = Path(models)
    if not models_path.is_absolute():
        models_path = REPO_ROOT / models_path
    attempts = 1 if port and health_port else 3
    for attempt in range(attempts):
        main, health = port or free_port(), health_port or free_port()
        argv = [
            sys.executable, "-m", f"backends.{kind}",
            "--host", "127.0.0.1",
            "--port", str(main),
            "--health-port", str(health),
            "--models", str(models_path),
            *extra_args,
        ]
        backend = Backend(kind, Proc(argv, env=env), main, health)
        if _wait_health(backend, timeout):
            return backend
        died = backend.proc.poll() is not None
        code = backend.proc.kill()
        log = backend.proc.log()
        if "Address already in use" not in log or attempt == attempts - 1:
            why = f"exited with code {code}" if died else f"did not answer within {timeout} s"
            raise RuntimeError(f"{kind} backend {why}:\n{log}")
    raise AssertionError("unreachable")


def ensure_models() -> Path:
    """Build the default n-gram model files into ``models/`` if any is missing."""
    if all((MODELS_DIR / name).exists() for name in MODEL_FILES):
        return MODELS_DIR
    subprocess.run(
        [sys.executable, "-m", "backends.build_models", "--out", str(MODELS_DIR)],
        cwd=REPO_ROOT,
        check=True,
    )
    return MODELS_DIR

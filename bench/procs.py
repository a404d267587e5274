"""Child processes for the benchmark: started on free loopback ports, always cleaned up.

Every child gets ``PR_SET_PDEATHSIG = SIGKILL``, so even a benchmark that is itself
SIGKILLed leaves nothing running; a normal exit stops children with SIGTERM and falls
back to SIGKILL. ``cpu_seconds`` and ``rss_kb`` read a process's own accounting from /proc.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import tests.procs
from tests.procs import free_port as free_port  # one port picker for tests and bench

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")



class Proc(tests.procs.Proc):
    """A named child process (tests/procs.Proc, the one process helper) whose output goes
    to ``<log_dir>/<name>.log``, killed with the benchmark (``PR_SET_PDEATHSIG``).
    ``ready_line``: stdout is a pipe that ``wait_ready`` reads."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, *,
                 ready_line: bool = False, env: dict[str, str] | None = None) -> None:
        self.name = name
        super().__init__(argv, env=env, cwd=ROOT, log_path=log_dir / f"{name}.log",
                         pipe_stdout=ready_line, die_with_parent=True)

    @property
    def proc(self) -> subprocess.Popen[bytes]:
        """The ``subprocess.Popen`` (bench code's name for ``popen``)."""
        return self.popen

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        """Wait for the child's ``READY`` line on stdout (bench.echo prints one)."""
        assert self.popen.stdout is not None
        deadline = time.monotonic() + timeout_s
        buf = b""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.popen.stdout], [], [], 0.1)
            if r:
                chunk = os.read(self.popen.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                if b"READY" in buf:
                    return
            elif not self.alive():
                break
        raise RuntimeError(f"{self.name} did not become ready:\n{self.log_tail()}")

class ProcGroup:
    """Every child of one benchmark run; ``close`` stops them all (last started first)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], **kw: object) -> Proc:
        proc = Proc(name, argv, self.log_dir, **kw)  # type: ignore[arg-type]
        self.procs.append(proc)
        return proc

    def python(self, name: str, module: str, *args: str, **kw: object) -> Proc:
        return self.start(name, [sys.executable, "-m", module, *args], **kw)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    proc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.proc.wait(max(0.05, deadline - time.monotonic()))
            proc.kill()


def cpu_seconds(pid: int) -> float:
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of stat(5)


def rss_kb(pid: int) -> int:
    """VmRSS of the process in kB (0 when it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0

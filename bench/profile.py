"""Sample a running shim with py-spy while load runs, and summarise where its time goes.

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``); the
summary ranks functions by self samples (time in the function itself) and by inclusive
samples (time with the function anywhere on the stack). Idle time (the event loop
waiting in epoll) is not sampled, so percentages are of the shim's busy time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    """The py-spy executable next to this interpreter, or on PATH."""
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, out: Path, rate: int = 200) -> subprocess.Popen[bytes]:
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy not installed (pip install py-spy)")
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                             "--rate", str(rate), "--format", "raw", "--nonblocking",
                             "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker.startswith("/lib/"):
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    else:
        if "/shim/" in path:
            path = "shim/" + path.split("/shim/", 1)[1]
    return f"{path}:{m.group('func')}"


def summarize(raw: Path, top: int = 25) -> str:
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [_short(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n
    if not total:
        return "py-spy: no samples"
    lines = [f"py-spy: {total} busy samples", "", "Top self time (function itself):"]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in self_c.most_common(top)]
    lines += ["", "Top inclusive time (shim code only):"]
    shim_incl = [(f, c) for f, c in incl_c.most_common() if f.startswith("shim/")]
    lines += [f"  {c / total:6.1%}  {f}" for f, c in shim_incl[:top]]
    return "\n".join(lines)

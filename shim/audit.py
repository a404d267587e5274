"""The audit trail: one line per runtime change, who made it and what it changed.

Each change goes to the ``mmshim.audit`` logger and, as a JSON line, to an audit file
next to the state file, so "who moved the weights at 03:12?" has an answer after the
process log has rotated away.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

log = logging.getLogger("mmshim.audit")

#: ``{"weights.mma": [100.0, 90.0], ...}``: dotted path -> [old, new].
Changes = dict[str, list[Any]]


def changes_between(old: Any, new: Any, prefix: str = "") -> Changes:
    """The leaves that differ between two JSON-like values, by dotted path."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: Changes = {}
        for key in [*old, *(k for k in new if k not in old)]:
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old or key not in new:
                out[path] = [old.get(key), new.get(key)]
            else:
                out.update(changes_between(old[key], new[key], path))
        return out
    return {} if old == new else {prefix: [old, new]}


def format_changes(changes: Changes) -> str:
    if not changes:
        return "no change"
    return ", ".join(f"{path} {_short(old)} -> {_short(new)}"
                     for path, (old, new) in changes.items())


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else msgspec.json.encode(value).decode()


class AuditLog:
    """Records changes to the log and, when ``path`` is set, to a JSON-lines file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def record(self, client: str, command: str, changes: Changes,
               detail: dict[str, Any] | None = None) -> None:
        now = time.time()
        log.info("%s by %s: %s", command, client, format_changes(changes))
        if self.path is None:
            return
        entry = {
            "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="milliseconds"),
            "client": client,
            "command": command,
            "old": {path: old for path, (old, _) in changes.items()},
            "new": {path: new for path, (_, new) in changes.items()},
            **(detail or {}),
        }
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "ab") as f:  # owner-only: who changed what, from where
                f.write(msgspec.json.encode(entry) + b"\n")
        except OSError as exc:  # the change is made; losing its record must not undo it
            log.error("cannot append to audit file %s: %s", self.path, exc.strerror)

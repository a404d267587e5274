"""The shadow diff log (JSON lines, size-bounded, rotated) and the report read from it.

Three kinds of record, one JSON object per line:

- ``{"kind": "mismatch", "ts", "action", "primary", "shadow", "request",
  "primary_reply", "shadow_reply", "diffs": [{"path", "kind", "primary", "shadow"}],
  "noise": [...], "secondary_reply"?}``: one per mismatching comparison;
- ``{"kind": "error", "ts", "action", "outcome", "shadow", "request", "error"}``: an
  example of a shadow error or timeout, at most one per action and outcome per tally;
- ``{"kind": "tally", "ts", "counts": {action: {outcome: n}}, "noise": {action: {path:
  n}}}``: every outcome since the previous tally, written every few seconds while there
  is traffic, and on close. Mismatch rates come from these, so the log stays small when
  everything matches.

Records are written by a thread of their own (shim.logfile: the standard library's
``QueueListener`` and ``RotatingFileHandler``): the event loop only puts them on a bounded
queue (full: the record is dropped and counted). When a write would take the file past
``max_bytes`` the file is rotated: ``log`` -> ``log.1`` -> ... -> ``log.<backups>``
(without backups it is emptied). Files are 0600. JSON is msgspec's.

``Tally`` folds records (from a log, or straight from a parity run) into the report that
``mmshim diffs`` and ``mmshim parity`` print.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from shim.logfile import LineWriter, PrivateRotatingFileHandler
from shim.privacy import redact_record

#: The outcomes of one shadow comparison (the ``outcome`` label of shim_shadow_total).
OUTCOMES = ("match", "mismatch", "shadow_error", "shadow_timeout", "shed")
#: Outcomes that mean the shadow did not answer usefully (the parity gate counts them).
FAILURES = ("mismatch", "shadow_error", "shadow_timeout", "primary_error")


def dumps(record: Any) -> str:
    """One log line (no newline): compact JSON, msgspec's encoding (sets and tuples as
    arrays, bytes as base64, NaN as null), anything else it cannot encode as its
    ``repr``; never raises."""
    try:
        return msgspec.json.encode(record, enc_hook=repr).decode()
    except (TypeError, ValueError, OverflowError, RecursionError) as exc:
        return msgspec.json.encode({"unencodable": type(exc).__name__,
                                    "repr": repr(record)[:200]}).decode()


# -- writing ---------------------------------------------------------------------------

class DiffLog:
    """The diff log of a running shim: records go to a writer thread, outcomes are
    tallied here and written as a tally record every ``tally_s`` seconds.

    The file is a ``shim.logfile.PrivateRotatingFileHandler`` (0600; rotated at
    ``max_bytes`` = ``shadow.diff_log_max_bytes``, ``backups`` =
    ``shadow.diff_log_backups`` older files kept) fed by a ``shim.logfile.LineWriter``
    (the standard library's QueueListener on a bounded queue of ``queue_size`` records).
    Raises ``OSError`` when the file cannot be opened.
    """

    def __init__(self, path: str | Path, max_bytes: int, backups: int, *,
                 tally_s: float = 2.0, queue_size: int = 10_000,
                 payloads: bool = False) -> None:
        """``payloads``: write requests and replies as they are (``shadow.log_payloads``);
        otherwise as hash, length and shape (shim.privacy)."""
        self.path = Path(path)
        self.payloads = payloads
        self.max_bytes, self.backups = max_bytes, backups
        #: A record longer than this has its request and replies cut down.
        self.max_line = max(1024, max_bytes // 8)
        self._lock = threading.Lock()
        self._counts: dict[str, Counter[str]] = {}
        self._noise: dict[str, Counter[str]] = {}
        self._examples: set[tuple[str, str]] = set()
        self._file = PrivateRotatingFileHandler(path, max_bytes, backups)
        self._writer: LineWriter[dict[str, Any]] = LineWriter(
            self._file, self._line, queue_size=queue_size, tick_s=tally_s,
            tick=self._take_tally)
        self._writer.start()

    @property
    def dropped(self) -> int:
        """Records refused because the writer's queue was full."""
        return self._writer.dropped

    @property
    def written(self) -> int:
        """Records handed to the file (tallies not counted)."""
        return self._writer.written

    @property
    def write_errors(self) -> int:
        """Lines the file refused (a full disk): counted, the first one logged."""
        return self._file.errors_seen

    # called on the event loop ----------------------------------------------------------

    def count(self, action: str, outcome: str, noise: Iterable[str] = ()) -> None:
        """One comparison's outcome (and the generalized paths found to be noise)."""
        with self._lock:
            self._counts.setdefault(action, Counter())[outcome] += 1
            for path in noise:
                self._noise.setdefault(action, Counter())[path] += 1

    def wants_example(self, action: str, outcome: str) -> bool:
        """True the first time in a tally window, so errors are logged by example."""
        key = (action, outcome)
        with self._lock:
            if key in self._examples:
                return False
            self._examples.add(key)
            return True

    def write(self, record: dict[str, Any]) -> None:
        """Queue a record; never blocks (a full queue drops it and counts the drop)."""
        self._writer.put(record)

    def close(self, timeout: float = 5.0) -> None:
        """Write everything queued and the last tally, then stop the thread and close
        the file (blocks up to about ``2 * timeout`` s: call it off the event loop)."""
        self._writer.close(timeout)

    # the writer thread -----------------------------------------------------------------

    def _line(self, record: dict[str, Any]) -> str:
        if not self.payloads:
            record = redact_record(record)
        line = dumps(record)
        if len(line) <= self.max_line:
            return line
        cut = dict(record)
        for key in ("request", "primary_reply", "shadow_reply", "secondary_reply"):
            if key in cut:
                size = len(dumps(cut[key]))
                cut[key] = {"truncated": True, "bytes": size}
        cut["diffs"] = [{**d, "primary": _short(d.get("primary"), 200),
                         "shadow": _short(d.get("shadow"), 200)}
                        for d in cut.get("diffs") or () if isinstance(d, dict)][:50]
        line = dumps(cut)
        if len(line) <= self.max_line:
            return line
        keep: dict[str, Any] = {
            k: record[k] for k in ("kind", "ts", "action", "outcome", "primary", "shadow")
            if k in record}
        keep["diffs"] = [{k: d.get(k) for k in ("path", "group", "kind")}
                         for d in cut["diffs"][:20]]
        keep["truncated"] = True
        return dumps(keep)

    def _take_tally(self) -> str | None:
        with self._lock:
            counts, noise = self._counts, self._noise
            self._counts, self._noise = {}, {}
            self._examples.clear()
        if not counts and not noise:
            return None
        return dumps({"kind": "tally", "ts": round(time.time(), 3),
                      "counts": {a: dict(c) for a, c in counts.items()},
                      "noise": {a: dict(c) for a, c in noise.items()}})


# -- reading ---------------------------------------------------------------------------

def _backup(path: Path, i: int) -> Path:
    return path.with_name(f"{path.name}.{i}")


def log_files(path: str | Path) -> list[Path]:
    """The log and its backups that exist, oldest first."""
    path = Path(path)
    backups = []
    i = 1
    while _backup(path, i).exists():
        backups.append(_backup(path, i))
        i += 1
    return [*reversed(backups), *([path] if path.exists() else [])]


def read_records(path: str | Path) -> Iterator[dict[str, Any]]:
    """Every record of the log and its backups, oldest first; torn lines are skipped."""
    for file in log_files(path):
        with file.open("rb") as f:
            for line in f:
                try:
                    record = msgspec.json.decode(line)
                except msgspec.DecodeError:
                    continue
                if isinstance(record, dict):
                    yield record


# -- the report ------------------------------------------------------------------------

@dataclass
class PathStats:
    """How often one (generalized) path differed, and the first example of it."""

    count: int = 0
    example: dict[str, Any] | None = None


@dataclass
class ActionStats:
    """Everything the report says about one action."""

    counts: Counter[str] = field(default_factory=Counter)
    paths: dict[str, PathStats] = field(default_factory=dict)
    noise: Counter[str] = field(default_factory=Counter)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def compared(self) -> int:
        return self.counts["match"] + self.counts["mismatch"]

    @property
    def attempted(self) -> int:
        return sum(n for outcome, n in self.counts.items() if outcome not in ("shed", "skipped"))

    @property
    def mismatch_rate(self) -> float:
        return self.counts["mismatch"] / self.compared if self.compared else 0.0

    @property
    def failure_rate(self) -> float:
        failed = sum(self.counts[o] for o in FAILURES)
        return failed / self.attempted if self.attempted else 0.0


class Tally:
    """Folds log records into per-action statistics (``add``), then reports them."""

    def __init__(self) -> None:
        self.actions: dict[str, ActionStats] = {}
        self.first_ts: float | None = None
        self.last_ts: float | None = None

    def _stats(self, action: str) -> ActionStats:
        return self.actions.setdefault(action, ActionStats())

    def add(self, record: dict[str, Any]) -> None:
        kind = record.get("kind")
        ts = record.get("ts")
        if isinstance(ts, int | float):
            self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
            self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)
        if kind == "tally":
            for action, counts in _dict(record.get("counts")).items():
                for outcome, n in _dict(counts).items():
                    if isinstance(n, int):
                        self._stats(action).counts[outcome] += n
            for action, paths in _dict(record.get("noise")).items():
                for path, n in _dict(paths).items():
                    if isinstance(n, int):
                        self._stats(action).noise[path] += n
        elif kind == "mismatch":
            stats = self._stats(str(record.get("action")))
            seen: set[str] = set()
            for diff in record.get("diffs") or ():
                if not isinstance(diff, dict):
                    continue
                path = str(diff.get("group") or diff.get("path"))
                if path in seen:  # count each path once per request
                    continue
                seen.add(path)
                entry = stats.paths.setdefault(path, PathStats())
                entry.count += 1
                if entry.example is None:
                    entry.example = {"path": diff.get("path"), "kind": diff.get("kind"),
                                     "primary": diff.get("primary"),
                                     "shadow": diff.get("shadow"),
                                     "request": record.get("request")}
        elif kind == "error":
            stats = self._stats(str(record.get("action")))
            outcome = str(record.get("outcome"))
            stats.errors.setdefault(outcome, {"error": record.get("error"),
                                              "request": record.get("request")})

    def count(self, action: str, outcome: str, n: int = 1) -> None:
        """Outcomes seen directly (a parity run), not through tally records."""
        self._stats(action).counts[outcome] += n

    def count_noise(self, action: str, path: str) -> None:
        self._stats(action).noise[path] += 1

    def add_all(self, records: Iterable[dict[str, Any]]) -> Tally:
        for record in records:
            self.add(record)
        return self

    def total(self) -> ActionStats:
        total = ActionStats()
        for stats in self.actions.values():
            total.counts.update(stats.counts)
        return total

    def as_json(self, top: int = 5) -> dict[str, Any]:
        def one(stats: ActionStats) -> dict[str, Any]:
            return {
                "compared": stats.compared,
                **{o: stats.counts[o] for o in (*OUTCOMES, "primary_error", "skipped")
                   if stats.counts[o] or o in OUTCOMES},
                "mismatch_rate": round(stats.mismatch_rate, 6),
                "failure_rate": round(stats.failure_rate, 6),
                "paths": [{"path": p, "count": s.count, "example": s.example}
                          for p, s in _top(stats.paths, top)],
                "noise": dict(stats.noise.most_common(top)),
                "errors": stats.errors,
            }
        return {
            "from": self.first_ts, "to": self.last_ts,
            "actions": {a: one(s) for a, s in sorted(self.actions.items())},
            "total": {k: v for k, v in one(self.total()).items()
                      if k not in ("paths", "noise", "errors")},
        }

    def format(self, top: int = 5, width: int = 100) -> str:
        """The human-readable report: a table per action, then paths with an example."""
        if not self.actions:
            return "no shadow comparisons recorded"
        lines = []
        if self.first_ts is not None and self.last_ts is not None:
            lines.append(f"window: {_when(self.first_ts)} .. {_when(self.last_ts)}")
        header = (f"{'action':<20}{'compared':>9}{'mismatch':>9}{'rate':>8}{'errors':>8}"
                  f"{'timeouts':>9}{'shed':>7}")
        lines.append(header)
        rows = sorted(self.actions.items())
        for action, s in [*rows, ("TOTAL", self.total())]:
            errors = s.counts["shadow_error"] + s.counts["primary_error"]
            lines.append(f"{action:<20}{s.compared:>9}{s.counts['mismatch']:>9}"
                         f"{s.mismatch_rate:>8.1%}{errors:>8}{s.counts['shadow_timeout']:>9}"
                         f"{s.counts['shed']:>7}")
        for action, s in rows:
            if s.paths:
                lines.append("")
                lines.append(f"{action}: most frequent differing paths")
                for path, p in _top(s.paths, top):
                    ex = p.example or {}
                    lines.append(f"  {p.count:>6}  {path}  ({ex.get('kind')})")
                    lines.append("          e.g. primary=" + _short(ex.get("primary"), 40)
                                 + " shadow=" + _short(ex.get("shadow"), 40))
                    lines.append("          request " + _short(ex.get("request"), width - 18))
            if s.noise:
                lines.append(f"{action}: noise (primary and its secondary differ too): "
                             + ", ".join(f"{p} x{n}" for p, n in s.noise.most_common(top)))
            for outcome, ex in s.errors.items():
                lines.append(f"{action}: {outcome}, e.g. {_short(ex.get('error'), 60)}")
        return "\n".join(lines)


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _top(paths: dict[str, PathStats], n: int) -> list[tuple[str, PathStats]]:
    return sorted(paths.items(), key=lambda kv: (-kv[1].count, kv[0]))[:n]


def _short(value: object, limit: int) -> str:
    text = dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


__all__ = ["FAILURES", "OUTCOMES", "DiffLog", "Tally", "dumps", "log_files", "read_records"]

"""Private, size-bounded, rotated line files, written by a thread of their own.

The building blocks of the shadow diff log (shim.difflog) and the capture file
(shim.record), both from the standard library's ``logging.handlers``:

- ``PrivateRotatingFileHandler``: a ``RotatingFileHandler`` (``path`` -> ``path.1`` ->
  ... ``path.<backups>``, each at most ``max_bytes``; with ``backups = 0`` the file is
  emptied instead) whose files are created mode 0600 whatever the umask (an existing
  regular file is narrowed too), in a directory created 0700 when it is missing. A write
  that fails (a full disk) is counted in ``errors_seen`` and logged once, never raised.
- ``LineWriter``: a ``QueueListener`` on a bounded ``queue.Queue``. The event loop only
  calls ``put(item)``, which never blocks (a full queue refuses the item and counts it in
  ``dropped``); the listener's thread turns each item into one line with ``render(item)``
  (None: nothing to write) and hands it to the handler. With ``tick_s``, ``tick()`` is
  called on that thread every ``tick_s`` seconds and once more on ``close``; the line it
  returns, if any, is written too (the diff log's tally records).

An exception in ``render`` or ``tick`` is logged and the item skipped: the thread never
dies (a dead QueueListener thread would silently stop the file).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

log = logging.getLogger("mmshim.logfile")

T = TypeVar("T")

_TICK = object()  # what dequeue returns when a tick is due and the queue is empty


class _Bounded(queue.Queue[Any]):
    """A bounded queue whose ``task_done`` does nothing: QueueListener calls it after
    every dequeued record, ticks included, and nobody ``join``s this queue."""

    def task_done(self) -> None:
        pass


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A ``RotatingFileHandler`` for private files (see the module docstring).

    ``max_bytes`` below 1 is taken as 1, ``backups`` below 0 as 0. Raises ``OSError``
    when the file cannot be opened (it is opened here, not on first write).
    """

    def __init__(self, path: str | Path, max_bytes: int, backups: int) -> None:
        path = Path(path)
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        #: Failed writes since the file was opened (the first one is logged).
        self.errors_seen = 0
        super().__init__(path, maxBytes=max(1, max_bytes), backupCount=max(0, backups),
                         encoding="utf-8")
        self.setFormatter(logging.Formatter("%(message)s"))

    def _open(self) -> Any:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, 0o600)  # an existing file is narrowed too (not /dev/...)
        return os.fdopen(fd, "a", encoding="utf-8")

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        """As the standard library's, except that an empty file is never rotated (a line
        longer than ``max_bytes`` goes into the file it finds empty)."""
        if self.stream is None:
            self.stream = self._open()
        self.stream.seek(0, os.SEEK_END)
        return self.stream.tell() > 0 and bool(super().shouldRollover(record))

    def doRollover(self) -> None:
        """As the standard library's; without backups, the file is emptied (the standard
        library would reopen it as it is and let it grow)."""
        super().doRollover()
        if self.backupCount == 0 and self.stream is not None:
            self.stream.truncate(0)

    def close(self) -> None:
        """Flush and close; a last flush that fails (a full disk) is counted like a
        failed write, not raised."""
        try:
            super().close()
        except OSError:
            self.handleError(logging.makeLogRecord({}))

    def handleError(self, record: logging.LogRecord) -> None:
        self.errors_seen += 1
        if self.errors_seen == 1:
            log.exception("cannot write %s (further errors are counted, not logged)",
                          self.baseFilename)


class LineWriter(logging.handlers.QueueListener, Generic[T]):
    """Items in, lines out, on a thread of its own (see the module docstring).

    ``queue_size``: items the queue holds (at least 1). ``tick`` and ``tick_s`` (seconds)
    come together or not at all (ValueError).
    """

    def __init__(self, handler: logging.Handler, render: Callable[[T], str | None], *,
                 queue_size: int, tick_s: float | None = None,
                 tick: Callable[[], str | None] | None = None) -> None:
        if (tick is None) != (tick_s is None):
            raise ValueError("tick and tick_s go together")
        self._bounded = _Bounded(max(1, queue_size))
        super().__init__(self._bounded, handler)
        self._handler = handler
        self._render = render
        self._tick_s = tick_s
        self._tick = tick
        self._next_tick = 0.0
        self._lock = threading.Lock()
        #: Items refused because the queue was full.
        self.dropped = 0
        #: Items rendered into a line and handed to the handler (ticks not counted).
        self.written = 0

    # -- the event loop's side ---------------------------------------------------------

    def put(self, item: T) -> bool:
        """Queue ``item``; never blocks. False (and counted in ``dropped``) when full."""
        try:
            self._bounded.put_nowait(item)
        except queue.Full:
            with self._lock:
                self.dropped += 1
            return False
        return True

    def start(self) -> None:
        if self._tick_s is not None:
            self._next_tick = time.monotonic() + self._tick_s
        super().start()

    def stop(self) -> None:
        """``close()`` with its default timeout (QueueListener's name)."""
        self.close()

    def close(self, timeout: float = 10.0) -> bool:
        """Write what is queued (and the last tick), then stop the thread and close the
        handler. Blocks up to about ``2 * timeout`` s; False when the thread did not
        finish in time (a full queue that does not drain): it is left to die with the
        process and what it still holds is lost."""
        thread = self._thread
        try:
            self._bounded.put(None, timeout=timeout)  # None: QueueListener's sentinel
        except queue.Full:
            log.error("%s: the writer did not drain its queue in time", self._name())
            return False
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.error("%s: the writer did not stop in time", self._name())
                return False
        self._thread = None
        if self._tick is not None:
            self._emit(self._safely(self._tick))
        self._handler.close()
        return True

    # -- the writer thread -------------------------------------------------------------

    def dequeue(self, block: bool) -> Any:
        if self._tick_s is None:
            return self._bounded.get(block)
        wait = max(0.0, self._next_tick - time.monotonic())
        try:
            return self._bounded.get(block, wait)
        except queue.Empty:
            return _TICK

    def handle(self, record: Any) -> None:
        if record is not _TICK:
            line = self._safely(self._render, record)
            if line is not None:
                self.written += 1
                self._emit(line)
        if self._tick is not None and self._tick_s is not None and (
                time.monotonic() >= self._next_tick):
            self._emit(self._safely(self._tick))
            self._next_tick = time.monotonic() + self._tick_s

    def _safely(self, fn: Callable[..., str | None], *args: Any) -> str | None:
        try:
            return fn(*args)
        except Exception:
            log.exception("%s: cannot render a line; skipped", self._name())
            return None

    def _emit(self, line: str | None) -> None:
        if line is not None:
            self._handler.handle(logging.makeLogRecord(
                {"msg": line, "levelno": logging.INFO, "levelname": "INFO",
                 "name": "mmshim.logfile"}))

    def _name(self) -> str:
        return str(getattr(self._handler, "baseFilename", "line writer"))


__all__ = ["LineWriter", "PrivateRotatingFileHandler"]

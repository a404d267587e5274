"""Recording live traffic: the record addon and its capture file (see shim.capture).

While recording is on (``[record] enabled = true`` at start, or ``mmshim ctl record
start``), every exchange the shim answered with a backend's reply is written to the
capture file: the request, the reply the client got, the backend, the backend round
trip, the model and conversation, the caller's form. The shim's own error replies
(timeouts, no backend) are not exchanges with a backend and are not recorded.

Off the hot path: ``after_reply`` runs once the client has its reply and only puts a
tuple of references on a bounded ``queue.Queue`` (``record.queue_size``); a full queue
sheds the exchange and counts it (``shim_record_total{outcome="shed"}``). The standard
library's ``logging.handlers.QueueListener`` drains the queue on a thread of its own,
where the JSON is decoded, redacted (shim.capture.redact) and encoded, and a
``logging.handlers.RotatingFileHandler`` writes and rotates it (``capture.jsonl`` ->
``capture.jsonl.1`` ... ``.<backups>``, each at most ``max_bytes``). The capture file is
created mode 0600 and its directory, when this creates it, 0700.

``percent`` samples whole conversations (a hash of the sticky key, salted apart from the
routing and shadow samples), so a sampled conversation keeps every turn in order;
requests without the key are sampled at random.

Admin commands (``mmshim ctl record start|stop|status``): ``record_start {percent?,
max_bytes?}``, ``record_stop``, ``record_status``. The capture path and whether payloads
are kept come from the config file only: the admin socket cannot make the shim write
prompts, or write anywhere else.
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import queue
import threading
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import msgspec
from prometheus_client import Counter

from shim.addons.base import Addon, Flow
from shim.capture import exchange_record
from shim.config import RecordSection
from shim.dialects import Op
from shim.difflog import dumps
from shim.errors import CommandError
from shim.logfile import PrivateRotatingFileHandler as CaptureFileHandler
from shim.metrics import Metrics
from shim.routing import in_sample
from shim.runtime import Runtime

log = logging.getLogger("mmshim.record")

#: An exchange as the event loop hands it over: (send time, op, backend, request bytes,
#: reply bytes, backend round trip in ms or None).
Item = tuple[float, Op, str, bytes, bytes, float | None]

#: Bounds of what the admin socket may set.
MAX_BYTES_RANGE = (4096, 1 << 40)


class RecordStartArgs(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """``record_start``'s arguments, checked by msgspec (a bool is no number here, an
    unknown field is refused): the path and payloads come from the config file only."""

    #: Percent of conversations recorded, in (0, 100]; None: keep the current one.
    percent: Annotated[float, msgspec.Meta(gt=0, le=100)] | None = None
    #: Size at which the capture file rotates, in bytes; None: keep the current one.
    max_bytes: Annotated[int, msgspec.Meta(ge=MAX_BYTES_RANGE[0],
                                           le=MAX_BYTES_RANGE[1])] | None = None


def in_record_sample(key: object, percent: float) -> bool:
    """Is a request with this sticky key (None: none) among the ``percent`` recorded?
    (shim.routing.in_sample, salted apart from routing and shadow buckets.)"""
    return in_sample(key, percent, "record")


def _decode(raw: bytes) -> Any:
    try:
        return msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return {"undecodable": raw[:200].decode("utf-8", "replace"), "bytes": len(raw)}


class _Listener(logging.handlers.QueueListener):
    """The writer thread: turns queued items into capture lines (JSON, redacted)."""

    def __init__(self, q: queue.Queue[Any], handler: CaptureFileHandler, payloads: bool,
                 written: Any) -> None:
        super().__init__(q, handler)
        self._bounded = q
        self._payloads = payloads
        self._written = written
        self._seq = 0
        self.written = 0

    def prepare(self, record: Any) -> logging.LogRecord:
        sent, op, backend, request, reply, latency_ms = record
        line = dumps(exchange_record(seq=self._seq, ts=sent, op=op, request=_decode(request),
                                     reply=_decode(reply), backend=backend,
                                     latency_ms=latency_ms, payloads=self._payloads))
        self._seq += 1
        self.written += 1
        self._written.inc()
        return logging.makeLogRecord({"msg": line, "levelno": logging.INFO,
                                      "levelname": "INFO", "name": "mmshim.capture"})

    def enqueue_sentinel(self) -> None:
        # The queue is bounded: wait for room rather than fail (put_nowait would raise).
        self._bounded.put(None, timeout=10)  # None: QueueListener's sentinel


class Recorder(Addon):
    """The record addon. Started and stopped with the shim."""

    name = "record"

    def __init__(self, section: RecordSection, metrics: Metrics, sticky_key: str = "") -> None:
        self._section = section
        self._sticky_key = sticky_key
        self.path = Path(section.path)
        self.percent = section.percent
        self.max_bytes = section.max_bytes
        self.payloads = section.payloads
        self.active = False
        self.started_at: float | None = None
        counter = Counter("shim_record", "Exchanges for the capture file, by outcome",
                          ["outcome"], registry=metrics.registry)
        self._written = counter.labels("written")
        self._shed = counter.labels("shed")
        self.shed = 0
        self.queued = 0
        self.written_before = 0  # by recordings that have ended
        self._queue: queue.Queue[Any] | None = None
        self._listener: _Listener | None = None
        self._handler: CaptureFileHandler | None = None
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._section.enabled:
            self.start_recording()

    def stop(self) -> None:
        self.stop_recording()

    def start_recording(self, percent: float | None = None,
                        max_bytes: int | None = None) -> None:
        """Open the capture file and start the writer (a running recording is restarted
        with the new settings). Raises OSError when the file cannot be opened."""
        if self.active:
            self.stop_recording()
        if percent is not None:
            self.percent = percent
        if max_bytes is not None:
            self.max_bytes = max_bytes
        if not self.path.parent.exists():
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handler = CaptureFileHandler(self.path, self.max_bytes, self._section.backups)
        q: queue.Queue[Any] = queue.Queue(self._section.queue_size)
        listener = _Listener(q, handler, self.payloads, self._written)
        listener.start()
        self._queue, self._listener, self._handler = q, listener, handler
        self.active = True
        self.started_at = time.time()
        log.warning("recording %g%% of exchanges to %s (payloads %s)", self.percent,
                    self.path, "kept" if self.payloads else "redacted")

    def stop_recording(self) -> None:
        """Stop taking exchanges, write what is queued, close the file (blocks until the
        writer is done: at shutdown; the admin command does this part in a thread)."""
        self._close(*self._detach())

    def _detach(self) -> tuple[_Listener | None, CaptureFileHandler | None]:
        """Stop taking exchanges (on the event loop); the writer and file to close."""
        listener, handler = self._listener, self._handler
        self.active = False
        self._queue = self._listener = self._handler = None
        return listener, handler

    def _close(self, listener: _Listener | None, handler: CaptureFileHandler | None) -> None:
        if listener is not None:
            try:
                listener.stop()
            except queue.Full:
                log.error("record: the writer did not drain its queue in time")
            with self._lock:
                self.written_before += listener.written
        if handler is not None:
            handler.close()
            log.warning("recording stopped (%s)", self.path)

    # -- the hook (event loop) ----------------------------------------------------------

    def after_reply(self, flow: Flow) -> None:
        """Queue a finished exchange (the backend's answer the client got) for the writer;
        the backend round trip runs from the attempt's ``flow.sent_at``."""
        if not self.active or not flow.exchanged or flow.op is None or flow.backend is None:
            return
        op = flow.op
        key = op.raw.get(self._sticky_key) if self._sticky_key else None
        if not in_record_sample(key, self.percent):
            return
        q = self._queue
        if q is None or not flow.reply:
            return
        now = time.perf_counter()
        started = flow.sent_at or None
        latency_ms = None if started is None else (now - started) * 1000
        sent = time.time() - (0.0 if started is None else now - started)
        try:
            q.put_nowait((sent, op, flow.backend, flow.request, flow.reply[0], latency_ms))
            self.queued += 1
        except queue.Full:
            self.shed += 1
            self._shed.inc()

    # -- admin -------------------------------------------------------------------------

    def commands(self) -> dict[str, Any]:
        """``record_start``, ``record_stop``, ``record_status`` (``mmshim ctl record``)."""
        return {"record_start": self._cmd_start, "record_stop": self._cmd_stop,
                "record_status": lambda args: self.describe()}

    def _cmd_start(self, args: dict[str, Any]) -> dict[str, Any]:
        try:
            start = msgspec.convert(args, RecordStartArgs)
        except msgspec.ValidationError as exc:
            hint = (" (the path and payloads come from the config file)"
                    if "unknown field" in str(exc) else "")
            _refused(f"{exc}{hint}")
        percent, max_bytes = start.percent, start.max_bytes
        try:
            self.start_recording(percent, max_bytes)
        except OSError as exc:
            _refused(f"cannot open {self.path}: {exc.strerror}")
        return self.describe()

    async def _cmd_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        detached = self._detach()  # no exchange is taken after this reply
        await asyncio.to_thread(self._close, *detached)  # draining the queue: off the loop
        return self.describe()

    def fastpath_quiet(self, rt: Runtime) -> bool:
        """While not recording it sees nothing: requests may skip Python (shim.fastpath)."""
        return not self.active

    def describe(self) -> dict[str, Any]:
        """``{"active", "path", "percent", "max_bytes", "backups", "payloads", "queued",
        "written", "shed", "started_at"}`` (counts since the shim started)."""
        listener = self._listener
        return {"active": self.active, "path": str(self.path), "percent": self.percent,
                "max_bytes": self.max_bytes, "backups": self._section.backups,
                "payloads": self.payloads, "queued": self.queued,
                "written": self.written_before + (listener.written if listener else 0),
                "shed": self.shed,
                "started_at": self.started_at}


def _refused(message: str) -> NoReturn:
    """Refuse an admin command: the admin socket answers ``{"status": "error", "error":
    "invalid", "message"}`` and ``mmshim ctl`` exits 1."""
    raise CommandError("invalid", message)


__all__ = ["CaptureFileHandler", "RecordStartArgs", "Recorder", "in_record_sample"]

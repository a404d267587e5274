"""The capture format: recorded exchanges as JSON lines, and what reads and converts them.

A capture is written by the record addon (shim.addons.record) and read by ``mmshim replay``
(shim.replay) and ``mmshim parity`` (through ``from_corpus``). One JSON object per line;
blank lines, ``#`` comments, torn lines and objects of another ``kind`` are skipped on
read. Version 1, ``kind: "exchange"``:

====================  ===================================================================
field                 meaning
====================  ===================================================================
``v``                 format version (1); a reader refuses higher versions
``kind``              ``"exchange"``
``seq``               order written (replies finished), per recording, 0-based
``ts``                when the request went to the backend, Unix epoch seconds (float);
                      replay order is ``ts``, then ``seq``
``action``            the canonical action (``generate``, ``load``, ``status``, ...)
``form``              the caller's request form: ``action``, ``command``, ``model_access``
                      or ``mms``
``dialect``           the caller's dialect: ``mma`` or ``mms``
``model``             the model the request names (resolved ``model_pref``), or null
``conversation_id``   the request's conversation, or null
``backend``           the backend that answered (null when converted from a corpus)
``latency_ms``        time from the request's send to the backend until its reply (float)
``request``           the request as received (redacted, see below)
``reply``             the reply the client got, decoded (redacted); null: none recorded
``redacted``          true when payloads were replaced
====================  ===================================================================

Redaction (the default; ``record.payloads = true`` keeps payloads): every value under a
key of ``PAYLOAD_KEYS`` (prompts, generated text, audio ``audio_data`` lists, batch
inputs), at any depth, becomes ``{"redacted": "sha256:<16 hex>", "type": "str"|"list"|...,
"length": N}`` (N: characters of a string, items of a list, bytes of anything else as
JSON). Equal payloads keep equal hashes, so repeats stay visible; nothing of the text
does. ``unredact`` turns a marker back into a synthetic value of the same type and length
(a word-salad prompt, a list of zeros), so a redacted capture replays with requests of
the recorded size and replies compare by shape.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from shim.dialects.ops import Op
from shim.errors import CaptureError

VERSION = 1

#: Keys whose values are user content: prompts, generated text, audio.
PAYLOAD_KEYS = frozenset({
    "prompt", "system_prompt", "response_text", "text", "generated_text", "audio_data",
    "messages", "batch_data", "input_ids", "results",
})

_MARKER = "redacted"
_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")




def _canonical(value: Any) -> bytes:
    """Compact JSON with sorted keys (msgspec; what it cannot encode, as ``str``)."""
    return msgspec.json.encode(value, enc_hook=str, order="sorted")


def _digest(value: Any) -> str:
    data = value.encode() if isinstance(value, str) else _canonical(value)
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def _marker(value: Any) -> dict[str, Any]:
    length = len(value) if isinstance(value, str | list) else len(_canonical(value))
    return {_MARKER: _digest(value), "type": type(value).__name__, "length": length}


def redact(value: Any) -> Any:
    """A copy of ``value`` with every PAYLOAD_KEYS value replaced by a marker
    (see the module docstring); null payloads stay null."""
    if isinstance(value, dict):
        return {k: (_marker(v) if k in PAYLOAD_KEYS and v is not None else redact(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def is_marker(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get(_MARKER), str) and \
        value[_MARKER].startswith("sha256:") and isinstance(value.get("length"), int)


def synthetic(kind: str, length: int) -> Any:
    """A stand-in value of ``kind`` (``str``, ``list``, ...) and ``length``."""
    length = max(0, min(length, 1 << 24))
    if kind == "list":
        return [0.0] * length
    if kind == "str":
        words = " ".join(_WORDS[i % len(_WORDS)] for i in range(length // 3 + 1))
        return words[:length]
    if kind in ("int", "float"):
        return 0
    if kind == "bool":
        return False
    if kind == "dict":
        return {}
    return None


def unredact(value: Any) -> Any:
    """A copy of ``value`` with every marker replaced by ``synthetic`` of its type and
    length (payloads that were not redacted are left as they are)."""
    if is_marker(value):
        return synthetic(str(value.get("type", "str")), int(value["length"]))
    if isinstance(value, dict):
        return {k: unredact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unredact(v) for v in value]
    return value


def has_markers(value: Any) -> bool:
    if is_marker(value):
        return True
    if isinstance(value, dict):
        return any(has_markers(v) for v in value.values())
    if isinstance(value, list):
        return any(has_markers(v) for v in value)
    return False


def exchange_record(*, seq: int, ts: float, op: Op | None, request: Any, reply: Any,
                    backend: str | None, latency_ms: float | None,
                    payloads: bool) -> dict[str, Any]:
    """One capture line (a dict; see the module docstring). ``request``/``reply`` are
    decoded JSON; they are redacted here unless ``payloads``."""
    return {
        "v": VERSION, "kind": "exchange", "seq": seq, "ts": round(ts, 6),
        "action": op.kind.value if op is not None else "unparsable",
        "form": op.form.value if op is not None else None,
        "dialect": op.dialect if op is not None else None,
        "model": op.model_id if op is not None else None,
        "conversation_id": op.conversation_id if op is not None else None,
        "backend": backend,
        "latency_ms": None if latency_ms is None else round(latency_ms, 3),
        "request": request if payloads else redact(request),
        "reply": reply if payloads else redact(reply),
        "redacted": not payloads,
    }


@dataclass
class Exchange:
    """One request of a capture (or of a parity corpus) to replay."""

    line: int  # where it came from, for reports: capture line or corpus line
    request: dict[str, Any]
    reply: Any = None  # the recorded reply, in the caller's dialect; None: none recorded
    ts: float | None = None
    latency_ms: float | None = None
    backend: str | None = None
    redacted: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def read_capture(paths: str | Path | Iterable[str | Path]) -> list[Exchange]:
    """Every exchange of a capture, in the order sent (``ts``, then ``seq``).

    ``paths``: one file, a rotated set (``cap.jsonl.2``, ``.1``, ``cap.jsonl``: pass the
    base name and the older files are read first), or several files. Raises CaptureError
    for a file that does not exist or a record of a newer version.
    """
    files = [Path(p) for p in ([paths] if isinstance(paths, str | Path) else paths)]
    out: list[Exchange] = []
    for path in files:
        for part in capture_files(path):
            out += list(_read_one(part))
    out.sort(key=lambda e: (e.ts or 0.0, e.extra.get("seq_key", 0)))
    return out


def capture_files(path: Path) -> list[Path]:
    """A capture's files, oldest first: ``path.N`` ... ``path.1``, ``path``."""
    if not path.exists() and not path.with_name(path.name + ".1").exists():
        raise CaptureError(f"{path}: no such capture")
    older = []
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        older.append(path.with_name(f"{path.name}.{n}"))
        n += 1
    return [*reversed(older), *([path] if path.exists() else [])]


def _read_one(path: Path) -> Iterator[Exchange]:
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, 1):
            text = text.strip()
            if not text or text.startswith("#"):
                continue
            try:
                rec = msgspec.json.decode(text)
            except msgspec.DecodeError:
                continue  # a torn last line of a file being written
            if not isinstance(rec, dict) or rec.get("kind") != "exchange":
                continue
            version = rec.get("v")
            if not isinstance(version, int) or version > VERSION:
                raise CaptureError(f"{path}:{number}: capture version {version!r}; this "
                                   f"mmshim reads up to {VERSION}")
            request = rec.get("request")
            if not isinstance(request, dict):
                continue  # nothing replayable (a non-object request)
            seq = rec.get("seq")
            yield Exchange(
                line=number, request=request, reply=rec.get("reply"),
                ts=_num(rec.get("ts")), latency_ms=_num(rec.get("latency_ms")),
                backend=rec.get("backend"), redacted=bool(rec.get("redacted")),
                extra={"seq_key": seq if isinstance(seq, int) else 0, "file": str(path)})


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def read_corpus(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, request) for every request of a parity corpus (JSON lines; blank
    lines and ``#`` comments skipped). Raises CaptureError naming a line that is not a
    JSON object."""
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            try:
                msg = msgspec.json.decode(text)
            except msgspec.DecodeError as exc:
                raise CaptureError(f"{path}:{number}: not JSON: {exc}") from None
            if not isinstance(msg, dict):
                raise CaptureError(f"{path}:{number}: not a JSON object")
            yield number, msg


def from_corpus(path: str | Path) -> list[Exchange]:
    """A parity corpus as exchanges without recorded replies (the reference answers)."""
    return [Exchange(line=number, request=msg) for number, msg in read_corpus(path)]


def corpus_to_capture(path: str | Path, policy: dict[str, str]) -> Iterator[dict[str, Any]]:
    """``mmshim capture convert``: a parity corpus as capture lines (no replies, no
    backend, unredacted, one second apart), replayable with ``mmshim replay
    --reference``."""
    from shim import dialects

    for seq, (_, msg) in enumerate(read_corpus(path)):
        try:
            op: Op | None = dialects.parse_request(msg, policy)
        except dialects.BadRequest:
            op = None
        yield exchange_record(seq=seq, ts=float(seq), op=op, request=msg, reply=None,
                              backend=None, latency_ms=None, payloads=True)


__all__ = ["PAYLOAD_KEYS", "VERSION", "CaptureError", "Exchange", "capture_files",
           "corpus_to_capture", "exchange_record", "from_corpus", "has_markers",
           "read_capture", "read_corpus", "redact", "synthetic", "unredact"]

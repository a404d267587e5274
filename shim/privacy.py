"""What the shim may write about a request or reply when payloads are private.

``shadow.log_payloads = false`` (the default) keeps prompts, generated text and
conversation ids out of the diff log: each request, reply and differing value is written
as ``summary(value)``: its SHA-256 (of the compact JSON), its length in bytes and its
shape (the keys and the types of the values, not the values), enough to group and count
differences and to match a record with a capture, not to read the text.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

#: How deep ``shape`` descends into nested objects and lists.
MAX_DEPTH = 4


def shape(value: Any, depth: int = 0) -> Any:
    """Keys and value types: ``{"prompt": "str", "params": {"max_tokens": "int"}}``."""
    if isinstance(value, dict):
        if depth >= MAX_DEPTH:
            return "object"
        return {str(k): shape(v, depth + 1) for k, v in list(value.items())[:64]}
    if isinstance(value, list):
        if depth >= MAX_DEPTH or not value:
            return "list"
        return [shape(value[0], depth + 1)]
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str"}.get(type(value), "other")


def summary(value: Any) -> dict[str, Any]:
    """``{"sha256": hex, "bytes": n, "shape": ...}`` for a JSON value."""
    try:
        raw = msgspec.json.encode(value)
    except (TypeError, msgspec.EncodeError):
        raw = repr(value).encode()
    return {"sha256": hashlib.sha256(raw).hexdigest(), "bytes": len(raw),
            "shape": shape(value)}


#: Record fields that carry payloads, in diff log records (shim.addons.shadow.diff_record).
PAYLOAD_FIELDS = ("request", "primary_reply", "shadow_reply", "secondary_reply")


def redact_record(record: dict[str, Any]) -> dict[str, Any]:
    """A diff log record with every payload (and every differing value) summarized."""
    out = dict(record)
    for key in PAYLOAD_FIELDS:
        if key in out:
            out[key] = summary(out[key])
    for key in ("diffs", "noise"):
        items = out.get(key)
        if isinstance(items, list):
            out[key] = [{k: (summary(v) if k in ("primary", "shadow", "secondary") else v)
                         for k, v in d.items()} if isinstance(d, dict) else d
                        for d in items]
    return out

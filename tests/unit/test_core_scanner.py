"""The compiled core's JSON scanner (shim._core) never disagrees with msgspec.

The core forwards a request itself only when its scanner is sure the payload is one JSON
object and has read its routing fields; a reply only when it is sure the reply is one
JSON object. "Sure" must imply what msgspec (the Python path's decoder) says, and the
fields it reads must be the decoded ones; where it is unsure the request goes to Python,
which is always correct. Hypothesis drives both with valid JSON, mangled JSON and bytes.
"""

from __future__ import annotations

import json
import os
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shim import fastpath
from shim.addons.ownership import OK_STATUSES, _reply_ok

# Skipped where no compiler built the core; under CI (which installs gcc) it must be there.
pytestmark = pytest.mark.skipif(not fastpath.available() and not os.environ.get("CI"),
                                reason="the compiled core is not built (no C compiler)")

if fastpath.available():
    from shim import _core  # type: ignore[attr-defined]

SCALAR = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
          | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
JSON = st.recursive(SCALAR, lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12)
OBJECTS = st.dictionaries(st.sampled_from(["action", "user", "prompt", "request_id", "x",
                                           "model_pref", "model_id", "model_ids", "status"])
                          | st.text(max_size=8), JSON, max_size=6)


def _msgspec(data: bytes) -> Any:
    try:
        return msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return _INVALID


_INVALID = object()


def _check(data: bytes) -> None:
    decoded = _msgspec(data)
    if _core.json_object(data):
        assert isinstance(decoded, dict), data
    fields = _core.routing_fields(data, b"user")
    if fields is not None:
        assert isinstance(decoded, dict), data
        action, sticky, punt, pref, model_key = fields
        if isinstance(action, bytes):
            assert decoded.get("action") == action.decode(), data
        else:
            assert action == 0 or not isinstance(decoded.get("action"), str) \
                or "\\" in data.decode("utf-8", "replace"), data
        if isinstance(sticky, bytes):
            assert str(decoded.get("user")) == sticky.decode() or isinstance(
                decoded.get("user"), int), data
            if isinstance(decoded.get("user"), int):
                assert int(sticky) == decoded["user"]
        else:
            assert sticky == 0 or sticky == 3 or "user" not in decoded, data
        assert punt == any(k in decoded for k in ("command", "request_id",
                                                  "conversation_id")), data
        assert model_key == any(k in decoded for k in ("model_id", "model_name",
                                                       "model_ids")), data
        # model_pref: a plain string is the decoded one; null is null; absent is absent;
        # anything else (3) is read by Python (loose_str)
        if isinstance(pref, bytes):
            assert decoded.get("model_pref") == pref.decode(), data
        elif pref == 2:
            assert decoded.get("model_pref", 0) is None, data
        elif pref == 0:
            assert "model_pref" not in decoded, data
    # a reply's status as the core reads it agrees with ownership's reading
    served = _core.status_ok(data, [s.encode() for s in OK_STATUSES])
    if served != -1:
        assert isinstance(decoded, dict), data
        assert bool(served) == _reply_ok(data), data


@settings(max_examples=400, deadline=None)
@given(OBJECTS, st.sampled_from([None, 0, 2]))
def test_valid_objects_agree(obj: dict[str, Any], indent: int | None) -> None:
    data = json.dumps(obj, indent=indent, ensure_ascii=bool(indent)).encode()
    _check(data)


PLAIN = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x2FF,
                              blacklist_characters='"\\'), max_size=20)
COMMON = st.fixed_dictionaries({"action": st.sampled_from(["generate", "other"])}, optional={
    "prompt": PLAIN, "user": PLAIN | st.integers(-10**9, 10**9),
    "params": st.dictionaries(PLAIN, st.integers(0, 5000) | st.booleans() | st.none(),
                              max_size=3)})


@settings(max_examples=300, deadline=None)
@given(COMMON, st.sampled_from([None, 2]))
def test_common_requests_are_read(obj: dict[str, Any], indent: int | None) -> None:
    """What agents send (plain text, small numbers) the core reads itself (no punt)."""
    data = json.dumps(obj, indent=indent, ensure_ascii=False).encode()
    _check(data)
    assert _core.json_object(data), data
    fields = _core.routing_fields(data, b"user")
    assert fields is not None and fields[0] == obj["action"].encode(), data


@settings(max_examples=400, deadline=None)
@given(OBJECTS, st.data())
def test_mangled_json_never_passes_as_valid(obj: dict[str, Any], data: st.DataObject) -> None:
    raw = bytearray(json.dumps(obj, ensure_ascii=False).encode())
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw)))
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = data.draw(st.sampled_from(list(b'{}[]",:\\ 0e-.\x00\xff\xc3tnu')))
        if op == "insert":
            raw.insert(i, byte)
        elif i < len(raw):
            if op == "delete":
                del raw[i]
            else:
                raw[i] = byte
    _check(bytes(raw))


REPLY = st.fixed_dictionaries({}, optional={
    "status": st.sampled_from([*OK_STATUSES, "error", "OK", ""]) | JSON,
    "response": PLAIN, "model_used": PLAIN})


@settings(max_examples=300, deadline=None)
@given(REPLY, st.sampled_from([None, 2]))
def test_reply_status(obj: dict[str, Any], indent: int | None) -> None:
    """The core reads a plain reply's status itself, as ownership would."""
    data = json.dumps(obj, indent=indent, ensure_ascii=False).encode()
    _check(data)
    served = _core.status_ok(data, [s.encode() for s in OK_STATUSES])
    plain = obj.get("status") in [*OK_STATUSES, "error", "OK", "", None]
    assert served == int(_reply_ok(data)) if plain else served in (-1, int(_reply_ok(data))), \
        data


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_bytes(data: bytes) -> None:
    _check(data)


@pytest.mark.parametrize("data", [
    b"[" * 600 + b"]" * 600, b'{"a": ' + b"[" * 2000 + b"]" * 2000 + b"}", b'"\x80"',
    b'{"a": "\xff\xfe"}', b'{"a": "\\ud800"}', b'{"a": 1e999}', b'{"a": NaN}', b'{"a"',
    b"\xef\xbb\xbf{}", b'{"a": 1} x', b'{"a": 01}', b'{"a": "\xed\xa0\x80"}',
    b'{"action": "generate", "action": "status"}', b'{"\\u0061ction": "generate"}',
    b'{"status": "ok", "status": "error"}', b'{"status": "error", "status": "ok"}',
    b'{"st\\u0061tus": "ok"}', b'{"status": "o\\u006b"}', b'{"status": ["ok"]}',
    b'{"model_pref": "fast", "model_pref": null}', b'{"model_pref": null}',
])
def test_nasty(data: bytes) -> None:
    _check(data)

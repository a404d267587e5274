"""The routing view (shim.dialects.view): what routing needs, and nothing it does not.

Checked against the full parse (shim.dialects.parse_request) on the compat corpus, so the
view and the parser agree on every shape the deployed agents send.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim import dialects
from shim.dialects.view import RoutingView, ViewDecoder
from tests.compat.corpus import CORPUS

POLICY = {"fast": "phi-2", "quality": "mistral-7b"}


def test_reads_the_routing_fields_and_skips_the_payload() -> None:
    audio = [0.001 * i for i in range(50_000)]
    payload = json.dumps({"command": "TRANSCRIBE_AUDIO", "request_id": "r1",
                          "model_id": "whisper-small", "audio_data": audio,
                          "conversation_id": 12}).encode()
    view = ViewDecoder().decode(payload)
    assert view is not None
    assert (view.name, view.model, view.request_key, view.conversation) == \
        ("TRANSCRIBE_AUDIO", "whisper-small", "r1", "12")
    assert view.sticky == 12  # the default sticky key is conversation_id, as sent
    assert not hasattr(view, "audio_data")  # never built into Python objects


@pytest.mark.parametrize(("key", "expected"), [
    ("", None), ("conversation_id", "c1"), ("model_pref", "fast"), ("session", "s9")])
def test_sticky_key_is_the_configured_one(key: str, expected: Any) -> None:
    payload = b'{"action": "generate", "model_pref": "fast", "conversation_id": "c1",' \
              b' "session": "s9"}'
    view = ViewDecoder(key).decode(payload)
    assert view is not None and isinstance(view, RoutingView)
    assert view.sticky == expected


@pytest.mark.parametrize("payload", [b"", b"not json", b"[1, 2]", b"5", b'"s"', b"null",
                                     b'{"action": ', b"\xff\xfe", b"[" * 100_000])
def test_anything_but_a_json_object_is_none(payload: bytes) -> None:
    assert ViewDecoder().decode(payload) is None


def test_loose_types_never_refuse_a_request() -> None:
    view = ViewDecoder().decode(b'{"action": 5, "model_id": {"x": 1}, "model_name": 3,'
                                b' "request_id": true, "conversation_id": [1]}')
    assert view is not None
    assert view.name == "5"
    assert view.model == "3"  # model_id of an odd type reads as absent, as in the parser
    assert view.request_key is None  # a bool is not an id
    assert view.conversation is None


def test_view_and_full_parse_agree_on_the_corpus() -> None:
    decode = ViewDecoder().decode
    checked = 0
    for entry in CORPUS:
        if isinstance(entry.request, list) and entry.request and \
                all(isinstance(f, bytes) for f in entry.request):
            continue  # several raw frames: never decoded (opaque)
        payload = entry.request if isinstance(entry.request, bytes) else \
            json.dumps(entry.request).encode()
        try:
            msg = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            msg = None
        view = decode(payload)
        if not isinstance(msg, dict):
            assert view is None, entry
            continue
        assert view is not None, entry
        op = dialects.parse_request(msg, POLICY)
        assert dialects.detect_dialect(view.probe()) == op.dialect, entry
        assert dialects.form_of(view.probe()) == op.form, entry
        assert view.request_key == op.request_id, entry
        if op.kind is not dialects.Kind.OTHER:
            assert (view.name or None) == op.name, entry
        checked += 1
    assert checked > 10


JSON_FLOATS = st.floats(allow_nan=False, allow_infinity=False)  # json.dumps' NaN is no JSON


@given(st.dictionaries(st.sampled_from(["action", "command", "model_id", "model_name",
                                        "request_id", "conversation_id", "x"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), JSON_FLOATS,
                                 st.text(max_size=5), st.lists(st.integers(), max_size=2))))
def test_any_object_gives_a_view(msg: dict[str, Any]) -> None:
    view = ViewDecoder().decode(json.dumps(msg).encode())
    assert view is not None
    assert view.request_key in (None, msg.get("request_id"))

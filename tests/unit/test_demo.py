"""``make demo``'s reply reading (shim.demo): a reply that is not a JSON object becomes an
error row of the demo's table, not a crash of the demo."""

from __future__ import annotations

from shim.demo import _decode_reply


def test_a_json_object_reply_is_read_as_it_is() -> None:
    assert _decode_reply(b'{"status": "ok", "response_text": "hi"}') == {
        "status": "ok", "response_text": "hi"}


def test_a_reply_that_is_not_a_json_object_becomes_an_error_row() -> None:
    for raw in (b"not json", b"[1, 2]", b"\xff\xfe", b""):
        reply = _decode_reply(raw)
        assert reply["status"] == "error"
        assert "not a JSON object" in str(reply["message"])

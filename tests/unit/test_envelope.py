"""The one envelope splitter (shim.sockets.split_envelope), as the frontend, the admin
socket and the reference backends use it."""

from __future__ import annotations

from backends.server import split_envelope as backend_split
from shim.sockets import split_envelope


def test_the_envelope_ends_at_the_first_empty_frame_after_the_routing_id() -> None:
    assert split_envelope([b"id", b"", b"payload"]) == ([b"id", b""], [b"payload"])
    # Through a chain of ROUTERs (DEALER -> ROUTER -> ...): every hop's id stays in it.
    assert split_envelope([b"id1", b"id2", b"", b"p"]) == ([b"id1", b"id2", b""], [b"p"])
    # The body may hold empty frames of its own: they are not the delimiter.
    assert split_envelope([b"id", b"", b"a", b"", b"b"]) == ([b"id", b""], [b"a", b"", b"b"])
    # An empty routing id is still the routing id (frame 0 is never the delimiter).
    assert split_envelope([b"", b"", b"p"]) == ([b"", b""], [b"p"])
    assert split_envelope([b"id", b""]) == ([b"id", b""], [])


def test_without_a_delimiter_there_is_no_split() -> None:
    assert split_envelope([b"id", b"payload"]) is None
    assert split_envelope([b"id"]) is None


def test_the_backends_answer_a_bare_dealer_by_the_same_rule() -> None:
    assert backend_split([b"id", b"", b"p"]) == split_envelope([b"id", b"", b"p"])
    assert backend_split([b"id", b"payload"]) == ([b"id"], [b"payload"])  # a bare DEALER
    assert backend_split([b"id", b"a", b"b"]) is None  # cannot be split reliably: dropped

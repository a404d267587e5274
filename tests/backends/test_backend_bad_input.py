"""Bad input never wedges a backend: every case gets its dialect's error, serving goes on."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from tests.procs import Backend, req, start_backend

FIVE_MIB = 5 * 1024 * 1024


@pytest.fixture(scope="module", params=["mma", "mms"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    be = start_backend(request.param)
    yield be
    assert be.stop() == 0


def is_dialect_error(kind: str, reply: dict[str, Any], needle: str) -> bool:
    if kind == "mma":
        return reply["status"] == "ERROR" and needle in reply["error_message"] and (
            "timestamp" in reply)
    return reply["status"] == "error" and needle in reply["message"]


def still_serving(be: Backend) -> None:
    body = ({"action": "status"} if be.kind == "mma" else {"action": "list_models"})
    assert req(be.endpoint, body)["status"] in ("ok", "success")
    assert req(be.health_endpoint, b"ping")["status"] == "ok"


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"this is not json", "Invalid JSON"),
        (b"\xff\xfe\x00garbage", "Invalid JSON"),
        (b"", "Invalid JSON"),
        (b'{"action": "generate", ', "Invalid JSON"),
        (b"[1, 2, 3]", "JSON object"),
        (b'"a string"', "JSON object"),
        (b"null", "JSON object"),
        (b"42", "JSON object"),
        (json.dumps({"action": "x" * FIVE_MIB}).encode(), "Request too large"),
        (b"\x00" * FIVE_MIB, "Request too large"),
    ],
)
def test_bad_payloads(backend: Backend, payload: bytes, needle: str) -> None:
    reply = req(backend.endpoint, payload)
    if backend.kind == "mms" and needle == "JSON object":
        assert reply == {"status": "error", "message": "Invalid request format"}
    else:
        assert is_dialect_error(backend.kind, reply, needle), reply
    still_serving(backend)


def test_missing_fields_and_wrong_types(backend: Backend) -> None:
    requests: list[dict[str, Any]] = [
        {"action": "generate"},
        {"action": "generate", "prompt": 5},
        {"action": "generate", "prompt": "x", "params": "hot"},
        {"action": "generate", "prompt": "x", "params": {"temperature": -1}},
        {"action": "generate", "prompt": "x", "params": {"top_p": 2}},
        {"action": None},
        {"action": {"nested": True}},
        {"command": 12},
        {"model_id": ["list"], "request_id": "r"},
        {"action": "generate_text", "model_id": 3, "prompt": "x"},
        {"action": "select_model", "task_type": 1},
        {"action": "log_performance_metric", "model_id": "phi-2", "metric_name": "m"},
    ]
    for request in requests:
        reply = req(backend.endpoint, request)
        assert isinstance(reply, dict)
        assert reply.get("status") not in ("ok", "success", "SUCCESS", "MODEL_READY"), (
            request, reply)
    still_serving(backend)


def _dealer(be: Backend) -> zmq.Socket[bytes]:
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(be.endpoint)
    return sock


def test_dealer_framing(backend: Backend) -> None:
    body = json.dumps({"action": "status" if backend.kind == "mma" else "list_models"}).encode()
    dealer = _dealer(backend)
    try:
        # No delimiter, one frame: answered without one.
        dealer.send(body)
        assert dealer.poll(5000)
        frames = dealer.recv_multipart()
        assert len(frames) == 1
        assert json.loads(frames[0])["status"] in ("ok", "success")
        # Extra frames after the delimiter: an error, with the envelope kept.
        dealer.send_multipart([b"corr", b"", body, b"extra"])
        assert dealer.poll(5000)
        corr, empty, payload = dealer.recv_multipart()
        assert (corr, empty) == (b"corr", b"")
        assert is_dialect_error(backend.kind, json.loads(payload), "one payload frame")
        # An empty body after the delimiter.
        dealer.send_multipart([b""])
        assert dealer.poll(5000)
        empty, payload = dealer.recv_multipart()
        assert is_dialect_error(backend.kind, json.loads(payload), "got 0")
        # Several frames and no delimiter cannot be split: dropped, and serving goes on.
        dealer.send_multipart([b"a", b"b", body])
        assert not dealer.poll(300)
        dealer.send_multipart([b"", body])
        assert dealer.poll(5000)
        assert dealer.recv_multipart()[0] == b""
    finally:
        dealer.close(linger=0)
    still_serving(backend)


def test_abandoned_requests_do_not_wedge(backend: Backend) -> None:
    """Clients that send and vanish (Lazy Pirate retries) leave the backend serving."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    body = {"action": "generate" if backend.kind == "mma" else "generate_text",
            "model_id": "phi-2", "prompt": "Return the", "max_tokens": 200,
            "params": {"max_tokens": 200}}
    for _ in range(20):
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(backend.endpoint)
        sock.send(json.dumps(body).encode())
        sock.close(linger=0)
    still_serving(backend)

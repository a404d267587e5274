"""The compatibility corpus (tests/compat/corpus.py) at every setting.

Each entry is sent as its real client sends it (a fresh REQ socket, or a DEALER for
multi-frame payloads) and must be answered within the time that client waits, with the
keys and values it reads. Runs once per setting, in corpus order (one set of processes
per setting).
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import zmq

from tests.compat.conftest import Target
from tests.compat.corpus import CORPUS, SETTINGS, Entry, lookup, matches

pytestmark = pytest.mark.parametrize("target", SETTINGS, indirect=True)


def send(endpoint: str, request: Any, wait_s: float) -> tuple[list[bytes], float]:
    """The reply frames and the seconds they took; raises TimeoutError past ``wait_s``."""
    if isinstance(request, bytes):
        frames = [request]
    elif isinstance(request, list) and request and all(isinstance(f, bytes) for f in request):
        frames = list(request)
    else:
        frames = [json.dumps(request).encode()]
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        started = time.monotonic()
        sock.send_multipart(frames)
        if not sock.poll(int(wait_s * 1000)):
            raise TimeoutError(f"no reply within {wait_s} s (the client would give up)")
        reply = sock.recv_multipart()
        return reply, time.monotonic() - started
    finally:
        sock.close(0)


@pytest.mark.parametrize("entry", CORPUS, ids=[e.name for e in CORPUS])
def test_corpus_entry(target: Target, entry: Entry) -> None:
    frames, took = send(target.endpoint, entry.request, entry.client_wait_s)
    target.timings[entry.name] = took
    assert len(frames) == 1, f"{len(frames)} reply frames"
    reply = json.loads(frames[0])
    expected = entry.expected(target.setting)
    wrong = {path: (lookup(reply, path), want) for path, want in expected.items()
             if not matches(lookup(reply, path), want)}
    assert not wrong, f"[{target.setting}] {entry.name}: got/want {wrong}\nreply: " \
                      f"{json.dumps(reply)[:600]}"

"""Synthetic probe requests: evidence for a stage whose models see too little traffic.

A probe is a read-only ``generate_text`` (MMS dialect) with a fixed prompt, no
conversation id, naming one model the stage has put on the target. It goes in through the
shim's own front door, so it obeys ownership (a model handed over is waited for; a model
is never loaded on two backends) and is counted by the same hooks as client traffic.
Probes are rate-limited (a token bucket) and only ever name models whose owner is the
target or that nobody has loaded: never a model still loaded on the source, never a
load of a model the stage does not serve.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence

import msgspec
import zmq

from shim.ctl import connectable

log = logging.getLogger("mmshim.rollout")


class Prober:
    """Sends probes to the shim's listen socket; replies are read and dropped (the
    rollout engine's addon hooks have already counted the answer by then)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, *, rate_per_s: float,
                 prompt: str, max_tokens: int, timeout_ms: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ctx = ctx
        self.endpoint = connectable(endpoint)
        self.rate_per_s = rate_per_s
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.timeout_ms = timeout_ms
        self._clock = clock
        self._tokens = 1.0
        self._last = clock()
        self._sock: zmq.Socket[bytes] | None = None
        self._ids = itertools.count(1)
        self._next_model = 0
        self.sent = 0
        self.answered = 0

    def allowance(self) -> int:
        """Probes that may go out now (token bucket: ``rate_per_s``, burst of 1)."""
        now = self._clock()
        self._tokens = min(1.0, self._tokens + (now - self._last) * self.rate_per_s)
        self._last = now
        return int(self._tokens)

    def send(self, models: Sequence[str]) -> list[str]:
        """Probe the next model(s) of ``models`` as the rate allows; returns those probed."""
        if not models or self.rate_per_s <= 0:
            return []
        sent = []
        for _ in range(self.allowance()):
            model = models[self._next_model % len(models)]
            self._next_model += 1
            self._send_one(model)
            self._tokens -= 1
            sent.append(model)
        self._drain()
        return sent

    def _send_one(self, model: str) -> None:
        if self._sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 16)
            sock.setsockopt(zmq.RCVHWM, 64)
            sock.connect(self.endpoint)
            self._sock = sock
        request = {"action": "generate_text", "model_id": model, "prompt": self.prompt,
                   "max_tokens": self.max_tokens,
                   "request_id": f"rollout-probe-{next(self._ids)}"}
        with contextlib.suppress(zmq.Again):
            self._sock.send_multipart([b"", msgspec.json.encode(request)],
                                      flags=zmq.NOBLOCK)
            self.sent += 1

    def _drain(self) -> None:
        """Read the replies that have come (non-blocking; bounded by what is queued)."""
        if self._sock is None:
            return
        for _ in range(64):
            try:
                self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            self.answered += 1

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

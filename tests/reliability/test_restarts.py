"""Graceful restarts under persistent REQ clients (issue 12, "restarts that wedge no one").

protocol.md: VRAMOptimizer keeps ONE REQ socket for its whole life and never resets it;
one request without a reply wedges it until restarted. These clients do the same (one
socket each, a think time between requests like a poller's interval), while the shim is
stopped with SIGTERM and started again on the same endpoints, over and over. Every
request a client sent must get a reply (from the old shim or the new one), so at the end
no client is wedged.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from tests.reliability.helpers import GEN, GEN_BYTES, assert_clean_exit, start_ready, wait_until
from tests.shimproc import ShimProc, shim_config, start_fake, start_shim

#: Long enough that no answered request is ever counted as wedged on a loaded machine
#: (a restart takes a few seconds here), far shorter than "stuck for good".
WEDGED_AFTER_S = 25.0


@dataclass
class PersistentClient:
    """One REQ socket, never reset: send, wait for the reply, think, repeat."""

    endpoint: str
    ctx: zmq.Context[zmq.Socket[bytes]]
    seed: int
    think_s: tuple[float, float] = (0.15, 0.6)
    answered: int = 0
    replies: dict[str, int] = field(default_factory=dict)
    wedged: bool = False
    waiting_since: float | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        rng = random.Random(self.seed)
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        try:
            while not self.stop.is_set():
                sock.send(GEN_BYTES)
                self.waiting_since = time.monotonic()
                while not sock.poll(100):
                    if time.monotonic() - self.waiting_since > WEDGED_AFTER_S:
                        self.wedged = True
                        return
                reply = json.loads(sock.recv())
                self.waiting_since = None
                kind = str(reply.get("error_code") or reply.get("status"))
                self.replies[kind] = self.replies.get(kind, 0) + 1
                self.answered += 1
                # The client's own think time (a poller's interval), not a test wait.
                self.stop.wait(rng.uniform(*self.think_s))
        finally:
            sock.close(0)


def progressed(clients: list[PersistentClient]) -> Callable[[], bool]:
    """True once every client got a reply after now (or is wedged: the test then fails)."""
    before = [c.answered for c in clients]
    return lambda: all(c.answered > b or c.wedged
                       for c, b in zip(clients, before, strict=True))


def restart(shim: ShimProc, tmp_path: Path) -> ShimProc:
    """SIGTERM the shim, wait for a clean exit, start it again on the same endpoints."""
    assert_clean_exit(shim)
    cfg = json.loads(shim.config_path.read_text())
    return start_shim(cfg, tmp_path, path=shim.config_path)


def test_graceful_restarts_wedge_no_persistent_req_client(tmp_path: Path) -> None:
    restarts, clients_n = 10, 16
    fake = start_fake("mma", "mma")
    shim = start_ready(shim_config({"mma": fake}, tmp_path), tmp_path)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    clients = [PersistentClient(shim.endpoint, ctx, seed=i) for i in range(clients_n)]
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients]
    try:
        for t in threads:
            t.start()
        for n in range(restarts):
            wait_until(progressed(clients), WEDGED_AFTER_S + 10,
                       f"every client answered after restart {n}")
            shim = restart(shim, tmp_path)
        wait_until(progressed(clients), WEDGED_AFTER_S + 10,
                   "every client answered after the last restart")
    finally:
        for c in clients:
            c.stop.set()
        for t in threads:
            t.join(WEDGED_AFTER_S + 5)
        shim.kill()
        fake.kill()
        ctx.term()
    wedged = [i for i, c in enumerate(clients) if c.wedged]
    totals: dict[str, int] = {}
    for c in clients:
        for kind, n in c.replies.items():
            totals[kind] = totals.get(kind, 0) + n
    print(f"{restarts} restarts, {clients_n} persistent REQ clients: "
          f"{sum(c.answered for c in clients)} replies {totals}, {len(wedged)} wedged")
    assert not wedged, f"clients {wedged} wedged; replies {totals}"
    # Drained, not cut: every request got the backend's answer.
    assert set(totals) == {"ok"}, totals
    assert GEN["action"] == "generate"

"""The pool's deadlines: one timer for all requests, buckets swept in deadline order.

A backend that reads requests and never answers; requests sent with deadlines out of
order must each fail with BackendTimeout at their own deadline (not earlier, not much
later), in deadline order, and one answered meanwhile must not be disturbed.
"""

from __future__ import annotations

import asyncio

import zmq

from shim.config import BackendConfig, HealthSection
from shim.errors import BackendTimeout
from shim.metrics import Metrics
from shim.pool import BackendPool
from tests.procs import free_port
from tests.reliability.helpers import wait_until_async


async def test_requests_expire_at_their_own_deadlines_in_order(
        ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    port = free_port()
    backend = ctx.socket(zmq.ROUTER)
    backend.bind(f"tcp://127.0.0.1:{port}")
    loop = asyncio.get_running_loop()
    pool = BackendPool(loop, ctx, {"b": BackendConfig(
        dialect="mma", endpoints=[f"tcp://127.0.0.1:{port}"], timeout_ms=5000)},
        HealthSection(), Metrics())
    try:
        assert await pool.wait_connected("b", 5.0)
        started = loop.time()
        ended: list[tuple[str, float]] = []
        outcome: dict[str, str] = {}

        def watch(name: str, future: asyncio.Future[bytes]) -> None:
            def done(f: asyncio.Future[bytes]) -> None:
                ended.append((name, loop.time() - started))
                outcome[name] = "timeout" if isinstance(f.exception(), BackendTimeout) \
                    else f.result().decode()
            future.add_done_callback(done)

        for name, timeout in (("slow", 0.6), ("fast", 0.2), ("answered", 0.4),
                              ("middle", 0.4)):
            watch(name, pool.request("b", name.encode(), timeout))
        # Answer "answered" at once; the other three are never answered.
        for _ in range(4):
            assert backend.poll(5000), "the backend never got the request"
            ident, corr, empty, payload = backend.recv_multipart()
            if payload == b"answered":
                backend.send_multipart([ident, corr, empty, b"reply"])
        await wait_until_async(lambda: len(ended) >= 4, 10.0, lambda: f"4 ended, {ended}")
        print(f"\n  ended (name, s after sending): {[(n, round(t, 3)) for n, t in ended]}")
        assert [n for n, _ in ended] == ["answered", "fast", "middle", "slow"]
        assert outcome == {"answered": "reply", "fast": "timeout", "middle": "timeout",
                           "slow": "timeout"}
        deadlines = {"fast": 0.2, "middle": 0.4, "slow": 0.6}
        for name, at in ended[1:]:
            # Never early; late only by scheduling noise (a coarse or lost timer would be
            # seconds late; the order above already says each fired in its turn).
            assert deadlines[name] - 0.002 <= at < deadlines[name] + 1.0, (name, at)
        assert pool.inflight == 0
        # No bucket lingers once everything is settled; a new request still gets its timer.
        assert not pool._due
        late = pool.request("b", b"again", 0.05)
        try:
            await late
        except BackendTimeout:
            pass
        else:
            raise AssertionError("an unanswered request must time out")
    finally:
        pool.close()
        backend.close(0)

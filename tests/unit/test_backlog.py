"""The backlog (shim.backlog) tells its socket's reader after every retry that tried to
send, sent or not: a send lets libzmq process the socket's commands, which may take the
read edge (ZMQ_FD) of a request waiting on the same ROUTER, and only a read then finds
it. Real ZeroMQ sockets, on inproc:// (no kernel buffer to absorb the replies: a client
that does not read keeps the retries failing)."""

from __future__ import annotations

import asyncio

import zmq

from shim.backlog import Backlog
from tests.reliability.helpers import wait_until_async


async def test_a_failed_retry_still_tells_the_reader() -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.SNDHWM, 1)
    router.setsockopt(zmq.LINGER, 0)
    router.bind("inproc://backlog-test")
    client = ctx.socket(zmq.DEALER)
    client.setsockopt(zmq.RCVHWM, 1)
    client.setsockopt(zmq.IDENTITY, b"slow")
    client.setsockopt(zmq.LINGER, 0)
    client.connect("inproc://backlog-test")
    client.send_multipart([b"", b"hello"])
    assert router.poll(5000)
    envelope = router.recv_multipart()[:-1]
    tried: list[int] = []
    sent: list[int] = []
    backlog = Backlog(asyncio.get_running_loop(), router, peer_bytes=1 << 20,
                      total_bytes=1 << 20, ttl_s=30.0, on_sent=lambda: sent.append(1),
                      on_dropped=lambda _reason: None, on_unroutable=lambda: None,
                      on_tried=lambda: tried.append(len(sent)))
    try:
        # Fill what libzmq queues for a client that does not read, then park the rest.
        big = b"x" * 65536
        while True:
            try:
                router.send_multipart([*envelope, big], flags=zmq.NOBLOCK)
            except zmq.Again:
                break
        backlog.park([*envelope, b"parked"])
        await wait_until_async(lambda: len(tried) >= 2, 10.0,
                               "two retries that found the queue full")
        assert not sent and backlog.bytes, "the client reads nothing: nothing was sent"
        # Once the client reads, a retry sends it, and tells the reader again.
        def read_all() -> bool:
            while client.poll(0):
                client.recv_multipart()
            return bool(sent)

        await wait_until_async(read_all, 10.0, "the parked reply sent")
        await wait_until_async(lambda: any(n > 0 for n in tried), 10.0,
                               "a retry that sent, told to the reader")
    finally:
        backlog.drop_all()
        client.close(0)
        router.close(0)
        ctx.term()

"""The proxy in-process with a misbehaving addon: a bug after the reply costs a log line,
never a second reply; a bug before it costs one SHIM_INTERNAL reply, never the shim."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import zmq
import zmq.asyncio

from shim.config import decode_config
from shim.metrics import Metrics
from shim.proxy import Proxy
from tests.procs import free_port

GEN = {"action": "generate", "model_pref": "fast", "prompt": "hi"}


class Broken:
    """An addon that raises in the hook it is told to."""

    def __init__(self, where: str) -> None:
        self.where = where

    def route(self, op: Any, candidates: list[str], rt: Any) -> list[str]:
        if self.where == "route":
            raise RuntimeError("route bug")
        return candidates

    def before_send(self, op: Any, backend: str) -> None:
        return None

    def after_send(self, op: Any, backend: str, reply: bytes | None) -> None:
        return None

    def after_reply(self, op: Any, backend: str, request: bytes, reply: bytes, rt: Any) -> None:
        if self.where == "after_reply":
            raise RuntimeError("after_reply bug")


async def exchange(where: str) -> list[list[bytes]]:
    """Run one request through a Proxy whose addon breaks at ``where``; every reply seen."""
    backend_port, listen_port = free_port(), free_port()
    cfg = decode_config({
        "shim": {"listen": f"tcp://127.0.0.1:{listen_port}"},
        "backends": {"mma": {"dialect": "mma",
                             "endpoints": [f"tcp://127.0.0.1:{backend_port}"]}},
        "policy": {"fast": "phi-2"}})
    actx = zmq.asyncio.Context()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(actx.underlying)
    backend = actx.socket(zmq.ROUTER)
    backend.bind(f"tcp://127.0.0.1:{backend_port}")
    proxy = Proxy(cfg, asyncio.get_running_loop(), ctx, Metrics())
    proxy.addons.append(Broken(where))  # type: ignore[arg-type]
    proxy.start()
    client = actx.socket(zmq.DEALER)
    client.connect(f"tcp://127.0.0.1:{listen_port}")

    async def serve_one() -> None:
        *envelope, _ = await backend.recv_multipart()
        await backend.send_multipart([*envelope, json.dumps({"status": "ok"}).encode()])

    server = asyncio.create_task(serve_one())
    try:
        await client.send_multipart([b"", json.dumps(GEN).encode()])
        replies = [await asyncio.wait_for(client.recv_multipart(), 5)]
        while await client.poll(300):  # a second reply would be a protocol violation
            replies.append(await client.recv_multipart())
        return replies
    finally:
        server.cancel()
        proxy.close()
        for sock in (client, backend):
            sock.close(0)
        actx.destroy(linger=0)


async def test_an_addon_failing_after_the_reply_costs_no_second_reply() -> None:
    replies = await exchange("after_reply")
    assert len(replies) == 1
    assert json.loads(replies[0][-1]) == {"status": "ok"}


async def test_an_addon_failing_before_the_reply_costs_one_error_reply() -> None:
    replies = await exchange("route")
    assert len(replies) == 1
    reply = json.loads(replies[0][-1])
    assert reply["status"] == "error" and reply["error_code"] == "SHIM_INTERNAL"

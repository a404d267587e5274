"""A stand-in backend for shim tests: it answers in its dialect with its own name in the
reply, so a test can tell who served a request, or it misbehaves on purpose.

Run as a process: ``python -m tests.fakes --name mma --dialect mma --port P --health-port H
[--mode ok|stall|garbage|extra_frames|foreign_id|slow] [--delay-ms N]``.
It binds a ROUTER (REQ and DEALER peers, many in flight) and a health REP.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time

import zmq


def answer(name: str, dialect: str, request: object) -> dict[str, object]:
    """A well-formed reply in ``dialect`` naming the server."""
    req = request if isinstance(request, dict) else {}
    action = req.get("action")
    if dialect == "mma":
        if action == "generate":
            reply: dict[str, object] = {"status": "ok", "response_text": name,
                                        "model_used": req.get("model_pref", "fast"),
                                        "timestamp": time.time()}
            if "conversation_id" in req:
                reply.update(conversation_id=req["conversation_id"], using_kv_cache=True)
            return reply
        if "command" in req:
            return {"status": "SUCCESS", "message": name}
        return {"status": "ok", "message": name, "served_by": name}
    if action in ("generate_text", "generate"):
        reply = {"status": "success", "text": name, "model_id": req.get("model_id", "m"),
                 "tokens_generated": 1}
        if "conversation_id" in req:
            reply["conversation_id"] = req["conversation_id"]
        return reply
    return {"status": "success", "message": name, "served_by": name}


def serve_health(ctx: zmq.Context[zmq.Socket[bytes]], port: int, name: str,
                 stop: threading.Event) -> None:
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    while not stop.is_set():
        if sock.poll(100):
            sock.recv_multipart()
            sock.send_json({"status": "ok", "details": {"status_message": name},
                            "vram_used_mb": 0, "vram_budget_mb": 1000})
    sock.close(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--dialect", choices=["mma", "mms"], default="mma")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--health-port", type=int, default=0)
    parser.add_argument("--mode", default="ok",
                        choices=["ok", "stall", "garbage", "extra_frames", "foreign_id", "slow"])
    parser.add_argument("--delay-ms", type=int, default=0)
    args = parser.parse_args()

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.health_port:
        threading.Thread(target=serve_health, args=(ctx, args.health_port, args.name, stop),
                         daemon=True).start()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{args.port}")
    delayed: list[tuple[float, list[bytes]]] = []
    while not stop.is_set():
        timeout = 50 if not delayed else max(0, int((delayed[0][0] - time.monotonic()) * 1000))
        if sock.poll(min(timeout, 50)):
            frames = sock.recv_multipart()
            split = frames.index(b"") if b"" in frames else len(frames) - 1
            envelope, payload = frames[: split + 1], frames[-1]
            if args.mode == "stall":
                continue
            try:
                request = json.loads(payload)
            except ValueError:
                request = None
            body = json.dumps(answer(args.name, args.dialect, request)).encode()
            if args.mode == "garbage":
                out = [*envelope, b"\xff not json"]
            elif args.mode == "extra_frames":
                out = [*envelope, body, b"extra"]
            elif args.mode == "foreign_id":
                out = [envelope[0], b"\x00" * 8, b"", body]
            else:
                out = [*envelope, body]
            if args.mode == "slow" or args.delay_ms:
                delayed.append((time.monotonic() + args.delay_ms / 1000, out))
            else:
                sock.send_multipart(out)
        now = time.monotonic()
        while delayed and delayed[0][0] <= now:
            sock.send_multipart(delayed.pop(0)[1])
    sock.close(0)
    ctx.term()


if __name__ == "__main__":
    main()

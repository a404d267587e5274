"""A stand-in backend for shim tests: it answers in its dialect with its own name in the
reply, so a test can tell who served a request, or it misbehaves on purpose.

Run as a process: ``python -m tests.fakes --name mma --dialect mma --port P --health-port H
[--mode ok|stall|garbage|extra_frames|foreign_id|slow|rename_field] [--delay-ms N]
[--loaded m1,m2] [--rename OLD=NEW]``.
It binds a ROUTER (REQ and DEALER peers, many in flight) and a health REP.

``--loaded`` makes the loaded-models queries (MMA ``status`` / GET_LOADED_MODELS_STATUS /
HEALTH_CHECK, MMS get_loaded_models_status / health_check / list_models) answer like the
real services,
reporting those models as loaded. ``--mode rename_field`` renames one top-level reply key
(``--rename OLD=NEW``): a seeded difference for shadow comparisons. The health reply
carries ``counts``: requests received per action/command (``:`` model or pref when there
is one; ``model_access:<model>`` for model access requests).
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time

import zmq

#: The load policy the shim tests use (tests/shimproc.shim_config), reported by ``status``.
POLICY = {"fast": "phi-2", "quality": "mistral-7b", "fallback": "tinyllama",
          "stt": "whisper-small", "tts": "piper-tts"}
FAKE_VRAM_MB = 100
FAKE_BUDGET_MB = 10_000


def count_key(request: object) -> str:
    """What the health reply's ``counts`` counts this request as."""
    req = request if isinstance(request, dict) else {}
    name = req.get("action") or req.get("command")
    if name is None:
        return f"model_access:{req.get('model_id')}"
    detail = req.get("model_id") or req.get("model_name") or req.get("model_pref")
    return f"{name}:{detail}" if detail else str(name)


def answer_loaded(dialect: str, request: dict[str, object],
                  loaded: list[str]) -> dict[str, object] | None:
    """Real-looking answers to what-is-loaded queries, or None for other requests."""
    now = time.time()
    action, command = request.get("action"), request.get("command")
    if dialect == "mma" and (action == "status" or command == "GET_LOADED_MODELS_STATUS"):
        reply: dict[str, object] = {
            "status": "ok" if action == "status" else "SUCCESS",
            "loaded_models": {m: {"vram_usage_mb": FAKE_VRAM_MB, "device": "cpu",
                                  "last_used": now, "is_active": True, "quantization": "int8"}
                              for m in loaded},
            "total_models": len(POLICY),
            "total_vram_used_mb": FAKE_VRAM_MB * len(loaded),
            "total_vram_mb": FAKE_BUDGET_MB,
        }
        if action == "status":
            reply.update(routing_policy=POLICY, health="ok", timestamp=now)
        return reply
    if dialect == "mma" and command == "HEALTH_CHECK":
        return {"status": "SUCCESS", "health": "ok", "uptime_seconds": 1.0,
                "loaded_models": len(loaded), "total_vram_used_mb": FAKE_VRAM_MB * len(loaded),
                "total_vram_mb": FAKE_BUDGET_MB, "timestamp": now}
    if dialect != "mms":
        return None
    if action == "get_loaded_models_status":
        return {"status": "success", "loaded_models": {
            m: {"status": "online", "last_used": now, "vram_usage": FAKE_VRAM_MB}
            for m in loaded}}
    if action == "health_check":
        return {"status": "healthy", "total_models": len(POLICY), "online_models": len(loaded),
                "loaded_models": len(loaded), "vram_used_mb": FAKE_VRAM_MB * len(loaded),
                "vram_budget_mb": FAKE_BUDGET_MB,
                "model_details": {m: {"status": "online", "message": "Loaded"} for m in loaded},
                "timestamp": now}
    if action == "list_models":
        return {"status": "success", "models": [
            {"model_id": m, "type": "llm", "estimated_vram_mb": FAKE_VRAM_MB,
             "loaded": m in loaded, "status": "online" if m in loaded
             else "available_not_loaded"} for m in POLICY.values()]}
    return None


def answer(name: str, dialect: str, request: object,
           loaded: list[str] | None = None) -> dict[str, object]:
    """A well-formed reply in ``dialect`` naming the server."""
    req = request if isinstance(request, dict) else {}
    if loaded is not None:
        reply_loaded = answer_loaded(dialect, req, loaded)
        if reply_loaded is not None:
            return reply_loaded
    action = req.get("action")
    if dialect == "mma":
        if action == "generate":
            reply: dict[str, object] = {"status": "ok", "response_text": name,
                                        "model_used": POLICY.get(str(req.get("model_pref")),
                                                                 POLICY["fast"]),
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


class Counts:
    """Requests received, by count_key; read by the health thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}

    def add(self, key: str) -> None:
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


def serve_health(ctx: zmq.Context[zmq.Socket[bytes]], port: int, name: str,
                 stop: threading.Event, counts: Counts | None = None) -> None:
    sock = ctx.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(f"tcp://127.0.0.1:{port}")
    while not stop.is_set():
        if sock.poll(100):
            sock.recv_multipart()
            sock.send_json({"status": "ok", "details": {"status_message": name},
                            "vram_used_mb": 0, "vram_budget_mb": 1000,
                            "counts": counts.snapshot() if counts is not None else {}})
    sock.close(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--dialect", choices=["mma", "mms"], default="mma")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--health-port", type=int, default=0)
    parser.add_argument("--mode", default="ok",
                        choices=["ok", "stall", "garbage", "extra_frames", "foreign_id", "slow",
                                 "rename_field"])
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--loaded", default=None,
                        help="comma-separated models to report as loaded (real-looking "
                             "status replies)")
    parser.add_argument("--rename", default="text=txt", help="OLD=NEW for --mode rename_field")
    parser.add_argument("--pad-bytes", type=int, default=0,
                        help="make each reply this much bigger (garbage: more garbage; "
                             "otherwise a \"pad\" field)")
    args = parser.parse_args()
    loaded = None if args.loaded is None else [m for m in args.loaded.split(",") if m]
    rename_from, _, rename_to = args.rename.partition("=")
    counts = Counts()

    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.health_port:
        threading.Thread(target=serve_health,
                         args=(ctx, args.health_port, args.name, stop, counts),
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
            try:
                request = json.loads(payload)
            except ValueError:
                request = None
            counts.add(count_key(request))
            if args.mode == "stall":
                continue
            reply = answer(args.name, args.dialect, request, loaded)
            if args.mode == "rename_field" and rename_from in reply:
                reply = {rename_to if k == rename_from else k: v for k, v in reply.items()}
            if args.pad_bytes:
                reply["pad"] = "x" * args.pad_bytes
            body = json.dumps(reply).encode()
            if args.mode == "garbage":
                out = [*envelope, b"\xff not json" + b"\xfe" * args.pad_bytes]
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

"""``make demo``: a mix of legacy traffic through a running shim, and who served what.

The client sees MMA-shaped replies whichever backend answered (that is the point), so
the backend is read off the shim's own metrics before and after each request.
"""

from __future__ import annotations

import re
import urllib.request
import uuid
from collections import Counter

import msgspec
import zmq

from shim.config import ShimConfig

_SAMPLE = re.compile(r"^shim_requests_total\{(?P<labels>[^}]*)\} (?P<value>\S+)$")
_LABEL = re.compile(r'(\w+)="([^"]*)"')


def legacy_requests(count: int) -> list[dict[str, object]]:
    """A deterministic mix of every legacy request shape, generate-heavy like real agents."""
    shapes: list[dict[str, object]] = [
        {"action": "status"},
        {"command": "GET_LOADED_MODELS_STATUS"},
        {"command": "HEALTH_CHECK"},
        {"model_id": "whisper-small", "request_id": "demo-r1",
         "context": {"quantization_level": "int8"}},
        {"action": "clear_conversation", "conversation_id": "demo-c1"},
    ]
    out = list(shapes)
    prefs = ["fast", "quality", "fast", "fallback"]
    for i in range(max(0, count - len(shapes))):
        req: dict[str, object] = {"action": "generate", "model_pref": prefs[i % len(prefs)],
                                  "prompt": "The return value of the function",
                                  "params": {"max_tokens": 16, "temperature": 0.7, "top_p": 0.95}}
        if i % 2 == 0:
            req["conversation_id"] = f"demo-c{i % 5}"
        out.append(req)
    return out


def _scrape(url: str) -> Counter[tuple[str, str, str]]:
    counts: Counter[tuple[str, str, str]] = Counter()
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return counts
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            labels = dict(_LABEL.findall(m.group("labels")))
            key = (labels.get("backend", "?"), labels.get("action", "?"),
                   labels.get("outcome", "?"))
            counts[key] = int(float(m.group("value")))
    return counts


def _decode_reply(raw: bytes) -> dict[str, object]:
    """The reply as a JSON object; anything else becomes an error row, not a crash."""
    try:
        reply = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        reply = None
    if isinstance(reply, dict):
        return reply
    return {"status": "error", "message": f"not a JSON object: {raw[:80]!r}"}


def run_demo(cfg: ShimConfig, endpoint: str, count: int) -> int:
    endpoint = endpoint or "tcp://127.0.0.1:" + cfg.shim.listen.rsplit(":", 1)[1]
    metrics_url = f"http://{cfg.shim.metrics}/metrics"
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    served: Counter[str] = Counter()
    failures = 0
    print(f"{'#':>3}  {'request':<34} {'served by':<10} reply")
    for i, req in enumerate(legacy_requests(count), 1):
        before = _scrape(metrics_url)
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send(msgspec.json.encode(
            {**req, "request_id": req.get("request_id", str(uuid.uuid4()))}))
        if not sock.poll(6000):
            print(f"{i:>3}  no reply within 6 s (is `make run` running?)")
            sock.close()
            return 1
        reply = _decode_reply(sock.recv())
        sock.close()
        after = _scrape(metrics_url)
        who = ",".join(sorted({k[0] for k in after if after[k] != before.get(k)})) or "?"
        served[who] += 1
        what = str(req.get("action") or req.get("command") or "model_access")
        what += f" {req['model_pref']}" if "model_pref" in req else ""
        status = reply.get("status")
        failures += status in ("error", "ERROR", "ERROR_LOADING_MODEL")
        detail = (reply.get("response_text") or reply.get("message")
                  or reply.get("error_message") or "")
        print(f"{i:>3}  {what:<34} {who:<10} {status} {str(detail)[:40]!r}")
    print("\nserved: " + ", ".join(f"{k}={v}" for k, v in sorted(served.items()))
          + f"; error replies: {failures}")
    return 0

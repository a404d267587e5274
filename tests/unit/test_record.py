"""The record addon (shim.addons.record.Recorder) with its real writer thread and files.

The Recorder's hook is called with a finished Flow, the way shim.proxy calls it.
"""

from __future__ import annotations

import asyncio
import json
import stat
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import generate_latest

from shim import dialects
from shim.addons.base import Flow
from shim.addons.record import Recorder, in_record_sample
from shim.config import RecordSection, decode_config
from shim.errors import CommandError
from shim.metrics import Metrics
from shim.runtime import runtime_from_config
from tests.reliability.helpers import wait_until

POLICY = {"fast": "phi-2"}
RT = runtime_from_config(decode_config({
    "backends": {"mma": {"dialect": "mma", "endpoints": ["tcp://127.0.0.1:5580"]}},
    "policy": POLICY}))


def recorder(tmp_path: Path, **settings: Any) -> tuple[Recorder, Metrics]:
    metrics = Metrics()
    section = RecordSection(path=str(tmp_path / "rec" / "cap.jsonl"), **settings)
    return Recorder(section, metrics, "conversation_id"), metrics


def exchange(rec: Recorder, msg: dict[str, Any], reply: dict[str, Any]) -> None:
    """One finished exchange, as the proxy hands it to the addon."""
    body = [msgspec.json.encode(msg)]
    now = time.perf_counter()
    flow = Flow(body, msg, dialects.parse_request(msg, POLICY), RT, now, now + 1.0)
    raw_reply = msgspec.json.encode(reply)
    flow.backend, flow.sent_at, flow.answer = "mma", now, raw_reply
    flow.reply, flow.exchanged = [raw_reply], True
    rec.after_reply(flow)


GEN = {"action": "generate", "model_pref": "fast", "prompt": "top secret prompt",
       "conversation_id": "c1"}
REPLY = {"status": "ok", "response_text": "a secret answer", "model_used": "phi-2"}


def test_nothing_is_recorded_until_started_and_after_stopped(tmp_path: Path) -> None:
    rec, _ = recorder(tmp_path)
    rec.start()  # enabled = false: stays off
    exchange(rec, GEN, REPLY)
    assert not (tmp_path / "rec").exists()
    rec.start_recording()
    exchange(rec, GEN, REPLY)
    rec.stop_recording()
    exchange(rec, GEN, REPLY)
    lines = (tmp_path / "rec" / "cap.jsonl").read_text().splitlines()
    assert len(lines) == 1
    assert rec.describe()["written"] == 1 and not rec.describe()["active"]


def test_capture_is_0600_in_a_0700_directory_and_redacted(tmp_path: Path) -> None:
    rec, metrics = recorder(tmp_path)
    rec.start_recording()
    for _ in range(3):
        exchange(rec, GEN, REPLY)
    rec.stop_recording()
    path = tmp_path / "rec" / "cap.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    text = path.read_text()
    assert "secret" not in text
    first = json.loads(text.splitlines()[0])
    assert first["action"] == "generate" and first["model"] == "phi-2"
    assert first["conversation_id"] == "c1" and first["backend"] == "mma"
    assert first["latency_ms"] >= 0 and first["form"] == "action"
    assert 'shim_record_total{outcome="written"} 3.0' in generate_latest(
        metrics.registry).decode()


def test_payloads_are_kept_only_when_configured(tmp_path: Path) -> None:
    rec, _ = recorder(tmp_path, payloads=True)
    rec.start_recording()
    exchange(rec, GEN, REPLY)
    rec.stop_recording()
    record = json.loads((tmp_path / "rec" / "cap.jsonl").read_text())
    assert record["request"]["prompt"] == GEN["prompt"] and record["redacted"] is False


def test_a_full_queue_sheds_and_counts_without_blocking(tmp_path: Path) -> None:
    rec, metrics = recorder(tmp_path, queue_size=2)
    rec.start_recording()
    handler = rec._handler
    assert handler is not None
    handler.acquire()  # the writer thread blocks on its next write
    try:
        exchange(rec, GEN, REPLY)  # taken by the writer, which then waits for the lock
        queue_ = rec._queue
        assert queue_ is not None
        wait_until(queue_.empty, 10.0, "the writer to drain the queue", interval=0.01)
        started = time.perf_counter()
        for _ in range(50):
            exchange(rec, GEN, REPLY)
        assert time.perf_counter() - started < 1.0  # put_nowait: never waits for the disk
        assert rec.shed == 48
    finally:
        handler.release()
    rec.stop_recording()
    assert rec.describe()["written"] == 3  # one taken, two queued; the rest shed
    text = generate_latest(metrics.registry).decode()
    assert 'shim_record_total{outcome="shed"} 48.0' in text


def test_the_file_rotates_at_max_bytes_and_keeps_backups(tmp_path: Path) -> None:
    rec, _ = recorder(tmp_path, max_bytes=4096, backups=2)
    rec.start_recording()
    for _ in range(200):
        exchange(rec, GEN, REPLY)
    rec.stop_recording()
    files = sorted(p.name for p in (tmp_path / "rec").iterdir())
    assert files == ["cap.jsonl", "cap.jsonl.1", "cap.jsonl.2"]
    for p in (tmp_path / "rec").iterdir():
        assert p.stat().st_size <= 4096
        assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_admin_commands_validate_their_arguments(tmp_path: Path) -> None:
    rec, _ = recorder(tmp_path)
    commands = rec.commands()
    for bad in ({"percent": 0}, {"percent": 150}, {"percent": True}, {"max_bytes": 10},
                {"max_bytes": 1.5}, {"path": "/etc/passwd"}, {"payloads": True}):
        with pytest.raises(CommandError):
            commands["record_start"](bad)
    assert not rec.active
    started = commands["record_start"]({"percent": 50, "max_bytes": 8192})
    assert started["active"] and started["percent"] == 50 and started["max_bytes"] == 8192
    stopped = asyncio.run(commands["record_stop"]({}))  # drains in a thread, off the loop
    assert not stopped["active"]


def test_sample_is_sticky_per_conversation() -> None:
    keys = [f"conv-{i}" for i in range(2000)]
    first = [in_record_sample(k, 25) for k in keys]
    assert first == [in_record_sample(k, 25) for k in keys]
    assert 400 < sum(first) < 600
    assert all(in_record_sample(k, 100) for k in keys[:10])

"""The capture format (shim.capture) and the replay scheduler (shim.replay.schedule)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim import dialects
from shim.capture import (
    Exchange,
    corpus_to_capture,
    exchange_record,
    from_corpus,
    has_markers,
    read_capture,
    redact,
    unredact,
)
from shim.dialects import Op
from shim.errors import CaptureError
from shim.replay import chain_keys, parse_speed, schedule

POLICY = {"fast": "phi-2", "quality": "mistral-7b", "fallback": "tinyllama"}
CORPUS = Path(__file__).resolve().parents[2] / "config" / "parity_requests.jsonl"


async def work(steps: int) -> None:
    """Simulated work: ``steps`` passes of the event loop (deterministic, no clock)."""
    for _ in range(steps):
        await asyncio.sleep(0)


def op(msg: dict[str, Any]) -> Op:
    return dialects.parse_request(msg, POLICY)


def test_redaction_hides_prompts_text_and_audio_at_any_depth() -> None:
    request = {"action": "generate", "prompt": "secret plans", "model_pref": "fast",
               "params": {"system_prompt": "be terse", "max_tokens": 4},
               "audio_data": [0.1, 0.2, 0.3], "conversation_id": "c1"}
    reply = {"status": "ok", "response_text": "the answer", "result": {"text": "heard"}}
    out = json.dumps([redact(request), redact(reply)])
    for secret in ("secret plans", "be terse", "0.1", "the answer", "heard"):
        assert secret not in out
    r = redact(request)
    assert r["prompt"]["length"] == len("secret plans") and r["prompt"]["type"] == "str"
    assert r["audio_data"]["length"] == 3 and r["audio_data"]["type"] == "list"
    assert r["params"]["max_tokens"] == 4 and r["conversation_id"] == "c1"
    assert redact({"prompt": "secret plans"})["prompt"]["redacted"] == r["prompt"]["redacted"]
    assert redact({"prompt": "other"})["prompt"]["redacted"] != r["prompt"]["redacted"]
    assert redact({"prompt": None}) == {"prompt": None}


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(["prompt", "text", "audio_data", "x",
                                                       "params", "status"]), inner,
                                      max_size=4), max_leaves=20))
def test_unredact_restores_type_and_length_and_leaves_no_marker(value: Any) -> None:
    hidden = redact(value)
    back = unredact(hidden)
    assert not has_markers(back)
    assert redact(back) == redact(back)  # stable
    if isinstance(value, dict):
        for key in value.keys() & {"prompt", "text", "audio_data"}:
            original = value[key]
            if isinstance(original, str | list):
                assert type(back[key]) is type(original) and len(back[key]) == len(original)


def test_capture_lines_read_back_in_send_order_across_rotated_files(tmp_path: Path) -> None:
    base = tmp_path / "cap.jsonl"
    msgs = [{"action": "status", "n": i} for i in range(6)]

    def line(i: int) -> str:
        return json.dumps(exchange_record(seq=i, ts=100.0 + i, op=op(msgs[i]),
                                          request=msgs[i], reply={"status": "ok"},
                                          backend="mma", latency_ms=1.5, payloads=False))
    (tmp_path / "cap.jsonl.2").write_text(line(0) + "\n" + line(1) + "\n")
    (tmp_path / "cap.jsonl.1").write_text(line(3) + "\n" + line(2) + "\n{\"torn")
    base.write_text("# a comment\n\n" + line(4) + "\n" + json.dumps({"kind": "other"})
                    + "\n" + line(5) + "\n")
    exchanges = read_capture(base)
    assert [e.request["n"] for e in exchanges] == [0, 1, 2, 3, 4, 5]
    assert all(e.redacted and e.backend == "mma" and e.latency_ms == 1.5 for e in exchanges)


def test_a_newer_version_or_a_missing_capture_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="no such capture"):
        read_capture(tmp_path / "missing.jsonl")
    newer = tmp_path / "newer.jsonl"
    newer.write_text(json.dumps({"v": 2, "kind": "exchange", "request": {}}) + "\n")
    with pytest.raises(CaptureError, match="version 2"):
        read_capture(newer)


def test_the_parity_corpus_converts_to_a_capture_with_the_same_requests(
        tmp_path: Path) -> None:
    path = tmp_path / "converted.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in corpus_to_capture(CORPUS, POLICY)))
    converted = read_capture(path)
    corpus = from_corpus(CORPUS)
    assert len(converted) == len(corpus) >= 25
    assert [e.request for e in converted] == [e.request for e in corpus]
    assert all(e.reply is None and not e.redacted for e in converted)


def test_speeds() -> None:
    assert (parse_speed("1x"), parse_speed("10x"), parse_speed("max"),
            parse_speed("2.5x")) == (1.0, 10.0, 0.0, 2.5)
    for bad in ("fast", "0x", "-1x", ""):
        with pytest.raises(ValueError):
            parse_speed(bad)


def test_chain_keys_order_state_changes_and_their_model() -> None:
    assert chain_keys(op({"command": "LOAD_MODEL", "model_name": "phi-2"})) == \
        [("model:phi-2", True), ("state", True)]
    gen = op({"action": "generate", "model_pref": "fast", "prompt": "x",
              "conversation_id": "c"})
    assert chain_keys(gen) == [("conversation:c", True), ("model:phi-2", False)]
    assert chain_keys(op({"action": "status"})) == [("state", False)]


def test_unordered_replay_keeps_each_chain_in_order_and_overlaps_the_rest() -> None:
    """Earlier requests are made slower than later ones, so anything not held back by
    its chain would finish (and start) out of order."""
    items = [
        {"command": "LOAD_MODEL", "model_name": "phi-2"},                              # 0
        {"action": "generate", "model_pref": "fast", "prompt": "a", "conversation_id": "c1"},
        {"action": "generate", "model_pref": "fast", "prompt": "d", "conversation_id": "c3"},
        {"action": "generate", "model_pref": "quality", "prompt": "b",
         "conversation_id": "c2"},                                                     # 3
        {"action": "generate", "model_pref": "fast", "prompt": "c", "conversation_id": "c1"},
        {"command": "GET_LOADED_MODELS_STATUS"},                                       # 5
        {"command": "UNLOAD_MODEL", "model_name": "phi-2"},                            # 6
    ]
    events: list[tuple[str, int]] = []

    async def run_one(exchange: Exchange, o: Op | None) -> None:
        events.append(("start", exchange.line))
        await work(10 * (len(items) - exchange.line))
        events.append(("end", exchange.line))

    asyncio.run(schedule([(Exchange(i, m), op(m)) for i, m in enumerate(items)], run_one,
                         ordered=False, speed=0.0))

    def at(kind: str, n: int) -> int:
        return events.index((kind, n))
    for before, after in ((0, 1), (0, 2), (1, 4), (0, 5), (1, 6), (2, 6), (4, 6), (5, 6)):
        assert at("end", before) < at("start", after), (before, after, events)
    assert at("start", 3) < at("end", 0)  # another model, another conversation: overlaps
    assert at("start", 2) < at("end", 1)  # one model, two conversations: generates overlap


def test_ordered_replay_is_one_at_a_time() -> None:
    events: list[tuple[str, int]] = []

    async def run_one(exchange: Exchange, o: Op | None) -> None:
        events.append(("start", exchange.line))
        await work(10 * (3 - exchange.line))
        events.append(("end", exchange.line))

    items = [(Exchange(i, {"action": "status"}), op({"action": "status"})) for i in range(3)]
    asyncio.run(schedule(items, run_one, ordered=True, speed=0.0))
    assert events == [(k, i) for i in range(3) for k in ("start", "end")]

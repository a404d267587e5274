"""The agent-compatibility modules on their own: conversation map, duplicate joins,
merged loaded-models view, deadline lookup (shim.conversations, shim.dedup, shim.merged,
shim.deadlines)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter

from shim.config import ActionRule, ConversationsSection, DeadlinesSection, decode_config
from shim.conversations import Conversations
from shim.deadlines import Deadlines
from shim.dedup import Joins
from shim.dialects import ModelInfo, Result, parse_request
from shim.merged import merge
from shim.runtime import runtime_from_config

POLICY = {"fast": "phi-2"}
DIALECTS = {"mma": "mma", "mms": "mms"}


def turn(cid: str) -> Any:
    return parse_request({"action": "generate", "prompt": "hi", "conversation_id": cid}, POLICY)


def clear(cid: str) -> Any:
    return parse_request({"action": "clear_conversation", "conversation_id": cid}, POLICY)


def test_clear_goes_to_the_backend_that_served_the_conversation() -> None:
    conv = Conversations(ConversationsSection())
    conv.served("c1", "mma")
    assert conv.route(clear("c1"), ["mms", "mma"]) == ["mma"]
    assert conv.route(turn("c1"), ["mms", "mma"]) == ["mma", "mms"]
    assert conv.local_clear(clear("c1"), DIALECTS) is None  # MMA clears it itself


def test_clear_of_an_mms_conversation_is_answered_and_made_real() -> None:
    conv = Conversations(ConversationsSection())
    conv.served("c1", "mms")
    assert conv.backend_id("c1") == "c1"
    assert conv.local_clear(clear("c1"), DIALECTS) == {
        "status": "ok", "message": "Conversation c1 cleared", "conversation_id": "c1"}
    assert conv.backend_id("c1") == "c1#1"  # the next turn starts fresh on MMS
    assert conv.local_clear(clear("c1"), DIALECTS) is None  # nothing served it since
    conv.served("c1", "mms")
    assert conv.local_clear(clear("c1"), DIALECTS) is not None
    assert conv.backend_id("c1") == "c1#2"
    assert conv.local_clear(clear("never"), DIALECTS) is None


def test_conversation_entries_expire() -> None:
    conv = Conversations(ConversationsSection(ttl_s=0.0))
    conv.served("c1", "mms")
    assert conv.backend_of("c1") is None and len(conv) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["turn", "clear"]), st.integers(0, 40),
                          st.sampled_from(["mma", "mms"])), max_size=300),
       st.integers(1, 16))
def test_conversation_map_stays_bounded_and_clears_never_reuse_an_id(
        steps: list[tuple[str, int, str]], bound: int) -> None:
    conv = Conversations(ConversationsSection(max_entries=bound))
    used: dict[str, set[str]] = {}
    for what, n, backend in steps:
        cid = f"c{n}"
        if what == "turn":
            conv.served(cid, backend)
        else:
            before = conv.backend_id(cid)
            if conv.local_clear(clear(cid), DIALECTS) is not None:
                used.setdefault(cid, set()).add(before)
                assert conv.backend_id(cid) not in used[cid]  # a fresh MMS conversation
        assert len(conv) <= bound


def test_duplicates_join_while_in_flight_only() -> None:
    async def scenario() -> None:
        counter = Counter("joins", "joins", ["kind"], registry=CollectorRegistry())
        joins = Joins(10.0, counter)
        loop = asyncio.get_running_loop()
        first: asyncio.Future[list[bytes]] = loop.create_future()
        second: asyncio.Future[list[bytes]] = loop.create_future()
        assert joins.by_bytes((b"1",), first) is None
        assert joins.by_bytes((b"1",), second) is first
        assert joins.by_request_id("r", first) is None
        assert joins.by_request_id("r", second) is first
        first.set_result([b"reply"])
        await asyncio.sleep(0)  # done callbacks run
        assert len(joins) == 0
        third: asyncio.Future[list[bytes]] = loop.create_future()
        assert joins.by_bytes((b"1",), third) is None  # the first is over: runs again
        assert counter.labels("bytes")._value.get() == 1
        assert counter.labels("request_id")._value.get() == 1

    asyncio.run(scenario())


def test_merged_view_unions_models_sums_vram_and_labels_devices() -> None:
    op = parse_request({"command": "GET_LOADED_MODELS_STATUS"}, POLICY)
    mma = Result(ok=True, source="mma", loaded_models={
        "tinyllama": ModelInfo(vram_mb=1100, last_used=10.0, device="cuda:0")},
        vram_used_mb=1100, vram_budget_mb=12000, total_models=6)
    mms = Result(ok=True, source="mms", loaded_models={
        "phi-2": ModelInfo(vram_mb=2250, last_used=20, device="unknown")},
        vram_budget_mb=12000)
    merged = merge(op, {"mma": mma, "mms": mms}, {"mma": "", "mms": "MainPC"},
                   {"phi-2": "int8"})
    assert merged.loaded_models is not None
    assert set(merged.loaded_models) == {"tinyllama", "phi-2"}
    assert merged.loaded_models["phi-2"].device == "MainPC"
    assert merged.loaded_models["phi-2"].quantization == "int8"
    assert isinstance(merged.loaded_models["phi-2"].last_used, float)
    assert merged.vram_used_mb == 3350
    assert merged.vram_budget_mb == 24000  # two device labels: two budgets


@pytest.mark.parametrize(("form", "name", "action", "want"), [
    ("action", "generate", "generate", 29000),
    ("command", "GET_LOADED_MODELS_STATUS", "loaded_status", 4500),
    ("action", "status", "status", 900),
    ("command", "LOAD_MODEL", "load", 1234),  # the explicit per-action rule wins
    ("model_access", None, "model_access", 9500),
    ("opaque", None, None, 4500),
])
def test_deadline_lookup(form: str, name: str | None, action: str | None, want: int) -> None:
    cfg = decode_config({"backends": {"mma": {"dialect": "mma",
                                              "endpoints": ["tcp://127.0.0.1:7224"]}},
                         "actions": {"load": {"timeout_ms": 1234}}, "models_file": ""})
    rt = runtime_from_config(cfg)
    assert isinstance(rt.overrides["load"], ActionRule)
    assert Deadlines(DeadlinesSection(), 4500).ms(rt, form, name, action) == want

"""shim.bounded (maps keyed by client strings) and shim.privacy (what the diff log keeps)."""

from __future__ import annotations

import pytest

from shim.bounded import BoundedDict
from shim.privacy import redact_record, summary


def test_bounded_dict_keeps_the_newest_entries_only() -> None:
    d: BoundedDict[str, int] = BoundedDict(100)
    for i in range(10_000):
        d[f"model-{i}"] = i
    assert len(d) == 100 and d.evicted == 9_900
    assert d.get("model-0") is None and d.get("model-9999") == 9999
    d["model-9900"] = -1  # set again: the newest, kept past the next eviction
    d["one-more"] = 0
    assert "model-9900" in d and "model-9901" not in d


def test_bounded_dict_forgets_old_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr("shim.bounded.time.monotonic", lambda: now[0])
    d: BoundedDict[str, int] = BoundedDict(10, ttl_s=5.0)
    d["a"] = 1
    now[0] += 4
    d["b"] = 2
    assert d.get("a") == 1
    now[0] += 2  # "a" is 6 s old, "b" 2 s
    assert d.get("a") is None and d.get("b") == 2
    d["c"] = 3  # a write prunes what expired
    assert len(d) == 2
    with pytest.raises(ValueError):
        BoundedDict(0)


def test_summary_keeps_shape_and_hash_not_text() -> None:
    request = {"action": "generate", "prompt": "secret words", "params": {"max_tokens": 4},
               "conversation_id": "conv-9", "history": [{"role": "user"}]}
    s = summary(request)
    assert "secret" not in str(s) and "conv-9" not in str(s)
    assert s["shape"] == {"action": "str", "prompt": "str", "params": {"max_tokens": "int"},
                          "conversation_id": "str", "history": [{"role": "str"}]}
    assert len(s["sha256"]) == 64 and s["bytes"] > 0
    assert summary(request) == s  # the same payload, the same record: records can be matched
    record = redact_record({"kind": "mismatch", "request": request,
                            "primary_reply": {"response_text": "generated"},
                            "diffs": [{"path": "response_text", "primary": "generated",
                                       "shadow": "other"}]})
    assert "generated" not in str(record) and record["diffs"][0]["path"] == "response_text"

"""Shadow comparison rules (shim.compare), the diff log's rotation and its report
(shim.difflog), and the shadow sample (shim.addons.shadow.in_sample)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shim.addons.shadow import in_sample
from shim.compare import (
    DEFAULT_RULES,
    Rules,
    RuleSet,
    compare,
    format_path,
    generalize,
    parse_pattern,
    split_noise,
)
from shim.config import decode_config
from shim.difflog import DiffLog, Tally, log_files, read_records
from shim.errors import ConfigError, PatternError


def paths(diffs: list[Any]) -> list[str]:
    return [format_path(d.path) for d in diffs]


def rules(*layers: dict[str, Any]) -> RuleSet:
    return RuleSet(layers)


# -- exact / shape / ignore ------------------------------------------------------------

def test_exact_is_the_default_and_reports_each_differing_leaf() -> None:
    a = {"status": "ok", "n": 1, "nested": {"x": [1, 2], "y": "same"}}
    b = {"status": "error", "n": 1, "nested": {"x": [1, 3], "y": "same"}}
    diffs = compare(a, b, rules())
    assert paths(diffs) == ["status", "nested.x[1]"]
    assert diffs[0].kind == "value" and (diffs[0].primary, diffs[0].shadow) == ("ok", "error")


def test_numbers_compare_by_value_but_booleans_are_not_numbers() -> None:
    assert compare({"mb": 2250}, {"mb": 2250.0}, rules()) == []
    diffs = compare({"flag": True}, {"flag": 1}, rules())
    assert paths(diffs) == ["flag"] and diffs[0].kind == "type"


def test_missing_and_extra_keys() -> None:
    diffs = compare({"a": 1, "b": 2}, {"a": 1, "c": 3}, rules())
    assert [(format_path(d.path), d.kind) for d in diffs] == [("b", "missing"), ("c", "extra")]


def test_shape_needs_same_keys_and_types_not_values() -> None:
    r = rules({"text": "shape", "info": "shape"})
    assert compare({"text": "hello"}, {"text": "something else"}, r) == []
    assert paths(compare({"text": "hello"}, {"text": 5}, r)) == ["text"]
    a = {"info": {"mb": 1, "dev": "cpu"}}
    assert compare(a, {"info": {"mb": 99, "dev": "cuda"}}, r) == []
    diffs = compare(a, {"info": {"mb": 99}}, r)
    assert [(format_path(d.path), d.kind) for d in diffs] == [("info.dev", "missing")]


def test_shape_allows_arrays_of_other_lengths_exact_does_not() -> None:
    assert compare({"xs": [1, 2]}, {"xs": [5, 6, 7]}, rules({"xs": "shape"})) == []
    diffs = compare({"xs": [1, 2]}, {"xs": [1, 2, 3]}, rules())
    assert [(format_path(d.path), d.kind) for d in diffs] == [("xs", "length")]


def test_ignore_prunes_the_subtree_and_hides_missing_keys() -> None:
    r = rules({"loaded_models": "ignore", "**.timestamp": "ignore"})
    a = {"loaded_models": {"phi-2": {}}, "timestamp": 1.0, "deep": {"timestamp": "x"}}
    b = {"loaded_models": {}, "deep": {"timestamp": "y"}}
    assert compare(a, b, r) == []


def test_descendant_rule_overrides_the_inherited_one() -> None:
    r = rules({"info": "shape", "info.count": "exact"})
    assert compare({"info": {"count": 1, "x": 1}}, {"info": {"count": 1, "x": 2}}, r) == []
    assert paths(compare({"info": {"count": 1}}, {"info": {"count": 2}}, r)) == ["info.count"]


def test_most_specific_pattern_wins_then_the_later_layer() -> None:
    r = rules({"**.last_used": "ignore"}, {"models[*].last_used": "exact"})
    assert paths(compare({"models": [{"last_used": 1}]}, {"models": [{"last_used": 2}]}, r)) \
        == ["models[0].last_used"]
    assert compare({"other": {"last_used": 1}}, {"other": {"last_used": 2}}, r) == []
    # Same pattern in two layers: the later (configured) one wins.
    r = rules({"message": "shape"}, {"message": "exact"})
    assert paths(compare({"message": "a"}, {"message": "b"}, r)) == ["message"]


def test_arrays_of_models_are_matched_by_id_not_position() -> None:
    a = {"models": [{"model_id": "phi-2", "type": "llm"}, {"model_id": "whisper", "type": "stt"}]}
    b = {"models": [{"model_id": "whisper", "type": "stt"}, {"model_id": "phi-2", "type": "tts"}]}
    diffs = compare(a, b, rules())
    assert paths(diffs) == ["models[model_id=phi-2].type"]
    c = {"models": [{"model_id": "phi-2", "type": "llm"}]}
    assert [(format_path(d.path), d.kind) for d in compare(a, c, rules())] == [
        ("models[model_id=whisper]", "missing")]


def test_paths_format_and_parse_round_trip() -> None:
    for text in ["status", "loaded_models.phi-2.vram_usage_mb", 'loaded_models["llama-3.1"].device',
                 "models[0].type", "models[model_id=phi-2].loaded", "**.timestamp",
                 "loaded_models.*.device", "models[*].status"]:
        assert parse_pattern(format_path(parse_pattern(text))) == parse_pattern(text)
    assert format_path(parse_pattern('loaded_models["llama-3.1"].device')) == \
        'loaded_models["llama-3.1"].device'
    assert format_path(("models", ("model_id", "phi-2"), "loaded")) == \
        "models[model_id=phi-2].loaded"
    assert generalize(("models", 3, "type")) == "models[*].type"
    assert format_path(()) == "$"
    for bad in ["a..b", "a.", ".a", "a[", "a]b", 'a["\\x"]']:  # the last: a bad escape
        with pytest.raises(PatternError):
            parse_pattern(bad)
    assert parse_pattern('a["caf\\u00e9 \\"x\\""]') == ("a", 'café "x"')
    assert parse_pattern(format_path(("a", "b.c é"))) == ("a", "b.c é")


def test_noise_from_the_secondary_is_split_off() -> None:
    r = rules()
    primary = {"status": "ok", "text": "a", "meta": {"seed": 1, "n": 2}}
    shadow = {"status": "error", "text": "b", "meta": {"seed": 3, "n": 2}}
    twin = {"status": "ok", "text": "c", "meta": {"seed": 2, "n": 2}}
    real, noise = split_noise(compare(primary, shadow, r), compare(primary, twin, r))
    assert paths(real) == ["status"]
    assert paths(noise) == ["text", "meta.seed"]


# -- the default rules -----------------------------------------------------------------

def test_defaults_ignore_clocks_and_compare_generated_text_by_shape() -> None:
    gen = Rules().for_action("generate")
    a = {"status": "ok", "response_text": "hello", "model_used": "phi-2", "timestamp": 1.0}
    b = {"status": "ok", "response_text": "other words", "model_used": "phi-2", "timestamp": 2.0}
    assert compare(a, b, gen) == []
    assert paths(compare(a, {**b, "model_used": "tinyllama"}, gen)) == ["model_used"]
    assert paths(compare(a, {**b, "response_text": None}, gen)) == ["response_text"]


def test_default_status_ignores_what_is_loaded_but_parity_compares_it() -> None:
    a = {"status": "ok", "loaded_models": {"phi-2": {"vram_usage_mb": 2250, "device": "cuda:0",
                                                     "last_used": 5.0}},
         "total_models": 6, "total_vram_used_mb": 2250, "total_vram_mb": 12000}
    b = {"status": "ok", "loaded_models": {}, "total_models": 6, "total_vram_used_mb": 0,
         "total_vram_mb": 15729}
    assert compare(a, b, Rules().for_action("status")) == []
    parity = Rules(parity=True).for_action("status")
    assert paths(compare(a, b, parity)) == ["loaded_models.phi-2", "total_vram_used_mb"]
    c = {**a, "loaded_models": {"phi-2": {"vram_usage_mb": 2250, "device": "unknown",
                                          "last_used": 9.0}}}
    assert compare(a, c, parity) == []  # MMS reports no device: shape only
    assert paths(compare(a, {**b, "total_models": 5}, Rules().for_action("status"))) == [
        "total_models"]


def test_configured_rules_override_the_defaults() -> None:
    r = Rules({"generate": {"response_text": "exact"}, "*": {"model_used": "ignore"}})
    gen = r.for_action("generate")
    assert paths(compare({"response_text": "a", "model_used": "x"},
                         {"response_text": "b", "model_used": "y"}, gen)) == ["response_text"]
    assert set(DEFAULT_RULES) >= {"*", "generate", "status", "health"}


def test_config_rejects_unknown_actions_and_bad_patterns() -> None:
    base: dict[str, Any] = {"backends": {"mma": {"dialect": "mma",
                                                 "endpoints": ["tcp://127.0.0.1:5580"]}},
                            "policy": {"fast": "phi-2"}}
    decode_config({**base, "shadow": {"compare": {"generate": {"text": "shape"}}}})
    with pytest.raises(ConfigError, match=r"shadow\.compare\.nope"):
        decode_config({**base, "shadow": {"compare": {"nope": {"x": "exact"}}}})
    with pytest.raises(ConfigError, match="bad field path"):
        decode_config({**base, "shadow": {"compare": {"*": {"a..b": "exact"}}}})
    with pytest.raises(ConfigError, match="compare"):
        decode_config({**base, "shadow": {"compare": {"*": {"a": "fuzzy"}}}})


# -- sampling --------------------------------------------------------------------------

def test_sample_is_sticky_per_key_and_near_the_percentage() -> None:
    keys = [f"conv-{i}" for i in range(10_000)]
    picked = [k for k in keys if in_sample(k, 30)]
    assert 0.28 < len(picked) / len(keys) < 0.32
    assert all(in_sample(k, 30) for k in picked[:100])  # the same answer every time
    assert all(in_sample(k, 100) for k in keys[:100])
    assert not any(in_sample(k, 0) for k in keys[:100])
    unkeyed = sum(in_sample(None, 30) for _ in range(10_000))
    assert 2500 < unkeyed < 3500


# -- the diff log ----------------------------------------------------------------------

def write_records(path: Path, records: list[dict[str, Any]], max_bytes: int,
                  backups: int) -> DiffLog:
    """Write ``records`` through a DiffLog and close it (everything is on disk after)."""
    log = DiffLog(path, max_bytes=max_bytes, backups=backups, tally_s=60, payloads=True)
    for record in records:
        log.write(record)
    log.close()
    assert (log.written, log.dropped, log.write_errors) == (len(records), 0, 0)
    return log


def test_rotation_keeps_size_bounded_and_drops_the_oldest(tmp_path: Path) -> None:
    path = tmp_path / "diffs.jsonl"
    write_records(path, [{"n": i, "pad": "x" * 80} for i in range(100)], 1000, 2)
    files = log_files(path)
    assert [f.name for f in files] == ["diffs.jsonl.2", "diffs.jsonl.1", "diffs.jsonl"]
    assert all(f.stat().st_size <= 1000 for f in files)
    assert all(f.stat().st_mode & 0o777 == 0o600 for f in files)
    kept = [r["n"] for r in read_records(path)]
    assert kept == list(range(kept[0], 100))  # oldest first, contiguous, newest kept
    assert kept[0] > 0  # the oldest were dropped
    assert len(kept) <= 3 * (1000 // 95 + 1)


def test_rotation_without_backups_truncates(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    write_records(path, [{"n": i, "pad": "y" * 40} for i in range(20)], 300, 0)
    assert log_files(path) == [path]
    assert path.stat().st_size <= 300
    assert [r["n"] for r in read_records(path)][-1] == 19


def test_reopened_log_appends_and_rotates_on_its_real_size(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"n": -1}\n' * 20)  # 200 bytes from an earlier run
    write_records(path, [{"n": i} for i in range(10)], 250, 1)
    assert (tmp_path / "d.jsonl.1").exists()
    assert all(f.stat().st_size <= 250 for f in log_files(path))
    assert [r["n"] for r in read_records(path)][-1] == 9


def test_torn_lines_are_skipped_on_read(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"kind": "tally", "counts": {"status": {"match": 2}}}\n{"kind": "mis')
    assert [r["kind"] for r in read_records(path)] == ["tally"]


def mismatch(action: str, *diff_paths: str) -> dict[str, Any]:
    return {"kind": "mismatch", "ts": 1.0, "action": action, "request": {"action": action},
            "diffs": [{"path": p, "group": p, "kind": "value", "primary": 1, "shadow": 2}
                      for p in diff_paths]}


def test_difflog_writes_records_and_tallies_that_the_report_reads(tmp_path: Path) -> None:
    path = tmp_path / "diffs.jsonl"
    log = DiffLog(path, max_bytes=1 << 20, backups=2, tally_s=60, payloads=True)
    for _ in range(7):
        log.count("status", "match")
    for _ in range(3):
        log.count("status", "mismatch")
        log.write(mismatch("status", "total_models"))
    log.count("generate", "shed")
    log.count("generate", "mismatch", noise=["response_text"])
    log.write(mismatch("generate", "model_used", "status"))
    assert log.wants_example("generate", "shadow_error")
    assert not log.wants_example("generate", "shadow_error")  # one example per window
    log.close()
    tally = Tally().add_all(read_records(path))
    status = tally.actions["status"]
    assert (status.compared, status.counts["mismatch"]) == (10, 3)
    assert status.mismatch_rate == pytest.approx(0.3)
    assert status.paths["total_models"].count == 3
    report = tally.as_json()
    assert report["actions"]["generate"]["shed"] == 1
    assert report["actions"]["generate"]["noise"] == {"response_text": 1}
    assert report["actions"]["status"]["paths"][0]["path"] == "total_models"
    assert report["actions"]["status"]["paths"][0]["example"]["request"] == {"action": "status"}
    text = tally.format()
    assert "total_models" in text and "30.0%" in text


def test_oversized_records_are_cut_down_not_dropped(tmp_path: Path) -> None:
    path = tmp_path / "diffs.jsonl"
    log = DiffLog(path, max_bytes=64 * 1024, backups=1, tally_s=60, payloads=True)
    record = mismatch("generate", "response_text")
    record["primary_reply"] = {"response_text": "z" * 100_000}
    log.write(record)
    log.close()
    (got,) = [r for r in read_records(path) if r["kind"] == "mismatch"]
    assert got["primary_reply"]["truncated"] is True
    assert got["diffs"][0]["path"] == "response_text"
    assert path.stat().st_size < 64 * 1024

"""Plans resolved against the shim's config: the weights each stage implies, the models
it moves, and the plans that are refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.config import load_config
from shim.errors import PlanError
from shim.rollout.plan import decode_plan, format_check, load_plan, resolve, served_by, weights_for

ROOT = Path(__file__).resolve().parents[2]
ALL = ["piper-tts", "mistral-7b", "phi-2", "tinyllama", "whisper-small", "llama-3-8b"]


@pytest.fixture(scope="module")
def cfg():  # type: ignore[no-untyped-def]
    return load_config(ROOT / "config" / "shim.toml")


def resolved(cfg: Any, stages: list[dict[str, Any]], **extra: Any) -> Any:
    return resolve(decode_plan({"name": "t", "stages": stages, **extra}), cfg)


def test_shipped_plans_check(cfg: Any) -> None:
    for path in sorted((ROOT / "config" / "rollouts").glob("*.toml")):
        plan, _ = load_plan(path)
        steps = resolve(plan, cfg)
        assert steps[-1].weights == {"mma": 0.0, "mms": 100.0}, path
        assert "moves to mms" in format_check(plan, steps)


def test_default_plan_weights_and_moves(cfg: Any) -> None:
    plan, _ = load_plan(ROOT / "config" / "rollouts" / "default.toml")
    steps = resolve(plan, cfg)
    assert [s.moves for s in steps] == [
        (), ("piper-tts",), ("mistral-7b", "phi-2", "tinyllama"), ("whisper-small",),
        ("llama-3-8b",)]
    assert steps[1].weights == {"mma": 85.41, "mms": 14.59}  # piper-tts from 14.59 %
    assert steps[1].interval == (14.59, 40.63)
    for s in steps:
        assert sum(s.weights.values()) == pytest.approx(100.0)


def test_a_set_no_weight_gives_is_refused(cfg: Any) -> None:
    with pytest.raises(PlanError, match=r"no weight gives mms exactly.*piper-tts, mistral-7b"):
        resolved(cfg, [{"models": ["phi-2"]}])


def test_moving_a_model_back_is_refused(cfg: Any) -> None:
    with pytest.raises(PlanError, match="would move back"):
        resolved(cfg, [{"models": ["piper-tts"]}, {"models": []}])


def test_model_free_share_outside_the_sets_interval_is_refused(cfg: Any) -> None:
    with pytest.raises(PlanError, match=r"outside 14.59..40.63"):
        resolved(cfg, [{"models": ["piper-tts"], "model_free_percent": 50}])
    steps = resolved(cfg, [{"models": ["piper-tts"], "model_free_percent": 30}])
    assert steps[0].weights == {"mma": 70.0, "mms": 30.0}


def test_weights_never_go_down(cfg: Any) -> None:
    steps = resolved(cfg, [{"models": ["piper-tts"], "model_free_percent": 30},
                           {"models": ["piper-tts"]}])
    assert steps[1].weights == steps[0].weights
    with pytest.raises(PlanError, match="below the previous"):
        resolved(cfg, [{"models": ["piper-tts"], "model_free_percent": 30},
                       {"models": ["piper-tts"], "model_free_percent": 20}])


def test_split_weights_without_ownership_are_refused(cfg: Any) -> None:
    import msgspec

    off = msgspec.structs.replace(cfg, ownership=msgspec.structs.replace(cfg.ownership,
                                                                         enabled=False))
    with pytest.raises(PlanError, match="loads it on both"):
        resolved(off, [{"models": ["piper-tts"]}])
    # All or nothing moves no model between two live owners.
    assert resolved(off, [{"models": ALL, "model_free_percent": 100}])[0].weights["mms"] == 100


@pytest.mark.parametrize("bad,match", [
    ({"stages": [{"models": ["gpt-5"]}]}, "unknown models gpt-5"),
    ({"stages": []}, "no stages"),
    ({"target": "nope", "stages": [{"models": []}]}, "target 'nope' is not a backend"),
    ({"stages": [{"models": [], "min_bake_s": 10, "max_bake_s": 5}]}, "min_bake_s"),
    ({"thresholds": {"alpha": 0.7}, "stages": [{"models": []}]}, "alpha"),
    ({"thresholds": {"error_rate": 0.95}, "stages": [{"models": []}]}, "error_rate"),
])
def test_bad_plans_name_the_problem(cfg: Any, bad: dict[str, Any], match: str) -> None:
    with pytest.raises(PlanError, match=match):
        resolve(decode_plan({"name": "t", **bad}), cfg)


def test_unknown_keys_and_types_are_refused() -> None:
    with pytest.raises(PlanError, match="stagez"):
        decode_plan({"name": "t", "stagez": []})
    with pytest.raises(PlanError, match="shadow"):
        decode_plan({"name": "t", "stages": [{"shadow": "maybe"}]})


@given(st.integers(min_value=0, max_value=10_000), st.booleans())
def test_weights_sum_to_100_and_match_the_routing_table(units: int, flip: bool) -> None:
    order = ["mms", "mma"] if flip else ["mma", "mms"]  # either config order
    w = weights_for(units, order, "mma", "mms")
    assert sum(w.values()) == pytest.approx(100.0)
    got = served_by(w, ALL, "mms")
    from shim.rollout.plan import threshold_units
    assert got == {m for m in ALL if threshold_units(m, order, "mma", "mms") <= units}

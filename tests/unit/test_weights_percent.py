"""Weights are percentages that add up to 100 (issue 16): the config, the admin's partial
``set_weights`` (shim.config.complete_weights) and strict config types."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shim.config import check_weights, complete_weights, decode_config
from shim.errors import ConfigError

ORDER = ["mma", "mms"]


def cfg(**routing: object) -> dict[str, object]:
    return {"backends": {"mma": {"dialect": "mma", "endpoints": ["tcp://127.0.0.1:5580"]},
                         "mms": {"dialect": "mms", "endpoints": ["tcp://127.0.0.1:7211"]}},
            "routing": routing, "policy": {"fast": "phi-2"}}


def test_naming_one_of_two_backends_gives_the_other_the_rest() -> None:
    assert complete_weights({"mms": 10}, {"mma": 100.0, "mms": 0.0}, ORDER) == \
        {"mma": 90.0, "mms": 10.0}
    assert complete_weights({"mma": 0}, {"mma": 100.0, "mms": 0.0}, ORDER) == \
        {"mma": 0.0, "mms": 100.0}


def test_unnamed_backends_share_the_rest_in_proportion() -> None:
    order = ["a", "b", "c"]
    assert complete_weights({"a": 40}, {"a": 10, "b": 60, "c": 30}, order) == \
        {"a": 40.0, "b": 40.0, "c": 20.0}
    thirds = complete_weights({"a": 0}, {"a": 100, "b": 0, "c": 0}, order)
    assert thirds["b"] == 50.0 and sum(thirds.values()) == pytest.approx(100)


@pytest.mark.parametrize("given, message", [
    ({"mma": 60, "mms": 50}, "must add up to 100: mma=60, mms=50 adds up to 110"),
    ({"mma": 10, "mms": 10}, "adds up to 20"),
    ({"mms": 101}, "within 0..100"),
    ({"mmx": 5}, "unknown backend 'mmx'"),
    ({"mma": 0, "mms": 0}, "must not all be zero"),
])
def test_anything_else_is_refused_with_a_message(given: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        complete_weights(given, {"mma": 100.0, "mms": 0.0}, ORDER)


@given(st.dictionaries(st.sampled_from(["a", "b", "c"]), st.floats(0, 100), min_size=1),
       st.dictionaries(st.sampled_from(["a", "b", "c"]), st.floats(0, 100)))
def test_a_completed_set_of_weights_always_passes_the_config_check(
        given_w: dict[str, float], current: dict[str, float]) -> None:
    try:
        out = complete_weights(given_w, current, ["a", "b", "c"])
    except ValueError:
        return
    check_weights(out, {"a", "b", "c"})
    assert {k: out[k] for k in given_w} == given_w


def test_config_weights_must_add_up_to_100() -> None:
    with pytest.raises(ConfigError, match=r"must add up to 100 \(mma=100, mms=50 adds up to 150"):
        decode_config(cfg(weights={"mma": 100, "mms": 50}))
    assert decode_config(cfg(weights={"mma": 90, "mms": 10})).routing.weights == \
        {"mma": 90, "mms": 10}
    assert decode_config(cfg(weights={"mma": 100})).routing.weights == {"mma": 100}


def test_config_types_are_strict() -> None:
    raw = cfg()
    raw["shim"] = {"default_timeout_ms": "4500"}
    with pytest.raises(ConfigError, match=r"Expected `int`, got `str` - at `\$.shim"):
        decode_config(raw)
    raw["shim"] = {"drain_timeout_s": 5}  # an int where a float goes is fine
    assert decode_config(raw).shim.drain_timeout_s == 5
    bad_backend = cfg()
    bad_backend["backends"]["mms"]["timeout_ms"] = "4500"  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"\$.backends.mms.timeout_ms"):
        decode_config(bad_backend)

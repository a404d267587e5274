"""The shadow's `if_loaded` check (shim.shadow.Shadow.is_loaded), without sockets: when may
a generate be mirrored to a backend without making it load a model?"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from shim import dialects
from shim.compare import compare
from shim.config import ShadowSection, decode_config
from shim.metrics import Metrics
from shim.shadow import Shadow

POLICY = {"fast": "phi-2", "quality": "mistral-7b"}


def make_shadow(ownership: Any = None, shared: tuple[str, ...] = ()) -> Shadow:
    cfg = decode_config({
        "backends": {"mma": {"dialect": "mma", "endpoints": ["tcp://127.0.0.1:5580"]},
                     "mms": {"dialect": "mms", "endpoints": ["tcp://127.0.0.1:7211"]}},
        "ownership": {"poll_interval_ms": 1000, "shared_models": list(shared)},
        "policy": POLICY,
    })
    proxy: Any = SimpleNamespace(pool=SimpleNamespace(backends={"mma": None, "mms": None}),
                                 metrics=Metrics(), runtime=None)
    return Shadow(proxy, cfg, None, ownership)  # type: ignore[arg-type]


def unload(model: str) -> dialects.Op:
    return dialects.parse_request({"command": "UNLOAD_MODEL", "model_name": model}, POLICY)


def test_without_ownership_its_own_poll_decides() -> None:
    shadow = make_shadow()
    assert not shadow.is_loaded("mms", "phi-2")  # never polled: nothing is loaded
    shadow.loaded["mms"] = {"phi-2"}
    assert shadow.is_loaded("mms", "phi-2")
    assert not shadow.is_loaded("mms", "mistral-7b")
    assert not shadow.is_loaded("mma", "phi-2")
    assert not shadow.is_loaded("mms", None)


def test_an_unload_seen_on_the_data_path_wins_over_a_stale_poll() -> None:
    shadow = make_shadow()
    shadow.loaded["mms"] = {"phi-2"}
    shadow.loaded["mma"] = {"phi-2"}
    shadow.after_send(unload("phi-2"), "mma", b'{"status": "SUCCESS"}')
    assert not shadow.is_loaded("mma", "phi-2")
    assert shadow.is_loaded("mms", "phi-2")  # another backend's unload: no effect on mms
    shadow.after_send(unload("phi-2"), "mms", b'{"status": "success"}')
    assert not shadow.is_loaded("mms", "phi-2")


@pytest.mark.parametrize(("shared", "owner", "moving", "expected"), [
    ((), None, False, False),  # loaded but owned by no one: a hand-over just happened
    ((), "mma", False, False),  # owned elsewhere: a duplicate, do not touch it
    ((), "mms", False, True),  # its owner: loaded there for real
    (("phi-2",), None, False, True),  # allowed on both
    (("phi-2",), None, True, False),  # being moved
])
def test_with_ownership_the_model_must_be_polled_owned_or_shared_and_still(
        shared: tuple[str, ...], owner: str | None, moving: bool, expected: bool) -> None:
    ownership = SimpleNamespace(loaded={"mms": {"phi-2"}}, moves={"phi-2": 1} if moving else {},
                                owner={"phi-2": owner} if owner else {})
    shadow = make_shadow(ownership, shared)
    assert shadow.is_loaded("mms", "phi-2") is expected
    assert not shadow.is_loaded("mms", "mistral-7b")


def test_reload_takes_new_compare_rules() -> None:
    shadow = make_shadow()
    a, b = {"response_text": "x"}, {"response_text": "y"}
    assert compare(a, b, shadow.rules.for_action("generate")) == []
    shadow.reload(ShadowSection(compare={"generate": {"response_text": "exact"}}))
    assert len(compare(a, b, shadow.rules.for_action("generate"))) == 1

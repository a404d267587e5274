"""The shadow's `if_loaded` check (shim.addons.shadow.Shadow.is_loaded), without sockets: when may
a generate be mirrored to a backend without making it load a model?"""

from __future__ import annotations

import time

import pytest

from shim import dialects
from shim.addons.base import Flow
from shim.addons.loaded import LoadedModels
from shim.addons.ownership import Ownership
from shim.addons.shadow import Shadow
from shim.config import decode_config
from shim.metrics import Metrics
from shim.owners import Move
from shim.runtime import RuntimeStore, runtime_from_config
from tests.fake_transport import FakeTransport

POLICY = {"fast": "phi-2", "quality": "mistral-7b"}


def make_shadow(ownership_on: bool = False, shared: tuple[str, ...] = ()) -> \
        tuple[Shadow, LoadedModels, Ownership | None]:
    cfg = decode_config({
        "backends": {"mma": {"dialect": "mma", "endpoints": ["tcp://127.0.0.1:5580"]},
                     "mms": {"dialect": "mms", "endpoints": ["tcp://127.0.0.1:7211"]}},
        "ownership": {"poll_interval_ms": 1000, "shared_models": list(shared)},
        "policy": POLICY,
    })
    transport = FakeTransport({"mma": "mma", "mms": "mms"}, POLICY)
    store, metrics = RuntimeStore(runtime_from_config(cfg)), Metrics()
    loaded = LoadedModels(transport, 1.0, metrics=metrics)
    ownership = Ownership(transport, cfg.ownership, store=store, loaded=loaded,
                          metrics=metrics) if ownership_on else None
    shadow = Shadow(transport, cfg, store=store, metrics=metrics, loaded=loaded,
                    ownership=ownership)
    return shadow, loaded, ownership


def unloaded_on(shadow: Shadow, backend: str, model: str) -> None:
    """An unload of ``model`` on ``backend`` through the data path (the after_send hook)."""
    msg = {"command": "UNLOAD_MODEL", "model_name": model}
    now = time.perf_counter()
    flow = Flow([b"{}"], msg, dialects.parse_request(msg, POLICY),
                shadow._store.current, now, now + 1)
    shadow.after_send(flow, backend)


def test_without_ownership_the_shared_poll_decides() -> None:
    shadow, loaded, _ = make_shadow()
    assert not shadow.is_loaded("mms", "phi-2")  # never polled: nothing is loaded
    loaded.loaded["mms"] = {"phi-2"}
    assert shadow.is_loaded("mms", "phi-2")
    assert not shadow.is_loaded("mms", "mistral-7b")
    assert not shadow.is_loaded("mma", "phi-2")
    assert not shadow.is_loaded("mms", None)


def test_an_unload_seen_on_the_data_path_wins_over_a_stale_poll() -> None:
    shadow, loaded, _ = make_shadow()
    loaded.loaded["mms"] = {"phi-2"}
    loaded.loaded["mma"] = {"phi-2"}
    unloaded_on(shadow, "mms", "phi-2")
    assert not shadow.is_loaded("mms", "phi-2")
    assert shadow.is_loaded("mma", "phi-2")  # another backend: no effect there


@pytest.mark.parametrize(("shared", "owner", "moving", "expected"), [
    ((), None, False, False),  # loaded but owned by no one: a hand-over just happened
    ((), "mma", False, False),  # owned elsewhere: a duplicate, do not touch it
    ((), "mms", False, True),  # its owner: loaded there for real
    (("phi-2",), None, False, True),  # allowed on both
    (("phi-2",), None, True, False),  # being moved
])
def test_with_ownership_the_model_must_be_polled_owned_or_shared_and_still(
        shared: tuple[str, ...], owner: str | None, moving: bool, expected: bool) -> None:
    shadow, loaded, ownership = make_shadow(True, shared)
    assert ownership is not None
    loaded.loaded["mms"] = {"phi-2"}
    if owner:
        ownership.table.owners["phi-2"] = owner
    if moving:
        ownership.table.moves["phi-2"] = Move(source="mms", target="mma", started=0.0)
    assert shadow.is_loaded("mms", "phi-2") is expected
    assert not shadow.is_loaded("mms", "mistral-7b")

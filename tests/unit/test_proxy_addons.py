"""The data path (shim.proxy.DataPath) and the addons on a typed fake transport, without
sockets: routing, failover, every hook's guard, and ownership, shadow and metrics as
addons on the flow.

A hook that raises anything but a RequestError must leave the client's reply exactly as
it would have been without that addon, and be counted in
``shim_addon_errors_total{addon,hook}``; a RequestError from ``admit``/``route``/
``before_send`` answers the request on purpose.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import msgspec
import pytest
from prometheus_client import generate_latest

from shim.addons.base import Addon, AddonManager, Flow
from shim.addons.loaded import LoadedModels
from shim.addons.metrics import RequestMetrics
from shim.addons.ownership import Ownership
from shim.addons.shadow import Shadow
from shim.config import ShimConfig, decode_config
from shim.dialects.ops import Kind, ModelInfo, Op, Result
from shim.errors import BackendUnavailable, OwnedElsewhere, UnusableReply
from shim.metrics import Metrics
from shim.proxy import DataPath
from shim.runtime import RuntimeStore, runtime_from_config
from tests.fake_transport import FakeTransport
from tests.reliability.helpers import metric

POLICY = {"fast": "phi-2"}
GEN = {"action": "generate", "model_pref": "fast", "prompt": "hi"}
LOAD = {"command": "LOAD_MODEL", "model_name": "phi-2"}
STATUS = {"action": "status"}
HOOKS = ("admit", "route", "before_send", "after_send", "after_reply")


def config(weights: dict[str, float] | None = None, **sections: Any) -> ShimConfig:
    return decode_config({
        "shim": {"default_timeout_ms": 2000},
        "backends": {"mma": {"dialect": "mma", "endpoints": ["tcp://127.0.0.1:5580"]},
                     "mms": {"dialect": "mms", "endpoints": ["tcp://127.0.0.1:7211"]}},
        "routing": {"weights": weights or {"mma": 100, "mms": 0}},
        "merge": {"loaded": "never"},
        "policy": POLICY, **sections})


class World:
    """A DataPath on a FakeTransport, with the metrics addon, as shim.app plugs it."""

    def __init__(self, cfg: ShimConfig, *addons: Addon) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.store = RuntimeStore(runtime_from_config(cfg))
        self.addons = AddonManager(on_error=self.metrics.addon_failed)
        self.transport = FakeTransport({n: b.dialect for n, b in cfg.backends.items()}, POLICY)
        self.addons.add(RequestMetrics(self.metrics, self.store, cfg.backends))
        for addon in addons:
            self.addons.add(addon)
        self.path = DataPath(cfg, asyncio.get_running_loop(), self.transport, self.metrics,
                             store=self.store, addons=self.addons)

    async def ask(self, msg: dict[str, Any]) -> tuple[dict[str, Any], Flow]:
        """One request through the data path, then after_reply, as Proxy._handle does."""
        now = time.perf_counter()
        flow = Flow([msgspec.json.encode(msg)], None, None, self.store.current, now, now)
        await self.path.handle(flow)
        self.addons.after_reply(flow)
        assert flow.reply is not None and len(flow.reply) == 1
        return msgspec.json.decode(flow.reply[0]), flow

    def count(self, name: str, **labels: str) -> float:
        return metric(generate_latest(self.metrics.registry).decode(), name, **labels)


# -- routing and failover ---------------------------------------------------------------

async def test_weights_pick_the_backend_and_a_translated_reply_is_decoded_once() -> None:
    world = World(config({"mma": 0, "mms": 100}))
    world.transport.backend("mms").handler = lambda op, payload: Result(
        ok=True, source="mms", text="hello", model_id="phi-2", tokens_generated=1)
    reply, flow = await world.ask(GEN)
    assert [s.backend for s in world.transport.sent] == ["mms"]
    assert reply["status"] == "ok" and reply["response_text"] == "hello"
    assert flow.exchanged and flow.served_by == "mms"
    assert flow.result is not None and flow.result.text == "hello"  # on the flow, decoded
    assert world.count("shim_requests_total", backend="mms", action="generate",
                       outcome="ok") == 1


async def test_a_passed_through_reply_stays_bytes() -> None:
    world = World(config())
    reply, flow = await world.ask(GEN)
    assert reply == {"status": "ok"} and flow.result is None
    assert flow.answer == b'{"status": "ok"}'


async def test_failover_moves_a_stateless_request_and_counts_it() -> None:
    world = World(config())

    def down(op: Op, payload: bytes | None) -> bytes:
        raise BackendUnavailable("backend mma is not connected")

    world.transport.backend("mma").handler = down
    world.transport.backend("mms").handler = lambda op, payload: Result(
        ok=True, text="from mms", model_id="phi-2")
    reply, flow = await world.ask(GEN)
    assert reply["response_text"] == "from mms" and flow.backend == "mms"
    assert world.count("shim_failovers_total", from_backend="mma", to_backend="mms") == 1


async def test_a_stateful_request_does_not_fail_over() -> None:
    world = World(config())

    def down(op: Op, payload: bytes | None) -> bytes:
        raise BackendUnavailable("backend mma is not connected")

    world.transport.backend("mma").handler = down
    reply, flow = await world.ask(LOAD)
    assert reply["status"] == "ERROR" and reply["error_code"] == "SHIM_NO_BACKEND"
    assert [s.backend for s in world.transport.sent] == ["mma"]
    assert not flow.exchanged and flow.outcome == "SHIM_NO_BACKEND"


async def test_an_unhealthy_primary_goes_last() -> None:
    world = World(config())
    world.transport.backend("mma").healthy = False
    world.transport.backend("mms").handler = lambda op, payload: Result(
        ok=True, text="x", model_id="phi-2")
    _, flow = await world.ask(GEN)
    assert flow.backend == "mms"


# -- every hook guarded -------------------------------------------------------------------

class Broken(Addon):
    """Raises a plain bug in the one hook it is told to."""

    name = "broken"

    def __init__(self, where: str) -> None:
        self.where = where

    def _maybe(self, hook: str) -> None:
        if hook == self.where:
            raise RuntimeError(f"{hook} bug")

    def admit(self, flow: Flow) -> Awaitable[Any] | None:
        self._maybe("admit")
        return None

    def route(self, flow: Flow, candidates: list[str]) -> list[str]:
        self._maybe("route")
        return candidates

    def before_send(self, flow: Flow, backend: str) -> Awaitable[Any] | None:
        self._maybe("before_send")
        return None

    def after_send(self, flow: Flow, backend: str) -> None:
        self._maybe("after_send")

    def after_reply(self, flow: Flow) -> None:
        self._maybe("after_reply")


@pytest.mark.parametrize("hook", HOOKS)
async def test_a_raising_hook_never_changes_the_reply_and_is_counted(hook: str) -> None:
    clean, _ = await World(config()).ask(GEN)
    world = World(config(), Broken(hook))
    reply, flow = await world.ask(GEN)
    assert reply == clean == {"status": "ok"}
    assert flow.exchanged and flow.outcome == "ok"
    assert world.count("shim_addon_errors_total", addon="broken", hook=hook) == 1
    others = [h for h in HOOKS if h != hook]
    assert all(world.count("shim_addon_errors_total", addon="broken", hook=h) == 0
               for h in others)


class Refusing(Addon):
    """Refuses on purpose in ``route`` (as ownership does for a model owned elsewhere)."""

    name = "refusing"

    def route(self, flow: Flow, candidates: list[str]) -> list[str]:
        raise OwnedElsewhere("model phi-2 is owned by mms")


async def test_a_request_error_from_a_hook_answers_the_request() -> None:
    world = World(config(), Refusing())
    reply, flow = await world.ask(GEN)
    assert reply["status"] == "error" and reply["error_code"] == "SHIM_MODEL_OWNED_ELSEWHERE"
    assert flow.outcome == "SHIM_MODEL_OWNED_ELSEWHERE" and not flow.exchanged
    assert world.transport.sent == []  # nothing went out
    assert world.count("shim_addon_errors_total", addon="refusing", hook="route") == 0


class Holding(Addon):
    """Holds every request back forever (a hand-over that never ends)."""

    name = "holding"

    def admit(self, flow: Flow) -> Awaitable[Any] | None:
        return asyncio.get_running_loop().create_future()


async def test_an_admit_wait_is_bounded_by_the_deadline() -> None:
    world = World(config(shim={"default_timeout_ms": 200}), Holding())
    reply, _ = await world.ask(GEN)
    assert reply["status"] == "error" and reply["error_code"] == "SHIM_TIMEOUT"
    assert world.transport.sent == []


class Narrowing(Addon):
    """Narrows to a backend that is not a candidate: ignored (never widens)."""

    name = "narrowing"

    def route(self, flow: Flow, candidates: list[str]) -> list[str]:
        return ["elsewhere"]


async def test_a_route_hook_cannot_widen_the_candidates() -> None:
    world = World(config(), Narrowing())
    reply, flow = await world.ask(GEN)
    assert reply == {"status": "ok"} and flow.backend == "mma"


# -- ownership, shadow and the shared poller, without sockets -------------------------------

def loaded_on(models: dict[str, set[str]]) -> Any:
    """A handler answering loaded-model polls with ``models[backend]``."""
    def make(backend: str) -> Any:
        def handler(op: Op, payload: bytes | None) -> bytes | Result:
            if payload is None and op.kind is Kind.LOADED_STATUS:
                return Result(ok=True, loaded_models={m: ModelInfo()
                                                      for m in models[backend]})
            if payload is None:
                return Result(ok=True)
            return b'{"status": "ok"}'
        return handler
    return make


async def test_ownership_sends_a_model_to_its_owner_and_hands_it_over() -> None:
    cfg = config({"mma": 100, "mms": 0})
    metrics = Metrics()
    store = RuntimeStore(runtime_from_config(cfg))
    transport = FakeTransport({"mma": "mma", "mms": "mms"}, POLICY)
    models = {"mma": {"phi-2"}, "mms": set[str]()}
    make = loaded_on(models)
    for name in models:
        transport.backend(name).handler = make(name)
    loaded = LoadedModels(transport, 60.0, metrics=metrics)
    ownership = Ownership(transport, cfg.ownership, store=store, loaded=loaded,
                          metrics=metrics)
    world = World(cfg, loaded, ownership)
    world.store, world.path.store = store, store
    await loaded.poll_once()
    assert ownership.owner == {"phi-2": "mma"}
    _, flow = await world.ask(GEN)
    assert flow.backend == "mma"
    # The weights move the model's bucket to mms: the next request hands it over first.
    store.swap(store.current.with_weights({"mma": 0, "mms": 100}))
    models["mma"].discard("phi-2")
    transport.backend("mms").handler = lambda op, payload: (
        Result(ok=True, text="x", model_id="phi-2") if payload is not None
        else Result(ok=True))
    _, flow = await world.ask(GEN)
    assert flow.backend == "mms" and flow.exchanged
    unloads = [s for s in transport.sent if s.op.kind is Kind.UNLOAD]
    assert [(s.backend, s.op.model_id) for s in unloads] == [("mma", "phi-2")]
    assert ownership.owner == {"phi-2": "mms"}
    await ownership.stop()


async def test_shadow_mirrors_side_effect_free_and_compares_with_the_runtime_rules() -> None:
    cfg = config({"mma": 100, "mms": 0}, shadow={"percent": 100})
    metrics = Metrics()
    store = RuntimeStore(runtime_from_config(cfg).with_mode("shadow"))
    transport = FakeTransport({"mma": "mma", "mms": "mms"}, POLICY)
    loaded = LoadedModels(transport, 60.0)
    shadow = Shadow(transport, cfg, store=store, metrics=metrics, loaded=loaded,
                    ownership=None)
    world = World(cfg, shadow)
    world.metrics, world.store, world.path.store = metrics, store, store
    transport.backend("mms").handler = lambda op, payload: Result(
        ok=True, loaded_models={}, vram_used_mb=0, vram_budget_mb=0)
    await world.ask(STATUS)
    assert await shadow.settled(5.0)
    mirrored = [s for s in transport.sent if s.mirror]
    assert [s.backend for s in mirrored] == ["mms"]
    outcomes = {o: world.count("shim_shadow_total", action="status", outcome=o)
                for o in ("match", "mismatch", "shadow_error")}
    assert sum(outcomes.values()) == 1  # compared once, whatever the verdict
    await shadow.stop()


async def test_shadow_skips_a_generate_whose_model_is_not_loaded_there() -> None:
    cfg = config({"mma": 100, "mms": 0}, shadow={"percent": 100})
    store = RuntimeStore(runtime_from_config(cfg).with_mode("shadow"))
    transport = FakeTransport({"mma": "mma", "mms": "mms"}, POLICY)
    loaded = LoadedModels(transport, 60.0)
    shadow = Shadow(transport, cfg, store=store, metrics=Metrics(), loaded=loaded,
                    ownership=None)
    world = World(cfg, shadow)
    world.store, world.path.store = store, store
    await world.ask(GEN)
    assert shadow.skipped_not_loaded == 1
    assert not [s for s in transport.sent if s.mirror]


async def test_the_weight_gauges_follow_the_store() -> None:
    world = World(config())
    assert world.count("shim_weight_percent", backend="mma") == 100
    world.store.swap(world.store.current.with_weights({"mma": 30, "mms": 70}))
    assert world.count("shim_weight_percent", backend="mms") == 70


async def test_an_opaque_request_is_counted_by_the_metrics_addon() -> None:
    world = World(config())
    now = time.perf_counter()
    flow = Flow([b"not json"], None, None, world.store.current, now, now)
    await world.path.handle(flow)
    world.addons.after_reply(flow)
    assert flow.reply == [b"not json"] and not flow.exchanged
    assert world.count("shim_requests_total", backend="mma", action="opaque",
                       outcome="ok") == 1


async def test_an_unusable_shadow_reply_is_compared_as_the_client_would_see_it() -> None:
    cfg = config({"mma": 100, "mms": 0}, shadow={"percent": 100})
    metrics = Metrics()
    store = RuntimeStore(runtime_from_config(cfg).with_mode("shadow"))
    transport = FakeTransport({"mma": "mma", "mms": "mms"}, POLICY)
    shadow = Shadow(transport, cfg, store=store, metrics=metrics,
                    loaded=LoadedModels(transport, 60.0), ownership=None)
    world = World(cfg, shadow)
    world.metrics, world.store, world.path.store = metrics, store, store

    def unusable(op: Op, payload: bytes | None) -> bytes:
        raise UnusableReply("unusable mms reply: no text")

    transport.backend("mms").handler = unusable
    reply, _ = await world.ask(STATUS)
    assert reply == {"status": "ok"}  # the client's reply is the primary's
    assert await shadow.settled(5.0)
    # The client would have got SHIM_BAD_REPLY there: a difference, not a shadow failure.
    assert world.count("shim_shadow_total", action="status", outcome="mismatch") == 1
    assert world.count("shim_shadow_total", action="status", outcome="shadow_error") == 0
    await shadow.stop()

"""The operator's commands against a stand-in proxy: validation, atomic swap, audit,
persistence and reload, without sockets."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from shim.audit import AuditLog
from shim.config import ShimConfig, load_config
from shim.control import Controller
from shim.errors import CommandError
from shim.metrics import Metrics
from shim.runtime import Runtime, RuntimeStore, runtime_from_config
from shim.state import RuntimeState, StateFile


def config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "backends": {"mma": {"dialect": "mma", "endpoints": ["tcp://127.0.0.1:5580"]},
                     "mms": {"dialect": "mms", "endpoints": ["tcp://127.0.0.1:7211"]}},
        "actions": {"load": {"failover": False}},
        "policy": {"fast": "phi-2"},
    }
    cfg.update(overrides)
    return cfg


@dataclass
class StubBackend:
    dialect: str
    healthy: bool = True
    inflight: int = 0


class StubProxy:
    """What the Controller uses of shim.proxy.Proxy."""

    def __init__(self, cfg: ShimConfig) -> None:
        self.store = RuntimeStore(runtime_from_config(cfg))
        self.pool = SimpleNamespace(backends={n: StubBackend(b.dialect)
                                              for n, b in cfg.backends.items()})
        self.counts = {"requests": 0, "replies": 0}
        self.inflight = 0
        self.accepting = True
        self.swaps = -1  # subscribe() calls once at once
        self.store.subscribe(self._swapped)

    def _swapped(self, old: Runtime, new: Runtime) -> None:
        self.swaps += 1

    @property
    def runtime(self) -> Runtime:
        return self.store.current


@dataclass
class StubShim:
    cfg: ShimConfig
    config_path: Path
    proxy: StubProxy
    metrics: Metrics = field(default_factory=Metrics)
    started: float = field(default_factory=time.time)


@pytest.fixture
def world(tmp_path: Path) -> tuple[StubShim, Controller]:
    path = tmp_path / "shim.json"
    path.write_text(json.dumps(config()))
    cfg = load_config(path)
    shim = StubShim(cfg, path, StubProxy(cfg))
    controller = Controller(cast(Any, shim), StateFile(tmp_path / "state.json"),
                            AuditLog(tmp_path / "audit.jsonl"))
    controller.start()
    return shim, controller


def audit_lines(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "audit.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


async def run(controller: Controller, command: str, **args: Any) -> dict[str, Any]:
    return await controller.execute(command, args, "test-client")


async def test_set_weights_are_percentages_the_unnamed_backend_takes_the_rest(
        world: tuple[StubShim, Controller], tmp_path: Path) -> None:
    shim, controller = world
    reply = await run(controller, "set_weights", weights={"mms": 25})
    assert reply["weights"] == {"mma": 75.0, "mms": 25.0}
    assert reply["changes"] == {"weights.mma": [100.0, 75.0], "weights.mms": [0.0, 25.0]}
    [line] = audit_lines(tmp_path)
    assert line["client"] == "test-client" and line["command"] == "set_weights"
    assert line["old"] == {"weights.mma": 100.0, "weights.mms": 0.0}
    assert line["new"] == {"weights.mma": 75.0, "weights.mms": 25.0}
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["weights"] == {"mma": 75.0, "mms": 25.0}

    # The same again is no change: no swap, no audit line.
    swaps = shim.proxy.swaps
    assert (await run(controller, "set_weights", weights={"mms": 25}))["changes"] == {}
    assert shim.proxy.swaps == swaps and len(audit_lines(tmp_path)) == 1


@pytest.mark.parametrize("args, code, message", [
    ({"weights": {"mma": 0, "mms": 0}}, "invalid", "must not all be zero"),
    ({"weights": {"mma": 60, "mms": 50}}, "invalid", "must add up to 100"),
    ({"weights": {"mma": 60, "mms": 30}}, "invalid", "adds up to 90"),
    ({"weights": {"mmx": 5}}, "invalid", "unknown backend"),
    ({"weights": {"mma": 150}}, "invalid", "within 0..100"),
    ({"weights": {"mma": True}}, "bad_request", "weights"),
    ({"weights": 5}, "bad_request", "weights"),
    ({}, "bad_request", "weights"),
    ({"weights": {"mma": 5}, "extra": 1}, "bad_request", "extra"),
])
async def test_bad_weights_are_refused_and_change_nothing(
        world: tuple[StubShim, Controller], args: dict[str, Any], code: str,
        message: str) -> None:
    shim, controller = world
    before = shim.proxy.runtime
    with pytest.raises(CommandError, match=message) as info:
        await run(controller, "set_weights", **args)
    assert info.value.code == code
    assert shim.proxy.runtime is before


async def test_unknown_command_lists_the_known_ones(world: tuple[StubShim, Controller]) -> None:
    _, controller = world
    with pytest.raises(CommandError) as info:
        await run(controller, "explode")
    assert info.value.code == "unknown_command" and "drain" in info.value.detail["commands"]


async def test_set_shadow_and_set_action(world: tuple[StubShim, Controller]) -> None:
    shim, controller = world
    reply = await run(controller, "set_shadow", percent=50, mirror={"generate": "always"})
    assert reply["shadow"]["percent"] == 50.0
    assert shim.proxy.runtime.rules["generate"].mirror == "always"
    with pytest.raises(CommandError, match="never mirrored"):
        await run(controller, "set_shadow", mirror={"load": "always"})
    with pytest.raises(CommandError, match="nothing to change"):
        await run(controller, "set_shadow")

    await run(controller, "set_action", action="generate", timeout_ms=3000, pin="mms")
    rule = shim.proxy.runtime.rules["generate"]
    assert (rule.timeout_ms, rule.pin, rule.mirror) == (3000, "mms", "always")
    await run(controller, "set_action", action="generate", timeout_ms=None, pin="")
    rule = shim.proxy.runtime.rules["generate"]
    assert (rule.timeout_ms, rule.pin) == (4500, "")  # back to the defaults
    await run(controller, "set_action", action="load", reset=True)
    assert shim.proxy.runtime.rules["load"].failover is False  # the config's rule
    with pytest.raises(CommandError, match="unknown backend"):
        await run(controller, "set_action", action="generate", pin="mmx")
    with pytest.raises(CommandError, match="unknown action"):
        await run(controller, "set_action", action="dance", timeout_ms=1)


async def test_drain_moves_traffic_and_waits_for_requests_in_flight(
        world: tuple[StubShim, Controller]) -> None:
    shim, controller = world
    mma = shim.proxy.pool.backends["mma"]
    mma.inflight = 3

    async def finish() -> None:
        await asyncio.sleep(0.2)
        mma.inflight = 0

    task = asyncio.create_task(finish())
    reply = await run(controller, "drain", backend="mma", timeout_s=10)
    await task
    # mms had no weight: the drained share goes to it rather than to nobody.
    assert shim.proxy.runtime.weights == {"mma": 0.0, "mms": 100.0}
    assert (reply["inflight_at_start"], reply["remaining"]) == (3, 0)
    assert reply["waited_s"] >= 0.1

    mma.inflight = 2
    with pytest.raises(CommandError) as info:
        await run(controller, "drain", backend="mma", timeout_s=0.05)
    assert info.value.code == "drain_timeout" and info.value.detail["remaining"] == 2
    with pytest.raises(CommandError, match="unknown backend"):
        await run(controller, "drain", backend="mmx")


async def test_rollback_restores_the_safe_state_in_one_step(
        world: tuple[StubShim, Controller]) -> None:
    shim, controller = world
    await run(controller, "set_weights", weights={"mma": 0, "mms": 100})
    await run(controller, "set_mode", mode="shadow")
    await run(controller, "set_action", action="status", pin="mms")
    await run(controller, "set_action", action="generate", timeout_ms=2000)
    reply = await run(controller, "rollback")
    rt = shim.proxy.runtime
    assert (rt.weights, rt.mode) == ({"mma": 100.0, "mms": 0.0}, "split")
    assert rt.rules["status"].pin == ""  # a run-time pin elsewhere is undone
    assert rt.rules["generate"].timeout_ms == 2000  # other tuning stays
    assert reply["safe_backend"] == "mma" and "warning" not in reply


async def test_reload_applies_the_file_and_keeps_untouched_runtime_changes(
        world: tuple[StubShim, Controller], tmp_path: Path) -> None:
    shim, controller = world
    await run(controller, "set_weights", weights={"mma": 60, "mms": 40})
    shim.config_path.write_text(json.dumps(config(routing={"mode": "shadow"},
                                                  shadow={"percent": 10})))
    reply = await run(controller, "reload")
    rt = shim.proxy.runtime
    assert (rt.mode, rt.shadow.percent) == ("shadow", 10.0)
    assert rt.weights == {"mma": 60.0, "mms": 40.0}
    assert reply["kept_overrides"] == ["weights"] and reply["restart_required"] == []

    # The file changes the weights: the file wins for them.
    shim.config_path.write_text(json.dumps(config(routing={"weights": {"mma": 20,
                                                                       "mms": 80}})))
    await run(controller, "reload")
    assert shim.proxy.runtime.weights == {"mma": 20.0, "mms": 80.0}
    assert shim.proxy.runtime.mode == "split"


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    (json.dumps(config(routing={"weights": {"mma": 0, "mms": 0}})), "must not all be zero"),
    (json.dumps(config(routing={"weights": {"mma": 0, "mms": 0, "mmx": 100}},
                       backends={**config()["backends"],
                                 "mmx": {"dialect": "mms", "endpoints": ["tcp://h:1"]}})),
     "no running backend"),
])
async def test_an_invalid_reload_changes_nothing(
        world: tuple[StubShim, Controller], text: str, message: str) -> None:
    shim, controller = world
    await run(controller, "set_weights", weights={"mms": 50})
    before = shim.proxy.runtime
    shim.config_path.write_text(text)
    with pytest.raises(CommandError, match=message) as info:
        await run(controller, "reload")
    assert info.value.code == "invalid_config"
    assert shim.proxy.runtime is before


async def test_reload_reports_what_needs_a_restart(world: tuple[StubShim, Controller]) -> None:
    shim, controller = world
    cfg = config(routing={"weights": {"mma": 50, "mms": 40, "mmx": 10}})
    cfg["backends"]["mmx"] = {"dialect": "mms", "endpoints": ["tcp://127.0.0.1:9999"]}
    cfg["shim"] = {"listen": "tcp://*:5571"}
    shim.config_path.write_text(json.dumps(cfg))
    reply = await run(controller, "reload")
    assert reply["restart_required"] == ["backends.mmx", "shim.listen"]
    # mmx is not running: its 10 % are shared by the others in proportion (routing table).
    assert shim.proxy.runtime.weights == {"mma": 50.0, "mms": 40.0}


def test_start_restores_state_and_reset_clears_it(tmp_path: Path) -> None:
    path = tmp_path / "shim.json"
    path.write_text(json.dumps(config()))
    cfg = load_config(path)
    state = StateFile(tmp_path / "state.json")
    state.write(RuntimeState(mode="shadow", weights={"mma": 10.0, "mms": 90.0}))

    def started(reset: bool = False) -> StubShim:
        shim = StubShim(cfg, path, StubProxy(cfg))
        Controller(cast(Any, shim), state, AuditLog(None), reset_state=reset).start()
        return shim

    rt = started().proxy.runtime
    assert (rt.mode, rt.weights) == ("shadow", {"mma": 10.0, "mms": 90.0})
    rt = started(reset=True).proxy.runtime
    assert (rt.mode, rt.weights) == ("split", {"mma": 100.0, "mms": 0.0})
    assert started().proxy.runtime.mode == "split"  # the reset was saved

    # A state that no longer fits the config is ignored, not fatal.
    state.write(RuntimeState(weights={"mmx": 100.0}))
    assert started().proxy.runtime.weights == {"mma": 100.0, "mms": 0.0}
    state.path.write_text("{garbage")
    assert started().proxy.runtime.weights == {"mma": 100.0, "mms": 0.0}


async def test_status_shows_weights_backends_and_counts(
        world: tuple[StubShim, Controller]) -> None:
    shim, controller = world
    shim.ownership = SimpleNamespace(describe=lambda: {"phi-2": "mma"})  # type: ignore[attr-defined]
    reply = await run(controller, "status")
    assert reply["backends"]["mma"] == {"dialect": "mma", "weight": 100.0, "share": 100.0,
                                        "healthy": True, "inflight": 0}
    assert reply["counts"] == {"requests": 0, "replies": 0}
    assert reply["ownership"] == {"phi-2": "mma"}
    config_reply = await run(controller, "get_config")
    assert config_reply["config"]["routing"]["safe_backend"] == "mma"


async def test_addons_offer_read_only_commands(tmp_path: Path) -> None:
    path = tmp_path / "shim.json"
    path.write_text(json.dumps(config()))
    cfg = load_config(path)
    shim = StubShim(cfg, path, StubProxy(cfg))

    async def diffs(args: dict[str, Any]) -> dict[str, Any]:
        return {"diffs": [], "limit": args.get("limit", 10)}

    shim.extras = [SimpleNamespace(commands=lambda: {"diffs": diffs})]  # type: ignore[attr-defined]
    controller = Controller(cast(Any, shim), StateFile(tmp_path / "state.json"), AuditLog(None))
    controller.start()
    assert await run(controller, "diffs", limit=3) == {"status": "ok", "diffs": [], "limit": 3}


async def test_reload_swaps_the_load_policy_with_the_runtime(
        world: tuple[StubShim, Controller]) -> None:
    shim, controller = world
    before = shim.proxy.runtime
    shim.config_path.write_text(json.dumps(config(policy={"fast": "tinyllama"})))
    reply = await run(controller, "reload")
    assert dict(before.policy) == {"fast": "phi-2"}  # requests in flight keep theirs
    assert dict(shim.proxy.runtime.policy) == {"fast": "tinyllama"}
    assert reply["changes"] == {"policy.fast": ["phi-2", "tinyllama"]}

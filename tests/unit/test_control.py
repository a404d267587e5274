"""The operator's commands on a real RuntimeStore and AddonManager, with a typed fake data
plane and typed fake addons, without sockets: validation, one atomic swap, audit,
persistence, reload, and the addon hooks (describe, commands, runtime_changed)."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from shim.addons.base import Addon, AddonManager, CommandHandler
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
        "shadow": {"compare": {"*": {"$.details.uptime_seconds": "ignore"}}},
        "ownership": {"enabled": False},  # its rule checks: see the test that turns it on
    }
    cfg.update(overrides)
    return cfg


class FakeDataPlane:
    """shim.control.DataPlane: per-backend requests in flight, set by the test."""

    def __init__(self, cfg: ShimConfig) -> None:
        self.dialects = {n: b.dialect for n, b in cfg.backends.items()}
        self.inflight = dict.fromkeys(cfg.backends, 0)

    def inflight_of(self, backend: str) -> int:
        return self.inflight.get(backend, 0)

    def describe(self) -> dict[str, Any]:
        return {"backends": {n: {"dialect": d, "healthy": True, "inflight": self.inflight[n]}
                             for n, d in self.dialects.items()},
                "inflight": sum(self.inflight.values()), "accepting": True,
                "counts": {"requests": 0, "replies": 0}}


class Watcher(Addon):
    """Records every runtime change it is told about; reports weight changes, like the
    ownership addon does ("the change is in force")."""

    name = "ownership"

    def __init__(self) -> None:
        self.seen: list[tuple[Runtime, Runtime]] = []
        self.released: list[str] = []

    def describe(self) -> dict[str, Any]:
        return {"owners": {"phi-2": "mma"}}

    def commands(self) -> dict[str, CommandHandler]:
        return {"release": self._release, "diffs": self._diffs}

    def _release(self, args: dict[str, Any]) -> dict[str, Any]:
        self.released.append(args["model"])
        return {"released_from": "mma",
                "changes": {f"ownership.owners.{args['model']}": ["mma", None]}}

    async def _diffs(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"diffs": [], "limit": args.get("limit", 10)}

    def runtime_changed(self, old: Runtime, new: Runtime) -> Awaitable[Any] | None:
        self.seen.append((old, new))
        if old.weights == new.weights:
            return None

        async def settle() -> dict[str, Any]:
            return {"cancelled": [], "finished": []}

        return settle()


class Broken(Addon):
    """An addon whose control-plane hooks fail: the Controller must not."""

    name = "broken"

    def describe(self) -> dict[str, Any]:
        raise RuntimeError("describe is broken")

    def runtime_changed(self, old: Runtime, new: Runtime) -> None:
        raise RuntimeError("runtime_changed is broken")


class World:
    """A Controller over a real store and addon manager, as shim.app wires it."""

    def __init__(self, tmp_path: Path, *, reset: bool = False, start: bool = True) -> None:
        self.path = tmp_path / "shim.json"
        if not self.path.exists():
            self.path.write_text(json.dumps(config()))
        self.cfg = load_config(self.path)
        self.store = RuntimeStore(runtime_from_config(self.cfg))
        self.swaps: list[Runtime] = []
        self.store.subscribe(lambda old, new: self.swaps.append(new))
        self.swaps.clear()  # subscribe calls once with the current Runtime
        self.addons = AddonManager()
        self.watcher = Watcher()
        self.addons.add(self.watcher)
        self.addons.add(Broken())
        self.plane = FakeDataPlane(self.cfg)
        self.audit_path = tmp_path / "audit.jsonl"
        self.controller = Controller(
            self.store, self.addons, StateFile(tmp_path / "state.json"),
            AuditLog(self.audit_path), cfg=self.cfg, dataplane=self.plane,
            metrics=Metrics(), config_path=self.path, reset_state=reset)
        if start:
            self.controller.start()

    @property
    def rt(self) -> Runtime:
        return self.store.current

    def audit(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        return [json.loads(x) for x in self.audit_path.read_text().splitlines()]

    async def run(self, command: str, **args: Any) -> dict[str, Any]:
        return await self.controller.execute(command, args, "test-client")


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


async def test_set_weights_are_percentages_the_unnamed_backend_takes_the_rest(
        world: World, tmp_path: Path) -> None:
    reply = await world.run("set_weights", weights={"mms": 25})
    assert reply["weights"] == {"mma": 75.0, "mms": 25.0}
    assert reply["changes"] == {"weights.mma": [100.0, 75.0], "weights.mms": [0.0, 25.0]}
    [line] = world.audit()
    assert line["client"] == "test-client" and line["command"] == "set_weights"
    assert line["old"] == {"weights.mma": 100.0, "weights.mms": 0.0}
    assert line["new"] == {"weights.mma": 75.0, "weights.mms": 25.0}
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["weights"] == {"mma": 75.0, "mms": 25.0}
    # One swap, and the addons were told (the weight change is reported back).
    assert world.swaps == [world.rt]
    assert world.watcher.seen[-1][1] is world.rt
    assert reply["ownership"] == {"cancelled": [], "finished": []}

    # The same again is no change: no swap, no audit line, no addon call.
    seen = len(world.watcher.seen)
    assert (await world.run("set_weights", weights={"mms": 25}))["changes"] == {}
    assert len(world.swaps) == 1 and len(world.audit()) == 1
    assert len(world.watcher.seen) == seen


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
        world: World, args: dict[str, Any], code: str, message: str) -> None:
    before = world.rt
    with pytest.raises(CommandError, match=message) as info:
        await world.run("set_weights", **args)
    assert info.value.code == code
    assert world.rt is before and world.swaps == [] and world.audit() == []


async def test_unknown_command_lists_the_known_ones(world: World) -> None:
    with pytest.raises(CommandError) as info:
        await world.run("explode")
    assert info.value.code == "unknown_command"
    assert {"drain", "release", "diffs"} <= set(info.value.detail["commands"])


async def test_set_shadow_and_set_action(world: World) -> None:
    reply = await world.run("set_shadow", percent=50, mirror={"generate": "always"})
    assert reply["shadow"]["percent"] == 50.0
    assert world.rt.rules["generate"].mirror == "always"
    assert len(world.swaps) == 1  # settings and mirror policy: one change, one swap
    with pytest.raises(CommandError, match="never mirrored"):
        await world.run("set_shadow", mirror={"load": "always"})
    with pytest.raises(CommandError, match="nothing to change"):
        await world.run("set_shadow")

    await world.run("set_action", action="generate", timeout_ms=3000, pin="mms")
    rule = world.rt.rules["generate"]
    assert (rule.timeout_ms, rule.pin, rule.mirror) == (3000, "mms", "always")
    await world.run("set_action", action="generate", timeout_ms=None, pin="")
    rule = world.rt.rules["generate"]
    assert (rule.timeout_ms, rule.pin) == (4500, "")  # back to the defaults
    await world.run("set_action", action="load", reset=True)
    assert world.rt.rules["load"].failover is False  # the config's rule
    with pytest.raises(CommandError, match="unknown backend"):
        await world.run("set_action", action="generate", pin="mmx")
    with pytest.raises(CommandError, match="unknown action"):
        await world.run("set_action", action="dance", timeout_ms=1)
    with pytest.raises(CommandError, match="nothing to change"):
        await world.run("set_action", action="generate")


@pytest.mark.parametrize("command, args, code, message", [
    # Ranges come from shim.settings' Meta: a value out of range is "invalid" ...
    ("set_shadow", {"percent": 150}, "invalid", "shadow.percent"),
    ("set_shadow", {"max_inflight": 0}, "invalid", "shadow.max_inflight"),
    ("set_shadow", {"timeout_ms": -1}, "invalid", "shadow.timeout_ms"),
    ("set_action", {"action": "generate", "timeout_ms": 0}, "invalid",
     "actions.generate.timeout_ms"),
    # ... a value of the wrong type is a bad request naming the field.
    ("set_shadow", {"percent": "lots"}, "bad_request", "percent"),
    ("set_shadow", {"sticky": 1}, "bad_request", "sticky"),
    ("set_action", {"action": "generate", "failover": "yes"}, "bad_request", "failover"),
    ("set_action", {"action": "generate", "mirror": "sometimes"}, "bad_request", "mirror"),
    ("set_action", {"timeout_ms": 5}, "bad_request", "action"),
])
async def test_settings_out_of_range_or_of_the_wrong_type_change_nothing(
        world: World, command: str, args: dict[str, Any], code: str, message: str) -> None:
    before = world.rt
    with pytest.raises(CommandError, match=message) as info:
        await world.run(command, **args)
    assert info.value.code == code
    assert world.rt is before and world.audit() == []


async def test_with_ownership_on_a_pin_of_a_model_bound_action_is_refused(
        tmp_path: Path) -> None:
    (tmp_path / "shim.json").write_text(json.dumps(config(ownership={"enabled": True})))
    world = World(tmp_path)
    with pytest.raises(CommandError, match="one owner per model") as info:
        await world.run("set_action", action="load", pin="mms")
    assert info.value.code == "refused"
    with pytest.raises(CommandError, match="use if_loaded"):
        await world.run("set_shadow", mirror={"generate": "always", "model_access": "always"})


async def test_drain_moves_traffic_and_waits_for_requests_in_flight(world: World) -> None:
    world.plane.inflight["mma"] = 3
    # The requests in flight to mma finish once the drain's swap is in force.
    world.store.subscribe(lambda old, new: world.plane.inflight.update(
        mma=0 if new.weights["mma"] == 0 and old is not new else world.plane.inflight["mma"]))
    reply = await world.run("drain", backend="mma", timeout_s=10)
    # mms had no weight: the drained share goes to it rather than to nobody.
    assert world.rt.weights == {"mma": 0.0, "mms": 100.0}
    assert (reply["inflight_at_start"], reply["remaining"]) == (3, 0)

    world.plane.inflight["mma"] = 2  # these never finish
    with pytest.raises(CommandError) as info:
        await world.run("drain", backend="mma", timeout_s=0.05)
    assert info.value.code == "drain_timeout" and info.value.detail["remaining"] == 2
    with pytest.raises(CommandError, match="unknown backend"):
        await world.run("drain", backend="mmx")
    with pytest.raises(CommandError, match="timeout_s"):
        await world.run("drain", backend="mma", timeout_s=10_000)


async def test_rollback_restores_the_safe_state_in_one_step(world: World) -> None:
    await world.run("set_weights", weights={"mma": 0, "mms": 100})
    await world.run("set_mode", mode="shadow")
    await world.run("set_action", action="status", pin="mms")
    await world.run("set_action", action="generate", timeout_ms=2000)
    swaps = len(world.swaps)
    reply = await world.run("rollback")
    assert len(world.swaps) == swaps + 1
    rt = world.rt
    assert (rt.weights, rt.mode) == ({"mma": 100.0, "mms": 0.0}, "split")
    assert rt.rules["status"].pin == ""  # a run-time pin elsewhere is undone
    assert rt.rules["generate"].timeout_ms == 2000  # other tuning stays
    assert reply["safe_backend"] == "mma" and "warning" not in reply


async def test_reload_applies_the_file_and_keeps_untouched_runtime_changes(
        world: World) -> None:
    await world.run("set_weights", weights={"mma": 60, "mms": 40})
    world.path.write_text(json.dumps(config(routing={"mode": "shadow"},
                                            shadow={"percent": 10})))
    reply = await world.run("reload")
    rt = world.rt
    assert (rt.mode, rt.shadow.percent) == ("shadow", 10.0)
    assert rt.weights == {"mma": 60.0, "mms": 40.0}
    assert reply["kept_overrides"] == ["weights"] and reply["restart_required"] == []

    # The file changes the weights: the file wins for them.
    world.path.write_text(json.dumps(config(routing={"weights": {"mma": 20, "mms": 80}})))
    await world.run("reload")
    assert world.rt.weights == {"mma": 20.0, "mms": 80.0}
    assert world.rt.mode == "split"


async def test_reload_swaps_policy_and_compare_rules_with_the_runtime_in_one_swap(
        world: World) -> None:
    before = world.rt
    world.path.write_text(json.dumps(config(
        policy={"fast": "tinyllama"},
        shadow={"compare": {"generate": {"$.text": "shape"}}})))
    reply = await world.run("reload")
    assert reply["changes"]["policy.fast"] == ["phi-2", "tinyllama"]
    [new] = world.swaps
    assert new is world.rt and dict(new.policy) == {"fast": "tinyllama"}
    assert new.compare is not before.compare
    assert dict(before.policy) == {"fast": "phi-2"}  # the old Runtime is untouched
    assert world.watcher.seen[-1] == (before, new)
    [line] = world.audit()
    assert line["command"] == "reload"


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    (json.dumps(config(routing={"weights": {"mma": 0, "mms": 0}})), "must not all be zero"),
    (json.dumps(config(shadow={"percent": 101})), "shadow.percent"),
    (json.dumps(config(routing={"weights": {"mma": 0, "mms": 0, "mmx": 100}},
                       backends={**config()["backends"],
                                 "mmx": {"dialect": "mms", "endpoints": ["tcp://h:1"]}})),
     "no running backend"),
])
async def test_an_invalid_reload_changes_nothing(
        world: World, text: str, message: str) -> None:
    await world.run("set_weights", weights={"mms": 50})
    before, swaps = world.rt, len(world.swaps)
    world.path.write_text(text)
    with pytest.raises(CommandError, match=message) as info:
        await world.run("reload")
    assert info.value.code == "invalid_config"
    assert world.rt is before and len(world.swaps) == swaps


async def test_reload_reports_what_needs_a_restart(world: World) -> None:
    cfg = config(routing={"weights": {"mma": 50, "mms": 40, "mmx": 10}})
    cfg["backends"]["mmx"] = {"dialect": "mms", "endpoints": ["tcp://127.0.0.1:9999"]}
    cfg["shim"] = {"listen": "tcp://*:5571"}
    world.path.write_text(json.dumps(cfg))
    reply = await world.run("reload")
    assert reply["restart_required"] == ["backends.mmx", "shim.listen"]
    # mmx is not running: its 10 % are shared by the others in proportion (routing table).
    assert world.rt.weights == {"mma": 50.0, "mms": 40.0}


def test_start_restores_state_and_reset_clears_it(tmp_path: Path) -> None:
    state = StateFile(tmp_path / "state.json")
    state.write(RuntimeState(mode="shadow", weights={"mma": 10.0, "mms": 90.0}))

    rt = World(tmp_path).rt
    assert (rt.mode, rt.weights) == ("shadow", {"mma": 10.0, "mms": 90.0})
    rt = World(tmp_path, reset=True).rt
    assert (rt.mode, rt.weights) == ("split", {"mma": 100.0, "mms": 0.0})
    assert World(tmp_path).rt.mode == "split"  # the reset was saved

    # A state that no longer fits the config is ignored, not fatal.
    state.write(RuntimeState(weights={"mmx": 100.0}))
    assert World(tmp_path).rt.weights == {"mma": 100.0, "mms": 0.0}
    state.path.write_text("{garbage")
    assert World(tmp_path).rt.weights == {"mma": 100.0, "mms": 0.0}


async def test_status_comes_from_the_store_the_data_plane_and_the_addons(
        world: World) -> None:
    world.plane.inflight["mms"] = 4
    reply = await world.run("status")
    assert reply["backends"]["mma"] == {"dialect": "mma", "weight": 100.0, "share": 100.0,
                                        "healthy": True, "inflight": 0}
    assert reply["backends"]["mms"]["inflight"] == 4 and reply["inflight"] == 4
    assert reply["counts"] == {"requests": 0, "replies": 0}
    assert reply["ownership"] == {"owners": {"phi-2": "mma"}}  # Watcher.describe()
    assert "broken" not in reply  # a failing describe() is left out, not fatal
    assert reply["shadow"] == {"percent": 100.0, "sticky": True, "max_inflight": 64,
                               "timeout_ms": 4500}
    assert set(reply["actions"]["generate"]) == {"timeout_ms", "failover", "pin",
                                                 "translate", "mirror"}
    config_reply = await world.run("get_config")
    assert config_reply["config"]["routing"]["safe_backend"] == "mma"


async def test_addon_commands_are_offered_and_their_changes_audited(world: World) -> None:
    assert await world.run("diffs", limit=3) == {"status": "ok", "diffs": [], "limit": 3}
    assert world.audit() == []  # a read-only command leaves no audit line

    reply = await world.run("release", model="phi-2")
    assert reply["released_from"] == "mma" and world.watcher.released == ["phi-2"]
    [line] = world.audit()
    assert line["command"] == "release"
    assert line["new"] == {"ownership.owners.phi-2": None}
    assert world.swaps == []  # an addon command never swaps the Runtime


async def test_a_failing_runtime_changed_hook_does_not_undo_or_fail_the_change(
        world: World) -> None:
    reply = await world.run("set_mode", mode="shadow")
    assert reply["mode"] == "shadow" and world.rt.mode == "shadow"
    assert "broken" not in reply


async def test_concurrent_commands_never_interleave(world: World) -> None:
    """Each command reads, changes and swaps without yielding: 20 concurrent weight
    changes give 20 swaps, each from the Runtime the previous one put in force."""
    chain: list[tuple[Runtime, Runtime]] = []
    world.store.subscribe(lambda old, new: chain.append((old, new)) if old is not new
                          else None)
    await asyncio.gather(*(world.run("set_weights", weights={"mms": float(i)})
                           for i in range(1, 21)))
    assert len(chain) == 20
    for (_, new), (old, _) in itertools.pairwise(chain):
        assert old is new
    assert chain[-1][1] is world.rt

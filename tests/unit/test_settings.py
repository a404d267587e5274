"""shim.settings: a runtime knob is declared once, and the config file, the state file,
the admin arguments, the status output and the ctl flags derive from that declaration."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Annotated, Any

import msgspec
import pytest
from msgspec import Meta

from shim import runtime, settings
from shim.cli import build_parser
from shim.config import ShadowSection, decode_config
from shim.control import RUNTIME_PATHS
from shim.dialects.ops import Kind
from shim.errors import ConfigError, StateError
from shim.runtime import resolve_rules, runtime_from_config
from shim.settings import (
    ActionRule,
    SetAction,
    SetShadow,
    ShadowSettings,
    add_flags,
    check_values,
    flag_values,
    partial,
)
from shim.state import ShadowOverride, check_state, decode_state, encode_state

BACKENDS = {"mma": {"dialect": "mma", "endpoints": ["tcp://127.0.0.1:5580"]},
            "mms": {"dialect": "mms", "endpoints": ["tcp://127.0.0.1:7211"]}}
#: Given, so that no models file is read.
POLICY = {"fast": "phi-2"}


class WithJitter(ShadowSettings, frozen=True):
    """A new knob, as a developer would add it: one field with its range."""

    jitter_ms: Annotated[int, Meta(ge=0, le=1000, description="random delay")] = 0


def test_a_new_knob_is_picked_up_by_every_derived_shape() -> None:
    # Admin arguments: optional, type-checked on decode (bad_request) ...
    args_type = partial(WithJitter, "SetJitter")
    args = msgspec.convert({"jitter_ms": 5}, args_type)
    assert settings.fields_set(args) == {"jitter_ms": 5}
    with pytest.raises(msgspec.ValidationError, match="jitter_ms"):
        msgspec.convert({"jitter_ms": "soon"}, args_type)
    # ... and range-checked against the same Meta (invalid), written once.
    with pytest.raises(ValueError, match=r"shadow\.jitter_ms: Expected `int` <= 1000"):
        check_values({"jitter_ms": 5000}, WithJitter, "shadow")
    # The state file: overrides only, the new field included.
    override = partial(WithJitter, "JitterOverride", bases=(msgspec.Struct,))
    assert msgspec.json.encode(override(jitter_ms=7)) == b'{"jitter_ms":7}'
    # ctl flags: one per field, typed, with the field's help.
    parser = argparse.ArgumentParser()
    add_flags(parser, WithJitter)
    given = parser.parse_args(["--jitter-ms", "9", "--sticky", "off"])
    assert flag_values(given, WithJitter) == {"jitter_ms": 9, "sticky": False}
    with pytest.raises(SystemExit):
        parser.parse_args(["--jitter-ms", "soon"])
    assert "random delay" in parser.format_help()
    # Status output: the Struct as builtins.
    assert msgspec.to_builtins(WithJitter())["jitter_ms"] == 0


def test_the_real_shapes_derive_from_the_settings_structs() -> None:
    fields = set(ShadowSettings.__struct_fields__)
    assert set(ShadowSection.__struct_fields__) >= fields  # the config file's [shadow]
    assert set(ShadowOverride.__struct_fields__) == fields  # the state file
    assert set(SetShadow.__struct_fields__) == fields | {"mirror"}  # admin set_shadow
    assert set(SetAction.__struct_fields__) == \
        set(ActionRule.__struct_fields__) | {"action", "reset"}  # admin set_action
    cfg = decode_config({"backends": BACKENDS, "policy": POLICY})
    rt = runtime_from_config(cfg)
    assert set(rt.describe()["shadow"]) == fields  # status
    assert set(rt.describe()["actions"]["generate"]) == set(ActionRule.__struct_fields__)
    # A reload applies every shadow knob (none is reported as needing a restart).
    assert {f"shadow.{f}" for f in fields} <= set(RUNTIME_PATHS)

    ctl = build_parser()
    # `mmshim ctl shadow` and `mmshim ctl action` have one flag per field.
    shadow_help = _subcommand_help(ctl, "ctl", "shadow")
    action_help = _subcommand_help(ctl, "ctl", "action")
    for field in fields:
        assert f"--{field.replace('_', '-')}" in shadow_help
    for field in ActionRule.__struct_fields__:
        assert f"--{field.replace('_', '-')}" in action_help


def _subcommand_help(parser: argparse.ArgumentParser, *path: str) -> str:
    for name in path:
        [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = sub.choices[name]
    return parser.format_help()


def test_ctl_flags_become_the_admin_arguments() -> None:
    ctl = build_parser()
    args = ctl.parse_args(["ctl", "action", "generate", "--timeout-ms", "default",
                           "--pin", "none", "--failover", "on", "--mirror", "if_loaded"])
    assert args.build(args) == ("set_action", {"action": "generate", "timeout_ms": None,
                                               "pin": "", "failover": True,
                                               "mirror": "if_loaded"})
    # The request the ctl builds decodes into the admin's argument type as it is.
    msgspec.convert(args.build(args)[1], SetAction)
    args = ctl.parse_args(["ctl", "shadow", "--percent", "25", "--sticky", "off",
                           "--mirror", "generate=never"])
    assert args.build(args) == ("set_shadow", {"percent": 25.0, "sticky": False,
                                               "mirror": {"generate": "never"}})
    msgspec.convert(args.build(args)[1], SetShadow)
    with pytest.raises(SystemExit):
        ctl.parse_args(["ctl", "action", "generate", "--failover", "maybe"])


@pytest.mark.parametrize("shadow, field", [
    ({"percent": 101}, "shadow.percent"),
    ({"percent": -1}, "shadow.percent"),
    ({"max_inflight": 0}, "shadow.max_inflight"),
    ({"timeout_ms": 0}, "shadow.timeout_ms"),
])
def test_the_config_file_gets_the_same_ranges(shadow: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        decode_config({"backends": BACKENDS, "policy": POLICY, "shadow": shadow})


def test_an_action_rule_out_of_range_is_refused_by_the_config_and_the_state() -> None:
    with pytest.raises(ConfigError, match=r"actions\.load\.timeout_ms"):
        decode_config({"backends": BACKENDS, "policy": POLICY,
                       "actions": {"load": {"timeout_ms": 0}}})
    good = decode_state(b'{"version": 1, "actions": {"load": {"timeout_ms": 5}}}')
    check_state(good, BACKENDS)
    assert json.loads(encode_state(good))["actions"]["load"]["timeout_ms"] == 5
    with pytest.raises(StateError, match=r"timeout_ms"):  # the Meta, when decoded
        decode_state(b'{"version": 1, "actions": {"load": {"timeout_ms": 0}}}')
    with pytest.raises(StateError, match=r"shadow\.percent"):
        check_state(decode_state(b'{"version": 1, "shadow": {"percent": 120}}'), BACKENDS)


def test_the_action_list_is_the_operation_kinds() -> None:
    assert tuple(k.value for k in Kind) == settings.ACTIONS
    cfg = decode_config({"backends": BACKENDS, "policy": POLICY})
    assert set(runtime_from_config(cfg).rules) == {k.value for k in Kind}


def test_a_new_kind_gets_a_rule_without_another_edit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Kind nobody wrote a default for gets the built-in defaults (never mirrored), not
    a KeyError on every such request."""
    monkeypatch.setattr(runtime, "ACTIONS", (*settings.ACTIONS, "dance"))
    rules = resolve_rules({}, 4500)
    assert rules["dance"] == runtime.Rule(timeout_ms=4500, failover=True, pin="",
                                          translate=True, mirror="never")


def test_the_config_is_a_resolved_frozen_copy(tmp_path: Path) -> None:
    (tmp_path / "models.toml").write_text('[policy]\nfast = "phi-2"\n')
    cfg = decode_config({"backends": BACKENDS, "shadow": {"diff_log": "d.jsonl"}},
                        base_dir=tmp_path)
    assert cfg.routing.weights == {"mma": 100.0, "mms": 0.0}  # filled in the copy
    assert cfg.routing.safe_backend == "mma"
    assert cfg.shadow.diff_log == str(tmp_path / "d.jsonl")
    assert cfg.policy == {"fast": "phi-2"}
    with pytest.raises(AttributeError):
        cfg.routing = cfg.routing  # type: ignore[misc]
    with pytest.raises(AttributeError):
        cfg.shadow.percent = 5.0  # type: ignore[misc]

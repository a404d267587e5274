"""The runtime knobs: one frozen msgspec Struct per group, range checks as ``Meta``.

Each group is declared once here, and every other shape of it derives from that one
declaration:

- the config file: shim.config's sections are these Structs (``ShadowSection`` extends
  ``ShadowSettings``; ``[actions.X]`` tables are ``ActionRule``), so msgspec checks the
  ranges while decoding (``$.shadow.percent``);
- the Runtime (shim.runtime) holds ``ShadowSettings`` itself, and ``status`` shows it with
  ``msgspec.to_builtins``;
- the state file (shim.state): ``partial(ShadowSettings)``, the overrides only;
- the admin arguments (shim.control): ``SetShadow`` and ``SetAction`` are built from the
  fields by ``partial``; types are checked on decode (``bad_request``), values by
  ``check_values`` against the same ``Meta`` (``invalid``);
- the ``ctl`` flags (shim.ctl): ``add_flags`` makes one ``--flag`` per field, with the
  field's type, choices and description, and ``flag_values`` reads them back.

So a new runtime knob is one field here plus the code that uses it. The operation kinds
(shim.dialects.ops.Kind) give the action names (``ACTIONS``).
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Callable
from typing import Annotated, Any, Literal

import msgspec
import msgspec.inspect as mi
from msgspec import UNSET, Meta, UnsetType

from shim.dialects.ops import Kind

#: Canonical operation names that per-action rules and shadow policies are keyed by: one
#: per operation kind, so a new ``Kind`` gets rules (defaults) without another edit.
ACTIONS: tuple[str, ...] = tuple(kind.value for kind in Kind)

Mode = Literal["split", "shadow"]
MirrorPolicy = Literal["always", "if_loaded", "never"]

Percent = Annotated[float, Meta(ge=0, le=100)]
PositiveMs = Annotated[int, Meta(gt=0)]
AtLeastOne = Annotated[int, Meta(ge=1)]


class Settings(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Base of every group: immutable, unknown keys are errors, keyword-only."""


class ShadowSettings(Settings, frozen=True):
    """How much traffic shadow mode mirrors, and how much may be in flight
    (``[shadow]``, ``ctl shadow``, ``status.shadow``)."""

    percent: Annotated[float, Meta(ge=0, le=100, description="share of requests mirrored "
                                   "(0..100)")] = 100.0
    sticky: Annotated[bool, Meta(description="mirror whole conversations, not single "
                                 "requests")] = True
    max_inflight: Annotated[int, Meta(ge=1, description="shadow requests in flight at "
                                      "most")] = 64
    timeout_ms: Annotated[int, Meta(gt=0, description="how long to wait for a shadow "
                                    "reply")] = 4500


class ActionRule(Settings, frozen=True):
    """Per-action overrides (``[actions.X]``, ``ctl action X``); unset fields (None) fall
    back to the defaults for that action (shim.runtime.resolve_rules)."""

    timeout_ms: Annotated[int, Meta(gt=0, extra={"metavar": "MS|default"})] | None = None
    failover: Annotated[bool, Meta(extra={"metavar": "on|off|default"})] | None = None
    #: ``ctl action X --pin none`` (``""``) removes the pin.
    pin: Annotated[str, Meta(extra={"metavar": "BACKEND|none", "none": ""})] = ""
    translate: bool = True
    mirror: MirrorPolicy | None = None


# -- derived shapes -------------------------------------------------------------------

class Args(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The arguments of an admin command (unknown fields are errors naming the field)."""


def partial(struct: type[msgspec.Struct], name: str, *, missing: Any = None,
            constrained: bool = False, bases: tuple[type[msgspec.Struct], ...] = (Args,),
            extra: list[tuple[Any, ...]] | None = None) -> type[Any]:
    """A Struct with ``struct``'s fields, each optional (default ``missing``: None, or
    ``msgspec.UNSET`` where None is a value meaning "back to the default"). Without
    ``constrained`` the ``Meta`` constraints are left out (values are checked by
    ``check_values``, so a type error and a range error get different replies)."""
    hints = typing.get_type_hints(struct, include_extras=constrained)
    fields: list[tuple[Any, ...]] = []
    for field in struct.__struct_fields__:
        tp = hints[field]
        tp = tp | UnsetType if missing is UNSET else tp | None
        fields.append((field, tp, missing))
    return msgspec.defstruct(name, [*fields, *(extra or [])], bases=bases, kw_only=True,
                             forbid_unknown_fields=True, omit_defaults=True,
                             module=__name__)


_CHECKERS: dict[type[msgspec.Struct], type[Any]] = {}


def check_values(values: dict[str, Any], struct: type[msgspec.Struct], where: str) -> None:
    """Check some of ``struct``'s fields against its ``Meta`` constraints. Raises
    ValueError naming ``where.field`` (e.g. ``shadow.percent: Expected `float` <= 100``)."""
    checker = _CHECKERS.get(struct)
    if checker is None:
        checker = _CHECKERS[struct] = partial(struct, f"{struct.__name__}Check",
                                              constrained=True, bases=(Settings,))
    try:
        msgspec.convert(values, checker)
    except msgspec.ValidationError as exc:
        message = str(exc)
        head, sep, path = message.rpartition(" - at `$.")
        if sep:
            field = path.rstrip("`").split(".")[0].split("[")[0]
            raise ValueError(f"{where}.{field}: {head}") from None
        raise ValueError(f"{where}: {message}") from None


def fields_set(args: msgspec.Struct, missing: Any = None) -> dict[str, Any]:
    """The fields of a partial Struct that were given (not ``missing``)."""
    return {f: getattr(args, f) for f in args.__struct_fields__
            if getattr(args, f) is not missing}


# -- admin command arguments (shim.control) --------------------------------------------

class SetWeights(Args):
    #: Backends left out share what is left of 100 % (shim.config.complete_weights).
    weights: dict[str, float]


class SetMode(Args):
    mode: Mode


#: ``set_shadow``: any ShadowSettings field, plus per-action mirror policies.
SetShadow = partial(ShadowSettings, "SetShadow", extra=[
    ("mirror", dict[str, MirrorPolicy], msgspec.field(default_factory=dict))])

#: ``set_action``: any ActionRule field (left out: unchanged; ``null``: back to the
#: built-in default), plus ``reset`` (back to the config file's rule).
SetAction = partial(ActionRule, "SetAction", missing=UNSET, extra=[
    ("action", str), ("reset", bool, False)])


class Drain(Args):
    backend: str
    timeout_s: float = 30.0


class Release(Args):
    model: str
    #: Release only if this backend owns it (``ctl release MODEL --from B``).
    from_backend: str | None = None


class Reload(Args):
    #: Also drop every run-time change and make the file the whole truth.
    reset: bool = False


# -- ctl flags (shim.ctl) ----------------------------------------------------------------

def _on_off(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("on", "true", "yes", "1"):
        return True
    if lowered in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


def _flag_type(info: Any, nullable: bool, none_value: Any) -> tuple[
        Callable[[str], Any], str | None, list[str] | None]:
    """(parse, metavar, choices) for one field's ``msgspec.inspect`` type."""
    if isinstance(info, mi.LiteralType):
        values = [str(v) for v in info.values]
        return str, None, [*values, "default"] if nullable else values
    base: Callable[[str], Any]
    if isinstance(info, mi.BoolType):
        base, metavar = _on_off, "on|off"
    elif isinstance(info, mi.IntType):
        base, metavar = int, "N"
    elif isinstance(info, mi.FloatType):
        base, metavar = float, "X"
    else:
        base, metavar = str, "VALUE"

    def parse(text: str) -> Any:
        if nullable and text == "default":
            return text  # flag_values makes it null
        if none_value is not msgspec.UNSET and text == "none":
            return none_value
        try:
            return base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {metavar}{' or default' if nullable else ''}, got {text!r}"
            ) from None

    return parse, metavar + ("|default" if nullable else ""), None


def add_flags(parser: argparse.ArgumentParser, struct: type[msgspec.Struct]) -> None:
    """One ``--field-name`` option per field of ``struct`` (type, choices, metavar and
    help from the field's type and ``Meta``); a field that may be None also takes
    ``default`` (back to the built-in default). Left out: ``None`` in the namespace."""
    info = mi.type_info(struct)
    assert isinstance(info, mi.StructType)
    for field in info.fields:
        tp: Any = field.type
        nullable = False
        if isinstance(tp, mi.UnionType):
            members = [t for t in tp.types if not isinstance(t, mi.NoneType)]
            nullable = len(members) < len(tp.types)
            tp = members[0]
        help_text = None
        metavar_extra: str | None = None
        none_value: Any = msgspec.UNSET
        if isinstance(tp, mi.Metadata):
            help_text = (tp.extra_json_schema or {}).get("description")
            extra = tp.extra or {}
            metavar_extra = extra.get("metavar")
            none_value = extra.get("none", msgspec.UNSET)
            tp = tp.type
        parse, metavar, choices = _flag_type(tp, nullable, none_value)
        parser.add_argument(f"--{field.name.replace('_', '-')}", dest=field.name,
                            type=parse, choices=choices, help=help_text,
                            metavar=metavar_extra or (None if choices else metavar))


def flag_values(args: argparse.Namespace, struct: type[msgspec.Struct]) -> dict[str, Any]:
    """The fields of ``struct`` given as flags (``add_flags``), as admin arguments:
    ``default`` becomes ``null``."""
    out: dict[str, Any] = {}
    for field in struct.__struct_fields__:
        value = getattr(args, field, None)
        if value is None:
            continue
        out[field] = None if value == "default" else value
    return out


__all__ = [
    "ACTIONS",
    "ActionRule",
    "Args",
    "Drain",
    "MirrorPolicy",
    "Mode",
    "Release",
    "Reload",
    "SetAction",
    "SetMode",
    "SetShadow",
    "SetWeights",
    "Settings",
    "ShadowSettings",
    "add_flags",
    "check_values",
    "fields_set",
    "flag_values",
    "partial",
]

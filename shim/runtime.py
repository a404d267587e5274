"""The one runtime-config object: what the admin socket may change while traffic flows.

A ``Runtime`` is immutable. The proxy reads ``proxy.runtime`` once per request, and a
change builds a new Runtime and swaps the reference, so every request sees either the
old settings or the new ones, never a mix, and requests in flight finish where they
started.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import msgspec

from shim.compare import Rules
from shim.config import STATEFUL_ACTIONS, ShimConfig
from shim.routing import RoutingTable
from shim.settings import ACTIONS, ActionRule, MirrorPolicy, Mode, Settings, ShadowSettings

#: What shadow mode mirrors by default: read-only requests always, generate only where
#: the model is already loaded on the shadow side, state changes never; an action not
#: listed (a new operation kind) is never mirrored until a rule says so.
DEFAULT_MIRROR: dict[str, MirrorPolicy] = {
    "generate": "if_loaded",
    "load": "never",
    "unload": "never",
    "model_access": "never",
    "clear_conversation": "never",
    "loaded_status": "always",
    "status": "always",
    "health": "always",
    "list_models": "always",
    "other": "never",
}


class Rule(Settings, frozen=True):
    """A per-action rule with every default filled in (``ActionRule``'s fields, none
    None); ``status`` shows it with ``msgspec.to_builtins``."""

    timeout_ms: int
    failover: bool
    pin: str
    translate: bool
    mirror: MirrorPolicy


def routing_table(weights: Mapping[str, float], order: Collection[str] | None = None
                  ) -> RoutingTable:
    """The one RoutingTable builder: weights (percent) keyed in ``order`` (the running
    backends' config order, which fixes the bucket layout); backends left out get 0."""
    names = list(weights) if order is None else list(order)
    return RoutingTable({n: float(weights.get(n, 0.0)) for n in names})


@dataclass(frozen=True, slots=True)
class Runtime:
    """Weights, mode and rules in force now. Build changes with ``with_*``."""

    mode: Mode
    table: RoutingTable
    rules: dict[str, Rule]
    shadow: ShadowSettings
    #: The raw per-action overrides, kept so a change can be persisted and diffed.
    overrides: dict[str, ActionRule] = field(default_factory=dict)
    #: The load policy (model_pref -> model) used to translate MMA generate requests.
    policy: Mapping[str, str] = field(default_factory=dict)
    #: Shadow's compiled compare rules (shim.compare): a reload swaps them with the rest.
    compare: Rules = field(default_factory=Rules)

    @property
    def weights(self) -> dict[str, float]:
        return self.table.weights

    def with_weights(self, weights: Mapping[str, float],
                     order: Collection[str] | None = None) -> Runtime:
        """New weights (see ``routing_table``); ``order`` defaults to the current one."""
        return replace(self, table=routing_table(weights, order or list(self.weights)))

    def with_mode(self, mode: Mode) -> Runtime:
        return replace(self, mode=mode)

    def with_shadow(self, **changes: Any) -> Runtime:
        return replace(self, shadow=msgspec.structs.replace(self.shadow, **changes))

    def with_action(self, action: str, rule: ActionRule, default_timeout_ms: int) -> Runtime:
        overrides = {**self.overrides, action: rule}
        return replace(self, overrides=overrides,
                       rules=resolve_rules(overrides, default_timeout_ms))

    def describe(self) -> dict[str, Any]:
        """A JSON-ready view for status replies and the state file."""
        return {
            "mode": self.mode,
            "weights": dict(self.weights),
            "shadow": msgspec.to_builtins(self.shadow),
            "actions": {name: msgspec.to_builtins(r) for name, r in self.rules.items()},
        }


def resolve_rules(overrides: dict[str, ActionRule], default_timeout_ms: int) -> dict[str, Rule]:
    """Fill every action's rule from its overrides and the built-in defaults."""
    rules = {}
    for action in ACTIONS:
        o = overrides.get(action, ActionRule())
        rules[action] = Rule(
            timeout_ms=o.timeout_ms if o.timeout_ms is not None else default_timeout_ms,
            failover=o.failover if o.failover is not None else action not in STATEFUL_ACTIONS,
            pin=o.pin,
            translate=o.translate,
            mirror=o.mirror if o.mirror is not None else DEFAULT_MIRROR.get(action, "never"),
        )
    return rules


def runtime_from_config(cfg: ShimConfig) -> Runtime:
    """The runtime a freshly started shim (or a ``reload``) begins with."""
    return Runtime(
        mode=cfg.routing.mode,
        table=routing_table(cfg.routing.weights, cfg.backends),
        rules=resolve_rules(cfg.actions, cfg.shim.default_timeout_ms),
        shadow=ShadowSettings(**{f: getattr(cfg.shadow, f)
                                 for f in ShadowSettings.__struct_fields__}),
        overrides=dict(cfg.actions),
        policy=MappingProxyType(dict(cfg.policy)),
        compare=Rules(cfg.shadow.compare),
    )


class RuntimeStore:
    """The one place the Runtime in force lives; the data path reads ``current`` once per
    request, the control plane replaces it with ``swap``.

    ``swap`` is synchronous and does not yield, so a read-modify-write done without an
    ``await`` in between is atomic with respect to requests and other commands.
    Subscribers (``subscribe``) are called synchronously after each swap with
    ``(old, new)`` (e.g. the weight gauges); slow work belongs in an addon's
    ``runtime_changed`` hook, which the control plane awaits.
    """

    def __init__(self, initial: Runtime) -> None:
        self._current = initial
        self._subscribers: list[Callable[[Runtime, Runtime], None]] = []

    @property
    def current(self) -> Runtime:
        return self._current

    def swap(self, new: Runtime) -> Runtime:
        """Put ``new`` in force; returns the Runtime it replaced."""
        old, self._current = self._current, new
        for subscriber in self._subscribers:
            subscriber(old, new)
        return old

    def subscribe(self, subscriber: Callable[[Runtime, Runtime], None]) -> None:
        self._subscribers.append(subscriber)
        subscriber(self._current, self._current)


__all__ = ["DEFAULT_MIRROR", "Rule", "Runtime", "RuntimeStore", "ShadowSettings",
           "resolve_rules", "routing_table", "runtime_from_config"]

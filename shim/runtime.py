"""The one runtime-config object: what the admin socket may change while traffic flows.

A ``Runtime`` is immutable. The proxy reads ``proxy.runtime`` once per request, and a
change builds a new Runtime and swaps the reference, so every request sees either the
old settings or the new ones, never a mix, and requests in flight finish where they
started.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from shim.compare import Rules
from shim.config import ACTIONS, STATEFUL_ACTIONS, ActionRule, MirrorPolicy, Mode, ShimConfig
from shim.routing import RoutingTable

#: What shadow mode mirrors by default: read-only requests always, generate only where
#: the model is already loaded on the shadow side, state changes never.
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


@dataclass(frozen=True, slots=True)
class Rule:
    """A per-action rule with every default filled in."""

    timeout_ms: int
    failover: bool
    pin: str
    translate: bool
    mirror: MirrorPolicy


@dataclass(frozen=True, slots=True)
class ShadowSettings:
    """How much traffic shadow mode mirrors, and how much may be in flight."""

    percent: float
    sticky: bool
    max_inflight: int
    timeout_ms: int


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

    def with_weights(self, weights: dict[str, float]) -> Runtime:
        return replace(self, table=RoutingTable(weights))

    def with_mode(self, mode: Mode) -> Runtime:
        return replace(self, mode=mode)

    def with_shadow(self, **changes: Any) -> Runtime:
        return replace(self, shadow=replace(self.shadow, **changes))

    def with_action(self, action: str, rule: ActionRule, default_timeout_ms: int) -> Runtime:
        overrides = {**self.overrides, action: rule}
        return replace(self, overrides=overrides,
                       rules=resolve_rules(overrides, default_timeout_ms))

    def describe(self) -> dict[str, Any]:
        """A JSON-ready view for status replies and the state file."""
        return {
            "mode": self.mode,
            "weights": dict(self.weights),
            "shadow": {
                "percent": self.shadow.percent,
                "sticky": self.shadow.sticky,
                "max_inflight": self.shadow.max_inflight,
                "timeout_ms": self.shadow.timeout_ms,
            },
            "actions": {
                name: {"timeout_ms": r.timeout_ms, "failover": r.failover, "pin": r.pin,
                       "translate": r.translate, "mirror": r.mirror}
                for name, r in self.rules.items()
            },
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
            mirror=o.mirror if o.mirror is not None else DEFAULT_MIRROR[action],
        )
    return rules


def runtime_from_config(cfg: ShimConfig) -> Runtime:
    """The runtime a freshly started shim (or a ``reload``) begins with."""
    weights = {name: cfg.routing.weights.get(name, 0.0) for name in cfg.backends}
    s = cfg.shadow
    return Runtime(
        mode=cfg.routing.mode,
        table=RoutingTable(weights),
        rules=resolve_rules(cfg.actions, cfg.shim.default_timeout_ms),
        shadow=ShadowSettings(percent=s.percent, sticky=s.sticky,
                              max_inflight=s.max_inflight, timeout_ms=s.timeout_ms),
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

"""The operator's commands: validate, swap the Runtime once, audit, persist.

Every runtime change, whether it comes from the admin socket or from SIGHUP, goes
through ``Controller._apply``: it reads ``proxy.runtime``, builds the new Runtime and
swaps it in without yielding to the event loop in between, so a change lands between two
requests and two operators' changes never interleave. Requests already routed finish
where they started. The Controller also restores the saved state when the shim starts.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from msgspec import UNSET, UnsetType

from shim.audit import AuditLog, Changes, changes_between, format_changes
from shim.config import (
    MODEL_BOUND_ACTIONS,
    ActionRule,
    MirrorPolicy,
    Mode,
    ShimConfig,
    check_weights,
    complete_weights,
    load_config,
)
from shim.errors import CommandError, ConfigError, StateError
from shim.routing import RoutingTable
from shim.runtime import Runtime, runtime_from_config
from shim.state import (
    RuntimeState,
    StateFile,
    apply,
    check_rule,
    check_shadow,
    diff,
    probe_writable,
    rebase,
)

if TYPE_CHECKING:
    from shim.app import Shim
    from shim.proxy import Proxy

log = logging.getLogger("mmshim.admin")

#: Config paths a reload applies at run time; a change anywhere else needs a restart.
RUNTIME_PATHS = ("routing.mode", "routing.weights", "routing.safe_backend", "actions",
                 "shadow.percent", "shadow.sticky", "shadow.max_inflight",
                 "shadow.timeout_ms", "policy", "models_file", "shim.default_timeout_ms")

MAX_DRAIN_S = 600.0
#: Actions that may load a model on the backend they reach: never mirrored "always".
LOADING_ACTIONS = frozenset({"generate", "load", "model_access"})




# -- the arguments of each command (unknown fields are errors that name the field) ------

class Args(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A command without arguments."""


class SetWeights(Args):
    #: Backends left out keep their current weight.
    weights: dict[str, float]


class SetMode(Args):
    mode: Mode


class SetShadow(Args):
    percent: float | None = None
    sticky: bool | None = None
    max_inflight: int | None = None
    timeout_ms: int | None = None
    #: action -> mirror policy (stored as that action's rule).
    mirror: dict[str, MirrorPolicy] = msgspec.field(default_factory=dict)


class SetAction(Args):
    action: str
    #: Left out: unchanged. ``null``: back to the built-in default.
    timeout_ms: int | UnsetType | None = UNSET
    failover: bool | UnsetType | None = UNSET
    mirror: MirrorPolicy | UnsetType | None = UNSET
    #: ``""`` removes the pin.
    pin: str | UnsetType = UNSET
    translate: bool | UnsetType = UNSET
    #: Back to the config file's rule for this action.
    reset: bool = False


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


Reply = dict[str, Any]
Handler = Callable[[Any, str], Awaitable[Reply]]
#: What an addon offers through ``commands()``: raw arguments in, a reply out.
AddonHandler = Callable[[dict[str, Any]], Reply | Awaitable[Reply]]


@dataclass(frozen=True, slots=True)
class Command:
    """A command the admin socket accepts: its argument type and its handler."""

    args: type[Args] | None  # None: the handler gets the raw arguments
    run: Handler


class Controller:
    """Owns every runtime change of one Shim. Started and stopped with it (an extra)."""

    def __init__(self, shim: Shim, state: StateFile, audit: AuditLog, *,
                 reset_state: bool = False) -> None:
        self.shim = shim
        self.state = state
        self.audit = audit
        self._reset_state = reset_state
        #: The config file as last (re)loaded; the saved state is a diff against it.
        self.file_cfg: ShimConfig = shim.cfg
        self._base: Runtime | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.commands: dict[str, Command] = {}
        self.register("status", Args, self.status)
        self.register("get_config", Args, self.get_config)
        self.register("set_weights", SetWeights, self.set_weights)
        self.register("set_mode", SetMode, self.set_mode)
        self.register("set_shadow", SetShadow, self.set_shadow)
        self.register("set_action", SetAction, self.set_action)
        self.register("drain", Drain, self.drain)
        self.register("rollback", Args, self.rollback)
        self.register("reload", Reload, self.reload_command)
        self.register("release", Release, self.release)
        # Addons add theirs through commands() (e.g. shadow's "diffs"): see start().

    def register(self, name: str, args: type[Args] | None, run: Handler) -> None:
        """Add a command (``args`` None: the handler validates the raw arguments itself)."""
        self.commands[name] = Command(args, run)

    def register_addon(self, name: str, handler: AddonHandler) -> None:
        """A read-only command offered by an addon; it cannot swap the Runtime."""
        async def run(args: dict[str, Any], client: str) -> Reply:
            result = handler(args)
            if inspect.isawaitable(result):
                result = await result
            return {"status": "ok", **result}

        self.register(name, None, run)

    async def execute(self, name: str, raw: dict[str, Any], client: str) -> Reply:
        """Run one command; raises CommandError for anything the caller got wrong."""
        command = self.commands.get(name)
        if command is None:
            raise CommandError("unknown_command", f"unknown command {name!r}",
                               commands=sorted(self.commands))
        if command.args is None:
            return await command.run(raw, client)
        try:
            args = msgspec.convert(raw, command.args)
        except msgspec.ValidationError as exc:
            raise CommandError("bad_request", f"{name}: {exc}") from None
        return await command.run(args, client)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def proxy(self) -> Proxy:
        assert self.shim.proxy is not None, "the controller starts after the proxy"
        return self.shim.proxy

    @property
    def backends(self) -> list[str]:
        """The running backends, in config order (which fixes the bucket layout)."""
        return list(self.proxy.pool.backends)

    @property
    def base(self) -> Runtime:
        """The Runtime the config file alone gives; run-time changes are relative to it."""
        if self._base is None:
            self._base = self._base_for(self.file_cfg)
        return self._base

    def start(self) -> None:
        """Restore the saved runtime state (unless --reset-state), before traffic starts;
        take the commands addons offer (an extra's ``commands()``: name -> handler)."""
        own = getattr(self.shim, "ownership", None)
        if own is not None:
            own.audit = self.audit  # duplicate repairs leave an audit line
        for extra in getattr(self.shim, "extras", []):
            offered = getattr(extra, "commands", None)
            for name, handler in (offered() if callable(offered) else {}).items():
                if name not in self.commands:
                    self.register_addon(name, handler)
        path = self.state.path
        why = probe_writable(path.parent)
        if why is not None:
            log.warning("state directory not writable (%s): serving, but runtime changes "
                        "are refused until it is", why)
        if self._reset_state:
            log.warning("--reset-state: ignoring %s and starting from the config file", path)
            try:
                self.state.write(RuntimeState())
            except OSError as exc:
                log.error("cannot clear state file %s: %s", path, exc.strerror)
            return
        try:
            saved = self.state.load()
            if saved is None or saved.is_empty():
                return
            rt = apply(self.base, saved, self.backends, self.file_cfg.shim.default_timeout_ms)
        except StateError as exc:
            log.error("ignoring saved state (%s); starting from the config file", exc)
            return
        self.proxy.store.swap(rt)
        log.warning("restored runtime state from %s: %s", path,
                    format_changes(changes_between(self.base.describe(), rt.describe())))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.state.flush()

    def reload_from_signal(self) -> None:
        """SIGHUP: reload like ``reload``, reporting to the log instead of a client."""
        task = asyncio.get_running_loop().create_task(self._reload_logged("signal:SIGHUP"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_logged(self, client: str) -> None:
        try:
            reply = await self.reload(client)
        except CommandError as exc:
            log.error("reload on SIGHUP refused: %s", exc.message)
            return
        if reply.get("restart_required"):
            log.warning("reload: these changes need a restart and were not applied: %s",
                        ", ".join(reply["restart_required"]))

    # -- the one way a change is made ---------------------------------------------------

    async def _apply(self, command: str, client: str, change: Callable[[Runtime], Runtime],
                     *, always_audit: bool = False, extra: Changes | None = None) -> Reply:
        """Swap in ``change(current)``, then audit and persist it; after a weight change,
        return only once ownership has it in force (``_ownership_in_force``).

        Refused (``read_only``) while the state directory cannot be written: a change
        that would be lost at the next restart is not made. Nothing awaits between
        reading the current runtime and the swap, so the read-modify-write is atomic
        with respect to requests and to other commands.
        """
        why = await asyncio.to_thread(probe_writable, self.state.path.parent)
        if why is not None:
            raise CommandError("read_only", f"the state directory cannot be written ({why}); "
                               "runtime changes are refused until it can, so that none is "
                               "lost at the next restart")
        old = self.proxy.runtime
        new = change(old)
        changes = {**changes_between(old.describe(), new.describe()), **(extra or {})}
        reply: Reply = {"status": "ok", "changes": changes}
        if not changes and not always_audit:
            return reply
        self.proxy.store.swap(new)
        if changes:
            self.shim.metrics.admin_changes.labels(command).inc()
        self.audit.record(client, command, changes)
        try:
            await self.state.save(diff(self.base, new))
        except OSError as exc:
            log.error("change applied but not saved to %s: %s", self.state.path, exc.strerror)
            reply["warning"] = f"applied, but not saved to {self.state.path}: {exc.strerror}"
        if any(path.startswith("weights.") for path in changes):
            await self._ownership_in_force(reply)
        return reply

    # -- read-only commands ------------------------------------------------------------

    async def status(self, args: Args, client: str) -> Reply:
        proxy, rt = self.proxy, self.proxy.runtime
        described = rt.describe()
        reply: Reply = {
            "status": "ok",
            "mode": rt.mode,
            "weights": described["weights"],
            "shadow": described["shadow"],
            "safe_backend": self.file_cfg.routing.safe_backend,
            "backends": {
                name: {"dialect": b.dialect, "weight": rt.weights.get(name, 0.0),
                       "share": rt.table.share(name), "healthy": b.healthy,
                       "inflight": b.inflight}
                for name, b in proxy.pool.backends.items()
            },
            "actions": described["actions"],
            "inflight": proxy.inflight,
            "accepting": proxy.accepting,
            "counts": dict(proxy.counts),
            "overrides": diff(self.base, rt).summary(),
            "uptime_s": round(time.time() - self.shim.started, 3),
            "config_path": str(self.shim.config_path or ""),
        }
        if getattr(self.shim, "prober", None) is not None:  # no longer on the health socket
            reply["health"] = self.shim.describe_health()
        for addon, key in (("ownership", "ownership"), ("shadow", "shadow_activity"),
                           ("rollout", "rollout"), ("ejector", "ejection")):
            obj = getattr(self.shim, addon, None)
            if obj is not None and callable(getattr(obj, "describe", None)):
                reply[key] = obj.describe()
        return reply

    async def get_config(self, args: Args, client: str) -> Reply:
        rt = self.proxy.runtime
        return {
            "status": "ok",
            "config_path": str(self.shim.config_path or ""),
            "config": msgspec.to_builtins(self.file_cfg),
            "runtime": rt.describe(),
            "overrides": msgspec.to_builtins(diff(self.base, rt)),
            "restart_required": restart_required(self.shim.cfg, self.file_cfg),
        }

    # -- changes -----------------------------------------------------------------------

    async def set_weights(self, args: SetWeights, client: str) -> Reply:
        def change(rt: Runtime) -> Runtime:
            # Percentages: the backends not named share what is left of 100 %.
            weights = _complete(args.weights, rt.weights, self.backends)
            _check(check_weights, weights, set(self.backends))
            return _with_weights(rt, weights, self.backends)

        reply = await self._apply("set_weights", client, change)
        return {**reply, "weights": self.proxy.runtime.weights}

    async def set_mode(self, args: SetMode, client: str) -> Reply:
        reply = await self._apply("set_mode", client, lambda rt: rt.with_mode(args.mode))
        return {**reply, "mode": self.proxy.runtime.mode}

    async def set_shadow(self, args: SetShadow, client: str) -> Reply:
        settings = {f: getattr(args, f) for f in ("percent", "sticky", "max_inflight",
                                                  "timeout_ms") if getattr(args, f) is not None}
        if not settings and not args.mirror:
            raise CommandError("bad_request", "set_shadow: nothing to change (give percent, "
                               "sticky, max_inflight, timeout_ms or mirror)")
        _check(check_shadow, args.percent, args.max_inflight, args.timeout_ms)

        def change(rt: Runtime) -> Runtime:
            if settings:
                rt = rt.with_shadow(**settings)
            for action, policy in args.mirror.items():
                rule = msgspec.structs.replace(rt.overrides.get(action, ActionRule()),
                                               mirror=policy)
                _check(check_rule, action, rule, self.backends)
                self._check_ownership(action, rule)
                rt = rt.with_action(action, rule, self._default_timeout)
            return rt

        reply = await self._apply("set_shadow", client, change)
        return {**reply, "shadow": self.proxy.runtime.describe()["shadow"]}

    async def set_action(self, args: SetAction, client: str) -> Reply:
        action = args.action

        def change(rt: Runtime) -> Runtime:
            if args.reset:
                rule = self.base.overrides.get(action, ActionRule())
            else:
                fields = {f: getattr(args, f) for f in ("timeout_ms", "failover", "mirror",
                                                        "pin", "translate")
                          if getattr(args, f) is not UNSET}
                if not fields:
                    raise CommandError("bad_request", "set_action: nothing to change (give "
                                       "timeout_ms, failover, pin, translate, mirror or reset)")
                rule = msgspec.structs.replace(rt.overrides.get(action, ActionRule()), **fields)
            _check(check_rule, action, rule, self.backends)
            if not args.reset:
                self._check_ownership(action, rule)
            return rt.with_action(action, rule, self._default_timeout)

        reply = await self._apply("set_action", client, change)
        return {**reply, "action": action, "rule": self.proxy.runtime.describe()["actions"][action]}

    async def drain(self, args: Drain, client: str) -> Reply:
        """Weight to 0, then wait (bounded) until the backend's requests have finished."""
        name = args.backend
        backend = self.proxy.pool.backends.get(name)
        if backend is None:
            raise CommandError("invalid", f"unknown backend {name!r} "
                               f"(expected one of {', '.join(self.backends)})")
        if not 0 <= args.timeout_s <= MAX_DRAIN_S:
            raise CommandError("invalid", f"timeout_s must be within 0..{MAX_DRAIN_S:g}")

        def change(rt: Runtime) -> Runtime:
            weights = {**rt.weights, name: 0.0}
            others = [n for n in weights if n != name]
            if not others:
                raise CommandError("refused", f"{name} is the only backend: nothing to drain to")
            if not any(weights[n] > 0 for n in others):  # nobody else had traffic: share it
                weights.update({n: round(100 / len(others), 2) for n in others})
            return _with_weights(rt, weights, self.backends)

        inflight_at_start = backend.inflight
        started = time.monotonic()
        reply = await self._apply("drain", client, change)
        while backend.inflight and time.monotonic() - started < args.timeout_s:
            await asyncio.sleep(0.02)
        remaining = backend.inflight
        reply.update(backend=name, inflight_at_start=inflight_at_start, remaining=remaining,
                     waited_s=round(time.monotonic() - started, 3),
                     weights=self.proxy.runtime.weights)
        rt = self.proxy.runtime
        warnings = []
        pinned = sorted(a for a, r in rt.rules.items() if r.pin == name)
        if pinned:
            warnings.append(f"actions pinned to {name} still go there: {', '.join(pinned)}")
        if rt.mode == "shadow":
            warnings.append(f"mode is shadow: copies of requests still go to {name}")
        if warnings:
            reply["warning"] = "; ".join(warnings)
        if remaining:
            raise CommandError("drain_timeout", f"{name}: {remaining} of {inflight_at_start} "
                               f"requests still in flight after {args.timeout_s:g} s "
                               "(its weight stays 0)", **reply)
        return reply

    async def rollback(self, args: Args, client: str) -> Reply:
        """One step back to the configured safe state: all traffic to the safe backend."""
        safe = self.file_cfg.routing.safe_backend

        def change(rt: Runtime) -> Runtime:
            weights = {n: 100.0 if n == safe else 0.0 for n in self.backends}
            rt = _with_weights(rt, weights, self.backends).with_mode("split")
            for action, rule in rt.overrides.items():  # run-time pins elsewhere go too
                configured = self.base.overrides.get(action, ActionRule())
                if rule.pin and rule.pin != safe and rule != configured:
                    rt = rt.with_action(action, configured, self._default_timeout)
            return rt

        reply = await self._apply("rollback", client, change)
        rt = self.proxy.runtime
        reply.update(safe_backend=safe, weights=rt.weights, mode=rt.mode)
        pinned = sorted(a for a, r in rt.rules.items() if r.pin and r.pin != safe)
        if pinned:
            reply["warning"] = ("the config file pins these actions to another backend: "
                                + ", ".join(pinned))
        return reply

    async def release(self, args: Release, client: str) -> Reply:
        """``ctl release MODEL [--from B]``: forget a model's owner (audited).

        For an owner the operator knows is gone (or has unloaded the model by hand)
        while it does not answer: until then the shim keeps the model with it.
        """
        own = getattr(self.shim, "ownership", None)
        if own is None:
            raise CommandError("refused", "ownership is disabled: there is nothing to release")
        if args.from_backend is not None and args.from_backend not in self.backends:
            raise CommandError("invalid", f"unknown backend {args.from_backend!r} "
                               f"(expected one of {', '.join(self.backends)})")
        owner = own.release(args.model, args.from_backend)
        if owner is None:
            current = own.owner.get(args.model)
            raise CommandError("refused", f"model {args.model!r} is "
                               + (f"owned by {current}, not {args.from_backend}" if current
                                  else "not owned by any backend") + "; nothing released")
        changes: dict[str, list[Any]] = {f"ownership.owners.{args.model}": [owner, None]}
        self.shim.metrics.admin_changes.labels("release").inc()
        self.audit.record(client, "release", changes, {"model": args.model, "owner": owner})
        return {"status": "ok", "model": args.model, "released_from": owner,
                "changes": changes}

    def _check_ownership(self, action: str, rule: ActionRule) -> None:
        """With ownership on, refuse rules that would break "one owner per model": a pin
        of an action bound to a model, and ``mirror=always`` for an action that may load."""
        if getattr(self.shim, "ownership", None) is None:
            return
        if rule.pin and action in MODEL_BOUND_ACTIONS:
            raise CommandError("refused", f"actions.{action}.pin: {action} requests go to "
                               "the owner of their model (rule: one owner per model); a pin "
                               "would load models on " + rule.pin)
        if rule.mirror == "always" and action in LOADING_ACTIONS:
            raise CommandError("refused", f"actions.{action}.mirror=always: a mirrored "
                               f"{action} could load a model on the shadow backend (rule: "
                               "one owner per model); use if_loaded")

    async def _ownership_in_force(self, reply: Reply) -> None:
        """After a weight change: moves the new weights undo are cancelled and the ones
        past their unload are finished (bounded), so the change is in force on return."""
        own = getattr(self.shim, "ownership", None)
        if own is not None:
            reply["ownership"] = await own.weights_changed(self.proxy.runtime)

    async def reload_command(self, args: Reload, client: str) -> Reply:
        return await self.reload(client, reset=args.reset)

    async def reload(self, client: str, *, reset: bool = False) -> Reply:
        """Re-read the config file and apply what can change at run time.

        An invalid file changes nothing. Parts the file changed replace the running ones;
        run-time changes to the other parts are kept (``reset`` drops them too). Changes
        that need a restart (endpoints, backends, ...) are listed, not applied.
        """
        path = self.shim.config_path
        if path is None:
            raise CommandError("refused", "the shim was started without a config file")
        try:
            new_cfg = load_config(path)
            new_base = self._base_for(new_cfg)
        except (ConfigError, StateError) as exc:
            log.error("reload of %s refused, nothing changed: %s", path, exc)
            raise CommandError("invalid_config", f"{exc}; nothing was changed") from None
        old_base = self.base
        policy_changes = changes_between({"policy": dict(self.proxy.runtime.policy)},
                                         {"policy": new_cfg.policy})

        def change(rt: Runtime) -> Runtime:
            kept = RuntimeState() if reset else rebase(diff(old_base, rt), old_base, new_base)
            try:
                new = apply(new_base, kept, self.backends, new_cfg.shim.default_timeout_ms)
            except StateError as exc:
                raise CommandError("invalid_config", f"{exc}; nothing was changed") from None
            # Still without yielding: the new base switches with the Runtime, which
            # carries the policy and the compare rules (one swap).
            self.file_cfg, self._base = new_cfg, new_base
            shadow = getattr(self.shim, "shadow", None)
            if shadow is not None:  # its compare rules and diff log
                shadow.reload(new_cfg.shadow)
            return new

        reply = await self._apply("reload", client, change, always_audit=True,
                                  extra=policy_changes)
        reply.update(config_path=str(path),
                     restart_required=restart_required(self.shim.cfg, new_cfg),
                     kept_overrides=diff(self.base, self.proxy.runtime).summary())
        return reply

    # -- helpers -----------------------------------------------------------------------

    @property
    def _default_timeout(self) -> int:
        return self.file_cfg.shim.default_timeout_ms

    def _base_for(self, cfg: ShimConfig) -> Runtime:
        """``runtime_from_config`` for the backends that are running.

        Backends added to the file need a restart; until then their weight is ignored, and
        a file that would leave the running backends without traffic is refused.
        """
        running = self.backends
        weights = {n: cfg.routing.weights.get(n, 0.0) for n in running}
        if not any(w > 0 for w in weights.values()):
            raise StateError("routing.weights give no running backend any traffic "
                             "(new backends need a restart)")
        if cfg.routing.safe_backend not in running:
            raise StateError(f"routing.safe_backend {cfg.routing.safe_backend!r} is not "
                             "running (new backends need a restart)")
        for action, rule in cfg.actions.items():
            if rule.pin and rule.pin not in running:
                raise StateError(f"actions.{action}.pin {rule.pin!r} is not running "
                                 "(new backends need a restart)")
        return _with_weights(runtime_from_config(cfg), weights, running)


def _with_weights(rt: Runtime, weights: dict[str, float], order: Collection[str]) -> Runtime:
    """New weights, keyed in the running backends' order (which fixes the buckets)."""
    return replace(rt, table=RoutingTable({n: float(weights.get(n, 0.0)) for n in order}))


def _complete(given: dict[str, float], current: dict[str, float],
              order: list[str]) -> dict[str, float]:
    try:
        return complete_weights(given, current, order)
    except ValueError as exc:
        raise CommandError("invalid", str(exc)) from None


def _check(check: Callable[..., None], *args: Any) -> None:
    """Run a validator from shim.config/shim.state; its ValueError becomes a refusal."""
    try:
        check(*args)
    except ValueError as exc:
        raise CommandError("invalid", str(exc)) from None


def restart_required(running: ShimConfig, new: ShimConfig) -> list[str]:
    """Config paths that differ and that only a restart applies."""
    changed = changes_between(msgspec.to_builtins(running), msgspec.to_builtins(new))
    return sorted(p for p in changed
                  if not any(p == r or p.startswith(r + ".") for r in RUNTIME_PATHS))


def state_dir(cfg: ShimConfig) -> Path:
    """Where the state file, the audit file and a generated admin token live."""
    return Path(cfg.shim.state_file).parent

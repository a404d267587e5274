"""Runtime state that outlives the process: what the admin socket changed, on disk.

The state file holds only what differs from the config file (weights, mode, shadow
settings, per-action rules), so a config edit to a part nobody overrode still takes
effect on the next start. It is written atomically (temporary file, fsync, rename,
fsync of the directory): after a crash the file is the old state or the new one,
never half of each.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
import time
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec

from shim.config import STATEFUL_ACTIONS, check_weights
from shim.errors import StateError
from shim.runtime import Runtime, resolve_rules
from shim.settings import ACTIONS, ActionRule, Mode, ShadowSettings, check_values, partial

STATE_VERSION = 1




#: Shadow settings that differ from the config; ``None`` means "as configured". Derived
#: from shim.settings.ShadowSettings: a new shadow knob is saved without an edit here.
ShadowOverride = partial(ShadowSettings, "ShadowOverride", bases=(msgspec.Struct,))


class RuntimeState(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True,
                   kw_only=True):
    """The differences between the running Runtime and the one the config file gives."""

    version: int = STATE_VERSION
    saved_at: float = 0.0
    mode: Mode | None = None
    weights: dict[str, float] | None = None
    shadow: ShadowOverride = msgspec.field(  # type: ignore[valid-type]
        default_factory=ShadowOverride)
    #: Whole rules for the actions whose rule differs from the config's.
    actions: dict[str, ActionRule] = msgspec.field(default_factory=dict)

    def is_empty(self) -> bool:
        return (self.mode is None and self.weights is None and not self.actions
                and self.shadow == ShadowOverride())

    def summary(self) -> list[str]:
        """Which parts are overridden, for status replies and log lines."""
        parts = [name for name in ("mode", "weights") if getattr(self, name) is not None]
        parts += [f"shadow.{f}" for f in ShadowOverride.__struct_fields__
                  if getattr(self.shadow, f) is not None]
        parts += [f"actions.{a}" for a in self.actions]
        return parts


_SHADOW_FIELDS = ShadowOverride.__struct_fields__


# -- Runtime <-> state -----------------------------------------------------------------

def diff(base: Runtime, current: Runtime) -> RuntimeState:
    """What ``current`` changed relative to ``base`` (the config file's Runtime)."""
    shadow = ShadowOverride(**{f: getattr(current.shadow, f) for f in _SHADOW_FIELDS
                               if getattr(current.shadow, f) != getattr(base.shadow, f)})
    actions = {a: current.overrides.get(a, ActionRule())
               for a in {*base.overrides, *current.overrides}
               if current.overrides.get(a, ActionRule()) != base.overrides.get(a, ActionRule())}
    return RuntimeState(
        mode=current.mode if current.mode != base.mode else None,
        weights=dict(current.weights) if current.weights != base.weights else None,
        shadow=shadow,
        actions=dict(sorted(actions.items())),
    )


def apply(base: Runtime, state: RuntimeState, backends: Collection[str],
          default_timeout_ms: int) -> Runtime:
    """``base`` with the state's overrides on top; StateError if they do not fit."""
    check_state(state, backends)
    rt = base
    if state.mode is not None:
        rt = rt.with_mode(state.mode)
    if state.weights is not None:
        # Keep the running backends' order (it fixes the bucket layout).
        rt = rt.with_weights(state.weights, backends)
    changes = {f: getattr(state.shadow, f) for f in _SHADOW_FIELDS
               if getattr(state.shadow, f) is not None}
    if changes:
        rt = rt.with_shadow(**changes)
    if state.actions:
        overrides = {**rt.overrides, **state.actions}
        rt = replace(rt, overrides=overrides, rules=resolve_rules(overrides, default_timeout_ms))
    return rt


def rebase(state: RuntimeState, old_base: Runtime, new_base: Runtime) -> RuntimeState:
    """Drop the overrides of every part the config file itself changed.

    A reload then applies what was edited in the file and keeps the operator's run-time
    changes to everything else (a SIGHUP for an unrelated edit must not undo a cutover).
    """
    return RuntimeState(
        mode=state.mode if old_base.mode == new_base.mode else None,
        weights=state.weights if old_base.weights == new_base.weights else None,
        shadow=ShadowOverride(**{
            f: getattr(state.shadow, f) for f in _SHADOW_FIELDS
            if getattr(old_base.shadow, f) == getattr(new_base.shadow, f)}),
        actions={a: rule for a, rule in state.actions.items()
                 if old_base.overrides.get(a, ActionRule())
                 == new_base.overrides.get(a, ActionRule())},
    )


def check_state(state: RuntimeState, backends: Collection[str]) -> None:
    """The checks a config file gets, for the overridden parts."""
    names = set(backends)
    try:
        if state.weights is not None:
            check_weights(state.weights, names, "state", "weights")
    except ValueError as exc:
        raise StateError(str(exc)) from None
    check_shadow(msgspec.to_builtins(state.shadow))
    for action, rule in state.actions.items():
        check_rule(action, rule, names)


def check_shadow(values: dict[str, Any]) -> None:
    """Some shadow settings (field -> value) against ShadowSettings' ``Meta`` ranges."""
    try:
        check_values(values, ShadowSettings, "shadow")
    except ValueError as exc:
        raise StateError(str(exc)) from None


def check_rule(action: str, rule: ActionRule, backends: Collection[str]) -> None:
    """A per-action rule names a known action and backend, and keeps state changes safe."""
    if action not in ACTIONS:
        raise StateError(f"unknown action {action!r} (expected one of {', '.join(ACTIONS)})")
    if rule.pin and rule.pin not in backends:
        raise StateError(f"actions.{action}.pin: unknown backend {rule.pin!r}")
    try:
        check_values(msgspec.to_builtins(rule), ActionRule, f"actions.{action}")
    except ValueError as exc:
        raise StateError(str(exc)) from None
    if action in STATEFUL_ACTIONS and rule.mirror not in (None, "never"):
        # Design invariant 3: a load or unload reaches one backend, once.
        raise StateError(f"actions.{action}.mirror: {action} changes a backend's state "
                         "and is never mirrored")


# -- the file --------------------------------------------------------------------------

def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new one.

    The file is owner-only (0600) unless ``mode`` says otherwise; a directory made for it
    is 0700. A crash can leave the temporary ``.NAME.*.tmp`` behind: ``clean_stale``.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself is only durable once the directory entry is.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def clean_stale(directory: Path) -> list[Path]:
    """Remove the temporary files that an interrupted ``atomic_write`` left in
    ``directory`` (``.NAME.XXXXXXXX.tmp``); returns those removed. Call before anything
    writes there (at start)."""
    removed: list[Path] = []
    try:
        candidates = list(directory.glob(".*.tmp"))
    except OSError:
        return removed
    for tmp in candidates:
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def probe_writable(directory: Path) -> str | None:
    """None when a file can be written, flushed and renamed in ``directory``; otherwise
    why not (read-only file system, no permission, disk full)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".mmshim-probe.", suffix=".tmp", dir=directory)
        try:  # a unique name: commands probe concurrently
            os.write(fd, b"x" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        return f"{directory}: {exc.strerror or exc}"
    return None


def encode_state(state: RuntimeState) -> bytes:
    """Indented JSON with the version first and only the overridden parts."""
    raw = msgspec.to_builtins(state)  # omit_defaults: unset parts are left out
    if not raw.get("shadow"):
        raw.pop("shadow", None)
    raw = {"version": state.version, **raw}
    return msgspec.json.format(msgspec.json.encode(raw), indent=2) + b"\n"


def decode_state(data: bytes, source: str = "<state>") -> RuntimeState:
    try:
        state = msgspec.json.decode(data, type=RuntimeState)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise StateError(f"{source}: {exc}") from None
    if state.version != STATE_VERSION:
        raise StateError(f"{source}: version {state.version}, expected {STATE_VERSION}")
    return state


class StateFile:
    """The state file: read once at start, rewritten after every change.

    Writes run in a worker thread so an fsync never stalls the data path, and they
    coalesce: a burst of changes costs a few writes, and the last write is always of the
    latest state.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._latest = RuntimeState()
        self._wanted = 0  # generation of the latest state handed to save()
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    def load(self) -> RuntimeState | None:
        """The saved state, None when there is none; StateError when it is unreadable."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"{self.path}: cannot read: {exc.strerror}") from None
        return decode_state(data, str(self.path))

    def write(self, state: RuntimeState) -> None:
        """Write now, in the calling thread."""
        atomic_write(self.path, encode_state(replace_saved_at(state)))

    async def save(self, state: RuntimeState) -> None:
        """Persist ``state``; returns once a write of it (or of a newer one) is durable.

        Raises OSError when that write failed (the change stays applied in memory).
        """
        self._wanted += 1
        self._latest = state
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._wanted, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())
        await done

    async def flush(self) -> None:
        """Wait for the writes already asked for (at shutdown)."""
        if self._writer is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._writer)

    async def _write_pending(self) -> None:
        written = 0
        while written < self._wanted:
            generation, state = self._wanted, self._latest
            error: OSError | None = None
            try:
                await asyncio.to_thread(self.write, state)
            except OSError as exc:
                error = exc
            written = generation
            still_waiting = []
            for gen, fut in self._waiters:
                if gen > written:
                    still_waiting.append((gen, fut))
                elif not fut.done():
                    if error is None:
                        fut.set_result(None)
                    else:
                        fut.set_exception(error)
            self._waiters = still_waiting


def replace_saved_at(state: RuntimeState) -> RuntimeState:
    return msgspec.structs.replace(state, saved_at=round(time.time(), 3))

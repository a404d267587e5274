"""The addon contract: optional hooks, every call guarded, one flow object per request.

Modelled on mitmproxy's addons: the proxy core moves requests; ownership, shadowing,
recording, metrics and the rollout engine plug in here. An addon subclasses ``Addon`` and
overrides only the hooks it needs; ``AddonManager`` calls them in registration order.

Guarding (design.md, "Target layout"): a hook that raises a ``RequestError`` answers the
request on purpose (e.g. ownership refusing a load elsewhere); any other exception is
logged, counted in ``shim_addon_errors_total{addon,hook}``, and the hook is treated as if
it had done nothing, so a failing addon never changes what the client gets.

Data-path hooks, in the order a request meets them::

    admit(flow)                -> Awaitable | None   hold the request back (hand-over)
    route(flow, candidates)    -> list[str]          reorder or narrow the backends
    before_send(flow, backend) -> Awaitable | None   wait before the request goes out
    after_send(flow, backend)                        one attempt ended (flow.result set
                                                     when it produced a reply)
    after_reply(flow)                                the client has its one reply

Control-plane hooks (called by ``shim.control``, never on the data path)::

    start() / stop()           -> Awaitable | None   lifecycle, with the shim
    commands()                 -> {name: handler}    read-only admin commands it offers
    describe()                 -> dict               its part of ``status``
    runtime_changed(old, new)  -> Awaitable | None   a new Runtime is in force; the admin
                                                     command returns once it completes
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from shim.errors import RequestError

if TYPE_CHECKING:
    from shim.dialects.ops import Op, Result
    from shim.runtime import Runtime

log = logging.getLogger("mmshim.addons")

A = TypeVar("A", bound="Addon")

#: A read-only admin command an addon offers: raw arguments in, reply fields out.
CommandHandler = Callable[[dict[str, Any]], "dict[str, Any] | Awaitable[dict[str, Any]]"]


class Flow:
    """One request on its way through the shim, decoded once and shared by every hook.

    ``body``: the payload frames as received; ``msg``: the decoded JSON (None when not
    one JSON object); ``op``: the parsed operation (None for opaque requests); ``rt``:
    the Runtime the request was routed with; ``deadline``: ``time.perf_counter()``
    seconds by which the client must have its reply. ``backend`` is the backend of the
    last attempt; ``answer`` the caller-dialect reply bytes of the last attempt (None
    when it failed); ``result`` the decoded Result of the last attempt when its reply
    was translated (None for a passed-through reply: never decoded on the hot path);
    ``reply`` the reply frames the client got (set before ``after_reply``).

    Set before ``after_reply``: ``action`` (the operation kind's value, ``"opaque"`` or
    ``"unknown"``), ``outcome`` (``"ok"`` or the ``SHIM_*`` code of the shim's error
    reply), ``served_by`` (the metrics label: a backend, ``"shim"``, ``"merged"``,
    ``"joined"`` or ``"none"``) and ``exchanged`` (True when the client's reply is
    ``backend``'s answer to ``op``: what shadow and recording look at).
    """

    __slots__ = ("action", "answer", "backend", "body", "bucket", "deadline", "exchanged",
                 "msg", "op", "outcome", "reply", "result", "rt", "sent_at", "served_by",
                 "started")

    def __init__(self, body: list[bytes], msg: object, op: Op | None, rt: Runtime,
                 started: float, deadline: float) -> None:
        self.body = body
        self.msg = msg
        self.op = op
        self.rt = rt
        self.started = started
        self.deadline = deadline
        self.backend: str | None = None
        self.result: Result | None = None
        self.answer: bytes | None = None
        #: ``time.perf_counter()`` when the last attempt started (0.0: none yet).
        self.sent_at = 0.0
        self.reply: list[bytes] | None = None
        self.action = "unknown"
        self.outcome = "ok"
        self.served_by = "none"
        self.exchanged = False
        #: The routing bucket drawn for it already (the compiled core's draw, handed up
        #: with the request: shim.fastpath), or -1: routing draws one if it needs one.
        self.bucket = -1

    @property
    def request(self) -> bytes:
        """The payload as received (the first body frame)."""
        return self.body[0] if self.body else b""

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started


class Addon:
    """Base class: every hook is optional and does nothing here. ``name`` labels the
    addon in metrics, logs and ``status``."""

    name = "addon"

    # -- data path ------------------------------------------------------------------
    def admit(self, flow: Flow) -> Awaitable[Any] | None:
        return None

    def route(self, flow: Flow, candidates: list[str]) -> list[str]:
        return candidates

    def before_send(self, flow: Flow, backend: str) -> Awaitable[Any] | None:
        return None

    def after_send(self, flow: Flow, backend: str) -> None:
        return None

    def after_reply(self, flow: Flow) -> None:
        return None

    # -- control plane --------------------------------------------------------------
    def start(self) -> Awaitable[None] | None:
        return None

    def stop(self) -> Awaitable[None] | None:
        return None

    def commands(self) -> dict[str, CommandHandler]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {}

    def runtime_changed(self, old: Runtime, new: Runtime) -> Awaitable[Any] | None:
        return None


_NO_WAITS: list[Awaitable[Any]] = []  # shared, never appended to

#: Hook names a subclass may override (used to skip addons that do not).
HOOKS = ("admit", "route", "before_send", "after_send", "after_reply")


class AddonManager:
    """The addons of one shim, in order, with every hook call guarded.

    ``on_error(addon_name, hook)`` is called for each swallowed exception (the metrics
    counter); the proxy calls the data-path methods, the control plane the others.
    """

    def __init__(self, on_error: Callable[[str, str], None] | None = None) -> None:
        self._addons: list[Addon] = []
        self._on_error = on_error
        #: Per hook, the addons that override it (so a request skips the no-ops).
        self._by_hook: dict[str, list[Addon]] = {h: [] for h in HOOKS}

    def add(self, addon: Addon) -> None:
        self._addons.append(addon)
        for hook in HOOKS:
            if getattr(type(addon), hook) is not getattr(Addon, hook):
                self._by_hook[hook].append(addon)

    def __iter__(self) -> Iterator[Addon]:
        return iter(self._addons)

    def get(self, kind: type[A]) -> A | None:
        """The first addon of type ``kind``, or None."""
        return next((a for a in self._addons if isinstance(a, kind)), None)

    def wants(self, hook: str) -> bool:
        """Whether any addon overrides the data-path ``hook`` (lets the proxy skip it)."""
        return bool(self._by_hook[hook])

    def __len__(self) -> int:
        return len(self._addons)

    def _failed(self, addon: Addon, hook: str) -> None:
        log.exception("addon %s failed in %s; ignored", addon.name, hook)
        if self._on_error is not None:
            self._on_error(addon.name, hook)

    # -- data path (called by the proxy) ------------------------------------------------
    def admit(self, flow: Flow) -> Awaitable[Any] | None:
        """The first wait an addon asks for, or None when every addon admits the flow."""
        for addon in self._by_hook["admit"]:
            try:
                waiting = addon.admit(flow)
            except RequestError:
                raise
            except Exception:
                self._failed(addon, "admit")
                continue
            if waiting is not None:
                return waiting
        return None

    def route(self, flow: Flow, candidates: list[str]) -> list[str]:
        """Each addon may reorder or narrow the candidates, never add one: a backend it
        names that is not a candidate is dropped, and an empty answer changes nothing."""
        for addon in self._by_hook["route"]:
            try:
                routed = addon.route(flow, list(candidates))
            except RequestError:
                raise
            except Exception:
                self._failed(addon, "route")
                continue
            candidates = [c for c in routed if c in candidates] or candidates
        return candidates

    def before_send(self, flow: Flow, backend: str) -> list[Awaitable[Any]]:
        hooked = self._by_hook["before_send"]
        if not hooked:
            return _NO_WAITS
        waits = []
        for addon in hooked:
            try:
                waiting = addon.before_send(flow, backend)
            except RequestError:
                raise
            except Exception:
                self._failed(addon, "before_send")
                continue
            if waiting is not None:
                waits.append(waiting)
        return waits

    def after_send(self, flow: Flow, backend: str) -> None:
        for addon in self._by_hook["after_send"]:
            try:
                addon.after_send(flow, backend)
            except Exception:
                self._failed(addon, "after_send")

    def after_reply(self, flow: Flow) -> None:
        for addon in self._by_hook["after_reply"]:
            try:
                addon.after_reply(flow)
            except Exception:
                self._failed(addon, "after_reply")

    # -- control plane ------------------------------------------------------------------
    async def start(self) -> None:
        for addon in self._addons:
            await _maybe(addon.start())

    async def stop(self) -> None:
        """Stop every addon, last first; one that fails to stop does not stop the rest."""
        for addon in reversed(self._addons):
            try:
                await _maybe(addon.stop())
            except Exception:
                self._failed(addon, "stop")

    def commands(self) -> dict[str, CommandHandler]:
        offered: dict[str, CommandHandler] = {}
        for addon in self._addons:
            for name, handler in addon.commands().items():
                offered.setdefault(name, handler)
        return offered

    def describe(self) -> dict[str, dict[str, Any]]:
        """``{addon.name: addon.describe()}`` for the addons that describe something."""
        out: dict[str, dict[str, Any]] = {}
        for addon in self._addons:
            try:
                described = addon.describe()
            except Exception:
                self._failed(addon, "describe")
                continue
            if described:
                out[addon.name] = described
        return out

    async def runtime_changed(self, old: Runtime, new: Runtime) -> dict[str, Any]:
        """Tell every addon; returns ``{addon.name: what it reported}`` for the reply."""
        reports: dict[str, Any] = {}
        for addon in self._addons:
            try:
                report = await _maybe(addon.runtime_changed(old, new))
            except Exception:
                self._failed(addon, "runtime_changed")
                continue
            if report:
                reports[addon.name] = report
        return reports


async def _maybe(result: Any) -> Any:
    if inspect.isawaitable(result):
        return await result
    return result


__all__ = ["Addon", "AddonManager", "CommandHandler", "Flow"]

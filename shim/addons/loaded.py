"""The one poller of loaded models: what each backend says it has loaded, and its VRAM.

Ownership (who owns what, duplicates) and shadow (``if_loaded`` mirroring) both read
this one cache; neither polls on its own. Each poll asks every backend for its loaded
models (``GET_LOADED_MODELS_STATUS`` as a canonical operation, shim.transport) in its
own dialect. A backend that does not answer tells nothing: it is left out of that
poll's views, and ``loaded`` drops it (nothing counts as loaded there until it answers).

Listeners (``PollListener``; ownership is one) are told before each poll starts and
given the views once it is in, so they can compare against what they knew before.
The poller runs every ``interval_s`` while ``active()`` says so (ownership on, or the
runtime in shadow mode); ``refresh`` asks one backend now (a hand-over's check).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from shim.addons.base import Addon
from shim.dialects.ops import Kind
from shim.errors import BackendError, Unsupported
from shim.metrics import Metrics
from shim.transport import TransportLike, internal_op

log = logging.getLogger("mmshim.loaded")

#: Backend name -> the models it reported, for one poll (backends that answered).
Views = dict[str, set[str]]


class PollListener(Protocol):
    """Told of every poll: ``before_poll`` just before it starts, ``after_poll`` with
    the views of the backends that answered."""

    def before_poll(self) -> None: ...

    async def after_poll(self, views: Views) -> None: ...


class LoadedModels(Addon):
    """The shared poller (an addon only for its lifecycle: started and stopped with the
    shim; it has no data-path hook)."""

    name = "loaded"

    def __init__(self, transport: TransportLike, interval_s: float, *,
                 active: Callable[[], bool] = lambda: True,
                 metrics: Metrics | None = None, first_poll_s: float = 2.0) -> None:
        self._transport = transport
        self.interval_s = interval_s
        self._active = active
        self._metrics = metrics
        self._first_poll_s = first_poll_s
        #: What each backend said it had loaded at its last answer.
        self.loaded: dict[str, set[str]] = {}
        #: (used MB, budget MB) per backend, from the same replies.
        self.vram: dict[str, tuple[float | None, float | None]] = {}
        self.polls = 0
        self._listeners: list[PollListener] = []
        self._task: asyncio.Task[None] | None = None

    def listen(self, listener: PollListener) -> None:
        self._listeners.append(listener)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """One poll before traffic (bounded), then the loop."""
        if self._active():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.poll_once(), self._first_poll_s)
        self._task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            if not self._active():
                continue
            try:
                await self.poll_once()
            except Exception:  # the poller must outlive any one bad reply
                log.exception("loaded-models poll failed")

    # -- polling -----------------------------------------------------------------------

    def _timeout(self, backend: str) -> float:
        return min(self._transport.backends[backend].config.timeout_ms / 1000, 5.0)

    async def refresh(self, backend: str) -> set[str] | None:
        """Ask ``backend`` now; its loaded models, or None when it did not say."""
        try:
            result = await self._transport.call(backend, internal_op(Kind.LOADED_STATUS),
                                                self._timeout(backend))
        except (BackendError, Unsupported):
            return None
        if not result.ok or result.loaded_models is None:
            return None
        models = set(result.loaded_models)
        self.loaded[backend] = models
        used, budget = result.vram_used_mb, result.vram_budget_mb
        self.vram[backend] = (None if used is None else float(used),
                              None if budget is None else float(budget))
        if self._metrics is not None:
            if used is not None:
                self._metrics.vram_used.labels(backend).set(used)
            if budget is not None:
                self._metrics.vram_budget.labels(backend).set(budget)
        return set(models)

    async def poll_once(self) -> Views:
        """Ask every backend; tell the listeners. Returns the views of those that
        answered (the others are dropped from ``loaded``)."""
        for listener in self._listeners:
            listener.before_poll()
        names = list(self._transport.backends)
        answers = await asyncio.gather(*(self.refresh(n) for n in names))
        views: Views = {}
        for name, models in zip(names, answers, strict=True):
            if models is None:
                self.loaded.pop(name, None)
            else:
                views[name] = models
        self.polls += 1
        for listener in self._listeners:
            await listener.after_poll(views)
        return views


__all__ = ["LoadedModels", "PollListener", "Views"]

"""One owner per model: the shim decides which backend holds which model.

Two model managers on one GPU, each with its own ledger, must never both load a model.
So requests that name a model (generate, load, unload, model access) go to the model's
owner while it is loaded there, whatever the weights say. Each model also has a desired
backend: its name hashed to a routing bucket, so a weight sweep moves models one at a
time as the bucket boundary passes them. When owner and desired backend differ, the
model is handed over: new requests for it wait (bounded by their deadline), requests in
flight on the old owner finish, the old owner unloads it, and only then does traffic go
to the new owner, which loads it on demand.

The table is learned from replies and refreshed by polling each backend's loaded models.
A model seen loaded on two backends (confirmed by a second look, so that a hand-over
between two polls is not mistaken for one) is counted, logged and, with
``ownership.repair``, unloaded from the backend that is not its owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from shim.config import OwnershipSection
from shim.dialects import Kind, Op
from shim.pool import BackendError
from shim.routing import bucket_of
from shim.runtime import Runtime

if TYPE_CHECKING:
    from shim.proxy import Proxy

log = logging.getLogger("mmshim.ownership")

#: Operations whose target is decided by the model they name.
MODEL_KINDS = frozenset({Kind.GENERATE, Kind.LOAD, Kind.UNLOAD, Kind.MODEL_ACCESS})
_OK = frozenset({"ok", "SUCCESS", "MODEL_READY", "success"})


@dataclass(slots=True)
class Move:
    """A hand-over in progress: requests for the model wait on ``done``."""

    source: str
    target: str
    done: asyncio.Event


class Ownership:
    """The model -> backend table, its hand-overs and its duplicate detection (an addon)."""

    def __init__(self, proxy: Proxy, cfg: OwnershipSection) -> None:
        self._proxy = proxy
        self._cfg = cfg
        self.owner: dict[str, str] = {}
        self.moves: dict[str, Move] = {}
        self.vram: dict[str, tuple[float | None, float | None]] = {}
        #: What each backend said it had loaded at the last poll.
        self.loaded: dict[str, set[str]] = {}
        self.duplicates_seen = 0
        self._inflight: Counter[tuple[str, str]] = Counter()
        self._changed: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None

    # -- lifecycle (started and stopped with the shim) ------------------------------

    def start(self) -> None:
        self._poller = asyncio.create_task(self._poll_forever())

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._poller] if self._poller else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def describe(self) -> dict[str, Any]:
        return {"owners": dict(sorted(self.owner.items())),
                "moving": {m: f"{mv.source}->{mv.target}" for m, mv in self.moves.items()},
                "duplicates_seen": self.duplicates_seen}

    # -- the addon hooks -------------------------------------------------------------

    def desired(self, model: str, rt: Runtime) -> str:
        """Where the weights say ``model`` should live."""
        return rt.table.backend_for(bucket_of("model:" + model))

    def route(self, op: Op, candidates: list[str], rt: Runtime) -> list[str]:
        model = op.model_id if op.kind in MODEL_KINDS else None
        if not model:
            return candidates
        move = self.moves.get(model)
        if move is not None:
            return [move.target]
        backends = self._proxy.pool.backends
        want = self.desired(model, rt)
        owner = self.owner.get(model)
        if owner is not None and backends[owner].healthy:
            if owner == want or op.kind is Kind.UNLOAD or not backends[want].healthy:
                return [owner]
            self._start_move(model, owner, want)
            return [want]
        # No live owner (a dead owner's models died with it): the weights decide.
        if not backends[want].healthy:
            want = next((c for c in candidates if backends[c].healthy), want)
        if op.kind is not Kind.UNLOAD:
            # Claimed now, not when the reply comes: a second request for the model
            # arriving meanwhile must not load it somewhere else.
            self._set_owner(model, want)
        return [want]

    def before_send(self, op: Op, backend: str) -> asyncio.Future[Any] | None:
        model = op.model_id if op.kind in MODEL_KINDS else None
        if not model:
            return None
        self._inflight[(model, backend)] += 1
        move = self.moves.get(model)
        if move is not None and move.target == backend:
            return asyncio.ensure_future(move.done.wait())
        return None

    def after_send(self, op: Op, backend: str, reply: bytes | None) -> None:
        model = op.model_id if op.kind in MODEL_KINDS else None
        if not model:
            return
        key = (model, backend)
        self._inflight[key] -= 1
        if self._inflight[key] <= 0:
            del self._inflight[key]
        if reply is None or model in self.moves:
            return
        if op.kind is Kind.UNLOAD:
            if self.owner.get(model) == backend and _succeeded(reply):
                self._set_owner(model, None)
        elif self.owner.get(model) != backend and _succeeded(reply):
            self._set_owner(model, backend)

    def after_reply(self, op: Op, backend: str, request: bytes, reply: bytes,
                    rt: Runtime) -> None:
        return None

    # -- hand-over -------------------------------------------------------------------

    def _start_move(self, model: str, source: str, target: str) -> None:
        self.moves[model] = Move(source, target, asyncio.Event())
        task = asyncio.create_task(self._move(model))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _move(self, model: str) -> None:
        move = self.moves[model]
        deadline = time.monotonic() + self._cfg.handover_timeout_ms / 1000
        try:
            while self._inflight.get((model, move.source)) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            remaining = max(0.05, deadline - time.monotonic())
            result = await self._proxy.call(
                move.source, {"command": "UNLOAD_MODEL", "model_name": model}, remaining)
            if not result.ok and await self._still_loaded(move.source, model):
                log.error("hand-over of %s: %s did not unload it (%s); it stays there",
                          model, move.source, result.message)
                return
            self._set_owner(model, None)  # the new owner loads it on demand
            self._proxy.metrics.handovers.labels(move.source, move.target).inc()
            log.info("model %s handed over from %s to %s", model, move.source, move.target)
        except BackendError as exc:
            log.error("hand-over of %s from %s failed: %s", model, move.source, exc)
        finally:
            del self.moves[model]
            move.done.set()

    async def _still_loaded(self, backend: str, model: str) -> bool:
        loaded = await self._loaded(backend)
        return loaded is None or model in loaded

    def _set_owner(self, model: str, backend: str | None) -> None:
        if backend is None:
            self.owner.pop(model, None)
        else:
            self.owner[model] = backend
        self._changed[model] = time.monotonic()

    # -- polling ---------------------------------------------------------------------

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._cfg.poll_interval_ms / 1000)
            try:
                await self.poll_once()
            except Exception:  # the poller must outlive any one bad reply
                log.exception("ownership poll failed")

    async def _loaded(self, backend: str) -> set[str] | None:
        """The models loaded on ``backend`` now, or None if it could not be asked."""
        try:
            result = await self._proxy.call(
                backend, {"command": "GET_LOADED_MODELS_STATUS"},
                self._proxy.pool.backends[backend].config.timeout_ms / 1000)
        except BackendError:
            return None
        if not result.ok or result.loaded_models is None:
            return None
        self.loaded[backend] = set(result.loaded_models)
        used = result.vram_used_mb
        budget = result.vram_budget_mb
        self.vram[backend] = (None if used is None else float(used),
                              None if budget is None else float(budget))
        metrics = self._proxy.metrics
        if used is not None:
            metrics.vram_used.labels(backend).set(used)
        if budget is not None:
            metrics.vram_budget.labels(backend).set(budget)
        return set(result.loaded_models)

    async def poll_once(self) -> None:
        """Refresh the table from the backends' own view, and catch duplicates."""
        started = time.monotonic()
        names = [n for n, b in self._proxy.pool.backends.items() if b.healthy]
        views = dict(zip(names, await asyncio.gather(*(self._loaded(n) for n in names)),
                         strict=True))
        where: dict[str, set[str]] = {}
        for name, models in views.items():
            for model in models or ():
                where.setdefault(model, set()).add(name)
        rt = self._proxy.runtime
        for model, backends in where.items():
            if model in self.moves or self._changed.get(model, 0) > started:
                continue  # a hand-over or a reply changed it while we were asking
            if model in self._cfg.shared_models:
                continue
            if len(backends) > 1 and await self._confirm_duplicate(model, backends):
                await self._duplicate(model, backends, rt)
            elif len(backends) == 1:
                (backend,) = backends
                if self.owner.get(model) != backend:
                    self._set_owner(model, backend)
                want = self.desired(model, rt)
                if backend != want and self._proxy.pool.backends[want].healthy:
                    self._start_move(model, backend, want)
        for model, owner in list(self.owner.items()):
            gone = views.get(owner) is not None and model not in where
            if gone and model not in self.moves and self._changed.get(model, 0) <= started:
                self._set_owner(model, None)
        # A change before this poll began weighs nothing in later polls: forget it, so
        # that a stream of distinct model names does not grow the map.
        self._changed = {m: t for m, t in self._changed.items() if t > started}

    async def _confirm_duplicate(self, model: str, backends: set[str]) -> bool:
        """Ask again: a model that moved between two polls is not a duplicate."""
        again = await asyncio.gather(*(self._loaded(b) for b in sorted(backends)))
        return sum(1 for seen in again if seen is not None and model in seen) > 1

    async def _duplicate(self, model: str, backends: set[str], rt: Runtime) -> None:
        self.duplicates_seen += 1
        self._proxy.metrics.duplicate_models.labels(model).inc()
        owner = self.owner.get(model)
        if owner not in backends:
            owner = self.desired(model, rt) if self.desired(model, rt) in backends \
                else sorted(backends)[0]
        log.error("model %s is loaded on %s at once (owner %s)%s", model,
                  ", ".join(sorted(backends)), owner,
                  "; unloading the others" if self._cfg.repair else "")
        self._set_owner(model, owner)
        if not self._cfg.repair:
            return
        for other in sorted(backends - {owner}):
            try:
                await self._proxy.call(other, {"command": "UNLOAD_MODEL", "model_name": model},
                                       self._proxy.pool.backends[other].config.timeout_ms / 1000)
            except BackendError as exc:
                log.error("could not unload duplicate %s from %s: %s", model, other, exc)


def _succeeded(reply: bytes) -> bool:
    try:
        status = msgspec.json.decode(reply).get("status")
    except (msgspec.DecodeError, AttributeError):
        return False
    return status in _OK

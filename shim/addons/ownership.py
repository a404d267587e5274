"""One owner per model: the asyncio glue around the ownership state machine.

Two model managers on one GPU, each with its own ledger, must never both load a model.
The decisions (who owns what, when a model may move) are made by
:class:`shim.owners.OwnerTable`, which does no I/O; this module feeds it what happens on
the wire and carries out what it decides:

* every request that names a model (generate, generate_text, load, unload, model
  access, preload_models, and any request carrying ``model_id``, ``model_name`` or
  ``model_ids``) asks the table first, in the ``admit`` hook (waiting out a hand-over,
  bounded by the request's deadline) and the ``route`` hook (the one backend it may go
  to, or an error reply in the caller's shape naming the owner);
* each model's desired backend is its name hashed to a routing bucket, so a weight
  sweep moves models one at a time as the bucket boundary passes them. A hand-over
  waits for the old owner's requests in flight, sends it an unload, and only its reply
  frees the model; the new owner loads it on demand;
* the shared poll of each backend's loaded models (its own report,
  shim.addons.loaded) learns owners, frees models a restarted backend no longer holds,
  and catches duplicates (confirmed by a second look), which are unloaded from the
  backend that is not the owner (``ownership.repair``, on by default), with a metric
  and an audit line. Unloads and polls are canonical operations sent through the
  transport (shim.transport), never requests written in a wire dialect.

A backend that is slow, stalled or unreachable keeps its models (design.md, "Model
ownership is a safety property"); ``release`` (``mmshim ctl release``) is the
operator's way to free them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import msgspec

from shim.addons.base import Addon, CommandHandler, Flow
from shim.addons.loaded import LoadedModels, Views
from shim.config import OwnershipSection
from shim.dialects import Form, Kind, Op
from shim.errors import BackendError, CommandError, OwnedElsewhere, Unsupported
from shim.metrics import Metrics
from shim.owners import ChangeListener, Move, OwnerTable, Refuse, Send, StartMove, Wait
from shim.routing import bucket_of
from shim.runtime import Runtime, RuntimeStore
from shim.settings import Release
from shim.transport import TransportLike, internal_op

if TYPE_CHECKING:
    from shim.audit import AuditLog

log = logging.getLogger("mmshim.ownership")

#: Operations whose target is decided by the model they name.
MODEL_KINDS = frozenset({Kind.GENERATE, Kind.LOAD, Kind.UNLOAD, Kind.MODEL_ACCESS})
#: Reply ``status`` values that say the backend served (so holds) the model; the compiled
#: core reads passed-through replies with the same set (shim.fastpath).
OK_STATUSES = frozenset({"ok", "SUCCESS", "MODEL_READY", "success"})
#: Fields of an opaque request that name models (protocol.md: preload_models etc.).
MODEL_FIELDS = ("model_id", "model_name")
#: Opaque commands that name a model but never load one (protocol.md, "What the deployed
#: agents really send": UPDATE_MODEL_USAGE is a usage record whose reply is ignored).
#: They are routed like any opaque request and claim nothing.
NON_LOADING = frozenset({"UPDATE_MODEL_USAGE"})


def models_named(op: Op) -> list[str]:
    """The models a request names: the parsed ``model_id`` for the known model-bound
    operations, else any ``model_id``/``model_name`` string or ``model_ids`` list of
    strings in the request as sent (opaque requests, MMS ``load_model`` with
    ``model_name``). Read-only operations name none."""
    if op.kind in MODEL_KINDS and op.model_id:
        return [op.model_id]
    if (op.kind not in MODEL_KINDS and op.kind is not Kind.OTHER) or op.name in NON_LOADING:
        return []
    raw = op.raw
    found = [v for k in MODEL_FIELDS if isinstance(v := raw.get(k), str) and v]
    ids = raw.get("model_ids")
    if isinstance(ids, list):
        found += [v for v in ids if isinstance(v, str) and v]
    return list(dict.fromkeys(found))


class Ownership(Addon):
    """The addon: hooks on the data path, hand-over tasks, ``release``; a listener of the
    shared loaded-models poller."""

    name = "ownership"

    def __init__(self, transport: TransportLike, cfg: OwnershipSection, *,
                 store: RuntimeStore, loaded: LoadedModels, metrics: Metrics) -> None:
        self._transport = transport
        self._store = store
        self._metrics = metrics
        self._cfg = cfg
        self.table = OwnerTable(shared=frozenset(cfg.shared_models))
        #: The shared poller (this addon listens to every poll).
        self.models = loaded
        loaded.listen(self)
        self._since = self.table.snapshot()
        self.duplicates_seen = 0
        self.duplicates_repaired = 0
        self.refused = 0
        self.longest_handover_s = 0.0
        self._audit: AuditLog | None = None
        #: Audit entries from before the controller handed us its log (the first poll).
        self._unaudited: list[tuple[str, str, dict[str, list[Any]], dict[str, Any]]] = []
        self._done: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def audit(self) -> AuditLog | None:
        return self._audit

    @audit.setter
    def audit(self, log_: AuditLog | None) -> None:
        """The controller's audit log (set when it starts); earlier entries go there now."""
        self._audit = log_
        if log_ is not None:
            for entry in self._unaudited:
                log_.record(*entry)
            self._unaudited.clear()

    def _record(self, command: str, changes: dict[str, list[Any]],
                detail: dict[str, Any]) -> None:
        entry = ("shim:ownership", command, changes, detail)
        if self._audit is not None:
            self._audit.record(*entry)
        elif len(self._unaudited) < 1000:
            self._unaudited.append(entry)

    # -- the public view (shadow and the status page read these, never the table) ------

    @property
    def owner(self) -> dict[str, str]:
        return self.table.owners

    @property
    def moves(self) -> dict[str, Move]:
        return self.table.moves

    @property
    def loaded(self) -> dict[str, set[str]]:
        """What each backend said it had loaded at its last answer (the shared poll)."""
        return self.models.loaded

    @property
    def vram(self) -> dict[str, tuple[float | None, float | None]]:
        return self.models.vram

    def may_serve(self, backend: str, model: str) -> bool:
        """Is ``model`` loaded on ``backend`` by the last poll, not moving, and owned by
        it (or shared)? What a request that must not load anything may rely on."""
        if model not in self.models.loaded.get(backend, ()) or model in self.table.moves:
            return False
        return model in self.table.shared or self.table.owners.get(model) == backend

    # -- lifecycle (started and stopped with the shim; the poller starts first) ----------

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def describe(self) -> dict[str, Any]:
        """``{"owners": {model: backend}, "moving": {model: "a->b"}, "suspect": [model],
        ...}``: the table as the status page and ``ctl status`` show it."""
        t = self.table
        return {"owners": dict(sorted(t.owners.items())),
                "moving": {m: f"{mv.source}->{mv.target}" for m, mv in t.moves.items()},
                "suspect": t.suspect(self._alive),
                "moves_done": t.moves_done,
                "moves_cancelled": t.moves_cancelled,
                "refused": self.refused,
                "longest_handover_s": round(self.longest_handover_s, 3),
                "duplicates_seen": self.duplicates_seen,
                "duplicates_repaired": self.duplicates_repaired,
                "repair": self._cfg.repair}

    # -- the addon hooks -------------------------------------------------------------

    def desired(self, model: str, rt: Runtime) -> str:
        """Where the weights say ``model`` should live."""
        return rt.table.backend_for(bucket_of("model:" + model))

    def _alive(self, backend: str) -> bool:
        b = self._transport.backends.get(backend)
        return b is not None and b.healthy

    def _servable(self, op: Op, candidates: list[str]) -> list[str]:
        if op.kind is Kind.OTHER:  # passed through to the caller's dialect only
            backends = self._transport.backends
            own = [c for c in candidates if backends[c].dialect == op.dialect]
            return own or candidates
        return candidates

    def _decide(self, op: Op, candidates: list[str], rt: Runtime) -> Send | Wait | StartMove | \
            Refuse | None:
        models = models_named(op)
        if not models or not candidates:
            return None
        servable = self._servable(op, candidates)
        loads = op.kind is not Kind.UNLOAD
        now = time.monotonic()
        if len(models) == 1:
            return self.table.decide(models[0], loads=loads, desired=self.desired(models[0], rt),
                                     servable=servable, alive=self._alive, now=now)
        return self.table.decide_many(models, loads=loads,
                                      desired=lambda m: self.desired(m, rt),
                                      servable=servable, alive=self._alive, now=now)

    def admit(self, flow: Flow) -> Awaitable[Any] | None:
        """Something to wait for before the request may be routed: a hand-over of the
        model it names (started here when the weights want the model elsewhere)."""
        op, rt = flow.op, flow.rt
        if op is None:
            return None
        decision = self._decide(op, list(rt.table.names), rt)
        if isinstance(decision, StartMove):
            self._start_move(decision)
            return self._done[decision.model].wait()
        if isinstance(decision, Wait):
            done = self._done.get(decision.model)
            return done.wait() if done is not None else None
        return None

    def route(self, flow: Flow, candidates: list[str]) -> list[str]:
        op = flow.op
        if op is None:
            return candidates
        decision = self._decide(op, candidates, flow.rt)
        if decision is None:
            return candidates
        if isinstance(decision, Send):
            return [decision.backend]
        if isinstance(decision, Refuse):
            self.refused += 1
            raise OwnedElsewhere(f"model {decision.model} is owned by {decision.owner}: "
                                 f"{decision.reason}; not loading it elsewhere",
                                 "PROCESSING_ERROR" if op.form is Form.MODEL_ACCESS else None)
        # Wait/StartMove: only without an admit hook (an old proxy); the owner keeps it.
        move = self.table.moves.get(decision.model)
        return [move.source] if move is not None else candidates

    def before_send(self, flow: Flow, backend: str) -> None:
        if flow.op is not None:
            for model in models_named(flow.op):
                self.table.sent(model, backend)

    def after_send(self, flow: Flow, backend: str) -> None:
        op = flow.op
        if op is None:
            return
        models = models_named(op)
        if not models:
            return
        ok = _succeeded(flow)
        for model in models:
            self.table.answered(model, backend, unloaded=ok and op.kind is Kind.UNLOAD,
                                loaded=ok and op.kind is not Kind.UNLOAD)

    async def runtime_changed(self, old: Runtime, new: Runtime) -> dict[str, Any] | None:
        """A weight change is in force only once ``weights_changed`` is done."""
        if old.weights == new.weights:
            return None
        return await self.weights_changed(new)

    # -- the compiled core (shim.fastpath) --------------------------------------------

    def fastpath_quiet(self, rt: Runtime) -> bool:
        """Requests that name no model are none of this addon's business; the compiled
        core sends those naming one to ``fast_owner``'s answer, or hands them up."""
        return True

    def fast_owner(self, model: str, rt: Runtime) -> str | None:
        """The backend a request naming ``model`` may go to without asking the table:
        its owner, when the model is not moving, not shared, and the weights want it
        there (``OwnerTable.decide`` would answer ``Send(owner)`` and change nothing).
        None: ask the table (the request goes up to Python)."""
        t = self.table
        owner = t.owners.get(model)
        if owner is None or model in t.moves or model in t.shared \
                or self.desired(model, rt) != owner:
            return None
        return owner

    def watch(self, listener: ChangeListener | None) -> None:
        """Be told of every change of a model's owner or move (``OwnerTable.changed``)."""
        self.table.changed = listener

    def fast_counts(self, model: str, backend: str, sent: int, answered: int,
                    loaded: int) -> None:
        """What the core did with requests naming ``model`` since it last said: ``sent``
        to ``backend``, ``answered`` there, of which ``loaded`` with a success status
        (``before_send`` and ``after_send`` in bulk)."""
        t = self.table
        t.sent(model, backend, sent)
        t.answered(model, backend, n=answered - loaded)
        t.answered(model, backend, n=loaded, loaded=True)

    def fast_answered(self, model: str, backend: str, answer: bytes | None) -> None:
        """One of the core's requests naming ``model``, finished in Python: ``answer``,
        the reply passed through (None: none came)."""
        self.table.answered(model, backend, loaded=_reply_ok(answer))

    # -- operator and weight changes -------------------------------------------------

    def commands(self) -> dict[str, CommandHandler]:
        """``release`` (``ctl release MODEL [--from B]``)."""
        return {"release": self._release_command}

    def _release_command(self, raw: dict[str, Any]) -> dict[str, Any]:
        """Forget a model's owner, for an owner the operator knows is gone. The reply's
        ``changes`` make the Controller audit and count it (shim.control)."""
        try:
            args = msgspec.convert(raw, Release)
        except msgspec.ValidationError as exc:
            raise CommandError("bad_request", f"release: {exc}") from None
        backends = list(self._transport.backends)
        if args.from_backend is not None and args.from_backend not in backends:
            raise CommandError("invalid", f"unknown backend {args.from_backend!r} "
                               f"(expected one of {', '.join(backends)})")
        owner = self.release(args.model, args.from_backend)
        if owner is None:
            current = self.owner.get(args.model)
            raise CommandError("refused", f"model {args.model!r} is "
                               + (f"owned by {current}, not {args.from_backend}" if current
                                  else "not owned by any backend") + "; nothing released")
        return {"model": args.model, "released_from": owner,
                "changes": {f"ownership.owners.{args.model}": [owner, None]},
                "audit": {"model": args.model, "owner": owner}}

    def release(self, model: str, source: str | None = None) -> str | None:
        """``ctl release MODEL [--from B]``: forget the model's owner. Returns the owner
        it had, or None when there was nothing to release."""
        owner = self.table.release(model, source)
        done = self._done.pop(model, None)
        if done is not None:
            done.set()
        if owner is not None:
            log.warning("model %s released from %s by the operator", model, owner)
        return owner

    async def weights_changed(self, rt: Runtime) -> dict[str, Any]:
        """After a weight change: cancel moves whose unload was not sent and that the new
        weights no longer want; wait (bounded) for the ones already unloading. Returns
        what was done, for the command's reply."""
        cancelled = self.table.cancel_stale_moves(lambda m: self.desired(m, rt))
        for model in cancelled:
            done = self._done.pop(model, None)
            if done is not None:
                done.set()
        waiting = [self._done[m] for m in self.table.moves if m in self._done]
        if waiting:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in waiting)),
                                       self._cfg.handover_timeout_ms / 1000 + 1.0)
        return {"cancelled_moves": sorted(cancelled),
                "moving": {m: f"{mv.source}->{mv.target}" for m, mv in self.table.moves.items()}}

    # -- hand-over -------------------------------------------------------------------

    def _start_move(self, move: StartMove) -> None:
        self._done[move.model] = asyncio.Event()
        task = asyncio.create_task(self._move(move.model))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _move(self, model: str) -> None:
        move = self.table.moves.get(model)
        done = self._done.get(model)
        if move is None or done is None:
            return
        started = time.monotonic()
        deadline = started + self._cfg.handover_timeout_ms / 1000
        confirmed = False
        try:
            while self.table.busy(model, move.source) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            if self.table.moves.get(model) is not move:
                return  # cancelled (weights moved it back, or released) meanwhile
            if self.table.busy(model, move.source):
                log.warning("hand-over of %s: %s still busy with it; it stays there",
                            model, move.source)
                self.table.abandon(model)
                return
            self.table.unload_sending(model)
            remaining = max(0.05, deadline - time.monotonic())
            try:
                result = await self._transport.call(
                    move.source, internal_op(Kind.UNLOAD, model), remaining)
                confirmed = result.ok or not await self._still_loaded(move.source, model)
                if not confirmed:
                    log.error("hand-over of %s: %s did not unload it (%s); it stays there",
                              model, move.source, result.message)
            except (BackendError, Unsupported) as exc:
                log.error("hand-over of %s from %s: no unload reply (%s); it stays there",
                          model, move.source, exc)
            if confirmed:
                elapsed = time.monotonic() - started
                self.longest_handover_s = max(self.longest_handover_s, elapsed)
                self._metrics.handovers.labels(move.source, move.target).inc()
                log.info("model %s handed over from %s to %s", model, move.source, move.target)
        finally:
            if self.table.moves.get(model) is move:
                if move.unload_sent:
                    self.table.unload_result(model, confirmed)
                else:
                    self.table.abandon(model)
            if self._done.get(model) is done:
                del self._done[model]
            done.set()

    async def _still_loaded(self, backend: str, model: str) -> bool:
        loaded = await self.models.refresh(backend)
        return loaded is None or model in loaded

    # -- polling (the shared poller calls these) ------------------------------------------

    async def poll_once(self) -> None:
        """Poll every backend now (through the shared poller, which calls back here)."""
        await self.models.poll_once()

    def before_poll(self) -> None:
        self._since = self.table.snapshot()

    async def after_poll(self, views: Views) -> None:
        """Refresh the table from the backends' own reports, and catch duplicates.

        Every backend was asked, answering or not: one that did not answer tells nothing
        (its models stay its own), one that answered without a model it owned no longer
        holds it (unloaded, idle-evicted, or restarted with an empty ledger).
        """
        since = self._since
        suspects: dict[str, set[str]] = {}
        for name, models in views.items():
            for model in self.table.observe(name, models, since):
                suspects.setdefault(model, set()).add(name)
        for model, others in suspects.items():
            owner = self.table.owners.get(model)
            if owner is None or model in self.table.moves:
                continue
            if await self._confirm_duplicate(model, {owner, *others}):
                await self._duplicate(model, owner, others)
        self.table.prune(since)

    async def _confirm_duplicate(self, model: str, backends: set[str]) -> bool:
        """Ask again: a model that moved between two polls is not a duplicate."""
        again = await asyncio.gather(*(self.models.refresh(b) for b in sorted(backends)))
        return sum(1 for seen in again if seen is not None and model in seen) > 1

    async def _duplicate(self, model: str, owner: str, others: set[str]) -> None:
        self.duplicates_seen += 1
        metrics = self._metrics
        metrics.duplicate_models.labels(model).inc()
        log.error("model %s is loaded on %s and its owner %s%s", model,
                  ", ".join(sorted(others)), owner,
                  "; unloading it from the others" if self._cfg.repair else "")
        if not self._cfg.repair:
            return
        for other in sorted(others - {owner}):
            if self.table.owners.get(model) != owner or self.table.busy(model, other):
                continue
            try:
                result = await self._transport.call(
                    other, internal_op(Kind.UNLOAD, model),
                    self._transport.backends[other].config.timeout_ms / 1000)
            except (BackendError, Unsupported) as exc:
                log.error("could not unload duplicate %s from %s: %s", model, other, exc)
                continue
            self.duplicates_repaired += 1
            metrics.duplicate_repairs.labels(other).inc()
            self._record("duplicate_repair",
                         {f"loaded.{other}.{model}": [True, not result.ok]},
                         {"model": model, "owner": owner, "unloaded_from": other,
                          "ok": result.ok})


def _succeeded(flow: Flow) -> bool:
    """Did the attempt change the backend's state? A translated reply's decoded Result
    says so; a passed-through one is read for its ``status`` (model-bound requests only:
    never on the hot path of requests that name no model)."""
    if flow.result is not None:
        return flow.result.ok
    return _reply_ok(flow.answer)


def _reply_ok(answer: bytes | None) -> bool:
    """A passed-through reply's ``status`` is one of ``OK_STATUSES``."""
    if answer is None:
        return False
    try:
        status = msgspec.json.decode(answer).get("status")
    except (msgspec.DecodeError, AttributeError):
        return False
    return isinstance(status, str) and status in OK_STATUSES

"""The ownership state machine, without I/O: which backend may hold which model.

Per model, one state at a time (design.md, "Model ownership is a safety property"):

* **unowned**: no backend is known to hold it; the first request that may load it claims
  it for the backend it is sent to.
* **owned(b)**: only ``b`` may hold it; every request that may load it goes to ``b``.
* **releasing(b->c)**: the weights want it on ``c``; requests for it wait while ``b``
  finishes what it has in flight and then unloads it. ``b``'s unload reply makes it
  unowned (``c`` then claims it on demand); any other outcome leaves it owned by ``b``.
  A move whose unload has not been sent yet is cancelled when the weights move the
  model back (``cancel_stale_moves``).
* **suspect**: owned(b) while ``b`` is not answering (probes fail, requests time out,
  or it is ejected). It keeps the model: nothing loads it elsewhere until ``b`` answers
  again, ``b``'s own report shows it without the model (a restart: empty ledger, uptime
  reset), or the operator releases it (``release``).

Only confirmed facts move a model: an unload reply, the owner's own report of what it
has loaded, an operator's release. Silence is never proof of death.

This class does no I/O and keeps no timers: the asyncio glue (shim.addons.ownership) and the
property-based test (tests/unit/test_owners_state.py) drive it the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field

#: Called with a model's name after its owner or its move changed (``OwnerTable.changed``).
ChangeListener = Callable[[str], None]


@dataclass(slots=True)
class Move:
    """releasing(source -> target). ``unload_sent``: past the point of no cancel."""

    source: str
    target: str
    started: float
    unload_sent: bool = False


@dataclass(frozen=True, slots=True)
class Send:
    """Send the request to ``backend``; ``claim``: the model was unowned and is now its."""

    backend: str
    claim: bool = False


@dataclass(frozen=True, slots=True)
class Wait:
    """A hand-over of ``model`` is in progress: wait for it, then decide again."""

    model: str


@dataclass(frozen=True, slots=True)
class StartMove:
    """Hand ``model`` over from ``source`` to ``target`` (started by the decision), then
    decide again."""

    model: str
    source: str
    target: str


@dataclass(frozen=True, slots=True)
class Refuse:
    """Answer with an error: ``owner`` holds ``model`` and the request cannot go there."""

    model: str
    owner: str
    reason: str


Decision = Send | Wait | StartMove | Refuse


@dataclass
class OwnerTable:
    """The model -> owner table and its hand-overs (sans-IO; see the module docstring).

    ``alive(b)`` is the caller's current view of whether ``b`` answers (health probes,
    ejection); it decides only where a request goes and whether a move may start, never
    who owns a model.
    """

    shared: Collection[str] = ()
    owners: dict[str, str] = field(default_factory=dict)
    moves: dict[str, Move] = field(default_factory=dict)
    #: Requests sent and not yet answered, per (model, backend).
    inflight: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: A logical clock, advanced on every change of a model's owner and every load or
    #: unload reply; ``version[model]`` is the clock at the model's last change. A poll
    #: started at clock ``since`` ignores models changed after it. Pruned by ``prune``.
    clock: int = 0
    version: dict[str, int] = field(default_factory=dict)
    moves_done: int = 0
    moves_cancelled: int = 0
    #: Told of every change of a model's owner or move (the compiled core's copy of
    #: the models it may route without asking, shim.fastpath); never of load counts.
    changed: ChangeListener | None = None

    # -- decisions ----------------------------------------------------------------------

    def decide(self, model: str, *, loads: bool, desired: str, servable: Sequence[str],
               alive: Callable[[str], bool], now: float) -> Decision:
        """Where a request naming ``model`` goes now.

        ``loads``: the request may load the model (all but unload). ``desired``: where the
        weights want it. ``servable``: the backends able to serve this request, in order
        of preference (never empty). A ``StartMove`` or a claim is applied here.
        """
        if model in self.moves:
            return Wait(model)
        owner = self.owners.get(model)
        if owner is None:
            if not loads:
                return Send(desired if desired in servable else servable[0])
            target = desired if desired in servable and alive(desired) else next(
                (b for b in servable if alive(b)),
                desired if desired in servable else servable[0])
            if model not in self.shared:
                self._set(model, target)
            return Send(target, claim=True)
        if owner not in servable:
            return Refuse(model, owner, "this request cannot be served by its owner")
        if not loads or owner == desired or desired not in servable:
            return Send(owner)
        if not alive(owner):
            return Refuse(model, owner, "its owner is not answering; it keeps the model "
                          "until it answers, is seen restarted, or an operator releases it")
        if not alive(desired):
            return Send(owner)
        self.moves[model] = Move(owner, desired, now)
        self._tell(model)
        return StartMove(model, owner, desired)

    def decide_many(self, models: Sequence[str], *, loads: bool, desired: Callable[[str], str],
                    servable: Sequence[str], alive: Callable[[str], bool],
                    now: float) -> Decision:
        """One request naming several models (``model_ids``): all must agree on one backend.

        Claims are made only once every model agrees (a refused request claims nothing).
        """
        for model in models:
            if model in self.moves:
                return Wait(model)
        owned = {self.owners[m] for m in models if m in self.owners}
        if len(owned) > 1:
            first = next(m for m in models if m in self.owners)
            return Refuse(first, self.owners[first],
                          "the models it names are owned by different backends: "
                          + ", ".join(f"{m}@{self.owners[m]}" for m in models
                                      if m in self.owners))
        if owned:
            (owner,) = owned
            if owner not in servable:
                model = next(m for m in models if self.owners.get(m) == owner)
                return Refuse(model, owner, "this request cannot be served by its owner")
            target = owner
        else:
            want = desired(models[0]) if models else servable[0]
            target = want if want in servable and alive(want) else next(
                (b for b in servable if alive(b)), want if want in servable else servable[0])
        if loads:
            for model in models:
                if model not in self.owners and model not in self.shared:
                    self._set(model, target)
        return Send(target, claim=not owned)

    # -- what happens on the wire -------------------------------------------------------

    def sent(self, model: str, backend: str, n: int = 1) -> None:
        """``n`` requests for ``model`` went to ``backend``."""
        self.inflight[(model, backend)] += n

    def answered(self, model: str, backend: str, *, unloaded: bool = False,
                 loaded: bool = False, n: int = 1) -> None:
        """``n`` requests for ``model`` on ``backend`` ended (the same outcome: one call
        for ``n`` is ``n`` calls for one). ``unloaded``: they were unloads the backend
        confirmed; ``loaded``: the backend says it served/loaded the model."""
        if n <= 0:
            return
        key = (model, backend)
        self.inflight[key] -= n
        if self.inflight[key] <= 0:
            del self.inflight[key]
        if unloaded or loaded:
            # A fact newer than any poll under way: that poll must not undo it.
            self._bump(model)
        if model in self.moves:
            return
        if unloaded and self.owners.get(model) == backend:
            self._set(model, None)
        elif loaded and model not in self.owners and model not in self.shared:
            self._set(model, backend)

    def busy(self, model: str, backend: str) -> bool:
        return self.inflight.get((model, backend), 0) > 0

    # -- hand-over ---------------------------------------------------------------------

    def unload_sending(self, model: str) -> Move | None:
        """The glue is about to send the unload; None if the move was cancelled."""
        move = self.moves.get(model)
        if move is not None:
            move.unload_sent = True
        return move

    def unload_result(self, model: str, confirmed: bool) -> None:
        """The move's unload ended: ``confirmed`` only by the source's unload reply (or
        its report of not holding the model). Otherwise the source keeps it."""
        move = self.moves.pop(model, None)
        if move is None:
            return
        self._tell(model)
        if confirmed:
            if self.owners.get(model) == move.source:
                self._set(model, None)
            self.moves_done += 1

    def abandon(self, model: str) -> None:
        """A move that never sent its unload (timed out waiting): the source keeps it."""
        move = self.moves.get(model)
        if move is not None and not move.unload_sent:
            del self.moves[model]
            self.moves_cancelled += 1
            self._tell(model)

    def cancel_stale_moves(self, desired: Callable[[str], str]) -> list[str]:
        """After a weight change: cancel moves whose model the weights now want where it
        is, if their unload has not been sent. Returns the cancelled models."""
        cancelled = [m for m, mv in self.moves.items()
                     if not mv.unload_sent and desired(m) != mv.target]
        for model in cancelled:
            del self.moves[model]
            self._tell(model)
        self.moves_cancelled += len(cancelled)
        return cancelled

    # -- facts from the backends' own reports and from the operator -----------------

    def observe(self, backend: str, loaded: Iterable[str], since: int) -> list[str]:
        """``backend`` reported (to a poll started when ``clock`` was ``since``) that it
        holds exactly ``loaded``. Returns models it holds that another backend owns
        (duplicates, for the caller to confirm and repair).

        A model it owns but does not report is released, unless a request for it is in
        flight there (a load under way is not in the report yet), a move is under way,
        or the owner changed since the poll started.
        """
        held = set(loaded)
        duplicates = []
        for model in held:
            owner = self.owners.get(model)
            if model in self.shared or self.version.get(model, 0) > since:
                continue
            if owner is None and model not in self.moves:
                self._set(model, backend)
            elif owner is not None and owner != backend:
                duplicates.append(model)
        for model, owner in list(self.owners.items()):
            if (owner == backend and model not in held and model not in self.moves
                    and not self.busy(model, backend)
                    and self.version.get(model, 0) <= since):
                self._set(model, None)
        return duplicates

    def release(self, model: str, source: str | None = None) -> str | None:
        """The operator's ``ctl release``: forget ``model``'s owner (only if it is
        ``source`` when given). Returns the previous owner, or None if nothing changed."""
        owner = self.owners.get(model)
        if owner is None or (source is not None and owner != source):
            return None
        move = self.moves.pop(model, None)
        if move is not None:
            self.moves_cancelled += 1
        self._set(model, None)
        return owner

    def snapshot(self) -> int:
        """The clock now: what a poll starting now passes to ``observe``."""
        return self.clock

    def prune(self, since: int) -> None:
        """Forget the change times of models no longer tracked (no owner, no move, no
        request in flight) that changed at or before ``since``, the snapshot of the
        oldest poll still under way: such a poll reads them as unchanged, which they
        are. So a stream of distinct model names does not grow the table."""
        busy = {model for model, _ in self.inflight}
        for model in [m for m, v in self.version.items()
                      if v <= since and m not in self.owners and m not in self.moves
                      and m not in busy]:
            del self.version[model]

    def suspect(self, alive: Callable[[str], bool]) -> list[str]:
        """Models whose owner is not answering (they stay with it)."""
        return sorted(m for m, b in self.owners.items() if not alive(b))

    def _set(self, model: str, backend: str | None) -> None:
        if backend is None:
            self.owners.pop(model, None)
        else:
            self.owners[model] = backend
        self._bump(model)
        self._tell(model)

    def _tell(self, model: str) -> None:
        if self.changed is not None:
            self.changed(model)

    def _bump(self, model: str) -> None:
        self.clock += 1
        self.version[model] = self.clock

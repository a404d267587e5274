"""Shadow traffic: a copy of a request goes to the other backend, off the reply path, and
its reply is compared with the one the client got.

The ``after_reply`` hook runs once the client has its reply. It decides, without waiting
for anything, whether to mirror the request:

1. the runtime mode is ``shadow``;
2. the action's mirror policy allows it: ``always`` (read-only requests), ``if_loaded``
   (generate: only when the model is already loaded on the shadow backend, so that a
   shadow request never makes a backend load a model), ``never`` (load, unload, model
   access, clear_conversation: anything that changes a backend's state);
3. the request falls in ``shadow.percent`` (by a hash of its sticky key, salted so that
   the sample is independent of the routing split; else at random);
4. fewer than ``shadow.max_inflight`` shadow requests are in flight; else the copy is
   dropped and counted as ``shed``.

The copy is translated into the shadow backend's dialect and sent through the transport
(shim.transport, side-effect free) with ``shadow.timeout_ms``; nothing on the reply path
awaits it. When the answer is in, it is taken in the caller's dialect, as the client
would have got it, compared with the client's reply (shim.compare, with the Runtime's
compiled rules ``flow.rt.compare``) and the outcome recorded: the metric
``shim_shadow_total{action, outcome}`` and the diff log (shim.difflog). A shadow reply is
never sent to a client, and a shadow backend that is dead, slow or talks garbage only
changes these records.

Noise calibration (Diffy's idea): when the primary backend has a ``secondary`` endpoint,
the same request also goes there; paths where the primary and its own twin disagree are
reported as noise, not as differences.

What is loaded where comes from the shared poller (shim.addons.loaded) and, with
ownership on, from its public ``may_serve``; the twins have a poller of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import zmq

from shim import dialects, routing
from shim.addons.base import Addon, Flow
from shim.addons.loaded import LoadedModels
from shim.addons.ownership import Ownership
from shim.bounded import BoundedDict
from shim.compare import Diff, RuleSet, compare, generalize, split_noise
from shim.config import BackendConfig, ShadowSection, ShimConfig
from shim.dialects import Kind, Op
from shim.difflog import DiffLog, Tally, log_files, read_records
from shim.errors import BackendError, BackendTimeout, Unsupported, UnusableReply
from shim.metrics import Metrics
from shim.pool import BackendPool
from shim.runtime import Runtime, RuntimeStore, ShadowSettings
from shim.transport import BAD_JSON, Answer, Transport, TransportLike, unusable_view

log = logging.getLogger("mmshim.shadow")

_decode = msgspec.json.decode

#: How long after an unload seen on the data path a model counts as not loaded there,
#: in poll intervals (the next poll then tells the truth).
_UNLOAD_GRACE_POLLS = 2
#: Unloads remembered at most (model names come from clients: shim.bounded).
MAX_UNLOADED = 10_000

#: Reply fields that only echo the conversation the shadow copy no longer names.
_CONVERSATION_ECHO = ("conversation_id", "using_kv_cache")


def caller_view(op: Op, answer: Answer) -> Any:
    """An answer as the caller would have got it, as JSON values: rendered from its
    decoded Result when it was translated, else its bytes decoded (the first decode)."""
    if answer.result is not None:
        return dialects.render_reply(op, answer.result)
    return _decode(answer.reply)


def restore_echo(primary: Any, shadow: Any) -> Any:
    """The shadow reply with the conversation echo the primary reply carries (the copy
    was sent without its conversation, so these fields would differ by construction)."""
    if isinstance(primary, dict) and isinstance(shadow, dict):
        for key in _CONVERSATION_ECHO:
            if key in primary and key not in shadow:
                shadow[key] = primary[key]
    return shadow


def judge(rules: RuleSet, primary: Any, shadow: Any,
          secondary: Any = None, calibrated: bool = False) -> tuple[list[Diff], list[Diff]]:
    """(differences, noise) between the primary's and the shadow's reply.

    With ``calibrated``, ``secondary`` is the primary's twin's reply: paths where it
    differs from the primary are noise.
    """
    diffs = compare(primary, shadow, rules)
    if not calibrated or not diffs:
        return diffs, []
    return split_noise(diffs, compare(primary, secondary, rules))


def diff_record(op: Op, primary: str, shadow: str, primary_reply: Any, shadow_reply: Any,
                diffs: list[Diff], noise: list[Diff],
                secondary_reply: Any = None) -> dict[str, Any]:
    """The diff log's ``mismatch`` record."""
    record: dict[str, Any] = {
        "kind": "mismatch", "ts": round(time.time(), 3), "action": op.kind.value,
        "primary": primary, "shadow": shadow, "request": op.raw,
        "primary_reply": primary_reply, "shadow_reply": shadow_reply,
        "diffs": [{**d.as_dict(), "group": generalize(d.path)} for d in diffs],
    }
    if noise:
        record["noise"] = [{**d.as_dict(), "group": generalize(d.path)} for d in noise]
    if secondary_reply is not None:
        record["secondary_reply"] = secondary_reply
    return record


def in_sample(key: object, percent: float) -> bool:
    """Is a request with this sticky key among the ``percent`` mirrored? (Salted apart
    from the routing split: at weights 50/50 and 50 % shadowing, both primaries get
    mirrored; see shim.routing.in_sample.)"""
    return routing.in_sample(key, percent, "shadow")


# -- the addon -------------------------------------------------------------------------

@dataclass(slots=True)
class _Job:
    """One mirrored request whose answers are on their way."""

    op: Op
    primary: str
    target: str
    #: The client's reply as JSON values (from the flow's Result, or its bytes decoded).
    primary_reply: Any
    rules: RuleSet
    calibrate: bool


class Shadow(Addon):
    """The shadow addon: mirrors, compares, records. Started and stopped with the shim."""

    name = "shadow"

    def __init__(self, transport: TransportLike, cfg: ShimConfig, *, store: RuntimeStore,
                 metrics: Metrics, loaded: LoadedModels, ownership: Ownership | None,
                 ctx: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self._transport = transport
        self._store = store
        self._cfg = cfg
        self._metrics = metrics
        self._models = loaded
        self._ownership = ownership
        self._sticky_key = cfg.routing.sticky_key
        self._poll_s = cfg.ownership.poll_interval_ms / 1000
        self._settings: ShadowSection = cfg.shadow
        self._log_failed = False
        self._closing: set[asyncio.Future[None]] = set()
        self.inflight = 0
        self.skipped_not_loaded = 0
        self._jobs: set[asyncio.Task[None]] = set()
        self._difflog: DiffLog | None = None
        #: (backend, model) -> when the data path saw it unloaded there.
        #: Bounded: one entry per unload through the shim, kept only while it matters.
        self._unloaded: BoundedDict[tuple[str, str], float] = BoundedDict(
            MAX_UNLOADED, ttl_s=_UNLOAD_GRACE_POLLS * self._poll_s)
        #: The primaries' twins (``secondary`` endpoints): a pool, transport and poller of
        #: their own, with metrics of their own (not the live ones).
        self.secondaries: Transport | None = None
        self.secondary_models: LoadedModels | None = None
        twins = {name: BackendConfig(dialect=b.dialect, endpoints=[b.secondary],
                                     timeout_ms=b.timeout_ms, device=b.device)
                 for name, b in cfg.backends.items() if b.secondary}
        if twins and ctx is not None:
            pool = BackendPool(asyncio.get_running_loop(), ctx, twins, cfg.health, Metrics())
            self.secondaries = Transport(pool, policy=lambda: store.current.policy)
            self.secondary_models = LoadedModels(
                self.secondaries, self._poll_s,
                active=lambda: store.current.mode == "shadow")

    @property
    def loaded(self) -> dict[str, set[str]]:
        """What the shared poller last saw loaded on each backend."""
        return self._models.loaded

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self.secondary_models is not None:
            await self.secondary_models.start()

    async def stop(self) -> None:
        if self.secondary_models is not None:
            await self.secondary_models.stop()
        for job in list(self._jobs):
            job.cancel()
        if self.secondaries is not None:
            self.secondaries.pool.close()
        if self._difflog is not None:
            await asyncio.to_thread(self._difflog.close)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=5.0)

    def commands(self) -> dict[str, Any]:
        """``diffs`` on the admin socket (``mmshim ctl diffs``): the diff log's report."""
        return {"diffs": self._diffs_report}

    async def _diffs_report(self, args: dict[str, Any]) -> dict[str, Any]:
        top = args.get("top", 5)
        top = top if isinstance(top, int) and top > 0 else 5
        path = self._settings.diff_log

        def read() -> Tally:  # a file read: off the event loop
            return Tally().add_all(read_records(path)) if log_files(path) else Tally()

        tally = await asyncio.to_thread(read)
        return {"diff_log": path, "report": tally.as_json(top), "text": tally.format(top)}

    def fastpath_quiet(self, rt: Runtime) -> bool:
        """Outside shadow mode nothing is mirrored: requests may skip Python
        (shim.fastpath)."""
        return rt.mode != "shadow"

    def describe(self) -> dict[str, Any]:
        """For status replies: what the shadow is doing now."""
        return {"inflight": self.inflight, "skipped_not_loaded": self.skipped_not_loaded,
                "diff_log": self._settings.diff_log,
                "log_dropped": self._difflog.dropped if self._difflog else 0}

    @property
    def difflog(self) -> DiffLog | None:
        """The diff log, opened on first use (a shim that never shadows writes nothing)."""
        s = self._settings
        if self._difflog is None and s.diff_log and not self._log_failed:
            try:
                self._difflog = DiffLog(s.diff_log, s.diff_log_max_bytes, s.diff_log_backups,
                                        payloads=s.log_payloads)
            except OSError as exc:
                log.error("cannot open the diff log %s: %s; not logging diffs", s.diff_log, exc)
                self._log_failed = True
        return self._difflog

    def reload(self, settings: ShadowSection) -> None:
        """Take a reloaded config's diff log settings (the admin's ``reload``); a diff log
        that moved is closed and the new one opened on first use. Compare rules, percent,
        max_inflight and timeout come with the Runtime and need nothing here."""
        old, self._settings, self._log_failed = self._difflog, settings, False
        if old is not None and (old.path != Path(settings.diff_log)
                                or old.max_bytes != settings.diff_log_max_bytes
                                or old.backups != settings.diff_log_backups):
            self._difflog = None
            task = asyncio.get_running_loop().run_in_executor(None, old.close)
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # -- the addon hooks -----------------------------------------------------------------

    def after_send(self, flow: Flow, backend: str) -> None:
        op = flow.op
        if op is not None and op.kind is Kind.UNLOAD and op.model_id:
            self._unloaded[(backend, op.model_id)] = time.monotonic()

    def after_reply(self, flow: Flow) -> None:
        if flow.rt.mode != "shadow" or not flow.exchanged:
            return
        self._mirror(flow)

    # -- mirroring -----------------------------------------------------------------------

    def _mirror(self, flow: Flow) -> None:
        op, primary, rt = flow.op, flow.backend, flow.rt
        if op is None or primary is None or flow.answer is None:
            return
        action = op.kind.value
        rule = rt.rules[action]
        if rule.mirror == "never":
            return
        target = next((n for n in self._transport.backends if n != primary), None)
        if target is None or not self._sampled(op, rt.shadow):
            return
        if rule.mirror == "if_loaded" and not self.is_loaded(target, op.model_id):
            self.skipped_not_loaded += 1
            return
        if self.inflight >= rt.shadow.max_inflight:
            self._record(action, "shed")
            return
        timeout = rt.shadow.timeout_ms / 1000
        twins = self.secondaries
        calibrate = (twins is not None and primary in twins.backends and (
            rule.mirror != "if_loaded" or self.secondary_models is None or
            op.model_id in self.secondary_models.loaded.get(primary, ())))
        primary_reply = (dialects.render_reply(op, flow.result) if flow.result is not None
                         else _safe_decode(flow.answer))
        job = _Job(op, primary, target, primary_reply, rt.compare.for_action(action),
                   calibrate)
        task = asyncio.get_running_loop().create_task(
            self._exchange(job, flow.request, timeout, rule.translate))
        self.inflight += 1
        self._jobs.add(task)
        task.add_done_callback(self._finish)

    def _sampled(self, op: Op, settings: ShadowSettings) -> bool:
        key = op.raw.get(self._sticky_key) if settings.sticky and self._sticky_key else None
        return in_sample(key, settings.percent)

    def is_loaded(self, backend: str, model: str | None) -> bool:
        """Is ``model`` loaded on ``backend`` as far as we know, and safe to send to?

        With ownership on, ownership's ``may_serve`` decides (in that backend's last
        poll, not moving, owned by it or shared); without, the shared poll alone. In any
        case not unloaded through the shim since the last polls.
        """
        if not model:
            return False
        unloaded = self._unloaded.get((backend, model))
        if unloaded is not None:
            if time.monotonic() - unloaded < _UNLOAD_GRACE_POLLS * self._poll_s:
                return False
            self._unloaded.pop((backend, model))
        if self._ownership is None:
            return model in self._models.loaded.get(backend, ())
        return self._ownership.may_serve(backend, model)

    # -- comparing -----------------------------------------------------------------------

    async def _exchange(self, job: _Job, request: bytes, timeout: float,
                        translate: bool) -> None:
        """Send the copy (and the twin's), then compare; every outcome is recorded."""
        op = job.op
        sends = [self._transport.send(op, job.target, request, timeout, translate=translate,
                                      mirror=True)]
        twins = self.secondaries
        if job.calibrate and twins is not None:
            sends.append(twins.send(op, job.primary, request, timeout, translate=translate,
                                    mirror=True))
        answers = await asyncio.gather(*sends, return_exceptions=True)
        shadow_answer = answers[0]
        shadow: Any
        if isinstance(shadow_answer, UnusableReply):
            # Read but unusable: the client would have got the shim's SHIM_BAD_REPLY.
            shadow = unusable_view(op, shadow_answer)
        elif isinstance(shadow_answer, BaseException):
            if isinstance(shadow_answer, asyncio.CancelledError):
                raise shadow_answer
            outcome = ("shadow_timeout" if isinstance(shadow_answer, BackendTimeout)
                       else "shadow_error")
            if not isinstance(shadow_answer, BackendError | Unsupported):
                log.error("shadow: a %s copy failed: %r", op.kind.value, shadow_answer)
            self._error(op, job.target, outcome, str(shadow_answer))
            return
        else:
            try:
                shadow = caller_view(op, shadow_answer)
            except BAD_JSON as exc:
                self._error(op, job.target, "shadow_error", f"reply is not JSON: {exc}")
                return
        twin: Any = None
        calibrated = False
        if len(answers) > 1:
            with contextlib.suppress(*BAD_JSON):
                other = answers[1]
                if isinstance(other, Answer):
                    twin, calibrated = caller_view(op, other), True
                elif isinstance(other, UnusableReply):
                    twin, calibrated = unusable_view(op, other), True
                if calibrated:
                    twin = restore_echo(job.primary_reply, twin)
        shadow = restore_echo(job.primary_reply, shadow)
        diffs, noise = judge(job.rules, job.primary_reply, shadow, twin, calibrated)
        self._record(op.kind.value, "mismatch" if diffs else "match",
                     {generalize(d.path) for d in noise})
        if diffs and self.difflog is not None:
            self.difflog.write(diff_record(op, job.primary, job.target, job.primary_reply,
                                           shadow, diffs, noise, twin))

    async def settled(self, timeout_s: float) -> bool:
        """Wait (bounded) until no mirrored copy is in flight; True when none is."""
        if self._jobs:
            await asyncio.wait(set(self._jobs), timeout=timeout_s)
        return not self._jobs

    def _finish(self, task: asyncio.Task[None]) -> None:
        self.inflight -= 1
        self._jobs.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("shadow: cannot compare a reply", exc_info=task.exception())

    def _record(self, action: str, outcome: str, noise: Iterable[str] = ()) -> None:
        self._metrics.shadow.labels(action, outcome).inc()
        if self.difflog is not None:
            self.difflog.count(action, outcome, noise)

    def _error(self, op: Op, target: str, outcome: str, error: str) -> None:
        action = op.kind.value
        self._record(action, outcome)
        difflog = self.difflog
        if difflog is not None and difflog.wants_example(action, outcome):
            difflog.write({"kind": "error", "ts": round(time.time(), 3), "action": action,
                           "outcome": outcome, "shadow": target, "request": op.raw,
                           "error": error})


def _safe_decode(reply: bytes) -> Any:
    try:
        return _decode(reply)
    except BAD_JSON:
        return f"<not JSON: {reply[:80]!r}>"


__all__ = ["Shadow", "caller_view", "diff_record", "in_sample", "judge", "restore_echo"]

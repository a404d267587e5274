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

The copy is translated into the shadow backend's dialect and sent through the pool with
``shadow.timeout_ms``; nothing awaits it. When the replies are in, a done-callback
renders them in the caller's dialect, as the client would have got them, compares them
with the client's reply (shim.compare) and records the outcome: the metric
``shim_shadow_total{action, outcome}`` and the diff log (shim.difflog). A shadow reply is
never sent to a client, and a shadow backend that is dead, slow or talks garbage only
changes these records.

Noise calibration (Diffy's idea): when the primary backend has a ``secondary`` endpoint,
the same request also goes there; paths where the primary and its own twin disagree are
reported as noise, not as differences.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import zmq

from shim import dialects, routing
from shim.bounded import BoundedDict
from shim.compare import Diff, Rules, RuleSet, compare, generalize, split_noise
from shim.config import BackendConfig, ShadowSection, ShimConfig
from shim.dialects import Kind, Op
from shim.difflog import DiffLog, Tally, log_files, read_records
from shim.errors import BackendError, BackendTimeout
from shim.metrics import Metrics
from shim.pool import BackendPool
from shim.runtime import Runtime, ShadowSettings

if TYPE_CHECKING:
    from shim.ownership import Ownership
    from shim.proxy import Proxy

log = logging.getLogger("mmshim.shadow")

_decode = msgspec.json.decode
_encode = msgspec.json.encode

#: How long after an unload seen on the data path a model counts as not loaded there,
#: in poll intervals (the next poll then tells the truth).
_UNLOAD_GRACE_POLLS = 2
#: Unloads remembered at most (model names come from clients: shim.bounded).
MAX_UNLOADED = 10_000


class ReplyError(Exception):
    """A backend reply that cannot even be compared (not JSON); a shadow_error."""


# -- translation for comparison (shared with shim.parity) -------------------------------

def requests_for(op: Op, dialect: str, payload: bytes | None, policy: Mapping[str, str],
                 translate: bool = True) -> list[bytes]:
    """The frames to send to a backend of ``dialect`` for ``op`` (Unsupported if none)."""
    if payload is not None and (not translate or op.dialect == dialect):
        return [payload]
    if not translate:
        return [_encode(op.raw)]
    return [_encode(r) for r in dialects.render_request(op, dialect, policy)]


#: The request field the reference backends (backends.server.NO_LOAD_FIELD) read as
#: "never load, remember nothing, record no usage": set on every mirrored copy.
NO_LOAD_FIELD = "shim_no_load"
#: Reply fields that only echo the conversation the shadow copy no longer names.
_CONVERSATION_ECHO = ("conversation_id", "using_kv_cache")


def side_effect_free(frames: list[bytes]) -> list[bytes]:
    """Mirrored copies that leave no state on the shadow backend (design.md invariant 3):
    without ``conversation_id`` (no conversation is created or extended there) and with
    ``NO_LOAD_FIELD`` (the backend answers an error rather than load the model, and keeps
    no usage record). Frames that are not JSON objects go unchanged."""
    out = []
    for frame in frames:
        try:
            msg = _decode(frame)
        except msgspec.DecodeError:
            out.append(frame)
            continue
        if not isinstance(msg, dict):
            out.append(frame)
            continue
        msg.pop("conversation_id", None)
        msg[NO_LOAD_FIELD] = True
        out.append(_encode(msg))
    return out


def restore_echo(primary: Any, shadow: Any) -> Any:
    """The shadow reply with the conversation echo the primary reply carries (the copy
    was sent without its conversation, so these fields would differ by construction)."""
    if isinstance(primary, dict) and isinstance(shadow, dict):
        for key in _CONVERSATION_ECHO:
            if key in primary and key not in shadow:
                shadow[key] = primary[key]
    return shadow


def caller_reply(op: Op, dialect: str, raw: list[bytes], translate: bool = True) -> Any:
    """A backend's reply frames as the caller would have got them, decoded."""
    if not translate or op.dialect == dialect:
        if len(raw) != 1:
            raise ReplyError(f"expected one reply, got {len(raw)}")
        try:
            return _decode(raw[0])
        except msgspec.DecodeError:
            raise ReplyError(f"reply is not JSON: {raw[0][:80]!r}") from None
    decoded: list[Any] = []
    for frame in raw:
        try:
            value = _decode(frame)
        except msgspec.DecodeError:
            raise ReplyError(f"reply is not JSON: {frame[:80]!r}") from None
        decoded.append(value if isinstance(value, dict) else {"error": "reply not an object"})
    return dialects.render_reply(op, dialects.parse_reply(op, dialect, decoded))


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


def send_all(pool: BackendPool, backend: str, frames: list[bytes],
             timeout_s: float) -> list[asyncio.Future[bytes]]:
    """Send every frame; if one cannot be sent, cancel the others and raise."""
    futures: list[asyncio.Future[bytes]] = []
    try:
        for frame in frames:
            futures.append(pool.request(backend, frame, timeout_s))
    except BackendError:
        for future in futures:
            future.cancel()
        raise
    return futures


async def loaded_models(pool: BackendPool, backend: str, policy: Mapping[str, str],
                        timeout_s: float) -> set[str] | None:
    """The models ``backend`` says are loaded, or None when it could not be asked."""
    op = dialects.parse_request({"command": "GET_LOADED_MODELS_STATUS"}, policy)
    dialect = pool.backends[backend].dialect
    try:
        frames = requests_for(op, dialect, None, policy)
        raw = await asyncio.gather(*send_all(pool, backend, frames, timeout_s))
    except (BackendError, dialects.Unsupported):
        return None
    replies: list[Any] = []
    for frame in raw:
        try:
            replies.append(_decode(frame))
        except msgspec.DecodeError:
            replies.append({"error": "reply is not valid JSON"})
    result = dialects.parse_reply(op, dialect, replies)
    if not result.ok or result.loaded_models is None:
        return None
    return set(result.loaded_models)


# -- the addon -------------------------------------------------------------------------

@dataclass(slots=True)
class _Job:
    """One mirrored request whose replies are on their way."""

    op: Op
    primary: str
    target: str
    target_dialect: str
    translate: bool
    reply: bytes
    shadow_frames: int
    secondary_dialect: str | None
    secondary_translate: bool


class Shadow:
    """The shadow addon: mirrors, compares, records. Started and stopped with the shim."""

    def __init__(self, proxy: Proxy, cfg: ShimConfig, ctx: zmq.Context[zmq.Socket[bytes]],
                 ownership: Ownership | None) -> None:
        self._proxy = proxy
        self._pool = proxy.pool
        self._cfg = cfg
        self._policy = cfg.policy
        self._metrics: Metrics = proxy.metrics
        self._ownership = ownership
        self._sticky_key = cfg.routing.sticky_key
        self._poll_s = cfg.ownership.poll_interval_ms / 1000
        self._settings: ShadowSection = cfg.shadow
        self.rules = Rules(cfg.shadow.compare)
        self._log_failed = False
        self._closing: set[asyncio.Future[None]] = set()
        self.inflight = 0
        self.skipped_not_loaded = 0
        self._jobs: set[asyncio.Future[list[Any]]] = set()
        self._difflog: DiffLog | None = None
        #: Loaded models per backend from our own polls (when ownership is off) and per
        #: secondary; (backend, model) -> when the data path saw it unloaded there.
        self.loaded: dict[str, set[str]] = {}
        self.secondary_loaded: dict[str, set[str]] = {}
        #: Bounded: one entry per unload through the shim, kept only while it matters.
        self._unloaded: BoundedDict[tuple[str, str], float] = BoundedDict(
            MAX_UNLOADED, ttl_s=_UNLOAD_GRACE_POLLS * self._poll_s)
        self._poller: asyncio.Task[None] | None = None
        self.secondaries: BackendPool | None = None
        twins = {name: BackendConfig(dialect=b.dialect, endpoints=[b.secondary],
                                     timeout_ms=b.timeout_ms)
                 for name, b in cfg.backends.items() if b.secondary}
        if twins:  # a pool of their own, with metrics of their own: not the live ones
            self.secondaries = BackendPool(asyncio.get_running_loop(), ctx, twins, cfg.health,
                                           Metrics())

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._ownership is None or self.secondaries is not None:
            self._poller = asyncio.create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        for job in list(self._jobs):
            job.cancel()
        if self.secondaries is not None:
            self.secondaries.close()
        if self._difflog is not None:
            await asyncio.to_thread(self._difflog.close)
        if self._closing:
            await asyncio.wait(set(self._closing), timeout=5.0)

    def admin_commands(self) -> dict[str, Any]:
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
        """Take a reloaded config's compare rules and diff log settings (the admin's
        ``reload``); a diff log that moved is closed and the new one opened on first use.
        Percent, max_inflight and timeout come with the Runtime and need nothing here."""
        self.rules = Rules(settings.compare)
        old, self._settings, self._log_failed = self._difflog, settings, False
        if old is not None and (old.path != Path(settings.diff_log)
                                or old.max_bytes != settings.diff_log_max_bytes
                                or old.backups != settings.diff_log_backups):
            self._difflog = None
            task = asyncio.get_running_loop().run_in_executor(None, old.close)
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # -- the addon hooks -----------------------------------------------------------------

    def route(self, op: Op, candidates: list[str], rt: Runtime) -> list[str]:
        return candidates

    def before_send(self, op: Op, backend: str) -> None:
        return None

    def after_send(self, op: Op, backend: str, reply: bytes | None) -> None:
        if op.kind is Kind.UNLOAD and op.model_id:
            self._unloaded[(backend, op.model_id)] = time.monotonic()

    def after_reply(self, op: Op, backend: str, request: bytes, reply: bytes,
                    rt: Runtime) -> None:
        if rt.mode != "shadow":
            return
        try:
            self._mirror(op, backend, request, reply, rt)
        except Exception:  # the client has its reply; a shadow bug must not cost it more
            log.exception("shadow: cannot mirror a %s request", op.kind.value)

    # -- mirroring -----------------------------------------------------------------------

    def _mirror(self, op: Op, primary: str, request: bytes, reply: bytes, rt: Runtime) -> None:
        action = op.kind.value
        rule = rt.rules[action]
        if rule.mirror == "never":
            return
        target = next((n for n in self._pool.backends if n != primary), None)
        if target is None or not self._sampled(op, rt.shadow):
            return
        if rule.mirror == "if_loaded" and not self.is_loaded(target, op.model_id):
            self.skipped_not_loaded += 1
            return
        if self.inflight >= rt.shadow.max_inflight:
            self._record(action, "shed")
            return
        timeout = rt.shadow.timeout_ms / 1000
        dialect = self._pool.backends[target].dialect
        translate = rule.translate and op.dialect != dialect
        try:
            frames = side_effect_free(
                requests_for(op, dialect, request, self._policy, translate))
            futures = send_all(self._pool, target, frames, timeout)
        except (dialects.Unsupported, BackendError) as exc:
            self._error(op, target, "shadow_error", str(exc))
            return
        shadow_frames = len(futures)
        secondary_dialect: str | None = None
        secondary_translate = False
        twins = self.secondaries
        if twins is not None and primary in twins.backends and (
                rule.mirror != "if_loaded" or op.model_id in
                self.secondary_loaded.get(primary, ())):
            secondary_dialect = twins.backends[primary].dialect
            secondary_translate = rule.translate and op.dialect != secondary_dialect
            try:
                frames = side_effect_free(requests_for(op, secondary_dialect, request,
                                                       self._policy, secondary_translate))
                futures += send_all(twins, primary, frames, timeout)
            except (dialects.Unsupported, BackendError):
                secondary_dialect = None  # compare without calibration
        job = _Job(op, primary, target, dialect, translate, reply, shadow_frames,
                   secondary_dialect, secondary_translate)
        gathered = asyncio.gather(*futures, return_exceptions=True)
        self.inflight += 1
        self._jobs.add(gathered)
        gathered.add_done_callback(lambda g: self._finish(job, g))

    def _sampled(self, op: Op, settings: ShadowSettings) -> bool:
        key = op.raw.get(self._sticky_key) if settings.sticky and self._sticky_key else None
        return in_sample(key, settings.percent)

    def is_loaded(self, backend: str, model: str | None) -> bool:
        """Is ``model`` loaded on ``backend`` as far as we know, and safe to send to?

        With ownership on, the model must be in that backend's last poll, not moving,
        and either shared (allowed on both) or owned by that backend; in any case not
        unloaded through the shim since the last polls.
        """
        if not model:
            return False
        unloaded = self._unloaded.get((backend, model))
        if unloaded is not None:
            if time.monotonic() - unloaded < _UNLOAD_GRACE_POLLS * self._poll_s:
                return False
            self._unloaded.pop((backend, model))
        own = self._ownership
        if own is None:
            return model in self.loaded.get(backend, ())
        if model not in own.loaded.get(backend, ()) or model in own.moves:
            return False
        return model in self._cfg.ownership.shared_models or own.owner.get(model) == backend

    # -- comparing -----------------------------------------------------------------------

    def _finish(self, job: _Job, gathered: asyncio.Future[list[Any]]) -> None:
        self.inflight -= 1
        self._jobs.discard(gathered)
        if gathered.cancelled():
            return
        try:
            self._compare(job, gathered.result())
        except Exception:
            log.exception("shadow: cannot compare a %s reply", job.op.kind.value)

    def _compare(self, job: _Job, results: list[Any]) -> None:
        op = job.op
        shadow_raw, twin_raw = results[: job.shadow_frames], results[job.shadow_frames:]
        failed = next((r for r in shadow_raw if isinstance(r, BaseException)), None)
        if failed is not None:
            outcome = "shadow_timeout" if isinstance(failed, BackendTimeout) else "shadow_error"
            self._error(op, job.target, outcome, str(failed))
            return
        try:
            shadow = caller_reply(op, job.target_dialect, shadow_raw, job.translate)
        except ReplyError as exc:
            self._error(op, job.target, "shadow_error", str(exc))
            return
        try:
            primary: Any = _decode(job.reply)
        except msgspec.DecodeError:
            primary = f"<not JSON: {job.reply[:80]!r}>"
        twin: Any = None
        calibrated = False
        if job.secondary_dialect is not None and twin_raw and \
                not any(isinstance(r, BaseException) for r in twin_raw):
            with contextlib.suppress(ReplyError):
                twin = caller_reply(op, job.secondary_dialect, twin_raw,
                                    job.secondary_translate)
                calibrated = True
        shadow = restore_echo(primary, shadow)
        if twin is not None:
            twin = restore_echo(primary, twin)
        rules = self.rules.for_action(op.kind.value)
        diffs, noise = judge(rules, primary, shadow, twin, calibrated)
        self._record(op.kind.value, "mismatch" if diffs else "match",
                     {generalize(d.path) for d in noise})
        if diffs and self.difflog is not None:
            self.difflog.write(diff_record(op, job.primary, job.target, primary, shadow,
                                           diffs, noise, twin))

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

    # -- polling (only what ownership does not already tell us) --------------------------

    async def _poll_forever(self) -> None:
        while True:
            try:
                if self._proxy.runtime.mode == "shadow":
                    await self.poll_once()
            except Exception:
                log.exception("shadow: loaded-models poll failed")
            await asyncio.sleep(self._poll_s)

    async def poll_once(self) -> None:
        """Refresh what is loaded where: the backends when ownership is off, and the
        secondaries."""
        jobs: list[tuple[dict[str, set[str]], str, BackendPool]] = []
        if self._ownership is None:
            jobs += [(self.loaded, name, self._pool) for name in self._pool.backends]
        if self.secondaries is not None:
            jobs += [(self.secondary_loaded, name, self.secondaries)
                     for name in self.secondaries.backends]
        views = await asyncio.gather(*(
            loaded_models(pool, name, self._policy, pool.backends[name].config.timeout_ms
                          / 1000) for _, name, pool in jobs))
        for (table, name, _), models in zip(jobs, views, strict=True):
            if models is None:
                table.pop(name, None)  # unknown: nothing counts as loaded there
            else:
                table[name] = models


__all__ = ["Shadow", "caller_reply", "diff_record", "in_sample", "judge", "loaded_models",
           "requests_for", "send_all"]

"""The compiled data plane's Python side (issue 17): tables in, punted work out.

``shim._core`` (Cython) reads the frontend ROUTER and the backends' DEALERs itself and
forwards, in C, every request it is sure about: one JSON object ``[identity..., b"",
payload]`` in the legacy dialect's action form, whose action the tables below allow
to go fast to the backend its bucket picks, without ``request_id`` (joins by id stay in
Python), ``conversation_id`` (conversation stickiness) or ``command``. Everything else
goes up to Python unchanged through one narrow interface:

- client messages the core did not take: ``Proxy._on_frames((frames, fd))``, exactly as
  the pure-Python reader would have delivered them, or ``(frames, fd, bucket)`` when the
  core drew the request's random routing bucket and the backend it picked cannot take it
  fast (a translated one): Python routes it by that bucket, so the weights' split is the
  same whichever path a request takes;
- backend replies whose correlation id is not the core's (ids with the top bit set are
  the core's; the pool counts up from 1): ``BackendPool._on_reply(endpoint, frames)``;
- the core's own requests that need Python to finish them (a reply it cannot vouch for
  is a JSON object, a deadline that passed, a drain or shutdown that cuts them):
  ``_finish`` here, which answers exactly as ``Proxy._forward`` / ``BackendPool`` would
  have (failover included, by calling ``Proxy._forward`` with the other candidates).

Tables: on every Runtime change (``push``) Python computes, per action, its deadline
(shim.deadlines) and per backend whether a request of that action routed there may go
fast (rule not pinned, not merged, no translation, one endpoint, a backend timeout no
shorter than the deadline, and the health the rule needs); per batch (``_gate``) it
says whether anything may go fast now: accepting, not draining, split mode, and every
addon quiet (shadow off, recorder idle, no unknown addon: those see every request in
Python).

Model ownership (shim.addons.ownership): a generate names its model by ``model_pref``
(resolved through the policy as MMA does). Per policy pref the core holds the backend
the ownership table would send it to without deciding anything (``fast_owner``: owned,
not moving, not shared, where the weights want it), or "ask Python". Such a request
goes to that owner whatever the weights' draw, and never fails over (ownership's route
leaves one candidate). The table tells every change of an owner or a move at once
(``watch``), so the core's copy is current before another request is read. The core
counts its sends and replies per (model, backend), and Python adds them to the table's
in-flight counts after each call into the core and before any other Python runs
(``fast_counts``): a hand-over waits for the core's requests, a poll does not release
a model a request is loading. An action the shim does not know that carries
``model_id``/``model_name``/``model_ids`` goes up to Python.

Counters: the core counts requests, replies, joins, late replies and per (backend,
action) latencies. What the rest of the shim reads between batches (each backend's
successes and requests in flight, the ownership table's counts) is added after every
batch; the metrics (``proxy.counts``, ``shim_requests_total``,
``shim_request_latency_seconds``, ...) before every read of them (``Metrics.refresh``:
a scrape, the status page, ctl status) and at most ``METRICS_LAG_S`` after a batch;
never per request.

Switch: ``shim.fastpath = "off"`` in the config (or ``MMSHIM_FASTPATH=off`` in the
environment, which overrides the config) or a missing compiled module keeps the
pure-Python data path; ``auto`` (default) uses the core when it is built.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client.core import CounterMetricFamily

from shim import dialects
from shim.addons.base import HOOKS, Addon, Flow
from shim.addons.ownership import OK_STATUSES
from shim.dialects.mma import resolve_pref
from shim.dialects.ops import Kind
from shim.errors import (
    BackendBadReply,
    BackendError,
    BackendLost,
    BackendTimeout,
    Code,
    RequestError,
)
from shim.routing import bucket_of
from shim.runtime import Runtime

if TYPE_CHECKING:
    from shim.pool import Endpoint
    from shim.proxy import Proxy

try:
    from shim import _core  # type: ignore[attr-defined]
except ImportError:  # no compiler at install time, or a libzmq we cannot find
    _core = None

log = logging.getLogger("mmshim.fastpath")

#: Messages read per socket per loop pass (as shim.sockets.BatchReader).
BATCH = 256
#: How long the core's counts may wait before they are added to the metrics, when
#: nothing reads them sooner (a read, e.g. a scrape, adds them first: Metrics.refresh).
METRICS_LAG_S = 0.25
#: The legacy dialect's actions the core knows by name (shim.dialects.mma._ACTIONS):
#: only generate may go fast; status is merged, clear_conversation answered locally.
_FAST_KINDS = {Kind.GENERATE, Kind.OTHER}
#: Action rows the core's table holds (_core.MAX_ACTIONS).
_MAX_ROWS = 16
#: Models and model_pref values the core's owner table holds (_core.MAX_MODELS, MAX_PREFS).
_MAX_MODELS = 64
_MAX_PREFS = 64
#: How a legacy action names models (shim.addons.ownership.models_named): generate by
#: ``model_pref`` (1); an action the shim does not know by ``model_id``, ``model_name`` or
#: ``model_ids`` (2: such a request goes up to Python).
_MODELS = {Kind.GENERATE: 1, Kind.OTHER: 2}


def available() -> bool:
    """Whether the compiled core is built and loaded."""
    return _core is not None


def wanted(setting: str = "auto") -> bool:
    """``setting`` (``shim.fastpath``: ``auto`` or ``off``), overridden by the
    environment's ``MMSHIM_FASTPATH`` when set, and the core's presence."""
    return os.environ.get("MMSHIM_FASTPATH", setting).lower() != "off" and available()


def install(proxy: Proxy) -> FastPath | None:
    """Put the compiled core under ``proxy`` (before ``proxy.start()``); None when the
    core is off or unavailable (the pure-Python path stays)."""
    if not wanted(proxy.cfg.shim.fastpath):
        return None
    fast = FastPath(proxy)
    fast.push(proxy.runtime)
    return fast


class FastPath:
    """One per proxy: owns the ``_core.Core`` and the readers that drive it."""

    def __init__(self, proxy: Proxy) -> None:
        assert _core is not None
        self.proxy = proxy
        self._loop = proxy._loop
        pool = proxy.pool
        self.names = list(pool.backends)
        handles: list[int] = []
        self._endpoints: list[Endpoint | None] = []
        for name in self.names:
            backend = pool.backends[name]
            # The core sends to a backend with one endpoint only (the pool picks the
            # least busy of several, which needs its own counts).
            endpoint = backend.endpoints[0] if len(backend.endpoints) == 1 else None
            self._endpoints.append(endpoint)
            handles.append(endpoint.sock.underlying if endpoint is not None else 0)
        cfg = proxy.cfg
        self.core = _core.Core(proxy.frontend.underlying, handles, cfg.shim.max_request_bytes,
                               cfg.shim.max_reply_bytes, cfg.dedup.enabled,
                               cfg.dedup.bytes_window_ms / 1000)
        #: Row -> (action label, rule name) of the tables in force.
        self._rows: list[str] = []
        #: The ownership addon whose table routes requests naming a model (or None;
        #: found when the proxy starts, once the addons are plugged in).
        self._owners: Any = None
        #: Model ids the core's owner table uses (stable while the shim runs).
        self._model_ids: dict[str, int] = {}
        self._model_names: list[str] = []
        #: The models ``model_pref`` values resolve to under the Runtime in force.
        self._policy_models: frozenset[str] = frozenset()
        self._synced_inflight = [0] * len(self.names)
        self._timer: asyncio.TimerHandle | None = None
        #: The pending ``sync_metrics`` (armed after a batch, at most one).
        self._flush: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._sentinel: asyncio.Future[None] | None = None
        self._drain_seen = False
        #: The addons' ``fastpath_quiet`` checks (None: one of them is never quiet) and
        #: the backends, in the core's order (``start``); what ``_gate`` last told the core.
        self._quiet: list[Any] | None = None  # nothing goes fast before start()
        self._backends = [pool.backends[name] for name in self.names]
        self._gate_in_force: tuple[bool, bytes] | None = None
        self._readers: list[_Reader] = []
        #: The sockets whose reader is started (bit 0 the frontend, bit i + 1 backend i)
        #: and those to read on the next pump (their read edge fired, or Python sent on
        #: them: ``_Reader.kick``).
        self._armed = 0
        self._pending = 0
        self._thread = threading.get_ident()
        #: Requests the core forwarded itself (joins included), since the start.
        self.fast_requests = 0
        self._scheduled = False
        # Replace the proxy's frontend reader and the pool's backend readers (same
        # start/stop/kick interface as shim.sockets.BatchReader); every one of them
        # drives the one pump, which reads all the sockets (their read edges interact:
        # a send on one may consume another's).
        front = _Reader(self, proxy.frontend, 1)
        proxy._reader = front  # type: ignore[assignment]
        self._front = front
        for i, endpoint in enumerate(self._endpoints):
            if endpoint is None:
                continue
            assert endpoint.reader is not None
            endpoint.reader.stop()
            reader = _Reader(self, endpoint.sock, 2 << i)
            endpoint.reader = reader  # type: ignore[assignment]
            if endpoint.monitor_reader is not None:  # see _on_monitor
                seen = endpoint.monitor_reader._on_message
                endpoint.monitor_reader._on_message = functools.partial(
                    self._on_monitor, i, seen)
            reader.start()
            self._readers.append(reader)
        proxy.metrics.registry.register(_CoreCollector(self))
        proxy.metrics.registry.before_collect.append(self.sync_metrics)

    def start(self) -> None:
        """Before the proxy reads its first request: the ownership addon (an addon with
        ``fast_owner``, ``watch``, ``fast_counts`` and ``fast_answered``, see
        shim.addons.ownership) routes the requests naming a model from now on."""
        self._owners = next((a for a in self.proxy.addons
                             if getattr(a, "fast_owner", None) is not None), None)
        if self._owners is not None:
            self._owners.watch(self._owner_changed)
        self._quiet = _quiet_checks(self.proxy.addons)
        self.push(self.proxy.runtime)

    def drain_started(self) -> None:
        """The proxy began draining: from now on the core's requests in flight are stood
        for in ``proxy._tasks`` (the drain waits for that to empty, and cancels it at its
        deadline: then the core's requests are cut)."""
        self._drain_seen = True
        self._after_batch()

    @property
    def inflight_untracked(self) -> int:
        """The core's requests in flight that ``proxy._tasks`` does not stand for."""
        return int(self.core.inflight) - (self._sentinel is not None)

    # -- tables -----------------------------------------------------------------------

    def push(self, rt: Runtime) -> None:
        """New tables from ``rt``, installed at once (call on every Runtime swap)."""
        proxy = self.proxy
        table = rt.table
        index = {name: i for i, name in enumerate(self.names)}
        bounds = list(table.bounds)
        owners = [index[n] for n in table.names]
        named = dict(_named_actions())
        for name in proxy.path._deadlines._names:  # unknown actions with a deadline of their own
            named.setdefault(name, Kind.OTHER)
        rows: list[tuple[bytes, int, bytes, int]] = []
        labels: list[str] = []
        for name, kind in named.items():
            rows.append((name.encode(), proxy.path._deadlines.ms(rt, "action", name, kind.value),
                         self._oks(rt, kind, name), _MODELS.get(kind, 0)))
            labels.append(kind.value)
        other: tuple[bytes, int, bytes, int] | None = None
        if len(rows) + 1 < _MAX_ROWS:
            other = (b"", proxy.path._deadlines.ms(rt, "action", None, Kind.OTHER.value),
                     self._oks(rt, Kind.OTHER, None), _MODELS[Kind.OTHER])
            labels.append(Kind.OTHER.value)
        else:  # more names than the core's table holds: those actions stay in Python
            rows = [r for r, label in zip(rows, labels, strict=True)
                    if label != Kind.OTHER.value][: _MAX_ROWS - 1]
            labels = [label for label in labels if label != Kind.OTHER.value][: len(rows)]
        sticky = (proxy.path._sticky_key or "").encode()
        self.core.set_tables(bounds, owners, rows, other, sticky, bucket_of)
        self._rows = labels
        self._push_owners(rt)

    def _push_owners(self, rt: Runtime) -> None:
        """The owner table's view for the core: per ``model_pref`` of the policy, where a
        generate naming it may go fast (its model's ``fast_owner``), else up to Python."""
        if self._owners is None:
            self.core.set_owners(False, [], (-1, -2), [])
            return
        index = {name: i for i, name in enumerate(self.names)}

        def entry(pref: str) -> tuple[int, int]:
            """(model id, backend): >= 0 its fast owner, -1 ask Python, -2 no model."""
            model = resolve_pref(pref, rt.policy)
            if model is None:
                return -1, -2  # names no model: the weights route it
            mid = self._model_id(model)
            owner = self._owners.fast_owner(model, rt) if mid >= 0 else None
            return mid, index.get(owner, -1) if owner is not None else -1

        self._policy_models = frozenset(rt.policy.values())
        if len(rt.policy) > _MAX_PREFS:  # more than the core holds: all up to Python
            self.core.set_owners(True, [], (-1, -1), [])
            return
        prefs = [(pref.encode(), *entry(pref)) for pref in rt.policy]
        # a model_pref not in the policy is MMA's "fast" (shim.dialects.mma.resolve_pref)
        self.core.set_owners(True, prefs, entry("fast"), [s.encode() for s in OK_STATUSES])

    def _model_id(self, model: str) -> int:
        """The core's id for ``model`` (-1 when its table is full: the model stays in
        Python)."""
        mid = self._model_ids.get(model)
        if mid is None:
            if len(self._model_names) >= _MAX_MODELS:
                return -1
            mid = self._model_ids[model] = len(self._model_names)
            self._model_names.append(model)
        return mid

    def _owner_changed(self, model: str) -> None:
        """The ownership table changed ``model``'s owner or move: the core's copy at once
        (before another request is read), when a ``model_pref`` names it."""
        if model in self._policy_models:
            self._push_owners(self.proxy.runtime)

    def _sync_models(self) -> None:
        """The core's sends and replies of requests naming a model, into the ownership
        table (its in-flight counts keep a hand-over and a poll honest)."""
        for mid, b, sent, answered, loaded in self.core.take_models():
            self._owners.fast_counts(self._model_names[mid], self.names[b], sent, answered,
                                     loaded)

    def _oks(self, rt: Runtime, kind: Kind, name: str | None) -> bytes:
        """Per backend: 0 never fast; 1 fast when connected; 2 fast when healthy (a rule
        with failover would otherwise try another backend first)."""
        proxy = self.proxy
        action = kind.value
        rule = rt.rules.get(action)
        if (rule is None or kind not in _FAST_KINDS or rule.pin or rt.mode != "split"
                or (name is not None and name in dialects.MMS_ONLY_ACTIONS)):
            return bytes(len(self.names))
        deadline_ms = proxy.path._deadlines.ms(rt, "action", name, action)
        out = bytearray()
        for i, backend_name in enumerate(self.names):
            backend = proxy.pool.backends[backend_name]
            ok = (self._endpoints[i] is not None
                  and (backend.dialect == dialects.LEGACY or not rule.translate)
                  and backend.config.timeout_ms >= deadline_ms)
            out.append(0 if not ok else 2 if rule.failover else 1)
        return bytes(out)

    def _gate(self) -> None:
        """Whether requests may go fast now and the backends' health (the core calls it
        before the first request of a pump; the core is told only what changed)."""
        try:
            proxy = self.proxy
            rt = proxy.store.current
            enabled = (proxy.accepting and not proxy.draining and rt.mode == "split"
                       and self._quiet is not None and all(q(rt) for q in self._quiet))
            health = bytes([2 if b.healthy else 1 if b.connected else 0
                            for b in self._backends])
        except Exception:  # a bug here must cost speed, never a request
            log.exception("compiled core: cannot compute the gate; nothing goes fast")
            enabled, health = False, bytes(len(self._backends))
        gate = (enabled, health)
        if gate != self._gate_in_force:
            self._gate_in_force = gate
            self.core.set_gate(enabled, health)

    def open_view(self, python_open: Mapping[int, int]) -> Mapping[int, int]:
        """Requests in flight per client connection, Python's and the core's (for the
        drain's ``hang_up_answered``)."""
        if not self.core.inflight:
            return python_open
        merged = dict(python_open)
        for fd in self.core.inflight_fds():
            merged[fd] = merged.get(fd, 0) + 1
        return merged

    # -- pumps ------------------------------------------------------------------------

    def fired(self, bit: int) -> None:
        """A socket's read edge (its ``ZMQ_FD``): pump now, reading that socket."""
        self._pending |= bit
        self.pump()

    def schedule(self) -> None:
        """One pump on the next loop pass, however many sockets asked for it."""
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.pump)

    def pump(self) -> None:
        """Read the sockets that need it (their read edge fired, or something was sent on
        them: ``_pending``) through the core, hand up what needs Python, and pump again
        on the next loop pass when a budget was spent."""
        self._scheduled = False
        proxy = self.proxy
        # The frontend's reader is stopped by a drain's close (or not started yet), the
        # backends' when the pool closes: ``_armed`` has the started ones.
        todo, self._pending = self._pending, 0
        out = self.core.pump(self._armed, todo, BATCH,
                             proxy.draining or bool(proxy.backlog.bytes), self._gate)
        more = False
        if out is not None:  # something for Python
            punted, foreign, resume, parked, more = out
            if self._owners is not None:
                self._sync_models()  # before Python runs: the table sees the core's sends
            for message in punted:
                proxy._on_frames(message)
            for i, frames in foreign:
                proxy.pool._on_reply(self._endpoints[i], frames)  # type: ignore[arg-type]
            for item in resume:
                self._finish(item, None)
            for frames, _fd in parked:  # the client's queue is full: the backlog
                proxy.backlog.park(frames)
        self._after_batch()
        if more:  # a budget was spent: every socket again, after other work
            self._pending |= self._armed
            self.schedule()

    def _after_batch(self) -> None:
        self._sync()
        if self._flush is None:  # the metrics catch up within METRICS_LAG_S at most
            self._flush = self._loop.call_later(METRICS_LAG_S, self._flush_metrics)
        core = self.core
        if core.inflight:
            if self._sentinel is None and self._drain_seen:
                # The drain waits for proxy._tasks to empty; this stands for the core's.
                self._sentinel = self._loop.create_future()
                self._sentinel.add_done_callback(self._sentinel_done)
                self.proxy._tasks.add(self._sentinel)  # type: ignore[arg-type]
            nxt = core.next_deadline()
            if nxt is not None and nxt < self._timer_at:
                self._arm(nxt)
        elif self._sentinel is not None:
            sentinel, self._sentinel = self._sentinel, None
            self.proxy._tasks.discard(sentinel)  # type: ignore[arg-type]
            sentinel.set_result(None)

    def _sentinel_done(self, sentinel: asyncio.Future[None]) -> None:
        if sentinel.cancelled():  # the drain's deadline: cut what the core has in flight
            self.proxy._tasks.discard(sentinel)  # type: ignore[arg-type]
            if self._sentinel is sentinel:
                self._sentinel = None
            for item in self.core.cut_all():
                self._finish(item, RequestError("the shim shut down before a reply came",
                                                Code.SHUTTING_DOWN), cut=True)
            self._sync()

    def _on_monitor(self, i: int, seen: Any, frames: list[bytes]) -> None:
        """After the pool's own handling of a monitor event: a backend connection that
        went fails the core's requests on it at once, as ``BackendPool._fail_endpoint``
        fails its own (BackendLost, then failover where the rule allows)."""
        seen(frames)
        endpoint = self._endpoints[i]
        if endpoint is None or endpoint.connected or not self.core.inflight_of(i):
            return
        name = self.names[i]
        lost = self.core.cut_backend(i)
        if lost:
            self.proxy.pool.backends[name].record_failure()
        for item in lost:
            self._finish(item, BackendLost(
                f"backend {name} went away with the request in flight"))
        self._after_batch()

    # -- deadlines --------------------------------------------------------------------

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        # The core's clock is CLOCK_MONOTONIC, as the loop's and time.perf_counter().
        self._timer = self._loop.call_at(at + 0.0005, self._expire)

    def _expire(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        for item in self.core.expire(time.perf_counter()):
            name = self.names[item[2]]
            backend = self.proxy.pool.backends[name]
            backend.record_failure()
            self.proxy.metrics.timeouts.labels(name).inc()
            self._finish(item, BackendTimeout(f"backend {name} did not answer in time"))
        self._after_batch()

    # -- finishing the core's requests in Python --------------------------------------

    def _finish(self, item: tuple[Any, ...], error: RequestError | None,
                cut: bool = False) -> None:
        """Answer a request the core handed back, as the Python path would have."""
        envs, payload, b, row, started, deadline, frames, fds, model = item
        name = self.names[b]
        proxy = self.proxy
        reply: bytes | None = None
        if error is None:
            try:
                reply = self._check_reply(name, frames)
            except BackendBadReply as exc:
                error = exc
        if model >= 0:  # ownership's after_send: the core counted it sent, not answered
            self._sync_models()
            self._owners.fast_answered(self._model_names[model], name, reply)
        if reply is not None:
            self._answer(envs, fds, [reply])
            proxy.metrics.record_request(name, self._label(row), "ok",
                                         time.perf_counter() - started)
            return
        assert error is not None
        if cut:  # shutting down: answered now, before the frontend closes
            msg = _decode_or_none(payload)
            self._answer(envs, fds, proxy.path.error_frames(msg, error.code, error.message))
            proxy.metrics.record_request("none", self._label(row), error.code,
                                         time.perf_counter() - started)
            return
        task = self._loop.create_task(self._after_error(
            envs, fds, payload, name, row, started, deadline, error, model >= 0))
        proxy._tasks.add(task)
        task.add_done_callback(proxy._tasks.discard)

    def _check_reply(self, name: str, frames: list[bytes]) -> bytes:
        """BackendPool._on_reply's and Proxy._forward's checks of a passed-through reply."""
        from shim.transport import _json_object

        pool = self.proxy.pool
        if len(frames) != 3 or frames[1]:
            raise BackendBadReply(f"backend {name} sent {len(frames)} frames, expected 3")
        if len(frames[2]) > pool._max_reply:
            self.proxy.metrics.dropped_replies.labels("backend_too_large").inc()
            raise BackendBadReply(
                f"backend {name} sent a reply of {len(frames[2])} bytes, "
                f"over the {pool._max_reply} byte cap (shim.max_reply_bytes)")
        return _json_object(frames[2], name)

    async def _after_error(self, envs: list[list[bytes]], fds: list[int], payload: bytes,
                           name: str, row: int, started: float, deadline: float,
                           error: RequestError, owned: bool) -> None:
        """The rest of ``Proxy._forward`` after the first attempt failed: fail over to the
        other candidates when the rule allows (never for a request sent to its model's
        owner: ownership's route leaves no other candidate), else the error in the
        caller's shape."""
        proxy = self.proxy
        msg: Any = msgspec.json.decode(payload)
        backend, outcome = name, "ok"
        try:
            rt = proxy.runtime
            op = dialects.parse_request(msg, rt.policy)
            rule = rt.rules[op.kind.value]
            rest = [n for n in rt.table.names if n != name]
            if isinstance(error, BackendError) and rule.failover and rest and not owned:
                proxy.metrics.failovers.labels(name, rest[0]).inc()
                flow = Flow([payload], msg, op, rt, started, deadline)
                await proxy.path._forward(flow, op, rest, rule)
                backend, replies = flow.served_by, list(flow.reply or ())
            else:
                raise error
        except RequestError as exc:  # counted under backend "none", as Proxy._handle does
            backend, outcome = "none", exc.code
            replies = proxy.path.error_frames(msg, exc.code, exc.message)
        except Exception as exc:  # a bug costs one error reply, never the shim
            log.exception("internal error finishing a compiled-path request")
            backend, outcome = "none", Code.INTERNAL
            replies = proxy.path.error_frames(msg, outcome, f"internal error: {exc}")
        proxy.metrics.record_request(backend, self._label(row), outcome,
                                     time.perf_counter() - started)
        self._answer(envs, fds, replies)

    def _answer(self, envs: list[list[bytes]], fds: list[int], reply: list[bytes]) -> None:
        send = self.proxy._send
        for envelope, fd in zip(envs, fds, strict=True):
            send(envelope, reply, fd)

    def _label(self, row: int) -> str:
        return self._rows[row] if 0 <= row < len(self._rows) else Kind.OTHER.value

    # -- counters ---------------------------------------------------------------------

    def _sync(self) -> None:
        """After every batch: what the rest of the shim reads between batches (the
        ownership table's counts, each backend's successes, late replies and requests in
        flight). The metrics wait for ``sync_metrics``."""
        if self._owners is not None:
            self._sync_models()
        moved = self.core.take_moved()
        if moved is None:
            return
        metrics = self.proxy.metrics
        for i, late, ok, now in moved:
            if late:
                metrics.late_replies.labels(self.names[i]).inc(late)
            if ok:
                backend = self._backends[i]
                if backend.on_result is None:
                    backend.record_success()
                else:
                    for _ in range(ok):
                        backend.record_success()
            endpoint = self._endpoints[i]
            if endpoint is not None:  # per-backend inflight includes the core's
                endpoint.outstanding += now - self._synced_inflight[i]
                self._synced_inflight[i] = now

    def _flush_metrics(self) -> None:
        self._flush = None
        self.sync_metrics()

    def sync_metrics(self) -> None:
        """Add the core's counts to ``proxy.counts`` and the Prometheus metrics. Run
        before every read of them (``Metrics.refresh``: a scrape, the status page, ctl
        status) and at most ``METRICS_LAG_S`` after a batch; never per request. Only from
        the loop's own thread (another, e.g. prometheus-client's own server, must not
        touch the core while the loop drives it: it reads what the last sync added)."""
        if threading.get_ident() != self._thread:
            return
        counts = self.core.take_counts()
        if counts is None:
            return
        requests, replies, unroutable, joins, rows = counts
        proxy = self.proxy
        metrics = proxy.metrics
        self.fast_requests += requests
        if requests or replies or unroutable:
            counts = proxy.counts
            counts["requests"] += requests
            counts["replies"] += replies
            counts["unroutable"] += unroutable
            if unroutable:
                metrics.unroutable.inc(unroutable)
        if joins:
            metrics.duplicate_joins.labels("bytes").inc(joins)
        for row, b, n, seconds, buckets in rows:
            _add_requests(metrics, self.names[b], self._label(row), n, seconds, buckets)

    def close(self) -> None:
        """Answer what the core has in flight (shutdown) and stop its timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        for item in self.core.cut_all():
            self._finish(item, RequestError("the shim shut down before a reply came",
                                            Code.SHUTTING_DOWN), cut=True)
        self._sync()
        self.sync_metrics()


def _decode_or_none(payload: bytes) -> Any:
    try:
        return msgspec.json.decode(payload)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None


def _add_requests(metrics: Any, backend: str, action: str, n: int, seconds: float,
                  buckets: list[int]) -> None:
    """``n`` requests answered "ok", in bulk: what ``Metrics.record_request`` does ``n``
    times. prometheus-client's histogram child keeps a sum and per-bucket counts
    (``_sum``, ``_buckets``: its own layout, the one the core mirrors)."""
    key = (backend, action, "ok")
    children = metrics._request_children.get(key)
    if children is None:
        children = (metrics.requests.labels(*key), metrics.latency.labels(backend, action))
        metrics._request_children[key] = children
    children[0].inc(n)
    histogram = children[1]
    histogram._sum.inc(seconds)
    for k, count in enumerate(buckets):
        if count:
            histogram._buckets[k].inc(count)


def _named_actions() -> Iterator[tuple[str, Kind]]:
    """The legacy dialect's action names with their own kind (each gets a table row)."""
    from shim.dialects.mma import _ACTIONS

    yield from _ACTIONS.items()
    for name in dialects.MMS_ONLY_ACTIONS:
        yield name, Kind.OTHER


def _quiet_checks(addons: Iterable[Addon]) -> list[Any] | None:
    """How to tell whether the addons need to see no request right now: one with no
    data-path hook (shim.addons.base) never does; the others say so themselves
    (``fastpath_quiet(rt) -> bool``: shadow outside shadow mode, an idle recorder, the
    rollout engine between rollouts, the metrics addon whose counts the core keeps,
    ownership for requests that name no model). None when an addon with a data-path
    hook has no such check: it sees every request, nothing goes fast."""
    checks = []
    for addon in addons:
        if not any(getattr(type(addon), hook) is not getattr(Addon, hook) for hook in HOOKS):
            continue
        own = getattr(addon, "fastpath_quiet", None)
        if own is None:
            return None
        checks.append(own)
    return checks


class _Reader:
    """One socket under the core: ``shim.sockets.BatchReader``'s interface (``start``,
    ``stop``, ``kick``), so the proxy and pool use it unchanged; every event runs the
    shared pump."""

    __slots__ = ("_armed", "_bit", "_fast", "_fd", "sock")

    def __init__(self, fast: FastPath, sock: Any, bit: int) -> None:
        """``bit``: the socket's bit in the core's masks (1 the frontend, 2 << i backend
        i: ``Core.pump``)."""
        import zmq

        self.sock = sock
        self._fast = fast
        self._fd: int = sock.getsockopt(zmq.FD)
        self._armed = False
        self._bit = bit

    def start(self) -> None:
        fast = self._fast
        if not self._armed:
            fast._loop.add_reader(self._fd, fast.fired, self._bit)
            self._armed = True
            fast._armed |= self._bit
        fast._pending |= self._bit
        fast.schedule()

    def stop(self) -> None:
        if self._armed:
            self._fast._loop.remove_reader(self._fd)
            self._armed = False
            self._fast._armed &= ~self._bit

    def kick(self) -> None:
        """Python sent on this socket (the edge may have been consumed): read it on the
        next pump."""
        if self._armed:
            self._fast._pending |= self._bit
            self._fast.schedule()


class _CoreCollector:
    """Brings the core's counters into the metrics at scrape time: they land in the
    existing families (``shim_requests_total``, ...); the one family of its own is
    ``shim_fastpath_requests_total``, how much of that the core carried."""

    def __init__(self, fast: FastPath) -> None:
        self._fast = fast

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[CounterMetricFamily]:
        # The registry ran FastPath.sync_metrics before collecting (Metrics.refresh).
        family = CounterMetricFamily(
            "shim_fastpath_requests", "Requests the compiled core forwarded without Python "
            "(also counted in shim_requests_total and shim_frontend_total)")
        family.add_metric([], self._fast.fast_requests)
        yield family


__all__ = ["FastPath", "available", "install", "wanted"]

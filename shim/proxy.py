"""The data path, top to bottom: frontend -> decode -> route -> hooks -> transport -> reply.

Every request that comes in through the frontend ROUTER leaves through it exactly once:
with the backend's reply, or with the shim's own error reply, before the request's
deadline. ``Proxy`` owns the sockets (frontend, backend pool) and the drain;
``DataPath`` serves one request on a ``Flow`` (shim.addons.base) and needs no socket:
it reaches backends through a transport (shim.transport), so the tests run it on a
typed fake. Behaviour beyond moving requests (model ownership, shadowing, recording,
metrics, the rollout engine) plugs in as addons whose hooks the ``AddonManager`` calls,
each call guarded.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Awaitable
from typing import Any

import msgspec
import zmq

from shim import dialects, fastpath
from shim.addons.base import AddonManager, Flow
from shim.backlog import Backlog
from shim.catalogue import load_catalogue
from shim.config import ShimConfig
from shim.conversations import Conversations
from shim.deadlines import Deadlines
from shim.dedup import Joins, Reply
from shim.dialects import LEGACY
from shim.dialects.ops import Form, Kind, Op, Result
from shim.drain import Connections, listen_socket, release_listener
from shim.errors import (
    BackendError,
    BackendUnavailable,
    BadRequest,
    Code,
    EndpointInUse,
    RequestError,
    Unsupported,
)
from shim.merged import merge
from shim.metrics import Metrics
from shim.pool import BackendPool
from shim.routing import bucket_of, random_bucket
from shim.runtime import Rule, Runtime, RuntimeStore
from shim.sockets import (
    BatchReader,
    Frames,
    bind_or_explain,
    readable,
    recv_frames_fd,
    send_frames,
    split_envelope,
)
from shim.transport import BAD_JSON, Transport, TransportLike

log = logging.getLogger("mmshim.proxy")

_decode = msgspec.json.decode
_encode = msgspec.json.encode
#: An attempt with less time than this left before the request's deadline is not made:
#: the deadline has passed for any practical purpose, and the loop's timers may fire up
#: to a millisecond early (libuv's clock), which would otherwise decide by chance
#: between a failover with nothing left and the deadline's reply.
_MIN_ATTEMPT_S = 0.002
_BAD_JSON = BAD_JSON


class DataPath:
    """One request, from its decoded payload to the reply frames (no sockets here).

    ``handle(flow)`` fills ``flow.reply`` (and ``action``, ``outcome``, ``served_by``,
    ``exchanged``); it never raises except ``CancelledError`` (after setting a
    SHIM_SHUTTING_DOWN reply). Order: decode -> parse -> local / merged answer ->
    ``admit`` (bounded) -> route (weights, ``route`` hooks, health) -> per attempt
    ``before_send`` -> transport -> ``after_send`` -> next candidate on failover.
    """

    def __init__(self, cfg: ShimConfig, loop: asyncio.AbstractEventLoop,
                 transport: TransportLike, metrics: Metrics, *, store: RuntimeStore,
                 addons: AddonManager) -> None:
        self.cfg = cfg
        self.transport = transport
        self.metrics = metrics
        self.store = store
        self.addons = addons
        self._forward_opaque = cfg.shim.opaque == "forward"
        self._grace_s = cfg.shim.reconnect_grace_ms / 1000
        self._deadlines = Deadlines(cfg.deadlines, cfg.shim.default_timeout_ms)
        self._dedup = cfg.dedup.enabled
        self._joins = Joins(cfg.dedup.bytes_window_ms / 1000, metrics.duplicate_joins)
        #: Which backend served each conversation (bounded LRU + TTL).
        self.conversations = Conversations(cfg.conversations)
        catalogue = load_catalogue(cfg.models_file)
        self._quantization = {m: e.quantization for m, e in catalogue.items()}
        self._devices = {name: b.device for name, b in cfg.backends.items()}
        self._dialects = {name: b.dialect for name, b in cfg.backends.items()}
        self._sticky_key = cfg.routing.sticky_key
        self._loop = loop

    def join_bytes(self, body: Frames, future: asyncio.Future[Reply]) -> \
            asyncio.Future[Reply] | None:
        """A re-send of a request in flight (same bytes): the Future of its reply."""
        return self._joins.by_bytes(tuple(body), future) if self._dedup else None

    # -- decode -------------------------------------------------------------------------

    async def handle(self, flow: Flow, future: asyncio.Future[Reply] | None = None) -> None:
        """Serve ``flow``; ``future`` (dedup) gets the reply for requests joined to it."""
        body = flow.body
        msg: object = None
        try:
            msg = _decode(body[0]) if len(body) == 1 else None
        except _BAD_JSON:
            msg = None
        flow.msg = msg
        try:
            if not isinstance(msg, dict):
                flow.action = "opaque"
                await self._opaque(flow)
                return
            try:
                op = flow.op = dialects.parse_request(msg, flow.rt.policy)
            except BadRequest:
                self.metrics.bad_requests.labels("unparsable").inc()
                raise
            flow.action = op.kind.value
            if self._dedup and op.request_id is not None and future is not None:
                joined = self._joins.by_request_id(op.request_id, future)
                if joined is not None:  # same request_id in flight: one execution
                    flow.reply = list(await asyncio.shield(joined))
                    flow.served_by = "joined"
                    return
            await self._serve(flow, op, msg)
        except RequestError as exc:
            flow.exchanged = False
            flow.outcome = exc.code
            flow.reply = self.error_frames(msg, exc.code, exc.message)
        except asyncio.CancelledError:
            flow.exchanged, flow.outcome = False, Code.SHUTTING_DOWN
            flow.reply = self.error_frames(msg, flow.outcome,
                                            "the shim shut down before a reply came")
            raise
        except Exception as exc:  # a bug must cost one error reply, never the shim
            log.exception("internal error handling a request")
            flow.exchanged, flow.outcome = False, Code.INTERNAL
            flow.reply = self.error_frames(msg, flow.outcome, f"internal error: {exc}")

    def error_frames(self, msg: object, code: str, message: str) -> Reply:
        """The shim's error reply in the caller's form (action, command, model access,
        MMS); a request that is not a JSON object gets the action form."""
        form = dialects.form_of(msg)
        return [_encode(dialects.error_reply(form, code, message, _as_dict(msg)))]

    # -- serve: local, merged, or routed --------------------------------------------------

    async def _serve(self, flow: Flow, op: Op, msg: dict[str, Any]) -> None:
        """A decoded request: answered locally, from every backend (merged), or routed."""
        local = self.conversations.local_clear(op, self._dialects)
        if local is not None:
            flow.served_by, flow.reply = "shim", [_encode(local)]
            return
        rt = flow.rt
        action = op.kind.value
        rule = rt.rules[action]
        flow.deadline = flow.started + self._deadlines.ms(rt, op.form.value, op.name,
                                                          action) / 1000
        if self._merge_wanted(rt, op, rule):
            merged = await self._merged(op, flow.deadline)
            if merged is not None:
                flow.served_by, flow.reply = "merged", [merged]
                return
        await self._admit(flow)
        candidates = self._route(flow, op, msg, flow.rt.rules[action])
        await self._forward(flow, op, candidates, flow.rt.rules[action])
        if op.kind is Kind.GENERATE and op.conversation_id is not None and flow.backend:
            self.conversations.served(op.conversation_id, flow.backend)

    async def _admit(self, flow: Flow) -> None:
        """Wait until no addon holds the request back (an ``admit`` hook, e.g. a model
        hand-over in shim.addons.ownership), then route on the runtime in force at that
        instant: the last ``admit`` check and ``_route`` run without yielding between."""
        if not self.addons.wants("admit"):
            return
        for _ in range(100):
            waiting = self.addons.admit(flow)
            if waiting is None:
                return
            await _bounded(waiting, flow.deadline)
            flow.rt = self.store.current
        raise RequestError("the model kept moving; try again", Code.TIMEOUT)

    # -- the merged view of what is loaded --------------------------------------------

    def _merge_wanted(self, rt: Runtime, op: Op, rule: Rule) -> bool:
        if op.dialect != LEGACY or op.kind not in _MERGED_KINDS or rule.pin:
            return False
        mode = self.cfg.merge.loaded
        if mode == "never":
            return False
        # "split": two backends serve traffic (in shadow mode one answers, the other is
        # compared against it, so the answer stays the primary's own).
        return mode == "always" or (rt.mode == "split" and
                                    sum(1 for w in rt.weights.values() if w > 0) > 1)

    async def _merged(self, op: Op, deadline: float) -> bytes | None:
        """status / GET_LOADED_MODELS_STATUS / HEALTH_CHECK from every connected backend,
        merged (shim.merged); None when no backend answered (the caller routes as usual)."""
        # Healthy backends only (an ejected or failing one is not waited for), and half of
        # the time left at most: when no answer is usable, routing still has the rest.
        names = [n for n, b in self.transport.backends.items() if b.healthy]
        timeout = (deadline - time.perf_counter()) / 2
        if not names or timeout <= 0:
            return None
        answers = await asyncio.gather(*(self.transport.call(n, op, timeout) for n in names),
                                       return_exceptions=True)
        results = {n: a for n, a in zip(names, answers, strict=True)
                   if isinstance(a, Result) and a.ok}
        if not results:
            return None
        merged = merge(op, results, self._devices, self._quantization)
        return _encode(dialects.render_reply(op, merged))

    # -- route ----------------------------------------------------------------------------

    def _route(self, flow: Flow, op: Op, msg: dict[str, Any], rule: Rule) -> list[str]:
        """Backends to try, in order: pin, else weights (sticky), then failover."""
        backends = self.transport.backends
        if rule.pin:
            return [rule.pin]
        rt = flow.rt
        key = msg.get(self._sticky_key) if self._sticky_key else None
        bucket = (bucket_of(str(key)) if key is not None
                  else flow.bucket if flow.bucket >= 0 else random_bucket())
        primary = rt.table.backend_for(bucket)
        candidates = [primary, *(n for n in rt.table.names if n != primary)]
        if op.dialect != LEGACY:  # clients already on the new dialect go to it unchanged
            candidates.sort(key=lambda n: backends[n].dialect != op.dialect)
        if rule.translate:
            # A backend whose dialect has no equivalent of the operation is never chosen,
            # whatever the weights (an MMS-dialect request at 100/0 goes to MMS).
            capable = [n for n in candidates if self.transport.can_serve(op, n)]
            if not capable:
                raise Unsupported(f"no backend can serve {op.name or op.kind.value!r}")
            candidates = capable
        candidates = self.conversations.route(op, candidates)
        # An addon may reorder or narrow the list, never widen it (AddonManager.route).
        candidates = self.addons.route(flow, candidates)
        if rule.failover and not all(backends[n].healthy for n in candidates):
            # healthy backends first, the others only as a last resort
            candidates.sort(key=lambda n: not backends[n].healthy)
        return candidates

    # -- hooks and transport, per attempt ---------------------------------------------------

    async def _forward(self, flow: Flow, op: Op, candidates: list[str], rule: Rule) -> None:
        """Send to the first candidate that can serve the request; fail over if allowed.

        A candidate whose dialect has no equivalent of the operation is skipped whatever
        the rule says; one that fails is left for the next only when failover is allowed.
        """
        transport, deadline = self.transport, flow.deadline
        last: RequestError | None = None
        for i, name in enumerate(candidates):
            backend = transport.backends[name]
            translate = rule.translate and op.dialect != backend.dialect
            sent = None
            if translate and op.conversation_id is not None and \
                    not dialects.get(backend.dialect).clears_conversations:
                renamed = self.conversations.backend_id(op.conversation_id)
                if renamed != op.conversation_id:  # cleared by the shim: a fresh start
                    sent = msgspec.structs.replace(op, conversation_id=renamed)
            flow.backend, flow.answer, flow.result = name, None, None
            flow.sent_at = time.perf_counter()
            try:
                for waiting in self.addons.before_send(flow, name):
                    await _bounded(waiting, deadline)
                last_chance = not (rule.failover and i + 1 < len(candidates))
                if last_chance and not backend.connected:
                    # Nothing else to try: a backend known to be restarting has until the
                    # deadline; one that is gone (retired, stopped) is answered for at once.
                    await transport.wait_connected(name, min(
                        deadline - time.perf_counter(), backend.restart_wait_s(self._grace_s)))
                    if not backend.connected:
                        raise BackendUnavailable(f"backend {name} is not connected")
                remaining = deadline - time.perf_counter()
                if remaining < _MIN_ATTEMPT_S:
                    raise RequestError("deadline passed before a backend was free", Code.TIMEOUT)
                timeout = min(remaining, backend.config.timeout_ms / 1000)
                answer = await transport.send(op, name, flow.body[0], timeout,
                                              translate=rule.translate, sent=sent)
                flow.answer, flow.result = answer.reply, answer.result
                flow.reply, flow.served_by, flow.exchanged = [answer.reply], name, True
                return
            except Unsupported as exc:  # no equivalent there, whatever the rule says
                last = exc
                continue
            except BackendError as exc:
                last = exc
                if rule.failover and i + 1 < len(candidates):
                    self.metrics.failovers.labels(name, candidates[i + 1]).inc()
                    continue
                raise last from None
            finally:
                self.addons.after_send(flow, name)  # guarded: never changes the reply
        raise last or BackendUnavailable("no backend is available")

    # -- opaque requests --------------------------------------------------------------------

    async def _opaque(self, flow: Flow) -> None:
        """A request that is not one JSON object (non-JSON, non-object JSON, several
        frames): with ``opaque = "forward"`` its frames go as they are to the legacy-dialect
        backend and its reply frames come back unchanged, whatever they hold (a generic
        ZeroMQ endpoint, protocol.md); with ``"reject"`` it is refused."""
        body, msg, rt = flow.body, flow.msg, flow.rt
        if not self._forward_opaque:
            reason, what = (("frames", f"expected one payload frame, got {len(body)}")
                            if len(body) != 1 else
                            ("not_object", "request must be a JSON object")
                            if msg is not None or body[0].strip() == b"null" else
                            ("not_json", "request is not valid JSON"))
            self.metrics.bad_requests.labels(reason).inc()
            raise BadRequest(what)
        name = self._opaque_backend(rt)
        backend = self.transport.backends[name]
        deadline = flow.deadline = flow.started + self._deadlines.ms(rt, "opaque", None,
                                                                     None) / 1000
        if not backend.connected:
            await self.transport.wait_connected(name, min(
                deadline - time.perf_counter(), backend.restart_wait_s(self._grace_s)))
        timeout = min(deadline - time.perf_counter(), backend.config.timeout_ms / 1000)
        flow.backend = name
        flow.reply = await self.transport.send_frames(name, list(body), timeout)
        flow.served_by = name

    def _opaque_backend(self, rt: Runtime) -> str:
        """``shim.opaque_backend``, else the weighted primary if it speaks the legacy
        dialect, else the first legacy-dialect backend, else the weighted primary."""
        named = self.cfg.shim.opaque_backend
        if named:
            return named
        primary = rt.table.backend_for(random_bucket())
        if self._dialects.get(primary) == LEGACY:
            return primary
        return next((n for n, d in self._dialects.items() if d == LEGACY), primary)


class Proxy:
    """Owns the frontend socket, the backend pool and the runtime config."""

    def __init__(self, cfg: ShimConfig, loop: asyncio.AbstractEventLoop,
                 ctx: zmq.Context[zmq.Socket[bytes]], metrics: Metrics, *,
                 store: RuntimeStore, addons: AddonManager) -> None:
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self.addons = addons
        self._loop = loop
        self._max_bytes = cfg.shim.max_request_bytes
        self._tasks: set[asyncio.Task[None]] = set()
        self.accepting = True
        #: Once nothing is in flight: requests == replies + unroutable (vanished clients).
        self.counts = {"requests": 0, "replies": 0, "unroutable": 0}

        #: Requests in flight per client connection (descriptor), for the drain.
        self._open: dict[int, int] = {}
        self.draining = False
        #: True once the listening socket was handed back to the kernel (shim.drain): the
        #: frontend must then never be closed; the process exits instead.
        self.listener_released = False
        #: Whether a drain may release the listener (only a process that exits after the
        #: drain: ``mmshim run``); otherwise it closes at a quiet moment.
        self.release_on_drain = False
        #: While draining: when a request last came in or a reply went out (monotonic).
        self._last_activity = 0.0

        # Ours, so that a drain can release it (shim.drain); first, so that an endpoint
        # in use leaves no socket behind.
        listener = _listen(cfg.shim.listen)
        self.frontend = ctx.socket(zmq.ROUTER)
        self.frontend.setsockopt(zmq.LINGER, 0)
        self.frontend.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A client that reconnects under the routing id of a closed peer (a REQ re-made
        # with the same identity) takes the id over instead of being ignored.
        self.frontend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # Bounded memory per client: a few replies queued (then dropped and counted), a
        # bounded inbound queue, and no frame above the hard cap ever buffered whole.
        self.frontend.setsockopt(zmq.SNDHWM, cfg.shim.peer_send_hwm)
        self.frontend.setsockopt(zmq.RCVHWM, cfg.shim.peer_recv_hwm)
        self.frontend.setsockopt(zmq.MAXMSGSIZE, cfg.shim.max_frame_bytes)
        #: The listening descriptor, owned by libzmq from the bind on (never closed here).
        self._listen_fd: int | None = None
        if listener is not None:
            self.frontend.setsockopt(zmq.USE_FD, listener.fileno())
        try:
            bind_or_explain(self.frontend, cfg.shim.listen, "listen")  # closes it on failure
        except BaseException:
            if listener is not None:
                listener.close()
            raise
        if listener is not None:
            self._listen_fd = listener.detach()  # libzmq closes it with the frontend
        self.connections = Connections(loop, self.frontend)
        self._reader = BatchReader(loop, self.frontend, self._on_frames, recv=recv_frames_fd)
        self.backlog = Backlog(loop, self.frontend, peer_bytes=cfg.shim.peer_backlog_bytes,
                               total_bytes=cfg.shim.backlog_bytes, ttl_s=cfg.shim.backlog_ttl_s,
                               on_sent=self._sent_late, on_dropped=self._dropped,
                               on_unroutable=self._unroutable,
                               on_tried=lambda: self._reader.kick())
        self.pool = BackendPool(loop, ctx, cfg.backends, cfg.health, metrics,
                                max_reply_bytes=cfg.shim.max_reply_bytes,
                                max_frame_bytes=cfg.shim.max_frame_bytes)
        self.transport = Transport(self.pool, load_catalogue(cfg.models_file),
                                   lambda: store.current.policy)
        self.path = DataPath(cfg, loop, self.transport, metrics, store=store, addons=addons)
        #: Which backend served each conversation (the data path's; status reads it).
        self.conversations = self.path.conversations
        metrics.export_counts(lambda: self.counts)
        #: The compiled data plane (shim.fastpath, issue 17): it takes over reading the
        #: sockets and hands up what needs Python; None: the pure-Python path.
        self.fastpath: fastpath.FastPath | None = fastpath.install(self)
        if self.fastpath is not None:  # the core's tables change with every swap, at once
            store.subscribe(lambda old, new: self.fastpath.push(new) if self.fastpath else None)

    def start(self) -> None:
        if self.fastpath is not None:
            self.fastpath.start()  # the addons are plugged in by now
        self._reader.start()

    @property
    def runtime(self) -> Runtime:
        """The Runtime in force (``store.current``); the control plane swaps the store."""
        return self.store.current

    # -- 1. frontend -----------------------------------------------------------------

    def _on_frames(self, message: tuple[Frames, int] | tuple[Frames, int, int]) -> None:
        """One multipart message from a client: ``[identity..., b"", payload]``, the
        descriptor of the connection it came on (for the drain: shim.drain), and from the
        compiled core the random routing bucket it drew already (shim.fastpath)."""
        frames, fd = message[0], message[1]
        bucket = message[2] if len(message) > 2 else -1
        self.counts["requests"] += 1
        if self.draining:
            self._last_activity = time.monotonic()
            self.connections.received(fd)
        split = split_envelope(frames)
        if split is None:
            # A DEALER that sent no delimiter: answer it the way it can read.
            self._bad_request([*frames[:1], b""], None, "envelope",
                              "missing empty delimiter frame", fd)
            return
        envelope, body = split
        size = sum(map(len, body))
        if not body:
            self._bad_request(envelope, None, "frames", "request has no payload frame", fd)
        elif size > self._max_bytes:
            self._bad_request(envelope, _sniff_form(body[0]), "too_large",
                              f"request of {size} bytes exceeds the shim's limit of "
                              f"{self._max_bytes} bytes (shim.max_request_bytes)", fd)
        elif not self.accepting:
            self._send(envelope, self.path.error_frames(
                _peek(body), Code.SHUTTING_DOWN, "the shim is shutting down"), fd)
        else:
            self._open[fd] = self._open.get(fd, 0) + 1
            future: asyncio.Future[Reply] = self._loop.create_future()
            joined = self.path.join_bytes(body, future)
            if joined is not None:  # a re-send of a request in flight: its reply is ours
                joined.add_done_callback(
                    lambda f: self._answer_joined(envelope, f.result(), fd))
                return
            task = self._loop.create_task(self._handle(envelope, body, future, fd, bucket))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _answer_joined(self, envelope: Frames, reply: Reply, fd: int) -> None:
        self._send(envelope, reply, fd)
        self._settled(fd)

    def _settled(self, fd: int) -> None:
        """One request on connection ``fd`` has had its reply sent (for the drain)."""
        left = self._open.get(fd, 1) - 1
        if left > 0:
            self._open[fd] = left
        else:
            self._open.pop(fd, None)

    def _send(self, envelope: Frames, reply: Reply, fd: int = -1) -> None:
        frames = [*envelope, *reply]
        if self.draining:
            self._last_activity = time.monotonic()
            self.connections.sent(fd, sum(map(len, reply)))
        if self.backlog.holds(envelope[0]):  # behind its earlier replies, in order
            self.backlog.park(frames)
            return
        try:
            send_frames(self.frontend, frames)
            self.counts["replies"] += 1
        except zmq.Again:
            # Its send queue is full (shim.peer_send_hwm): wait in the bounded backlog.
            self.backlog.park(frames)
        except zmq.ZMQError:
            # ROUTER_MANDATORY: the client has gone; count, move on.
            self._unroutable()
        self._reader.kick()

    def _sent_late(self) -> None:
        self.counts["replies"] += 1

    def _dropped(self, reason: str) -> None:
        self.counts["unroutable"] += 1
        self.metrics.dropped_replies.labels(reason).inc()

    def _unroutable(self) -> None:
        self.counts["unroutable"] += 1
        self.metrics.unroutable.inc()

    def _bad_request(self, envelope: Frames, form: Form | None, reason: str,
                     message: str, fd: int = -1) -> None:
        self.metrics.bad_requests.labels(reason).inc()
        reply = dialects.error_reply(form or Form.ACTION, Code.BAD_REQUEST, message)
        self._send(envelope, [_encode(reply)], fd)

    # -- 2..5. one request: the data path, then the one reply --------------------------

    async def _handle(self, envelope: Frames, body: Frames,
                      future: asyncio.Future[Reply], fd: int = -1, bucket: int = -1) -> None:
        """Serve one request; its reply also answers every duplicate that joined it."""
        started = time.perf_counter()
        # The Runtime is read once: a concurrent change applies to the next request.
        flow = Flow(body, None, None, self.store.current, started, started)
        flow.bucket = bucket
        try:
            await self.path.handle(flow, future)
        finally:
            reply = flow.reply or []
            if not future.done():
                future.set_result(reply)
            self._send(envelope, reply, fd)
            self._settled(fd)
            self.addons.after_reply(flow)  # guarded: the client has its one reply

    # -- lifecycle -------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        """Requests in flight: Python's tasks and the compiled core's."""
        extra = self.fastpath.inflight_untracked if self.fastpath is not None else 0
        return len(self._tasks) + extra

    async def drain(self, timeout_s: float, quiet_s: float = 0.05) -> int:
        """Stop accepting connections, answer every request received (in flight or
        arriving on a connection already made), close each connection right after its
        replies have reached the client (shim.drain), and stop when none is left.

        A frontend on ipc:// (no listening socket of ours to release) is closed instead
        at the first moment when nothing is in flight and nothing came in or went out for
        ``quiet_s``. At ``timeout_s`` whatever is still in flight is answered
        SHIM_SHUTTING_DOWN. Returns how many requests had to be cut short.
        """
        self.draining = True
        if self.fastpath is not None:
            self.fastpath.drain_started()
        self._last_activity = time.monotonic()
        deadline = self._last_activity + timeout_s
        if self._listen_fd is not None and self.release_on_drain:
            release_listener(self._listen_fd)
            self.listener_released = True
            _RELEASED.append(self.frontend)  # never garbage-collected, so never closed
            self.connections.start_drain()
        while time.monotonic() < deadline:
            if self.listener_released:
                self.connections.hang_up_answered(
                    self._open if self.fastpath is None else self.fastpath.open_view(self._open))
                if self.connections.open == 0 and not self._tasks and not self.backlog.bytes:
                    log.info("drained: every client connection closed after its reply")
                    return 0
            elif not self._tasks and not self.backlog.bytes:
                if readable(self.frontend):
                    self._reader.kick()  # the check took the socket's read edge: read it
                elif time.monotonic() - self._last_activity >= quiet_s:
                    self.close_frontend()
                    return 0
            await asyncio.sleep(0.005)
        self.accepting = False  # from now on: SHIM_SHUTTING_DOWN
        cut = list(self._tasks)
        for task in cut:
            task.cancel()
        if cut:
            await asyncio.wait(cut, timeout=1.0)
        if self.listener_released:  # give the last replies a moment to reach the clients
            flush_by = time.monotonic() + 1.0
            while self.connections.open and time.monotonic() < flush_by:
                self.connections.hang_up_answered(self._open)
                await asyncio.sleep(0.005)
            self.connections.hang_up_all()
        self.close_frontend()
        return len(cut)

    def close_frontend(self, linger_ms: int = 1000) -> None:
        """Stop reading and close the frontend; queued replies get ``linger_ms`` to go.
        After the listener was released the socket is left open (see shim.drain)."""
        self._reader.stop()
        if not self.frontend.closed and not self.listener_released:
            self.frontend.close(linger_ms)

    def close(self, linger_ms: int = 0) -> None:
        """Close the sockets; replies still queued get ``linger_ms`` to be sent."""
        if self.fastpath is not None:
            self.fastpath.close()  # answers what the core has in flight
        self.backlog.drop_all()
        self.connections.close()
        self.close_frontend(linger_ms)
        self.pool.close()


#: Frontends whose listener was released (shim.drain): libzmq must never close them.
_RELEASED: list[zmq.Socket[bytes]] = []


def _listen(endpoint: str) -> socket.socket | None:
    try:
        return listen_socket(endpoint)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise EndpointInUse(f"listen endpoint {endpoint} is already in use "
                                "(is the old model manager still holding it?)") from None
        raise EndpointInUse(f"cannot bind listen endpoint {endpoint}: {exc}") from None


_MERGED_KINDS = frozenset({Kind.STATUS, Kind.LOADED_STATUS, Kind.HEALTH})


def _peek(body: Frames) -> object:
    """The request decoded when it is one JSON frame (for the shape of an error), else
    None."""
    if len(body) != 1:
        return None
    try:
        return _decode(body[0])
    except _BAD_JSON:
        return None


def _sniff_form(payload: bytes) -> Form:
    """The form of a request too large to decode, guessed from its keys."""
    if b'"action"' in payload:
        return Form.ACTION
    if b'"command"' in payload:
        return Form.COMMAND
    if b'"model_id"' in payload:
        return Form.MODEL_ACCESS
    return Form.ACTION


def _as_dict(msg: object) -> dict[str, Any] | None:
    return msg if isinstance(msg, dict) else None


async def _bounded(waiting: Awaitable[Any], deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    try:
        await asyncio.wait_for(waiting, max(0.0, remaining))
    except TimeoutError:
        raise RequestError("timed out waiting for a model hand-over", Code.TIMEOUT) from None


__all__ = ["DataPath", "Form", "Proxy"]

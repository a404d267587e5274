"""The data path, top to bottom: frontend -> decode -> route -> translate -> backend -> reply.

Every request that comes in through the frontend ROUTER leaves through it exactly once:
with the backend's reply, or with the shim's own error reply, before the request's
deadline. Behaviour beyond moving requests (model ownership, shadowing) plugs in as
addons with four hooks (``Addon``), so the core stays readable.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections.abc import Awaitable
from typing import Any, Protocol

import msgspec
import zmq

from shim import dialects, fastpath
from shim.backlog import Backlog
from shim.catalogue import load_catalogue
from shim.config import ShimConfig
from shim.conversations import Conversations
from shim.deadlines import Deadlines
from shim.dedup import Joins, Reply
from shim.dialects.ops import Form, Kind, Op, Result
from shim.drain import Connections, listen_socket, release_listener
from shim.errors import (
    BackendBadReply,
    BackendError,
    BackendUnavailable,
    BadRequest,
    Code,
    EndpointInUse,
    RequestError,
    Unsupported,
)
from shim.merged import label_devices, merge
from shim.metrics import Metrics
from shim.pool import BackendPool
from shim.routing import bucket_of, random_bucket
from shim.runtime import Rule, Runtime, runtime_from_config
from shim.sockets import BatchReader, Frames, bind_or_explain, readable, recv_frames_fd, send_frames

log = logging.getLogger("mmshim.proxy")

_decode = msgspec.json.decode
_encode = msgspec.json.encode
#: What msgspec raises on bad JSON: deep nesting and invalid UTF-8 escape DecodeError.
_BAD_JSON = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


class _AnyObject(msgspec.Struct):
    """Decoding into this checks "a JSON object" without building its values."""


_check_object = msgspec.json.Decoder(_AnyObject).decode


def _json_object(reply: bytes, backend: str) -> bytes:
    """A passed-through reply, checked to be a JSON object (else BackendBadReply)."""
    try:
        _check_object(reply)
    except (*_BAD_JSON, msgspec.ValidationError):
        raise BackendBadReply(f"backend {backend} sent a reply that is not a JSON object") \
            from None
    return reply


class Addon(Protocol):
    """A behaviour plugged into the data path (see shim.ownership, shim.shadow)."""

    def route(self, op: Op, candidates: list[str], rt: Runtime) -> list[str]:
        """Reorder or narrow the backends a request may go to."""
        ...

    def before_send(self, op: Op, backend: str) -> Awaitable[None] | None:
        """Something to wait for before the request goes out (bounded by its deadline)."""
        ...

    def after_send(self, op: Op, backend: str, reply: bytes | None) -> None:
        """One attempt on ``backend`` ended: with the caller-dialect reply, or None."""
        ...

    def after_reply(self, op: Op, backend: str, request: bytes, reply: bytes,
                    rt: Runtime) -> None:
        """See a successful exchange, after the client has its reply."""
        ...


class Proxy:
    """Owns the frontend socket, the backend pool and the runtime config."""

    def __init__(self, cfg: ShimConfig, loop: asyncio.AbstractEventLoop,
                 ctx: zmq.Context[zmq.Socket[bytes]], metrics: Metrics) -> None:
        self.cfg = cfg
        #: The compiled data plane (shim.fastpath, issue 17) once installed, else None.
        self.fastpath: fastpath.FastPath | None = None
        self.policy = cfg.policy
        self.runtime: Runtime = runtime_from_config(cfg)
        self.metrics = metrics
        self.addons: list[Addon] = []
        self._loop = loop
        self._max_bytes = cfg.shim.max_request_bytes
        self._forward_opaque = cfg.shim.opaque == "forward"
        self._grace_s = cfg.shim.reconnect_grace_ms / 1000
        self._deadlines = Deadlines(cfg.deadlines, cfg.shim.default_timeout_ms)
        self._dedup = cfg.dedup.enabled
        self._joins = Joins(cfg.dedup.bytes_window_ms / 1000, metrics.duplicate_joins)
        #: Which backend served each conversation (bounded LRU + TTL).
        self.conversations = Conversations(cfg.conversations)
        self._catalogue = load_catalogue(cfg.models_file)
        self._quantization = {m: e.quantization for m, e in self._catalogue.items()}
        self._devices = {name: b.device for name, b in cfg.backends.items()}
        self._dialects = {name: b.dialect for name, b in cfg.backends.items()}
        self._sticky_key = cfg.routing.sticky_key
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
                               on_unroutable=self._unroutable)
        self.pool = BackendPool(loop, ctx, cfg.backends, cfg.health, metrics,
                                max_reply_bytes=cfg.shim.max_reply_bytes,
                                max_frame_bytes=cfg.shim.max_frame_bytes)
        metrics.export_counts(lambda: self.counts)
        self.set_runtime(self.runtime)
        self.fastpath = fastpath.install(self)  # replaces the readers; None: pure Python

    def start(self) -> None:
        self._reader.start()

    def set_runtime(self, rt: Runtime) -> None:
        """Swap the runtime config; requests already routed keep what they had."""
        self.runtime = rt
        if self.fastpath is not None:
            self.fastpath.push(rt)  # the core's tables change with the runtime, at once
        for name in self.pool.backends:
            self.metrics.weight.labels(name).set(rt.weights.get(name, 0.0))

    # -- 1. frontend -----------------------------------------------------------------

    def _on_frames(self, message: tuple[Frames, int]) -> None:
        """One multipart message from a client: ``[identity..., b"", payload]``, and the
        descriptor of the connection it came on (for the drain: shim.drain)."""
        frames, fd = message
        self.counts["requests"] += 1
        if self.draining:
            self._last_activity = time.monotonic()
            self.connections.received(fd)
        try:
            split = frames.index(b"", 1)
        except ValueError:
            # A DEALER that sent no delimiter: answer it the way it can read.
            self._bad_request([*frames[:1], b""], None, "envelope",
                              "missing empty delimiter frame", fd)
            return
        envelope, body = frames[: split + 1], frames[split + 1 :]
        size = sum(map(len, body))
        if not body:
            self._bad_request(envelope, None, "frames", "request has no payload frame", fd)
        elif size > self._max_bytes:
            self._bad_request(envelope, _sniff_form(body[0]), "too_large",
                              f"request of {size} bytes exceeds the shim's limit of "
                              f"{self._max_bytes} bytes (shim.max_request_bytes)", fd)
        elif not self.accepting:
            self._send(envelope, self._error_frames(
                _peek(body), Code.SHUTTING_DOWN, "the shim is shutting down"), fd)
        else:
            self._open[fd] = self._open.get(fd, 0) + 1
            future: asyncio.Future[Reply] = self._loop.create_future()
            joined = self._joins.by_bytes(tuple(body), future) if self._dedup else None
            if joined is not None:  # a re-send of a request in flight: its reply is ours
                joined.add_done_callback(
                    lambda f: self._answer_joined(envelope, f.result(), fd))
                return
            task = self._loop.create_task(self._handle(envelope, body, future, fd))
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
        self._reader.kick()

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

    def _error_frames(self, msg: object, code: str, message: str) -> Reply:
        """The shim's error reply in the caller's form (action, command, model access,
        MMS); a request that is not a JSON object gets the action form."""
        form = dialects.form_of(msg)
        return [_encode(dialects.error_reply(form, code, message, _as_dict(msg)))]

    # -- 2..5. one request -----------------------------------------------------------

    async def _handle(self, envelope: Frames, body: Frames,
                      future: asyncio.Future[Reply], fd: int = -1) -> None:
        """Serve one request; its reply also answers every duplicate that joined it."""
        started = time.perf_counter()
        rt = self.runtime  # read once: a concurrent change applies to the next request
        msg: object = None
        op: Op | None = None
        backend, action, outcome = "none", "unknown", "ok"
        reply: Reply = []
        try:
            msg = _decode(body[0]) if len(body) == 1 else None
        except _BAD_JSON:
            msg = None
        try:
            if not isinstance(msg, dict):
                action = "opaque"
                backend, reply = await self._opaque(rt, body, msg, started)
                return
            try:
                op = dialects.parse_request(msg, self.policy)
            except BadRequest:
                self.metrics.bad_requests.labels("unparsable").inc()
                raise
            action = op.kind.value
            if self._dedup and op.request_id is not None:
                joined = self._joins.by_request_id(op.request_id, future)
                if joined is not None:  # same request_id in flight: one execution
                    backend, reply, op = "joined", list(await asyncio.shield(joined)), None
                    return
            backend, reply = await self._serve(rt, op, msg, body[0], started)
        except RequestError as exc:
            outcome, op = exc.code, None
            reply = self._error_frames(msg, exc.code, exc.message)
        except asyncio.CancelledError:
            outcome, op = Code.SHUTTING_DOWN, None
            reply = self._error_frames(msg, outcome, "the shim shut down before a reply came")
            raise
        except Exception as exc:  # a bug must cost one error reply, never the shim
            log.exception("internal error handling a request")
            outcome, op = Code.INTERNAL, None
            reply = self._error_frames(msg, outcome, f"internal error: {exc}")
        finally:
            if not future.done():
                future.set_result(reply)
            self.metrics.record_request(backend, action, outcome, time.perf_counter() - started)
            self._send(envelope, reply, fd)
            self._settled(fd)
            if op is not None and backend in self.pool.backends:
                self._after_reply(op, backend, body[0], reply[0], rt)  # never raises

    async def _serve(self, rt: Runtime, op: Op, msg: dict[str, Any], payload: bytes,
                     started: float) -> tuple[str, Reply]:
        """A decoded request: answered locally, from every backend (merged), or routed."""
        local = self.conversations.local_clear(op, self._dialects)
        if local is not None:
            return "shim", [_encode(local)]
        action = op.kind.value
        rule = rt.rules[action]
        deadline = started + self._deadlines.ms(rt, op.form.value, op.name, action) / 1000
        if self._merge_wanted(rt, op, rule):
            merged = await self._merged(op, deadline)
            if merged is not None:
                return "merged", [merged]
        rt = await self._admit(op, rt, deadline)
        candidates = self._route(rt, op, msg, rule)
        backend, reply = await self._forward(op, payload, candidates, rule, deadline)
        if op.kind is Kind.GENERATE and op.conversation_id is not None:
            self.conversations.served(op.conversation_id, backend)
        return backend, [reply]

    def _after_reply(self, op: Op, backend: str, request: bytes, reply: bytes,
                     rt: Runtime) -> None:
        """The addons' look at a finished exchange; the client has its one reply already,
        so a failing addon is logged, never answered a second time."""
        for addon in self.addons:
            try:
                addon.after_reply(op, backend, request, reply, rt)
            except Exception:
                log.exception("addon %s failed after a reply", type(addon).__name__)

    async def _admit(self, op: Op, rt: Runtime, deadline: float) -> Runtime:
        """Wait until no addon holds the request back (an ``admit`` hook, e.g. a model
        hand-over in shim.ownership), then route on the runtime in force at that instant:
        the last ``admit`` check and ``_route`` run without yielding in between."""
        for _ in range(100):
            waiting = None
            for addon in self.addons:
                admit = getattr(addon, "admit", None)
                if admit is not None and (waiting := admit(op)) is not None:
                    break
            if waiting is None:
                return rt
            await _bounded(waiting, deadline)
            rt = self.runtime
        raise RequestError("the model kept moving; try again", Code.TIMEOUT)

    # -- the merged view of what is loaded --------------------------------------------

    def _merge_wanted(self, rt: Runtime, op: Op, rule: Rule) -> bool:
        if op.dialect != "mma" or op.kind not in _MERGED_KINDS or rule.pin:
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
        names = [n for n, b in self.pool.backends.items() if b.healthy]
        timeout = (deadline - time.perf_counter()) / 2
        if not names or timeout <= 0:
            return None
        answers = await asyncio.gather(*(self.call(n, op.raw, timeout) for n in names),
                                       return_exceptions=True)
        results = {n: a for n, a in zip(names, answers, strict=True)
                   if isinstance(a, Result) and a.ok}
        if not results:
            return None
        merged = merge(op, results, self._devices, self._quantization)
        return _encode(dialects.render_reply(op, merged))

    def _route(self, rt: Runtime, op: Op, msg: dict[str, Any], rule: Rule) -> list[str]:
        """Backends to try, in order: pin, else weights (sticky), then failover."""
        backends = self.pool.backends
        if rule.pin:
            return [rule.pin]
        key = msg.get(self._sticky_key) if self._sticky_key else None
        bucket = bucket_of(str(key)) if key is not None else random_bucket()
        primary = rt.table.backend_for(bucket)
        candidates = [primary, *(n for n in rt.table.names if n != primary)]
        if op.dialect != "mma":  # clients already on the new dialect go to it unchanged
            candidates.sort(key=lambda n: backends[n].dialect != op.dialect)
        if rule.translate:
            # A backend whose dialect has no equivalent of the operation is never chosen,
            # whatever the weights (an MMS-dialect request at 100/0 goes to MMS).
            capable = [n for n in candidates if self._can_serve(op, n)]
            if not capable:
                raise Unsupported(f"no backend can serve {op.name or op.kind.value!r}")
            candidates = capable
        candidates = self.conversations.route(op, candidates)
        chosen = candidates
        for addon in self.addons:
            candidates = addon.route(op, candidates, rt)
        if rule.translate:  # an addon may narrow the list, never to an incapable backend
            candidates = [c for c in candidates if c in chosen] or chosen
        if rule.failover and not all(backends[n].healthy for n in candidates):
            # healthy backends first, the others only as a last resort
            candidates.sort(key=lambda n: not backends[n].healthy)
        return candidates

    def _can_serve(self, op: Op, name: str) -> bool:
        dialect = self.pool.backends[name].dialect
        if dialect == op.dialect:
            return True
        try:
            dialects.render_request(op, dialect, self.policy)
        except dialects.Unsupported:
            return False
        return True

    async def _forward(self, op: Op, payload: bytes, candidates: list[str], rule: Rule,
                       deadline: float) -> tuple[str, bytes]:
        """Send to the first candidate that can serve the request; fail over if allowed.

        A candidate whose dialect has no equivalent of the operation is skipped whatever
        the rule says; one that fails is left for the next only when failover is allowed.
        """
        last: RequestError | None = None
        for i, name in enumerate(candidates):
            backend = self.pool.backends[name]
            translate = rule.translate and op.dialect != backend.dialect
            if translate:
                sent = op
                if op.conversation_id is not None and backend.dialect == "mms":
                    renamed = self.conversations.backend_id(op.conversation_id)
                    if renamed != op.conversation_id:  # cleared by the shim: a fresh start
                        sent = msgspec.structs.replace(op, conversation_id=renamed)
                try:
                    requests = [_encode(r) for r in
                                dialects.render_request(sent, backend.dialect, self.policy)]
                except dialects.Unsupported as exc:
                    last = Unsupported(f"{name} cannot serve this: {exc}")
                    continue
            else:
                requests = [payload]
            reply: bytes | None = None
            try:
                for addon in self.addons:
                    waiting = addon.before_send(op, name)
                    if waiting is not None:
                        await _bounded(waiting, deadline)
                last_chance = not (rule.failover and i + 1 < len(candidates))
                if last_chance and not backend.connected:
                    # Nothing else to try: a backend known to be restarting has until the
                    # deadline; one that is gone (retired, stopped) is answered for at once.
                    await self.pool.wait_connected(name, min(
                        deadline - time.perf_counter(), backend.restart_wait_s(self._grace_s)))
                    if not backend.connected:
                        raise BackendUnavailable(f"backend {name} is not connected")
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise RequestError("deadline passed before a backend was free", Code.TIMEOUT)
                timeout = min(remaining, backend.config.timeout_ms / 1000)
                if len(requests) == 1:  # the common case, without gather's extra Future
                    replies = [await self.pool.request(name, requests[0], timeout)]
                else:
                    replies = await asyncio.gather(
                        *[self.pool.request(name, r, timeout) for r in requests])
                reply = (self._translate_reply(op, name, replies) if translate
                         else _json_object(replies[0], name))
                return name, reply
            except BackendError as exc:
                last = exc
                if rule.failover and i + 1 < len(candidates):
                    self.metrics.failovers.labels(name, candidates[i + 1]).inc()
                    continue
                raise last from None
            finally:
                for addon in self.addons:
                    addon.after_send(op, name, reply)
        raise last or BackendUnavailable("no backend is available")

    def _translate_reply(self, op: Op, name: str, replies: list[bytes]) -> bytes:
        """Backend ``name``'s replies, read in its dialect and rendered in the caller's.

        The caller sees its own conversation id (not a renamed one), the backend's
        configured ``device`` label where it reports none, and, for model access served
        by MMS, the model's path and quantization from the model config.
        An unusable reply raises BackendBadReply, so that the request can fail over.
        """
        dialect = self.pool.backends[name].dialect
        decoded: list[Any] = []
        for raw in replies:
            try:
                decoded.append(_decode(raw))
            except _BAD_JSON:
                raise BackendBadReply(f"{dialect} backend reply is not valid JSON") from None
        result = dialects.parse_reply(op, dialect, decoded)
        if not result.ok and result.error_code == BackendBadReply.code:
            raise BackendBadReply(result.message or "unusable backend reply")
        if result.conversation_id is not None and op.conversation_id is not None:
            result.conversation_id = op.conversation_id
        label_devices(result, self._devices.get(name, ""), self._quantization)
        info = result.access_info
        if info is not None and dialect == "mms":
            entry = self._catalogue.get(op.model_id or "")
            context = op.raw.get("context")
            given = context if isinstance(context, dict) else {}
            if entry is not None and not info.model_path_from_config:
                info.model_path_from_config = entry.path
            quantization, priority = given.get("quantization_level"), given.get("priority")
            if isinstance(quantization, str | int) and not isinstance(quantization, bool):
                info.quantization_level = quantization  # echoed as sent, as MMA does
            elif entry is not None:
                info.quantization_level = entry.quantization
            if isinstance(priority, str | int) and not isinstance(priority, bool):
                info.priority = priority
        return _encode(dialects.render_reply(op, result))

    async def call(self, backend: str, msg: dict[str, Any], timeout_s: float) -> Result:
        """An internal request (ownership polls, hand-overs) in the MMA dialect, sent to
        ``backend`` in its own dialect, read back as a canonical Result."""
        op = dialects.parse_request(msg, self.policy)
        dialect = self.pool.backends[backend].dialect
        requests = dialects.render_request(op, dialect, self.policy)
        raw = await asyncio.gather(*(self.pool.request(backend, _encode(r), timeout_s)
                                     for r in requests))
        replies = []
        for item in raw:
            try:
                replies.append(_decode(item))
            except _BAD_JSON:
                replies.append({"error": "reply is not valid JSON"})
        return dialects.parse_reply(op, dialect, replies)

    async def _opaque(self, rt: Runtime, body: Frames, msg: object,
                      started: float) -> tuple[str, Reply]:
        """A request that is not one JSON object (non-JSON, non-object JSON, several
        frames): with ``opaque = "forward"`` its frames go as they are to the legacy-dialect
        backend and its reply frames come back unchanged, whatever they hold (a generic
        ZeroMQ endpoint, protocol.md); with ``"reject"`` it is refused."""
        if not self._forward_opaque:
            reason, what = (("frames", f"expected one payload frame, got {len(body)}")
                            if len(body) != 1 else
                            ("not_object", "request must be a JSON object")
                            if msg is not None or body[0].strip() == b"null" else
                            ("not_json", "request is not valid JSON"))
            self.metrics.bad_requests.labels(reason).inc()
            raise BadRequest(what)
        name = self._opaque_backend(rt)
        backend = self.pool.backends[name]
        deadline = started + self._deadlines.ms(rt, "opaque", None, None) / 1000
        if not backend.connected:
            await self.pool.wait_connected(name, min(
                deadline - time.perf_counter(), backend.restart_wait_s(self._grace_s)))
        timeout = min(deadline - time.perf_counter(), backend.config.timeout_ms / 1000)
        return name, await self.pool.request_frames(name, list(body), timeout)

    def _opaque_backend(self, rt: Runtime) -> str:
        """``shim.opaque_backend``, else the weighted primary if it speaks MMA, else the
        first MMA-dialect backend, else the weighted primary."""
        named = self.cfg.shim.opaque_backend
        if named:
            return named
        primary = rt.table.backend_for(random_bucket())
        if self._dialects.get(primary) == "mma":
            return primary
        return next((n for n, d in self._dialects.items() if d == "mma"), primary)

    # -- lifecycle -------------------------------------------------------------------

    @property
    def inflight(self) -> int:
        return len(self._tasks)

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
            elif (not self._tasks and not self.backlog.bytes and not readable(self.frontend)
                    and time.monotonic() - self._last_activity >= quiet_s):
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
            self.fastpath.close()
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


async def _bounded(waiting: Awaitable[None], deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    try:
        await asyncio.wait_for(waiting, max(0.0, remaining))
    except TimeoutError:
        raise RequestError("timed out waiting for a model hand-over", Code.TIMEOUT) from None


__all__ = ["Addon", "Form", "Proxy"]

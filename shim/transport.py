"""The one path from an operation to a backend's answer: render the operation in the
backend's dialect, send it through the pool, read the reply back (translation included).

Every part of the shim that talks to a backend goes through a ``Transport``: the proxy
(client requests), ownership (loaded-model polls, hand-over unloads, duplicate repairs),
shadow (mirrored copies and the twin), the merged view, and the offline parity/replay
runs. There is one bad-reply policy, here:

* a reply to a passed-through request (the backend speaks the caller's dialect) stays
  bytes; it must be one JSON object, else ``BackendBadReply``;
* a translated reply is decoded once into a canonical ``Result`` (shim.dialects.ops); a
  reply that is not JSON, or that the dialect's reader finds unusable, raises
  ``BackendBadReply``. Other failures keep their own ``BackendError``s from the pool
  (``BackendUnavailable``, ``BackendTimeout``, ``BackendLost``), and an operation the
  backend's dialect has no equivalent for raises ``Unsupported`` before anything is sent.

Internal requests are canonical ``Op``s built by ``internal_op``, never requests written
in a wire dialect and parsed again.

``TransportLike`` is the interface the proxy and the addons use; ``Transport`` is the
real one over a ``BackendPool``, and tests use a typed fake of the same interface
(``tests/fake_transport.py``) to run the proxy core and the addons without sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol

import msgspec

from shim import dialects
from shim.catalogue import CatalogueEntry
from shim.config import BackendConfig
from shim.dialects import LEGACY
from shim.dialects.ops import Form, Kind, Op, Result
from shim.errors import BackendBadReply, BackendError, Unsupported, UnusableReply
from shim.merged import label_devices
from shim.pool import BackendPool

_decode = msgspec.json.decode
_encode = msgspec.json.encode
#: What msgspec raises on bad JSON: deep nesting and invalid UTF-8 escape DecodeError.
BAD_JSON = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


class _AnyObject(msgspec.Struct):
    """Decoding into this checks "a JSON object" without building its values."""


_check_object = msgspec.json.Decoder(_AnyObject).decode


class BackendState(Protocol):
    """What the proxy reads of a backend (``shim.pool.Backend`` is one)."""

    @property
    def config(self) -> BackendConfig: ...

    @property
    def dialect(self) -> str: ...

    @property
    def connected(self) -> bool: ...

    @property
    def healthy(self) -> bool: ...

    @property
    def inflight(self) -> int: ...

    def restart_wait_s(self, grace_s: float) -> float: ...


class Answer:
    """One backend's answer to one operation, in the caller's dialect.

    ``reply``: the encoded reply the caller gets (bytes, one JSON object). ``result``:
    the decoded canonical Result when the request was translated (None when it was
    passed through: its reply is never decoded on the hot path).
    """

    __slots__ = ("reply", "result")

    def __init__(self, reply: bytes, result: Result | None) -> None:
        self.reply = reply
        self.result = result


class TransportLike(Protocol):
    """The transport interface (the real ``Transport`` and the tests' fake)."""

    @property
    def backends(self) -> Mapping[str, BackendState]: ...

    def can_serve(self, op: Op, backend: str) -> bool: ...

    async def wait_connected(self, backend: str, timeout_s: float) -> bool: ...

    async def send(self, op: Op, backend: str, payload: bytes | None, timeout_s: float, *,
                   translate: bool = True, sent: Op | None = None,
                   mirror: bool = False) -> Answer: ...

    async def call(self, backend: str, op: Op, timeout_s: float) -> Result: ...

    async def send_frames(self, backend: str, frames: list[bytes],
                          timeout_s: float) -> list[bytes]: ...


def internal_op(kind: Kind, model: str | None = None,
                policy: Mapping[str, str] = MappingProxyType({})) -> Op:
    """A canonical operation the shim sends on its own behalf (polls, unloads).

    Only ``LOADED_STATUS``, ``LOAD`` and ``UNLOAD`` are built here. ``raw`` holds the
    operation in the legacy dialect's shape because a backend of the caller's own dialect
    is sent ``raw`` (shim.dialects.render_request); nothing parses it.
    """
    if kind is Kind.LOADED_STATUS:
        raw: dict[str, Any] = {"command": "GET_LOADED_MODELS_STATUS"}
        name = "GET_LOADED_MODELS_STATUS"
    elif kind is Kind.UNLOAD:
        raw, name = {"command": "UNLOAD_MODEL", "model_name": model}, "UNLOAD_MODEL"
    elif kind is Kind.LOAD:
        raw, name = {"command": "LOAD_MODEL", "model_name": model}, "LOAD_MODEL"
    else:
        raise ValueError(f"no internal operation of kind {kind.value}")
    return Op(kind=kind, form=Form.COMMAND, dialect=LEGACY, raw=raw, policy=policy,
              name=name, model_id=model)


#: The request field the reference backends (backends.server.NO_LOAD_FIELD) read as
#: "never load, remember nothing, record no usage": set on every mirrored copy.
NO_LOAD_FIELD = "shim_no_load"


def side_effect_free(frames: list[bytes]) -> list[bytes]:
    """Mirrored copies that leave no state on the shadow backend (design.md invariant 3):
    without ``conversation_id`` (no conversation is created or extended there) and with
    ``NO_LOAD_FIELD`` (the backend answers an error rather than load the model, and keeps
    no usage record). Frames that are not JSON objects go unchanged."""
    out = []
    for frame in frames:
        try:
            msg = _decode(frame)
        except BAD_JSON:
            out.append(frame)
            continue
        if not isinstance(msg, dict):
            out.append(frame)
            continue
        msg.pop("conversation_id", None)
        msg[NO_LOAD_FIELD] = True
        out.append(_encode(msg))
    return out


class Transport:
    """The real transport over a ``BackendPool``.

    ``catalogue``: the model config (shim.catalogue), used to fill what MMS does not
    report in translated replies (quantization, model path). ``policy()`` gives the load
    policy in force (the Runtime's), read per request.
    """

    def __init__(self, pool: BackendPool, catalogue: Mapping[str, CatalogueEntry] | None = None,
                 policy: Any = None) -> None:
        self.pool = pool
        self._catalogue = dict(catalogue or {})
        self._quantization = {m: e.quantization for m, e in self._catalogue.items()}
        self._policy = policy if policy is not None else (lambda: MappingProxyType({}))

    @property
    def backends(self) -> Mapping[str, BackendState]:
        return self.pool.backends

    @property
    def devices(self) -> dict[str, str]:
        return {n: b.config.device for n, b in self.pool.backends.items()}

    @property
    def quantization(self) -> dict[str, str]:
        return self._quantization

    def can_serve(self, op: Op, backend: str) -> bool:
        """Whether ``backend``'s dialect has an equivalent of ``op``."""
        dialect = self.pool.backends[backend].dialect
        if dialect == op.dialect:
            return True
        try:
            dialects.render_request(op, dialect, self._policy())
        except Unsupported:
            return False
        return True

    async def wait_connected(self, backend: str, timeout_s: float) -> bool:
        return await self.pool.wait_connected(backend, timeout_s)

    def requests_for(self, op: Op, backend: str, payload: bytes | None,
                     translate: bool = True) -> list[bytes]:
        """The frames for ``backend`` (Unsupported when its dialect has no equivalent).
        ``payload`` (the caller's bytes) goes as it is to a backend of the caller's
        dialect, or when ``translate`` is off."""
        dialect = self.pool.backends[backend].dialect
        if payload is not None and (not translate or op.dialect == dialect):
            return [payload]
        if not translate:
            return [_encode(op.raw)]
        try:
            return [_encode(r) for r in dialects.render_request(op, dialect, self._policy())]
        except dialects.Unsupported as exc:
            raise Unsupported(f"{backend} cannot serve this: {exc}") from None

    async def send(self, op: Op, backend: str, payload: bytes | None, timeout_s: float, *,
                   translate: bool = True, sent: Op | None = None,
                   mirror: bool = False) -> Answer:
        """``op`` to ``backend``; its answer in the caller's dialect.

        ``payload``: the caller's bytes (None: render from ``op``). ``sent``: the
        operation as it goes out when it differs from ``op`` (a renamed conversation);
        the reply is read against ``op``. ``mirror``: make the copy side-effect free
        (shadow traffic). Raises Unsupported, or a BackendError (BackendBadReply for an
        unusable reply: the request may fail over).
        """
        dialect = self.pool.backends[backend].dialect
        translated = translate and op.dialect != dialect
        if not translated and payload is not None and not mirror:  # the hot path: bytes
            reply = await self.pool.request(backend, payload, timeout_s)
            return Answer(_json_object(reply, backend), None)
        frames = self.requests_for(sent or op, backend, payload, translate)
        if mirror:
            frames = side_effect_free(frames)
        replies = await self._exchange(backend, frames, timeout_s)
        if not translated:
            if len(replies) != 1:
                raise BackendBadReply(f"backend {backend} sent {len(replies)} replies")
            return Answer(_json_object(replies[0], backend), None)
        result = self.read(op, backend, replies)
        return Answer(_encode(dialects.render_reply(op, result)), result)

    async def call(self, backend: str, op: Op, timeout_s: float) -> Result:
        """An internal operation (``internal_op``, or a client's op for the merged view)
        sent to ``backend`` in its own dialect, read back as a Result. Raises Unsupported
        or a BackendError, like ``send``."""
        replies = await self._exchange(backend, self.requests_for(op, backend, None),
                                       timeout_s)
        return self.read(op, backend, replies)

    async def send_frames(self, backend: str, frames: list[bytes],
                          timeout_s: float) -> list[bytes]:
        """Opaque traffic: the frames as they are, the reply's frames as they came."""
        return await self.pool.request_frames(backend, frames, timeout_s)

    async def _exchange(self, backend: str, frames: list[bytes],
                        timeout_s: float) -> list[bytes]:
        if len(frames) == 1:  # the common case, without gather's extra Future
            return [await self.pool.request(backend, frames[0], timeout_s)]
        futures: list[asyncio.Future[bytes]] = []
        try:
            for frame in frames:
                futures.append(self.pool.request(backend, frame, timeout_s))
        except BackendError:  # one could not be sent: the others are not waited for
            for future in futures:
                future.cancel()
            raise
        return list(await asyncio.gather(*futures))

    def read(self, op: Op, backend: str, replies: list[bytes]) -> Result:
        """``backend``'s replies read in its dialect into a Result for ``op``.

        The caller sees its own conversation id, the backend's configured ``device``
        label where it reports none, and, for model access served by MMS, the model's
        path and quantization from the model config. Raises BackendBadReply for a reply
        that is not JSON or that the dialect's reader finds unusable.
        """
        dialect = self.pool.backends[backend].dialect
        decoded: list[Any] = []
        for raw in replies:
            try:
                decoded.append(_decode(raw))
            except BAD_JSON:
                raise BackendBadReply(f"{dialect} backend reply is not valid JSON") from None
        result = dialects.parse_reply(op, dialect, decoded)
        if not result.ok and result.error_code == BackendBadReply.code:
            raise UnusableReply(result.message or "unusable backend reply")
        if result.conversation_id is not None and op.conversation_id is not None:
            result.conversation_id = op.conversation_id
        label_devices(result, self.pool.backends[backend].config.device, self._quantization)
        info = result.access_info
        if info is not None and dialect != op.dialect:
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
        return result


def unusable_view(op: Op, exc: UnusableReply) -> dict[str, Any]:
    """What the caller gets for an unusable translated reply (the shim's SHIM_BAD_REPLY
    in the caller's shape): how shadow and replay compare such a reply, as the client
    would have seen it."""
    return dialects.render_reply(op, Result(ok=False, source="shim", message=exc.message,
                                            error_code=exc.code, model_id=op.model_id,
                                            request_id=op.request_id))


def _json_object(reply: bytes, backend: str) -> bytes:
    """A passed-through reply, checked to be a JSON object (else BackendBadReply)."""
    try:
        _check_object(reply)
    except (*BAD_JSON, msgspec.ValidationError):
        raise BackendBadReply(f"backend {backend} sent a reply that is not a JSON object") \
            from None
    return reply


__all__ = ["BAD_JSON", "NO_LOAD_FIELD", "Answer", "BackendState", "Transport",
           "TransportLike", "internal_op", "side_effect_free", "unusable_view"]

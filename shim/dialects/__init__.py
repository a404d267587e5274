"""Protocol translation between wire dialects: pure functions, no I/O.

Each dialect is one module that registers a ``Dialect`` (``shim.dialects.base``): MMA and
MMS here, others named in the config's ``[dialects] modules``. The functions below keep
no per-dialect code: they dispatch through the registry by the dialect's name.

The proxy calls, per request::

    op = parse_request(msg, policy)                  # BadRequest -> SHIM_BAD_REQUEST
    requests = render_request(op, target, policy)    # Unsupported -> SHIM_UNSUPPORTED
    replies = [<the backend's reply to each request, same order>]
    reply = render_reply(op, parse_reply(op, target, replies))

``render_request`` may return an empty list: the answer is then known without the
backend (e.g. MMA's MISSING_MODEL_ID for a model access request without a model id, when
MMS is the target), and ``parse_reply(op, target, [])`` produces it. ``parse_reply`` and
``render_reply`` never raise: an unusable reply becomes an error in the caller's form with
``error_code`` ``SHIM_BAD_REPLY``. See protocol.md for both dialects. Only what routing
needs, without decoding the rest: ``shim.dialects.view``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from shim.dialects import base, mma, mms  # mma and mms register themselves on import
from shim.dialects.base import HealthView, get, names, register
from shim.dialects.ops import Dialect as DialectName
from shim.dialects.ops import Form, Kind, ModelInfo, Op, Params, Result
from shim.errors import BadRequest, Code, Malformed, Unsupported

__all__ = [
    "LEGACY",
    "MMS_ONLY_ACTIONS",
    "BadRequest",
    "Dialect",
    "DialectName",
    "Form",
    "HealthView",
    "Kind",
    "ModelInfo",
    "Op",
    "Params",
    "Result",
    "Unsupported",
    "detect_dialect",
    "error_reply",
    "form_of",
    "get",
    "load_modules",
    "mma",
    "mms",
    "names",
    "parse_reply",
    "parse_request",
    "register",
    "render_reply",
    "render_request",
]

Dialect = base.Dialect

LEGACY: DialectName = "mma"
"""The dialect the deployed agents speak on the legacy endpoint (protocol.md): opaque
requests go to a backend of this dialect, and only its requests get merged views."""

MMS_ONLY_ACTIONS = mms.ONLY_ACTIONS
"""Actions only MMS knows. ``generate`` is known to both and is read as MMA."""


def load_modules(modules: list[str] | tuple[str, ...]) -> None:
    """Import each named module (``"tests.toy_dialect"``), which registers its dialect
    (config ``[dialects] modules``). ImportError as the import raised it."""
    for module in modules:
        importlib.import_module(module)


def detect_dialect(msg: object) -> DialectName:
    """The first registered dialect (other than ``LEGACY``) that claims ``msg``, else
    ``LEGACY``: ``"mms"`` when ``msg["action"]`` is an MMS-only action."""
    if isinstance(msg, dict):
        for dialect in base.registered():
            if dialect.name != LEGACY and dialect.claims(msg):
                return dialect.name
    return LEGACY


def form_of(msg: object) -> Form:
    """The reply form for a request, for error replies; never raises (non-object: ACTION)."""
    return get(detect_dialect(msg)).form_of(msg)


def parse_request(msg: dict[str, Any], policy: Mapping[str, str]) -> Op:
    """Parse a request of any registered dialect into an Op; BadRequest when it cannot be
    parsed.

    ``policy`` maps model_pref (fast, quality, ...) to a model; MMA generate requests are
    resolved through it (an unknown pref falls back to ``fast``).
    """
    if not isinstance(msg, dict):
        raise BadRequest("request must be a JSON object")
    return get(detect_dialect(msg)).parse_request(msg, policy)


def render_request(op: Op, target: str, policy: Mapping[str, str]) -> list[dict[str, Any]]:
    """The requests to send to a backend of dialect ``target`` for ``op``, in order.

    A backend of the caller's own dialect gets ``[op.raw]``. Empty when the caller's own
    dialect answers ``op`` without any backend (its ``precheck``). Raises Unsupported
    when the target has no equivalent (clear_conversation or an opaque action on a
    foreign dialect, an MMS generate for a model no load policy names on MMA, an unknown
    dialect).
    """
    if target == op.dialect:
        return [op.raw]
    dialect = _serving(op, target)
    if get(op.dialect).precheck(op) is not None:
        return []
    return dialect.render_request(op, policy)


def _serving(op: Op, target: str) -> Dialect:
    """The dialect ``target``, when it can serve another dialect's ``op``; Unsupported
    when ``op`` is opaque (passed through only) or not among its ``kinds``."""
    if op.kind is Kind.OTHER:
        raise Unsupported(f"{op.name!r} is passed through to {op.dialect.upper()} only")
    dialect = get(target)
    if op.kind not in dialect.kinds:
        what = op.name if op.name is not None else op.kind.value
        raise Unsupported(f"{target.upper()} has no equivalent of "
                          f"{op.dialect.upper()} {what!r}")
    return dialect


def parse_reply(op: Op, target: str, replies: list[Any]) -> Result:
    """Read the ``target`` backend's replies (1:1 with ``render_request``'s list).

    Never raises: a reply that cannot be read gives a failed Result with error_code
    SHIM_BAD_REPLY (SHIM_UNSUPPORTED when ``op`` could not have been sent there).
    """
    try:
        if target == op.dialect:
            return get(target).parse_reply(op, replies)
        local = get(op.dialect).precheck(op)
        if local is not None:
            return local
        return _serving(op, target).parse_reply(op, replies)
    except Malformed as exc:
        return _failed(op, replies, Code.BAD_REPLY, f"unusable {target} reply: {exc}")
    except Unsupported as exc:
        return _failed(op, replies, Code.UNSUPPORTED, str(exc))
    except Exception as exc:  # a reader bug must cost one error reply, not the request
        return _failed(op, replies, Code.BAD_REPLY,
                       f"unusable {target} reply: {type(exc).__name__}: {exc}")


def _failed(op: Op, replies: list[Any], code: str, message: str) -> Result:
    return Result(ok=False, source="shim", message=message, error_code=code,
                  raw=list(replies) if isinstance(replies, list) else [],
                  request_id=op.request_id, model_id=op.model_id)


def render_reply(op: Op, result: Result) -> dict[str, Any]:
    """``result`` as the reply to ``op``, in the caller's dialect and form. Never raises."""
    try:
        return get(op.dialect).render_reply(op, result)
    except Exception as exc:
        return error_reply(op.form, Code.INTERNAL, f"cannot render the reply: {exc}", op.raw)


def error_reply(form: Form, code: str, message: str,
                request: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shim's own error reply (``error_code`` SHIM_...), shaped for the caller's form
    by the dialect that answers in it (``Dialect.forms``; the legacy dialect otherwise).

    ACTION/MMS: ``{"status": "error", "message", "error_code"}``; COMMAND: the same with
    ``"ERROR"``; MODEL_ACCESS: MMA's ERROR_LOADING_MODEL shape, echoing the request's
    ``request_id`` and ``model_id`` (null when absent).
    """
    dialect = next((d for d in base.registered() if form in d.forms), None) or get(LEGACY)
    return dialect.error_reply(form, code, message, request)

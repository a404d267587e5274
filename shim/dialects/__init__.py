"""Protocol translation between the MMA and MMS dialects: pure functions, no I/O.

The proxy calls, per request::

    op = parse_request(msg, policy)                  # BadRequest -> SHIM_BAD_REQUEST
    requests = render_request(op, target, policy)    # Unsupported -> SHIM_UNSUPPORTED
    replies = [<the backend's reply to each request, same order>]
    reply = render_reply(op, parse_reply(op, target, replies))

``render_request`` may return an empty list: the answer is then known without the
backend (e.g. MMA's MISSING_MODEL_ID for a model access request without a model id, when
MMS is the target), and ``parse_reply(op, target, [])`` produces it. ``parse_reply`` and
``render_reply`` never raise: an unusable reply becomes an error in the caller's form with
``error_code`` ``SHIM_BAD_REPLY``. See protocol.md for both dialects.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from shim.dialects import mma, mms
from shim.dialects.ops import Dialect, Form, Kind, ModelInfo, Op, Params, Result
from shim.errors import BadRequest, Code, Malformed, Unsupported

__all__ = [
    "LEGACY",
    "MMS_ONLY_ACTIONS",
    "BadRequest",
    "Dialect",
    "Form",
    "Kind",
    "ModelInfo",
    "Op",
    "Params",
    "Result",
    "Unsupported",
    "detect_dialect",
    "error_reply",
    "form_of",
    "parse_reply",
    "parse_request",
    "render_reply",
    "render_request",
]

LEGACY: Dialect = "mma"
"""The dialect the deployed agents speak on the legacy endpoint (protocol.md): opaque
requests go to a backend of this dialect, and only its requests get merged views."""

MMS_ONLY_ACTIONS = frozenset({
    "generate_text", "load_model", "unload_model", "list_models", "health_check",
    "get_loaded_models_status", "select_model", "predict_models", "record_usage",
    "preload_models", "log_performance_metric", "log_model_evaluation",
    "get_performance_metrics", "get_stats",
})
"""Actions only MMS knows. ``generate`` is known to both and is read as MMA."""


def detect_dialect(msg: object) -> Dialect:
    """``"mms"`` when ``msg["action"]`` is an MMS-only action, else ``"mma"``."""
    if isinstance(msg, dict):
        action = msg.get("action")
        if isinstance(action, str) and action in MMS_ONLY_ACTIONS:
            return "mms"
    return "mma"


def form_of(msg: object) -> Form:
    """The reply form for a request, for error replies; never raises (non-object: ACTION)."""
    if not isinstance(msg, dict) or "action" in msg:
        return Form.MMS if detect_dialect(msg) == "mms" else Form.ACTION
    return Form.COMMAND if "command" in msg else Form.MODEL_ACCESS


def parse_request(msg: dict[str, Any], policy: Mapping[str, str]) -> Op:
    """Parse a request of either dialect into an Op; BadRequest when it cannot be parsed.

    ``policy`` maps model_pref (fast, quality, ...) to a model; MMA generate requests are
    resolved through it (an unknown pref falls back to ``fast``).
    """
    if not isinstance(msg, dict):
        raise BadRequest("request must be a JSON object")
    if detect_dialect(msg) == "mms":
        return mms.parse_request(msg, policy)
    return mma.parse_request(msg, policy)


def render_request(op: Op, target: str, policy: Mapping[str, str]) -> list[dict[str, Any]]:
    """The requests to send to a ``target`` ("mma"|"mms") backend for ``op``, in order.

    A backend of the caller's own dialect gets ``[op.raw]``. Raises Unsupported when the
    target has no equivalent (clear_conversation or an opaque action on a foreign dialect,
    or an MMS generate for a model no load policy names, on MMA).
    """
    if target == op.dialect:
        return [op.raw]
    if op.kind is Kind.OTHER:
        raise Unsupported(f"{op.name!r} is passed through to {op.dialect.upper()} only")
    if target == "mms":
        return mms.render_request(op)
    if target == "mma":
        return mma.render_request(op, policy)
    raise Unsupported(f"unknown backend dialect {target!r}")


def parse_reply(op: Op, target: str, replies: list[Any]) -> Result:
    """Read the ``target`` backend's replies (1:1 with ``render_request``'s list).

    Never raises: a reply that cannot be read gives a failed Result with error_code
    SHIM_BAD_REPLY (SHIM_UNSUPPORTED when ``op`` could not have been sent there).
    """
    try:
        if target == "mma":
            return mma.parse_reply(op, replies)
        if target == "mms":
            return mms.parse_reply(op, replies)
        raise Unsupported(f"unknown backend dialect {target!r}")
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
        if op.dialect == "mms":
            return mms.render_reply(op, result)
        return mma.render_reply(op, result)
    except Exception as exc:
        return error_reply(op.form, Code.INTERNAL, f"cannot render the reply: {exc}", op.raw)


def error_reply(form: Form, code: str, message: str,
                request: dict[str, Any] | None = None) -> dict[str, Any]:
    """The shim's own error reply (``error_code`` SHIM_...), shaped for the caller's form.

    ACTION/MMS: ``{"status": "error", "message", "error_code"}``; COMMAND: the same with
    ``"ERROR"``; MODEL_ACCESS: MMA's ERROR_LOADING_MODEL shape, echoing the request's
    ``request_id`` and ``model_id`` (null when absent).
    """
    if form is Form.MMS:
        return mms.error_body(None, code, message)
    if form is Form.MODEL_ACCESS:
        req = request if isinstance(request, dict) else {}
        return mma.error_body(form, code, message, req.get("request_id"), req.get("model_id"),
                              datetime.now().isoformat())
    return mma.error_body(form, code, message)

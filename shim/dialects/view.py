"""The routing view: only what routing needs from a request, the payload left as bytes.

A pass-through request (one that goes to a backend of the caller's own dialect
unchanged) needs a handful of top-level fields to be routed: its action or command, the
model it names, its request id (duplicate joins), its conversation id and the configured
sticky key. :class:`ViewDecoder` reads those with one msgspec decode into a Struct;
every other key of the request (``params``, ``audio_data``: protocol.md says a
TRANSCRIBE_AUDIO request is 1-5 MB of floats) is skipped by the decoder without being
built into Python objects.

Field types are loose, as the legacy endpoint accepted them (protocol.md, "Field types are
loose"): each field is decoded as whatever JSON value it holds, and the properties read it
the way ``shim.dialects.ops.loose_str`` does (a number as its text, anything else as
absent), so no request is refused for an odd type here.

Use::

    decode = ViewDecoder(cfg.routing.sticky_key).decode
    view = decode(payload)           # None: not a JSON object (opaque; shim.proxy._opaque)
    view.name, view.model, view.request_id, view.conversation_id, view.sticky
    dialects.detect_dialect(view.probe())   # the caller's dialect, from the view alone
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import msgspec

__all__ = ["STANDARD_FIELDS", "RoutingView", "ViewDecoder"]

#: What msgspec raises on bad JSON (deep nesting and invalid UTF-8 included).
_BAD_JSON = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


def _loose(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


class RoutingView(msgspec.Struct, frozen=True):
    """The routing-relevant top-level fields of one request, as sent (any JSON type)."""

    action: Any = None
    command: Any = None
    model_id: Any = None
    model_name: Any = None
    model_pref: Any = None
    request_id: Any = None
    conversation_id: Any = None

    #: The name of the sticky-key field this view type reads (empty: none).
    sticky_key: ClassVar[str] = ""

    @property
    def name(self) -> str | None:
        """The action, else the command, as text (None for a model access request)."""
        if self.action is not None:
            return _loose(self.action) or repr(self.action)
        if self.command is not None:
            return _loose(self.command) or repr(self.command)
        return None

    @property
    def model(self) -> str | None:
        """The model the request names: ``model_id``, else ``model_name`` (None when
        neither is a non-empty string or number; ``model_pref`` is a load policy name,
        resolved by the caller through the policy)."""
        return _loose(self.model_id) or _loose(self.model_name) or None

    @property
    def request_key(self) -> str | int | None:
        """``request_id`` when it is a string or an integer (echoed as sent), else None."""
        rid = self.request_id
        if isinstance(rid, str) or (isinstance(rid, int) and not isinstance(rid, bool)):
            return rid
        return None

    @property
    def conversation(self) -> str | None:
        """``conversation_id`` as text (an int is accepted), None when absent or empty."""
        return _loose(self.conversation_id) or None

    @property
    def sticky(self) -> Any:
        """The sticky key's value as sent (None when absent or no key is configured)."""
        return None

    def probe(self) -> dict[str, Any]:
        """A small stand-in for the request, enough for ``dialects.detect_dialect`` and
        ``dialects.form_of`` (they look at ``action``/``command`` only)."""
        out: dict[str, Any] = {}
        if self.action is not None:
            out["action"] = self.action
        if self.command is not None:
            out["command"] = self.command
        return out


STANDARD_FIELDS = frozenset(RoutingView.__struct_fields__)


def _view_type(sticky_key: str) -> type[RoutingView]:
    """``RoutingView``, extended to read ``sticky_key`` when it is not already a field."""
    if not sticky_key:
        return RoutingView
    if sticky_key in STANDARD_FIELDS:
        def standard(self: RoutingView) -> Any:
            return getattr(self, sticky_key)
        return type(f"RoutingView[{sticky_key}]", (RoutingView,),
                    {"sticky": property(standard), "sticky_key": sticky_key})
    extra = msgspec.defstruct(f"RoutingView[{sticky_key}]", [("sticky_value", Any, None)],
                              bases=(RoutingView,), frozen=True,
                              rename={"sticky_value": sticky_key})

    def custom(self: Any) -> Any:
        return self.sticky_value

    extra.sticky = property(custom)  # type: ignore[attr-defined]
    extra.sticky_key = sticky_key  # type: ignore[attr-defined]
    return cast(type[RoutingView], extra)


class ViewDecoder:
    """Decodes request payloads into routing views; one per sticky key (reuse it)."""

    def __init__(self, sticky_key: str = "conversation_id") -> None:
        self.sticky_key = sticky_key
        self.type = _view_type(sticky_key)
        self._decode = msgspec.json.Decoder(self.type).decode

    def decode(self, payload: bytes) -> RoutingView | None:
        """The view of ``payload``; None when it is not valid JSON or not a JSON object.
        Never raises."""
        try:
            return self._decode(payload)
        except (*_BAD_JSON, msgspec.ValidationError):
            return None

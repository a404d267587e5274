"""Deadlines that follow the caller: how long the shim works on one request.

Legacy clients wait 1, 3, 5, 10, 15 or 30 s (protocol.md, "What the deployed agents
really send"): the shim's answer must come before the caller gives up, and must not be
cut short where the caller would have waited. The deadline of a request is looked up,
first match wins, in: the per-action rule's explicit ``timeout_ms`` (``[actions.X]`` or
``mmshim ctl``), ``[deadlines].names`` (the action or command as sent), ``[deadlines].forms``
(action, command, model_access, mms, opaque), then ``shim.default_timeout_ms``.
"""

from __future__ import annotations

from shim.config import DeadlinesSection
from shim.runtime import Runtime


class Deadlines:
    """Per-request deadline lookup (milliseconds); the tables are read once at start."""

    def __init__(self, cfg: DeadlinesSection, default_ms: int) -> None:
        self._forms = dict(cfg.forms)
        self._names = dict(cfg.names)
        self._default_ms = default_ms

    def ms(self, rt: Runtime, form: str, name: str | None, action: str | None) -> int:
        """The deadline for a request of ``form`` named ``name`` (canonical ``action``)."""
        if action is not None:
            override = rt.overrides.get(action)
            if override is not None and override.timeout_ms is not None:
                return override.timeout_ms
        if name is not None:
            by_name = self._names.get(name)
            if by_name is not None:
                return by_name
        return self._forms.get(form, self._default_ms)

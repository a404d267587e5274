"""Signals that arrive before the event loop is ready.

Python's default action for SIGHUP is to terminate, and SIGTERM/SIGINT during start-up
would cut the start short with a traceback. ``hold()`` (called first thing by
``mmshim run``) replaces those actions with a handler that only remembers the signal;
once the loop's own handlers are installed, ``take()`` hands the remembered signals to
them, in order, so a reload or a stop asked for during start-up still happens.
"""

from __future__ import annotations

import signal
from types import FrameType

HELD = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)

_pending: list[int] = []


def _remember(signum: int, frame: FrameType | None) -> None:
    _pending.append(signum)


def hold() -> None:
    """Remember SIGHUP, SIGTERM and SIGINT from now until ``take()``."""
    for sig in HELD:
        signal.signal(sig, _remember)


def take() -> list[int]:
    """The signals remembered so far (oldest first); they are forgotten here."""
    taken = list(_pending)
    del _pending[: len(taken)]
    return taken

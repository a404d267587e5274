"""One error tree for the shim, and the ``SHIM_*`` codes its own error replies carry.

Every exception the shim raises on purpose derives from ``ShimError``; the ones that end
a request carry a ``Code``. Codes are mapped to the caller's reply shape in one place,
``shim.dialects.error_reply`` (protocol.md, "Errors the shim itself returns"); a code is a
``str`` enum, so ``Code.TIMEOUT == "SHIM_TIMEOUT"`` and it serialises as its value.

::

    ShimError
    ├── RequestError              ends one request with an error reply (has .code)
    │   ├── BadRequest            SHIM_BAD_REQUEST: cannot be parsed into an operation
    │   ├── Unsupported           SHIM_UNSUPPORTED: the target dialect has no equivalent
    │   ├── OwnedElsewhere        SHIM_MODEL_OWNED_ELSEWHERE
    │   └── BackendError          SHIM_BACKEND_ERROR: no usable reply from a backend
    │       ├── BackendUnavailable  SHIM_NO_BACKEND
    │       ├── BackendLost         SHIM_BACKEND_LOST
    │       ├── BackendTimeout      SHIM_TIMEOUT
    │       └── BackendBadReply     SHIM_BAD_REPLY
    │           └── UnusableReply     JSON, but its dialect's reader cannot use it
    ├── Malformed                 a backend reply a dialect cannot read (-> SHIM_BAD_REPLY)
    ├── SetupError (ValueError)   unusable input at start or reload; names file and field
    │   ├── ConfigError, StateError, PlanError, CaptureError, PatternError
    │   └── EndpointInUse         an endpoint could not be bound
    ├── CommandError              an admin command refused (``code`` is the reply's error)
    └── CtlError                  ``mmshim ctl`` on the client side (each its exit code)
        ├── Unreachable           exit 3: the admin socket did not answer in time
        ├── UsageError            exit 2
        └── NoToken               exit 4: there is no token to send
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Code(StrEnum):
    """The ``error_code`` of the shim's own error replies (protocol.md)."""

    BAD_REQUEST = "SHIM_BAD_REQUEST"
    UNSUPPORTED = "SHIM_UNSUPPORTED"
    BAD_REPLY = "SHIM_BAD_REPLY"
    TIMEOUT = "SHIM_TIMEOUT"
    SHUTTING_DOWN = "SHIM_SHUTTING_DOWN"
    NO_BACKEND = "SHIM_NO_BACKEND"
    BACKEND_LOST = "SHIM_BACKEND_LOST"
    BACKEND_ERROR = "SHIM_BACKEND_ERROR"
    MODEL_OWNED_ELSEWHERE = "SHIM_MODEL_OWNED_ELSEWHERE"
    INTERNAL = "SHIM_INTERNAL"


class ShimError(Exception):
    """Base of every error the shim raises on purpose."""


class RequestError(ShimError):
    """Ends one request: the client gets the shim's error reply with ``code``.

    ``RequestError(message)`` uses the class's code; ``RequestError(message, code)``
    another (e.g. a timeout while waiting for a hand-over, or a code of the caller's own
    dialect such as MMA's ``PROCESSING_ERROR`` for model access).
    """

    code: str = Code.INTERNAL

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(RequestError, ValueError):
    """A request the shim cannot even parse into an operation (answer: SHIM_BAD_REQUEST).

    Only structurally unusable input is a BadRequest (a field of the wrong JSON type).
    A well-formed request that a backend would refuse, e.g. a model access request
    without ``model_id``, parses fine and is answered the way the backend answers it.
    """

    code = Code.BAD_REQUEST


class Unsupported(RequestError):
    """The target backend cannot serve this operation (answer: SHIM_UNSUPPORTED)."""

    code = Code.UNSUPPORTED


class OwnedElsewhere(RequestError):
    """The model is owned by another backend that cannot take the request now."""

    code = Code.MODEL_OWNED_ELSEWHERE


class BackendError(RequestError):
    """A request did not get a usable reply from a backend."""

    code = Code.BACKEND_ERROR


class BackendUnavailable(BackendError):
    """No endpoint of the backend is connected (or its queue is full): nothing was sent."""

    code = Code.NO_BACKEND


class BackendLost(BackendError):
    """The connection dropped while the request was in flight."""

    code = Code.BACKEND_LOST


class BackendTimeout(BackendError):
    """No reply before the deadline."""

    code = Code.TIMEOUT


class BackendBadReply(BackendError):
    """The reply's frames were not ``[id, b"", payload]``, or its payload is unusable."""

    code = Code.BAD_REPLY


class UnusableReply(BackendBadReply):
    """A translated reply that is JSON but that its dialect's reader cannot use
    (shim.transport): the caller would get SHIM_BAD_REPLY in its own shape."""


class Malformed(ShimError):
    """A backend reply the shim cannot use; becomes a failed Result (SHIM_BAD_REPLY)."""


class SetupError(ShimError, ValueError):
    """Input that cannot be used at start-up or reload; the message names the file and
    the field (or line, plan stage, pattern)."""


class ConfigError(SetupError):
    """A config file that cannot be used; the message names the file and the field."""


class StateError(SetupError):
    """A state file that cannot be read or does not fit the running config."""


class PlanError(SetupError):
    """A rollout plan that cannot run; the message names the plan and the stage."""


class CaptureError(SetupError):
    """A capture that cannot be read: the message names the file and line."""


class PatternError(SetupError):
    """A field-path pattern that cannot be parsed; the message quotes it."""


class EndpointInUse(ShimError, RuntimeError):
    """A listen, health or admin endpoint could not be bound."""


class CommandError(ShimError):
    """An admin command refused; ``code`` is the reply's ``error`` field."""

    def __init__(self, code: str, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


class CtlError(ShimError):
    """``mmshim ctl`` failing on the client side; the subclass fixes the exit code."""


class Unreachable(CtlError):
    """The admin socket did not answer in time."""


class UsageError(CtlError):
    """Exit 2."""


class NoToken(CtlError):
    """Exit 4: there is no token to send."""

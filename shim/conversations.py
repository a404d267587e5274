"""Conversations: the backend that served a conversation's turns serves its clear.

Agents clear a conversation with ``clear_conversation`` after using it (protocol.md,
"Conversations"). The shim remembers, per ``conversation_id``, the backend that served
its last turn:

- later turns go to that backend while it is healthy (a weight change does not split a
  conversation across two backends);
- the clear goes to that backend when it speaks MMA (which keeps the history);
- MMS has no clear: for a conversation MMS served, the shim answers the clear itself in
  MMA's shape (``{"status": "ok", "message": "Conversation c1 cleared", ...}``) and makes
  it real: the next turn reaches MMS under a fresh backend-side id (``c1#1``), so MMS
  starts with an empty history. The caller keeps seeing its own id.

Memory is bounded: at most ``max_entries`` conversations, least recently used dropped
first, and entries idle for longer than ``ttl_s`` are forgotten.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shim import dialects
from shim.config import ConversationsSection
from shim.dialects import Kind, Op


@dataclass(slots=True)
class Conversation:
    backend: str | None  # who served the last turn; None after a clear the shim made
    epoch: int  # clears the shim made; >0 renames the conversation on MMS
    seen: float  # time.monotonic() of the last turn


class Conversations:
    """The conversation -> backend map (bounded LRU + TTL)."""

    def __init__(self, cfg: ConversationsSection) -> None:
        self._max = max(1, cfg.max_entries)
        self._ttl = cfg.ttl_s
        self._map: OrderedDict[str, Conversation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._map)

    def _get(self, cid: str) -> Conversation | None:
        entry = self._map.get(cid)
        if entry is not None and time.monotonic() - entry.seen > self._ttl:
            del self._map[cid]
            return None
        return entry

    def backend_of(self, cid: str) -> str | None:
        entry = self._get(cid)
        return entry.backend if entry is not None else None

    def route(self, op: Op, candidates: list[str]) -> list[str]:
        """A known conversation's turn or clear goes to its backend first."""
        if op.conversation_id is None or op.kind not in (Kind.GENERATE,
                                                         Kind.CLEAR_CONVERSATION):
            return candidates
        backend = self.backend_of(op.conversation_id)
        if backend is None or backend not in candidates:
            return candidates
        if op.kind is Kind.CLEAR_CONVERSATION:
            return [backend]
        return [backend, *(c for c in candidates if c != backend)]

    def backend_id(self, cid: str) -> str:
        """The conversation id to send to an MMS backend: renamed after a shim-made clear."""
        entry = self._get(cid)
        return cid if entry is None or entry.epoch == 0 else f"{cid}#{entry.epoch}"

    def served(self, cid: str, backend: str) -> None:
        """A turn of ``cid`` was answered by ``backend``."""
        entry = self._get(cid)
        if entry is None:
            entry = self._map[cid] = Conversation(backend, 0, time.monotonic())
        entry.backend, entry.seen = backend, time.monotonic()
        self._map.move_to_end(cid)
        while len(self._map) > self._max:
            self._map.popitem(last=False)

    def local_clear(self, op: Op, dialect_of: Mapping[str, str]) -> dict[str, Any] | None:
        """MMA's reply to a clear of a conversation an MMS backend served, after making the
        clear real (next turn under a fresh id); None when a backend must answer."""
        if op.kind is not Kind.CLEAR_CONVERSATION or op.conversation_id is None:
            return None
        cid = op.conversation_id
        entry = self._get(cid)
        if entry is None or entry.backend is None:
            return None
        dialect = dialect_of.get(entry.backend)
        if dialect is None or dialects.get(dialect).clears_conversations:
            return None
        entry.backend, entry.epoch, entry.seen = None, entry.epoch + 1, time.monotonic()
        return {"status": "ok", "message": f"Conversation {cid} cleared",
                "conversation_id": cid}

"""The reference MMA (ModelManagerAgent): the legacy dialect, evicting LRU models when full.

Implements every request and reply shape of the MMA dialect in ``protocol.md``:
``action`` requests (generate, clear_conversation, status), upper-case ``command``
requests (GET_LOADED_MODELS_STATUS, LOAD_MODEL, UNLOAD_MODEL, HEALTH_CHECK), the speech
agents' model-access request (no ``action`` at all) and the catch-all error. Conversation
history is kept per ``conversation_id`` and fed back into the prompt.

Run: ``python -m backends.mma --port 7224 --health-port 7225 --models config/models.toml``
(7224: the host port of MMA in the deployed stack; 5580/5581 belong to other agents there).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import OrderedDict
from datetime import datetime
from typing import Any

from backends import server
from backends.ledger import (
    EntrySnapshot,
    InsufficientVram,
    LedgerError,
    ModelState,
    UnknownModel,
    UnknownVram,
)
from backends.server import BadRequest, ServiceCore, decode_request, no_load, parse_params

#: Conversations kept (least recently used dropped first) and turns kept per conversation.
MAX_CONVERSATIONS = 1024
MAX_TURNS = 16


def iso_now() -> str:
    """Local time as the ISO string the MMA puts in model-access and catch-all replies."""
    return datetime.now().isoformat()


class MMADialect:
    """Maps MMA requests to replies against the shared core."""

    def __init__(self, core: ServiceCore) -> None:
        self.core = core
        self._conversations: OrderedDict[str, list[tuple[str, str]]] = OrderedDict()

    # -- entry points --------------------------------------------------------------------

    async def handle(self, payload: bytes) -> dict[str, Any]:
        """Dispatch on ``action``, then ``command``, else a model-access request."""
        try:
            request = decode_request(payload)
        except BadRequest as exc:
            self.core.counters.bad_requests += 1
            return self.error_reply(str(exc))
        try:
            if "action" in request:
                return await self._action(request)
            if "command" in request:
                return await self._command(request)
            return await self._model_access(request)
        except Exception as exc:  # "anything that raises" has its own shape
            self.core.counters.errors_total += 1
            return self.error_reply(f"{type(exc).__name__}: {exc}")

    def error_reply(self, message: str) -> dict[str, Any]:
        """The MMA's catch-all error."""
        return {"status": "ERROR", "error_message": message, "timestamp": iso_now()}

    def health(self) -> dict[str, Any]:
        """Health socket reply."""
        return {
            "status": "ok",
            "details": {
                "status_message": "Agent is operational.",
                "uptime_seconds": self.core.uptime(),
            },
        }

    # -- action requests -----------------------------------------------------------------

    async def _action(self, request: dict[str, Any]) -> dict[str, Any]:
        action = request["action"]
        if action == "generate":
            return await self._generate(request)
        if action == "clear_conversation":
            return self._clear_conversation(request)
        if action == "status":
            return {"status": "ok", **self._loaded_summary(), "routing_policy":
                    dict(self.core.registry.policy), "health": "ok", "timestamp": time.time()}
        return {"status": "error", "message": f"Unknown action: {action}"}

    async def _generate(self, request: dict[str, Any]) -> dict[str, Any]:
        prompt = request.get("prompt")
        if not isinstance(prompt, str):
            return {"status": "error", "message": "Missing 'prompt' field"}
        pref = request.get("model_pref")
        model = self.core.registry.model_for_pref(pref if isinstance(pref, str) else None)
        if model is None:
            return {"status": "error", "message": f"No model found for preference: {pref}"}
        try:
            params = parse_params(request.get("params"))
        except BadRequest as exc:
            return {"status": "error", "message": str(exc)}
        conv = request.get("conversation_id")
        conv_id = conv if isinstance(conv, str) and conv else None
        shadow = no_load(request)
        history = self._conversations.get(conv_id, []) if conv_id else []
        full_prompt = "\n".join([*(f"{q}\n{a}" for q, a in history), prompt])
        try:
            text, _tokens = await self.core.generate(model, full_prompt, params,
                                                     no_load=shadow)
        except LedgerError as exc:
            return {"status": "error", "message": str(exc)}
        reply: dict[str, Any] = {
            "status": "ok",
            "response_text": text,
            "model_used": model,
            "timestamp": time.time(),
        }
        if conv_id:
            if not shadow:  # a no-load copy reads a conversation, never writes one
                self._remember(conv_id, prompt, text)
            reply["conversation_id"] = conv_id
            reply["using_kv_cache"] = True
        return reply

    def _remember(self, conv_id: str, prompt: str, text: str) -> None:
        turns = self._conversations.setdefault(conv_id, [])
        self._conversations.move_to_end(conv_id)
        turns.append((prompt, text))
        del turns[:-MAX_TURNS]
        while len(self._conversations) > MAX_CONVERSATIONS:
            self._conversations.popitem(last=False)

    def _clear_conversation(self, request: dict[str, Any]) -> dict[str, Any]:
        conv_id = request.get("conversation_id")
        if not isinstance(conv_id, str) or not conv_id:
            return {"status": "error", "message": "Missing 'conversation_id' field"}
        if self._conversations.pop(conv_id, None) is None:
            return {
                "status": "error",
                "message": f"Unknown conversation: {conv_id}",
                "conversation_id": conv_id,
            }
        return {
            "status": "ok",
            "message": f"Conversation {conv_id} cleared",
            "conversation_id": conv_id,
        }

    def _loaded_summary(self) -> dict[str, Any]:
        """loaded_models (everything holding memory), totals and budget."""
        ledger = self.core.ledger
        return {
            "loaded_models": {
                name: self._loaded_entry(snap) for name, snap in ledger.charged().items()
            },
            "total_models": len(self.core.registry.models),
            "total_vram_used_mb": ledger.used_mb(),
            "total_vram_mb": ledger.budget_mb,
        }

    def _loaded_entry(self, snap: EntrySnapshot) -> dict[str, Any]:
        return {
            "vram_usage_mb": snap.charged_mb,
            "device": self.core.device,
            "last_used": snap.last_used,
            "is_active": snap.state is ModelState.ONLINE,
            "quantization": snap.quantization,
        }

    # -- command requests ----------------------------------------------------------------

    async def _command(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request["command"]
        if command == "GET_LOADED_MODELS_STATUS":
            return {"status": "SUCCESS", **self._loaded_summary()}
        if command == "HEALTH_CHECK":
            return {
                "status": "SUCCESS",
                "health": "ok",
                "uptime_seconds": self.core.uptime(),
                "loaded_models": len(self.core.ledger.charged()),
                "total_vram_used_mb": self.core.ledger.used_mb(),
                "total_vram_mb": self.core.ledger.budget_mb,
                "timestamp": time.time(),
            }
        if command in ("LOAD_MODEL", "UNLOAD_MODEL"):
            name = request.get("model_name", request.get("model_id"))
            if not isinstance(name, str) or not name:
                return {"status": "ERROR", "message": "Missing 'model_name' field"}
            try:
                if command == "LOAD_MODEL":
                    loaded = await self.core.ledger.ensure_loaded(name)
                    mb = self.core.ledger.entry(name).charged_mb
                    verb = "loaded" if loaded else "already loaded"
                    return {"status": "SUCCESS", "message": f"Model {name} {verb} ({mb} MB)"}
                if await self.core.ledger.unload(name):
                    return {"status": "SUCCESS", "message": f"Model {name} unloaded"}
                return {"status": "ERROR", "message": f"Model {name} is not loaded"}
            except LedgerError as exc:
                return {"status": "ERROR", "message": str(exc)}
        return {"status": "ERROR", "message": f"Unknown command: {command}"}

    # -- model-access request ------------------------------------------------------------

    async def _model_access(self, request: dict[str, Any]) -> dict[str, Any]:
        model_id = request.get("model_id")
        request_id = request.get("request_id")

        def failure(code: str, message: str) -> dict[str, Any]:
            return {
                "status": "ERROR_LOADING_MODEL",
                "request_id": request_id,
                "model_id": model_id,
                "error_message": message,
                "error_code": code,
                "timestamp": iso_now(),
            }

        if not isinstance(model_id, str) or not model_id:
            return failure("MISSING_MODEL_ID", "Missing 'model_id' field")
        spec = self.core.registry.spec(model_id)
        if spec is None:
            return failure("MODEL_NOT_FOUND", f"Model {model_id} not found in configuration")
        try:
            await self.core.ledger.ensure_loaded(model_id)
        except UnknownVram as exc:
            return failure("UNKNOWN_VRAM", str(exc))
        except InsufficientVram as exc:
            return failure("INSUFFICIENT_VRAM", str(exc))
        except UnknownModel as exc:  # pragma: no cover - checked above
            return failure("MODEL_NOT_FOUND", str(exc))
        except Exception as exc:
            return failure("PROCESSING_ERROR", str(exc))
        context = request.get("context")
        context = context if isinstance(context, dict) else {}
        return {
            "status": "MODEL_READY",
            "request_id": request_id,
            "model_id": model_id,
            "access_info": {
                "message": "MMA approved model loading",
                "model_path_from_config": spec.path,
                "vram_allocated_mb": self.core.ledger.entry(model_id).charged_mb,
                "quantization_level": context.get("quantization_level", spec.quantization),
                "priority": context.get("priority", request.get("priority", "normal")),
            },
            "timestamp": iso_now(),
        }


def main(argv: list[str] | None = None) -> int:
    """``python -m backends.mma``: serve the MMA dialect until SIGTERM/SIGINT."""
    parser = server.make_parser(
        "python -m backends.mma",
        "Reference ModelManagerAgent (legacy MMA dialect; evicts LRU idle models when full).",
        port=7224,
        health_port=7225,
        port_env="MODEL_MANAGER_PORT",
        health_env=None,
    )
    args: argparse.Namespace = parser.parse_args(argv)
    return server.run(args, "evict", lambda core, _args: MMADialect(core))


if __name__ == "__main__":
    sys.exit(main())

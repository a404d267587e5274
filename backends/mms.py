"""The reference MMS (ModelManagerSuite): the new dialect, refusing loads that do not fit.

Implements every action of the MMS table in ``protocol.md``. Kept faithful to the deployed
service: it has no ``status``, ``clear_conversation``, ``command`` or model-access request,
and answers them as a missing or unknown action. ``conversation_id`` is echoed, not
remembered (the MMS keeps no conversation history).

``generate_text`` failures: the intended reply is ``{"status": "error", "message": ...}``.
The deployed MMS answered them as ``{"error": "..."}`` with no status key; the hidden flag
``--legacy-error-shape`` reproduces that so the shim's tolerance of it can be tested.

Test-only fault injection (hidden flags, off by default): ``--fault-model NAME`` with
``--fault-error-rate P`` (seeded by ``--fault-seed``) answers that model's generates with an
error at rate P, and ``--fault-delay-ms MS`` delays them; used by the rollout tests.

Run: ``python -m backends.mms --port 7211 --health-port 8211 --models config/models.toml``.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from backends import server
from backends.ledger import LedgerError, ModelState
from backends.server import BadRequest, NotAnObject, ServiceCore, decode_request, parse_params

#: ``max_tokens`` when a generate_text request does not say.
DEFAULT_MAX_TOKENS = 1024
#: Evaluations kept per model.
MAX_EVALUATIONS = 100
#: Task types that map straight onto a load-policy name in ``select_model``.
_TASK_POLICY = {
    "chat": "fast",
    "general": "fast",
    "fast": "fast",
    "code": "quality",
    "reasoning": "quality",
    "quality": "quality",
    "fallback": "fallback",
    "stt": "stt",
    "speech_to_text": "stt",
    "transcription": "stt",
    "tts": "tts",
    "text_to_speech": "tts",
}


class MetricSummary(msgspec.Struct, kw_only=True):
    """Running summary of one performance metric of one model."""

    count: int = 0
    total: float = 0.0
    min: float | None = None
    max: float | None = None
    last: float | None = None

    def add(self, value: float) -> None:
        """Fold in one observation."""
        self.count += 1
        self.total += value
        self.min = value if self.min is None else min(self.min, value)
        self.max = value if self.max is None else max(self.max, value)
        self.last = value

    def as_dict(self) -> dict[str, Any]:
        """The reply form."""
        mean = self.total / self.count if self.count else None
        return {"count": self.count, "mean": mean, "min": self.min, "max": self.max,
                "last": self.last}


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Fault:
    """Injected misbehaviour of one model's generates (tests only): errors at a seeded
    rate, and a delay."""

    def __init__(self, model: str, error_rate: float, delay_ms: int, seed: int) -> None:
        self.model = model
        self.error_rate = error_rate
        self.delay_s = delay_ms / 1000
        self._rng = random.Random(seed)

    async def strike(self, model: str) -> bool:
        """Delay if asked; True when this generate must fail."""
        if model != self.model:
            return False
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return self._rng.random() < self.error_rate


class MMSDialect:
    """Maps MMS requests to replies against the shared core."""

    def __init__(self, core: ServiceCore, *, legacy_error_shape: bool = False,
                 fault: Fault | None = None) -> None:
        self.core = core
        self.legacy_error_shape = legacy_error_shape
        self.fault = fault
        self._usage: Counter[str] = Counter()
        self._by_action: Counter[str] = Counter()
        self._metrics: dict[str, dict[str, MetricSummary]] = {}
        self._evaluations: dict[str, list[dict[str, Any]]] = {}
        self._actions: dict[str, Handler] = {
            "load_model": self._load_model,
            "unload_model": self._unload_model,
            "generate_text": self._generate_text,
            "generate": self._generate_legacy,
            "list_models": self._list_models,
            "health_check": self._health_check,
            "get_loaded_models_status": self._loaded_status,
            "select_model": self._select_model,
            "predict_models": self._predict_models,
            "record_usage": self._record_usage,
            "preload_models": self._preload_models,
            "log_performance_metric": self._log_metric,
            "log_model_evaluation": self._log_evaluation,
            "get_performance_metrics": self._get_metrics,
            "get_stats": self._get_stats,
        }

    # -- entry points --------------------------------------------------------------------

    async def handle(self, payload: bytes) -> dict[str, Any]:
        """Every request needs a known ``action``."""
        try:
            request = decode_request(payload)
        except NotAnObject:
            self.core.counters.bad_requests += 1
            return self.error_reply("Invalid request format")
        except BadRequest as exc:
            self.core.counters.bad_requests += 1
            return self.error_reply(str(exc))
        if "action" not in request:
            return self.error_reply("Missing action field")
        action = request["action"]
        handler = self._actions.get(action) if isinstance(action, str) else None
        if handler is None:
            return self.error_reply(f"Unknown action: {action}")
        self._by_action[action] += 1
        try:
            return await handler(request)
        except Exception as exc:
            self.core.counters.errors_total += 1
            return self.error_reply(f"Error processing {action}: {exc}")

    def error_reply(self, message: str) -> dict[str, Any]:
        """The MMS's error shape: errors use the key ``message``."""
        return {"status": "error", "message": message}

    def health(self) -> dict[str, Any]:
        """Health socket reply."""
        ledger = self.core.ledger
        return {
            "status": "ok",
            "agent": "ModelManagerSuite",
            "uptime": self.core.uptime(),
            "timestamp": time.time(),
            "loaded_models": len(ledger.charged()),
            "vram_used_mb": ledger.used_mb(),
            "vram_budget_mb": ledger.budget_mb,
            "device": "cuda" if self.core.device.startswith("cuda") else "cpu",
            "metrics": self._metrics_block(),
        }

    def _metrics_block(self) -> dict[str, Any]:
        counters = msgspec.structs.asdict(self.core.counters)
        return {**counters, **msgspec.structs.asdict(self.core.ledger.stats)}

    # -- model life cycle ----------------------------------------------------------------

    async def _load_model(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("model_id")
        if not isinstance(name, str) or not name:
            return {"status": "error", "loaded": False, "message": "Missing 'model_id' field"}
        try:
            loaded = await self.core.ledger.ensure_loaded(name)
        except LedgerError as exc:
            return {"status": "error", "loaded": False, "message": str(exc)}
        verb = "loaded" if loaded else "already loaded"
        return {"status": "success", "loaded": True, "message": f"Model {name} {verb}"}

    async def _unload_model(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("model_id")
        if not isinstance(name, str) or not name:
            return {"status": "error", "unloaded": False, "message": "Missing 'model_id' field"}
        try:
            done = await self.core.ledger.unload(name)
        except LedgerError as exc:
            return {"status": "error", "unloaded": False, "message": str(exc)}
        if not done:
            return {"status": "error", "unloaded": False, "message": f"Model {name} is not loaded"}
        return {"status": "success", "unloaded": True, "message": f"Model {name} unloaded"}

    async def _preload_models(self, request: dict[str, Any]) -> dict[str, Any]:
        ids = request.get("model_ids")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            return self.error_reply("'model_ids' must be a list of model ids")
        loaded: list[str] = []
        failed: dict[str, str] = {}
        for name in ids:
            try:
                await self.core.ledger.ensure_loaded(name)
                loaded.append(name)
            except LedgerError as exc:
                failed[name] = str(exc)
        return {
            "status": "success",
            "message": f"Preloaded {len(loaded)} models",
            "loaded": loaded,
            "failed": failed,
        }

    # -- generation ----------------------------------------------------------------------

    def _generation_error(self, message: str) -> dict[str, Any]:
        # Intended shape; the deployed MMS sent {"error": message} with no status key.
        if self.legacy_error_shape:
            return {"error": message}
        return self.error_reply(message)

    async def _generate_text(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("model_id")
        if not isinstance(name, str) or not name:
            return self._generation_error("Missing 'model_id' field")
        return await self._generate(name, request, request)

    async def _generate_legacy(self, request: dict[str, Any]) -> dict[str, Any]:
        pref = request.get("model_pref")
        name = self.core.registry.model_for_pref(pref if isinstance(pref, str) else None)
        if name is None:
            return self._generation_error(f"No model found for preference: {pref}")
        return await self._generate(name, request, request.get("params"))

    async def _generate(self, name: str, request: dict[str, Any], params: Any) -> dict[str, Any]:
        if self.fault is not None and await self.fault.strike(name):
            self.core.counters.errors_total += 1
            return self._generation_error(f"Generation failed: injected fault on {name}")
        prompt = request.get("prompt")
        if not isinstance(prompt, str):
            return self._generation_error("Missing 'prompt' field")
        system = request.get("system_prompt")
        if isinstance(system, str) and system:
            prompt = f"{system}\n{prompt}"
        try:
            gen = parse_params(params, max_tokens=DEFAULT_MAX_TOKENS)
            text, tokens = await self.core.generate(name, prompt, gen)
        except (BadRequest, LedgerError) as exc:
            return self._generation_error(str(exc))
        except Exception as exc:
            self.core.counters.errors_total += 1
            return self._generation_error(f"Generation failed: {exc}")
        self._usage[name] += 1
        reply: dict[str, Any] = {
            "status": "success",
            "text": text,
            "model_id": name,
            "tokens_generated": tokens,
        }
        conv = request.get("conversation_id")
        if conv is not None:
            reply["conversation_id"] = conv
        return reply

    # -- what is loaded ------------------------------------------------------------------

    async def _list_models(self, request: dict[str, Any]) -> dict[str, Any]:
        models = []
        for name, snap in self.core.ledger.entries().items():
            item: dict[str, Any] = {
                "model_id": name,
                "type": snap.type,
                "estimated_vram_mb": snap.estimated_vram_mb,
                "loaded": snap.state is ModelState.ONLINE,
                "status": snap.state.value,
            }
            if snap.last_used is not None:
                item["last_used"] = snap.last_used
            models.append(item)
        return {"status": "success", "models": models}

    async def _health_check(self, request: dict[str, Any]) -> dict[str, Any]:
        ledger = self.core.ledger
        entries = ledger.entries()
        messages = {
            ModelState.ONLINE: "Loaded",
            ModelState.LOADING: "Loading",
            ModelState.AVAILABLE: "Not loaded",
        }
        details = {
            name: {
                "status": snap.state.value,
                "message": snap.error if snap.state is ModelState.ERROR else messages[snap.state],
            }
            for name, snap in entries.items()
        }
        errors = any(s.state is ModelState.ERROR for s in entries.values())
        return {
            "status": "degraded" if errors else "healthy",
            "total_models": len(entries),
            "online_models": sum(s.state is ModelState.ONLINE for s in entries.values()),
            "loaded_models": len(ledger.charged()),
            "vram_used_mb": ledger.used_mb(),
            "vram_budget_mb": ledger.budget_mb,
            "model_details": details,
            "timestamp": time.time(),
        }

    async def _loaded_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return {
            "status": "success",
            "loaded_models": {
                name: {
                    "status": snap.state.value,
                    "last_used": snap.last_used,
                    "vram_usage": snap.charged_mb,
                }
                for name, snap in self.core.ledger.charged().items()
            },
        }

    # -- selection and usage -------------------------------------------------------------

    async def _select_model(self, request: dict[str, Any]) -> dict[str, Any]:
        task = request.get("task_type", "general")
        size = request.get("context_size", 0)
        if not isinstance(task, str):
            return self.error_reply("'task_type' must be a string")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return self.error_reply("'context_size' must be a non-negative integer")
        registry = self.core.registry
        preferred = registry.model_for_pref(_TASK_POLICY.get(task.lower(), task))
        specs = registry.models
        if preferred is not None and specs[preferred].context_length >= size:
            return {"status": "success", "selected_model": preferred}
        kind = specs[preferred].type if preferred is not None else "llm"
        fits = sorted(
            (s.estimated_vram_mb or 0, n)
            for n, s in specs.items()
            if s.type == kind and s.context_length >= size
        )
        if not fits:
            return self.error_reply(f"No {kind} model with context_length >= {size}")
        return {"status": "success", "selected_model": fits[0][1]}

    async def _predict_models(self, request: dict[str, Any]) -> dict[str, Any]:
        ranked = [name for name, _ in sorted(self._usage.items(), key=lambda x: (-x[1], x[0]))]
        if not ranked:
            fast = self.core.registry.model_for_pref("fast")
            ranked = [fast] if fast else []
        return {"status": "success", "predicted_models": ranked[:3]}

    async def _record_usage(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("model_id")
        if not isinstance(name, str) or not name:
            return self.error_reply("Missing 'model_id' field")
        if name not in self.core.registry.models:
            return self.error_reply(f"Unknown model: {name}")
        self._usage[name] += 1
        return {"status": "success", "message": f"Usage recorded for {name}"}

    # -- performance bookkeeping ---------------------------------------------------------

    async def _log_metric(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("model_id")
        metric = request.get("metric_name", request.get("metric"))
        value = request.get("value")
        if not isinstance(name, str) or name not in self.core.registry.models:
            return self.error_reply(f"Unknown model: {name}")
        if not isinstance(metric, str) or not metric:
            return self.error_reply("Missing 'metric_name' field")
        if not isinstance(value, int | float) or isinstance(value, bool):
            return self.error_reply("'value' must be a number")
        self._metrics.setdefault(name, {}).setdefault(metric, MetricSummary()).add(float(value))
        return {"status": "success", "message": f"Metric {metric} recorded for {name}"}

    async def _log_evaluation(self, request: dict[str, Any]) -> dict[str, Any]:
        name = request.get("model_id")
        score = request.get("score")
        if not isinstance(name, str) or name not in self.core.registry.models:
            return self.error_reply(f"Unknown model: {name}")
        if score is not None and (not isinstance(score, int | float) or isinstance(score, bool)):
            return self.error_reply("'score' must be a number")
        evals = self._evaluations.setdefault(name, [])
        evals.append({"score": score, "evaluation": request.get("evaluation"),
                      "timestamp": time.time()})
        del evals[:-MAX_EVALUATIONS]
        return {"status": "success", "message": f"Evaluation recorded for {name}"}

    async def _get_metrics(self, request: dict[str, Any]) -> dict[str, Any]:
        wanted = request.get("model_id")
        names = [wanted] if isinstance(wanted, str) else sorted(
            set(self._metrics) | set(self._evaluations))
        metrics = {
            n: {m: s.as_dict() for m, s in self._metrics.get(n, {}).items()} for n in names
        }
        evaluations = {n: list(self._evaluations.get(n, [])) for n in names}
        return {"status": "success", "metrics": metrics, "evaluations": evaluations}

    async def _get_stats(self, request: dict[str, Any]) -> dict[str, Any]:
        ledger = self.core.ledger
        return {
            "status": "success",
            "stats": {
                **self._metrics_block(),
                "requests_by_action": dict(self._by_action),
                "usage": dict(self._usage),
                "uptime_seconds": self.core.uptime(),
                "total_models": len(self.core.registry.models),
                "loaded_models": len(ledger.charged()),
                "vram_used_mb": ledger.used_mb(),
                "vram_budget_mb": ledger.budget_mb,
            },
        }


def main(argv: list[str] | None = None) -> int:
    """``python -m backends.mms``: serve the MMS dialect until SIGTERM/SIGINT."""
    parser = server.make_parser(
        "python -m backends.mms",
        "Reference ModelManagerSuite (MMS dialect; refuses loads that do not fit).",
        port=7211,
        health_port=8211,
        port_env="AGENT_PORT",
        health_env="HEALTH_PORT",
    )
    parser.add_argument("--legacy-error-shape", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fault-model", default="", help=argparse.SUPPRESS)
    parser.add_argument("--fault-error-rate", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--fault-delay-ms", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--fault-seed", type=int, default=1, help=argparse.SUPPRESS)
    args: argparse.Namespace = parser.parse_args(argv)
    legacy = bool(args.legacy_error_shape)
    fault = Fault(args.fault_model, args.fault_error_rate, args.fault_delay_ms,
                  args.fault_seed) if args.fault_model else None
    return server.run(args, "refuse", lambda core, _a: MMSDialect(
        core, legacy_error_shape=legacy, fault=fault))


if __name__ == "__main__":
    sys.exit(main())

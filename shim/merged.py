"""One view of what is loaded, from every backend at once.

During a split both backends hold models on one GPU; VRAMOptimizer decides what to
unload from ``GET_LOADED_MODELS_STATUS`` (protocol.md), so status, loaded-status and
health replies must show both ledgers: the union of loaded models, each with its real
``device`` (the backend's own, else the backend's configured ``device`` label),
``last_used`` a float epoch, used VRAM summed. Budgets add up across devices and count
once per device (two managers on one GPU share one budget: the larger is reported).
"""

from __future__ import annotations

from collections.abc import Mapping

from shim.dialects import ModelInfo, Op, Result


def label_devices(result: Result, device: str,
                  quantization: Mapping[str, str] | None = None) -> None:
    """Fill what the backend did not report (MMS reports neither): ``device`` with the
    backend's configured label, ``quantization`` from the model config."""
    for model, info in (result.loaded_models or {}).items():
        if device and info.device in ("", "unknown"):
            info.device = device
        if quantization and info.quantization in ("", "unknown") and model in quantization:
            info.quantization = quantization[model]


def merge(op: Op, results: dict[str, Result], devices: Mapping[str, str],
          quantization: Mapping[str, str] | None = None) -> Result:
    """One Result from each backend's (successful) Result; ``devices`` labels backends.

    A model on two backends at once keeps the entry with the more recent ``last_used``
    (ownership counts such duplicates separately).
    """
    loaded: dict[str, ModelInfo] = {}
    used: float = 0.0
    budgets: dict[str, float] = {}
    health = "ok"
    total_models = counted = 0
    merged = Result(ok=True, source="shim")
    for name, r in results.items():
        label_devices(r, devices.get(name, ""), quantization)
        for model, info in (r.loaded_models or {}).items():
            info.last_used = float(info.last_used or 0.0)
            old = loaded.get(model)
            if old is None or (old.last_used or 0.0) < info.last_used:
                loaded[model] = info
        part = r.vram_used_mb
        if part is None:
            part = sum(m.vram_mb for m in (r.loaded_models or {}).values())
        used += part
        if r.vram_budget_mb is not None:
            key = devices.get(name) or "gpu"
            budgets[key] = max(budgets.get(key, 0.0), float(r.vram_budget_mb))
        if r.health not in (None, "ok"):
            health = "degraded"
        total_models = max(total_models, r.total_models or 0)
        counted += r.loaded_count or 0  # HEALTH_CHECK/health_check report a count only
        if merged.routing_policy is None and r.routing_policy is not None:
            merged.routing_policy = r.routing_policy
        if merged.uptime_s is None and r.uptime_s:
            merged.uptime_s = r.uptime_s
    merged.loaded_models = loaded
    merged.loaded_count = len(loaded) if loaded else counted
    merged.vram_used_mb = round(used) if float(used).is_integer() else used
    total_budget = float(sum(budgets.values()))
    merged.vram_budget_mb = round(total_budget) if total_budget.is_integer() else total_budget
    merged.total_models = max(total_models, len(loaded))
    merged.health = health
    return merged

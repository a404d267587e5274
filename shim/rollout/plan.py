"""Rollout plans: the cutover written in the migration's own terms, and what it implies.

A plan (``config/rollouts/*.toml``) is an ordered list of stages. Each stage names the
models the target backend (MMS) serves, optionally the share of model-free traffic it
takes, and whether shadow mode mirrors the rest. With ownership on, a model lives where
its name's bucket falls (``bucket_of("model:" + name)``, shim.ownership ``desired``), and
the routing table gives each backend a consecutive range of buckets in config order
(shim.routing). So the target's weight is a threshold: a model is on the target once the
target's share passes the model's own point, and the sets a weight can give are nested.
``resolve`` turns each stage into the weights that give exactly its set, or refuses it.

Model-free traffic (status, list_models, requests with no model) is bucketed the same
way, so its share IS the target's weight. A stage's set pins that weight to an interval
``[lo, hi]`` (the target takes the set's last model at ``lo`` and the next model at
``hi + 0.01``); a stated ``model_free_percent`` must fall in it, and without one the
lowest weight is taken (the least model-free traffic on the new side), never below the
previous stage's. Weights always sum to 100 (two decimals, 0.01 % = one bucket).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec

from shim.config import ShimConfig
from shim.errors import PlanError
from shim.routing import BUCKETS, bucket_of
from shim.runtime import routing_table

GateName = Literal["errors", "timeouts", "latency", "shadow", "vram"]
ALL_GATES: tuple[GateName, ...] = ("errors", "timeouts", "latency", "shadow", "vram")




class Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Unknown keys are errors, every field keyword-only."""


class GateSettings(Base):
    """Thresholds of the gates (see shim.rollout.gates for what each one tests)."""

    #: Sequential tests' error rates: false fail (alpha) and false pass (beta).
    alpha: float = 0.05
    beta: float = 0.05
    #: Answers a cell needs before it may pass (each model the stage moves is a cell).
    min_sample: int = 20
    #: Error rate accepted on the target (raised to the source's own rate when higher),
    #: and the extra rate that must be caught.
    error_rate: float = 0.02
    error_delta: float = 0.10
    timeout_rate: float = 0.01
    timeout_delta: float = 0.10
    #: Latency: target/source ratio of medians and of 99th percentiles allowed.
    max_p50_ratio: float = 1.5
    max_p99_ratio: float = 3.0
    #: Shadow comparisons: mismatch rate accepted, and the extra rate to catch.
    mismatch_rate: float = 0.02
    mismatch_delta: float = 0.10
    #: Free VRAM on the target, percent of its budget, at the latest poll.
    min_vram_headroom_percent: float = 10.0


class Stage(Base):
    """One step: what the target serves, for how long at least and at most."""

    name: str = ""
    #: The models the target serves at this stage (all of them, not only the new ones).
    models: list[str] = msgspec.field(default_factory=list)
    #: The share of model-free traffic the target takes (percent); default: the lowest
    #: the model set allows.
    model_free_percent: float | None = None
    #: Mirror the rest to the other backend and compare (mode "shadow").
    shadow: bool = False
    min_bake_s: float | None = None
    max_bake_s: float | None = None
    #: Which gates decide; default: the plan's.
    gates: list[GateName] | None = None
    #: Per-stage threshold overrides.
    thresholds: dict[str, float] = msgspec.field(default_factory=dict)


class Probes(Base):
    """Synthetic generates to the stage's models on the target, when evidence is short."""

    enabled: bool = True
    #: Probes per second at most (all models together).
    rate_per_s: float = 1.0
    prompt: str = "the default value"
    max_tokens: int = 4
    timeout_ms: int = 4000


class Plan(Base):
    """The whole file."""

    name: str = ""
    source: str = "mma"
    target: str = "mms"
    #: Where a failed gate goes: the last stage that passed, or all traffic to the source.
    on_failure: Literal["last_good", "all_source"] = "last_good"
    #: What a stage that reaches its max_bake_s without passing does.
    on_timeout: Literal["rollback", "pause"] = "rollback"
    min_bake_s: float = 60.0
    max_bake_s: float = 600.0
    #: How often gates are evaluated (seconds).
    tick_s: float = 1.0
    gates: list[GateName] = msgspec.field(default_factory=lambda: list(ALL_GATES))
    thresholds: GateSettings = msgspec.field(default_factory=GateSettings)
    probes: Probes = msgspec.field(default_factory=Probes)
    stages: list[Stage] = msgspec.field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Step:
    """A stage resolved against a shim config: the runtime it needs and what it moves."""

    index: int
    name: str
    models: tuple[str, ...]
    #: The models this stage puts on the target that the previous one did not.
    moves: tuple[str, ...]
    target_percent: float
    weights: dict[str, float]
    interval: tuple[float, float]
    shadow: bool
    min_bake_s: float
    max_bake_s: float
    gates: tuple[GateName, ...]
    thresholds: GateSettings
    why: str

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "models": list(self.models),
                "moves": list(self.moves), "weights": dict(self.weights),
                "model_free_percent": self.target_percent,
                "allowed_percent": list(self.interval), "shadow": self.shadow,
                "min_bake_s": self.min_bake_s, "max_bake_s": self.max_bake_s,
                "gates": list(self.gates), "why": self.why}


def load_plan(path: str | Path) -> tuple[Plan, dict[str, Any]]:
    """Read and decode a plan file; returns the Plan and the raw table (sent to the shim).

    Raises PlanError naming the file and the field.
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise PlanError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PlanError(f"{path}: not valid TOML: {exc}") from None
    raw.setdefault("name", path.stem)
    return decode_plan(raw, str(path)), raw


def decode_plan(raw: Any, source: str = "<plan>") -> Plan:
    """A Plan from an already parsed table; PlanError on unknown keys or wrong types."""
    try:
        plan = msgspec.convert(raw, Plan, strict=False)
    except msgspec.ValidationError as exc:
        raise PlanError(f"{source}: {exc}") from None
    if not plan.name:
        raise PlanError(f"{source}: the plan has no name")
    return plan


def model_names(cfg: ShimConfig) -> list[str]:
    """The models the backends know (``[models.*]`` of the config's models file)."""
    try:
        models = tomllib.loads(Path(cfg.models_file).read_text()).get("models", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PlanError(f"cannot read the models file {cfg.models_file}: {exc}") from None
    return sorted(models) if isinstance(models, dict) else []


def threshold_units(model: str, order: list[str], source: str, target: str) -> int:
    """The target's weight in buckets (0.01 %) from which ``model`` lives on the target.

    With the source before the target in config order the target owns the top buckets,
    so it takes the model once ``units >= BUCKETS - bucket``; otherwise it owns the
    bottom ones and takes it once ``units > bucket``.
    """
    bucket = bucket_of("model:" + model)
    if order.index(source) < order.index(target):
        return BUCKETS - bucket
    return bucket + 1


def weights_for(units: int, order: list[str], source: str, target: str) -> dict[str, float]:
    """Weights (percent, two decimals, summing to 100) giving the target ``units``."""
    target_pct = round(units / 100, 2)
    return {n: (target_pct if n == target else round(100 - target_pct, 2) if n == source
                else 0.0) for n in order}


def served_by(weights: dict[str, float], models: list[str], target: str) -> set[str]:
    """The models the routing table built from ``weights`` puts on ``target``."""
    table = routing_table(weights)
    return {m for m in models if table.backend_for(bucket_of("model:" + m)) == target}


def resolve(plan: Plan, cfg: ShimConfig, models: list[str] | None = None) -> list[Step]:
    """Each stage's weights and moves, or PlanError saying why the plan cannot run."""
    where = f"plan {plan.name!r}"
    order = list(cfg.backends)
    for role, name in (("source", plan.source), ("target", plan.target)):
        if name not in cfg.backends:
            raise PlanError(f"{where}: {role} {name!r} is not a backend "
                            f"(expected one of {', '.join(order)})")
    if plan.source == plan.target:
        raise PlanError(f"{where}: source and target are the same backend")
    if not plan.stages:
        raise PlanError(f"{where}: no stages")
    _check_numbers(plan, where)
    known = model_names(cfg) if models is None else sorted(models)
    points = {m: threshold_units(m, order, plan.source, plan.target) for m in known}
    steps: list[Step] = []
    prev_models: set[str] = set()
    prev_units = 0
    for i, stage in enumerate(plan.stages):
        label = f"{where} stage {i + 1}" + (f" ({stage.name})" if stage.name else "")
        wanted = set(stage.models)
        unknown = sorted(wanted - set(known))
        if unknown:
            raise PlanError(f"{label}: unknown models {', '.join(unknown)} "
                            f"(the models file has {', '.join(known)})")
        if len(wanted) != len(stage.models):
            raise PlanError(f"{label}: a model is listed twice")
        back = sorted(prev_models - wanted)
        if back:
            raise PlanError(f"{label}: {', '.join(back)} would move back to {plan.source}; "
                            "a plan only moves forward (a rollback is the engine's job)")
        lo = max((points[m] for m in wanted), default=0)
        hi = min((points[m] - 1 for m in known if m not in wanted), default=BUCKETS)
        if lo > hi:
            blocking = sorted((m for m in known if m not in wanted and points[m] <= lo),
                              key=points.__getitem__)
            raise PlanError(
                f"{label}: no weight gives {plan.target} exactly {sorted(wanted) or 'no model'}"
                f": with ownership a model's place is its bucket, and "
                f"{', '.join(blocking)} move before "
                f"{max(wanted, key=points.__getitem__)} (at "
                f"{', '.join(f'{m} {points[m] / 100:.2f}%' for m in blocking)} vs "
                f"{lo / 100:.2f}%); add them to this stage or an earlier one")
        if stage.model_free_percent is not None:
            units = round(stage.model_free_percent * 100)
            if not lo <= units <= hi:
                raise PlanError(f"{label}: model_free_percent {stage.model_free_percent:g} "
                                f"is outside {lo / 100:.2f}..{hi / 100:.2f}, the weights that "
                                f"give {plan.target} exactly this stage's models")
            why = "model_free_percent as written"
        else:
            units = max(lo, prev_units)
            why = ("the lowest weight giving these models" if units == lo
                   else "the previous stage's weight (weights never go down)")
        if units < prev_units:
            raise PlanError(f"{label}: {plan.target} weight {units / 100:.2f}% is below the "
                            f"previous stage's {prev_units / 100:.2f}%")
        weights = weights_for(units, order, plan.source, plan.target)
        got = served_by(weights, known, plan.target)
        if got != wanted:  # the arithmetic above and the routing table must agree
            raise PlanError(f"{label}: weights {weights} give {sorted(got)}, not "
                            f"{sorted(wanted)}")
        moving = units not in (0, BUCKETS)
        if moving and not cfg.ownership.enabled:
            raise PlanError(f"{label}: ownership is off, so a split weight sends requests for "
                            "one model to both backends and loads it on both; turn "
                            "[ownership] on or use only 0/100 stages")
        thresholds = msgspec.structs.replace(plan.thresholds, **stage.thresholds) \
            if stage.thresholds else plan.thresholds
        _check_thresholds(thresholds, label)
        min_bake = plan.min_bake_s if stage.min_bake_s is None else stage.min_bake_s
        max_bake = plan.max_bake_s if stage.max_bake_s is None else stage.max_bake_s
        if not 0 <= min_bake <= max_bake:
            raise PlanError(f"{label}: need 0 <= min_bake_s <= max_bake_s, got "
                            f"{min_bake:g} and {max_bake:g}")
        steps.append(Step(
            index=i, name=stage.name or f"stage-{i + 1}",
            models=tuple(sorted(wanted, key=points.__getitem__)),
            moves=tuple(sorted(wanted - prev_models, key=points.__getitem__)),
            target_percent=units / 100, weights=weights, interval=(lo / 100, hi / 100),
            shadow=stage.shadow, min_bake_s=min_bake, max_bake_s=max_bake,
            gates=tuple(stage.gates if stage.gates is not None else plan.gates),
            thresholds=thresholds, why=why))
        prev_models, prev_units = wanted, units
    return steps


def baseline_weights(plan: Plan, cfg: ShimConfig) -> dict[str, float]:
    """All traffic to the source: where ``all_source`` rolls back to."""
    return weights_for(0, list(cfg.backends), plan.source, plan.target)


def _check_numbers(plan: Plan, where: str) -> None:
    if not plan.tick_s > 0:
        raise PlanError(f"{where}: tick_s must be positive")
    if not plan.probes.rate_per_s >= 0:
        raise PlanError(f"{where}: probes.rate_per_s must not be negative")
    if plan.probes.timeout_ms <= 0 or plan.probes.max_tokens <= 0:
        raise PlanError(f"{where}: probes.timeout_ms and probes.max_tokens must be positive")
    _check_thresholds(plan.thresholds, where)


def _check_thresholds(t: GateSettings, where: str) -> None:
    for name in ("alpha", "beta"):
        if not 0 < getattr(t, name) < 0.5:
            raise PlanError(f"{where}: thresholds.{name} must be within 0..0.5")
    for name in ("error_rate", "timeout_rate", "mismatch_rate"):
        base = getattr(t, name)
        delta = getattr(t, name.replace("_rate", "_delta"))
        if not 0 < base < 1 or not delta > 0 or base + delta >= 1:
            raise PlanError(f"{where}: thresholds.{name} and its delta must be rates with "
                            "0 < rate < rate + delta < 1")
    if t.min_sample < 1:
        raise PlanError(f"{where}: thresholds.min_sample must be at least 1")
    if t.max_p50_ratio <= 0 or t.max_p99_ratio <= 0:
        raise PlanError(f"{where}: latency ratios must be positive")


def format_check(plan: Plan, steps: list[Step]) -> str:
    """What ``mmshim rollout check`` prints: each stage, the models it moves, its weights."""
    lines = [f"plan {plan.name}: {plan.source} -> {plan.target}, {len(steps)} stages, "
             f"on failure: {plan.on_failure}, on timeout: {plan.on_timeout}"]
    for s in steps:
        weights = " ".join(f"{n}={w:g}" for n, w in s.weights.items())
        lines.append(f"  {s.index + 1}. {s.name}: weights {weights} "
                     f"(allowed {plan.target} {s.interval[0]:.2f}..{s.interval[1]:.2f}%: "
                     f"{s.why}); shadow {'on' if s.shadow else 'off'}; "
                     f"bake {s.min_bake_s:g}..{s.max_bake_s:g} s; gates {', '.join(s.gates)}")
        lines.append(f"     moves to {plan.target}: {', '.join(s.moves) or '(no model)'}"
                     f"   {plan.target} serves: {', '.join(s.models) or '(no model)'}")
    return "\n".join(lines)

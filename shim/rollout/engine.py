"""The rollout engine: drives a plan stage by stage, judges each stage, rolls back.

It is an addon (it watches every attempt's outcome and latency, per backend and model,
through ``before_send``/``after_send``) and an extra (started and stopped with the shim).
Every runtime change it makes goes through the Controller (``Controller.apply_change``): one
swap of the Runtime, audited (client ``rollout:<plan>``), persisted in the state file like
an operator's change. Its own progress (plan, stage, bake time, history) is saved next to
the state file (``<state_file stem>.rollout.json``, written atomically with
shim.state.atomic_write), so a restart resumes the bake where it was and never re-applies
a stage that was already applied.

A stage: apply its weights and mode once; bake; every ``tick_s`` evaluate its gates
(shim.rollout.gates). A failed gate rolls back at once (to the last stage that passed, or
to all traffic on the source, per the plan). All gates passed (or not applicable) and at
least ``min_bake_s`` baked: the next stage. ``max_bake_s`` without passing: roll back
(or pause, per the plan). If someone else changes the weights or the mode meanwhile, the
rollout pauses rather than fight them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

import msgspec
from prometheus_client import Counter, Gauge

from shim.addons.base import Addon, Flow
from shim.config import Mode
from shim.errors import CommandError, PlanError
from shim.rollout.gates import (
    Evidence,
    GateResult,
    Outcome,
    latency_gate,
    rate_gate,
    shadow_gate,
    vram_gate,
)
from shim.rollout.plan import Plan, Step, baseline_weights, decode_plan, model_names, resolve
from shim.rollout.probes import Prober
from shim.runtime import Runtime
from shim.state import atomic_write

if TYPE_CHECKING:
    import zmq

    from shim.addons.ownership import Ownership
    from shim.config import ShimConfig
    from shim.control import Controller
    from shim.metrics import Metrics
    from shim.proxy import Proxy

log = logging.getLogger("mmshim.rollout")

Status = Literal["running", "paused", "completed", "rolled_back", "aborted"]
STATE_VERSION = 1
#: Events kept in the history (older ones fall off).
MAX_HISTORY = 200
_OK = frozenset({"ok", "success", "model_ready", "healthy"})


class RolloutState(msgspec.Struct, kw_only=True):
    """What survives a restart."""

    version: int = STATE_VERSION
    plan: dict[str, Any]
    status: Status = "running"
    #: The stage being baked (index into the plan's stages).
    stage: int = 0
    #: Its weights and mode have been applied (never applied twice).
    applied: bool = False
    baked_s: float = 0.0
    #: The last stage that passed; -1: none (the baseline, all traffic on the source).
    last_good: int = -1
    started_at: float = 0.0
    paused_reason: str = ""
    #: Why it rolled back: gate, figures, stage.
    rollback: dict[str, Any] | None = None
    history: list[dict[str, Any]] = msgspec.field(default_factory=list)


class _StatusOnly(msgspec.Struct):
    status: Any = None
    error: Any = msgspec.UNSET


_STATUS_DECODER = msgspec.json.Decoder(_StatusOnly)


def state_path_for(state_file: str) -> Path:
    p = Path(state_file)
    return p.with_name(p.stem + ".rollout.json")


def outcome_of(reply: bytes | None, elapsed_s: float, timeout_s: float) -> Outcome:
    """An attempt's outcome from the caller-dialect reply (None: the attempt failed; a
    timeout when it took about its whole deadline)."""
    if reply is None:
        return "timeout" if elapsed_s >= 0.9 * timeout_s else "error"
    try:  # only the two fields that matter are decoded (this runs for every request)
        body = _STATUS_DECODER.decode(reply)
    except msgspec.ValidationError:
        return "ok"  # not an object: a reply all the same
    except msgspec.DecodeError:
        return "error"
    if body.status is None:
        return "ok" if body.error is msgspec.UNSET else "error"
    return "ok" if str(body.status).lower() in _OK else "error"


class RolloutHost(Protocol):
    """What the engine reads of the shim it runs in (shim.app's ``Shim`` is one): the
    config it started with, its metrics, the proxy and the ownership addon once started
    (None before, or when off), and a synchronous ZeroMQ context for the probes."""

    cfg: ShimConfig
    metrics: Metrics
    proxy: Proxy | None
    ownership: Ownership | None

    @property
    def sync_ctx(self) -> zmq.Context[zmq.Socket[bytes]]: ...


class RolloutEngine(Addon):
    """One shim's rollouts (one at a time). See the module doc."""

    name = "rollout"

    def __init__(self, shim: RolloutHost, controller: Controller, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.shim = shim
        self.controller = controller
        self.path = state_path_for(shim.cfg.shim.state_file)
        self._clock = clock
        try:
            self.models = model_names(shim.cfg)
        except PlanError as exc:
            log.warning("rollout: %s; plans cannot name models", exc)
            self.models = []
        self.evidence = Evidence(frozenset(self.models))
        self.state: RolloutState | None = None
        self.plan: Plan | None = None
        self.steps: list[Step] = []
        self.gates: list[GateResult] = []
        self._stage_t0 = 0.0
        self._shadow_base: dict[str, tuple[int, int]] = {}
        self._vram_polls: list[tuple[float, float | None, float | None]] = []
        self._vram_seen: object = None
        self._task: asyncio.Task[None] | None = None
        self._prober: Prober | None = None
        self._dirty_at = 0.0
        self._save_lock = asyncio.Lock()
        r = shim.metrics.registry
        self.m_stage = Gauge("shim_rollout_stage", "Stage of the rollout plan now (1-based; "
                             "0: all traffic on the source)", ["plan"], registry=r)
        self.m_rollbacks = Counter("shim_rollout_rollbacks", "Automatic rollbacks",
                                   ["plan"], registry=r)
        self.m_gates = Counter("shim_rollout_gate", "Gate verdicts at the end of a stage",
                               ["gate", "verdict"], registry=r)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Restore a saved rollout, start ticking (its hooks are plugged in with the other
        addons, shim.app)."""
        self._restore()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.state is not None:
            with contextlib.suppress(OSError):
                self._write()
        if self._prober is not None:
            self._prober.close()

    def _restore(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("rollout: cannot read %s: %s", self.path, exc.strerror)
            return
        try:
            state = msgspec.json.decode(data, type=RolloutState)
            if state.version != STATE_VERSION:
                raise PlanError(f"version {state.version}, expected {STATE_VERSION}")
            plan = decode_plan(state.plan)
            steps = resolve(plan, self.shim.cfg, self.models)
        except (msgspec.DecodeError, msgspec.ValidationError, PlanError) as exc:
            log.error("rollout: ignoring %s: %s", self.path, exc)
            return
        self.state, self.plan, self.steps = state, plan, steps
        self._stage_t0 = self._clock()
        self._set_prober()
        self._stage_metric()
        if state.status == "running":
            self._event("resumed", f"after a restart, {state.baked_s:.1f} s baked")
            log.warning("rollout %s resumed at stage %d (%s), %.1f s baked", plan.name,
                        state.stage + 1, steps[state.stage].name, state.baked_s)

    # -- the addon hooks ---------------------------------------------------------------

    def after_send(self, flow: Flow, backend: str) -> None:
        """One attempt ended: its outcome and round trip (from ``flow.sent_at``) are
        evidence for the gates."""
        op = flow.op
        if op is None or not flow.sent_at:
            return
        elapsed = time.perf_counter() - flow.sent_at
        now = self._clock()
        proxy = self.shim.proxy
        timeout_s = math.inf
        if proxy is not None:
            rule = flow.rt.rules.get(op.kind.value)
            pool_backend = proxy.pool.backends.get(backend)
            limits = [r / 1000 for r in (rule.timeout_ms if rule else None,
                      pool_backend.config.timeout_ms if pool_backend else None) if r]
            timeout_s = min(limits, default=math.inf)
        self.evidence.add(backend, op.model_id, op.kind.value,
                          outcome_of(flow.answer, elapsed, timeout_s), elapsed, now)

    # -- admin commands ---------------------------------------------------------------------

    def commands(self) -> dict[str, Any]:
        return {"rollout_status": self.cmd_status, "rollout_start": self.cmd_start,
                "rollout_pause": self.cmd_pause, "rollout_resume": self.cmd_resume,
                "rollout_abort": self.cmd_abort, "rollout_promote": self.cmd_promote}

    def cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"rollout": self.describe()}

    async def cmd_start(self, args: dict[str, Any]) -> dict[str, Any]:
        """``{"plan": {...}}``: the plan's table (``mmshim ctl rollout start`` reads the
        file and sends it). Refused while another rollout is running or paused."""
        raw = args.get("plan")
        if not isinstance(raw, dict):
            raise CommandError("bad_request", "rollout_start: give \"plan\", the plan's table")
        if self.state is not None and self.state.status in ("running", "paused"):
            raise CommandError("refused", f"rollout {self.state.plan.get('name')!r} is "
                               f"{self.state.status}; abort it first")
        try:
            plan = decode_plan(raw, "plan")
            steps = resolve(plan, self.shim.cfg, self.models)
        except PlanError as exc:
            raise CommandError("invalid", str(exc)) from None
        self.plan, self.steps = plan, steps
        self.state = RolloutState(plan=raw, started_at=round(time.time(), 3))
        self._set_prober()
        self._event("started", f"{len(steps)} stages")
        await self._apply_stage()
        return {"rollout": self.describe()}

    async def cmd_pause(self, args: dict[str, Any]) -> dict[str, Any]:
        state = self._require("running")
        state.status, state.paused_reason = "paused", "paused by an operator"
        self._event("paused", "by an operator")
        await self._save()
        return {"rollout": self.describe()}

    async def cmd_resume(self, args: dict[str, Any]) -> dict[str, Any]:
        state = self._require("paused")
        expected = self._expected()
        if expected is not None and not self._matches(expected):
            # Someone changed the weights or mode: resuming re-applies the stage.
            state.applied = False
        state.status, state.paused_reason = "running", ""
        self._stage_t0 = self._clock()
        self._event("resumed", "by an operator")
        if not state.applied:
            await self._apply_stage()
        await self._save()
        return {"rollout": self.describe()}

    async def cmd_abort(self, args: dict[str, Any]) -> dict[str, Any]:
        """Stop the rollout and send all traffic back to the source, in one change."""
        state = self._require("running", "paused")
        assert self.plan is not None
        await self._change("rollout_abort", baseline_weights(self.plan, self.shim.cfg),
                           "split", "aborted by an operator")
        state.status = "aborted"
        state.last_good = -1
        self._event("aborted", "all traffic back to " + self.plan.source)
        self._stage_metric()
        await self._save()
        return {"rollout": self.describe()}

    async def cmd_promote(self, args: dict[str, Any]) -> dict[str, Any]:
        """Skip the rest of this stage's bake and its gates: on to the next stage now."""
        state = self._require("running", "paused")
        self._event("promoted", f"stage {state.stage + 1} by an operator after "
                    f"{state.baked_s:.1f} s")
        state.status = "running"
        await self._next_stage(promoted=True)
        return {"rollout": self.describe()}

    def _require(self, *statuses: Status) -> RolloutState:
        if self.state is None or self.state.status not in statuses:
            now = "no rollout" if self.state is None else f"rollout is {self.state.status}"
            raise CommandError("refused", f"{now} (needs {' or '.join(statuses)})")
        return self.state

    # -- the driver -----------------------------------------------------------------------

    async def _loop(self) -> None:
        last = self._clock()
        while True:
            tick = self.plan.tick_s if self.plan is not None else 1.0
            await asyncio.sleep(min(tick, 1.0))
            now = self._clock()
            dt, last = now - last, now
            try:
                await self.tick(dt)
            except Exception:  # the driver must outlive a bug in one tick
                log.exception("rollout tick failed")

    async def tick(self, dt: float) -> None:
        """One step of the driver: bake, judge, move on or roll back."""
        state = self.state
        if state is None or state.status != "running" or self.plan is None:
            return
        if not state.applied:
            await self._apply_stage()
            return
        step = self.steps[state.stage]
        if not self._matches(step):
            state.status = "paused"
            state.paused_reason = ("the weights or the mode were changed outside the "
                                   "rollout; resume re-applies this stage")
            self._event("paused", state.paused_reason)
            await self._save()
            return
        state.baked_s += dt
        self._poll_vram()
        self.gates = self.evaluate(step)
        failed = [g for g in self.gates if g.verdict == "fail"]
        if failed:
            await self._rollback(step, failed[0], "gate failed")
            return
        done = all(g.verdict in ("pass", "n/a") for g in self.gates)
        if done and state.baked_s >= step.min_bake_s:
            await self._next_stage()
            return
        if state.baked_s >= step.max_bake_s:
            waiting = [g for g in self.gates if g.verdict == "wait"]
            if self.plan.on_timeout == "pause":
                state.status = "paused"
                state.paused_reason = (f"max bake {step.max_bake_s:g} s reached without "
                                       "enough evidence: " + "; ".join(
                                           f"{g.gate}: {g.reason}" for g in waiting))
                self._event("paused", state.paused_reason)
                await self._save()
            else:
                await self._rollback(step, waiting[0] if waiting else None,
                                     f"no decision within max bake {step.max_bake_s:g} s")
            return
        needs = sorted({m for g in self.gates for m in g.needs})
        if needs and self._prober is not None and self.plan.probes.enabled:
            self._prober.send(self._probe_targets(needs))
        if self._clock() - self._dirty_at >= 2.0:
            await self._save()

    def evaluate(self, step: Step) -> list[GateResult]:
        """Every gate of ``step`` on the evidence since the stage (re)started."""
        assert self.plan is not None
        t = step.thresholds
        plan, since = self.plan, self._stage_t0
        target, source = plan.target, plan.source
        results = []
        for gate in step.gates:
            if gate == "errors":
                results.append(rate_gate(
                    "errors", "error", self.evidence,
                    target=target, source=source, since=since, moved=step.moves,
                    target_share=step.target_percent, base_rate=t.error_rate,
                    delta=t.error_delta, alpha=t.alpha, beta=t.beta, min_sample=t.min_sample))
            elif gate == "timeouts":
                results.append(rate_gate(
                    "timeouts", "timeout", self.evidence,
                    target=target, source=source, since=since, moved=step.moves,
                    target_share=step.target_percent, base_rate=t.timeout_rate,
                    delta=t.timeout_delta, alpha=t.alpha, beta=t.beta,
                    min_sample=t.min_sample))
            elif gate == "latency":
                results.append(latency_gate(
                    self.evidence,
                    target=target, source=source, since=since, moved=step.moves,
                    max_p50_ratio=t.max_p50_ratio,
                    max_p99_ratio=t.max_p99_ratio, alpha=t.alpha, min_sample=t.min_sample))
            elif gate == "shadow":
                results.append(shadow_gate(
                    self._shadow_delta(), shadow_on=step.shadow, rate=t.mismatch_rate,
                    delta=t.mismatch_delta, alpha=t.alpha, beta=t.beta,
                    min_sample=t.min_sample))
            elif gate == "vram":
                if self.shim.ownership is None:
                    results.append(GateResult("vram", "n/a", "ownership is off: no VRAM polls"))
                elif step.target_percent <= 0:
                    results.append(GateResult("vram", "n/a",
                                              f"{plan.target} takes no traffic"))
                else:
                    results.append(vram_gate(self._vram_polls, target=plan.target,
                                             since=since,
                                             min_headroom_percent=t.min_vram_headroom_percent))
        return results

    # -- stage changes ----------------------------------------------------------------------

    async def _apply_stage(self) -> None:
        state, plan = self.state, self.plan
        assert state is not None and plan is not None
        step = self.steps[state.stage]
        await self._change("rollout_stage", step.weights, "shadow" if step.shadow else "split",
                           f"stage {step.index + 1} ({step.name}): moves "
                           f"{', '.join(step.moves) or 'no model'}")
        state.applied = True
        self._stage_t0 = self._clock()
        self._shadow_base = self._shadow_counts()
        self._vram_polls.clear()
        self.gates = []
        self._event("stage", f"stage {step.index + 1} ({step.name}) applied: weights "
                    f"{_weights(step.weights)}, moves {', '.join(step.moves) or 'no model'}")
        self._stage_metric()
        await self._save()

    async def _next_stage(self, promoted: bool = False) -> None:
        state = self.state
        assert state is not None and self.plan is not None
        step = self.steps[state.stage]
        for g in self.gates:
            self.m_gates.labels(g.gate, "promoted" if promoted else g.verdict).inc()
        self._event("passed" if not promoted else "skipped",
                    f"stage {step.index + 1} ({step.name}) after {state.baked_s:.1f} s",
                    gates=[g.describe() for g in self.gates])
        state.last_good = state.stage
        if state.stage + 1 >= len(self.steps):
            state.status = "completed"
            self._event("completed", f"{self.plan.target} serves "
                        f"{', '.join(step.models) or 'no model'}; weights "
                        f"{_weights(step.weights)}")
            self._stage_metric()
            await self._save()
            return
        state.stage += 1
        state.applied = False
        state.baked_s = 0.0
        await self._apply_stage()

    async def _rollback(self, step: Step, gate: GateResult | None, why: str) -> None:
        state, plan = self.state, self.plan
        assert state is not None and plan is not None
        back_to = state.last_good if plan.on_failure == "last_good" else -1
        if back_to >= 0:
            good = self.steps[back_to]
            weights, mode = good.weights, "shadow" if good.shadow else "split"
            where = f"stage {back_to + 1} ({good.name})"
        else:
            weights, mode = baseline_weights(plan, self.shim.cfg), "split"
            where = f"all traffic on {plan.source}"
        reason = f"{why}: {gate.gate}: {gate.reason}" if gate else why
        for g in self.gates:
            self.m_gates.labels(g.gate, g.verdict).inc()
        await self._change("rollout_rollback", weights, mode,
                           f"stage {step.index + 1} ({step.name}) {reason}")
        self.m_rollbacks.labels(plan.name).inc()
        state.status = "rolled_back"
        state.rollback = {"stage": step.index + 1, "stage_name": step.name,
                          "gate": gate.gate if gate else None, "reason": reason,
                          "figures": gate.figures if gate else {},
                          "baked_s": round(state.baked_s, 3), "back_to": where,
                          "weights": weights, "at": round(time.time(), 3)}
        state.last_good = back_to
        self._event("rolled_back", f"stage {step.index + 1} ({step.name}) -> {where}: "
                    f"{reason}", gates=[g.describe() for g in self.gates])
        log.error("rollout %s rolled back stage %d (%s) to %s: %s", plan.name,
                  step.index + 1, step.name, where, reason)
        self._stage_metric()
        await self._save()

    async def _change(self, command: str, weights: dict[str, float], mode: str,
                      reason: str) -> None:
        """One runtime swap through the Controller: weights and mode together, audited."""
        order = list(self.shim.cfg.backends)

        def change(rt: Runtime) -> Runtime:
            return rt.with_weights(weights, order).with_mode(cast(Mode, mode))

        assert self.plan is not None
        await self.controller.apply_change(command, f"rollout:{self.plan.name}", change,
                                     always_audit=True,
                                     extra={"rollout.reason": [None, reason]})

    # -- evidence beyond the hooks --------------------------------------------------------

    def _shadow_counts(self) -> dict[str, tuple[int, int]]:
        """action -> (compared, mismatched) from ``shim_shadow_total`` so far."""
        out: dict[str, list[int]] = {}
        for family in self.shim.metrics.shadow.collect():
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                action, outcome = sample.labels["action"], sample.labels["outcome"]
                if outcome in ("match", "mismatch"):
                    entry = out.setdefault(action, [0, 0])
                    entry[0] += int(sample.value)
                    if outcome == "mismatch":
                        entry[1] += int(sample.value)
        return {a: (c[0], c[1]) for a, c in out.items()}

    def _shadow_delta(self) -> dict[str, tuple[int, int]]:
        now = self._shadow_counts()
        return {a: (n - self._shadow_base.get(a, (0, 0))[0],
                    k - self._shadow_base.get(a, (0, 0))[1]) for a, (n, k) in now.items()}

    def _poll_vram(self) -> None:
        """Record the target's VRAM from ownership's loaded-models poll, once per poll
        (each poll stores a new tuple, so identity tells a new poll from an old one)."""
        own = self.shim.ownership
        if own is None or self.plan is None:
            return
        seen = own.vram.get(self.plan.target)
        if seen is not None and seen is not self._vram_seen:
            self._vram_seen = seen
            self._vram_polls.append((self._clock(), seen[0], seen[1]))
            del self._vram_polls[:-8]

    def _probe_targets(self, needs: list[str]) -> list[str]:
        """The models a probe may name: on the target by the weights, not being handed
        over, not loaded on the source (a probe never loads a model twice)."""
        own = self.shim.ownership
        assert self.plan is not None
        if own is None:
            return []
        rt = self.shim.proxy.runtime if self.shim.proxy else None
        ok = []
        for model in needs:
            if rt is None or own.desired(model, rt) != self.plan.target or model in own.moves:
                continue
            if own.owner.get(model, self.plan.target) != self.plan.target:
                continue
            if model in own.loaded.get(self.plan.source, set()):
                continue
            ok.append(model)
        return ok

    def _set_prober(self) -> None:
        if self._prober is not None:
            self._prober.close()
            self._prober = None
        assert self.plan is not None
        p = self.plan.probes
        if p.enabled and p.rate_per_s > 0:
            self._prober = Prober(self.shim.sync_ctx, self.shim.cfg.shim.listen,
                                  rate_per_s=p.rate_per_s, prompt=p.prompt,
                                  max_tokens=p.max_tokens, timeout_ms=p.timeout_ms,
                                  clock=self._clock)

    # -- state ------------------------------------------------------------------------------

    def _expected(self) -> Step | None:
        state = self.state
        if state is None or not state.applied or not self.steps:
            return None
        return self.steps[state.stage]

    def _matches(self, step: Step) -> bool:
        proxy = self.shim.proxy
        if proxy is None:
            return True
        rt = proxy.runtime
        want_mode = "shadow" if step.shadow else "split"
        return rt.mode == want_mode and all(
            abs(rt.weights.get(n, 0.0) - w) < 0.005 for n, w in step.weights.items())

    def _event(self, event: str, detail: str, **extra: Any) -> None:
        assert self.state is not None
        entry = {"at": round(time.time(), 3), "event": event, "stage": self.state.stage + 1,
                 "detail": detail, **extra}
        self.state.history.append(entry)
        del self.state.history[:-MAX_HISTORY]
        log.info("rollout %s: %s: %s", self.state.plan.get("name"), event, detail)

    def _stage_metric(self) -> None:
        if self.state is None or self.plan is None:
            return
        s = self.state
        value = s.stage + 1 if s.status in ("running", "paused", "completed") else s.last_good + 1
        self.m_stage.labels(self.plan.name).set(value)

    def _write(self) -> None:
        assert self.state is not None
        data = msgspec.json.format(msgspec.json.encode(self.state), indent=2) + b"\n"
        atomic_write(self.path, data, 0o600)

    async def _save(self) -> None:
        if self.state is None:
            return
        self._dirty_at = self._clock()
        async with self._save_lock:
            try:
                await asyncio.to_thread(self._write)
            except OSError as exc:
                log.error("rollout: cannot save %s: %s", self.path, exc.strerror)

    # -- what status shows ---------------------------------------------------------------------

    def fastpath_quiet(self, rt: Runtime) -> bool:
        """A running (or paused) rollout gathers gate evidence from every request; between
        rollouts requests may skip Python (shim.fastpath)."""
        return self.state is None or self.state.status not in ("running", "paused")

    def describe(self) -> dict[str, Any]:
        """The rollout for status replies and the status page (key "rollout")."""
        state, plan = self.state, self.plan
        if state is None or plan is None:
            return {"status": "none"}
        step = self.steps[state.stage]
        return {
            "plan": plan.name,
            "source": plan.source,
            "target": plan.target,
            "status": state.status,
            "paused_reason": state.paused_reason,
            "stage": {**step.describe(), "number": step.index + 1, "of": len(self.steps),
                      "baked_s": round(state.baked_s, 2), "applied": state.applied},
            "last_good": state.last_good + 1,
            "gates": [g.describe() for g in self.gates],
            "rollback": state.rollback,
            "probes": {"sent": self._prober.sent if self._prober else 0,
                       "answered": self._prober.answered if self._prober else 0},
            "history": list(state.history[-50:]),
            "stages": [s.describe() for s in self.steps],
        }


def _weights(weights: dict[str, float]) -> str:
    return " ".join(f"{n}={w:g}" for n, w in weights.items())


__all__ = ["RolloutEngine", "RolloutHost", "RolloutState", "outcome_of"]

"""The gates' statistics: sequential decisions that stay sound at a few requests a minute.

Every gate answers ``pass``, ``fail``, ``wait`` (not enough evidence yet) or ``n/a`` (the
stage gives it nothing to judge, e.g. latency when no model moved). "No data" is always
``wait``, never ``pass``.

Rates (errors, timeouts, shadow mismatches) use Wald's sequential probability ratio test
for a binomial proportion (A. Wald, *Sequential Analysis*, 1947, ch. 5; also NIST/SEMATECH
e-Handbook of Statistical Methods, section 5.3.3.3): with an accepted rate ``p0`` and a rate
``p1 = p0 + delta`` that must be caught, after ``k`` failures in ``n`` answers the log
likelihood ratio is ``k ln(p1/p0) + (n-k) ln((1-p1)/(1-p0))``; it fails at
``ln((1-beta)/alpha)`` and passes at ``ln(beta/(1-alpha))``, which bounds the false-fail
rate near ``alpha`` and the false-pass rate near ``beta`` whatever the traffic rate, since
the test looks at every answer as it comes. Passing also needs ``min_sample`` answers.
``p0`` is the plan's rate, raised to the source's own measured rate for the same cell
when the source has ``min_sample`` answers of it (the target must not be worse than the
old backend, and is not blamed for what both do).

Latency compares the target's answers for a model with the source's answers for the same
model (before it moved) by the Mann-Whitney rank test against the allowed ratio: the
source's latencies are scaled by ``max_p50_ratio`` and the one-sided test asks whether the
target is slower still (normal approximation with tie correction; Mann & Whitney 1947,
Lehmann *Nonparametrics* 1975 ch. 1). Repeated looks spend alpha: the k-th look (at
``min_sample * 2**k`` target answers) tests at ``alpha / 2**(k+1)``, so all looks together
stay below ``alpha`` (Bonferroni). It passes once ``min_sample`` answers are in, the rank test
has not failed, and the measured p50 and p99 ratios are within the plan's limits.

Several cells at once (one per model) split alpha among them (Bonferroni).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Verdict = Literal["pass", "fail", "wait", "n/a"]
Outcome = Literal["ok", "error", "timeout"]

#: Answers kept per (backend, model) cell; older ones fall off.
MAX_SAMPLES_PER_CELL = 4096
#: The cell name for requests that name no model (status, list_models, ...).
NO_MODEL = "-"
#: The cell for models outside the plan's list (a client's typo must not grow memory).
OTHER_MODEL = "?"


# -- the rate test ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SprtResult:
    verdict: Verdict
    llr: float
    lower: float
    upper: float
    n: int
    k: int
    p0: float
    p1: float


def sprt(n: int, k: int, p0: float, p1: float, alpha: float, beta: float,
         min_sample: int) -> SprtResult:
    """Wald's SPRT of ``rate <= p0`` against ``rate >= p1`` after ``k`` failures in ``n``.

    ``0 < p0 < p1 < 1``. ``wait`` until a bound is crossed; a pass also needs ``n >=
    min_sample``. A fail needs no minimum: enough failures are evidence at any count.
    """
    upper = math.log((1 - beta) / alpha)
    lower = math.log(beta / (1 - alpha))
    llr = k * math.log(p1 / p0) + (n - k) * math.log((1 - p1) / (1 - p0))
    if llr >= upper:
        verdict: Verdict = "fail"
    elif llr <= lower and n >= min_sample:
        verdict = "pass"
    else:
        verdict = "wait"
    return SprtResult(verdict, llr, lower, upper, n, k, p0, p1)


# -- the rank test -----------------------------------------------------------------------

def mann_whitney_greater(x: Sequence[float], y: Sequence[float]) -> float:
    """One-sided p-value that ``x`` tends to be larger than ``y`` (U test, normal
    approximation with continuity and tie correction). 1.0 when either is empty."""
    n1, n2 = len(x), len(y)
    if not n1 or not n2:
        return 1.0
    pooled = sorted([(v, 0) for v in x] + [(v, 1) for v in y])
    ranks = [0.0] * len(pooled)
    ties = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        rank = (i + j) / 2 + 1
        for m in range(i, j + 1):
            ranks[m] = rank
        t = j - i + 1
        ties += t ** 3 - t
        i = j + 1
    r1 = sum(r for r, (_, side) in zip(ranks, pooled, strict=True) if side == 0)
    u1 = r1 - n1 * (n1 + 1) / 2
    n = n1 + n2
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if var <= 0:
        return 1.0
    z = (u1 - n1 * n2 / 2 - 0.5) / math.sqrt(var)
    return 0.5 * math.erfc(z / math.sqrt(2))


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of a non-empty sequence."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass(frozen=True, slots=True)
class LatencyResult:
    verdict: Verdict
    n: int
    n_base: int
    p50_ratio: float | None
    p99_ratio: float | None
    p_value: float | None
    alpha_now: float


def latency_test(target: Sequence[float], base: Sequence[float], max_p50_ratio: float,
                 max_p99_ratio: float, alpha: float, min_sample: int) -> LatencyResult:
    """Is the target slower than ``max_p50_ratio`` times the source? (see module doc)"""
    n, nb = len(target), len(base)
    if n < min_sample or nb < min_sample:
        return LatencyResult("wait", n, nb, None, None, None, alpha)
    looks = int(math.log2(n / min_sample))  # looks at min_sample * 2**k answers
    alpha_now = alpha / 2 ** (looks + 1)
    b50, b99 = quantile(base, 0.5), quantile(base, 0.99)
    p50 = quantile(target, 0.5) / b50 if b50 > 0 else math.inf
    p99 = quantile(target, 0.99) / b99 if b99 > 0 else math.inf
    p_value = mann_whitney_greater(target, [v * max_p50_ratio for v in base])
    if p_value < alpha_now:
        verdict: Verdict = "fail"
    elif p50 <= max_p50_ratio and p99 <= max_p99_ratio:
        verdict = "pass"
    else:
        verdict = "wait"
    return LatencyResult(verdict, n, nb, round(p50, 3), round(p99, 3), p_value, alpha_now)


# -- evidence ----------------------------------------------------------------------------

@dataclass(slots=True)
class Answer:
    t: float
    action: str
    outcome: Outcome
    latency_s: float
    probe: bool


@dataclass
class Evidence:
    """What each backend answered, per model, bounded (``MAX_SAMPLES_PER_CELL`` per cell).

    Fed by the rollout engine's addon hooks (shim.rollout.engine) and by tests directly.
    """

    models: frozenset[str]
    cells: dict[tuple[str, str], deque[Answer]] = field(default_factory=dict)

    def add(self, backend: str, model: str | None, action: str, outcome: Outcome,
            latency_s: float, t: float, probe: bool = False) -> None:
        cell = NO_MODEL if not model else model if model in self.models else OTHER_MODEL
        q = self.cells.get((backend, cell))
        if q is None:
            q = self.cells[(backend, cell)] = deque(maxlen=MAX_SAMPLES_PER_CELL)
        q.append(Answer(t, action, outcome, latency_s, probe))

    def since(self, backend: str, t0: float, model: str | None = None) -> list[Answer]:
        """Answers of ``backend`` at or after ``t0``; one model's (``NO_MODEL`` for
        model-free requests) or, with ``model`` None, all of them."""
        keys = [(backend, model)] if model is not None else \
            [k for k in self.cells if k[0] == backend]
        return [a for k in keys for a in self.cells.get(k, ()) if a.t >= t0]

    def before(self, backend: str, t1: float, model: str) -> list[Answer]:
        return [a for a in self.cells.get((backend, model), ()) if a.t < t1]

    def models_seen(self, backend: str, t0: float) -> set[str]:
        return {m for (b, m), q in self.cells.items() if b == backend and q and q[-1].t >= t0}


# -- gate results ------------------------------------------------------------------------

@dataclass(slots=True)
class GateResult:
    """One gate's verdict now, with the figures behind it (for status and the audit)."""

    gate: str
    verdict: Verdict
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)
    #: Models whose evidence is still short (probes go to them).
    needs: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, Any]:
        return {"gate": self.gate, "verdict": self.verdict, "reason": self.reason,
                "figures": self.figures, "needs": list(self.needs)}


def combine(cells: dict[str, Verdict], required: Iterable[str]) -> Verdict:
    """Any failed cell fails; else pass when every required cell passed; else wait."""
    if any(v == "fail" for v in cells.values()):
        return "fail"
    required = list(required)
    if required and all(cells.get(c) == "pass" for c in required):
        return "pass"
    return "wait"


def rate_gate(gate: str, counted: Outcome, evidence: Evidence, *, target: str, source: str,
              since: float, moved: Sequence[str], target_share: float, base_rate: float,
              delta: float, alpha: float, beta: float, min_sample: int) -> GateResult:
    """Errors or timeouts (``counted``) on the target since ``since``, per model and pooled.

    Subjects: each model the stage moves (each must pass on its own) and all the target's
    answers together; a model seen on the target that the stage did not move can still
    fail it. n/a when the target takes no traffic at this stage.
    """
    if target_share <= 0:
        return GateResult(gate, "n/a", f"{target} takes no traffic at this stage")
    subjects = sorted(set(moved) | evidence.models_seen(target, since))
    k_cells = len(subjects) + 1
    results: dict[str, SprtResult] = {}
    for model in subjects:
        answers = evidence.since(target, since, model)
        base = evidence.before(source, math.inf, model) if model != NO_MODEL else \
            evidence.since(source, -math.inf, NO_MODEL)
        results[model] = _rate(answers, base, counted, base_rate, delta, alpha / k_cells,
                               beta, min_sample)
    results["*"] = _rate(evidence.since(target, since), evidence.since(source, -math.inf),
                         counted, base_rate, delta, alpha / k_cells, beta, min_sample)
    verdicts = {m: r.verdict for m, r in results.items()}
    verdict = combine(verdicts, ["*", *moved])
    figures = {m: {"n": r.n, counted: r.k, "rate": round(r.k / r.n, 4) if r.n else None,
                   "accepted": round(r.p0, 4), "caught": round(r.p1, 4),
                   "llr": round(r.llr, 3), "bounds": [round(r.lower, 3), round(r.upper, 3)],
                   "verdict": r.verdict} for m, r in results.items()}
    failed = [m for m, v in verdicts.items() if v == "fail"]
    needs = [m for m in moved if verdicts.get(m) == "wait"]
    if failed:
        r = results[failed[0]]
        reason = (f"{target} {counted} rate {r.k}/{r.n} for {failed[0]} is above "
                  f"{r.p0:.3f} (SPRT llr {r.llr:.2f} >= {r.upper:.2f})")
    elif verdict == "pass":
        reason = f"{target} {counted} rate within {results['*'].p0:.3f} for every model"
    else:
        short = [m for m, v in verdicts.items() if v == "wait"]
        reason = f"waiting for evidence on {', '.join(short)}"
    return GateResult(gate, verdict, reason, figures, needs)


def _rate(answers: list[Answer], base: list[Answer], counted: Outcome, base_rate: float,
          delta: float, alpha: float, beta: float, min_sample: int) -> SprtResult:
    n = len(answers)
    k = sum(1 for a in answers if a.outcome == counted)
    p0 = base_rate
    if len(base) >= min_sample:  # not blamed for what the source does as well
        p0 = max(p0, sum(1 for a in base if a.outcome == counted) / len(base))
    p0 = min(p0, 0.98 - delta)
    return sprt(n, k, p0, min(0.99, p0 + delta), alpha, beta, min_sample)


def latency_gate(evidence: Evidence, *, target: str, source: str, since: float,
                 moved: Sequence[str], max_p50_ratio: float, max_p99_ratio: float,
                 alpha: float, min_sample: int) -> GateResult:
    """Each moved model's successful answers on the target against the same model's on the
    source before ``since``. A model the source answered fewer than ``min_sample`` times
    has nothing to be compared with (another model's latency is no yardstick): it is
    listed under ``no_baseline`` and not judged; the gate is n/a when no moved model has
    a baseline."""
    if not moved:
        return GateResult("latency", "n/a", "no model moves at this stage")
    results: dict[str, LatencyResult] = {}
    no_baseline = []
    for model in moved:
        base = [a.latency_s for a in evidence.before(source, since, model) if a.outcome == "ok"]
        if len(base) < min_sample:
            no_baseline.append(model)
            continue
        target_lat = [a.latency_s for a in evidence.since(target, since, model)
                      if a.outcome == "ok"]
        results[model] = latency_test(target_lat, base, max_p50_ratio, max_p99_ratio,
                                      alpha / len(moved), min_sample)
    if not results:
        return GateResult("latency", "n/a", f"no {source} latency of "
                          f"{', '.join(no_baseline)} to compare with",
                          {"no_baseline": no_baseline})
    verdicts = {m: r.verdict for m, r in results.items()}
    verdict = combine(verdicts, list(results))
    figures: dict[str, Any] = {m: {"n": r.n, "n_source": r.n_base, "p50_ratio": r.p50_ratio,
                   "p99_ratio": r.p99_ratio,
                   "p_value": None if r.p_value is None else round(r.p_value, 5),
                   "alpha": round(r.alpha_now, 5), "verdict": r.verdict}
               for m, r in results.items()}
    if no_baseline:
        figures["no_baseline"] = no_baseline
    failed = [m for m, v in verdicts.items() if v == "fail"]
    if failed:
        r = results[failed[0]]
        reason = (f"{failed[0]} is slower on {target} than {max_p50_ratio:g}x {source} "
                  f"(p50 ratio {r.p50_ratio}, rank test p={r.p_value:.2g} < {r.alpha_now:.2g})")
    elif verdict == "pass":
        reason = f"p50 and p99 ratios within {max_p50_ratio:g}x / {max_p99_ratio:g}x"
    else:
        reason = "waiting for latency samples on " + ", ".join(
            m for m, v in verdicts.items() if v == "wait")
    return GateResult("latency", verdict, reason, figures,
                      [m for m, v in verdicts.items() if v == "wait"])


def shadow_gate(counts: dict[str, tuple[int, int]], *, shadow_on: bool, rate: float,
                delta: float, alpha: float, beta: float, min_sample: int) -> GateResult:
    """Shadow mismatches since the stage began: ``counts`` is action -> (compared,
    mismatched). Each action may fail it (alpha split among them); all together must pass."""
    if not shadow_on:
        return GateResult("shadow", "n/a", "shadow is off at this stage")
    actions = {a: c for a, c in counts.items() if c[0]}
    k_cells = len(actions) + 1
    results = {a: sprt(n, k, rate, rate + delta, alpha / k_cells, beta, min_sample)
               for a, (n, k) in actions.items()}
    n_all = sum(n for n, _ in actions.values())
    k_all = sum(k for _, k in actions.values())
    results["*"] = sprt(n_all, k_all, rate, rate + delta, alpha / k_cells, beta, min_sample)
    verdicts = {a: r.verdict for a, r in results.items()}
    verdict = combine(verdicts, ["*"])
    figures = {a: {"compared": r.n, "mismatched": r.k, "llr": round(r.llr, 3),
                   "verdict": r.verdict} for a, r in results.items()}
    failed = [a for a, v in verdicts.items() if v == "fail"]
    if failed:
        r = results[failed[0]]
        reason = f"shadow mismatches for {failed[0]}: {r.k}/{r.n}, above {rate:.3f}"
    elif verdict == "pass":
        reason = f"shadow mismatch rate within {rate:.3f} over {n_all} comparisons"
    else:
        reason = f"waiting for shadow comparisons ({n_all} so far)"
    return GateResult("shadow", verdict, reason, figures)


def vram_gate(polls: Sequence[tuple[float, float | None, float | None]], *, target: str,
              since: float, min_headroom_percent: float) -> GateResult:
    """Free VRAM on the target at its latest loaded-models polls after ``since``:
    ``polls`` is (time, used MB, budget MB). A threshold, not a test: the ledger's figure
    is exact. Fails on two polls in a row below the minimum (one could catch a load and
    its unload between polls); passes on the latest poll above it."""
    fresh = [(t, u, b) for t, u, b in polls if t >= since and u is not None and b]
    if not fresh:
        return GateResult("vram", "wait", f"no loaded-models poll of {target} yet")
    headroom = [100 * (1 - (u or 0.0) / b) for _, u, b in fresh if b]
    figures = {"headroom_percent": round(headroom[-1], 2), "used_mb": fresh[-1][1],
               "budget_mb": fresh[-1][2], "min_percent": min_headroom_percent}
    if len(headroom) >= 2 and all(h < min_headroom_percent for h in headroom[-2:]):
        return GateResult("vram", "fail", f"{target} VRAM headroom {headroom[-1]:.1f}% is "
                          f"below {min_headroom_percent:g}%", figures)
    if headroom[-1] >= min_headroom_percent:
        return GateResult("vram", "pass", f"{target} VRAM headroom {headroom[-1]:.1f}%",
                          figures)
    return GateResult("vram", "wait", f"{target} VRAM headroom {headroom[-1]:.1f}% is low; "
                      "waiting for the next poll", figures)

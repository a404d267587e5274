"""The gate statistics on a simulated clock: how often a healthy stage fails (false fail)
and a broken one passes (false pass) at 0.1, 1 and 10 requests a second.

Each trial drives the engine's own decision rule (shim.rollout.engine ``tick``): evaluate
every simulated second, a failed gate ends the stage at once, all gates passed after the
minimum bake moves on, nothing decided by the maximum bake rolls back ("undecided").
Run with ``-s`` to see the table; the figures go in the README's Cutover section.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from shim.rollout.gates import (
    Evidence,
    latency_gate,
    mann_whitney_greater,
    rate_gate,
    shadow_gate,
    sprt,
    vram_gate,
)

RATES = (0.1, 1.0, 10.0)
MIN_BAKE, MAX_BAKE = 60.0, 600.0
MODEL = "phi-2"
SETTINGS = {"alpha": 0.05, "beta": 0.05, "min_sample": 20}


def trial(rng: random.Random, rate: float, *, error_rate: float, slowdown: float,
          gate: str) -> str:
    """One stage at ``rate`` req/s on a simulated clock; returns pass, fail or undecided."""
    ev = Evidence(frozenset({MODEL}))
    for i in range(200):  # the source's history of the same model, before the move
        ev.add("mma", MODEL, "generate", "error" if rng.random() < 0.01 else "ok",
               rng.lognormvariate(math.log(0.05), 0.4), -1000.0 + i)
    t, next_arrival = 0.0, rng.expovariate(rate)
    verdict = "wait"
    while t < MAX_BAKE:
        t += 1.0
        arrived = False
        while next_arrival <= t:
            outcome = "error" if rng.random() < error_rate else "ok"
            ev.add("mms", MODEL, "generate", outcome,
                   slowdown * rng.lognormvariate(math.log(0.05), 0.4), next_arrival)
            next_arrival += rng.expovariate(rate)
            arrived = True
        if not arrived:  # the same evidence gives the same verdict: skip the work
            if verdict == "pass" and t >= MIN_BAKE:
                return "pass"
            continue
        if gate == "errors":
            result = rate_gate("errors", "error", ev, target="mms", source="mma", since=0.0,
                               moved=[MODEL], target_share=15.0, base_rate=0.02, delta=0.10,
                               **SETTINGS)
        else:
            result = latency_gate(ev, target="mms", source="mma", since=0.0, moved=[MODEL],
                                  max_p50_ratio=1.5, max_p99_ratio=3.0,
                                  alpha=SETTINGS["alpha"], min_sample=SETTINGS["min_sample"])
        verdict = result.verdict
        if verdict == "fail":
            return "fail"
        if verdict == "pass" and t >= MIN_BAKE:
            return "pass"
    return "undecided"


def rates(gate: str, rate: float, trials: int, **kw: float) -> Counter[str]:
    rng = random.Random(f"{gate}-{rate}-{sorted(kw.items())}")
    return Counter(trial(rng, rate, gate=gate, **kw) for _ in range(trials))


@pytest.mark.parametrize("gate,healthy,broken", [
    # errors: MMA and a healthy MMS fail 1 %; a broken MMS fails 15 % (caught: > 12 %).
    ("errors", {"error_rate": 0.01, "slowdown": 1.0}, {"error_rate": 0.15, "slowdown": 1.0}),
    # latency: a healthy MMS as fast as MMA; a broken one 2.5x slower (allowed: 1.5x).
    ("latency", {"error_rate": 0.0, "slowdown": 1.0}, {"error_rate": 0.0, "slowdown": 2.5}),
])
def test_false_pass_and_false_fail_rates(gate: str, healthy: dict[str, float],
                                         broken: dict[str, float]) -> None:
    trials = 60
    print(f"\n{gate}: {trials} trials each, min bake {MIN_BAKE:g} s, max bake {MAX_BAKE:g} s")
    print(f"  {'req/s':>6}  {'false fail':>10}  {'healthy undecided':>17}  "
          f"{'false pass':>10}  {'broken undecided':>16}")
    for rate in RATES:
        good = rates(gate, rate, trials, **healthy)
        bad = rates(gate, rate, trials, **broken)
        false_fail = good["fail"] / trials
        false_pass = bad["pass"] / trials
        print(f"  {rate:>6g}  {false_fail:>10.3f}  {good['undecided'] / trials:>17.3f}  "
              f"{false_pass:>10.3f}  {bad['undecided'] / trials:>16.3f}")
        # alpha = beta = 0.05; allow for the sampling error of 60 trials.
        assert false_fail <= 0.15, (rate, good)
        assert false_pass <= 0.15, (rate, bad)
        if rate >= 1:  # enough traffic to decide a healthy stage within the max bake
            assert good["pass"] / trials >= 0.85, (rate, good)


def test_no_data_never_passes() -> None:
    ev = Evidence(frozenset({MODEL}))
    r = rate_gate("errors", "error", ev, target="mms", source="mma", since=0.0,
                  moved=[MODEL], target_share=15.0, base_rate=0.02, delta=0.1, **SETTINGS)
    assert r.verdict == "wait" and r.needs == [MODEL]
    lat = latency_gate(ev, target="mms", source="mma", since=0.0, moved=[MODEL],
                       max_p50_ratio=1.5, max_p99_ratio=3.0, alpha=0.05, min_sample=20)
    assert lat.verdict == "n/a" and lat.figures["no_baseline"] == [MODEL]  # no yardstick
    for i in range(30):
        ev.add("mma", MODEL, "generate", "ok", 0.05, -100.0 + i)
    lat = latency_gate(ev, target="mms", source="mma", since=0.0, moved=[MODEL],
                       max_p50_ratio=1.5, max_p99_ratio=3.0, alpha=0.05, min_sample=20)
    assert lat.verdict == "wait" and lat.needs == [MODEL]
    assert shadow_gate({}, shadow_on=True, rate=0.02, delta=0.1, alpha=0.05, beta=0.05,
                       min_sample=20).verdict == "wait"
    assert vram_gate([], target="mms", since=0.0, min_headroom_percent=10).verdict == "wait"


def test_not_applicable_gates_say_so() -> None:
    ev = Evidence(frozenset({MODEL}))
    assert rate_gate("errors", "error", ev, target="mms", source="mma", since=0.0, moved=[],
                     target_share=0.0, base_rate=0.02, delta=0.1,
                     **SETTINGS).verdict == "n/a"
    assert latency_gate(ev, target="mms", source="mma", since=0.0, moved=[],
                        max_p50_ratio=1.5, max_p99_ratio=3.0, alpha=0.05,
                        min_sample=20).verdict == "n/a"
    assert shadow_gate({"status": (50, 50)}, shadow_on=False, rate=0.02, delta=0.1,
                       alpha=0.05, beta=0.05, min_sample=20).verdict == "n/a"


def test_sprt_bounds_are_walds() -> None:
    r = sprt(0, 0, 0.02, 0.12, 0.05, 0.05, 1)
    assert r.upper == pytest.approx(math.log(0.95 / 0.05))
    assert r.lower == pytest.approx(math.log(0.05 / 0.95))
    assert sprt(2, 2, 0.02, 0.12, 0.05, 0.05, 20).verdict == "fail"  # two errors in two
    passing = sprt(40, 0, 0.02, 0.12, 0.05, 0.05, 20)
    assert passing.verdict == "pass"
    assert sprt(19, 0, 0.02, 0.12, 0.05, 0.05, 40).verdict == "wait"  # minimum sample


def test_source_rate_raises_the_accepted_rate() -> None:
    """MMS is not blamed for what MMA does as well."""
    ev = Evidence(frozenset({MODEL}))
    for i in range(100):
        ev.add("mma", MODEL, "generate", "error" if i % 5 == 0 else "ok", 0.05, -10.0)
    for i in range(60):
        ev.add("mms", MODEL, "generate", "error" if i % 5 == 0 else "ok", 0.05, float(i))
    r = rate_gate("errors", "error", ev, target="mms", source="mma", since=0.0,
                  moved=[MODEL], target_share=15.0, base_rate=0.02, delta=0.1, **SETTINGS)
    assert r.verdict != "fail"
    assert r.figures[MODEL]["accepted"] == pytest.approx(0.2)


def test_mann_whitney_matches_a_known_case() -> None:
    # Completely separated samples of 10 each: U = 100, z = (100 - 50 - 0.5) / sqrt(175).
    p = mann_whitney_greater([float(v) for v in range(10, 20)], [float(v) for v in range(10)])
    assert p == pytest.approx(0.5 * math.erfc((49.5 / math.sqrt(175)) / math.sqrt(2)))
    assert mann_whitney_greater([], [1.0]) == 1.0
    assert mann_whitney_greater([1.0] * 5, [1.0] * 5) == 1.0  # all tied: no evidence


def test_vram_fails_on_two_low_polls_in_a_row() -> None:
    low, ok = (0.0, 11_500.0, 12_000.0), (1.0, 6000.0, 12_000.0)
    assert vram_gate([ok], target="mms", since=0.0, min_headroom_percent=10).verdict == "pass"
    one_low = vram_gate([ok, (2.0, 11_500.0, 12_000.0)], target="mms", since=0.0,
                        min_headroom_percent=10)
    assert one_low.verdict == "wait"
    two_low = vram_gate([low, (2.0, 11_500.0, 12_000.0)], target="mms", since=0.0,
                        min_headroom_percent=10)
    assert two_low.verdict == "fail"
    assert vram_gate([low], target="mms", since=5.0, min_headroom_percent=10).verdict == "wait"


@pytest.mark.parametrize("reply,outcome", [
    (b'{"status": "ok", "response_text": "x"}', "ok"),
    (b'{"status": "SUCCESS"}', "ok"),
    (b'{"status": "MODEL_READY"}', "ok"),
    (b'{"loaded_models": {}}', "ok"),
    (b"[1, 2]", "ok"),
    (b'{"status": "error", "message": "x"}', "error"),
    (b'{"status": "ERROR_LOADING_MODEL"}', "error"),
    (b'{"error": "no status at all"}', "error"),
    (b"not json", "error"),
])
def test_outcome_of_a_reply(reply: bytes, outcome: str) -> None:
    from shim.rollout.engine import outcome_of

    assert outcome_of(reply, 0.01, 4.5) == outcome


def test_a_failed_attempt_is_a_timeout_only_near_its_deadline() -> None:
    from shim.rollout.engine import outcome_of

    assert outcome_of(None, 4.4, 4.5) == "timeout"
    assert outcome_of(None, 0.1, 4.5) == "error"  # lost connection, refused, ...


def test_evidence_is_bounded_whatever_the_model_names() -> None:
    from shim.rollout.gates import MAX_SAMPLES_PER_CELL, OTHER_MODEL

    ev = Evidence(frozenset({MODEL}))
    for i in range(3 * MAX_SAMPLES_PER_CELL):
        ev.add("mms", f"typo-{i}", "generate", "ok", 0.01, float(i))
    assert list(ev.cells) == [("mms", OTHER_MODEL)]
    assert len(ev.cells[("mms", OTHER_MODEL)]) == MAX_SAMPLES_PER_CELL

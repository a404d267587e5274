"""Backends that die, stall, answer late or answer garbage, under load.

Every test runs a bounded closed-loop load (helpers.Load: REQ clients and tagged DEALER
clients in one thread) through a real shim and asserts the invariants of design.md:
exactly one reply per request before its deadline, error replies only of the kinds the
failure explains, counters that add up on both sides, and the shim serving afterwards.
"""

from __future__ import annotations

import json

import pytest

from tests.procs import req
from tests.reliability.helpers import (
    GEN,
    Ctx,
    Load,
    assert_clean_exit,
    assert_counters_add_up,
    assert_serving,
    distinct_gen,
    fake_counts,
    metric,
    served_by,
    start_ready,
    sticky_key_for,
    wait_until,
)
from tests.shimproc import Fake, shim_config, start_fake

#: What a backend that dies or goes silent may cost a request: nothing else.
DEAD_BACKEND_CODES = {"SHIM_BACKEND_LOST", "SHIM_NO_BACKEND", "SHIM_TIMEOUT"}


def restart_fake(old: Fake, **kwargs: object) -> Fake:
    """A new fake backend on the ports of ``old`` (which must be dead by now)."""
    return start_fake(old.name, old.dialect, port=old.port, health_port=old.health_port,
                      **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("topology", ["single", "pair"])
def test_backend_sigkill_and_restart_under_load(topology, tmp_path, ctx: Ctx) -> None:
    """SIGKILL the MMA backend under load, restart it on the same port: every request is
    answered once and in time; the dead backend costs at most DEAD_BACKEND_CODES, for the
    requests in flight when it died (none at all when MMS can take over); the restarted
    backend gets traffic again."""
    fakes = {"mma": start_fake("mma", "mma", delay_ms=20)}
    if topology == "pair":
        fakes["mms"] = start_fake("mms", "mms", delay_ms=20)
    weights = {"mma": 50, "mms": 50} if topology == "pair" else {"mma": 100}
    cfg = shim_config(fakes, tmp_path, routing={"weights": weights},
                      shim={"default_timeout_ms": 1500})
    shim = start_ready(cfg, tmp_path)
    restarted: Fake | None = None
    try:
        load = Load(ctx, shim.endpoint, clients=24, deadline_s=1.5 + 1.5, duration_s=4.0,
                    pace_s=0.02, max_requests=6000).start()
        # Under way: MMA has served a good number of requests (progress, not time).
        wait_until(lambda: load.result.served().get("mma", 0) >= 100, 30.0,
                   "100 requests served by mma")
        killed_at = load.now()  # before the kill: its effects can come back at once
        fakes["mma"].kill()  # SIGKILL: no goodbye on the wire
        # Down for a while: until the shim has noticed (its health probe).
        wait_until(lambda: not shim.status()["backends"]["mma"]["healthy"], 30.0,
                   "the shim marking mma unhealthy")
        restarted = restart_fake(fakes["mma"], delay_ms=20)
        restarted_at = load.now()
        result = load.join()
        print(f"\n[sigkill/{topology}] killed at {killed_at:.2f}s, restarted at "
              f"{restarted_at:.2f}s, served after the restart "
              f"{dict(result.served(after=restarted_at))}: {result.summary()}")

        result.check()
        outcomes = result.outcomes
        assert set(outcomes) <= {"ok"} | DEAD_BACKEND_CODES, outcomes
        before = [a for a in result.answers if a.sent_at + a.latency < killed_at]
        assert before and all(a.outcome == "ok" for a in before), "errors before the kill"
        if topology == "pair":
            # Failover: what was in flight on MMA is retried on MMS, nothing is lost.
            assert outcomes["ok"] >= 0.99 * result.sent, outcomes
        else:
            # Alone, MMA costs at most the requests in flight when it died (one per
            # client): later ones wait, within their deadline, for it to come back.
            assert sum(outcomes[c] for c in DEAD_BACKEND_CODES) <= 24, outcomes
        assert_counters_add_up(shim, result)
        # The restarted backend on the same port serves again (usually already during the
        # load; the shim's reconnect backoff is at most 1 s).
        wait_until(lambda: served_by(req(shim.endpoint, GEN, timeout=3.0)) == "mma", 5.0,
                   "the restarted backend to serve again", interval=0.05)
        assert fake_counts(restarted).get("generate:fast", 0) > 0
        assert_serving(shim)
        if topology == "pair":
            seen = {served_by(req(shim.endpoint, GEN)) for _ in range(30)}
            assert seen == {"mma", "mms"}, seen
        assert_clean_exit(shim)
    finally:
        shim.stop()
        for fake in [*fakes.values(), restarted]:
            if fake is not None:
                fake.kill()


def test_stalled_backend_under_load_then_replaced(tmp_path, ctx: Ctx) -> None:
    """MMA takes requests and never answers. Every client still gets one reply before its
    deadline (SHIM_TIMEOUT from the stalled side, ok from MMS); then the stalled backend
    is replaced by a healthy one on the same port, which gets traffic again."""
    fakes = {"mma": start_fake("mma", "mma", mode="stall"), "mms": start_fake("mms", "mms")}
    cfg = shim_config(fakes, tmp_path, routing={"weights": {"mma": 50, "mms": 50}},
                      actions={"generate": {"timeout_ms": 1000}})
    shim = start_ready(cfg, tmp_path)
    fresh: Fake | None = None
    try:
        result = Load(ctx, shim.endpoint, clients=20, deadline_s=1.0 + 1.0, duration_s=3.0,
                      pace_s=0.02, max_requests=4000).run()
        print(f"\n[stall] {result.summary()}")
        result.check()
        outcomes = result.outcomes
        assert set(outcomes) <= {"ok", "SHIM_TIMEOUT"}, (outcomes, shim.proc.log()[-2000:])
        assert outcomes["SHIM_TIMEOUT"] > 0 and outcomes["ok"] > 0, outcomes
        # The shim's own deadline holds: a timeout is answered about when it is due.
        late = [a.latency for a in result.answers if a.outcome == "SHIM_TIMEOUT"
                and a.latency > 1.0 + 0.5]
        assert not late, f"SHIM_TIMEOUT replies later than 1.5 s: {sorted(late)[-5:]}"
        assert result.served()["mms"] == outcomes["ok"]
        text = shim.metrics()
        assert metric(text, "shim_timeouts_total", backend="mma") >= outcomes["SHIM_TIMEOUT"]
        assert_counters_add_up(shim, result)
        # Still serving: a conversation whose sticky bucket is on MMS is served at once.
        conv = sticky_key_for("mms", {"mma": 50, "mms": 50})
        assert_serving(shim, expect={"mms"}, tries=3, request={**GEN, "conversation_id": conv})

        fakes["mma"].kill()
        fresh = restart_fake(fakes["mma"])
        wait_until(lambda: served_by(req(shim.endpoint, GEN, timeout=3.0)) == "mma", 8.0,
                   "the replaced backend to serve again", interval=0.1)
        assert_clean_exit(shim)
    finally:
        shim.stop()
        for fake in [*fakes.values(), fresh]:
            if fake is not None:
                fake.kill()


def test_late_backend_replies_are_dropped_and_counted(tmp_path, ctx: Ctx) -> None:
    """A backend that answers after the deadline: the client gets SHIM_TIMEOUT in time and
    never the late reply (watched for 1 s after); each late reply is counted."""
    fakes = {"mma": start_fake("mma", "mma", delay_ms=900)}
    cfg = shim_config(fakes, tmp_path, actions={"generate": {"timeout_ms": 500},
                                                 "status": {"timeout_ms": 3000}})
    shim = start_ready(cfg, tmp_path)
    try:
        result = Load(ctx, shim.endpoint, clients=20, per_client=2, kind="dealer",
                      deadline_s=0.5 + 1.0, grace_s=1.0, duration_s=10.0).run()
        print(f"\n[late replies] {result.summary()}")
        result.check()
        assert result.outcomes == {"SHIM_TIMEOUT": 40}, result.outcomes
        wait_until(lambda: metric(shim.metrics(), "shim_late_replies_total",
                                  backend="mma") == 40, 5.0, "40 late replies counted")
        assert_counters_add_up(shim, result)
        # Still serving: an action with a longer deadline gets the slow backend's answer.
        reply = req(shim.endpoint, {"action": "status"}, timeout=5.0)
        assert reply["status"] == "ok" and served_by(reply) == "mma", reply
        assert_clean_exit(shim)
    finally:
        shim.stop()
        fakes["mma"].kill()


#: The shim's answer to a request that met each kind of bad backend, when it cannot fail over.
GARBAGE_CODES = {"garbage": "SHIM_BAD_REPLY", "extra_frames": "SHIM_BAD_REPLY",
                 "foreign_id": "SHIM_TIMEOUT"}

@pytest.mark.parametrize(("mode", "bad_dialect"), [
    ("garbage", "mma"),
    ("garbage", "mms"),
    ("extra_frames", "mma"),
    ("extra_frames", "mms"),
    ("foreign_id", "mma"),
    ("foreign_id", "mms"),
])
def test_backend_answering_garbage(mode, bad_dialect, tmp_path, ctx: Ctx) -> None:
    """One backend answers garbage (non-JSON, extra frames, foreign correlation ids), the
    other is fine, 50/50. Exactly one reply per request, in time, counters add up, the
    shim keeps serving; and then: every reply is a JSON object, generate (failover off
    here) routed to the bad backend gets the shim's error reply, HEALTH_CHECK (failover
    on) is always answered by the good one."""
    good_dialect = "mms" if bad_dialect == "mma" else "mma"
    fakes = {"bad": start_fake("bad", bad_dialect, mode=mode),
             "good": start_fake("good", good_dialect)}
    cfg = shim_config(fakes, tmp_path, routing={"weights": {"bad": 50, "good": 50}},
                      shim={"default_timeout_ms": 1500},
                      actions={"generate": {"failover": False}})
    # The bad backend's own deadline is short, so a foreign-id reply can still fail over.
    cfg["backends"]["bad"]["timeout_ms"] = 400
    shim = start_ready(cfg, tmp_path)
    health = json.dumps({"command": "HEALTH_CHECK"}).encode()
    try:
        result = Load(ctx, shim.endpoint, clients=10, per_client=4, deadline_s=1.5 + 1.0,
                      payload=lambda client, seq: distinct_gen(client, seq) if seq % 2
                      else health).run()
        print(f"\n[{mode}/{bad_dialect}] {result.summary()}")
        # The invariants.
        result.check()
        assert_counters_add_up(shim, result)
        # Still serving: a conversation that sticks to the good backend.
        conv = sticky_key_for("good", {"bad": 50, "good": 50})
        assert_serving(shim, expect={"good"}, tries=3, request={**GEN, "conversation_id": conv})
        if mode == "foreign_id":
            wait_until(lambda: metric(shim.metrics(), "shim_late_replies_total",
                                      backend="bad") >= result.outcomes["SHIM_TIMEOUT"],
                       5.0, "foreign replies counted as late")
        # What the replies say.
        assert "NON_JSON" not in result.outcomes, f"non-JSON replies: {result.outcomes}"
        code = GARBAGE_CODES[mode]
        gens = [a for a in result.answers if a.seq % 2]
        checks = [a for a in result.answers if not a.seq % 2]
        # Generate does not fail over: the bad half gets the shim's error reply, the rest
        # is served by the good backend.
        assert {a.outcome for a in gens} == {"ok", code}, [a.outcome for a in gens]
        assert {a.served for a in gens if a.outcome == "ok"} == {"good"}
        # HEALTH_CHECK fails over to the good backend: always answered.
        assert {a.outcome for a in checks} == {"ok"}, [a.outcome for a in checks]
        assert_clean_exit(shim)
    finally:
        shim.stop()
        for fake in fakes.values():
            fake.kill()

"""The compiled core under model ownership (issue 17 on top of issue 10's invariants).

With ``ownership.enabled`` (the default) the core forwards a generate itself only when
the ownership table says where its model may go without a decision: the model is owned,
not moving, not shared, and the weights want it where it is. Everything else (an unowned
model to claim, a hand-over to start or wait out, a request naming models in other
fields) goes up to Python. These tests drive two real shims, core on and off, over fake
backends that report fixed loaded models (so both shims learn the same owners from their
polls), and check:

* byte-identical replies and the same metrics and owners for the same streams;
* a hand-over waits for the requests the core has in flight on the old owner before it
  sends the unload (the table's in-flight counts include the core's);
* a request the core sent to its model's owner never fails over to another backend when
  the owner goes away (that would load the model twice).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from shim.ctl import AdminClient
from shim.routing import RoutingTable, bucket_of
from tests.fakes import POLICY
from tests.integration.test_fastpath_differential import (
    DIFF,
    REPLY_S,
    Pair,
    _frames,
    _start_pair,
    _stop,
    assert_same,
    compared,
    masked,
    pytestmark,  # noqa: F401  (skipped where the core is not built, as there)
)
from tests.reliability.helpers import fake_counts, metric, wait_until
from tests.reliability.test_fuzz import REQUESTS
from tests.shimproc import ShimProc, dealer, start_fake

OWNERSHIP = {"enabled": True, "poll_interval_ms": 200, "handover_timeout_ms": 20_000}


def _desired(weights: dict[str, float]) -> dict[str, str]:
    """Where the weights want each policy model (shim.addons.ownership.desired)."""
    table = RoutingTable(weights)
    return {m: table.backend_for(bucket_of("model:" + m)) for m in POLICY.values()}


def _owners(shim: ShimProc) -> dict[str, str]:
    return dict(shim.status()["ownership"]["owners"])


def _wait_owners(p: Pair, want: dict[str, str]) -> None:
    for shim in (p.fast, p.slow):
        wait_until(lambda s=shim: all(_owners(s).get(m) == b for m, b in want.items()),
                   30.0, lambda s=shim: f"owners {want}, have {_owners(s)}")


def _set_weights(shim: ShimProc, weights: dict[str, float]) -> None:
    section = json.loads(shim.config_path.read_text())["shim"]
    token = Path(section["state_file"]).with_suffix(".token").read_text().strip()
    client = AdminClient(shim.admin_endpoint, token, timeout_s=30.0)
    try:
        reply = client.call("set_weights", weights=weights)
    finally:
        client.close()
    assert reply.get("status") == "ok", reply


PREFS = st.sampled_from(["fast", "quality", "fallback", "stt", "", None, "nope", 5, True])
#: Every request carries a sticky key: with two backends sharing the traffic, one that
#: names no model would otherwise go where each shim's own random draw sends it.
USER = st.text(max_size=8) | st.integers(-10**6, 10**6)
GENERATE = st.fixed_dictionaries({"action": st.just("generate"), "user": USER}, optional={
    "prompt": st.text(max_size=20), "model_pref": PREFS,
    "model_id": st.sampled_from(["phi-2", "tinyllama"])})
OTHER = st.fixed_dictionaries({"action": st.sampled_from(["frobnicate", "generate_text"]),
                               "user": USER},
                              optional={"model_id": st.sampled_from(list(POLICY.values())),
                                        "model_name": st.just("phi-2"),
                                        "model_ids": st.just(["phi-2", "tinyllama"])})
FUZZ = st.tuples(REQUESTS, USER).map(
    lambda r: {**r[0], "user": r[0].get("user", r[1])} if isinstance(r[0], dict) else r[0])
PAYLOAD = st.one_of(GENERATE.map(lambda m: ("json", m)), GENERATE.map(lambda m: ("json", m)),
                    GENERATE.map(lambda m: ("json", m)), OTHER.map(lambda m: ("json", m)),
                    FUZZ.map(lambda m: ("json", m)))


def test_same_replies_metrics_and_owners(tmp_path: Path) -> None:
    """Ownership on, two backends sharing the traffic, each reporting the policy models
    the weights want there: the core carries the generates of owned models, Python the
    rest; replies, metrics and the owner table agree."""
    weights = {"mma": 50.0, "mma2": 50.0}
    desired = _desired(weights)
    assert len(set(desired.values())) == 2, desired  # both backends own some
    on = {b: ",".join(m for m, d in desired.items() if d == b) for b in weights}
    backends = {"mma": start_fake("A", loaded=on["mma"]),
                "mma2": start_fake("B", loaded=on["mma2"])}
    p = _start_pair(tmp_path, backends, weights, ownership=OWNERSHIP)
    sent = [0]
    with compared(p) as c:
        _wait_owners(p, desired)

        @DIFF
        @given(st.lists(PAYLOAD, min_size=1, max_size=8))
        def streams(items: list[tuple[str, Any]]) -> None:
            for kind, value in items:
                sent[0] += 1
                assert_same(c, _frames(kind, value, sent[0]))

        streams()
        assert _owners(p.fast) == _owners(p.slow)
        # no hand-over in either: every model stayed where the weights want it
        for shim in (p.fast, p.slow):
            assert metric(shim.metrics(), "shim_handovers_total") == 0


def test_handover_waits_for_the_cores_requests(tmp_path: Path) -> None:
    """A weight change moves phi-2 away from a slow owner while the core has generates
    for it in flight there: the unload reaches the owner only after their replies came
    back (the ownership table counts the core's requests in flight)."""
    delay_s = 3.0
    weights = {"mma": 100.0, "mma2": 0.0}
    backends = {"mma": start_fake("A", loaded="phi-2", delay_ms=int(delay_s * 1000)),
                "mma2": start_fake("B", loaded="")}
    p = _start_pair(tmp_path, backends, weights, timeout_ms=30_000, ownership=OWNERSHIP)
    ctx = zmq.Context()
    sock = dealer(ctx, p.fast.endpoint)
    try:
        _wait_owners(p, {"phi-2": "mma"})
        body = b'{"action": "generate", "model_pref": "fast", "prompt": "p%d"}'
        before = metric(p.fast.metrics(), "shim_fastpath_requests_total")
        for i in range(3):
            sock.send_multipart([b"", body % i])
        wait_until(lambda: fake_counts(backends["mma"]).get("generate:fast", 0) >= 3, 10.0,
                   "the three generates at the slow owner")
        assert metric(p.fast.metrics(), "shim_fastpath_requests_total") >= before + 3, \
            "the core did not carry them"
        _set_weights(p.fast, {"mma": 0.0, "mma2": 100.0})
        sock.send_multipart([b"", body % 99])  # wants phi-2 on mma2: starts the move
        replies, unload_at = 0, None
        deadline = time.monotonic() + 30.0
        while (replies < 4 or unload_at is None) and time.monotonic() < deadline:
            if sock.poll(20):
                sock.recv_multipart()
                replies += 1
                if replies == 3:
                    third_at = time.monotonic()
            if unload_at is None and fake_counts(backends["mma"]).get("UNLOAD_MODEL:phi-2"):
                unload_at = time.monotonic()
        assert replies == 4 and unload_at is not None, (replies, unload_at)
        # Had the move not waited, the unload would have come ~delay_s before the replies.
        assert unload_at > third_at - 0.5 * delay_s, (unload_at, third_at)
    finally:
        sock.close(0)
        ctx.term()
        _stop(p)


def test_owner_gone_no_failover(tmp_path: Path) -> None:
    """The owner goes away with the core's generates in flight: in both shims they get an
    error in the caller's shape, never a failover to the other backend (which would load
    the model there too)."""
    weights = {"mma": 100.0, "mma2": 0.0}
    # Slow, yet answering the loaded-models polls (at most 5 s: shim.addons.loaded).
    backends = {"mma": start_fake("A", loaded="phi-2", delay_ms=4000),
                "mma2": start_fake("B", loaded="")}
    p = _start_pair(tmp_path, backends, weights, timeout_ms=20_000, ownership=OWNERSHIP)
    with compared(p) as c:
        _wait_owners(p, {"phi-2": "mma"})
        body = b'{"action": "generate", "model_pref": "fast", "prompt": "p%d"}'
        for sock in (c.fast, c.slow):
            for i in range(3):
                sock.send_multipart([b"g%d" % i, b"", body % i])
        wait_until(lambda: fake_counts(backends["mma"]).get("generate:fast", 0) >= 6, 10.0,
                   "the slow owner holding all six requests")
        backends["mma"].kill()
        got: dict[str, list[list[bytes]]] = {}
        for name, sock in (("fast", c.fast), ("slow", c.slow)):
            got[name] = []
            for _ in range(3):
                assert sock.poll(int(REPLY_S * 1000)), f"{name}: no reply"
                got[name].append(masked(sock.recv_multipart()))
        assert sorted(got["fast"]) == sorted(got["slow"])
        assert all(json.loads(r[2])["error_code"] == "SHIM_BACKEND_LOST"
                   for r in got["fast"]), got
        assert not fake_counts(backends["mma2"]).get("generate:fast"), "failed over"


@pytest.mark.parametrize("pref", [b'"fast"', b'null', b'""', b'"unknown"', None])
def test_prefs_resolve_as_mma_does(tmp_path: Path, pref: bytes | None) -> None:
    """model_pref absent, null, empty or unknown is MMA's "fast" (phi-2, owned by mma2
    here, where the weights want it): the core sends it there, never by the draw."""
    weights = {"mma": 50.0, "mma2": 50.0}
    desired = _desired(weights)
    owner = desired["phi-2"]
    backends = {"mma": start_fake("A", loaded="phi-2" if owner == "mma" else ""),
                "mma2": start_fake("B", loaded="phi-2" if owner == "mma2" else "")}
    p = _start_pair(tmp_path, backends, weights, ownership=OWNERSHIP)
    field = b"" if pref is None else b'"model_pref": %s, ' % pref
    with compared(p) as c:
        _wait_owners(p, {"phi-2": owner})
        for i in range(20):
            assert_same(c, [b"x", b"", b'{"action": "generate", %s"prompt": "q%d"}'
                            % (field, i)])
        other = next(b for b in weights if b != owner)
        assert not any(k.startswith("generate") for k in fake_counts(backends[other])), \
            "a generate for phi-2 went to the backend that does not own it"

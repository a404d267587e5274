"""Property-based fuzzing of one running shim: random multipart frames and random JSON.

ONE shim (module scope) in front of two fake backends split 50/50, so both the
pass-through and the translated path see the input. Every example checks, on a DEALER:

- exactly one reply, before the deadline, with the client's envelope given back
  (after each example a tagged probe request must be the very next thing to arrive, so
  a second reply would be caught there, and the probe shows the shim still serves);
- the reply is a JSON object in the caller's form; input that is not one JSON object
  in one frame gets SHIM_BAD_REQUEST; nothing gets SHIM_INTERNAL;

and after each test: no stray message in a grace period, the shim's frontend counters
equal what the client sent and received, and the process is alive.

The examples are derandomized (the same every run, so ``make test`` is stable); set
``MMSHIM_FUZZ_RANDOM=1`` for fresh random examples and ``MMSHIM_FUZZ_EXAMPLES=N`` for more
of them (e.g. a long exploratory run).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shim.dialects import MMS_ONLY_ACTIONS
from tests.procs import Backend, ensure_models, req, start_backend
from tests.reliability.helpers import (
    GEN_BYTES,
    Ctx,
    decode_reply,
    outcome_of,
    settled_counts,
    start_ready,
)
from tests.shimproc import Fake, ShimProc, shim_config, start_fake

MAX_REQUEST_BYTES = 4096
REPLY_DEADLINE_S = 3.0  # the shim's default_timeout_ms is 1500

#: Examples per property (frames, json to fakes, json to the reference backends);
#: N each with MMSHIM_FUZZ_EXAMPLES=N.
_N = os.environ.get("MMSHIM_FUZZ_EXAMPLES")
FRAME_EXAMPLES, JSON_EXAMPLES, REAL_EXAMPLES = (int(_N),) * 3 if _N else (300, 400, 200)

FUZZ = settings(
    max_examples=FRAME_EXAMPLES,
    deadline=None,
    derandomize=not os.environ.get("MMSHIM_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
)


# -- the one shim, and one client ----------------------------------------------------


@dataclass
class Wire:
    """A DEALER on the shim, counting what it sent and received."""

    sock: zmq.Socket[bytes]
    sent: int = 0
    received: int = 0
    examples: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)

    def exchange(self, frames: list[bytes]) -> tuple[list[bytes], float]:
        """Send one multipart message; return the one reply and how long it took."""
        started = time.monotonic()
        self.sock.send_multipart(frames)
        self.sent += 1
        assert self.sock.poll(int(REPLY_DEADLINE_S * 1000)), \
            f"no reply within {REPLY_DEADLINE_S} s to {frames!r:.300}"
        reply = self.sock.recv_multipart()
        self.received += 1
        return reply, time.monotonic() - started

    def probe(self) -> None:
        """A tagged plain request: its reply must be the next message (no stray second
        reply to anything before it) and be a success (the shim still serves)."""
        tag = f"probe-{self.sent}".encode()
        reply, _ = self.exchange([tag, b"", GEN_BYTES])
        assert reply[0] == tag, f"a message arrived that answers nothing: {reply!r:.300}"
        assert len(reply) == 3 and reply[1] == b"", reply
        assert outcome_of(decode_reply(reply[2])) == "ok", reply

    def assert_quiet(self, grace_s: float = 0.5) -> None:
        if self.sock.poll(int(grace_s * 1000)):
            raise AssertionError(f"stray message after the last reply: "
                                 f"{self.sock.recv_multipart()!r:.300}")


@dataclass
class FuzzShim:
    shim: ShimProc
    backends: dict[str, Fake | Backend]
    wire: Wire


def _fuzz_shim(tmp_path: Path, backends: dict[str, Fake | Backend],
               **sections: Any) -> Iterator[FuzzShim]:
    try:
        cfg = shim_config(backends, tmp_path, routing={"weights": {"mma": 50, "mms": 50}},
                          shim={"default_timeout_ms": 1500, "opaque": "reject",
                                "max_request_bytes": MAX_REQUEST_BYTES}, **sections)
        shim = start_ready(cfg, tmp_path)
    except BaseException:
        for backend in backends.values():
            backend.stop()
        raise
    ctx: Ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(shim.endpoint)
    try:
        yield FuzzShim(shim, backends, Wire(sock))
    finally:
        sock.close(0)
        ctx.term()
        shim.stop()
        for backend in backends.values():
            backend.stop()


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzShim]:
    """The shim in front of two fake backends (they answer anything, at once)."""
    yield from _fuzz_shim(tmp_path_factory.mktemp("fuzz"),
                          {"mma": start_fake("mma", "mma"), "mms": start_fake("mms", "mms")})


@pytest.fixture(scope="module")
def fuzz_real(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzShim]:
    """The shim in front of the two reference backends, model ownership on."""
    ensure_models()
    mma = start_backend("mma")
    try:
        mms = start_backend("mms")
    except BaseException:
        mma.stop()
        raise
    yield from _fuzz_shim(tmp_path_factory.mktemp("fuzz-real"), {"mma": mma, "mms": mms},
                          ownership={"enabled": True})


def assert_books_balance(f: FuzzShim, grace_s: float = 0.5) -> None:
    """After a test: nothing stray, the shim counted exactly what the client did."""
    f.wire.assert_quiet(grace_s)
    counts = settled_counts(f.shim, requests=f.wire.sent)
    assert counts == {"requests": f.wire.sent, "replies": f.wire.received, "unroutable": 0}, \
        (counts, f.wire.sent, f.wire.received)
    assert f.shim.proc.poll() is None, f.shim.proc.log()[-3000:]


def is_json_object(body: bytes) -> bool:
    """RFC 8259 JSON text (UTF-8) whose value is an object."""
    try:
        value = json.loads(body.decode("utf-8"), parse_constant=_reject)
    except (ValueError, RecursionError):
        return False
    return isinstance(value, dict)


def _reject(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# -- strategies ----------------------------------------------------------------------

SAMPLE_PAYLOADS = [GEN_BYTES, b"{}", b"null", b"[]", b'{"action": 1}', b'{"command": null}',
                   b'{"model_id": "phi-2"}', b'{"action": "status"}', b"\xff\xfe", b'"x"']

FRAME = st.one_of(
    st.just(b""),
    st.binary(max_size=48),
    st.sampled_from(SAMPLE_PAYLOADS),
    st.binary(min_size=MAX_REQUEST_BYTES - 2, max_size=MAX_REQUEST_BYTES + 64),
)
FRAMES = st.lists(FRAME, min_size=1, max_size=6)

SCALAR = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
          | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=16))
JSON = st.recursive(SCALAR, lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=10)


def maybe(good: st.SearchStrategy) -> st.SearchStrategy:
    """The plausible value, or any JSON value at all (wrong type, null, nested...)."""
    return st.one_of(good, JSON)


TEXT = st.text(max_size=40)
PREFS = st.sampled_from(["fast", "quality", "fallback", "stt", "tts", "nope", ""])
MODELS = st.sampled_from(["phi-2", "mistral-7b", "tinyllama", "whisper-small", "piper-tts",
                          "llama-3-8b", "ghost", ""])
QUANT = st.sampled_from(["FP16", "int8", "int4", "default"])

MMA_GENERATE = st.fixed_dictionaries({"action": st.just("generate")}, optional={
    "model_pref": maybe(PREFS), "prompt": maybe(TEXT),
    "params": maybe(st.fixed_dictionaries({}, optional={
        "max_tokens": maybe(st.integers(-5, 5000)), "temperature": maybe(st.floats(0, 2)),
        "top_p": maybe(st.floats(0, 1))})),
    "conversation_id": maybe(st.text(max_size=10)),
    "request_id": maybe(st.uuids().map(str)), "timestamp": maybe(st.floats(0, 2e9)),
})
MMA_COMMAND = st.fixed_dictionaries({"command": maybe(st.sampled_from(
    ["GET_LOADED_MODELS_STATUS", "LOAD_MODEL", "UNLOAD_MODEL", "HEALTH_CHECK", "REBOOT"]))},
    optional={"model_name": maybe(MODELS), "model_id": maybe(MODELS),
              "device": maybe(st.sampled_from(["MainPC", "PC2"])),
              "quantization_level": maybe(QUANT), "priority": maybe(st.integers(0, 10)),
              "source": JSON})
MMA_ACCESS = st.fixed_dictionaries({"model_id": maybe(MODELS)}, optional={
    "request_id": maybe(st.text(max_size=8)),
    "context": maybe(st.fixed_dictionaries({}, optional={
        "quantization_level": maybe(QUANT),
        "priority": maybe(st.sampled_from(["low", "normal", "high"]))})),
})
MMA_OTHER = st.fixed_dictionaries(
    {"action": maybe(st.sampled_from(["status", "clear_conversation", "unknown_thing"]))},
    optional={"conversation_id": maybe(st.text(max_size=8))})
MMS_REQUEST = st.fixed_dictionaries(
    {"action": st.sampled_from(sorted(MMS_ONLY_ACTIONS))}, optional={
        "model_id": maybe(MODELS), "prompt": maybe(TEXT), "system_prompt": maybe(TEXT),
        "max_tokens": maybe(st.integers(-5, 5000)), "temperature": maybe(st.floats(0, 2)),
        "top_p": maybe(st.floats(0, 1)), "stop": maybe(st.lists(st.text(max_size=4),
                                                                max_size=3)),
        "conversation_id": maybe(st.text(max_size=8)),
        "model_ids": maybe(st.lists(MODELS, max_size=3)),
        "task_type": maybe(st.sampled_from(["chat", "code", "stt"])),
        "context_size": maybe(st.integers(0, 100_000)),
    })
ANY_OBJECT = st.dictionaries(st.text(max_size=12), JSON, max_size=6)
REQUESTS = st.one_of(MMA_GENERATE, MMA_COMMAND, MMA_ACCESS, MMA_OTHER, MMS_REQUEST,
                     ANY_OBJECT, JSON)


# -- the properties ------------------------------------------------------------------


def test_fuzz_multipart_frames(fuzz: FuzzShim) -> None:
    """Random multipart messages (random frame count, empty frames anywhere, random bytes,
    oversized frames) from a DEALER."""
    wire = fuzz.wire

    @FUZZ
    @given(frames=FRAMES)
    def one(frames: list[bytes]) -> None:
        wire.examples += 1
        reply, _ = wire.exchange(frames)
        # The envelope comes back: everything up to the first empty frame, or just an
        # empty delimiter when there was none.
        split = frames.index(b"") if b"" in frames else None
        envelope = frames[: split + 1] if split is not None else [b""]
        assert reply[:-1] == envelope, (frames, reply)
        answer = decode_reply(reply[-1])
        assert answer is not None, f"reply is not a JSON object: {reply[-1]!r:.200}"
        outcome = outcome_of(answer)
        wire.outcomes[outcome] += 1
        assert outcome != "SHIM_INTERNAL", (frames, answer)
        body = frames[split + 1:] if split is not None else []
        if not (len(body) == 1 and len(body[0]) <= MAX_REQUEST_BYTES
                and is_json_object(body[0])):
            assert outcome == "SHIM_BAD_REQUEST", (frames, answer)
        wire.probe()

    one()
    print(f"\n[fuzz frames] {wire.examples} examples, outcomes {dict(wire.outcomes)}")
    assert_books_balance(fuzz)


def run_json_fuzz(f: FuzzShim, examples: int) -> Counter[str]:
    """Random JSON: legacy-like requests of both dialects with random field types, random
    objects, and JSON values that are not objects, each in one frame."""
    wire = f.wire
    seen: Counter[str] = Counter()

    @settings(FUZZ, max_examples=examples)
    @given(msg=REQUESTS)
    def one(msg: object) -> None:
        seen["examples"] += 1
        tag = f"json-{wire.sent}".encode()
        payload = json.dumps(msg).encode()
        reply, _ = wire.exchange([tag, b"", payload])
        assert reply[:2] == [tag, b""] and len(reply) == 3, reply
        answer = decode_reply(reply[2])
        assert answer is not None, f"reply is not a JSON object: {reply[2]!r:.200}"
        outcome = outcome_of(answer)
        seen[outcome] += 1
        assert outcome != "SHIM_INTERNAL", (msg, answer)
        if not isinstance(msg, dict):
            assert outcome == "SHIM_BAD_REQUEST", (msg, answer)
        # The caller's dialect: every MMA reply has a status; MMS's deployed failure shape
        # is {"error": ...} without one.
        assert "status" in answer or "error" in answer, (msg, answer)
        wire.probe()

    one()
    assert_books_balance(f)
    return seen


def test_fuzz_json_payloads(fuzz: FuzzShim) -> None:
    """Random JSON through the shim to fake backends (pass-through and translated)."""
    seen = run_json_fuzz(fuzz, JSON_EXAMPLES)
    print(f"\n[fuzz json/fakes] {seen.pop('examples')} examples, outcomes {dict(seen)}")


def test_fuzz_json_payloads_real_backends(fuzz_real: FuzzShim) -> None:
    """Random JSON through the shim to the reference MMA and MMS (real error shapes,
    real loads and unloads, model ownership on); afterwards no model is loaded on both
    backends at once (invariant 3)."""
    seen = run_json_fuzz(fuzz_real, REAL_EXAMPLES)
    print(f"\n[fuzz json/real] {seen.pop('examples')} examples, outcomes {dict(seen)}")
    mma, mms = fuzz_real.backends["mma"], fuzz_real.backends["mms"]
    on_mma = set(req(mma.endpoint, {"action": "status"})["loaded_models"])
    on_mms = set(req(mms.endpoint, {"action": "get_loaded_models_status"})["loaded_models"])
    print(f"[fuzz json/real] loaded on MMA {sorted(on_mma)}, on MMS {sorted(on_mms)}")
    assert not on_mma & on_mms, f"loaded on both backends: {sorted(on_mma & on_mms)}"


#: Inputs the fuzzers do not reach on their own (json.dumps always writes valid UTF-8 and
#: shallow values), each of which must get SHIM_BAD_REQUEST like any other bad input.
@pytest.mark.parametrize("payload", [
    pytest.param(b"[" * 600 + b"]" * 600, id="nested-array-600"),
    pytest.param(b'{"action": "generate", "params": ' + b"[" * 2000 + b"]" * 2000 + b"}",
                 id="nested-2000-in-object"),
    pytest.param(b'{"model_id": "phi-2", "request_id": "\xff\xfe"}', id="invalid-utf8-in-string"),
    pytest.param(b'"\x80"', id="invalid-utf8-string-value"),
    pytest.param(b'{"model_id": "phi-2", "request_id": "\\ud800"}', id="lone-surrogate"),
    pytest.param(b'{"command": "LOAD_MODEL", "priority": 1e999}', id="float-overflow"),
    pytest.param(b'{"action": "generate", "prompt": NaN}', id="nan"),
    pytest.param(b'{"action": "generate"', id="truncated"),
    pytest.param(b"\xef\xbb\xbf{}", id="utf8-bom"),
])
def test_nasty_json_is_a_bad_request(fuzz: FuzzShim, payload: bytes) -> None:
    """One reply, in time, books balanced; and a clear SHIM_BAD_REQUEST unless the payload
    is a JSON object (then anything but SHIM_INTERNAL)."""
    assert len(payload) <= MAX_REQUEST_BYTES  # else it is refused for its size alone
    wire = fuzz.wire
    tag = f"nasty-{wire.sent}".encode()
    reply, elapsed = wire.exchange([tag, b"", payload])
    assert reply[:2] == [tag, b""] and elapsed < REPLY_DEADLINE_S
    wire.probe()
    assert_books_balance(fuzz, grace_s=0.2)
    answer = decode_reply(reply[2])
    assert answer is not None
    if is_json_object(payload):
        assert outcome_of(answer) != "SHIM_INTERNAL", answer
    else:
        assert answer.get("error_code") == "SHIM_BAD_REQUEST", answer

"""Shadow mode and the parity run, with real processes.

The shim runs as ``mmshim run`` against fake backends (tests/fakes.py) that count what
they receive (in their health reply) and can stall, talk garbage or rename a reply field;
the parity run goes against the two real reference backends (tests/procs.start_backend).
MMA is the primary (weight 100) and MMS the shadow throughout.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.procs import REPO_ROOT, free_port, req, start_backend
from tests.reliability.helpers import wait_until
from tests.shimproc import Fake, ShimProc, shim_config, start_fake, start_shim

SECRET = "SHADOW-ONLY-7f3a"  # the shadow fake's name: it is in every reply it sends
GEN_FAST = {"action": "generate", "model_pref": "fast", "prompt": "hi", "params": {"max_tokens": 4}}
GEN_QUALITY = {**GEN_FAST, "model_pref": "quality"}
STATUS = {"action": "status"}
WAIT_S = 15.0  # bound of every wait on a condition (generous: a loaded machine)


# -- helpers ---------------------------------------------------------------------------

def received(fake: Fake) -> dict[str, int]:
    """What the fake has received so far, by action/command (and model)."""
    counts: dict[str, int] = req(fake.health_endpoint, b"?", timeout=5.0)["counts"]
    return counts


_SAMPLE = re.compile(r'^shim_shadow_total\{([^}]*)\} (\S+)$', re.MULTILINE)


def shadow_counts(shim: ShimProc) -> dict[tuple[str, str], int]:
    """shim_shadow_total by (action, outcome)."""
    out = {}
    for labels, value in _SAMPLE.findall(shim.metrics()):
        d = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        out[(d["action"], d["outcome"])] = int(float(value))
    return out


def total(counts: dict[tuple[str, str], int], action: str | None = None,
          outcome: str | None = None) -> int:
    return sum(n for (a, o), n in counts.items()
               if (action is None or a == action) and (outcome is None or o == outcome))


def skipped_not_loaded(shim: ShimProc) -> int:
    """Requests the shadow addon did not mirror because the model is not loaded there
    (the admin status' ``shadow_activity``)."""
    return int(shim.status()["shadow_activity"]["skipped_not_loaded"])


def wait_for_first_mirror(shim: ShimProc, shadow: Fake) -> None:
    """Send phi-2 generates until one is mirrored: the shim has seen phi-2 loaded on the
    shadow (a poll, by ownership or by the shadow itself)."""
    def mirrored() -> bool:
        req(shim.endpoint, GEN_FAST)
        return received(shadow).get("generate_text:phi-2", 0) > 0
    wait_until(mirrored, WAIT_S, "the first mirrored generate")


def shadow_config(fakes: dict[str, Any], tmp_path: Path, **shadow: Any) -> dict[str, Any]:
    return shim_config(
        fakes, tmp_path,
        routing={"mode": "shadow", "weights": {"mma": 100, "mms": 0}},
        ownership={"poll_interval_ms": 200, "shared_models": ["phi-2"]},
        shadow={"diff_log": str(tmp_path / "diffs.jsonl"), "percent": 100, **shadow})


def pipeline(endpoint: str, requests: list[bytes], window: int = 32) -> list[dict[str, Any]]:
    """Every request over one DEALER, ``window`` in flight; replies in arrival order."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    replies: list[dict[str, Any]] = []
    sent = 0
    try:
        while len(replies) < len(requests):
            while sent < len(requests) and sent - len(replies) < window:
                sock.send_multipart([b"", requests[sent]])
                sent += 1
            assert sock.poll(5000), f"only {len(replies)}/{len(requests)} replies"
            empty, body = sock.recv_multipart()
            assert empty == b""
            replies.append(json.loads(body))
    finally:
        sock.close(0)
    return replies


def mmshim(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shim.cli", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)


# -- one shim in shadow mode, a healthy shadow ------------------------------------------

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("shadow")
    fakes = {"mma": start_fake("mma", "mma", loaded="phi-2"),
             "mms": start_fake(SECRET, "mms", loaded="phi-2")}
    shim = start_shim(shadow_config(fakes, tmp, max_inflight=64), tmp)
    try:
        # Ownership has polled once both backends said phi-2 is loaded: mirrors flow.
        wait_for_first_mirror(shim, fakes["mms"])
        yield {"shim": shim, **fakes}
    finally:
        shim.stop()
        for fake in fakes.values():
            fake.kill()


def test_shadow_replies_never_reach_clients(stack: dict[str, Any]) -> None:
    shim, shadow = stack["shim"], stack["mms"]
    before = received(shadow)
    mix = [GEN_FAST, STATUS, {"command": "HEALTH_CHECK"}, {"command": "GET_LOADED_MODELS_STATUS"},
           {**GEN_FAST, "conversation_id": "c-1"}]
    # Distinct bytes: identical requests in flight would join into one execution.
    payloads = [json.dumps({**mix[i % len(mix)], "seq": i}).encode() for i in range(1000)]
    replies = pipeline(shim.endpoint, payloads)
    assert len(replies) == 1000
    leaked = [r for r in replies if SECRET in json.dumps(r)]
    assert not leaked, leaked[:3]
    assert all(r["status"] in ("ok", "SUCCESS") for r in replies)
    assert sum(1 for r in replies if r.get("response_text") == "mma") == 400
    # ...while the shadow did answer, with its own name in its replies.
    wait_until(lambda: received(shadow).get("generate_text:phi-2", 0)
               - before.get("generate_text:phi-2", 0) >= 300, WAIT_S, "mirrored generates")
    counts = shadow_counts(shim)
    assert total(counts, "generate", "match") >= 300  # text by shape: SECRET vs "mma" match
    assert total(counts, "status", "match") > 0 and total(counts, "status", "mismatch") == 0


def test_state_changing_requests_are_never_mirrored(stack: dict[str, Any]) -> None:
    shim, shadow = stack["shim"], stack["mms"]
    before_counts, before = shadow_counts(shim), received(shadow)
    for i in range(10):
        assert req(shim.endpoint, {"command": "LOAD_MODEL", "model_name": "phi-2"})[
            "status"] == "SUCCESS"
        req(shim.endpoint, {"command": "LOAD_MODEL", "model_name": "tinyllama"})
        req(shim.endpoint, {"command": "UNLOAD_MODEL", "model_name": "tinyllama"})
        req(shim.endpoint, {"model_id": "whisper-small", "request_id": f"r{i}", "context": {}})
        req(shim.endpoint, {"action": "clear_conversation", "conversation_id": "c-1"})
        req(shim.endpoint, STATUS)  # a read-only request in between: that one is mirrored
    wait_until(lambda: total(shadow_counts(shim), "status")
               - total(before_counts, "status") >= 10, WAIT_S, "status comparisons")
    after = received(shadow)
    changed = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert not any(k.startswith(("load_model", "unload_model", "model_access")) for k in changed), \
        changed
    counts = shadow_counts(shim)
    for action in ("load", "unload", "model_access", "clear_conversation"):
        assert total(counts, action) == 0, (action, counts)


def test_generate_is_mirrored_only_when_the_model_is_loaded_on_the_shadow(
        stack: dict[str, Any]) -> None:
    shim, primary, shadow = stack["shim"], stack["mma"], stack["mms"]
    before, before_primary = received(shadow), received(primary)
    skipped_before = skipped_not_loaded(shim)
    for _ in range(20):
        assert req(shim.endpoint, GEN_FAST)["response_text"] == "mma"  # phi-2: on both
        assert req(shim.endpoint, GEN_QUALITY)["response_text"] == "mma"  # mistral-7b: not
    wait_until(lambda: received(shadow).get("generate_text:phi-2", 0)
               - before.get("generate_text:phi-2", 0) >= 20, WAIT_S, "mirrored phi-2 generates")
    # The positive event that makes the absence below able to fail: the shadow addon has
    # decided about all 20 mistral-7b generates (skipped: not loaded on the shadow).
    wait_until(lambda: skipped_not_loaded(shim) - skipped_before >= 20, WAIT_S,
               "20 mistral-7b generates skipped by the shadow")
    after, after_primary = received(shadow), received(primary)
    assert after.get("generate_text:mistral-7b", 0) == before.get("generate_text:mistral-7b", 0)
    assert after_primary["generate:quality"] - before_primary.get("generate:quality", 0) == 20


# -- a shadow that misbehaves ----------------------------------------------------------

def latencies(sock: zmq.Socket[bytes], payload: bytes, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        sock.send(payload)
        assert sock.poll(5000)
        sock.recv()
        out.append(time.perf_counter() - started)
    return out


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def test_stalled_shadow_leaves_primary_latency_alone_and_sheds(tmp_path: Path) -> None:
    fakes = {"mma": start_fake("mma", "mma", loaded="phi-2"),
             "mms": start_fake(SECRET, "mms", mode="stall")}
    base_dir, shadow_dir = tmp_path / "base", tmp_path / "shadow"
    base_dir.mkdir()
    shadow_dir.mkdir()
    split = shim_config(fakes, base_dir, ownership={"enabled": False})
    shadowed = shadow_config(fakes, shadow_dir, max_inflight=8, timeout_ms=800)
    shadowed["ownership"] = {"enabled": False}
    shims = [start_shim(split, base_dir), start_shim(shadowed, shadow_dir)]
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    socks = []
    try:
        for shim in shims:
            sock = ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(shim.endpoint)
            socks.append(sock)
        payload = json.dumps(STATUS).encode()
        for sock in socks:
            latencies(sock, payload, 20)  # warm up
        base: list[float] = []
        shadow: list[float] = []
        for _ in range(10):  # interleaved, so both see the same machine
            base += latencies(socks[0], payload, 30)
            shadow += latencies(socks[1], payload, 30)
        p50_base, p50_shadow = statistics.median(base), statistics.median(shadow)
        print(f"\nprimary latency, 300 status requests each: without shadow p50 "
              f"{p50_base * 1e3:.2f} ms p99 {pct(base, .99) * 1e3:.2f} ms; with a stalled "
              f"shadow p50 {p50_shadow * 1e3:.2f} ms p99 {pct(shadow, .99) * 1e3:.2f} ms")
        assert p50_shadow < 2 * p50_base + 0.003
        counts = shadow_counts(shims[1])
        print(f"shadow outcomes: {counts}")
        assert total(counts, "status", "shed") >= 300 - 8 - 20
        assert total(counts, outcome="match") == total(counts, outcome="mismatch") == 0
        # The stalled copies time out in the background and free the queue again.
        wait_until(lambda: total(shadow_counts(shims[1]), outcome="shadow_timeout") >= 8,
                   WAIT_S, "shadow timeouts")
        assert received(fakes["mms"]).get("get_loaded_models_status", 0) >= 8
    finally:
        for sock in socks:
            sock.close(0)
        for shim in shims:
            shim.stop()
        for fake in fakes.values():
            fake.kill()


@pytest.mark.parametrize("failure", ["garbage", "dead"])
def test_garbage_or_dead_shadow_changes_nothing_for_clients(tmp_path: Path,
                                                            failure: str) -> None:
    primary = start_fake("mma", "mma", loaded="phi-2")
    shadow = start_fake(SECRET, "mms", mode="garbage") if failure == "garbage" else None
    mms: Any = shadow or {"dialect": "mms", "endpoints": [f"tcp://127.0.0.1:{free_port()}"]}
    cfg = shadow_config({"mma": primary, "mms": mms}, tmp_path)
    cfg["ownership"] = {"enabled": False}
    shim = start_shim(cfg, tmp_path)
    try:
        for _ in range(30):
            assert req(shim.endpoint, STATUS)["status"] == "ok"
            assert req(shim.endpoint, {"command": "HEALTH_CHECK"})["status"] == "SUCCESS"
        wait_until(lambda: total(shadow_counts(shim), outcome="shadow_error") >= 60,
                   WAIT_S, "shadow errors")
        assert total(shadow_counts(shim), outcome="match") == 0
    finally:
        shim.stop()
        primary.kill()
        if shadow is not None:
            shadow.kill()


# -- a seeded difference: the shadow renames one reply field ----------------------------

def test_renamed_field_shows_in_the_diff_log_and_the_diffs_report(tmp_path: Path) -> None:
    """MMS renames ``total_models`` in its health_check reply: a status through MMS then
    reports a wrong total. MMA also has a twin (``secondary``) that holds one more model,
    so where the loaded models differ is noise, not a regression. Ownership is off here:
    the shadow polls what is loaded itself."""
    twin = start_fake("mma-twin", "mma", loaded="phi-2,tinyllama")
    fakes = {"mma": start_fake("mma", "mma", loaded="phi-2"),
             "mms": start_fake(SECRET, "mms", loaded="phi-2,tinyllama", mode="rename_field",
                               rename="total_models=model_count")}
    log_path = tmp_path / "diffs.jsonl"
    cfg = shadow_config(fakes, tmp_path, compare={"status": {"loaded_models": "shape"}})
    cfg["backends"]["mma"]["secondary"] = twin.endpoint
    cfg["ownership"] = {"enabled": False, "poll_interval_ms": 200}
    cfg["shadow"]["log_payloads"] = True  # this test reads the replies in the log
    shim = start_shim(cfg, tmp_path)
    try:
        wait_for_first_mirror(shim, fakes["mms"])
        for _ in range(40):
            assert req(shim.endpoint, STATUS)["total_models"] == 5  # the client's is right
        for _ in range(10):
            req(shim.endpoint, {"command": "GET_LOADED_MODELS_STATUS"})
            req(shim.endpoint, GEN_QUALITY)  # mistral-7b is loaded nowhere: not mirrored
        wait_until(lambda: total(shadow_counts(shim), outcome="mismatch") >= 50,
                   WAIT_S, "mismatches")
        counts = shadow_counts(shim)
        assert counts[("status", "mismatch")] == 40
        assert received(fakes["mms"]).get("generate_text:mistral-7b", 0) == 0
        assert received(twin).get("status", 0) >= 40  # the twin got its copies too
        # The same report from the running shim, through the admin socket.
        wait_until(lambda: "total_models" in mmshim(
            "ctl", "--config", str(shim.config_path), "diffs").stdout, WAIT_S, "ctl diffs")
    finally:
        assert shim.stop() == 0  # flushes the diff log's last tally
        for fake in [*fakes.values(), twin]:
            fake.kill()
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    mismatches = [r for r in records if r["kind"] == "mismatch"]
    assert len(mismatches) == 50
    first = next(r for r in mismatches if r["action"] == "status")
    assert [d["path"] for d in first["diffs"]] == ["total_models"]
    # MMA says 5 models; the translated MMS reply, missing the field, counts its loaded 2.
    assert (first["diffs"][0]["primary"], first["diffs"][0]["shadow"]) == (5, 2)
    assert [d["path"] for d in first["noise"]] == ["loaded_models.tinyllama"]
    assert first["request"] == STATUS and first["shadow"] == "mms"
    assert first["primary_reply"]["total_models"] == 5
    assert "tinyllama" in first["secondary_reply"]["loaded_models"]

    report = mmshim("diffs", "--log", str(log_path))
    assert report.returncode == 0, report.stderr
    print("\n" + report.stdout)
    assert "status: most frequent differing paths" in report.stdout
    assert re.search(r"^\s+40\s+total_models\s+\(value\)", report.stdout, re.MULTILINE)
    assert "loaded_models.tinyllama x40" in report.stdout  # reported as noise
    as_json = json.loads(mmshim("diffs", "--log", str(log_path), "--json").stdout)
    status = as_json["actions"]["status"]
    assert (status["compared"], status["mismatch"], status["mismatch_rate"]) == (40, 40, 1.0)
    assert status["paths"][0]["path"] == "total_models"
    assert status["paths"][0]["example"]["request"] == STATUS
    assert as_json["actions"]["loaded_status"]["paths"][0]["path"] == "total_models"


# -- the offline parity run against the real reference backends -------------------------

@pytest.fixture(scope="module")
def backends() -> Iterator[dict[str, Any]]:
    started = {"mma": start_backend("mma"), "mms": start_backend("mms")}
    yield started
    for backend in started.values():
        backend.stop()


def parity_config(tmp_path: Path, mma: Any, mms: Any) -> Path:
    cfg = {"backends": {"mma": {"dialect": "mma", "endpoints": [mma.endpoint]},
                        "mms": {"dialect": "mms", "endpoints": [mms.endpoint]}},
           "models_file": str(REPO_ROOT / "config" / "models.toml")}
    path = tmp_path / "parity.json"
    path.write_text(json.dumps(cfg))
    return path


def test_parity_passes_below_threshold(backends: dict[str, Any], tmp_path: Path) -> None:
    config = parity_config(tmp_path, backends["mma"], backends["mms"])
    run = mmshim("parity", "--config", str(config), "--threshold", "10", "--json")
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads(run.stdout)
    verdict = report["verdict"]
    print(f"\nparity of the reference backends: {verdict}")
    assert verdict["passed"] and verdict["failure_rate_percent"] <= 10
    assert verdict["attempted"] >= 25
    for action in ("generate", "load", "unload", "status", "loaded_status", "model_access",
                   "health", "clear_conversation"):
        assert action in report["actions"], action  # every MMA operation was replayed
    assert report["actions"]["generate"]["mismatch"] == 0
    assert report["actions"]["load"]["mismatch"] == 0
    assert report["actions"]["clear_conversation"]["skipped"] == 2  # MMS has none


def test_parity_fails_with_a_seeded_difference(backends: dict[str, Any],
                                               tmp_path: Path) -> None:
    # An MMS whose model config charges every model 100 MB more than MMA's does.
    models = (REPO_ROOT / "config" / "models.toml").read_text()
    models = models.replace("../models/", str(REPO_ROOT / "models") + "/")
    seeded = re.sub(r"estimated_vram_mb = (\d+)",
                    lambda m: f"estimated_vram_mb = {int(m.group(1)) + 100}", models)
    assert seeded != models
    (tmp_path / "models.toml").write_text(seeded)
    mms = start_backend("mms", tmp_path / "models.toml")
    try:
        config = parity_config(tmp_path, backends["mma"], mms)
        run = mmshim("parity", "--config", str(config), "--threshold", "10",
                     "--log", str(tmp_path / "parity.jsonl"))
    finally:
        mms.stop()
    print("\n" + run.stdout)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "parity FAILED" in run.stdout
    assert "loaded_models.phi-2.vram_usage_mb" in run.stdout
    # The records it wrote read back as the same report.
    again = mmshim("diffs", "--log", str(tmp_path / "parity.jsonl"))
    assert "loaded_models.phi-2.vram_usage_mb" in again.stdout

"""The control plane with real processes: a shim, fake backends, ``mmshim ctl``.

Fake backends put their name in each reply (translated back into the MMA dialect for
MMS), so a test measures the split by counting names. Timing is only bounded
generously: these run on small, noisy machines.
"""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

from shim.ctl import AdminClient
from tests.procs import free_port
from tests.reliability.helpers import wait_until
from tests.shimproc import ROOT, Fake, ShimProc, dealer, shim_config, start_fake, start_shim

GEN = {"action": "generate", "model_pref": "fast", "prompt": "hello", "params": {"max_tokens": 4}}
GEN_BYTES = json.dumps(GEN).encode()


def gen_bytes(seq: int) -> bytes:
    """A distinct generate request (identical bytes in flight join into one execution)."""
    return json.dumps({**GEN, "seq": seq}).encode()
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if k not in ("MMSHIM_TOKEN", "MMSHIM_ADMIN", "MMSHIM_CONFIG")}


@pytest.fixture
def shims() -> Iterator[list[ShimProc]]:
    """Shims a test started, killed at the end whatever happened."""
    started: list[ShimProc] = []
    yield started
    for shim in started:
        shim.kill()


# -- helpers ----------------------------------------------------------------------------

def ctl(shim: ShimProc, *args: str, env: dict[str, str] | None = None,
        config: bool = True) -> subprocess.CompletedProcess[str]:
    """``mmshim ctl`` as an operator runs it, endpoint and token found via --config."""
    argv = [sys.executable, "-m", "shim.cli", "ctl"]
    if config:
        argv += ["--config", str(shim.config_path)]
    return subprocess.run([*argv, *args], cwd=ROOT, env={**CLEAN_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=90)


def ctl_json(shim: ShimProc, *args: str) -> dict[str, Any]:
    done = ctl(shim, "--json", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    reply: dict[str, Any] = json.loads(done.stdout)
    return reply


def admin(shim: ShimProc, tmp_path: Path) -> AdminClient:
    """An in-process client with the token the shim generated next to its state file."""
    token = (tmp_path / "state.token").read_text().strip()
    return AdminClient(shim.admin_endpoint, token, timeout_s=10.0)


def launch(shims: list[ShimProc], cfg: dict[str, Any], tmp_path: Path,
           *extra_args: str) -> ShimProc:
    shim = start_shim(cfg, tmp_path, extra_args=extra_args)
    shims.append(shim)
    return shim


def wait_healthy(client: AdminClient, timeout_s: float = 15.0) -> dict[str, Any]:
    """Until every backend is connected (else the first requests would fail over)."""
    last: dict[str, Any] = {}

    def healthy() -> dict[str, Any] | None:
        last.update(client.call("status"))
        return dict(last) if all(b["healthy"] for b in last["backends"].values()) else None

    return wait_until(healthy, timeout_s, lambda: f"backends healthy: {last.get('backends')}",
                      interval=0.1)


def served(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, n: int,
           window: int = 100) -> Counter[str]:
    """Send ``n`` generate requests over one DEALER; count who served them."""
    sock = dealer(ctx, endpoint)
    counts: Counter[str] = Counter()
    sent = got = 0
    try:
        while got < n:
            while sent < n and sent - got < window:
                sock.send_multipart([b"", gen_bytes(sent)])
                sent += 1
            assert sock.poll(10_000), f"no reply for 10 s ({got}/{n} answered)"
            reply = json.loads(sock.recv_multipart()[-1])
            assert reply["status"] == "ok", reply
            counts[reply["response_text"]] += 1
            got += 1
    finally:
        sock.close(0)
    return counts


def weights_of(status: dict[str, Any]) -> dict[str, float]:
    return {name: float(w) for name, w in status["weights"].items()}


# -- the tests --------------------------------------------------------------------------

def test_weight_changes_through_ctl_take_effect_on_next_requests(
        fakes: dict[str, Fake], tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]],
        shims: list[ShimProc]) -> None:
    shim = launch(shims, shim_config(fakes, tmp_path), tmp_path)
    wait_healthy(admin(shim, tmp_path))
    token_file = tmp_path / "state.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600  # generated, local users only

    assert served(ctx, shim.endpoint, 2000) == {"mma": 2000}

    done = ctl(shim, "weights", "mma=0", "mms=100")
    assert done.returncode == 0, done.stderr
    assert "weights.mms: 0 -> 100" in done.stdout
    assert served(ctx, shim.endpoint, 2000) == {"mms": 2000}

    assert ctl(shim, "weights", "mma=50", "mms=50").returncode == 0
    split = served(ctx, shim.endpoint, 2000)
    assert sum(split.values()) == 2000
    assert abs(split["mma"] - 1000) <= 100, split  # 50 % +- 5 %

    status = ctl(shim, "status")
    assert status.returncode == 0
    assert "mma" in status.stdout and "50.00%" in status.stdout
    # Refusals change nothing and say why.
    bad = ctl(shim, "weights", "mma=0", "mms=0")
    assert bad.returncode == 1 and "must not all be zero" in bad.stderr
    bad = ctl(shim, "weights", "nope=10")
    assert bad.returncode == 1 and "unknown backend" in bad.stderr
    assert ctl(shim, "weights", "mma=ten").returncode == 2  # usage
    assert weights_of(ctl_json(shim, "status")) == {"mma": 50.0, "mms": 50.0}


@dataclass
class Load:
    """One client's tally."""

    sent: int = 0
    answered: int = 0
    errors: list[Any] = field(default_factory=list)


def dealer_load(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, stop: threading.Event,
                load: Load, window: int = 8) -> None:
    """Keep ``window`` requests in flight until ``stop``, then collect every reply."""
    sock = dealer(ctx, endpoint)
    outstanding = 0
    try:
        while not stop.is_set() or outstanding:
            while not stop.is_set() and outstanding < window:
                sock.send_multipart([b"", gen_bytes(load.sent)])
                load.sent += 1
                outstanding += 1
            if not sock.poll(10_000):
                load.errors.append(f"wedged: no reply for 10 s, {outstanding} outstanding")
                return
            while sock.poll(0):
                reply = json.loads(sock.recv_multipart()[-1])
                outstanding -= 1
                load.answered += 1
                if reply.get("status") != "ok":
                    load.errors.append(reply)
    finally:
        sock.close(0)


def req_load(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, stop: threading.Event,
             load: Load) -> None:
    """A strict REQ client: one missed reply and it would be stuck forever."""
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        while not stop.is_set():
            sock.send(GEN_BYTES)
            load.sent += 1
            if not sock.poll(10_000):
                load.errors.append("wedged: REQ got no reply for 10 s")
                return
            reply = json.loads(sock.recv())
            load.answered += 1
            if reply.get("status") != "ok":
                load.errors.append(reply)
    finally:
        sock.close(0)


def test_1000_random_changes_under_load_lose_nothing(
        fakes: dict[str, Fake], tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]],
        shims: list[ShimProc]) -> None:
    shim = launch(shims, shim_config(fakes, tmp_path), tmp_path)
    client = admin(shim, tmp_path)
    wait_healthy(client)
    stop = threading.Event()
    loads = [Load() for _ in range(5)]
    threads = [threading.Thread(target=dealer_load, args=(ctx, shim.endpoint, stop, ld))
               for ld in loads[:3]]
    threads += [threading.Thread(target=req_load, args=(ctx, shim.endpoint, stop, ld))
                for ld in loads[3:]]
    started = time.monotonic()
    for t in threads:
        t.start()
    # Two operators at once, 500 changes each: the swaps must not interleave either.
    changed = [0, 0]
    failures: list[Any] = []

    def operator(i: int) -> None:
        rng = random.Random(1234 + i)
        own = admin(shim, tmp_path)
        try:
            for _ in range(500):
                if rng.random() < 0.6:
                    mma = rng.randint(0, 100)  # weights are percentages: they add up to 100
                    reply = own.call("set_weights", weights={"mma": mma, "mms": 100 - mma})
                else:
                    reply = own.call("set_mode", mode=rng.choice(["split", "shadow"]))
                if reply["status"] != "ok":
                    failures.append(reply)
                changed[i] += bool(reply["changes"])
        except Exception as exc:
            failures.append(repr(exc))
        finally:
            own.close()

    operators = [threading.Thread(target=operator, args=(i,)) for i in range(2)]
    try:
        for t in operators:
            t.start()
        for t in operators:
            t.join(120)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    elapsed = time.monotonic() - started
    sent = sum(ld.sent for ld in loads)
    answered = sum(ld.answered for ld in loads)
    errors = [e for ld in loads for e in ld.errors]
    print(f"\n1000 admin changes under load: {sent} requests sent, {answered} answered, "
          f"{len(errors)} errors, {elapsed:.1f} s")
    assert not any(t.is_alive() for t in threads), "a client is wedged"
    assert not any(t.is_alive() for t in operators), "an admin client is wedged"
    assert failures == []
    assert errors == []
    assert answered == sent > 1000
    assert elapsed < 120  # generous; 5-15 s on a busy 2-core machine

    status = client.call("status")
    counts = status["counts"]
    assert counts["requests"] == counts["replies"] == sent
    assert counts.get("unroutable", 0) == counts.get("unanswerable", 0) == 0
    # Every change left one audit line, and the state file has the last one.
    audit = (tmp_path / "state.audit.jsonl").read_text().splitlines()
    assert len(audit) == sum(changed)
    saved = json.loads((tmp_path / "state.json").read_text())
    if status["weights"] != {"mma": 100.0, "mms": 0.0}:
        assert saved["weights"] == status["weights"]
    assert saved.get("mode", "split") == status["mode"]


def test_drain_waits_for_requests_in_flight(
        tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]], shims: list[ShimProc]) -> None:
    # 8 s of work each (generate deadlines default to 29 s): two `ctl` subprocesses must
    # start and finish while the requests are still in flight, even on a loaded machine.
    slow = {"mma": start_fake("mma", "mma", delay_ms=8000), "mms": start_fake("mms", "mms")}
    try:
        shim = launch(shims, shim_config(slow, tmp_path), tmp_path)
        client = admin(shim, tmp_path)
        wait_healthy(client)
        sock = dealer(ctx, shim.endpoint)
        for i in range(10):
            sock.send_multipart([b"", gen_bytes(i)])
        wait_until(lambda: client.call("status")["backends"]["mma"]["inflight"] >= 10, 10.0,
                   "the 10 requests in flight at mma", interval=0.02)

        # Too short a wait: refused (exit 1), the weight stays 0, requests still run.
        short = ctl(shim, "--json", "drain", "mma", "--wait", "0.1")
        assert short.returncode == 1, short.stdout + short.stderr
        reply = json.loads(short.stdout)
        assert reply["error"] == "drain_timeout"
        assert reply["remaining"] > 0
        assert reply["weights"] == {"mma": 0.0, "mms": 100.0}

        done = ctl(shim, "--json", "drain", "mma")
        assert done.returncode == 0, done.stdout + done.stderr
        reply = json.loads(done.stdout)
        assert reply["inflight_at_start"] > 0 and reply["remaining"] == 0
        assert client.call("status")["backends"]["mma"]["inflight"] == 0

        replies: list[dict[str, Any]] = []
        while len(replies) < 10:
            assert sock.poll(10_000), "a request to the drained backend was lost"
            replies.append(json.loads(sock.recv_multipart()[-1]))
        assert [r["response_text"] for r in replies] == ["mma"] * 10
        sock.close(0)
        assert served(ctx, shim.endpoint, 50) == {"mms": 50}
    finally:
        for fake in slow.values():
            fake.kill()


def test_rollback_from_shadow_on_mms_is_one_command(
        fakes: dict[str, Fake], tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]],
        shims: list[ShimProc]) -> None:
    cfg = shim_config(fakes, tmp_path, routing={"mode": "shadow",
                                                "weights": {"mma": 0, "mms": 100}})
    shim = launch(shims, cfg, tmp_path)
    wait_healthy(admin(shim, tmp_path))
    assert served(ctx, shim.endpoint, 200) == {"mms": 200}

    done = ctl(shim, "rollback")
    assert done.returncode == 0, done.stderr
    assert "all traffic to mma, mode split" in done.stdout
    status = ctl_json(shim, "status")
    assert weights_of(status) == {"mma": 100.0, "mms": 0.0}
    assert status["mode"] == "split"
    assert served(ctx, shim.endpoint, 200) == {"mma": 200}


def test_restart_restores_runtime_state_unless_reset(
        fakes: dict[str, Fake], tmp_path: Path, shims: list[ShimProc]) -> None:
    cfg = shim_config(fakes, tmp_path)
    shim = launch(shims, cfg, tmp_path)
    for args in (("weights", "mma=30", "mms=70"), ("mode", "shadow"),
                 ("action", "generate", "--timeout-ms", "3000"),
                 ("shadow", "--percent", "25")):
        done = ctl(shim, *args)
        assert done.returncode == 0, done.stderr
    assert shim.stop() == 0

    shim = launch(shims, cfg, tmp_path)
    status = ctl_json(shim, "status")
    assert weights_of(status) == {"mma": 30.0, "mms": 70.0}
    assert status["mode"] == "shadow"
    assert status["actions"]["generate"]["timeout_ms"] == 3000
    assert status["shadow"]["percent"] == 25.0
    assert set(status["overrides"]) == {"mode", "weights", "shadow.percent",
                                        "actions.generate"}
    assert shim.stop() == 0

    shim = launch(shims, cfg, tmp_path, "--reset-state")
    status = ctl_json(shim, "status")
    assert weights_of(status) == {"mma": 100.0, "mms": 0.0}
    assert status["mode"] == "split" and status["overrides"] == []
    assert shim.stop() == 0
    # The reset sticks: the next plain start does not bring the old state back.
    shim = launch(shims, cfg, tmp_path)
    assert weights_of(ctl_json(shim, "status")) == {"mma": 100.0, "mms": 0.0}


def test_reload_applies_valid_changes_and_an_invalid_file_changes_nothing(
        fakes: dict[str, Fake], tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]],
        shims: list[ShimProc]) -> None:
    cfg = shim_config(fakes, tmp_path)
    shim = launch(shims, cfg, tmp_path)
    wait_healthy(admin(shim, tmp_path))
    assert ctl(shim, "weights", "mma=70", "mms=30").returncode == 0
    before = ctl_json(shim, "status")

    # ctl cannot read the broken file either: it is told where the shim is.
    by_hand = ("--admin", shim.admin_endpoint, "--token-file", str(tmp_path / "state.token"))
    shim.config_path.write_text("{ this is not json")
    assert ctl(shim, "reload").returncode == 2  # usage: --config unreadable
    done = ctl(shim, *by_hand, "reload", config=False)
    assert done.returncode == 1
    assert "invalid_config" in done.stderr and "nothing was changed" in done.stderr
    shim.config_path.write_text(json.dumps({**cfg, "routing": {"weights": {"mma": 0,
                                                                           "mms": 0}}}))
    done = ctl(shim, "reload")
    assert done.returncode == 1 and "routing.weights" in done.stderr
    after = ctl_json(shim, "status")
    assert (after["weights"], after["mode"], after["actions"]) == \
        (before["weights"], before["mode"], before["actions"])

    # A valid edit: runtime parts apply, the weights set at run time stay (the file did
    # not touch them), an endpoint change is reported and not applied.
    edited = json.loads(json.dumps(cfg))
    edited["routing"] = {"mode": "shadow"}
    edited["shadow"]["percent"] = 20
    edited["backends"]["mms"]["endpoints"] = [f"tcp://127.0.0.1:{free_port()}"]
    shim.config_path.write_text(json.dumps(edited))
    reply = ctl_json(shim, "reload")
    assert reply["changes"] == {"mode": ["split", "shadow"], "shadow.percent": [100.0, 20.0]}
    assert reply["restart_required"] == ["backends.mms.endpoints"]
    assert reply["kept_overrides"] == ["weights"]
    status = ctl_json(shim, "status")
    assert weights_of(status) == {"mma": 70.0, "mms": 30.0}
    assert status["mode"] == "shadow"
    assert set(served(ctx, shim.endpoint, 300)) == {"mma", "mms"}  # old endpoint still used

    # --reset makes the file the whole truth.
    reply = ctl_json(shim, "reload", "--reset")
    assert reply["changes"] == {"weights.mma": [70.0, 100.0], "weights.mms": [30.0, 0.0]}
    assert weights_of(ctl_json(shim, "status")) == {"mma": 100.0, "mms": 0.0}


def test_sighup_reloads_the_config_file(
        fakes: dict[str, Fake], tmp_path: Path, ctx: zmq.Context[zmq.Socket[bytes]],
        shims: list[ShimProc]) -> None:
    cfg = shim_config(fakes, tmp_path)
    shim = launch(shims, cfg, tmp_path)
    client = admin(shim, tmp_path)
    wait_healthy(client)
    shim.config_path.write_text(json.dumps(
        {**cfg, "routing": {"weights": {"mma": 0, "mms": 100}}}))
    os.kill(shim.proc.pid, signal.SIGHUP)
    wait_until(lambda: weights_of(client.call("status")) == {"mma": 0.0, "mms": 100.0}, 10.0,
               "the reload on SIGHUP")
    assert served(ctx, shim.endpoint, 100) == {"mms": 100}
    audit = [json.loads(line) for line in
             (tmp_path / "state.audit.jsonl").read_text().splitlines()]
    assert audit[-1]["client"] == "signal:SIGHUP" and audit[-1]["command"] == "reload"
    assert audit[-1]["old"] == {"weights.mma": 100.0, "weights.mms": 0.0}

    # A broken file on SIGHUP is logged and changes nothing; the shim keeps serving.
    # (Waiting for the refusal in the log first makes "changes nothing" able to fail.)
    shim.config_path.write_text("garbage = [")
    os.kill(shim.proc.pid, signal.SIGHUP)
    wait_until(lambda: any("SIGHUP" in line and "refused" in line
                           for line in shim.proc.log().splitlines()), 10.0,
               "the refused reload in the shim's log")
    assert weights_of(client.call("status")) == {"mma": 0.0, "mms": 100.0}
    assert served(ctx, shim.endpoint, 20) == {"mms": 20}
    assert shim.proc.poll() is None


def test_missing_or_wrong_token_is_refused_and_counted(
        fakes: dict[str, Fake], tmp_path: Path, shims: list[ShimProc]) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text("correct horse battery staple\n")
    token_file.chmod(0o600)
    cfg = shim_config(fakes, tmp_path, shim={"admin_token_file": str(token_file)})
    shim = launch(shims, cfg, tmp_path)
    assert not (tmp_path / "state.token").exists()  # a configured token: none generated

    raw = AdminClient(shim.admin_endpoint, "", timeout_s=10)
    reply = raw.call("set_weights", weights={"mma": 0, "mms": 100})
    assert reply["status"] == "error" and reply["error"] == "unauthorized"
    wrong = tmp_path / "wrong-token"
    wrong.write_text("tr0ub4dor&3")
    done = ctl(shim, "--token-file", str(wrong), "weights", "mma=0", "mms=100")
    assert done.returncode == 4 and "unauthorized" in done.stderr
    done = ctl(shim, "rollback", env={"MMSHIM_TOKEN": "nope"})
    assert done.returncode == 4
    # Bad requests get an answer too, and do not wedge the socket.
    assert raw.send(b"\xff not json")["error"] == "bad_request"
    assert raw.send(b"[1, 2]")["error"] == "bad_request"
    raw.close()

    # The right token (found through --config) works, and nothing was changed.
    status = ctl_json(shim, "status")
    assert weights_of(status) == {"mma": 100.0, "mms": 0.0}
    good = AdminClient(shim.admin_endpoint, "correct horse battery staple", timeout_s=10)
    assert good.call("no_such_command")["error"] == "unknown_command"
    assert good.call("set_mode", mode="sideways")["error"] == "bad_request"
    good.close()
    metrics = shim.metrics()
    assert 'shim_admin_denied_total{reason="unauthorized"} 3.0' in metrics
    assert 'shim_admin_denied_total{reason="bad_request"} 2.0' in metrics
    assert "\nshim_admin_changes_total{" not in metrics  # no change was made


def test_no_token_and_a_network_admin_bind_refuses_to_start(
        fakes: dict[str, Fake], tmp_path: Path, shims: list[ShimProc]) -> None:
    port = free_port()
    cfg = shim_config(fakes, tmp_path, shim={"admin": f"tcp://0.0.0.0:{port}"})
    shim = start_shim(cfg, tmp_path, env={"MMSHIM_TOKEN": ""}, wait=False)
    shims.append(shim)
    code = shim.proc.popen.wait(30)
    assert code != 0
    log = shim.proc.log()
    assert "not a loopback address" in log and "no admin token is configured" in log, log

    # A token alone is not enough beyond loopback: CURVE is required as well (its own
    # tests, with a shim that starts, are in test_admin_curve.py).
    shim = start_shim(cfg, tmp_path, env={"MMSHIM_TOKEN": "s3cret-token"}, wait=False)
    shims.append(shim)
    assert shim.proc.popen.wait(30) != 0
    assert "shim.admin_curve_secret_file" in shim.proc.log(), shim.proc.log()


def test_ctl_reports_an_unreachable_shim(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("x")
    done = subprocess.run(
        [sys.executable, "-m", "shim.cli", "ctl", "--admin", f"tcp://127.0.0.1:{free_port()}",
         "--token-file", str(token), "--timeout", "0.5", "status"],
        cwd=ROOT, env=CLEAN_ENV, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "no reply" in done.stderr

"""CURVE on an admin socket bound beyond loopback (issue 12), with real processes.

The admin socket is bound on ``tcp://*:PORT`` (not loopback for shim.config.is_loopback)
and reached through 127.0.0.1, so nothing leaves this machine. Keys are made with
``mmshim keys`` as an operator would make them.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shim.ctl import UNAUTHORIZED, UNREACHABLE, AdminClient
from shim.curve import load_client
from tests.procs import free_port
from tests.shimproc import ROOT, Fake, ShimProc, shim_config, start_shim

CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith("MMSHIM_")}
TOKEN = "s3cret-token"


@pytest.fixture
def shims() -> Iterator[list[ShimProc]]:
    started: list[ShimProc] = []
    yield started
    for shim in started:
        shim.kill()


def mmshim(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shim.cli", *args], cwd=ROOT,
                          env={**CLEAN_ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """The shim's pair, an authorized client's pair (its public key listed) and a
    stranger's pair (not listed), all written by ``mmshim keys``."""
    for directory, name in (("server", "shim"), ("ops", "ops"), ("stranger", "stranger")):
        done = mmshim("keys", str(tmp_path / directory), "--name", name)
        assert done.returncode == 0, done.stderr
    clients = tmp_path / "clients"
    clients.mkdir()
    shutil.copy(tmp_path / "ops" / "ops.key", clients)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o600)
    return {"server_secret": tmp_path / "server" / "shim.key_secret",
            "server_public": tmp_path / "server" / "shim.key", "clients": clients,
            "ops": tmp_path / "ops" / "ops.key_secret",
            "stranger": tmp_path / "stranger" / "stranger.key_secret", "token": token}


def network_config(fakes: dict[str, Fake], tmp_path: Path, **shim: str) -> dict[str, object]:
    return shim_config(fakes, tmp_path, shim={"admin": f"tcp://*:{free_port()}", **shim})


def test_keys_are_written_with_private_secrets(tmp_path: Path, keys: dict[str, Path]) -> None:
    for name in ("server_secret", "ops", "stranger"):
        assert stat.S_IMODE(keys[name].stat().st_mode) == 0o600, name
    assert stat.S_IMODE(keys["server_public"].stat().st_mode) == 0o644
    assert b"secret-key" in keys["ops"].read_bytes()
    assert b"secret-key" not in keys["server_public"].read_bytes()
    # A second run does not overwrite a key.
    before = keys["ops"].read_bytes()
    done = mmshim("keys", str(keys["ops"].parent), "--name", "ops")
    assert done.returncode == 1 and "not overwriting" in done.stderr
    assert keys["ops"].read_bytes() == before


def test_network_admin_without_curve_refuses_to_start(
        fakes: dict[str, Fake], tmp_path: Path, keys: dict[str, Path],
        shims: list[ShimProc]) -> None:
    cases = [({}, ["shim.admin_curve_secret_file", "shim.admin_curve_clients_dir"]),
             ({"admin_curve_secret_file": str(keys["server_secret"])},
              ["shim.admin_curve_clients_dir"]),
             ({"admin_curve_clients_dir": str(keys["clients"])},
              ["shim.admin_curve_secret_file"])]
    for settings, missing in cases:
        cfg = network_config(fakes, tmp_path, admin_token_file=str(keys["token"]),
                             **settings)
        shim = start_shim(cfg, tmp_path, wait=False)
        shims.append(shim)
        assert shim.proc.popen.wait(30) == 2
        line = next(x for x in shim.proc.log().splitlines() if "refusing to start" in x)
        assert "not a loopback address, so CURVE is required" in line, line
        for name in missing:
            assert name in line, line
        if len(missing) == 1:
            other = ({"shim.admin_curve_secret_file", "shim.admin_curve_clients_dir"}
                     - set(missing)).pop()
            assert f"set {other}" not in line, line
    # A public key where the secret one belongs is named too.
    cfg = network_config(fakes, tmp_path, admin_token_file=str(keys["token"]),
                         admin_curve_secret_file=str(keys["server_public"]),
                         admin_curve_clients_dir=str(keys["clients"]))
    shim = start_shim(cfg, tmp_path, wait=False)
    shims.append(shim)
    assert shim.proc.popen.wait(30) == 2
    assert "holds no CURVE secret key" in shim.proc.log()


def test_only_listed_curve_clients_get_in(
        fakes: dict[str, Fake], tmp_path: Path, keys: dict[str, Path],
        shims: list[ShimProc]) -> None:
    cfg = network_config(fakes, tmp_path, admin_token_file=str(keys["token"]),
                         admin_curve_secret_file=str(keys["server_secret"]),
                         admin_curve_clients_dir=str(keys["clients"]))
    shim = start_shim(cfg, tmp_path)
    shims.append(shim)
    remote = ["ctl", "--admin", shim.admin_endpoint, "--token-file", str(keys["token"])]

    # The listed client, with the shim's public key: in.
    done = mmshim(*remote, "--curve-cert", str(keys["ops"]),
                  "--curve-server-key", str(keys["server_public"]), "--json", "status")
    assert done.returncode == 0, done.stderr
    # On the shim's host: the server key from --config, the client's from the environment.
    done = mmshim("ctl", "--config", str(shim.config_path), "weights", "mma=50",
                  env={"MMSHIM_CURVE_CERT": str(keys["ops"])})
    assert done.returncode == 0, done.stderr
    client = AdminClient(shim.admin_endpoint, TOKEN, timeout_s=10,
                         curve=load_client(keys["ops"], keys["server_public"]))
    try:
        assert client.call("status")["weights"] == {"mma": 50.0, "mms": 50.0}
    finally:
        client.close()

    # The token is still checked inside the CURVE session.
    wrong = tmp_path / "wrong-token"
    wrong.write_text("nope")
    done = mmshim("ctl", "--admin", shim.admin_endpoint, "--token-file", str(wrong),
                  "--curve-cert", str(keys["ops"]),
                  "--curve-server-key", str(keys["server_public"]), "status")
    assert done.returncode == UNAUTHORIZED, done.stderr

    # A key the shim does not list, a client that expects another server key, and a
    # client without CURVE get no reply at all: exit 3 (unreachable).
    refused = [["--curve-cert", str(keys["stranger"]),
                "--curve-server-key", str(keys["server_public"])],
               ["--curve-cert", str(keys["ops"]),
                "--curve-server-key", str(tmp_path / "stranger" / "stranger.key")],
               []]
    for curve in refused:
        done = mmshim(*remote, *curve, "--timeout", "1", "weights", "mma=0")
        assert done.returncode == UNREACHABLE and "no reply" in done.stderr, (curve, done)

    # Half the CURVE options is a usage error, not a silent plain connection.
    done = mmshim(*remote, "--curve-server-key", str(keys["server_public"]), "status")
    assert done.returncode == 2 and "--curve-cert" in done.stderr
    # None of the refused clients changed anything.
    done = mmshim(*remote, "--curve-cert", str(keys["ops"]),
                  "--curve-server-key", str(keys["server_public"]), "--json", "status")
    assert done.returncode == 0 and '"mma": 50.0' in done.stdout, done
    # SIGTERM: the CURVE admin socket, its authenticator and its context close cleanly.
    assert shim.stop() == 0, shim.proc.log()

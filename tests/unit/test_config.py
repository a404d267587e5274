"""Config decoding: defaults load, and every kind of mistake names its field."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shim.config import decode_config, load_config, same_endpoint
from shim.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def base() -> dict:
    return {"backends": {"mma": {"dialect": "mma", "endpoints": ["tcp://127.0.0.1:5580"]},
                         "mms": {"dialect": "mms", "endpoints": ["tcp://127.0.0.1:7211"]}},
            "policy": {"fast": "phi-2"}}


def test_default_config_loads_with_policy_from_models_toml() -> None:
    cfg = load_config(ROOT / "config/shim.toml")
    assert cfg.shim.listen == "tcp://*:5570"
    assert cfg.shim.health == "tcp://*:6570"
    assert cfg.backends["mma"].endpoints == ["tcp://127.0.0.1:7224"]  # 5580 is taken
    assert cfg.backends["mms"].health == "tcp://127.0.0.1:8211"
    assert cfg.policy["fast"]  # read from config/models.toml


@pytest.mark.parametrize(("patch", "field"), [
    ({"backends": {"mma": {"dialect": "xyz", "endpoints": ["tcp://127.0.0.1:1"]}}},
     "backends.mma.dialect"),
    ({"routing": {"weights": {"mma": -1, "mms": 0}}}, "routing.weights.mma"),
    ({"routing": {"weights": {"mma": 0, "mms": 0}}}, "routing.weights"),
    ({"routing": {"weights": {"nope": 100}}}, "routing.weights.nope"),
    ({"shim": {"max_request_bytes": "big"}}, "shim.max_request_bytes"),
    ({"shim": {"listne": "tcp://*:1"}}, "listne"),
    ({"actions": {"generate": {"pin": "ghost"}}}, "actions.generate.pin"),
    ({"actions": {"bogus": {}}}, "actions.bogus"),
    ({"shadow": {"percent": 150}}, "shadow.percent"),
    ({"backends": {"mma": {"dialect": "mma", "endpoints": ["udp://x"]}}},
     "backends.mma.endpoints[0]"),
])
def test_bad_field_is_named(patch: dict, field: str) -> None:
    raw = base()
    for key, value in patch.items():
        raw[key] = {**raw.get(key, {}), **value}
    with pytest.raises(ConfigError) as err:
        decode_config(raw)
    assert field in str(err.value)


def test_routing_loop_is_refused() -> None:
    raw = base()
    raw["shim"] = {"listen": "tcp://*:5570"}
    raw["backends"]["mms"]["endpoints"] = ["tcp://localhost:5570"]
    with pytest.raises(ConfigError, match="routing loop"):
        decode_config(raw)


def test_same_endpoint() -> None:
    assert same_endpoint("tcp://*:5570", "tcp://127.0.0.1:5570")
    assert same_endpoint("tcp://0.0.0.0:5570", "tcp://localhost:5570")
    assert not same_endpoint("tcp://*:5570", "tcp://127.0.0.1:5571")
    assert not same_endpoint("tcp://10.0.0.1:5570", "tcp://10.0.0.2:5570")


def test_check_config_cli(tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "shim.cli", "check-config", "config/shim.toml"],
                        cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[backends.mma]\ndialect = "mma"\nendpoints = ["tcp://127.0.0.1:1"]\n'
                   'timeout_ms = "soon"\n')
    out = subprocess.run([sys.executable, "-m", "shim.cli", "check-config", str(bad)],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert "backends.mma.timeout_ms" in out.stderr
    assert "Traceback" not in out.stderr

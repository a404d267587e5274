"""deploy/compose and deploy/systemd parse, and agree with the configs: the ports the
compose override publishes are the ones config/shim.toml gives the shim and MMS (read from
the config, not repeated here), the compose shim config is valid and reaches the services
on their container ports, and the commands are ones ``mmshim`` accepts."""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path
from typing import Any

import yaml

from shim.cli import build_parser
from shim.config import load_config
from tests.shimproc import ROOT

COMPOSE_DIR = ROOT / "deploy" / "compose"
UNIT = ROOT / "deploy" / "systemd" / "mmshim.service"
#: Host ports that belong to other agents in the deployed stack (protocol.md, last section).
TAKEN_IN_DEPLOYED_STACK = {5580, 5581, 5590}


class _Loader(yaml.SafeLoader):
    """Compose's ``!override`` / ``!reset`` tags read as plain values."""


_Loader.add_constructor("!override", lambda loader, node: loader.construct_sequence(node)
                        if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node))


def port_of(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def published(service: dict[str, Any]) -> dict[int, int]:
    """host port -> container port of a compose service's ``ports``."""
    out = {}
    for spec in service.get("ports", []):
        parts = str(spec).split(":")
        out[int(parts[-2])] = int(parts[-1])
    return out


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.load((COMPOSE_DIR / "docker-compose.mmshim.yml").read_text(),
                                    Loader=_Loader)
    return doc


def test_compose_ports_match_the_configs() -> None:
    services = compose()["services"]
    default = load_config(ROOT / "config" / "shim.toml")
    deployed = load_config(COMPOSE_DIR / "shim.toml")
    shim_ports = published(services["mmshim"])
    # The shim holds the legacy endpoint on the ports the config gives it.
    for endpoint in (default.shim.listen, default.shim.health):
        assert shim_ports.get(port_of(endpoint)) == port_of(endpoint), (endpoint, shim_ports)
    assert (port_of(deployed.shim.listen), port_of(deployed.shim.health)) == \
        (port_of(default.shim.listen), port_of(default.shim.health))
    # Metrics published to the host's loopback only.
    metrics_port = deployed.shim.metrics.rsplit(":", 1)[1]
    assert f"127.0.0.1:{metrics_port}:{metrics_port}" in services["mmshim"]["ports"]
    # MMS keeps its own ports; the shim reaches it there.
    mms = default.backends["mms"]
    mms_ports = published(services["mms"])
    for endpoint in (mms.endpoints[0], mms.health):
        assert mms_ports.get(port_of(endpoint)) == port_of(endpoint)
    assert [port_of(e) for e in deployed.backends["mms"].endpoints] == \
        [port_of(mms.endpoints[0])]
    # MMA moved off the shim's ports; the shim reaches its container port by name.
    mma_ports = published(services["mma"])
    assert not set(mma_ports) & set(shim_ports), "MMA still publishes the shim's ports"
    assert port_of(deployed.backends["mma"].endpoints[0]) in mma_ports.values()
    assert deployed.backends["mma"].endpoints[0].startswith("tcp://mma:")
    for name, service in services.items():
        assert not set(published(service)) & TAKEN_IN_DEPLOYED_STACK, name
        assert "healthcheck" in service, f"{name} has no health check"


def test_compose_command_is_one_mmshim_accepts_on_the_mounted_config() -> None:
    shim = compose()["services"]["mmshim"]
    command = shim["command"]
    assert command[0] == "mmshim"
    args = build_parser().parse_args(command[1:])
    assert args.command == "run"
    mounts = {v.split(":")[1]: v.split(":")[0] for v in shim["volumes"] if v.startswith("./")}
    assert (COMPOSE_DIR / mounts[args.config]).is_file()
    assert "6570" in " ".join(shim["healthcheck"]["test"])  # probes the shim's health port


def test_systemd_unit_runs_mmshim_hardened_and_stops_after_the_drain() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(UNIT)
    service = unit["Service"]
    argv = shlex.split(service["ExecStart"])
    assert Path(argv[0]).name == "mmshim"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "run" and args.config == "/etc/mmshim/shim.toml"
    check = shlex.split(service["ExecStartPre"])
    assert build_parser().parse_args(check[1:]).command == "check-config"
    assert service["KillSignal"] == "SIGTERM"
    drain = load_config(ROOT / "config" / "shim.toml").shim.drain_timeout_s
    assert float(service["TimeoutStopSec"]) > drain + 5, "systemd would kill a draining shim"
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("PrivateTmp", "yes"), ("StateDirectory", "mmshim"), ("UMask", "0077"),
                       ("CapabilityBoundingSet", "")):
        assert service.get(key) == value, key
    assert set(service["RestrictAddressFamilies"].split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert unit["Install"]["WantedBy"] == "multi-user.target"

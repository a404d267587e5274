"""shim.curve's settings check: where CURVE is required, and what a bad setting says."""

from __future__ import annotations

from pathlib import Path

import pytest

from shim.config import ShimSection
from shim.curve import load_client, resolve_server, write_key_pair
from shim.errors import ConfigError


def test_curve_is_off_on_loopback_and_ipc_unless_configured() -> None:
    for admin in ("tcp://127.0.0.1:9571", "tcp://127.0.0.2:9571", "ipc:///tmp/admin.sock"):
        assert resolve_server(ShimSection(admin=admin)) is None


@pytest.mark.parametrize("admin", ["tcp://*:9571", "tcp://0.0.0.0:9571",
                                   "tcp://10.0.0.5:9571"])
def test_beyond_loopback_each_missing_setting_is_named(admin: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"admin_curve_secret_file and shim\.admin_curve_"):
        resolve_server(ShimSection(admin=admin))
    _, secret = write_key_pair(tmp_path, "shim")
    with pytest.raises(ConfigError, match=r"CURVE is required: set shim.admin_curve_clients_"
                                          r"dir \("):
        resolve_server(ShimSection(admin=admin, admin_curve_secret_file=str(secret)))


def test_half_configured_on_loopback_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"half configured: set shim\.admin_curve_secret"):
        resolve_server(ShimSection(admin_curve_clients_dir=str(tmp_path)))


def test_unusable_files_are_named(tmp_path: Path) -> None:
    public, secret = write_key_pair(tmp_path / "keys", "shim")
    clients = tmp_path / "clients"
    clients.mkdir()
    net = "tcp://*:9571"
    with pytest.raises(ConfigError, match=r"admin_curve_secret_file: .* no CURVE secret key"):
        resolve_server(ShimSection(admin=net, admin_curve_secret_file=str(public),
                                   admin_curve_clients_dir=str(clients)))
    with pytest.raises(ConfigError, match="admin_curve_secret_file: cannot read"):
        resolve_server(ShimSection(admin=net, admin_curve_secret_file=str(tmp_path / "none"),
                                   admin_curve_clients_dir=str(clients)))
    with pytest.raises(ConfigError, match=r"admin_curve_clients_dir: .* is not a directory"):
        resolve_server(ShimSection(admin=net, admin_curve_secret_file=str(secret),
                                   admin_curve_clients_dir=str(public)))
    server = resolve_server(ShimSection(admin=net, admin_curve_secret_file=str(secret),
                                        admin_curve_clients_dir=str(clients)))
    assert server is not None and server.clients == 0 and len(server.secret) == 40
    with pytest.raises(ValueError, match="no CURVE secret key"):
        load_client(public, public)

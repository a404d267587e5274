"""CURVE security for the admin socket when it is bound beyond loopback (issue 12).

ZeroMQ's own CURVE mechanism (https://rfc.zeromq.org/spec/26/, pyzmq's ``zmq.auth``)
authenticates both ends by their Curve25519 keys and encrypts every frame, so neither
the admin token nor a command crosses the network in clear. Keys are the certificate
files ``zmq.auth.create_certificates`` writes: ``NAME.key`` (public key only) and
``NAME.key_secret`` (public and secret key); ``mmshim keys DIR`` makes a pair.

Where it is required: a ``tcp://`` admin endpoint that is not on loopback (see
``shim.config.is_loopback``; ``tcp://*:PORT`` and ``tcp://0.0.0.0:PORT`` are not). There the
shim refuses to start unless ``shim.admin_curve_secret_file`` (the server's
``.key_secret``) and ``shim.admin_curve_clients_dir`` (the authorized clients' ``.key``
files) are both set. On loopback and ipc it is used when both are set, and not otherwise.
The admin token is checked as well (defence in depth).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

from shim.config import ShimSection, is_loopback
from shim.errors import ConfigError

log = logging.getLogger("mmshim.curve")

#: The ZAP domain of the admin socket; the authenticator allows the listed keys in it.
ZAP_DOMAIN = "mmshim-admin"
CERT_ENV = "MMSHIM_CURVE_CERT"
SERVER_KEY_ENV = "MMSHIM_CURVE_SERVER_KEY"


@dataclass(frozen=True, slots=True)
class CurveServer:
    """The admin socket's key pair (z85 text, 40 bytes each) and who may connect."""

    public: bytes
    secret: bytes
    clients_dir: Path
    clients: int


@dataclass(frozen=True, slots=True)
class CurveClient:
    """A client's key pair and the server's public key it expects (z85, 40 bytes each)."""

    public: bytes
    secret: bytes
    server_public: bytes


def load_public(path: Path) -> bytes:
    """The public key in a ``.key`` or ``.key_secret`` file; ValueError if unusable."""
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read CURVE certificate {path}: {exc}") from None
    if not public:
        raise ValueError(f"{path} holds no CURVE public key")
    return public


def load_secret(path: Path) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` file; ValueError if it has no secret key."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read CURVE certificate {path}: {exc}") from None
    if not public or not secret:
        raise ValueError(f"{path} holds no CURVE secret key (give the .key_secret file "
                         "that `mmshim keys` wrote)")
    with contextlib.suppress(OSError):
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("CURVE secret key file %s is readable by other users (chmod 600)",
                        path)
    return public, secret


def resolve_server(shim: ShimSection) -> CurveServer | None:
    """The admin socket's CURVE settings, None where it runs without CURVE.

    Raises ConfigError (one line, naming the setting) when the admin endpoint is beyond
    loopback and a setting is missing, when only one of the two is set, or when a file
    cannot be used.
    """
    settings = {"shim.admin_curve_secret_file": shim.admin_curve_secret_file,
                "shim.admin_curve_clients_dir": shim.admin_curve_clients_dir}
    missing = [name for name, value in settings.items() if not value]
    if len(missing) == 2 and is_loopback(shim.admin):
        return None
    if missing:
        if is_loopback(shim.admin):
            why, tail = "and CURVE is half configured", "or neither"
        else:
            why = "which is not a loopback address, so CURVE is required"
            tail = "refusing to open the admin socket to the network without it"
        raise ConfigError(f"shim.admin is {shim.admin}, {why}: set {' and '.join(missing)} "
                          f"(keys from `mmshim keys DIR`); {tail}")
    try:
        public, secret = load_secret(Path(shim.admin_curve_secret_file))
    except ValueError as exc:
        raise ConfigError(f"shim.admin_curve_secret_file: {exc}") from None
    clients_dir = Path(shim.admin_curve_clients_dir)
    if not clients_dir.is_dir():
        raise ConfigError(f"shim.admin_curve_clients_dir: {clients_dir} is not a directory")
    try:
        clients = len(zmq.auth.load_certificates(clients_dir))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"shim.admin_curve_clients_dir: cannot read {clients_dir}: "
                          f"{exc}") from None
    if not clients:
        log.warning("no client keys (*.key) in %s: every admin client will be refused",
                    clients_dir)
    return CurveServer(public, secret, clients_dir, clients)


def make_server_socket(sock: zmq.Socket[Any], server: CurveServer) -> None:
    """Make ``sock`` (not yet bound) a CURVE server in the admin ZAP domain."""
    sock.curve_server = True
    sock.curve_publickey = server.public
    sock.curve_secretkey = server.secret
    sock.zap_domain = ZAP_DOMAIN.encode()


def make_client_socket(sock: zmq.Socket[Any], client: CurveClient) -> None:
    """Make ``sock`` (not yet connected) a CURVE client of the server key it names."""
    sock.curve_publickey = client.public
    sock.curve_secretkey = client.secret
    sock.curve_serverkey = client.server_public


def load_client(cert_file: Path, server_key_file: Path) -> CurveClient:
    """A client from its ``.key_secret`` file and the server's ``.key`` (or
    ``.key_secret``) file; ValueError naming the file when one cannot be used."""
    public, secret = load_secret(cert_file)
    return CurveClient(public, secret, load_public(server_key_file))


# -- `mmshim keys DIR`: a key pair ---------------------------------------------------------

def write_key_pair(directory: Path, name: str) -> tuple[Path, Path]:
    """Write ``NAME.key`` (mode 0644) and ``NAME.key_secret`` (mode 0600) in ``directory``
    with ``zmq.auth.create_certificates``; FileExistsError rather than overwrite a key."""
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise FileExistsError(f"{path} exists; not overwriting a key")
    directory.mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)  # the secret is never readable by others, not even briefly
    try:
        made_public, made_secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(made_secret, 0o600)
    os.chmod(made_public, 0o644)
    return Path(made_public), Path(made_secret)


def cmd_keys(args: argparse.Namespace) -> int:
    try:
        public, secret = write_key_pair(Path(args.directory), args.name)
    except (OSError, FileExistsError) as exc:
        print(f"mmshim keys: {exc}", file=sys.stderr)
        return 1
    print(f"public key: {public}\nsecret key: {secret} (mode 0600; keep it private)")
    return 0


def add_keys_parser(sub: Any) -> None:
    """Add ``keys`` to ``mmshim``'s subparsers."""
    p = sub.add_parser(
        "keys", help="write a CURVE key pair for the admin socket",
        description="Write NAME.key (public) and NAME.key_secret (secret, mode 0600) in "
                    "DIRECTORY with zmq.auth.create_certificates. The shim's pair: its "
                    ".key_secret is shim.admin_curve_secret_file, its .key goes to each "
                    "client (ctl --curve-server-key). A client's pair: its .key goes in "
                    "shim.admin_curve_clients_dir, its .key_secret is ctl --curve-cert.")
    p.add_argument("directory", metavar="DIRECTORY")
    p.add_argument("--name", default="admin", help="file name stem (default: admin)")
    p.set_defaults(func=cmd_keys)

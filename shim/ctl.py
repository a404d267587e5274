"""``mmshim ctl``: change a running shim from a shell, one command per change.

Talks to the admin socket (see shim.admin for the wire protocol). The endpoint and the
token come from the options, else the environment, else the shim's config file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import zmq

from shim.admin import TOKEN_ENV, generated_token_path, read_token_file
from shim.config import ACTIONS, ShimSection, is_loopback
from shim.curve import CERT_ENV, SERVER_KEY_ENV, CurveClient, load_client, make_client_socket
from shim.errors import NoToken, Unreachable, UsageError
from shim.settings import ActionRule, ShadowSettings, add_flags, flag_values

ADMIN_ENV = "MMSHIM_ADMIN"
CONFIG_ENV = "MMSHIM_CONFIG"
DEFAULT_CONFIG = "config/shim.toml"

#: Exit codes scripts can rely on.
OK, REFUSED, USAGE, UNREACHABLE, UNAUTHORIZED = 0, 1, 2, 3, 4

EPILOG = f"""\
exit codes:
  {OK}  done
  {REFUSED}  refused: the shim understood the command and did not carry it out
     (invalid value, unknown backend, drain timeout, broken config on reload)
  {USAGE}  usage error (bad arguments, unreadable --config)
  {UNREACHABLE}  no answer from the admin socket (shim not running, wrong endpoint, timeout;
     also a CURVE key the shim does not list, or no CURVE where the shim requires it)
  {UNAUTHORIZED}  unauthorized (missing or wrong token)

where the endpoint comes from: --admin, ${ADMIN_ENV}, shim.admin in --config.
where the token comes from: --token-file, ${TOKEN_ENV}, shim.admin_token_file in --config,
the token a shim without one generated next to its state file (<state_file>.token).
CURVE (an admin socket beyond loopback): --curve-cert (else ${CERT_ENV}) is this client's
.key_secret file; --curve-server-key (else ${SERVER_KEY_ENV}, else the public half of
shim.admin_curve_secret_file in --config) is the shim's public .key file.
"""


class AdminClient:
    """A blocking client for the admin socket: one REQ socket, renewed after a timeout."""

    def __init__(self, endpoint: str, token: str, timeout_s: float = 5.0,
                 ctx: zmq.Context[zmq.Socket[bytes]] | None = None,
                 curve: CurveClient | None = None) -> None:
        self.endpoint = endpoint
        #: Keys for a CURVE admin socket (shim.curve); None: a plain connection.
        self.curve = curve
        self.token = token
        self.timeout_s = timeout_s
        self._ctx = ctx or zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None

    def call(self, command: str, /, **args: Any) -> dict[str, Any]:
        """``request`` with the arguments as keywords: ``call("drain", backend="mma")``."""
        return self.request(command, args)

    def request(self, command: str, args: dict[str, Any],
                timeout_s: float | None = None) -> dict[str, Any]:
        """Send one command; the decoded reply (``status`` ok or error), or Unreachable."""
        request = {**args, "command": command, "token": self.token}
        return self.send(msgspec.json.encode(request), timeout_s)

    def send(self, payload: bytes, timeout_s: float | None = None) -> dict[str, Any]:
        """Send raw bytes (tests use this for malformed requests)."""
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.REQ)
            self._sock.setsockopt(zmq.LINGER, 0)
            if self.curve is not None:
                make_client_socket(self._sock, self.curve)
            self._sock.connect(self.endpoint)
        sock = self._sock
        sock.send(payload)
        wait = self.timeout_s if timeout_s is None else timeout_s
        if not sock.poll(int(wait * 1000)):
            self.close()  # a REQ that missed its reply can never send again
            raise Unreachable(f"no reply from {self.endpoint} within {wait:g} s "
                              "(is the shim running? is this its admin endpoint?)")
        reply = msgspec.json.decode(sock.recv())
        return reply if isinstance(reply, dict) else {"status": "error", "error": "bad_reply",
                                                      "message": f"reply is {reply!r}"}

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None


# -- where the shim is -------------------------------------------------------------------

def read_shim_section(path: Path) -> ShimSection:
    """The ``[shim]`` table of a config file, paths resolved like the shim resolves them.

    Only this table is read: ctl must work where the shim's model files are not.
    """
    text = path.read_text()
    raw = msgspec.json.decode(text) if path.suffix == ".json" else tomllib.loads(text)
    section = msgspec.convert(raw.get("shim", {}), ShimSection, strict=False)
    resolved = {}
    for field in ("state_file", "admin_token_file", "admin_curve_secret_file"):
        value = getattr(section, field)
        if value and not Path(value).is_absolute():
            resolved[field] = str((path.parent / value).resolve())
    return msgspec.structs.replace(section, **resolved)


def connectable(endpoint: str) -> str:
    """A bind address as a client can reach it: wildcards become loopback."""
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[6:].rpartition(":")
        if host in ("*", "0.0.0.0", "", "[::]", "::"):
            return f"tcp://127.0.0.1:{port}"
    return endpoint


def resolve_target(args: argparse.Namespace) -> tuple[str, str]:
    """(endpoint, token) from the options, else the environment, else the config file.

    The config file is read only for what the options and the environment leave open, so
    ``--admin`` and ``--token-file`` still work while the file is broken (say, to ask the
    shim why a reload failed).
    """
    endpoint = getattr(args, "admin", None) or os.environ.get(ADMIN_ENV)
    token_file = getattr(args, "token_file", None)
    token = None
    if token_file:
        try:
            token = read_token_file(Path(token_file))
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    elif os.environ.get(TOKEN_ENV, "").strip():
        token = os.environ[TOKEN_ENV].strip()
    if endpoint and token:
        return endpoint, token
    section = _config_section(getattr(args, "config", None))
    endpoint = endpoint or connectable(section.admin)
    if token:
        return endpoint, token
    candidates = [Path(section.admin_token_file)] if section.admin_token_file else []
    candidates.append(generated_token_path(section))
    for candidate in candidates:
        try:
            return endpoint, read_token_file(candidate)
        except ValueError:
            continue
    raise NoToken("no admin token: give --token-file or set "
                  f"{TOKEN_ENV} (looked in {', '.join(map(str, candidates))})")


def _config_section(config: str | None) -> ShimSection:
    path = Path(config or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    try:
        return read_shim_section(path)
    except (OSError, ValueError, msgspec.ValidationError) as exc:
        if config:  # named explicitly: its problems are the user's to fix
            raise UsageError(f"cannot read --config {path}: {exc} (--admin and --token-file "
                             "do without it)") from None
    section = ShimSection()  # the defaults, relative to here
    return msgspec.structs.replace(section, state_file=str(Path(section.state_file).resolve()))


def resolve_curve(args: argparse.Namespace) -> CurveClient | None:
    """The CURVE keys to connect with: None when neither this client's certificate nor
    the shim's public key is given anywhere. UsageError when only one is, or a file
    cannot be used (see EPILOG for where each comes from)."""
    cert = getattr(args, "curve_cert", None) or os.environ.get(CERT_ENV, "").strip()
    server = getattr(args, "curve_server_key", None) or \
        os.environ.get(SERVER_KEY_ENV, "").strip()
    if cert and not server:
        section = _config_section(getattr(args, "config", None))
        server = section.admin_curve_secret_file  # its public half is the server key
    if not cert and not server:
        return None
    if not cert or not server:
        raise UsageError("CURVE needs both --curve-cert (this client's .key_secret) and "
                         "--curve-server-key (the shim's .key)")
    try:
        return load_client(Path(cert), Path(server))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# -- commands: argv -> request --------------------------------------------------------------

Request = tuple[str, dict[str, Any]]


def _pairs(values: Sequence[str], what: str) -> dict[str, str]:
    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise UsageError(f"expected {what}, got {item!r}")
        out[name] = value
    return out


def req_weights(args: argparse.Namespace) -> Request:
    weights: dict[str, float] = {}
    for name, value in _pairs(args.weights, "BACKEND=WEIGHT").items():
        try:
            weights[name] = float(value)
        except ValueError:
            raise UsageError(f"weight for {name} is not a number: {value!r}") from None
    return "set_weights", {"weights": weights}


def req_shadow(args: argparse.Namespace) -> Request:
    body: dict[str, Any] = flag_values(args, ShadowSettings)
    mirror = _pairs(args.mirror, "ACTION=always|if_loaded|never")
    if mirror:
        body["mirror"] = mirror
    if not body:
        raise UsageError("ctl shadow: nothing to change (see --help)")
    return "set_shadow", body


def req_action(args: argparse.Namespace) -> Request:
    body: dict[str, Any] = {"action": args.action}
    if args.reset:
        body["reset"] = True
    body.update(flag_values(args, ActionRule))
    if len(body) == 1:
        raise UsageError("ctl action: nothing to change (see --help)")
    return "set_action", body


def req_call(args: argparse.Namespace) -> Request:
    try:
        body = msgspec.json.decode(args.arguments) if args.arguments else {}
    except msgspec.DecodeError as exc:
        raise UsageError(f"arguments are not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise UsageError("arguments must be a JSON object")
    return args.name, body


# -- replies -> text ---------------------------------------------------------------------

def _num(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
                     .rstrip() for row in rows)


def show_changes(reply: dict[str, Any]) -> str:
    changes = reply.get("changes") or {}
    if not changes:
        return "no change"
    return "\n".join(f"  {path}: {_num(old)} -> {_num(new)}"
                     for path, (old, new) in changes.items())


def show_status(reply: dict[str, Any]) -> str:
    lines = [f"mode {reply['mode']}   safe backend {reply['safe_backend']}   "
             f"up {reply['uptime_s']:.0f} s   "
             f"overrides: {', '.join(reply['overrides']) or 'none'}", ""]
    rows = [["BACKEND", "DIALECT", "WEIGHT", "SHARE", "HEALTHY", "IN-FLIGHT"]]
    for name, b in reply["backends"].items():
        rows.append([name, b["dialect"], _num(b["weight"]), f"{b['share']:.2f}%",
                     "yes" if b["healthy"] else "NO", str(b["inflight"])])
    lines += [_table(rows), ""]
    s = reply["shadow"]
    lines.append(f"shadow: {_num(s['percent'])}% of requests, "
                 f"{'sticky' if s['sticky'] else 'not sticky'}, at most {s['max_inflight']} "
                 f"in flight, timeout {s['timeout_ms']} ms")
    rows = [["ACTION", "TIMEOUT", "FAILOVER", "PIN", "TRANSLATE", "MIRROR"]]
    for name, r in reply["actions"].items():
        rows.append([name, f"{r['timeout_ms']} ms", "on" if r["failover"] else "off",
                     r["pin"] or "-", "on" if r["translate"] else "off", r["mirror"]])
    lines += ["", _table(rows), ""]
    counts = "   ".join(f"{k} {v}" for k, v in reply["counts"].items())
    lines.append(f"{counts}   in flight {reply['inflight']}")
    own = reply.get("ownership")
    if isinstance(own, dict):
        lines += ["", _show_ownership(own)]
    # Sections other components add (shadow activity, rollout, ...): one line each.
    for key, value in reply.items():
        if key in _STATUS_SHOWN or key == "ownership":
            continue
        lines.append(f"{key.replace('_', ' ')}: {_plain(value)}")
    return "\n".join(lines)


#: Keys of the status reply that show_status lays out itself.
_STATUS_SHOWN = frozenset({"status", "command", "id", "mode", "safe_backend", "uptime_s",
                           "overrides", "backends", "shadow", "actions", "counts", "inflight",
                           "weights", "accepting", "config_path"})


def _plain(value: Any) -> str:
    """A nested JSON value as ``key value, key value`` text (no braces or quotes)."""
    if isinstance(value, dict):
        return ", ".join(f"{str(k).replace('_', ' ')} {_plain(v)}"
                         for k, v in value.items()) or "none"
    if isinstance(value, list):
        return ", ".join(_plain(v) for v in value) or "none"
    return _num(value)


def _show_ownership(own: dict[str, Any]) -> str:
    owners: dict[str, str] = own.get("owners") or {}
    moving: dict[str, str] = own.get("moving") or {}
    lines = ["models: " + (", ".join(f"{m} on {b}" for m, b in owners.items()) or "none")]
    if moving:
        lines.append("hand-overs: " + ", ".join(f"{m} {how}" for m, how in moving.items()))
    rest = {k: v for k, v in own.items() if k not in ("owners", "moving")}
    if rest:
        lines.append("ownership: " + _plain(rest))
    return "\n".join(lines)


def show_drain(reply: dict[str, Any]) -> str:
    return (f"drained {reply['backend']}: {reply['inflight_at_start']} in flight at start, "
            f"{reply['remaining']} remaining after {reply['waited_s']:g} s\n"
            + show_changes(reply))


def show_rollback(reply: dict[str, Any]) -> str:
    return (f"rolled back: all traffic to {reply['safe_backend']}, mode {reply['mode']}\n"
            + show_changes(reply))


def show_reload(reply: dict[str, Any]) -> str:
    lines = [f"reloaded {reply['config_path']}", show_changes(reply)]
    if reply.get("kept_overrides"):
        lines.append("kept run-time changes: " + ", ".join(reply["kept_overrides"])
                     + " (reload --reset drops them)")
    if reply.get("restart_required"):
        lines.append("NOT applied, need a restart: " + ", ".join(reply["restart_required"]))
    return "\n".join(lines)


def show_diffs(reply: dict[str, Any]) -> str:
    return f"diff log: {reply.get('diff_log')}\n{reply.get('text', '')}"


def req_record(args: argparse.Namespace) -> Request:
    if args.record_action != "start" and (args.percent is not None or args.max_bytes is not None):
        raise UsageError("ctl record: --percent and --max-bytes go with start")
    body: dict[str, Any] = {k: v for k, v in (("percent", args.percent),
                                               ("max_bytes", args.max_bytes)) if v is not None}
    return f"record_{args.record_action}", body


def show_record(reply: dict[str, Any]) -> str:
    state = "recording" if reply.get("active") else "not recording"
    return (f"{state}: {_num(reply.get('percent'))}% to {reply.get('path')} "
            f"(rotates at {reply.get('max_bytes')} bytes, {reply.get('backups')} backups; "
            f"payloads {'kept' if reply.get('payloads') else 'redacted'}); "
            f"written {reply.get('written')}, shed {reply.get('shed')}")


def show_json(reply: dict[str, Any]) -> str:
    return msgspec.json.format(msgspec.json.encode(reply, order="sorted"), indent=2).decode()


# -- the parser --------------------------------------------------------------------------

def _common_options() -> argparse.ArgumentParser:
    """Options accepted before or after the command (``ctl --json status`` or
    ``ctl status --json``); SUPPRESS keeps a later level from resetting an earlier one."""
    p = argparse.ArgumentParser(add_help=False)
    s = argparse.SUPPRESS
    p.add_argument("--admin", default=s, metavar="ENDPOINT",
                   help=f"admin endpoint (default: ${ADMIN_ENV}, else shim.admin in --config)")
    p.add_argument("--token-file", default=s, metavar="FILE",
                   help=f"file holding the admin token (default: ${TOKEN_ENV}, else from "
                        "the config)")
    p.add_argument("--config", default=s, metavar="FILE",
                   help=f"the shim's config file (default: ${CONFIG_ENV}, else "
                        f"{DEFAULT_CONFIG})")
    p.add_argument("--curve-cert", default=s, metavar="FILE",
                   help=f"this client's CURVE secret certificate (.key_secret, from `mmshim "
                        f"keys`) for a shim whose admin socket is beyond loopback "
                        f"(default: ${CERT_ENV})")
    p.add_argument("--curve-server-key", default=s, metavar="FILE",
                   help=f"the shim's public CURVE certificate (.key) (default: "
                        f"${SERVER_KEY_ENV}, else shim.admin_curve_secret_file in --config)")
    p.add_argument("--json", action="store_true", default=s,
                   help="print the raw JSON reply (for scripts)")
    p.add_argument("--timeout", type=float, default=s, metavar="S",
                   help="seconds to wait for the reply (default 5)")
    return p


Builder = Callable[[argparse.Namespace], Request]
Renderer = Callable[[dict[str, Any]], str]


#: Adds commands through ``add_ctl_parser``'s ``command`` helper (``ctl rollout``:
#: shim.rollout.cli.add_ctl_command), so ctl need not import its extensions.
Extension = Callable[[Callable[..., argparse.ArgumentParser]], None]


def add_ctl_parser(sub: Any, extensions: Sequence[Extension] = ()) -> argparse.ArgumentParser:
    """Add ``ctl`` and its commands (and the ``extensions``') to ``mmshim``'s
    subparsers."""
    common = _common_options()
    ctl: argparse.ArgumentParser = sub.add_parser(
        "ctl", parents=[common], help="change a running shim",
        description="Change a running shim through its admin socket.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = ctl.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")

    def command(name: str, help: str, build: Builder, show: Renderer = show_changes,
                **kw: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = commands.add_parser(
            name, parents=[common], help=help, description=help, epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
        p.set_defaults(build=build, show=show)
        return p

    command("status", "weights, mode, backends, counters", lambda a: ("status", {}),
            show_status)
    command("get-config", "the config file as loaded, and the run-time changes",
            lambda a: ("get_config", {}), show_json)
    p = command("weights", "set routing weights (backends left out keep theirs)",
                req_weights)
    p.add_argument("weights", nargs="+", metavar="BACKEND=WEIGHT", help="e.g. mma=90 mms=10")
    p = command("mode", "split traffic, or also mirror it to the other backend",
                lambda a: ("set_mode", {"mode": a.mode}))
    p.add_argument("mode", choices=["split", "shadow"])
    p = command("shadow", "shadow settings and per-action mirror policies", req_shadow)
    add_flags(p, ShadowSettings)  # one flag per field (shim.settings)
    p.add_argument("--mirror", action="append", default=[],
                   metavar="ACTION=always|if_loaded|never", help="repeatable")
    p = command("action", "per-action rule: timeout, failover, pin, translate, mirror",
                req_action)
    p.add_argument("action", choices=ACTIONS)
    add_flags(p, ActionRule)  # one flag per field (shim.settings)
    p.add_argument("--reset", action="store_true", help="back to the config file's rule")
    p = command("drain", "weight to 0, then wait until its requests in flight finish",
                lambda a: ("drain", {"backend": a.backend, "timeout_s": a.drain_timeout}),
                show_drain)
    p.add_argument("backend")
    p.add_argument("--wait", dest="drain_timeout", type=float, default=30.0, metavar="S",
                   help="give up waiting after S seconds (default 30; exit 1 if not drained)")
    command("rollback", "all traffic to the safe backend, mode split, in one step",
            lambda a: ("rollback", {}), show_rollback)
    p = command("release", "forget a model's owner (one you know no longer holds it)",
                lambda a: ("release", {"model": a.model, "from_backend": a.from_backend}),
                show_json)
    p.add_argument("model")
    p.add_argument("--from", dest="from_backend", metavar="BACKEND",
                   help="release only if this backend is the owner")
    p = command("reload", "re-read the config file (like SIGHUP)",
                lambda a: ("reload", {"reset": a.reset}), show_reload)
    p.add_argument("--reset", action="store_true",
                   help="also drop run-time changes: the file becomes the whole truth")
    p = command("diffs", "shadow comparisons so far: mismatch rate and paths per action",
                lambda a: ("diffs", {"top": a.top}), show_diffs)
    p.add_argument("--top", type=int, default=5, help="differing paths shown per action")
    p = command("record", "record exchanges to the capture file (mmshim replay reads it)",
                req_record, show_record)
    p.add_argument("record_action", choices=["start", "stop", "status"],
                   metavar="start|stop|status")
    p.add_argument("--percent", type=float, help="share of conversations recorded (0..100]")
    p.add_argument("--max-bytes", type=int, metavar="N",
                   help="rotate the capture file at N bytes")
    for extend in extensions:
        extend(command)  # e.g. `ctl rollout ...`: shim.rollout.cli
    p = command("call", "send any admin command (e.g. one an addon registered)", req_call,
                show_json)
    p.add_argument("name", metavar="COMMAND")
    p.add_argument("arguments", nargs="?", metavar="JSON", help='e.g. \'{"limit": 10}\'')
    ctl.set_defaults(func=run)
    return ctl


# -- running -----------------------------------------------------------------------------

def run(args: argparse.Namespace) -> int:
    """Build the request, send it, print the reply; returns the exit code."""
    as_json = bool(getattr(args, "json", False))
    try:
        command, body = args.build(args)
        endpoint, token = resolve_target(args)
        curve = resolve_curve(args)
    except UsageError as exc:
        print(f"mmshim ctl: {exc}", file=sys.stderr)
        return USAGE
    except NoToken as exc:
        print(f"mmshim ctl: {exc}", file=sys.stderr)
        return UNAUTHORIZED
    timeout = float(getattr(args, "timeout", 5.0))
    if command == "drain":
        timeout += float(body["timeout_s"])
    client = AdminClient(endpoint, token, timeout, curve=curve)
    if curve is None and endpoint.startswith("tcp://") and not is_loopback(endpoint):
        print(f"mmshim ctl: note: {endpoint} is not loopback; a shim there requires CURVE "
              "(--curve-cert and --curve-server-key)", file=sys.stderr)
    try:
        reply = client.request(command, body)
    except Unreachable as exc:
        print(f"mmshim ctl: {exc}", file=sys.stderr)
        return UNREACHABLE
    finally:
        client.close()
    ok = reply.get("status") == "ok"
    if as_json:
        print(show_json(reply))
    elif ok:
        print(args.show(reply))
    else:
        print(f"mmshim ctl: {command}: {reply.get('error')}: {reply.get('message')}",
              file=sys.stderr)
    if not as_json and reply.get("warning"):
        print(f"warning: {reply['warning']}", file=sys.stderr)
    if ok:
        return OK
    return UNAUTHORIZED if reply.get("error") == "unauthorized" else REFUSED


def main(argv: list[str] | None = None, extensions: Sequence[Extension] = ()) -> int:
    """``python -m shim.ctl ...`` is ``mmshim ctl ...``."""
    parser = argparse.ArgumentParser(prog="mmshim")
    add_ctl_parser(parser.add_subparsers(dest="command", required=True), extensions)
    args = parser.parse_args(["ctl", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


if __name__ == "__main__":  # the entry script: its extensions may import ctl
    from shim.rollout.cli import add_ctl_command

    raise SystemExit(main(extensions=[add_ctl_command]))

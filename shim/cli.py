"""``mmshim``: run the shim, check a config, run a reference backend, run the whole stack.

``mmshim ctl`` (shim.ctl) changes a running shim through its admin socket.

Every subcommand is a function ``cmd_<name>(args) -> int``; ``main`` only dispatches.
Errors a user can fix (bad config, endpoint in use) print one line and exit non-zero.

This module holds the parsers and the subcommands that need no running shim; ``run``
lives in the composition root, shim.app, whose ``main`` passes it in (``mmshim`` and
``python -m shim`` start there; ``python -m shim.cli`` hands over to it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import msgspec

from shim import signals

# `mmshim run`: a SIGHUP or SIGTERM while the imports below load must not kill us.
if __name__ == "__main__" and sys.argv[1:2] == ["run"]:
    signals.hold()

from shim.config import ShimConfig, load_config
from shim.ctl import add_ctl_parser
from shim.errors import ConfigError

DEFAULT_CONFIG = "config/shim.toml"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s shim %(levelname)s %(name)s: %(message)s")


def _pretty(doc: object) -> str:
    """JSON for people: indented, anything msgspec cannot encode as its ``str``."""
    return msgspec.json.format(msgspec.json.encode(doc, enc_hook=str), indent=2).decode()


def _load(path: str) -> ShimConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"mmshim: invalid config: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


# -- run / check-config ----------------------------------------------------------------

def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.file)
    weights = ", ".join(f"{k}={v:g}" for k, v in cfg.routing.weights.items())
    print(f"{args.file}: ok ({len(cfg.backends)} backends; mode {cfg.routing.mode}; "
          f"weights {weights})")
    return 0


# -- reference backends ----------------------------------------------------------------

def cmd_backend(args: argparse.Namespace) -> int:
    import importlib

    service = importlib.import_module(f"backends.{args.kind}")
    return int(service.main(args.rest))


def _port(endpoint: str) -> str:
    return endpoint.rsplit(":", 1)[1]


def cmd_stack(args: argparse.Namespace) -> int:
    """The shim and both reference backends on the config's ports, stopped together
    (shim.stack: endpoints checked first, signals forwarded)."""
    from shim.stack import run_stack

    cfg = _load(args.config)
    return run_stack(cfg, args.config, args.models or cfg.models_file, args.log_level)


def cmd_demo(args: argparse.Namespace) -> int:
    from shim.demo import run_demo

    return run_demo(_load(args.config), args.endpoint, args.count)


# -- shadow diffs and the parity run ---------------------------------------------------

DEFAULT_PARITY_REQUESTS = "config/parity_requests.jsonl"


def cmd_diffs(args: argparse.Namespace) -> int:
    """Summarise the shadow diff log: mismatch rate and top differing paths per action."""
    from shim.difflog import Tally, log_files, read_records

    path = args.log or _load(args.config).shadow.diff_log
    if not log_files(path):
        print(f"mmshim diffs: no diff log at {path}", file=sys.stderr)
        return 2
    tally = Tally().add_all(read_records(path))
    print(_pretty(tally.as_json(args.top)) if args.json else tally.format(args.top))
    return 0


def cmd_parity(args: argparse.Namespace) -> int:
    """Replay a request corpus to both backends; exit 1 above the mismatch threshold."""
    from shim.parity import main as parity_main

    return parity_main(_load(args.config), args.requests, threshold=args.threshold,
                       as_json=args.json, log_path=args.log, top=args.top,
                       verbose=args.verbose)


def cmd_replay(args: argparse.Namespace) -> int:
    """Replay a capture to a candidate; exit 1 above the mismatch threshold."""
    from shim.replay import ReplayOptions
    from shim.replay import main as replay_main

    opts = ReplayOptions(capture=args.capture, to=args.to, dialect=args.dialect,
                         reference=args.reference, reference_dialect=args.reference_dialect,
                         calibrate=args.calibrate, calibrate_dialect=args.calibrate_dialect,
                         speed=args.speed, ordered=args.ordered, threshold=args.threshold,
                         timeout_ms=args.timeout_ms, max_inflight=args.max_inflight,
                         as_json=args.json, log_path=args.log, top=args.top,
                         verbose=args.verbose)
    return replay_main(_load(args.config), opts)


def cmd_capture_convert(args: argparse.Namespace) -> int:
    """A parity corpus as a capture file (JSON lines, version 1)."""
    from shim.capture import corpus_to_capture
    from shim.errors import CaptureError

    cfg = _load(args.config)
    try:
        lines = [msgspec.json.encode(r).decode() for r in
                 corpus_to_capture(args.corpus, cfg.policy)]
    except (OSError, CaptureError) as exc:
        print(f"mmshim capture convert: {exc}", file=sys.stderr)
        return 2
    text = "".join(line + "\n" for line in lines)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"{args.output}: {len(lines)} exchanges", file=sys.stderr)
    return 0


# -- dispatch --------------------------------------------------------------------------

def plain_text(doc: str) -> str:
    """A docstring paragraph for a terminal: RST literals (````x````) lose their backticks
    and the lines are joined."""
    return " ".join(doc.replace("``", "").split())


Command = Callable[[argparse.Namespace], int]


def _no_run(args: argparse.Namespace) -> int:
    print("mmshim: `run` is served by shim.app (`mmshim run` or `python -m shim run`)",
          file=sys.stderr)
    return 2


def build_parser(run: Command | None = None) -> argparse.ArgumentParser:
    """Every subcommand's parser; ``run``: the ``run`` subcommand (shim.app.cmd_run)."""
    parser = argparse.ArgumentParser(
        prog="mmshim", description=plain_text(__doc__.split("\n\n")[0]),
        epilog="Run `mmshim COMMAND --help` for a command's options; `make run` starts the "
               "shim and both reference backends (see README.md).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run the shim")
    p.add_argument("--config", default=os.environ.get("MMSHIM_CONFIG", DEFAULT_CONFIG))
    p.add_argument("--reset-state", action="store_true",
                   help="ignore the saved runtime state and start from the config file")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=run or _no_run)

    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("file")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("backend", help="run a reference backend (mma or mms)")
    p.add_argument("kind", choices=["mma", "mms"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the backend's own options")
    p.set_defaults(func=cmd_backend)

    p = sub.add_parser("stack", help="run the shim and both reference backends")
    p.add_argument("--config", default=os.environ.get("MMSHIM_CONFIG", DEFAULT_CONFIG))
    p.add_argument("--models", default="")
    p.add_argument("--log-level", default="info")
    p.set_defaults(func=cmd_stack)

    p = sub.add_parser("demo", help="send legacy traffic through a running shim")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--endpoint", default="", help="default: the config's listen port on loopback")
    p.add_argument("--count", type=int, default=40)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("diffs", help="summarise the shadow diff log")
    p.add_argument("--log", default="", help="default: the config's shadow.diff_log")
    p.add_argument("--config", default=os.environ.get("MMSHIM_CONFIG", DEFAULT_CONFIG))
    p.add_argument("--top", type=int, default=5, help="differing paths shown per action")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_diffs)

    p = sub.add_parser("parity", help="replay a request corpus to both backends and compare")
    p.add_argument("--requests", default=DEFAULT_PARITY_REQUESTS)
    p.add_argument("--config", default=os.environ.get("MMSHIM_CONFIG", DEFAULT_CONFIG))
    p.add_argument("--threshold", type=float, default=0.0, metavar="PCT",
                   help="fail when more than PCT %% of compared requests differ (default 0)")
    p.add_argument("--log", default="", help="also write the diff records here (JSON lines)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per request")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("replay", help="replay a capture to a candidate and compare",
                       description="Replay a capture (mmshim ctl record) to a candidate "
                       "backend, compare each reply with the recorded one; exit 1 above "
                       "the threshold, 2 unusable capture, 3 unreachable.")
    p.add_argument("capture", nargs="+", help="capture file(s); rotated .1 .2 ... are read "
                   "too, oldest first")
    p.add_argument("--to", required=True, metavar="ENDPOINT",
                   help="the candidate, e.g. tcp://127.0.0.1:7721")
    p.add_argument("--dialect", choices=["mms", "mma"], default="mms",
                   help="the candidate's dialect (default mms)")
    p.add_argument("--speed", default="max", metavar="1x|10x|max",
                   help="pace by the recorded times, faster by this factor (default max)")
    p.add_argument("--ordered", action="store_true",
                   help="one request at a time, in capture order")
    p.add_argument("--threshold", type=float, default=0.0, metavar="PCT",
                   help="fail when more than PCT %% of compared requests differ (default 0)")
    p.add_argument("--reference", default="", metavar="ENDPOINT",
                   help="compare with this live backend instead of the recorded replies")
    p.add_argument("--reference-dialect", choices=["mms", "mma"], default="mma")
    p.add_argument("--calibrate", default="", metavar="ENDPOINT",
                   help="a twin of the reference: where it differs from the reference is "
                   "noise")
    p.add_argument("--calibrate-dialect", choices=["mms", "mma"], default="mma")
    p.add_argument("--timeout-ms", type=int, default=4500)
    p.add_argument("--max-inflight", type=int, default=64)
    p.add_argument("--config", default=os.environ.get("MMSHIM_CONFIG", DEFAULT_CONFIG),
                   help="for the load policy and the compare rules")
    p.add_argument("--log", default="", help="also write the diff records here (JSON lines)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--json", action="store_true",
                   help="the report as JSON; verdict.mismatch_rate_percent is the gate figure")
    p.add_argument("-v", "--verbose", action="store_true", help="one line per request")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("capture", help="capture files: convert a parity corpus")
    capture = p.add_subparsers(dest="capture_command", required=True)
    c = capture.add_parser("convert", help="a parity corpus (JSON lines of requests) as a "
                           "capture file")
    c.add_argument("corpus", nargs="?", default=DEFAULT_PARITY_REQUESTS)
    c.add_argument("-o", "--output", default="-", help="default: stdout")
    c.add_argument("--config", default=os.environ.get("MMSHIM_CONFIG", DEFAULT_CONFIG))
    c.set_defaults(func=cmd_capture_convert)

    from shim.rollout.cli import add_parser as add_rollout_parser

    add_rollout_parser(sub, os.environ.get("MMSHIM_CONFIG", DEFAULT_CONFIG))  # shim.rollout
    from shim.rollout.cli import add_ctl_command

    add_ctl_parser(sub, [add_ctl_command])  # `mmshim ctl ...`: shim.ctl
    from shim.curve import add_keys_parser

    add_keys_parser(sub)  # `mmshim keys DIR`: shim.curve
    return parser


def main(argv: list[str] | None = None, *, run: Command | None = None) -> int:
    """Parse ``argv`` and run its subcommand; ``run`` serves ``mmshim run`` (shim.app)."""
    if (sys.argv[1:] if argv is None else argv)[:1] == ["run"]:
        signals.hold()  # until the event loop's own handlers take over (shim.signals)
    args = build_parser(run).parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # `mmshim ctl status | head`: the reader left, nothing to say
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # `python -m shim.cli`: the entry point is shim.app
    from shim.app import main as app_main

    raise SystemExit(app_main())

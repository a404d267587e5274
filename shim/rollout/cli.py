"""``mmshim rollout check|status`` and ``mmshim ctl rollout start|pause|resume|abort|promote
|status``: the plan checked offline, the running rollout through the admin socket."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import msgspec

from shim.config import load_config
from shim.errors import ConfigError, PlanError
from shim.rollout.plan import format_check, load_plan, resolve

VERBS = ("status", "start", "pause", "resume", "abort", "promote")


def cmd_check(args: argparse.Namespace) -> int:
    """Print each stage with the models it moves and its weights; exit 2 on a bad plan."""
    try:
        cfg = load_config(args.config)
        plan, _ = load_plan(args.plan)
        steps = resolve(plan, cfg)
    except (ConfigError, PlanError) as exc:
        print(f"mmshim rollout check: {exc}", file=sys.stderr)
        return 2
    if args.json:
        doc = {"plan": plan.name, "stages": [s.describe() for s in steps]}
        print(msgspec.json.format(msgspec.json.encode(doc), indent=2).decode())
    else:
        print(format_check(plan, steps))
    return 0


def build_request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """``ctl rollout VERB [PLAN]`` -> the admin command and its arguments."""
    from shim.errors import UsageError

    verb = args.verb
    if verb == "start":
        if not args.plan:
            raise UsageError("ctl rollout start: give the plan file")
        try:
            _, raw = load_plan(args.plan)
        except PlanError as exc:
            raise UsageError(str(exc)) from None
        return "rollout_start", {"plan": raw}
    if args.plan:
        raise UsageError(f"ctl rollout {verb} takes no plan")
    return f"rollout_{verb}", {}


def show(reply: dict[str, Any]) -> str:
    """A rollout as text: where it is, its gates with figures, why it rolled back."""
    r = reply.get("rollout") or {}
    if r.get("status", "none") == "none":
        return "no rollout"
    st = r["stage"]
    lines = [f"rollout {r['plan']} ({r['source']} -> {r['target']}): {r['status'].upper()}"
             + (f" - {r['paused_reason']}" if r.get("paused_reason") else ""),
             f"stage {st['number']}/{st['of']} {st['name']}: weights "
             + " ".join(f"{n}={w:g}" for n, w in st["weights"].items())
             + f", shadow {'on' if st['shadow'] else 'off'}, baked {st['baked_s']:.1f} s "
             f"(min {st['min_bake_s']:g}, max {st['max_bake_s']:g})",
             f"  {r['target']} serves: {', '.join(st['models']) or '(no model)'}"
             f"; this stage moves: {', '.join(st['moves']) or '(no model)'}"]
    if r.get("gates"):
        lines.append("gates:")
        for g in r["gates"]:
            lines.append(f"  {g['gate']:<9} {g['verdict'].upper():<5} {g['reason']}")
    rb = r.get("rollback")
    if rb:
        lines.append(f"ROLLED BACK stage {rb['stage']} ({rb['stage_name']}) after "
                     f"{rb['baked_s']:.1f} s to {rb['back_to']}: {rb['reason']}")
        if rb.get("figures"):
            lines.append("  figures: "
                         + msgspec.json.encode(rb["figures"], order="sorted").decode())
    probes = r.get("probes") or {}
    if probes.get("sent"):
        lines.append(f"probes: {probes['sent']} sent, {probes['answered']} answered")
    lines.append("history:")
    for h in r.get("history", [])[-15:]:
        at = time.strftime("%H:%M:%S", time.localtime(h["at"]))
        lines.append(f"  {at} stage {h['stage']} {h['event']}: {h['detail']}")
    return "\n".join(lines)


def add_ctl_command(command: Any) -> None:
    """``ctl rollout``, added through shim.ctl's ``command`` helper."""
    p = command("rollout", "drive a rollout plan: start PLAN, pause, resume, abort, "
                "promote, status", build_request, show)
    p.add_argument("verb", choices=VERBS)
    p.add_argument("plan", nargs="?", default="", help="the plan file (start only)")


def add_parser(sub: Any, default_config: str) -> None:
    """``mmshim rollout check PLAN`` and ``mmshim rollout status``."""
    p = sub.add_parser("rollout", help="check a rollout plan, or show the running rollout")
    verbs = p.add_subparsers(dest="rollout_command", required=True)
    c = verbs.add_parser("check", help="each stage's moves and weights; refuse a bad plan")
    c.add_argument("plan")
    c.add_argument("--config", default=default_config)
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_check)
    s = verbs.add_parser("status", help="the running rollout (same as ctl rollout status)")
    s.add_argument("--config", default=default_config)
    s.add_argument("--admin", default=argparse.SUPPRESS)
    s.add_argument("--token-file", default=argparse.SUPPRESS)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)


def cmd_status(args: argparse.Namespace) -> int:
    from shim.ctl import run

    args.build = lambda a: ("rollout_status", {})
    args.show = show
    return run(args)

"""The shim's configuration: msgspec Structs decoded from ``config/shim.toml``.

The Structs are the single source of truth for what the file may say. Decoding is strict
(msgspec's ``strict=True``: ``default_timeout_ms = "4500"`` is an error, not 4500) and
rejects unknown keys, wrong types and values out of range (``Meta`` constraints, e.g. the
runtime knobs' in shim.settings) with a message naming the field; ``validate`` then checks
what types cannot express (known backend names, no routing loop, weights not all zero).

Load -> validate -> resolved copy: ``decode_config`` returns a new, frozen ShimConfig with
the defaults that depend on other fields filled in (weights, safe backend, deadlines,
paths relative to the file, the load policy); nothing changes it afterwards.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

import msgspec
from msgspec.structs import replace

from shim import dialects
from shim.errors import ConfigError
from shim.settings import ACTIONS, ActionRule, MirrorPolicy, Mode, ShadowSettings

#: Actions that change a backend's state: never failed over, never mirrored.
#: Actions routed by the model they name (shim.ownership): never pinned while it is on.
MODEL_BOUND_ACTIONS = frozenset({"generate", "load", "unload", "model_access"})
STATEFUL_ACTIONS = frozenset({"load", "unload", "model_access", "clear_conversation"})

__all__ = ["ACTIONS", "ActionRule", "MirrorPolicy", "Mode", "ShimConfig", "load_config"]

CompareRule = Literal["exact", "shape", "ignore"]




class Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Common options: immutable, unknown keys are errors, every field is keyword-only."""


class ShimSection(Base, frozen=True):
    """Where the shim listens and how it treats incoming requests."""

    listen: str = "tcp://*:5570"
    health: str = "tcp://*:6570"
    metrics: str = "127.0.0.1:9570"
    #: Off 5590 (the emotion engine's host port in the deployed stack, protocol.md).
    admin: str = "tcp://127.0.0.1:9571"
    admin_token_file: str = ""
    #: CURVE for the admin socket (shim.curve): the server's ``.key_secret`` file and a
    #: directory of authorized clients' ``.key`` files. Required both where ``admin`` is
    #: beyond loopback; unused (empty) elsewhere unless both are set.
    admin_curve_secret_file: str = ""
    admin_curve_clients_dir: str = ""
    state_file: str = "state/shim-state.json"
    #: Soft limit: a larger request is answered SHIM_BAD_REQUEST in the caller's shape.
    #: Real audio requests (TRANSCRIBE_AUDIO, a JSON list of floats) are 1-5 MB.
    max_request_bytes: int = 16 << 20
    #: Non-object JSON, non-JSON and multi-frame requests: "forward" sends the bytes to the
    #: legacy-dialect backend and passes its reply back unchanged; "reject" refuses them.
    opaque: Literal["forward", "reject"] = "forward"
    drain_timeout_s: float = 5.0
    default_timeout_ms: int = 4500
    #: How long a backend that just disconnected counts as restarting: a request that only
    #: it can serve waits for it (within its deadline); after that it is answered at once.
    reconnect_grace_ms: int = 3000
    #: The backend opaque requests go to; empty: the legacy-dialect (MMA) backend.
    opaque_backend: str = ""
    #: The compiled data plane (shim.fastpath, issue 17): "auto" uses it when it is built,
    #: "off" keeps every request in Python. ``MMSHIM_FASTPATH`` in the environment, when
    #: set, overrides this (A/B runs of one config: bench, the differential tests).
    fastpath: Literal["auto", "off"] = "auto"
    #: Hard cap on one frame from the network (frontend, health, admin): libzmq drops a
    #: peer that sends more (ZMQ_MAXMSGSIZE) before buffering it whole. Above the soft
    #: ``max_request_bytes``, which gets a SHIM_BAD_REQUEST reply instead.
    max_frame_bytes: int = 64 << 20
    #: Backend replies larger than this are refused as bad replies (SHIM_BAD_REPLY).
    max_reply_bytes: int = 32 << 20
    #: Replies queued per client (ZMQ_SNDHWM): past it, replies to a client that does
    #: not read are dropped and counted (shim_dropped_replies_total{reason="slow_reader"}).
    peer_send_hwm: int = 64
    #: Replies beyond that queue wait in the shim (shim.backlog), up to this many bytes
    #: per client and ``backlog_bytes`` in all, for at most ``backlog_ttl_s``; then they
    #: are dropped.
    peer_backlog_bytes: int = 4 << 20
    backlog_bytes: int = 64 << 20
    backlog_ttl_s: float = 10.0
    #: Requests queued per client before libzmq stops reading its connection (RCVHWM).
    peer_recv_hwm: int = 1000
    #: A drain (SIGTERM) closes the frontend at the first moment when nothing is in
    #: flight and no request came in or reply went out for this long (shim.proxy.drain).
    drain_quiet_ms: int = 50
    #: Full garbage collection every this many seconds (0: never), so memory held by
    #: reference cycles (exceptions and their frames) does not pile up between the
    #: collector's own generation-2 passes.
    gc_interval_s: float = 10.0
    #: The health socket's reply: only the legacy MMA fields (False), or also weights,
    #: mode, per-backend state and VRAM (True; they are always in the admin ``status``).
    health_details: bool = False


class BackendConfig(Base, frozen=True):
    """One model manager: its dialect, its endpoints, and how long to wait for it."""

    #: A registered dialect's name (shim.dialects.base): "mma", "mms", or one from a
    #: module named in ``[dialects] modules``.
    dialect: str
    endpoints: list[str]
    health: str = ""
    #: Cap on one attempt; the request's own deadline (see [deadlines]) is the other bound.
    timeout_ms: int = 30000
    #: The ``device`` reported for this backend's models where it reports none (MMS);
    #: agents filter loaded_models on it ("MainPC", "PC2"). Empty: "unknown".
    device: str = ""
    #: A second instance of the same backend, used by shadow mode to calibrate noise.
    secondary: str = ""


class DialectsSection(Base, frozen=True):
    """Dialects beyond MMA and MMS: modules imported when the config is loaded, each
    registering one ``shim.dialects.base.Dialect`` (e.g. ``["mydeploy.v3_dialect"]``,
    importable from the shim's working directory or the installed packages)."""

    modules: list[str] = msgspec.field(default_factory=list)


class RoutingSection(Base, frozen=True):
    """How requests are split: mode, weights (percent, 0.01 % resolution), sticky key."""

    mode: Mode = "split"
    #: Empty: all traffic to the first backend.
    weights: dict[str, float] = msgspec.field(default_factory=dict)
    sticky_key: str = "conversation_id"
    #: Where ``rollback`` sends all traffic; empty: the first backend.
    safe_backend: str = ""


class HealthSection(Base, frozen=True):
    """Active probing of each backend's health socket, and passive failure counting."""

    interval_ms: int = 1000
    timeout_ms: int = 500
    #: Probes in a row that must fail before a backend is marked down.
    probe_failures: int = 2
    #: Request failures (timeouts, lost connections) in a row that mark a backend down.
    request_failures: int = 3


class DeadlinesSection(Base, frozen=True):
    """How long the shim works on a request: it follows the caller (protocol.md, "What the
    deployed agents really send"). The first match wins: ``[actions.X].timeout_ms`` when
    set, then ``names`` (the action or command as sent), then ``forms``, then
    ``shim.default_timeout_ms``. Milliseconds. A config file that sets
    ``shim.default_timeout_ms`` and has no ``[deadlines]`` table gets empty tables: its one
    timeout applies to everything, as it did before this table existed."""

    #: Per request form: action, command, model_access, mms (an MMS-dialect caller),
    #: opaque (bytes passed through).
    forms: dict[str, int] = msgspec.field(default_factory=lambda: {
        "action": 4500, "command": 4500, "model_access": 9500, "mms": 29000,
        "opaque": 4500})
    #: Per action or command name as sent.
    names: dict[str, int] = msgspec.field(default_factory=lambda: {
        "generate": 29000, "generate_text": 29000, "generate_speech": 29000,
        "status": 900, "clear_conversation": 2500, "TRANSCRIBE_AUDIO": 9500})


class DedupSection(Base, frozen=True):
    """Re-sent duplicates join the request in flight (Lazy Pirate clients re-send)."""

    enabled: bool = True
    #: A request with the same payload bytes joins one still in flight that arrived at
    #: most this long before it (requests with the same ``request_id`` always join).
    bytes_window_ms: int = 30000


class ConversationsSection(Base, frozen=True):
    """Which backend served each conversation (shim.conversations): bounded LRU + TTL."""

    max_entries: int = 10000
    ttl_s: float = 3600.0


class MergeSection(Base, frozen=True):
    """status / GET_LOADED_MODELS_STATUS / HEALTH_CHECK from every backend at once.

    "split": in split mode while more than one backend has a weight above 0 (in shadow
    mode the primary's own answer is what shadow compares); "always"; "never"."""

    loaded: Literal["split", "always", "never"] = "split"


class OwnershipSection(Base, frozen=True):
    """One owner per model: polling, hand-over and duplicate repair."""

    enabled: bool = True
    poll_interval_ms: int = 2000
    handover_timeout_ms: int = 3000
    #: Unload a model seen on a backend that is not its owner (never from the owner).
    repair: bool = True
    #: Models allowed on both backends at once (e.g. preloaded on MMS for shadow compares).
    shared_models: list[str] = msgspec.field(default_factory=list)


class EjectionSection(Base, frozen=True):
    """Outlier ejection (Envoy's model): failing requests take a backend out of rotation."""

    enabled: bool = True
    #: Request failures (timeouts, lost connections) in a row that eject a backend.
    consecutive_failures: int = 3
    #: The first ejection lasts this long; the n-th in a row n times as long, up to the max.
    base_ejection_ms: int = 5000
    max_ejection_ms: int = 300_000
    #: Back in rotation, requests in flight at once until ``readmit_successes`` succeed.
    trial_inflight: int = 1
    readmit_successes: int = 3


class ShadowSection(ShadowSettings, frozen=True):
    """Mirroring to the non-primary backend and comparing the replies: the runtime knobs
    (shim.settings.ShadowSettings: percent, sticky, max_inflight, timeout_ms) and these."""

    diff_log: str = "state/shadow-diffs.jsonl"
    diff_log_max_bytes: int = 10 << 20
    diff_log_backups: int = 3
    #: Write prompts and generated text into the diff log. Off: each request and reply
    #: is recorded as its SHA-256, length and shape (keys and types) only.
    log_payloads: bool = False
    #: field path -> rule, per action; "*" applies to every action.
    compare: dict[str, dict[str, CompareRule]] = msgspec.field(default_factory=dict)


class RecordSection(Base, frozen=True):
    """Recording exchanges to a capture file (shim.record; ``mmshim ctl record``)."""

    #: Record from start-up; else only after ``mmshim ctl record start``.
    enabled: bool = False
    path: str = "state/capture.jsonl"
    #: Share of conversations (of requests without one) recorded, 0..100.
    percent: float = 100.0
    #: The capture file rotates at this size; ``backups`` older files are kept.
    max_bytes: int = 64 << 20
    backups: int = 3
    #: Keep prompts, generated text and audio; else a hash and a length (shim.capture).
    payloads: bool = False
    #: Exchanges waiting for the writer thread at most; more are shed and counted.
    queue_size: int = 10_000


class ShimConfig(Base, frozen=True):
    """The whole file."""

    shim: ShimSection = msgspec.field(default_factory=ShimSection)
    backends: dict[str, BackendConfig] = msgspec.field(default_factory=dict)
    routing: RoutingSection = msgspec.field(default_factory=RoutingSection)
    health: HealthSection = msgspec.field(default_factory=HealthSection)
    actions: dict[str, ActionRule] = msgspec.field(default_factory=dict)
    ownership: OwnershipSection = msgspec.field(default_factory=OwnershipSection)
    ejection: EjectionSection = msgspec.field(default_factory=EjectionSection)
    shadow: ShadowSection = msgspec.field(default_factory=ShadowSection)
    record: RecordSection = msgspec.field(default_factory=RecordSection)
    deadlines: DeadlinesSection = msgspec.field(default_factory=DeadlinesSection)
    dedup: DedupSection = msgspec.field(default_factory=DedupSection)
    conversations: ConversationsSection = msgspec.field(default_factory=ConversationsSection)
    merge: MergeSection = msgspec.field(default_factory=MergeSection)
    dialects: DialectsSection = msgspec.field(default_factory=DialectsSection)
    #: model_pref -> model name; empty means "read it from models_file".
    policy: dict[str, str] = msgspec.field(default_factory=dict)
    #: The backends' model config, whose [policy] table the shim shares.
    models_file: str = "models.toml"


def load_config(path: str | Path) -> ShimConfig:
    """Read, decode and validate a config file, or raise ConfigError naming the field."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:  # TOML for people; JSON (a TOML-free subset) for generated configs
        raw = msgspec.json.decode(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, msgspec.DecodeError) as exc:
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper() or 'TOML'}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a table")
    return decode_config(raw, source=str(path), base_dir=path.parent)


def decode_config(raw: dict[str, object], *, source: str = "<config>",
                  base_dir: Path | None = None) -> ShimConfig:
    """Decode an already-parsed TOML/JSON mapping and validate it."""
    # Tables keyed by name are decoded entry by entry so an error names the entry
    # (`$.backends.mms.timeout_ms`, where msgspec alone would say `$.backends[...]`).
    for section, struct in (("backends", BackendConfig), ("actions", ActionRule)):
        entries = raw.get(section)
        for name, entry in entries.items() if isinstance(entries, dict) else ():
            try:
                msgspec.convert(entry, struct, strict=True)
            except msgspec.ValidationError as exc:
                where = str(exc).replace("`$", f"`$.{section}.{name}")
                raise ConfigError(f"{source}: {where}") from None
    try:
        cfg = msgspec.convert(raw, ShimConfig, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    validate(cfg, source)
    first = next(iter(cfg.backends))
    cfg = replace(cfg, routing=replace(
        cfg.routing,
        weights=cfg.routing.weights or {n: 100.0 if n == first else 0.0 for n in cfg.backends},
        safe_backend=cfg.routing.safe_backend or first))
    shim_raw = raw.get("shim")
    if isinstance(shim_raw, dict) and "default_timeout_ms" in shim_raw and \
            "deadlines" not in raw:
        # A config that sets one timeout for everything (as before [deadlines]) keeps it.
        cfg = replace(cfg, deadlines=DeadlinesSection(forms={}, names={}))
    if base_dir is not None:
        cfg = _resolve_paths(cfg, base_dir)
    if not cfg.policy:
        cfg = replace(cfg, policy=_policy_from_models(cfg, source))
    return cfg


def _resolve_paths(cfg: ShimConfig, base_dir: Path) -> ShimConfig:
    """Relative file paths in a config file are relative to that file (a copy)."""
    def resolve(value: str) -> str:
        return str((base_dir / value).resolve()) if value and not Path(value).is_absolute() \
            else value
    s = cfg.shim
    return replace(
        cfg, models_file=resolve(cfg.models_file),
        shim=replace(s, state_file=resolve(s.state_file),
                     admin_token_file=resolve(s.admin_token_file),
                     admin_curve_secret_file=resolve(s.admin_curve_secret_file),
                     admin_curve_clients_dir=resolve(s.admin_curve_clients_dir)),
        shadow=replace(cfg.shadow, diff_log=resolve(cfg.shadow.diff_log)),
        record=replace(cfg.record, path=resolve(cfg.record.path)))


def _policy_from_models(cfg: ShimConfig, source: str) -> dict[str, str]:
    """The load policy (model_pref -> model), shared with the backends' models.toml."""
    if not cfg.models_file:
        return {}
    path = Path(cfg.models_file)
    try:
        models = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{source}: $.models_file: cannot read {path}: {exc}") from None
    policy = models.get("policy", {})
    if not isinstance(policy, dict):
        raise ConfigError(f"{source}: $.models_file: {path} has no [policy] table")
    return {str(k): str(v) for k, v in policy.items()}


def _fail(source: str, field: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {message} - at `$.{field}`")


def validate(cfg: ShimConfig, source: str = "<config>") -> None:
    """Checks beyond types and ``Meta`` ranges: references, sums and routing loops.
    Changes nothing (``decode_config`` fills the defaults in a copy)."""
    if not cfg.backends:
        raise _fail(source, "backends", "at least one backend is required")
    _check_dialects(cfg, source)
    for name, backend in cfg.backends.items():
        if not backend.endpoints:
            raise _fail(source, f"backends.{name}.endpoints", "at least one endpoint is required")
        for i, endpoint in enumerate(backend.endpoints):
            _check_endpoint(endpoint, source, f"backends.{name}.endpoints[{i}]")
            for own, own_field in ((cfg.shim.listen, "shim.listen"),
                                   (cfg.shim.health, "shim.health")):
                if same_endpoint(own, endpoint):
                    raise _fail(source, f"backends.{name}.endpoints[{i}]",
                                f"{endpoint} is the shim's own {own_field} {own}: routing loop")
        if backend.timeout_ms <= 0:
            raise _fail(source, f"backends.{name}.timeout_ms", "must be positive")
    for field in ("listen", "health", "admin"):
        value = getattr(cfg.shim, field)
        if value:
            _check_endpoint(value, source, f"shim.{field}")
    if cfg.shim.opaque_backend and cfg.shim.opaque_backend not in cfg.backends:
        raise _fail(source, "shim.opaque_backend",
                    f"unknown backend {cfg.shim.opaque_backend!r}")
    if cfg.shim.max_request_bytes <= 0:
        raise _fail(source, "shim.max_request_bytes", "must be positive")
    if cfg.shim.max_frame_bytes < cfg.shim.max_request_bytes:
        raise _fail(source, "shim.max_frame_bytes",
                    f"the hard frame cap {cfg.shim.max_frame_bytes} must be at least "
                    f"shim.max_request_bytes ({cfg.shim.max_request_bytes})")
    if cfg.shim.max_reply_bytes <= 0:
        raise _fail(source, "shim.max_reply_bytes", "must be positive")
    for field in ("peer_send_hwm", "peer_recv_hwm"):
        if getattr(cfg.shim, field) < 1:
            raise _fail(source, f"shim.{field}", "must be at least 1")
    first = next(iter(cfg.backends))
    check_weights(cfg.routing.weights or {first: 100.0}, cfg.backends, source,
                  "routing.weights")
    safe_backend = cfg.routing.safe_backend or first
    if safe_backend not in cfg.backends:
        raise _fail(source, "routing.safe_backend", f"unknown backend {safe_backend!r}")
    for action, rule in cfg.actions.items():
        if action not in ACTIONS:
            raise _fail(source, f"actions.{action}",
                        f"unknown action (expected one of {', '.join(ACTIONS)})")
        if rule.pin and rule.pin not in cfg.backends:
            raise _fail(source, f"actions.{action}.pin", f"unknown backend {rule.pin!r}")
        if rule.pin and cfg.ownership.enabled and action in MODEL_BOUND_ACTIONS:
            raise _fail(source, f"actions.{action}.pin", f"{action} requests go to the owner "
                        "of their model (rule: one owner per model); remove the pin or "
                        "set ownership.enabled = false")
    # shadow.percent, shadow.max_inflight, actions.X.timeout_ms: Meta (shim.settings).
    for key in ("consecutive_failures", "base_ejection_ms", "max_ejection_ms",
                "readmit_successes"):
        if getattr(cfg.ejection, key) < 1:
            raise _fail(source, f"ejection.{key}", "must be at least 1")
    if cfg.ejection.trial_inflight < 0:
        raise _fail(source, "ejection.trial_inflight", "must be 0 (no limit) or more")
    _check_compare(cfg.shadow.compare, source)
    _check_record(cfg.record, source)


def _check_dialects(cfg: ShimConfig, source: str) -> None:
    """Import ``[dialects] modules``, then check each backend's dialect is registered."""
    for i, module in enumerate(cfg.dialects.modules):
        try:
            dialects.load_modules([module])
        except Exception as exc:  # an import runs arbitrary code: any failure is the config's
            raise _fail(source, f"dialects.modules[{i}]",
                        f"cannot import {module!r}: {type(exc).__name__}: {exc}") from None
    known = dialects.names()
    for name, backend in cfg.backends.items():
        if backend.dialect not in known:
            raise _fail(source, f"backends.{name}.dialect",
                        f"unknown dialect {backend.dialect!r} (known: {', '.join(known)})")


def _check_record(record: RecordSection, source: str) -> None:
    if not 0 < record.percent <= 100:
        raise _fail(source, "record.percent", "must be within (0, 100]")
    if record.max_bytes < 4096:
        raise _fail(source, "record.max_bytes", "must be at least 4096")
    if record.backups < 0:
        raise _fail(source, "record.backups", "must not be negative")
    if record.queue_size < 1:
        raise _fail(source, "record.queue_size", "must be at least 1")


def _check_compare(compare: dict[str, dict[str, CompareRule]], source: str) -> None:
    """shadow.compare: keys are actions or "*", patterns parse (see shim.compare)."""
    from shim.compare import parse_pattern
    from shim.errors import PatternError

    for action, rules in compare.items():
        if action != "*" and action not in ACTIONS:
            raise _fail(source, f"shadow.compare.{action}",
                        f"unknown action (expected \"*\" or one of {', '.join(ACTIONS)})")
        for pattern in rules:
            try:
                parse_pattern(pattern)
            except PatternError as exc:
                raise _fail(source, f"shadow.compare.{action}", str(exc)) from None


#: Slack allowed on the sum of the weights (they are kept to 0.01 %).
WEIGHT_SUM_SLACK = 0.05


def check_weights(weights: dict[str, float], backends: dict[str, BackendConfig] | set[str],
                  source: str = "<weights>", field: str = "weights") -> None:
    """Weights are percentages: they name known backends, are within 0..100, are not all
    zero and add up to 100 (backends left out count as 0)."""
    for name, weight in weights.items():
        if name not in backends:
            raise _fail(source, f"{field}.{name}", f"unknown backend {name!r}")
        if not 0 <= weight <= 100:
            raise _fail(source, f"{field}.{name}", f"weight {weight} must be within 0..100")
    if not any(w > 0 for w in weights.values()):
        raise _fail(source, field, "weights must not all be zero")
    total = sum(weights.values())
    if abs(total - 100) > WEIGHT_SUM_SLACK:
        shown = ", ".join(f"{n}={w:g}" for n, w in weights.items())
        raise _fail(source, field, f"weights are percentages and must add up to 100 "
                    f"({shown} adds up to {total:g})")


def complete_weights(given: dict[str, float], current: dict[str, float],
                     order: list[str]) -> dict[str, float]:
    """The weights after an operator sets some of them: the backends not named share what
    is left of 100 %, in proportion to their current weights (equally when those are all
    zero). With two backends, ``mms=10`` means mma=90, mms=10.

    Raises ValueError (naming the weights) when the named ones exceed 100, or name every
    backend and do not add up to 100; the result passes ``check_weights``.
    """
    for name, weight in given.items():
        if name not in order:
            raise ValueError(f"unknown backend {name!r} (expected one of {', '.join(order)})")
        if not 0 <= weight <= 100:
            raise ValueError(f"weight {name}={weight:g} must be within 0..100")
    if given and len(given) == len(order) and not any(w > 0 for w in given.values()):
        raise ValueError("weights must not all be zero")
    rest = [n for n in order if n not in given]
    left = 100.0 - sum(given.values())
    shown = ", ".join(f"{n}={w:g}" for n, w in given.items())
    if not rest:
        if abs(left) > WEIGHT_SUM_SLACK:
            raise ValueError(f"weights are percentages and must add up to 100: {shown} adds "
                             f"up to {100 - left:g}")
        return {n: float(given[n]) for n in order}
    if left < -WEIGHT_SUM_SLACK:
        raise ValueError(f"weights are percentages: {shown} adds up to {100 - left:g}, "
                         "over 100")
    left = max(0.0, left)
    base = {n: max(0.0, current.get(n, 0.0)) for n in rest}
    total = sum(base.values())
    share = {n: (base[n] / total if total > 0 else 1 / len(rest)) for n in rest}
    out = {n: float(given[n]) if n in given else round(left * share[n], 2) for n in order}
    out[rest[-1]] = round(out[rest[-1]] + 100.0 - sum(out.values()), 2)  # rounding residue
    if not any(w > 0 for w in out.values()):
        raise ValueError("weights must not all be zero")
    return out


def _check_endpoint(endpoint: str, source: str, field: str) -> None:
    if endpoint.startswith("ipc://") or endpoint.startswith("inproc://"):
        return
    if not endpoint.startswith("tcp://") or ":" not in endpoint[6:]:
        raise _fail(source, field, f"{endpoint!r} is not a tcp://host:port or ipc:// endpoint")
    port = endpoint.rsplit(":", 1)[1]
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise _fail(source, field, f"{endpoint!r} has no valid port")


_LOCAL_HOSTS = frozenset({"*", "0.0.0.0", "localhost", "127.0.0.1", "::1", "[::1]", "[::]", ""})


def same_endpoint(bound: str, connect: str) -> bool:
    """Would connecting to ``connect`` reach the socket bound on ``bound``?

    A wildcard or loopback bind is reached by any local address with the same port; other
    hosts are compared literally (we cannot resolve names here without the network).
    """
    if bound.startswith("tcp://") and connect.startswith("tcp://"):
        b_host, _, b_port = bound[6:].rpartition(":")
        c_host, _, c_port = connect[6:].rpartition(":")
        if b_port != c_port:
            return False
        local = c_host in _LOCAL_HOSTS or c_host.startswith("127.")
        return b_host in _LOCAL_HOSTS or b_host == c_host or (local and b_host.startswith("127."))
    return bound == connect


def is_loopback(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// endpoints on a loopback address."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[6:].rpartition(":")[0]
    return host in {"localhost", "::1", "[::1]"} or host.startswith("127.")

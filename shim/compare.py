"""Field-by-field comparison of two replies, with a rule per field path.

Two replies to the same request, both in the caller's dialect, are walked together.
Each field path has a rule: ``exact`` (same value), ``shape`` (same keys and value types,
values may differ) or ``ignore`` (not compared, nor anything below it). A field's rule
applies to everything below it unless a more specific pattern names a descendant.

Paths are written like jq: ``loaded_models.phi-2.vram_usage_mb``, ``models[0].type``;
keys that are not plain words are quoted (``loaded_models["llama-3.1"]``). Arrays of
objects that all carry an id (``model_id``, ``id`` or ``name``) are matched by that id,
not by position, so two backends listing models in another order do not differ:
``models[model_id=phi-2].type``. Patterns use the same syntax plus ``*`` (any one key or
index) and ``**`` (any number of levels, none included): ``**.timestamp``.

When several patterns match a path, the most specific wins (more literal segments, then
fewer ``**``); a tie goes to the later layer: built-in ``"*"`` < built-in per action <
configured ``"*"`` < configured per action.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import msgspec

from shim.errors import PatternError

Rule = Literal["exact", "shape", "ignore"]
RULES: tuple[Rule, ...] = ("exact", "shape", "ignore")

#: One step into a reply: a key, an index, or (id field, id value) in an id-keyed array.
Segment: TypeAlias = str | int | tuple[str, str]
Path: TypeAlias = tuple[Segment, ...]

#: What differs between two nodes.
DiffKind = Literal["value", "type", "missing", "extra", "length"]

#: Rules for the live shadow. The two backends answer the same request from their own
#: state, and in shadow mode a model lives on one backend only, so everything that
#: depends on what is loaded (loaded models, VRAM used, per-model details) legitimately
#: differs and is ignored; so are clocks, uptimes, request ids and free text.
#: Generated text is compared by shape: two models (or two seeds) never write the same.
DEFAULT_RULES: dict[str, dict[str, Rule]] = {
    "*": {
        "**.timestamp": "ignore",
        "**.uptime_seconds": "ignore",
        "**.uptime": "ignore",
        "**.request_id": "ignore",
        "**.last_used": "ignore",
        # Free-text messages: each backend words them its own way.
        "message": "shape",
        "error_message": "shape",
        "error": "shape",
    },
    "generate": {
        "response_text": "shape",
        "text": "shape",
        "tokens_generated": "shape",
    },
    "status": {
        "loaded_models": "ignore",
        "total_vram_used_mb": "ignore",
        # Each ledger has its own budget (MMA: configured, MMS: a share of the GPU).
        "total_vram_mb": "shape",
    },
    "loaded_status": {
        "loaded_models": "ignore",
        "total_vram_used_mb": "ignore",
        "total_vram_mb": "shape",
    },
    "health": {
        "loaded_models": "ignore",
        "online_models": "ignore",
        "total_vram_used_mb": "ignore",
        "vram_used_mb": "ignore",
        "model_details": "ignore",
        "total_vram_mb": "shape",
        "vram_budget_mb": "shape",
    },
    "list_models": {
        "models[*].loaded": "ignore",
        "models[*].status": "ignore",
    },
    "model_access": {
        "access_info.message": "shape",  # "MMA approved ..." / "MMS approved ..."
        "access_info.model_path_from_config": "shape",  # MMS does not expose paths
    },
}

#: What the offline parity run compares on top of DEFAULT_RULES. Both backends got the
#: same requests in the same order, so what is loaded and what it costs must agree;
#: what one dialect cannot report (MMS has no per-model device or quantization) is
#: compared by shape.
PARITY_RULES: dict[str, dict[str, Rule]] = {
    "status": {
        "loaded_models": "exact",
        "loaded_models.*.device": "shape",
        "loaded_models.*.quantization": "shape",
        "total_vram_used_mb": "exact",
    },
    "loaded_status": {
        "loaded_models": "exact",
        "loaded_models.*.device": "shape",
        "loaded_models.*.quantization": "shape",
        "total_vram_used_mb": "exact",
    },
    "health": {
        "loaded_models": "exact",
        "total_vram_used_mb": "exact",
        "vram_used_mb": "exact",
    },
    "list_models": {
        "models[*].loaded": "exact",
        "models[*].status": "exact",
    },
}




@dataclass(frozen=True, slots=True)
class Diff:
    """One difference: where, what kind, and the two values there (None when absent)."""

    path: Path
    kind: DiffKind
    primary: Any
    shadow: Any

    def as_dict(self) -> dict[str, Any]:
        return {"path": format_path(self.path), "kind": self.kind,
                "primary": self.primary, "shadow": self.shadow}


# -- paths -----------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")
_ANY, _DEEP = "*", "**"
_ID_KEYS = ("model_id", "id", "name")


def format_path(path: Path) -> str:
    """``("models", 0, "type")`` -> ``models[0].type``; the root is ``$``."""
    return _format(path, positions=False)


def generalize(path: Path) -> str:
    """The path with array positions as ``[*]``: how diffs are grouped in reports."""
    return _format(path, positions=True)


def _format(path: Path, positions: bool) -> str:
    out: list[str] = []
    for seg in path:
        if isinstance(seg, int):
            out.append("[*]" if positions else f"[{seg}]")
        elif isinstance(seg, tuple):
            out.append(f"[{seg[0]}={seg[1]}]")
        elif _WORD.match(seg) or seg in (_ANY, _DEEP):
            out.append(f".{seg}" if out else seg)
        else:
            out.append(f"[{msgspec.json.encode(seg).decode()}]")
    return "".join(out) or "$"


_TOKEN = re.compile(r"""
    \[ \s* (?: (?P<index>\d+) | (?P<star>\*) | (?P<quoted>"(?:[^"\\]|\\.)*")
             | (?P<idk>[A-Za-z_]\w*) = (?P<idv>[^\]]*) ) \s* \]
  | (?P<word>\*\*|\*|[^.\[\]]+)
  | (?P<dot>\.)
""", re.VERBOSE)


def parse_pattern(text: str) -> Path:
    """Parse a path pattern (see the module docstring); PatternError when it is not one."""
    if text in ("", "$"):
        return ()
    segments: list[Segment] = []
    pos, expect_word = 0, True
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise PatternError(f"bad field path {text!r} at {pos}")
        pos = m.end()
        if m.group("dot"):
            if expect_word:
                raise PatternError(f"bad field path {text!r}: empty segment")
            expect_word = True
            continue
        if m.group("word") is not None:
            if not expect_word:
                raise PatternError(f"bad field path {text!r}: missing '.' before "
                                   f"{m.group('word')!r}")
            segments.append(m.group("word"))
        elif m.group("index") is not None:
            segments.append(int(m.group("index")))
        elif m.group("star"):
            segments.append(_ANY)
        elif m.group("quoted") is not None:
            try:
                segments.append(msgspec.json.decode(m.group("quoted"), type=str))
            except msgspec.DecodeError:
                raise PatternError(f"bad field path {text!r}: bad quoted key "
                                   f"{m.group('quoted')}") from None
        else:
            segments.append((m.group("idk"), m.group("idv")))
        expect_word = False
    if expect_word:
        raise PatternError(f"bad field path {text!r}: ends with '.'")
    return tuple(segments)


def _matches(pattern: Path, path: Path) -> bool:
    if not pattern:
        return not path
    head = pattern[0]
    if head == _DEEP:
        return any(_matches(pattern[1:], path[i:]) for i in range(len(path) + 1))
    if not path:
        return False
    if head == _ANY or head == path[0]:
        return _matches(pattern[1:], path[1:])
    return False


# -- rules -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Pattern:
    path: Path
    rule: Rule
    rank: tuple[int, int, int]  # (literal segments, -"**" count, layer)


class RuleSet:
    """The compiled rules for one action: ``rule_at(path)`` is the rule set on that
    exact path by the most specific pattern, or None (the parent's rule then applies)."""

    __slots__ = ("_cache", "_patterns")

    def __init__(self, layers: Iterable[Mapping[str, Rule]]) -> None:
        patterns: list[_Pattern] = []
        for layer, rules in enumerate(layers):
            for text, rule in rules.items():
                if rule not in RULES:
                    raise PatternError(f"rule for {text!r} must be one of {', '.join(RULES)}, "
                                       f"got {rule!r}")
                path = parse_pattern(text)
                literals = sum(1 for s in path if s not in (_ANY, _DEEP))
                deep = sum(1 for s in path if s == _DEEP)
                patterns.append(_Pattern(path, rule, (literals, -deep, layer)))
        self._patterns = sorted(patterns, key=lambda p: p.rank, reverse=True)
        self._cache: dict[Path, Rule | None] = {}

    def rule_at(self, path: Path) -> Rule | None:
        try:
            return self._cache[path]
        except KeyError:
            pass
        found = next((p.rule for p in self._patterns if _matches(p.path, path)), None)
        if len(self._cache) > 4096:  # paths carry model names and positions: stay bounded
            self._cache.clear()
        self._cache[path] = found
        return found


class Rules:
    """Compare rules for every action: built-in defaults, then the configured ones.

    ``configured`` is ``shadow.compare`` from the config: ``{action or "*": {pattern:
    rule}}``. ``parity`` adds PARITY_RULES over the defaults.
    """

    def __init__(self, configured: Mapping[str, Mapping[str, Rule]] | None = None, *,
                 parity: bool = False) -> None:
        self._configured = {k: dict(v) for k, v in (configured or {}).items()}
        self._parity = parity
        self._sets: dict[str, RuleSet] = {}
        for action in self._configured:  # fail at startup, not at the first request
            self.for_action(action)

    def for_action(self, action: str) -> RuleSet:
        rules = self._sets.get(action)
        if rules is None:
            layers: list[Mapping[str, Rule]] = [DEFAULT_RULES.get("*", {}),
                                                DEFAULT_RULES.get(action, {})]
            if self._parity:
                layers.append(PARITY_RULES.get(action, {}))
            layers += [self._configured.get("*", {}), self._configured.get(action, {})]
            rules = self._sets[action] = RuleSet(layers)
        return rules


# -- comparing -------------------------------------------------------------------------

_KINDS: dict[type, str] = {type(None): "null", bool: "boolean", int: "number", float: "number",
                           str: "string", list: "array", dict: "object"}


def _kind(value: Any) -> str:
    """The JSON type of a decoded value (int and float are both numbers)."""
    kind = _KINDS.get(type(value))
    if kind is not None:
        return kind
    for base, name in _KINDS.items():  # subclasses (rare: decoded JSON has none)
        if isinstance(value, base) and base is not bool:
            return name
    return type(value).__name__


def compare(primary: Any, shadow: Any, rules: RuleSet, default: Rule = "exact") -> list[Diff]:
    """Every difference between two decoded replies under ``rules``, in document order."""
    out: list[Diff] = []
    _walk(primary, shadow, (), rules.rule_at(()) or default, rules, out)
    return out


def _walk(a: Any, b: Any, path: Path, rule: Rule, rules: RuleSet, out: list[Diff]) -> None:
    if rule == "ignore":
        return
    ka, kb = _kind(a), _kind(b)
    if ka != kb:
        out.append(Diff(path, "type", a, b))
    elif ka == "object":
        _walk_object(a, b, path, rule, rules, out)
    elif ka == "array":
        keyed = _id_key(a, b)
        if keyed is not None:
            _walk_object(_by_id(a, keyed), _by_id(b, keyed), path, rule, rules, out)
            return
        if rule == "exact" and len(a) != len(b):
            out.append(Diff(path, "length", len(a), len(b)))
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            child = (*path, i)
            _walk(x, y, child, rules.rule_at(child) or rule, rules, out)
    elif rule == "exact" and a != b:
        out.append(Diff(path, "value", a, b))


def _walk_object(a: Mapping[Segment, Any], b: Mapping[Segment, Any], path: Path, rule: Rule,
                 rules: RuleSet, out: list[Diff]) -> None:
    for key, x in a.items():
        child = (*path, key)
        child_rule = rules.rule_at(child) or rule
        if key in b:
            _walk(x, b[key], child, child_rule, rules, out)
        elif child_rule != "ignore":
            out.append(Diff(child, "missing", x, None))
    for key, y in b.items():
        if key not in a:
            child = (*path, key)
            if (rules.rule_at(child) or rule) != "ignore":
                out.append(Diff(child, "extra", None, y))


def _id_key(a: list[Any], b: list[Any]) -> str | None:
    """The id field every element of both arrays has, unique on each side, or None."""
    items = [*a, *b]
    if not items or not all(isinstance(x, dict) for x in items):
        return None
    for key in _ID_KEYS:
        if all(isinstance(x.get(key), str) for x in items) and \
                len({x[key] for x in a}) == len(a) and len({x[key] for x in b}) == len(b):
            return key
    return None


def _by_id(items: list[dict[str, Any]], key: str) -> dict[Segment, Any]:
    return {(key, x[key]): x for x in items}


def split_noise(diffs: list[Diff], noise: list[Diff]) -> tuple[list[Diff], list[Diff]]:
    """(regressions, noise): a diff is noise when the primary's own twin (its secondary)
    differed from it at the same path or above it."""
    noisy = {d.path for d in noise}
    if not noisy:
        return diffs, []
    real: list[Diff] = []
    quiet: list[Diff] = []
    for d in diffs:
        if any(d.path[:n] in noisy for n in range(len(d.path) + 1)):
            quiet.append(d)
        else:
            real.append(d)
    return real, quiet


__all__ = ["DEFAULT_RULES", "PARITY_RULES", "RULES", "Diff", "PatternError", "Rule", "RuleSet",
           "Rules", "compare", "format_path", "generalize", "parse_pattern", "split_noise"]

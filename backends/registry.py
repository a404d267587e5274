"""The model registry: what models exist, which policy picks which, and the VRAM budget.

``config/models.toml`` is decoded into msgspec Structs, the single source of truth for
what the file may say. Unknown keys and wrong types are rejected with a message naming
the field (``$.models.phi-2.estimated_vram_mb``); ``Registry.load`` then checks what types
cannot express (policy targets exist, relative paths resolve next to the file).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

LoaderName = Literal["ngram", "hf"]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]


class RegistryError(ValueError):
    """A models file that cannot be used; the message names the file and the field."""


class Base(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Common options: unknown keys are errors, fields are keyword-only and immutable."""


class ModelSpec(Base, frozen=True):
    """One model: how to load it, where its files are, and what it costs.

    ``estimated_vram_mb`` may be omitted: such a model cannot be charged to the ledger
    and every load of it is refused (the MMA's ``UNKNOWN_VRAM`` error code).
    """

    loader: LoaderName
    path: str
    estimated_vram_mb: NonNegInt | None = None
    quantization: str = "none"
    context_length: Annotated[int, msgspec.Meta(gt=0)] = 2048
    type: str = "llm"


class BudgetSpec(Base, frozen=True):
    """VRAM budget: ``vram_mb`` applies where no CUDA device is visible."""

    vram_mb: NonNegInt = 12000
    idle_unload_s: PositiveFloat = 300.0
    gpu_fraction: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.8


class _File(Base, frozen=True):
    """The file's top level; each model body is validated on its own to name it in errors."""

    models: dict[str, dict[str, Any]]
    policy: dict[str, Any] = msgspec.field(default_factory=dict)
    budget: BudgetSpec = msgspec.field(default_factory=BudgetSpec)


def _at(error: msgspec.ValidationError, prefix: str) -> str:
    """Rewrite a msgspec message so its path starts at ``prefix`` instead of ``$``."""
    text = str(error)
    if " - at `$" in text:
        return text.replace(" - at `$", f" - at `{prefix}", 1)
    return f"{text} - at `{prefix}`"


class Registry(msgspec.Struct, frozen=True, kw_only=True):
    """A validated models file; ``path`` of every model is absolute."""

    source: Path
    models: dict[str, ModelSpec]
    policy: dict[str, str]
    budget: BudgetSpec

    @classmethod
    def load(cls, path: Path | str) -> Registry:
        """Read and validate a models file, or raise ``RegistryError`` naming the problem."""
        source = Path(path).resolve()
        try:
            raw = tomllib.loads(source.read_text(encoding="utf-8"))
        except OSError as exc:
            raise RegistryError(f"{source}: cannot read models file: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise RegistryError(f"{source}: invalid TOML: {exc}") from exc
        return cls.from_dict(raw, source=source)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: Path) -> Registry:
        """Validate an already-parsed models document; relative paths resolve against
        ``source``'s directory."""
        try:
            top = msgspec.convert(raw, _File)
        except msgspec.ValidationError as exc:
            raise RegistryError(f"{source}: {exc}") from exc
        models: dict[str, ModelSpec] = {}
        for name, body in top.models.items():
            try:
                spec = msgspec.convert(body, ModelSpec)
            except msgspec.ValidationError as exc:
                raise RegistryError(f"{source}: {_at(exc, f'$.models.{name}')}") from exc
            resolved = (source.parent / spec.path).resolve()
            models[name] = msgspec.structs.replace(spec, path=str(resolved))
        if not models:
            raise RegistryError(f"{source}: no models defined - at `$.models`")
        for pref, target in top.policy.items():
            if not isinstance(target, str):
                raise RegistryError(
                    f"{source}: Expected `str`, got `{type(target).__name__}`"
                    f" - at `$.policy.{pref}`"
                )
            if target not in models:
                raise RegistryError(
                    f"{source}: policy target {target!r} is not a configured model"
                    f" - at `$.policy.{pref}`"
                )
        return cls(source=source, models=models, policy=dict(top.policy), budget=top.budget)

    def model_for_pref(self, pref: str | None) -> str | None:
        """The model a load-policy name picks; an unknown name falls back to ``fast``."""
        if pref is not None and pref in self.policy:
            return self.policy[pref]
        return self.policy.get("fast")

    def spec(self, name: str) -> ModelSpec | None:
        """The spec of a configured model, or None."""
        return self.models.get(name)

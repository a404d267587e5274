"""One small interface over every way of turning a model file into a text generator.

A loader is a function ``load(spec) -> ModelHandle``. The ledger only sees handles, so a
new model format is one new module here plus one name in ``LoaderName``. Loading is
blocking and slow: callers run it in a thread executor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from backends.registry import ModelSpec


class LoadError(RuntimeError):
    """A model file that is missing, unreadable or not in the loader's format."""


class ModelHandle(Protocol):
    """A loaded model. ``generate`` may be called from several threads at once."""

    @property
    def measured_vram_mb(self) -> int | None:
        """Device memory the load actually took (CUDA only), else None: charge the estimate."""
        ...

    def generate(
        self,
        prompt: str,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: Sequence[str],
        seed: int | None,
    ) -> tuple[str, int]:
        """Continue ``prompt``; return the text (without the prompt) and tokens generated."""
        ...

    def unload(self) -> None:
        """Release the model's memory; the handle must not be used afterwards."""
        ...


Loader = Callable[[ModelSpec], ModelHandle]


def load_model(spec: ModelSpec) -> ModelHandle:
    """Load ``spec`` with the loader it names (hf is imported only when needed)."""
    if spec.loader == "ngram":
        from backends.loaders import ngram

        return ngram.load(spec)
    if spec.loader == "hf":
        from backends.loaders import hf

        return hf.load(spec)
    raise LoadError(f"unknown loader {spec.loader!r}")

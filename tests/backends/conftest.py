"""Fixtures for the reference-backend tests: model files, models.toml files, processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.procs import MODELS_DIR, Backend, start_backend


def _toml_value(value: Any) -> str:
    """A TOML literal for the few value types models files use."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _write_models_toml(
    path: Path,
    models: dict[str, dict[str, Any]],
    policy: dict[str, str] | None = None,
    budget: dict[str, Any] | None = None,
) -> Path:
    """Write a models file; a model ``path`` like ``tiny.ngram`` means ``models/tiny.ngram``."""
    lines: list[str] = []
    if budget:
        lines.append("[budget]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in budget.items()]
    if policy:
        lines.append("[policy]")
        lines += [f'"{k}" = {_toml_value(v)}' for k, v in policy.items()]
    for name, body in models.items():
        lines.append(f'[models."{name}"]')
        for key, value in body.items():
            if key == "path" and "/" not in str(value):
                value = str(MODELS_DIR / str(value))
            lines.append(f"{key} = {_toml_value(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def models_toml(tmp_path: Path) -> Callable[..., Path]:
    """Write ``tmp_path/models.toml``: ``models_toml(models, policy=None, budget=None)``.

    A model ``path`` without a slash names a file in ``models/`` (e.g. ``tiny.ngram``).
    """

    def write(models: dict[str, dict[str, Any]], policy: dict[str, str] | None = None,
              budget: dict[str, Any] | None = None) -> Path:
        return _write_models_toml(tmp_path / "models.toml", models, policy, budget)

    return write


@pytest.fixture
def backend_factory() -> Iterator[Callable[..., Backend]]:
    """Start backends (``start_backend`` arguments); all are stopped after the test."""
    started: list[Backend] = []

    def start(kind: str, models: Path | str = "config/models.toml", *,
              extra_args: Sequence[str] = (), **kwargs: Any) -> Backend:
        backend = start_backend(kind, models, extra_args=extra_args, **kwargs)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.stop()

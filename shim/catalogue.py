"""What the model config says about each model: where its files are, its quantization.

A model-access request served by MMS gets ``access_info.model_path_from_config`` (where
the speech agents load the model from, protocol.md) and ``quantization_level`` from the
same models file the backends read (``models_file``; relative paths resolve against the
file's directory, as in backends/registry.py).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    """One model of the models file."""

    path: str
    quantization: str


def load_catalogue(models_file: str) -> dict[str, CatalogueEntry]:
    """Model name -> entry; empty when the file is missing or unreadable (never raises)."""
    if not models_file:
        return {}
    source = Path(models_file)
    try:
        doc = tomllib.loads(source.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    models = doc.get("models")
    out: dict[str, CatalogueEntry] = {}
    for name, spec in models.items() if isinstance(models, dict) else ():
        if not isinstance(spec, dict):
            continue
        raw = spec.get("path")
        path = str((source.parent / raw).resolve()) if isinstance(raw, str) and raw else ""
        quant = spec.get("quantization")
        out[str(name)] = CatalogueEntry(path, quant if isinstance(quant, str) else "default")
    return out

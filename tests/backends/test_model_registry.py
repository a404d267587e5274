"""The models file: shipped config is valid; every bad field is named in the error."""

from __future__ import annotations

from pathlib import Path

import pytest

from backends.registry import Registry, RegistryError
from tests.procs import DEFAULT_MODELS_TOML, REPO_ROOT

GOOD = """
[budget]
vram_mb = 4000

[policy]
fast = "phi-2"

[models.phi-2]
loader = "ngram"
path = "../models/tiny.ngram"
estimated_vram_mb = 2250
"""


def write(tmp_path: Path, text: str) -> Path:
    conf = tmp_path / "conf"
    conf.mkdir(exist_ok=True)
    path = conf / "models.toml"
    path.write_text(text)
    return path


def test_shipped_config_is_valid() -> None:
    reg = Registry.load(DEFAULT_MODELS_TOML)
    assert len(reg.models) >= 5
    assert reg.policy == {
        "fast": "phi-2",
        "quality": "mistral-7b",
        "fallback": "tinyllama",
        "stt": "whisper-small",
        "tts": "piper-tts",
    }
    assert reg.models["phi-2"].path == str(REPO_ROOT / "models" / "tiny.ngram")
    assert reg.models["mistral-7b"].path == str(REPO_ROOT / "models" / "base.ngram")
    assert reg.models["whisper-small"].type == "stt"
    assert reg.models["piper-tts"].type == "tts"
    assert reg.budget.idle_unload_s == 300
    assert reg.budget.gpu_fraction == 0.8


def test_defaults_and_relative_path(tmp_path: Path) -> None:
    reg = Registry.load(write(tmp_path, GOOD))
    spec = reg.models["phi-2"]
    assert spec.path == str((tmp_path / "models" / "tiny.ngram").resolve())
    assert (spec.quantization, spec.context_length, spec.type) == ("none", 2048, "llm")
    assert reg.budget.vram_mb == 4000


def test_unknown_pref_falls_back_to_fast(tmp_path: Path) -> None:
    reg = Registry.load(write(tmp_path, GOOD))
    assert reg.model_for_pref("fast") == "phi-2"
    assert reg.model_for_pref("no-such-policy") == "phi-2"
    assert reg.model_for_pref(None) == "phi-2"


def test_no_fast_policy_means_no_model(tmp_path: Path) -> None:
    reg = Registry.load(write(tmp_path, GOOD.replace('fast = "phi-2"', 'quality = "phi-2"')))
    assert reg.model_for_pref("quality") == "phi-2"
    assert reg.model_for_pref("whatever") is None


@pytest.mark.parametrize(
    ("old", "new", "needle"),
    [
        ("estimated_vram_mb = 2250", 'estimated_vram_mb = "lots"',
         "$.models.phi-2.estimated_vram_mb"),
        ("estimated_vram_mb = 2250", "estimated_vram_mb = -1", "$.models.phi-2.estimated_vram_mb"),
        ('loader = "ngram"', 'loader = "onnx"', "$.models.phi-2.loader"),
        ('loader = "ngram"', 'loader = "ngram"\ncolour = "red"', "colour"),
        ("estimated_vram_mb = 2250", "estimated_vram_mb = 2250\ncontext_length = 0",
         "$.models.phi-2.context_length"),
        ('path = "../models/tiny.ngram"', "", "path"),
        ("vram_mb = 4000", 'vram_mb = "4GB"', "$.budget.vram_mb"),
        ("vram_mb = 4000", "vram_mb = 4000\ngpu_fraction = 1.5", "$.budget.gpu_fraction"),
        ("vram_mb = 4000", "vram_mb = 4000\nidle_unload_s = 0", "$.budget.idle_unload_s"),
        ('fast = "phi-2"', 'fast = "gpt-5"', "$.policy.fast"),
        ('fast = "phi-2"', "fast = 3", "$.policy.fast"),
        ("[budget]", "[extra]\nx = 1\n[budget]", "extra"),
    ],
)
def test_bad_field_is_named(tmp_path: Path, old: str, new: str, needle: str) -> None:
    assert old in GOOD
    with pytest.raises(RegistryError) as info:
        Registry.load(write(tmp_path, GOOD.replace(old, new)))
    message = str(info.value)
    assert needle in message, message
    assert "models.toml" in message


def test_unknown_model_key_names_model_and_key(tmp_path: Path) -> None:
    with pytest.raises(RegistryError) as info:
        Registry.load(write(tmp_path, GOOD + "colour = 'red'\n"))
    assert "`colour`" in str(info.value)
    assert "$.models.phi-2" in str(info.value)


def test_no_models(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=r"\$\.models"):
        Registry.load(write(tmp_path, "[models]\n"))


def test_syntax_error_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="invalid TOML"):
        Registry.load(write(tmp_path, "[models.phi-2\n"))
    with pytest.raises(RegistryError, match="cannot read"):
        Registry.load(tmp_path / "nope.toml")
